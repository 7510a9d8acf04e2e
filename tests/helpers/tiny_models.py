"""Tiny random-init Hugging Face models of every supported family, shared by the model tests."""

import pytest
import torch
import transformers as tf

V, T, N_LAYERS = 97, 12, 3
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
             max_position_embeddings=64)
GQA = dict(SMALL, num_key_value_heads=2)
GEMMA2 = dict(GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)  # attn_z width 64 != hidden 32

# name -> (family, config factory, model classes: with head and without)
CASES = {
    "llama": ("llama", lambda: tf.LlamaConfig(**GQA), (tf.LlamaForCausalLM, tf.LlamaModel)),
    "mistral": ("llama", lambda: tf.MistralConfig(**GQA), (tf.MistralForCausalLM, tf.MistralModel)),
    "qwen2": ("llama", lambda: tf.Qwen2Config(**GQA), (tf.Qwen2ForCausalLM, tf.Qwen2Model)),
    "qwen3": ("llama", lambda: tf.Qwen3Config(**GQA, head_dim=8), (tf.Qwen3ForCausalLM,)),
    "gemma": ("llama", lambda: tf.GemmaConfig(**GQA, head_dim=8), (tf.GemmaForCausalLM,)),
    "gemma2": ("gemma2", lambda: tf.Gemma2Config(**GEMMA2), (tf.Gemma2ForCausalLM, tf.Gemma2Model)),
    "gemma3_text": ("gemma2", lambda: tf.Gemma3TextConfig(**GEMMA2), (tf.Gemma3ForCausalLM,)),
    "gpt2": ("gpt2", lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2), (tf.GPT2LMHeadModel, tf.GPT2Model)),
    "neox": ("gpt_neox", lambda: tf.GPTNeoXConfig(**SMALL, use_parallel_residual=True, rotary_pct=0.5),
             (tf.GPTNeoXForCausalLM, tf.GPTNeoXModel)),
    "neox_serial": ("gpt_neox", lambda: tf.GPTNeoXConfig(**SMALL, use_parallel_residual=False), (tf.GPTNeoXModel,)),
    "bert": ("bert", lambda: tf.BertConfig(**SMALL), (tf.BertForMaskedLM, tf.BertModel)),
    "roberta": ("bert", lambda: tf.RobertaConfig(**SMALL, pad_token_id=1), (tf.RobertaModel,)),
}
PARAMS = [pytest.param(name, cls, id=f"{name}-{cls.__name__}") for name, (_, _, classes) in CASES.items()
          for cls in classes]


def build(name, cls=None, seed=0):
    torch.manual_seed(seed)
    family, make, classes = CASES[name]
    cfg = make()
    cfg._attn_implementation = "eager"
    model = (cls or classes[0])(cfg).eval()
    with torch.no_grad():  # random-init norms are the identity; perturb them so norm mistakes show
        for n, p in model.named_parameters():
            if "norm" in n.lower():
                p.add_(0.3 * torch.randn_like(p))
    return model, family


def ids_for(seed=1, B=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, T), generator=g)
