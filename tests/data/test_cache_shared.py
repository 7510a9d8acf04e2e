"""SharedCacheWriter: two processes (threads here, with an all-gather that meets at a barrier)
write one cache together, each the shards it owns, and the folder equals one writer's byte for
byte; a write killed in the middle resumes with one process."""

import hashlib
import threading

import torch

from jumpscope.data.batch import skip_rows
from jumpscope.data.cache import CacheReader, CacheWriter
from jumpscope.data.cache_shared import SharedCacheWriter

SITES = {"a": 3, "b": 2}


class ThreadGroup:
    """``world_size`` threads' all_gather_object, in rank order."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.values = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def member(self, rank):
        group = self

        class Member:
            world_size = group.world_size

            def __init__(self):
                self.rank = rank

            def all_gather_object(self, value):
                group.values[rank] = value
                group.barrier.wait()
                out = list(group.values)
                group.barrier.wait()  # nobody overwrites a value before everyone has read it
                return out

        return Member()


def chunks(n=7, rows=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{site: torch.randn(rows, d, generator=g) for site, d in SITES.items()} for _ in range(n)]


def folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run_together(folder, data, world_size=2, stop_after=None):
    group, written, errors = ThreadGroup(world_size), {}, []

    def one(rank):
        try:
            writer = SharedCacheWriter(folder, SITES, processes=group.member(rank), shard_rows=8)
            store = writer._store

            def recording(index, shard):
                written[index] = rank
                return store(index, shard)

            writer._store = recording
            for i, chunk in enumerate(data):
                if stop_after is not None and i == stop_after:
                    return  # killed: no close, the cache stays incomplete
                writer.write(chunk)
            writer.close()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return written


def test_two_writers_split_the_shards_and_equal_one_writer(tmp_path):
    data = chunks()
    with CacheWriter(tmp_path / "one", SITES, shard_rows=8) as writer:
        for chunk in data:
            writer.write(chunk)
    written = run_together(tmp_path / "two", data)
    assert written == {index: index % 2 for index in range(5)}  # 35 rows: 4 shards of 8 and one of 3
    assert folder_digest(tmp_path / "two") == folder_digest(tmp_path / "one")
    assert CacheReader(tmp_path / "two").total_tokens == 35


def test_a_killed_shared_write_resumes_with_one_process(tmp_path):
    data = chunks()
    run_together(tmp_path / "cache", data, stop_after=4)  # 20 rows in: shards 0 and 1 listed
    writer = CacheWriter(tmp_path / "cache", SITES, shard_rows=8)
    assert writer.tokens_done == 16
    for chunk in skip_rows(iter(data), writer.tokens_done):
        writer.write(chunk)
    writer.close()
    with CacheWriter(tmp_path / "one", SITES, shard_rows=8) as one:
        for chunk in data:
            one.write(chunk)
    assert folder_digest(tmp_path / "cache") == folder_digest(tmp_path / "one")
