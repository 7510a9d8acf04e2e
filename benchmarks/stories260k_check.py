"""Sanity check of the llama2.c loader on the real stories260K (Karpathy's tinyllamas, MIT licence).

Loads ``stories260K.bin`` + ``tok512.bin`` from the shared data folder (``../shared/data`` beside the
repository, or ``$JUMPSCOPE_SHARED_DATA``) through ``jumpscope.models.llama2c.load_llama2c`` as a
transformers ``LlamaForCausalLM``, verifies the sha256 checksums, then prints:

- the greedy text generated from BOS (expected to start "Once upon a time, there was a little girl
  named Lily");
- the mean next-token loss (nats/token) on the first N tokens of ``text/tinystories_cased.txt``
  (BOS, then the text; non-overlapping windows of the model's 512-token context; about 1.5 expected);
- forward-pass throughput (tokens/s) on full 512-token windows.

    python benchmarks/stories260k_check.py                  # N = 2000
    python benchmarks/stories260k_check.py --tokens 20000 --batch 8 --threads 4

Exits 0 with a message where the data folder is absent.
"""

from __future__ import annotations

import argparse
import time

import torch

from jumpscope.models.llama2c import load_llama2c
from shared_data import STORIES260K, data_dir, verified



def mean_next_token_loss(model, ids: list[int], window: int) -> float:
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[s:s + window + 1]])
        with torch.no_grad():
            logits = model(chunk[:, :-1]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return total / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2000, help="score the first N next-token predictions")
    ap.add_argument("--new-tokens", type=int, default=60, help="greedy tokens to generate from BOS")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass in the throughput test")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    found = verified(*STORIES260K, "text/tinystories_cased.txt")
    if isinstance(found, str):
        print(f"SKIP: {found}")
        return 0
    data = data_dir()

    model, tok = load_llama2c(data / "stories260k" / "stories260K.bin", data / "stories260k" / "tok512.bin")
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"stories260K: {n_params:,} parameters, {model.config.num_hidden_layers} layers, "
          f"d_model {model.config.hidden_size}, vocab {model.config.vocab_size}, device {args.device}")

    bos = torch.tensor([[tok.bos_token_id]], device=args.device)
    out = model.generate(bos, attention_mask=torch.ones_like(bos), max_new_tokens=args.new_tokens,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"greedy from BOS ({args.new_tokens} tokens): {tok.decode(out[0], skip_special_tokens=True)!r}")

    text = (data / "text" / "tinystories_cased.txt").read_text()
    ids = tok(text[: max(8 * args.tokens, 1000)])["input_ids"][: args.tokens + 1]
    window = model.config.max_position_embeddings
    cpu_model = model if args.device == "cpu" else model.to("cpu")
    loss = mean_next_token_loss(cpu_model, ids, window)
    print(f"mean next-token loss on the first {len(ids) - 1} tokens of tinystories_cased.txt: {loss:.4f} nats/token")
    model.to(args.device)

    all_ids = tok(text)["input_ids"]
    n_win = min(args.batch, (len(all_ids) - 1) // window)
    x = torch.tensor([all_ids[i * window:(i + 1) * window] for i in range(n_win)], device=args.device)
    with torch.no_grad():
        model(x)  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"forward throughput: {x.numel() / best:,.0f} tokens/s (batch {n_win} x {window}, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
