"""Shared test settings: tiny tensors run fastest (and least noisily) on one thread; tests marked
``cuda`` run only where there is a CUDA device (benchmarks/gpu_check.py runs them on one)."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.py runs the cuda-marked tests on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
