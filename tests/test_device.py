"""device.py: the CPU allocator setting the trainer applies."""

import ctypes
import ctypes.util
import importlib
import sys

import pytest
import torch

from jumpscope import Trainer, TrainerConfig, build
from jumpscope.device import available_memory, reuse_freed_cpu_memory

trainer_module = importlib.import_module("jumpscope.train.trainer")


def _mapped_bytes() -> int | None:
    """Bytes glibc currently holds in mmapped blocks (mallinfo2().hblkhd), None without glibc 2.33+."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    return mallinfo2().hblkhd


@pytest.mark.skipif(not sys.platform.startswith("linux") or _mapped_bytes() is None, reason="needs glibc 2.33+")
def test_large_cpu_tensors_come_from_the_heap_once_set():
    assert reuse_freed_cpu_memory() is True
    assert reuse_freed_cpu_memory() is True  # idempotent
    before = _mapped_bytes()
    block = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MiB: an mmap under glibc's default thresholds
    assert _mapped_bytes() - before < 1 << 20
    del block


@pytest.mark.parametrize("wanted", [True, False])
def test_the_trainer_applies_it_only_when_asked(monkeypatch, wanted):
    calls = []
    monkeypatch.setattr(trainer_module, "reuse_freed_cpu_memory", lambda: calls.append(1) or True)
    Trainer(build("topk", d_in=4, d_sae=8, k=2), TrainerConfig(total_tokens=64, batch_size=32, device="cpu",
                                                               progress=False, reuse_cpu_memory=wanted))
    assert calls == ([1] if wanted else [])


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroups_room(tmp_path):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir(), cgroup.mkdir()
    (proc / "meminfo").write_text("MemTotal:  1000 kB\nMemFree:  10 kB\nMemAvailable:  800 kB\n")
    assert available_memory("cpu", proc, cgroup) == 800 * 1024  # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("5\n")
    assert available_memory("cpu", proc, cgroup) == 800 * 1024  # no limit
    (cgroup / "memory.max").write_text(f"{600 * 1024}\n")
    (cgroup / "memory.current").write_text(f"{100 * 1024}\n")
    assert available_memory("cpu", proc, cgroup) == 500 * 1024  # the container's limit is the smaller
    (proc / "meminfo").unlink()
    assert available_memory("cpu", proc, cgroup) == 500 * 1024
    assert available_memory("cpu", proc, tmp_path / "none") is None
