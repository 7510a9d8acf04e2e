"""Max-activating examples: stream a corpus through model + SAE and keep, per latent, its top contexts.

For every batch of context windows the SAE's latents are computed at every ordinary token (BOS,
separators and padding are skipped, as in training), each latent's peak in each window becomes a
candidate, and a merge keeps the ``n_top`` best windows per latent with the ``tokens_before`` /
``tokens_after`` tokens around the peak and the latent's activation on each. The same merge, keyed
by an independent uniform number instead of the peak, keeps a uniform random sample of the windows
where the latent fired (the "lower quantiles" of the dashboard). Fire counts give the density and a
log10 histogram of every non-zero activation is accumulated.

Memory is bounded by d_sae x (n_top + n_sample) x window width, whatever the corpus length, and
the token-by-latent activations of one batch at a time. A run writes its state every
``checkpoint_every`` batches and resumes from it (the random keys come from a generator seeded per
batch, so a resumed run ends with exactly the state of an uninterrupted one).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models.harvest import Harvester, unpack_batch
from ..safeio import read_json, read_safetensors, read_safetensors_metadata, write_safetensors, write_text
from ..sae.base import SAE
from .records import PAD_TOKEN, LatentExamples

STATE = ("top_values", "top_tokens", "top_acts", "sample_keys", "sample_values", "sample_tokens", "sample_acts",
         "fire_count", "hist_counts", "random_keys", "random_tokens", "random_peaks")


@dataclass
class ExamplesConfig:
    """How many examples to keep per latent and how they look."""

    n_top: int = 20
    """Top-activating contexts kept per latent."""

    n_sample: int = 20
    """Contexts kept per latent from a uniform random sample of those where it fired."""

    n_random: int = 200
    """Windows kept from a uniform random sample of all windows, with every latent's peak in each:
    the non-activating contexts of a latent (those where its peak is 0) for autointerp scoring."""

    tokens_before: int = 10
    """Tokens shown before each example's peak token."""

    tokens_after: int = 5
    """Tokens shown after each example's peak token."""

    hist_bins: int = 50
    """Bins of the per-latent log10 activation histogram."""

    hist_range: tuple[float, float] = (-3.0, 2.0)
    """log10 activation range of the histogram (values outside count in the end bins)."""

    token_chunk: int = 1024
    """Tokens encoded and merged at once (whole context windows, at least one): memory holds a few
    [token_chunk, d_sae] float blocks, e.g. 64 MB each for 16k latents."""

    checkpoint_every: int = 50
    """Write the resumable state every this many batches (0: never)."""

    seed: int = 0
    """Seed of the random sample."""

    def __post_init__(self) -> None:
        if self.n_top < 1 or min(self.n_sample, self.n_random, self.tokens_before, self.tokens_after) < 0:
            raise ValueError("n_top must be >= 1 and n_sample, n_random, tokens_before, tokens_after >= 0")
        if self.hist_bins < 1 or not self.hist_range[0] < self.hist_range[1]:
            raise ValueError(f"need hist_bins >= 1 and an increasing hist_range, got {self.hist_range}")

    @property
    def width(self) -> int:
        return self.tokens_before + 1 + self.tokens_after


class ExampleCollector:
    """The running per-latent state; feed it ``(input_ids, train_mask, latents)`` batch by batch."""

    def __init__(self, d_sae: int, cfg: ExamplesConfig):
        self.cfg, self.d_sae = cfg, d_sae
        width, minus_inf = cfg.width, float("-inf")
        self.top_values = torch.full((d_sae, cfg.n_top), minus_inf)
        self.top_tokens = torch.full((d_sae, cfg.n_top, width), PAD_TOKEN, dtype=torch.int32)
        self.top_acts = torch.zeros(d_sae, cfg.n_top, width)
        self.sample_keys = torch.full((d_sae, cfg.n_sample), minus_inf)
        self.sample_values = torch.full((d_sae, cfg.n_sample), minus_inf)
        self.sample_tokens = torch.full((d_sae, cfg.n_sample, width), PAD_TOKEN, dtype=torch.int32)
        self.sample_acts = torch.zeros(d_sae, cfg.n_sample, width)
        self.random_keys = torch.full((cfg.n_random,), minus_inf)
        self.random_tokens = torch.full((cfg.n_random, width), PAD_TOKEN, dtype=torch.int32)
        self.random_peaks = torch.zeros(cfg.n_random, d_sae)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.hist_counts = torch.zeros(d_sae, cfg.hist_bins, dtype=torch.int64)
        self.hist_edges = torch.linspace(*cfg.hist_range, cfg.hist_bins + 1)
        self.n_tokens = 0
        self.adds = 0  # seeds the sample's random keys, so a resumed run draws the same ones
        self.batches = 0  # model batches done, for resuming (kept by collect_examples)

    @torch.no_grad()
    def add(self, input_ids: Tensor, train_mask: Tensor, latents: Tensor) -> None:
        """One batch: ``input_ids`` [B, T] (PAD_TOKEN where padded), ``train_mask`` [B, T] (the
        positions that count), ``latents`` [B, T, d_sae] (ignored outside the mask)."""
        B, T, d_sae = latents.shape
        if d_sae != self.d_sae or input_ids.shape != (B, T) or train_mask.shape != (B, T):
            raise ValueError(f"batch shapes disagree: ids {tuple(input_ids.shape)}, mask {tuple(train_mask.shape)}, "
                             f"latents {tuple(latents.shape)} for d_sae {self.d_sae}")
        mask = train_mask.bool()
        latents = latents.float().masked_fill(~mask[..., None], 0.0)
        fired = latents > 0
        self.fire_count += fired.sum(dim=(0, 1))
        self.n_tokens += int(mask.sum())
        self._histogram(latents[fired], fired.nonzero()[:, 2])
        peak_values, peak_positions = latents.max(dim=1)  # [B, d_sae]: each latent's peak in each window
        peak_values = peak_values.masked_fill(peak_values <= 0, float("-inf")).T  # [d_sae, B]; -inf: not a candidate
        peak_positions = peak_positions.T
        self._merge("top", peak_values, peak_values, peak_positions, input_ids, latents)
        if self.cfg.n_sample:
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.adds)
            keys = torch.rand(peak_values.shape, generator=generator).masked_fill(peak_values == float("-inf"),
                                                                                 float("-inf"))
            self._merge("sample", keys, peak_values, peak_positions, input_ids, latents)
        if self.cfg.n_random:
            self._merge_random(input_ids, mask, latents)
        self.adds += 1

    def _merge_random(self, input_ids: Tensor, mask: Tensor, latents: Tensor) -> None:
        """One random window around a random counted token of each context window joins a uniform
        reservoir (largest random keys kept), with every latent's peak over the window's tokens."""
        generator = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + self.adds) * 2 + 1)  # not the sample's
        B, T = mask.shape
        keys = torch.rand(B, generator=generator).masked_fill(~mask.any(dim=1), float("-inf"))
        centres = torch.multinomial(mask.float() + (~mask.any(dim=1, keepdim=True)).float(), 1,
                                    generator=generator)[:, 0]
        n_kept = self.random_keys.shape[0]
        merged, order = torch.cat([self.random_keys, keys]).topk(n_kept)
        new = (order >= n_kept).nonzero()[:, 0]
        if new.numel():
            window = order[new] - n_kept
            around = centres[window][:, None] + torch.arange(-self.cfg.tokens_before, self.cfg.tokens_after + 1)
            inside = (around >= 0) & (around < T)
            around = around.clamp(0, T - 1)
            rows = window[:, None].expand_as(around)
            counted = inside & mask[rows, around]
            self.random_tokens = self.random_tokens[order.clamp(max=n_kept - 1)]
            self.random_peaks = self.random_peaks[order.clamp(max=n_kept - 1)]
            self.random_tokens[new] = input_ids[rows, around].to(torch.int32).masked_fill(~inside, PAD_TOKEN)
            self.random_peaks[new] = latents[rows, around].masked_fill(~counted[..., None], 0.0).amax(dim=1).clamp(min=0)
        self.random_keys = merged

    def _histogram(self, values: Tensor, latent_index: Tensor) -> None:
        bins = torch.bucketize(values.log10(), self.hist_edges[1:-1])  # 0 .. hist_bins - 1, ends included
        flat = latent_index * self.cfg.hist_bins + bins
        self.hist_counts += torch.bincount(flat, minlength=self.d_sae * self.cfg.hist_bins).view(self.d_sae, -1)

    def _merge(self, kind: str, keys: Tensor, values: Tensor, positions: Tensor, input_ids: Tensor,
               latents: Tensor) -> None:
        """Keep, per latent, the entries with the largest ``keys`` among the kept ones and this
        batch's candidates (one per window); only the windows that make it are cut out."""
        kept_keys = self.top_values if kind == "top" else self.sample_keys
        n_kept = kept_keys.shape[1]
        merged_keys, order = torch.cat([kept_keys, keys], dim=1).topk(n_kept, dim=1)
        from_batch = order >= n_kept
        latent_index, slot = from_batch.nonzero(as_tuple=True)
        window_index = order[latent_index, slot] - n_kept
        width, T = self.cfg.width, input_ids.shape[1]
        tokens = getattr(self, f"{kind}_tokens").gather(1, order.clamp(max=n_kept - 1)[..., None].expand(-1, -1, width))
        acts = getattr(self, f"{kind}_acts").gather(1, order.clamp(max=n_kept - 1)[..., None].expand(-1, -1, width))
        if latent_index.numel():
            around = positions[latent_index, window_index][:, None] + torch.arange(-self.cfg.tokens_before,
                                                                                self.cfg.tokens_after + 1)
            inside = (around >= 0) & (around < T)
            around = around.clamp(0, T - 1)
            rows = window_index[:, None].expand_as(around)
            tokens[latent_index, slot] = input_ids[rows, around].to(torch.int32).masked_fill(~inside, PAD_TOKEN)
            acts[latent_index, slot] = latents[rows, around, latent_index[:, None]].masked_fill(~inside, 0.0)
        setattr(self, f"{kind}_tokens", tokens)
        setattr(self, f"{kind}_acts", acts)
        if kind == "top":
            self.top_values = merged_keys
        else:
            kept_values = torch.cat([self.sample_values, values], dim=1).gather(1, order)
            self.sample_keys, self.sample_values = merged_keys, kept_values

    def result(self, meta: dict[str, Any] | None = None) -> LatentExamples:
        """The records, with empty slots as value 0 / PAD_TOKEN and the sample sorted by activation."""
        empty = self.top_values == float("-inf")
        order = self.sample_values.sort(dim=1, descending=True).indices
        width = self.cfg.width
        sample_values = self.sample_values.gather(1, order)
        return LatentExamples(
            top_values=self.top_values.masked_fill(empty, 0.0),
            top_tokens=self.top_tokens.masked_fill(empty[..., None], PAD_TOKEN),
            top_acts=self.top_acts.masked_fill(empty[..., None], 0.0),
            sample_values=sample_values.masked_fill(sample_values == float("-inf"), 0.0),
            sample_tokens=self.sample_tokens.gather(1, order[..., None].expand(-1, -1, width)),
            sample_acts=self.sample_acts.gather(1, order[..., None].expand(-1, -1, width)),
            fire_count=self.fire_count.clone(), hist_edges=self.hist_edges.clone(),
            hist_counts=self.hist_counts.clone(), n_tokens=self.n_tokens, peak_offset=self.cfg.tokens_before,
            random_tokens=self.random_tokens[self.random_keys > float("-inf")].clone(),
            random_peaks=self.random_peaks[self.random_keys > float("-inf")].clone(),
            meta={"config": asdict(self.cfg), **(meta or {})})

    def save_state(self, folder: Path) -> None:
        # The counters travel in the tensors' own header: one atomic write holds everything that
        # changes, so a kill between two files can never pair new tensors with old counters.
        counters = {"n_tokens": self.n_tokens, "batches": self.batches, "adds": self.adds}
        write_text(folder / "state.json", json.dumps({"d_sae": self.d_sae, "config": asdict(self.cfg)}))
        write_safetensors(folder / "state.safetensors", {name: getattr(self, name) for name in STATE},
                          metadata={"counters": json.dumps(counters)})

    def load_state(self, folder: Path) -> None:
        info = read_json(folder / "state.json")
        if info["d_sae"] != self.d_sae or info["config"] != json.loads(json.dumps(asdict(self.cfg))):
            raise ValueError(f"the saved state in {folder} is for another SAE width or other settings; "
                             "use a fresh output folder or the same settings")
        tensors = read_safetensors(folder / "state.safetensors")
        for name in STATE:
            if name not in tensors or tensors[name].shape != getattr(self, name).shape:
                raise ValueError(f"{folder / 'state.safetensors'}: {name} is missing or has the wrong shape")
            setattr(self, name, tensors[name])
        try:
            counters = json.loads(read_safetensors_metadata(folder / "state.safetensors")["counters"])
            self.n_tokens, self.batches, self.adds = (int(counters[key]) for key in ("n_tokens", "batches", "adds"))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{folder / 'state.safetensors'} has no valid counters ({error}); delete "
                             f"{folder} to scan again") from None


@torch.no_grad()
def encode_windows(sae: SAE, activations: Tensor, token_chunk: int) -> Tensor:
    """The SAE's latents of activations [B, T, d] as [B, T, d_sae], encoded ``token_chunk`` tokens at a time."""
    B, T, d = activations.shape
    flat = activations.reshape(-1, d).to(sae.W_enc.device, sae.W_enc.dtype)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the model produced NaN or infinite activations at the SAE's site")
    out = torch.cat([sae.encode(flat[start:start + token_chunk]).float().cpu()
                     for start in range(0, flat.shape[0], token_chunk)])
    return out.view(B, T, -1)


def collect_examples(model: Any, sae: SAE, batches: Iterable[Any], cfg: ExamplesConfig | None = None, *,
                     max_tokens: int | None = None, state_dir: str | Path | None = None, resume: bool = False,
                     progress: bool = True, meta: dict[str, Any] | None = None) -> LatentExamples:
    """Stream ``batches`` of context windows (as :func:`jumpscope.models.harvest.unpack_batch`
    reads them) through ``model`` and ``sae`` at ``sae.cfg.site`` until ``max_tokens`` ordinary
    tokens; with ``state_dir`` the state is saved as it goes and ``resume`` continues from it."""
    cfg = cfg or ExamplesConfig()
    if not sae.cfg.site:
        raise ValueError("the SAE records no hook site; give one (--site)")
    if sae.cfg.target_site:
        raise ValueError("a transcoder's latents read one site and write another; examples need an ordinary SAE")
    harvester = Harvester(model, [sae.cfg.site])
    collector = ExampleCollector(sae.cfg.d_sae, cfg)
    folder = Path(state_dir) if state_dir is not None else None
    if resume and folder is not None and (folder / "state.safetensors").is_file():
        collector.load_state(folder)
    bar = tqdm(total=max_tokens, initial=min(collector.n_tokens, max_tokens or collector.n_tokens), unit="tok",
               desc="max-activating examples", disable=not progress, dynamic_ncols=True)
    for index, batch in enumerate(batches):
        if max_tokens is not None and collector.n_tokens >= max_tokens:
            break
        if index < collector.batches:  # done before the interruption: skip without running the model
            continue
        input_ids, train_mask, attention_mask = unpack_batch(batch)
        site = harvester.activations(input_ids, attention_mask)[sae.cfg.site]
        if site.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"site {sae.cfg.site!r} has width {site.shape[-1]} but the SAE reads d_in={sae.cfg.d_in}")
        if attention_mask is not None:
            train_mask = train_mask & attention_mask
            input_ids = input_ids.masked_fill(~attention_mask, PAD_TOKEN)
        before = collector.n_tokens
        per_add = max(1, cfg.token_chunk // site.shape[1])  # whole windows, about token_chunk tokens
        for start in range(0, site.shape[0], per_add):
            rows = slice(start, start + per_add)
            collector.add(input_ids[rows].cpu(), train_mask[rows].cpu(),
                          encode_windows(sae, site[rows], cfg.token_chunk))
        collector.batches += 1
        bar.update(collector.n_tokens - before)
        if folder is not None and cfg.checkpoint_every and collector.batches % cfg.checkpoint_every == 0:
            collector.save_state(folder)
    bar.close()
    if collector.n_tokens == 0:
        raise ValueError("no tokens were scanned: the corpus gave no context windows")
    if folder is not None:
        collector.save_state(folder)
    return collector.result({"site": sae.cfg.site, "d_sae": sae.cfg.d_sae, "n_batches": collector.batches,
                             **(meta or {})})


def describe_density(examples: LatentExamples) -> dict[str, float]:
    """Dead and dense fractions and the median log10 density of the live latents."""
    density = examples.density
    live = density[density > 0]
    return {"dead": float((density == 0).double().mean()), "dense_above_0.1": float((density > 0.1).double().mean()),
            "median_log10_density": float(live.log10().median()) if live.numel() else -math.inf}
