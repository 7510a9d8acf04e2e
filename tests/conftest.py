"""Shared test settings: tiny tensors run fastest (and least noisily) on one thread."""

import torch

torch.set_num_threads(1)
