"""Data: text corpora and token packing, activation caches and buffers, synthetic ground-truth activations."""
