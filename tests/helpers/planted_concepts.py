"""A planted concept for concept-search tests: texts with and without the word "hello", and an
SAE with latents built to fire on one token each (so the right answer is known)."""

import random

import torch

from jumpscope.models.harvest import Harvester
from jumpscope.sae import build
from tiny_causal_lm import WORDS


def texts(n, with_hello, seed, max_words=14):
    rng, others = random.Random(seed), [w for w in WORDS if "hello" not in w]
    out = []
    for _ in range(n):
        words = [rng.choice(others) for _ in range(rng.randint(3, max_words))]
        if with_hello:
            words.insert(rng.randrange(len(words) + 1), "hello")
        out.append(" ".join(words))
    return out


def token_detector(loaded, token_ids, slots, site="embed", d_sae=16, seed=0):
    """A ReLU SAE at ``site`` whose latent ``slots[k]`` fires only on token ``token_ids[k]``: at
    ``embed`` a token's activation is its embedding row, so the direction is that row (harvested)
    and the threshold lies between its projection and every other token's. The other latents are
    random directions without bias, firing on about half of all tokens, orthogonal to the planted
    ones (so none of them is a detector of the planted tokens by chance)."""
    model, d = loaded.model, loaded.model.config.hidden_size
    vocab = torch.arange(len(loaded.tokenizer))
    acts = Harvester(model, [site]).activations(vocab[None])[site][0]  # every token once, at embed
    sae = build("relu", d_in=d, d_sae=d_sae, site=site, model=loaded.name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        basis = torch.linalg.qr(acts[list(token_ids)].T).Q  # [d, n_planted]
        random = torch.randn(d, d_sae, generator=g)
        sae.W_enc.copy_((random - basis @ (basis.T @ random)) / d ** 0.5)
        for slot, token in zip(slots, token_ids):
            direction = acts[token] / acts[token].norm()
            proj = acts @ direction
            others = torch.cat([proj[:token], proj[token + 1:]]).max()
            assert proj[token] > others + 1, "precondition: the token's activation stands out"
            sae.W_enc[:, slot] = direction
            sae.b_enc[slot] = -(proj[token] + others) / 2
    return sae.eval()
