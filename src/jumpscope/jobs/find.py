"""``jumpscope find``: concept search, the SAE latents that separate two sets of texts.

Reads the two sets (files with one example per line, or inline texts), loads the SAE and the model
it was trained on, and ranks the latents with :func:`jumpscope.analysis.concepts.find_concept`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..analysis.concepts import SORT_KEYS, ConceptSearch, find_concept
from ..device import resolve_device
from ..errors import ConfigError, check_positive
from ..formats.loading import load_saes, model_of
from ..models.loading import load_model
from ..safeio import read_bytes

__all__ = ["FindJobConfig", "read_texts", "run_find"]

MAX_TEXT_FILE_BYTES = 64 << 20
# A value with no spaces that looks like a path names a file, so a mistyped path is an error
# instead of silently becoming a one-word text.
_LOOKS_LIKE_PATH = re.compile(r"\S*([/\\]\S*|\.(txt|text|lines|csv|tsv|md|json|jsonl))", re.IGNORECASE)


@dataclass
class FindJobConfig:
    """Which SAE, which two sets of texts, and how many latents to show."""

    sae: str = ""
    """An SAE folder or file in any supported format, or an hf://owner/name/path reference."""

    positive: tuple[str, ...] = ()
    """Texts showing the concept: a file with one example per line (blank lines skipped), or an
    inline text; repeat the option to add more (a value naming an existing file is read as one)."""

    negative: tuple[str, ...] = ()
    """Texts without it (contrast set), given the same way as --positive."""

    top: int = 20
    """Latents shown."""

    sort: Literal["auroc", "diff"] = "auroc"
    """Rank by AUROC (how cleanly a text's max activation separates the sets; ties broken by diff)
    or by diff (mean max activation on positive minus negative texts)."""

    examples: int = 3
    """Top positive examples shown per latent (JSON output; the table shows the first)."""

    model: str | None = None
    """The model to run; None: the model the SAE was trained on (its config's 'model')."""

    site: str | None = None
    """Hook site for an SAE whose file does not record one (e.g. Gemma Scope params.npz)."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    batch_size: int = 16
    """Texts per forward pass (padded to the longest in the batch)."""

    max_tokens: int = 128
    """Tokens read per text; longer texts are truncated."""

    allow_network: bool = False
    """Download an hf:// SAE or a hub model that is not in the local Hugging Face cache."""

    def __post_init__(self) -> None:
        for name in ("positive", "negative"):
            if isinstance(getattr(self, name), str):  # one value given as a plain string
                setattr(self, name, (getattr(self, name),))
            if not getattr(self, name):
                raise ConfigError(f"no {name} texts: give --{name} FILE_OR_TEXT (repeatable)")
        if self.sort not in SORT_KEYS:
            raise ConfigError(f"sort must be one of {', '.join(SORT_KEYS)}, got {self.sort!r}")
        check_positive(self, "top", "batch_size", "max_tokens")
        check_positive(self, "examples", zero_ok=True)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a long inline text is too long a file name; a NUL byte
        return False


def read_texts(values: tuple[str, ...] | list[str], what: str) -> list[str]:
    """The texts of ``--{what}`` values: an existing file gives its non-blank lines, any other
    value is itself a text; a value that looks like a missing file is an error."""
    texts: list[str] = []
    for value in values:
        path = Path(value).expanduser()
        if _exists(path):
            try:
                lines = read_bytes(path, MAX_TEXT_FILE_BYTES, ConfigError).decode("utf-8").splitlines()
            except UnicodeDecodeError as error:
                raise ConfigError(f"{what} file {value} is not UTF-8 text ({error.reason} at byte {error.start})") \
                    from None
            found = [line.strip() for line in lines if line.strip()]
            if not found:
                raise ConfigError(f"{what} file {value} has no examples (expected one per line)")
            texts += found
        elif _LOOKS_LIKE_PATH.fullmatch(value):
            raise FileNotFoundError(f"{what} file {value} does not exist (an inline text needs a space or "
                                    "must not look like a path)")
        elif not value.strip():
            raise ConfigError(f"an empty {what} text; give a file or a non-empty text")
        else:
            texts.append(value.strip())
    if len(texts) < 2:
        raise ConfigError(f"need at least 2 {what} texts to rank latents, got {len(texts)}")
    return texts


def run_find(job: FindJobConfig) -> ConceptSearch:
    """Read the texts, load the SAE and its model, and rank the latents."""
    positive, negative = read_texts(job.positive, "positive"), read_texts(job.negative, "negative")
    device = resolve_device(job.device)
    name, sae = next(iter(load_saes([job.sae], job.site, job.allow_network).items()))
    spec = model_of(job.model, {name: sae})
    loaded = load_model(spec, device=device, allow_network=job.allow_network)
    if loaded.tokenizer is None:
        raise ConfigError(f"model {spec} has no tokenizer; concept search reads text")
    result = find_concept(loaded, sae.to(device), positive, negative, site=sae.cfg.site, top=job.top,
                          sort=job.sort, batch_size=job.batch_size, max_tokens=job.max_tokens,
                          n_examples=job.examples)
    result.meta = {"sae": job.sae, "model": loaded.name, "job": dataclasses.asdict(job)}
    return result
