"""Activation cache: write, crash mid-shard, resume, and read back identical to an uninterrupted
write; checksums, manifest validation, metadata checks, shuffled and resumed reads."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jumpscope.data.batch import skip_rows
from jumpscope.data.cache import MANIFEST, CacheReader, CacheWriter, is_complete
from jumpscope.train.batches import rebatch

SITES = {"blocks.1.resid": 8, "blocks.1.mlp_out": 6}
SHARD_ROWS = 40
TOTAL = 233
META = {"model": "tiny-llama", "corpus": "stdlib", "context_size": 16, "seed": 4, "layers": [1]}


def make_chunks(dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """Chunks of varying size whose rows are random but carry their row id in column 0."""
    generator = torch.Generator().manual_seed(0)
    sizes, start, chunks = [17, 5, 31, 1, 40, 0, 23, 50, 9, 57], 0, []
    assert sum(sizes) == TOTAL
    for size in sizes:
        chunk = {site: torch.randn(size, width, generator=generator) for site, width in SITES.items()}
        for value in chunk.values():
            value[:, 0] = torch.arange(start, start + size)
        chunks.append({site: value.to(dtype) for site, value in chunk.items()})
        start += size
    return chunks


def expected(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    chunks = make_chunks(dtype)
    return {site: torch.cat([c[site] for c in chunks]).float() for site in SITES}


def write_cache(folder, dtype="float32", chunks=None, **kwargs) -> None:
    with CacheWriter(folder, SITES, dtype, SHARD_ROWS, META, **kwargs) as writer:
        for chunk in chunks if chunks is not None else make_chunks():
            writer.write(chunk)


def read_all(reader: CacheReader, **kwargs) -> dict[str, torch.Tensor]:
    items = list(reader.iterate(**kwargs))
    return {site: torch.cat([item[site] for item in items]) for site in SITES} if items else {}


def crash(folder, dtype="float32", after_rows=100) -> None:
    """A producer that dies after 2.5 shards, leaving a stray temp file and an unlisted shard."""
    def producer():
        done = 0
        for chunk in make_chunks():
            yield chunk
            done += chunk[next(iter(SITES))].shape[0]
            if done >= after_rows:
                raise RuntimeError("harvester crashed")

    with pytest.raises(RuntimeError, match="harvester crashed"):
        write_cache(folder, dtype, producer())
    (folder / ".shard_00002.safetensors.x1y2.tmp").write_bytes(b"half a shard")
    (folder / ".manifest.json.a7.tmp").write_text('{"trunc')
    (folder / "shard_00002.safetensors").write_bytes(b"written, but the manifest never listed it")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "reference"
    write_cache(folder)
    return folder


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                               ("float16", torch.float16)])
def test_write_read_round_trip_and_manifest(tmp_path, dtype, torch_dtype):
    write_cache(tmp_path / "c", dtype, [{k: v.to(torch_dtype) for k, v in c.items()} for c in make_chunks()])
    reader = CacheReader(tmp_path / "c")
    got = read_all(reader)
    for site in SITES:
        assert got[site].dtype == torch.float32
        assert torch.equal(got[site], expected(torch_dtype)[site])
    assert read_all(reader, dtype=None)[next(iter(SITES))].dtype == torch_dtype
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["format_version"] == 1
    assert (manifest["model"], manifest["corpus"], manifest["context_size"]) == ("tiny-llama", "stdlib", 16)
    assert manifest["sites"] == SITES and manifest["dtype"] == dtype and manifest["metadata"] == META
    assert [s["rows"] for s in manifest["shards"]] == [40] * 5 + [33]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert manifest["total_tokens"] == len(reader) == reader.total_tokens == TOTAL
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [MANIFEST] + [
        f"shard_{i:05d}.safetensors" for i in range(6)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_crash_mid_shard_then_resume_is_identical(tmp_path, reference, dtype):
    crash(tmp_path / "c", dtype)
    assert not is_complete(tmp_path / "c")
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(tmp_path / "c")
    partial = CacheReader(tmp_path / "c", allow_incomplete=True)
    assert partial.total_tokens == 80 and len(partial.shards) == 2
    assert torch.equal(read_all(partial)["blocks.1.resid"], expected()["blocks.1.resid"][:80].to(
        getattr(torch, dtype)).float())

    writer = CacheWriter(tmp_path / "c", SITES, dtype, SHARD_ROWS, META)
    assert writer.tokens_done == 80
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [MANIFEST, "shard_00000.safetensors",
                                                                   "shard_00001.safetensors"]
    with writer:
        for chunk in skip_rows(make_chunks(), writer.tokens_done):
            writer.write(chunk)
    assert is_complete(tmp_path / "c")
    if dtype == "float32":
        fresh = reference
    else:
        write_cache(fresh := tmp_path / "fresh", dtype)
    resumed, uninterrupted = CacheReader(tmp_path / "c"), CacheReader(fresh)
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in uninterrupted.shards]
    for a, b in zip(resumed.iterate(dtype=None), uninterrupted.iterate(dtype=None), strict=True):
        assert all(torch.equal(a[site], b[site]) for site in SITES)


def test_complete_cache_is_not_rewritten_unless_overwrite(tmp_path):
    write_cache(tmp_path / "c")
    before = (tmp_path / "c" / MANIFEST).read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        CacheWriter(tmp_path / "c", SITES, "float32", SHARD_ROWS, META)
    assert (tmp_path / "c" / MANIFEST).read_text() == before
    write_cache(tmp_path / "c", chunks=make_chunks()[:2], overwrite=True)
    assert CacheReader(tmp_path / "c").total_tokens == 22
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [MANIFEST, "shard_00000.safetensors"]


@pytest.mark.parametrize("change,message", [
    ({"metadata": {**META, "seed": 5}}, "metadata"),
    ({"sites": {"blocks.1.resid": 8}}, "sites"),
    ({"dtype": "bfloat16"}, "dtype"),
    ({"shard_rows": 50}, "shard_rows"),
    ({"model": "other-model"}, "model"),
])
def test_resume_with_different_settings_is_refused(tmp_path, change, message):
    crash(tmp_path / "c")
    settings = {"sites": SITES, "dtype": "float32", "shard_rows": SHARD_ROWS, "metadata": META, **change}
    extra = {"model": settings.pop("model")} if "model" in settings else {}
    with pytest.raises(ValueError, match=rf"cannot resume .*settings differ \({message}"):
        CacheWriter(tmp_path / "c", **settings, **extra)
    assert CacheReader(tmp_path / "c", allow_incomplete=True).total_tokens == 80  # left as it was


def test_corrupt_shard_is_caught_by_its_checksum(tmp_path):
    write_cache(tmp_path / "c")
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    stream = CacheReader(tmp_path / "c").iterate()
    next(stream)  # shard 0 is fine
    with pytest.raises(ValueError, match=r"shard 1 \(shard_00001.safetensors\) is corrupt: .*checksum does not match"):
        next(stream)


def test_a_shard_is_hashed_once_per_reader_until_its_file_changes(tmp_path, monkeypatch):
    import jumpscope.data.cache as cache_module

    write_cache(tmp_path / "c")
    hashed = []
    real = cache_module._sha256
    monkeypatch.setattr(cache_module, "_sha256", lambda path: hashed.append(path.name) or real(path))
    reader = CacheReader(tmp_path / "c")
    first = reader.read_shard(1)
    site = next(iter(first))
    assert torch.equal(reader.read_shard(1)[site], first[site]) and hashed == ["shard_00001.safetensors"]
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))  # a new write: a new modification time, so it is checked again
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(ValueError, match="is corrupt"):
        reader.read_shard(1)


def test_missing_shard_is_a_clear_error(tmp_path):
    write_cache(tmp_path / "c")
    (tmp_path / "c" / "shard_00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard 3 \(shard_00003.safetensors\) is missing"):
        list(CacheReader(tmp_path / "c"))
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    (tmp_path / "c" / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match=r"cannot resume .*shard 3 .* missing"):
        CacheWriter(tmp_path / "c", SITES, "float32", SHARD_ROWS, META)


def test_manifest_errors(tmp_path, reference):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CacheReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing manifest.json"):
        CacheReader(tmp_path / "empty")
    text = (reference / MANIFEST).read_text()
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        CacheReader(folder)
    with pytest.raises(ValueError, match="not valid JSON.*overwrite=True"):
        CacheWriter(folder, SITES, "float32", SHARD_ROWS, META)
    manifest = json.loads(text)
    for change, message in [({"format_version": 2}, "unsupported cache format version 2"),
                            ({"format": "other"}, "not a jumpscope activation cache"),
                            ({"total_tokens": 5}, "total_tokens"), ({"dtype": "int8"}, "dtype"),
                            ({"shards": [{"file": "../x"}]}, "shards"),
                            ({"shards": [{**manifest["shards"][0], "file": "../../etc/passwd"}]}, "shard file names")]:
        (folder / MANIFEST).write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ValueError, match=message):
            CacheReader(folder)


def test_writer_rejects_bad_chunks(tmp_path):
    with CacheWriter(tmp_path / "c", SITES, "float32", SHARD_ROWS, META) as writer:
        with pytest.raises(ValueError, match="differ from the cache's sites"):
            writer.write({"blocks.1.resid": torch.zeros(3, 8)})
        with pytest.raises(ValueError, match="d_site"):
            writer.write({"blocks.1.resid": torch.zeros(3, 8), "blocks.1.mlp_out": torch.zeros(3, 5)})
        with pytest.raises(ValueError, match="not aligned"):
            writer.write({"blocks.1.resid": torch.zeros(3, 8), "blocks.1.mlp_out": torch.zeros(4, 6)})
    with pytest.raises(ValueError, match="unsupported cache dtype"):
        CacheWriter(tmp_path / "d", SITES, "int8", SHARD_ROWS, META)
    with pytest.raises(ValueError, match="not plain finite JSON"):
        CacheWriter(tmp_path / "d", SITES, "float32", SHARD_ROWS, {"bad": object()})


@pytest.mark.parametrize("shuffle_shards", [False, True])
def test_start_row_equals_the_tail_of_a_full_read(reference, shuffle_shards):
    reader = CacheReader(reference)
    full = read_all(reader, shuffle_shards=shuffle_shards, seed=3)
    for start in (0, 1, 39, 40, 41, 123, 200, 232, TOTAL, TOTAL + 7):
        tail = read_all(reader, shuffle_shards=shuffle_shards, seed=3, start_row=start)
        for site in SITES:
            assert torch.equal(tail[site] if tail else torch.zeros(0, SITES[site]), full[site][start:])


def test_shard_shuffle_is_a_seeded_permutation_of_shards(reference):
    reader = CacheReader(reference)
    order = reader.shard_order(shuffle_shards=True, seed=3)
    assert sorted(order) == list(range(6)) and order == reader.shard_order(True, 3) != reader.shard_order(True, 4)
    ids = read_all(reader, shuffle_shards=True, seed=3)["blocks.1.resid"][:, 0]
    assert torch.equal(ids, torch.cat([torch.arange(i * 40, min(i * 40 + 40, TOTAL)) for i in order]).float())


def test_buffered_read_is_deterministic_and_resumable(reference):
    reader = CacheReader(reference)
    kwargs = {"shuffle_shards": True, "seed": 9, "buffer_rows": 64, "batch_size": 16}
    batches = list(reader.iterate(**kwargs))
    assert [len(b["blocks.1.resid"]) for b in batches] == [16] * 14 + [9]
    ids = torch.cat([b["blocks.1.resid"][:, 0] for b in batches])
    assert torch.equal(ids.sort().values, torch.arange(TOTAL, dtype=torch.float32))
    assert all(torch.equal(b["blocks.1.resid"][:, 0], b["blocks.1.mlp_out"][:, 0]) for b in batches)
    assert torch.equal(ids, torch.cat([b["blocks.1.resid"][:, 0] for b in reader.iterate(**kwargs)]))
    assert not torch.equal(ids, torch.cat([b["blocks.1.resid"][:, 0] for b in reader.iterate(**{**kwargs, "seed": 1})]))
    tail = torch.cat([b["blocks.1.resid"][:, 0] for b in reader.iterate(**kwargs, start_row=50)])
    assert torch.equal(tail, ids[50:])


def test_site_selection_feeds_the_trainer(reference):
    reader = CacheReader(reference)
    tensors = list(reader.iterate(site="blocks.1.mlp_out"))
    assert all(torch.is_tensor(t) and t.shape[1] == 6 and t.dtype == torch.float32 for t in tensors)
    assert torch.equal(torch.cat(tensors), expected()["blocks.1.mlp_out"])
    pairs = list(reader.iterate(sites=("blocks.1.resid", "blocks.1.mlp_out"), buffer_rows=50, batch_size=20))
    assert all(isinstance(p, tuple) and p[0].shape[1] == 8 and p[1].shape[1] == 6 for p in pairs)
    batches = list(rebatch(pairs, 32, {"input": 8, "target": 6}))
    assert len(batches) == TOTAL // 32
    assert len(list(rebatch(reader, 32, SITES))) == TOTAL // 32  # dict chunks as they are
    with pytest.raises(KeyError, match="not in the cache"):
        reader.iterate(site="blocks.9.resid")
    with pytest.raises(ValueError, match="not both"):
        reader.iterate(site="blocks.1.resid", sites=["blocks.1.resid"])
    with pytest.raises(ValueError, match="batch_size"):
        reader.iterate(buffer_rows=10)


# -- hostile manifests and shards: a CacheError naming the file, before any row is read ----------
def hostile_copy(tmp_path, reference, change):
    import shutil

    folder = tmp_path / "c"
    shutil.copytree(reference, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def set_shard(index, **fields):
    return lambda m: m["shards"][index].update(fields)


@pytest.mark.parametrize("change, match", [
    (set_shard(2, rows=0), r"shard 2 \(shard_00002.safetensors\): rows must be a positive integer, got 0"),
    (set_shard(2, rows=-5), "rows must be a positive integer, got -5"),
    (set_shard(0, rows=-1e30), "rows must be a positive integer, got -1e\\+30"),
    (set_shard(0, rows=True), "rows must be a positive integer, got True"),
    (set_shard(0, bytes=12), r"12 bytes cannot hold 40 rows"),
    (set_shard(0, bytes="many"), "bytes must be a positive integer"),
    (set_shard(0, sha256=None), "sha256 must be 64 lowercase hex digits, got None"),
    (set_shard(1, file="shard_00000.safetensors"), "shard 1 must be shard_00001.safetensors"),
    (set_shard(1, file="sub/shard_00001.safetensors"), "shard file names must look like"),
    (set_shard(1, file="..\\shard_00001.safetensors"), "shard file names must look like"),
    (lambda m: m["shards"].insert(1, m["shards"][0]), "shard 1 must be shard_00001.safetensors, got shard_00000"),
    (lambda m: m.update(shard_rows=0), "shard_rows must be a positive integer"),
    (lambda m: m.update(sites={"a": True}), "sites must map names to positive widths"),
    (lambda m: m.update(total_tokens=True), "total_tokens True is not the sum"),
    (lambda m: m["shards"][0].update(extra=1), "shards must be a list of"),
])
def test_hostile_manifests_are_refused_before_use(tmp_path, reference, change, match):
    from jumpscope.errors import CacheError

    folder = hostile_copy(tmp_path, reference, change)
    with pytest.raises(CacheError, match=match) as error:
        CacheReader(folder)
    assert str(folder / MANIFEST) in str(error.value)


def test_a_zero_row_shard_no_longer_vanishes_silently(tmp_path, reference):
    """It used to be skipped without being read or checksummed (its rows lost): now the manifest
    is refused, and a shard whose size on disk differs from the manifest is refused on open."""
    from jumpscope.errors import CacheError

    folder = hostile_copy(tmp_path, reference, lambda m: m.update(
        total_tokens=m["total_tokens"] - m["shards"][2]["rows"]) or m["shards"][2].update(rows=0))
    with pytest.raises(CacheError, match="rows must be a positive integer, got 0"):
        list(CacheReader(folder))
    folder = hostile_copy(tmp_path / "2", reference, lambda m: None)
    with open(folder / "shard_00004.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CacheError, match=r"shard 4 \(shard_00004.safetensors\) is corrupt: it is \d+ bytes"):
        CacheReader(folder)


def test_non_regular_shard_huge_or_nested_manifest(tmp_path, reference):
    import os

    from jumpscope.errors import CacheError

    folder = hostile_copy(tmp_path, reference, lambda m: None)
    (folder / "shard_00001.safetensors").unlink()
    os.mkfifo(folder / "shard_00001.safetensors")  # hashing it would block forever
    with pytest.raises(CacheError, match="shard_00001.safetensors is not a regular file"):
        CacheReader(folder)
    (folder / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CacheError, match="manifest.json is not valid JSON") as error:
        CacheReader(folder)
    assert str(folder / MANIFEST) in str(error.value)
    with pytest.raises(CacheError, match="not valid JSON.*overwrite=True"):
        CacheWriter(folder, SITES, "float32", SHARD_ROWS, META)
    (folder / MANIFEST).write_text(" " * (65 << 20))
    with pytest.raises(CacheError, match=r"manifest.json is \d+ bytes, more than"):
        CacheReader(folder)
