"""A tiny causal LM with a tokenizer on disk (llama2.c format), for jobs that read text end to end."""

import random

from llama2c_files import PIECES, make_weights, write_checkpoint, write_tokenizer

VOCAB = 3 + 256 + len(PIECES)  # unk/BOS/EOS, byte fallback, pieces
CFG = dict(dim=32, hidden_dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, seq_len=64)
WORDS = ["hello", "abc", "bc", "aa", "lo", "hell", "cab", "hello,", "bell", "ace"]


def write_tiny_causal_lm(folder, seed=0, seq_len=None):
    """Write ``model.bin`` and ``tok{VOCAB}.bin`` (found beside it) into ``folder``; returns the model
    path. ``seq_len``: the context length (default 64; a chat backend's prompts need thousands)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = CFG if seq_len is None else {**CFG, "seq_len": seq_len}
    write_checkpoint(folder / "model.bin", cfg, make_weights(cfg, tied=True, seed=seed), tied=True)
    write_tokenizer(folder / f"tok{VOCAB}.bin")
    return folder / "model.bin"


def write_corpus(path, n_docs=60, seed=0):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                                for _ in range(n_docs)))
    return path
