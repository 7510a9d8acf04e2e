"""llama2.c files written from scratch: a v0 checkpoint from given weights and a tokenizer file
from given pieces (the formats llama2.c's run.c reads)."""

import struct

import numpy as np


def make_weights(cfg, tied, seed=0):
    g = np.random.default_rng(seed)
    d, h, L, V = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["vocab_size"]
    kv = d * cfg["n_kv_heads"] // cfg["n_heads"]

    def r(*s, scale=0.3):
        return (g.standard_normal(s) * scale).astype(np.float32)

    w = dict(emb=r(V, d, scale=1.0), rms_att=1 + r(L, d, scale=0.2), wq=r(L, d, d), wk=r(L, kv, d),
             wv=r(L, kv, d), wo=r(L, d, d), rms_ffn=1 + r(L, d, scale=0.2), w1=r(L, h, d), w2=r(L, d, h),
             w3=r(L, h, d), rms_final=1 + r(d, scale=0.2),
             rope=r(cfg["seq_len"] * (d // cfg["n_heads"]), scale=5.0))  # unused legacy tables: junk on purpose
    w["cls"] = w["emb"] if tied else r(V, d)
    return w


def write_checkpoint(path, cfg, w, tied):
    header = [cfg[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")]
    header[5] = header[5] if tied else -header[5]
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *header))
        for k in ("emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "rope"):
            f.write(w[k].astype("<f4").tobytes())
        if not tied:
            f.write(w["cls"].astype("<f4").tobytes())


PIECES = [(" ", -1.0), ("a", -2.0), ("b", -2.0), ("c", -2.0), ("h", -2.0), ("e", -2.0), ("l", -2.0),
          ("o", -2.0), (",", -2.0), ("ab", -9.0), ("bc", -3.0), ("aa", -5.0), (" a", -8.0), ("he", -4.0),
          ("ll", -6.0), (" he", -7.0), ("llo", -6.5), (" hello", -1.5), ("lo", -3.0), ("\u2581", -20.0)]


def write_tokenizer(path, pieces=PIECES):
    toks = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    toks += [(b"<0x%02X>" % i, 0.0) for i in range(256)] + [(p.encode(), s) for p, s in pieces]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(t) for t, _ in toks)))
        for t, s in toks:
            f.write(struct.pack("<fi", s, len(t)) + t)
    return toks
