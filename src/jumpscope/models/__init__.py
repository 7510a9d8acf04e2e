"""Loaders that turn non-Hugging-Face checkpoints into ordinary transformers models.

- :mod:`jumpscope.models.llama2c`: Karpathy's llama2.c checkpoints (legacy "v0" format, e.g. the
  tinyllamas ``stories260K.bin``) as a ``transformers.LlamaForCausalLM`` plus a slow tokenizer for
  llama2.c's ``tokenizer.bin`` format (``load_llama2c``, ``Llama2cTokenizer``).
"""
