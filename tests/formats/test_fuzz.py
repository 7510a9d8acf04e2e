"""Seeded, bounded fuzzing of every SAE reader (native, SAELens, sparsify, Gemma Scope params.npz)
and the activation-cache reader: each mutated input must load (and then be finite and consistent)
or raise one of jumpscope.errors' types (or FileNotFoundError) with a one-line message naming the
file; never a traceback of another type, a hang or a huge allocation.

The loop runs in a subprocess (this file run as a script) under an address-space limit of what
it uses after warming up plus 1 GiB, with an alarm per input; it prints its counts as JSON.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

SEED = 20240611
PER_BASE = 190  # 12 bases: ~2,300 inputs
SLOW_S = 5.0  # the most one input may take
HEADROOM = 1 << 30  # address space allowed beyond the warmed-up process


def test_fuzzed_files_load_or_fail_cleanly(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path), str(SEED)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    print("fuzz counts:", json.dumps(counts))
    assert counts["other"] == 0, counts["examples"]
    assert counts["inputs"] >= 2000 and counts["loaded"] + counts["clean_errors"] == counts["inputs"]
    assert counts["loaded"] > 50 and counts["clean_errors"] > 1000  # both outcomes are exercised
    assert counts["max_seconds"] < SLOW_S, counts["slowest"]


# -- the subprocess --------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the per-input alarm (a BaseException: no reader may swallow it)."""


def build_bases(root: Path) -> list[tuple[str, Path]]:
    """Tiny valid examples of every format, written by the library's own writers."""
    import torch

    from jumpscope import formats
    from jumpscope.data.cache import CacheWriter
    from jumpscope.sae import registry

    def sae(name: str, **fields):
        built = registry.build(name, d_in=4, d_sae=8, model="m", site="layers.0.resid_post", **fields)
        with torch.no_grad():
            for value in built.parameters():
                value.copy_(torch.rand(value.shape, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.01)
        return built.eval()

    bases = []
    for name, fields in [("relu", {}), ("jumprelu", {}), ("topk", {"k": 2}), ("gated", {}), ("batchtopk", {"k": 2})]:
        bases.append(("sae", formats.save(sae(name, **fields), root / f"native_{name}", "native")))
    for name, fields in [("relu", {}), ("jumprelu", {}), ("topk", {"k": 2})]:
        bases.append(("sae", formats.save(sae(name, **fields), root / f"saelens_{name}", "saelens")))
    bases.append(("sae", formats.save(sae("topk", k=2), root / "sparsify" / "layers.0", "sparsify")))
    bases.append(("sae", formats.save(sae("jumprelu"), root / "gemma_folder", "gemma_scope").parent))
    bases.append(("sae", formats.save(sae("jumprelu", d_out=3), root / "gemma_file.npz", "gemma_scope")))
    generator = torch.Generator().manual_seed(2)
    with CacheWriter(root / "cache", {"a": 4, "b": 3}, "float32", 5, {"model": "m"}) as writer:
        writer.write({"a": torch.randn(13, 4, generator=generator), "b": torch.randn(13, 3, generator=generator)})
    bases.append(("cache", root / "cache"))
    return bases


HUGE = [46341, 10**5, 10**6, 10**9, 10**12, 2**63, 10**30, -1, -(10**9), 0]
VALUES = HUGE + [True, False, None, "NaN", "x" * 3, 2.5, -1e30, 1e30, float("nan"), float("inf"), [], {}, [1, 2],
                 {"k": 1}, "", "../../etc/passwd", "a/b"]
NESTED = "[" * 100_000 + "]" * 100_000


def json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_paths(item, prefix + (index,))


def mutate_json(path: Path, rng: random.Random) -> str:
    document = json.loads(path.read_text())
    paths = [p for p in json_paths(document) if p]
    target = rng.choice(paths)
    parent = document
    for key in target[:-1]:
        parent = parent[key]
    kind = rng.randrange(6)
    if kind == 0 and isinstance(parent, dict):
        del parent[target[-1]]
        text, what = json.dumps(document), f"delete {target}"
    elif kind == 1:
        parent[target[-1]] = "@NESTED@"
        text, what = json.dumps(document).replace('"@NESTED@"', NESTED), f"nest {target}"
    elif kind == 2 and isinstance(parent, dict):
        parent[rng.choice(["extra", "d_sae", "k", "rows", "seed", "d_out", "activation_fn_kwargs"])] = rng.choice(VALUES)
        text, what = json.dumps(document), f"add key under {target[:-1]}"
    elif kind == 3:
        text, what = json.dumps(rng.choice([[document], "text", 3, None])), "not an object"
    else:
        value = rng.choice(HUGE if kind == 4 else VALUES)
        parent[target[-1]] = value
        text, what = json.dumps(document), f"{target} = {str(value)[:20]}"
    path.write_text(text)
    return f"json {path.name}: {what}"


def mutate_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.randrange(5)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == 2:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3 and len(data) > 16:  # a header length / size field: small offsets matter most
        at = rng.randrange(min(len(data), 64))
        data[at: at + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, (2**40).to_bytes(8, "little")])
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    return f"bytes {path.name}: kind {kind}"


def npy(shape, descr="<f4", data=None, fortran=False) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buffer.getvalue() + (data if data is not None else b"\0" * (int(np.prod(shape)) * 4))


def mutate_npz(path: Path, rng: random.Random, bomb: bytes) -> str:
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    name = rng.choice(sorted(members))
    kind = rng.randrange(10)
    compression = zipfile.ZIP_STORED
    if kind == 0:
        members[name] = npy(rng.choice([(100_000, 100_000), (10**12,), (46341, 46341), (2**62, 4)]), data=b"")
    elif kind == 1:
        members[name] = b"not an array at all"
    elif kind == 2:
        path.write_bytes(bomb)
        return "npz: 64 MB zip bomb"
    elif kind == 3:
        del members[name]
    elif kind == 4:
        members["extra.npy"] = members[name]
    elif kind == 5:
        members[name] = npy((4,), descr=rng.choice(["|O", "<i8", "|b1", "<c8", "V4", "<U2"]), data=b"\0" * 64)
    elif kind == 6:
        header = members[name][: members[name].index(b"\n") + 1]
        members[name] = header.replace(b"False", b"True") if rng.random() < 0.5 else header[:-20] + b"\n"
    elif kind == 7:
        compression = zipfile.ZIP_DEFLATED
    elif kind == 8:
        members[name] = members[name][: rng.randrange(len(members[name]))]
    with zipfile.ZipFile(path, "w", compression) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    if kind == 9:  # an unsupported zip version, or a damaged directory
        data = bytearray(path.read_bytes())
        at = data.rfind(b"PK\x01\x02")
        data[at + rng.choice([6, 10, 20, 24])] = 0xFF
        path.write_bytes(bytes(data))
    return f"npz {name}: kind {kind}"


def mutate_special(path: Path, rng: random.Random) -> str:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    kind = rng.randrange(3)
    if kind == 0:
        os.mkfifo(path)
    elif kind == 1:
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return f"special {path.name}: {['fifo', '/dev/zero', 'folder'][kind]}"


def mutate_manifest(folder: Path, rng: random.Random) -> str:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    shard = rng.choice(manifest["shards"])
    key = rng.choice(["rows", "rows", "bytes", "sha256", "file"])
    value = rng.choice([0, -1, -1e30, 1e30, 2.5, True, None, "x", 10**12, shard["rows"] + 1, "../shard_00000.safetensors",
                        "shard_00000.safetensors", "/etc/passwd", "0" * 64])
    shard[key] = value
    if rng.random() < 0.5:  # keep the total consistent, as a careful attacker would
        try:
            manifest["total_tokens"] = sum(s["rows"] for s in manifest["shards"])
        except TypeError:
            pass
    path.write_text(json.dumps(manifest))
    return f"manifest shard {key} = {str(value)[:20]}"


def mutations(kind: str, base: Path, rng: random.Random, bomb: bytes):
    """Yield (description, work path) per input; each input starts from a fresh copy of ``base``."""
    work = base.parent / f"work_{base.name}"
    for _ in range(PER_BASE):
        if work.exists() or work.is_symlink():
            shutil.rmtree(work) if work.is_dir() and not work.is_symlink() else work.unlink()
        if base.is_dir():
            shutil.copytree(base, work)
        else:
            shutil.copy(base, work.with_suffix(".npz"))
            work = work.with_suffix(".npz")
        files = [work] if work.is_file() else sorted(p for p in work.iterdir() if p.is_file())
        target = rng.choice(files)
        choice = rng.random()
        if kind == "cache" and choice < 0.45:
            what = mutate_manifest(work, rng)
        elif target.suffix == ".json" and choice < 0.75:
            what = mutate_json(target, rng)
        elif target.suffix == ".npz" and choice < 0.65:
            what = mutate_npz(target, rng, bomb)
        elif choice < 0.94:
            what = mutate_bytes(target, rng)
        else:
            what = mutate_special(target, rng)
        yield what, work


def check_loaded(kind: str, path: Path) -> None:
    """Load ``path``; a loaded result must be finite and consistent (else an AssertionError)."""
    import torch
    from safetensors import safe_open

    import jumpscope
    from jumpscope.data.cache import CacheReader

    if kind == "cache":
        reader = CacheReader(path, allow_incomplete=True)
        rows = 0
        for item in reader.iterate():
            assert {name: value.shape[1] for name, value in item.items()} == reader.sites
            assert all(bool(torch.isfinite(value).all()) for value in item.values())
            rows += next(iter(item.values())).shape[0]
        assert rows == len(reader), (rows, len(reader))
        on_disk = 0  # the rows the listed shard files really hold: none may vanish silently
        for shard in reader.shards:
            with safe_open(str(path / shard["file"]), framework="pt") as handle:
                on_disk += handle.get_slice(next(iter(reader.sites))).get_shape()[0]
        assert rows == on_disk, (rows, on_disk)
        return
    sae = jumpscope.load(path)
    assert all(bool(torch.isfinite(value).all()) for value in sae.state_dict().values() if value.is_floating_point())
    with torch.no_grad():
        out = sae(torch.randn(2, sae.cfg.d_in))
    assert out.shape == (2, sae.cfg.d_output)


def main(root: Path, seed: int) -> None:
    import warnings

    import torch

    from jumpscope.errors import JumpscopeError

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rng = random.Random(seed)
    bases = build_bases(root / "bases")
    for kind, base in bases:  # warm up every code path before the limit is measured
        check_loaded(kind, base)
    bomb_path = root / "bomb.npz"
    with zipfile.ZipFile(bomb_path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("W_enc.npy", npy((4, 4 << 20)))  # 64 MB of zeros, ~64 KB packed
        for name, shape in [("W_dec", (4 << 20, 4)), ("b_enc", (4 << 20,)), ("b_dec", (4,)), ("threshold", (4 << 20,))]:
            archive.writestr(f"{name}.npy", npy(shape))
    bomb = bomb_path.read_bytes()
    used = _address_space()
    limit = used + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _alarm)
    counts = {"inputs": 0, "loaded": 0, "clean_errors": 0, "other": 0, "max_seconds": 0.0,
              "memory_limit_bytes": limit, "memory_used_before_bytes": used, "examples": [], "slowest": ""}
    for kind, base in bases:
        for what, path in mutations(kind, base, rng, bomb):
            counts["inputs"] += 1
            start = time.perf_counter()
            signal.alarm(10)
            try:
                check_loaded(kind, path)
                outcome = "loaded"
            except Hang:
                outcome, detail = "other", "hang (over 10 s)"
            except (JumpscopeError, FileNotFoundError) as error:
                message = str(error)
                clean = str(path) in message and "\n" not in message and len(message) < 2000
                outcome, detail = ("clean_errors", "") if clean else ("other", f"unclear message: {message[:300]}")
            except BaseException as error:  # noqa: BLE001 (anything else is what this test hunts)
                outcome, detail = "other", f"{type(error).__name__}: {str(error)[:300]}"
            finally:
                signal.alarm(0)
            seconds = time.perf_counter() - start
            if seconds > counts["max_seconds"]:
                counts["max_seconds"], counts["slowest"] = round(seconds, 3), f"{base.name}: {what}"
            counts[outcome] += 1
            if outcome == "other" and len(counts["examples"]) < 20:
                counts["examples"].append(f"{base.name}: {what}: {detail}")
    print(json.dumps(counts))


def _alarm(signum, frame):
    raise Hang()


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
