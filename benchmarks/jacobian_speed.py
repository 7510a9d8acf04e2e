"""Jacobian speed: the efficient active-latent Jacobian (SPEC 5) against batched autograd.

For random weights at two realistic sizes, times ``jumpscope.jacobian.jacobian_active`` (k x k per
token from the weight products ``decoder @ W_in`` / ``W_out @ encoder``, a gather and one batched
product) against the autograd fallback ``jacobian_autograd`` (``vmap(jacrev)`` of the composed
function restricted to the active latents) and ``torch.autograd.functional.jacobian`` token by token:

- gpt2-small: plain MLP (gelu_new), d_model 768, d_mlp 3072, d_sae 24576 on both sides;
- llama-like: gated MLP (SwiGLU), d_model 1024, d_mlp 2816, d_sae 16384 on both sides;

k = 32 active latents per token on each side, drawn uniformly at random (a worst case for the
per-call products: real SAEs' skewed firing makes fewer distinct latents active per batch), at
N = 256 and 2048 tokens. Rows:

- ``efficient, products reused``: ``jacobian_active(..., weights=precompute(...))`` with the
  products computed beforehand (evaluation, or several calls between weight updates);
- ``precompute, all latents``: what those products cost, once per weight update;
- ``efficient, per call``: the default, products for the latents active in the call included;
- ``autograd fallback``: ``jacobian_autograd`` (vmap chunk 64: its fastest of none/16/64 here);
- ``autograd.functional.jacobian``: one token at a time on the first 8 tokens, scaled to N;
- ``... fwd+bwd``: the Jacobian and the backward of ``mean |J|`` to decoder and encoder (a JSAE
  training step's extra cost); the efficient one with the products per call.

Each ratio is the autograd fallback's median over the row's median (forward rows against its
forward, fwd+bwd rows against its fwd+bwd); the last column does the same with the token-by-token
``autograd.functional.jacobian`` (first N only). Rows take turns round after round (one warm-up round),
so load from other processes hits them alike; the machine's 2 cores are shared and noisy, so read
the ratios more than the seconds. Before timing, each case checks the efficient Jacobian against
the fallback (max relative error).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/jacobian_speed.py        # about 5 minutes on 2 cores
    python benchmarks/jacobian_speed.py --quick                         # N=256 only, 3 rounds
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see benchmarks/README.md

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from jumpscope.jacobian import MLPFunction, jacobian_active, jacobian_autograd, precompute  # noqa: E402
from shared_data import timing_parser  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "jacobian_speed.json"
SIZES = {"gpt2-small": dict(kind="plain", activation="gelu_tanh", d_model=768, d_mlp=3072, d_sae=24576),
         "llama-like": dict(kind="gated", activation="silu", d_model=1024, d_mlp=2816, d_sae=16384)}
FEW = 8  # tokens for torch.autograd.functional.jacobian


def make_case(size: dict, n_tokens: int, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d, m, s = size["d_model"], size["d_mlp"], size["d_sae"]
    gated = size["kind"] == "gated"
    mlp = MLPFunction(size["kind"], size["activation"], torch.randn(d, m, generator=g) / d ** 0.5,
                      torch.randn(m, d, generator=g) / m ** 0.5, None if gated else 0.1 * torch.randn(m, generator=g),
                      None if gated else 0.1 * torch.randn(d, generator=g),
                      W_up=torch.randn(d, m, generator=g) / d ** 0.5 if gated else None)
    dec = torch.randn(s, d, generator=g)
    dec /= dec.norm(dim=1, keepdim=True)
    enc = torch.randn(d, s, generator=g) / d ** 0.5
    x = torch.randn(n_tokens, d, generator=g)
    pick = lambda: torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(n_tokens)])  # noqa: E731
    return dict(mlp=mlp, dec=dec, enc=enc, x=x, a_in=pick(), a_out=pick(), scales=(1.3, 0.8))


def functional_jacobian(c: dict) -> torch.Tensor:
    """torch.autograd.functional.jacobian of the composed function, one token at a time."""
    mlp, dec, enc, x, a_in, a_out, (si, so) = (c[k] for k in ("mlp", "dec", "enc", "x", "a_in", "a_out", "scales"))
    out = []
    for n in range(FEW):
        def f(s, n=n):
            return (mlp((x[n] + si * (s @ dec[a_in[n]]))[None])[0] / so) @ enc[:, a_out[n]]
        out.append(torch.autograd.functional.jacobian(f, x.new_zeros(a_in.shape[1])))
    return torch.stack(out)


def rows_for(c: dict, with_functional: bool) -> dict:
    """label -> (thunk, kind): kind 'fwd' or 'fwdbwd' (the ratio's reference row), or '-'."""
    args = lambda d, e: (c["mlp"], d, c["x"], c["a_in"], e, c["a_out"], *c["scales"])  # noqa: E731
    leaves = [c["dec"].clone().requires_grad_(True), c["enc"].clone().requires_grad_(True)]

    def fwdbwd(fn):
        def run():
            for leaf in leaves:
                leaf.grad = None
            fn(*args(*leaves)).abs().mean().backward()
        return run

    rows = {"efficient, products reused": (lambda: jacobian_active(*args(c["dec"], c["enc"]), weights=c["weights"]),
                                           "fwd"),
            "precompute, all latents": (lambda: precompute(c["mlp"], c["dec"], c["enc"]), "-"),
            "efficient, per call": (lambda: jacobian_active(*args(c["dec"], c["enc"])), "fwd"),
            "autograd fallback": (lambda: jacobian_autograd(*args(c["dec"], c["enc"]), chunk_size=64), "fwd")}
    if with_functional:
        rows[f"autograd.functional.jacobian (x N/{FEW})"] = (lambda: functional_jacobian(c), "fwd")
    rows["efficient, per call, fwd+bwd"] = (fwdbwd(jacobian_active), "fwdbwd")
    rows["autograd fallback, fwd+bwd"] = (fwdbwd(lambda *a: jacobian_autograd(*a, chunk_size=64)), "fwdbwd")
    return rows


def run_case(name: str, n_tokens: int, args) -> list[dict]:
    c = make_case(SIZES[name], n_tokens, args.k)
    with torch.no_grad():
        c["weights"] = precompute(c["mlp"], c["dec"], c["enc"])
        fast = jacobian_active(c["mlp"], c["dec"], c["x"], c["a_in"], c["enc"], c["a_out"], *c["scales"])
        ref = jacobian_autograd(c["mlp"], c["dec"], c["x"], c["a_in"], c["enc"], c["a_out"], *c["scales"],
                                chunk_size=64)
    error = float((fast - ref).abs().max() / ref.abs().max())
    functional_error = float((fast[:FEW] - functional_jacobian(c)).abs().max() / ref.abs().max())
    rows = rows_for(c, with_functional=n_tokens == args.tokens[0])
    times: dict[str, list[float]] = {label: [] for label in rows}
    rounds = args.repeats if n_tokens <= 512 else max(2, args.repeats // 2)
    for round_index in range(rounds + 1):
        for label, (thunk, _) in rows.items():
            start = time.perf_counter()
            thunk()
            seconds = time.perf_counter() - start
            if label.startswith("autograd.functional"):
                seconds *= n_tokens / FEW
            if round_index:
                times[label].append(seconds)
        print(f"  {name} N={n_tokens}: round {round_index}/{rounds} ({time.perf_counter() - args.started:.0f} s, "
              f"load {os.getloadavg()[0]:.1f})", flush=True)
    medians = {label: statistics.median(t) for label, t in times.items()}
    reference = {"fwd": medians["autograd fallback"], "fwdbwd": medians["autograd fallback, fwd+bwd"]}
    functional = next((v for label, v in medians.items() if label.startswith("autograd.functional")), None)
    return [dict(size=name, tokens=n_tokens, row=label, seconds=medians[label], times=times[label],
                 ratio=reference[kind] / medians[label] if kind in reference else None,
                 functional_ratio=functional / medians[label] if functional and kind == "fwd" else None,
                 max_rel_error=error,
                 functional_rel_error=functional_error, **SIZES[name], k=args.k) for label, (_, kind) in rows.items()]


def table(results: list[dict]) -> str:
    lines = ["| size | N | row | median (s) | per token (ms) | autograd fallback / row | functional.jacobian / row |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        ratio, functional = (f"{r[key]:.1f}x" if r[key] is not None else "-" for key in ("ratio", "functional_ratio"))
        lines.append(f"| {r['size']} | {r['tokens']} | {r['row']} | {r['seconds']:.3f} | "
                     f"{1e3 * r['seconds'] / r['tokens']:.2f} | {ratio} | {functional} |")
    return "\n".join(lines)


def main() -> None:
    parser = timing_parser(__doc__, "timed rounds after a warm-up (halved for N > 512)")
    parser.add_argument("--tokens", type=int, action="append", help="repeatable; default 256 and 2048")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="repeatable; default both")
    parser.add_argument("--quick", action="store_true", help="N=256 only, 3 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = args.tokens or [256], 3
    args.tokens = args.tokens or [256, 2048]
    torch.set_num_threads(args.threads)
    args.started = time.perf_counter()
    header = (f"{date.today()}, torch {torch.__version__}, float32 on CPU ({platform.machine()}, {os.cpu_count()} "
              f"cores), torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
              f"k={args.k}, load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    results = []
    for name in args.size or list(SIZES):
        for n_tokens in args.tokens:
            case = run_case(name, n_tokens, args)
            results += case
            print(f"  {name} N={n_tokens}: efficient vs autograd max relative error {case[0]['max_rel_error']:.1e} "
                  f"(vs autograd.functional.jacobian {case[0]['functional_rel_error']:.1e})", flush=True)
    print(header)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(header=header, results=results), indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - args.started:.0f} s)")


if __name__ == "__main__":
    main()
