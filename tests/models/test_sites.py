"""Site names: parsing, widths, families, head/no-head wrappers, and errors that list the valid sites."""

import pytest
import torch
import transformers as tf

from jumpscope.models.sites import Site, available_sites, model_family, parse_site

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32)


def tiny(cls, cfg):
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny(tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL, num_key_value_heads=2))


def test_site_paths_for_a_llama_with_and_without_its_head(llama):
    s = parse_site("layers.1.attn_z", llama)
    assert s == Site("layers.1.attn_z", 1, "attn_z", "model.layers.1.self_attn.o_proj", "input", 32)
    assert parse_site("layers.0.resid_post", llama).module == "model.layers.0"
    assert parse_site("embed", llama) == Site("embed", None, "embed", "model.layers.0", "input", 32)
    base = llama.model
    assert parse_site("layers.1.mlp_out", base).module == "layers.1.mlp"
    assert available_sites(base) == available_sites(llama)
    assert model_family(llama) == "llama"


@pytest.mark.parametrize("cls,cfg,family,paths", [
    (tf.Gemma2ForCausalLM, tf.Gemma2Config(**SMALL, head_dim=16, num_key_value_heads=2), "gemma2",
     {"attn_z": ("model.layers.1.self_attn.o_proj", "input", 64),
      "attn_out": ("model.layers.1.post_attention_layernorm", "output", 32),
      "mlp_in": ("model.layers.1.mlp", "input", 32), "mlp_out": ("model.layers.1.post_feedforward_layernorm",
                                                                "output", 32)}),
    (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4), "gpt2",
     {"attn_z": ("transformer.h.1.attn.c_proj", "input", 32), "attn_out": ("transformer.h.1.attn", "output", 32),
      "mlp_in": ("transformer.h.1.mlp", "input", 32), "resid_pre": ("transformer.h.1", "input", 32)}),
    (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**SMALL), "gpt_neox",
     {"attn_z": ("gpt_neox.layers.1.attention.dense", "input", 32), "mlp_out": ("gpt_neox.layers.1.mlp", "output", 32)}),
    (tf.BertForMaskedLM, tf.BertConfig(**SMALL), "bert",
     {"attn_z": ("bert.encoder.layer.1.attention.output.dense", "input", 32),
      "attn_out": ("bert.encoder.layer.1.attention.output.dense", "output", 32),
      "mlp_in": ("bert.encoder.layer.1.intermediate", "input", 32),
      "mlp_out": ("bert.encoder.layer.1.output.dense", "output", 32),
      "resid_post": ("bert.encoder.layer.1", "output", 32)}),
])
def test_family_paths(cls, cfg, family, paths):
    model = tiny(cls, cfg)
    assert model_family(model) == family
    for kind, (path, reads, d) in paths.items():
        s = parse_site(f"layers.1.{kind}", model)
        assert (s.module, s.reads, s.d, s.layer, s.kind) == (path, reads, d, 1, kind)
        model.get_submodule(s.module)  # exists


def test_available_sites_lists_every_layer_and_kind(llama):
    sites = available_sites(llama)
    assert sites[0] == "embed" and len(sites) == 1 + 2 * 6
    assert "layers.1.mlp_in" in sites and "layers.2.resid_pre" not in sites
    for s in sites:
        assert parse_site(s, llama).name == s


def test_out_of_range_layer_names_the_range_and_the_valid_sites(llama):
    with pytest.raises(ValueError) as e:
        parse_site("layers.7.resid_post", llama)
    msg = str(e.value)
    assert msg.startswith("layers.7.resid_post: layer 7 out of range (model has 2 layers: 0-1)")
    assert "embed, layers.{0-1}.{resid_pre,resid_post,attn_z,attn_out,mlp_in,mlp_out}, module:<path>" in msg
    with pytest.raises(ValueError, match="layer -1 out of range"):
        parse_site("layers.-1.resid_post", llama)


@pytest.mark.parametrize("bad", ["resid_post", "layers.0.resid_mid", "layers.x.attn_z", "blocks.0.hook_resid_post",
                                 "embed.0", ""])
def test_unknown_sites_list_the_valid_ones(llama, bad):
    with pytest.raises(ValueError, match=r"valid sites: embed, layers\.\{0-1\}\.\{resid_pre,"):
        parse_site(bad, llama)


def test_module_escape_hatch(llama):
    s = parse_site("module:model.layers.0.mlp.down_proj", llama)
    assert (s.kind, s.layer, s.module, s.reads, s.d) == ("module", None, "model.layers.0.mlp.down_proj", "output", 32)
    s = parse_site("module:model.layers.0.mlp.down_proj:input", llama)
    assert (s.reads, s.d) == ("input", 64)
    assert parse_site("module:model.norm", llama).d is None
    with pytest.raises(ValueError, match="no submodule 'model.layers.9'"):
        parse_site("module:model.layers.9", llama)
    with pytest.raises(ValueError, match="dotted submodule path"):
        parse_site("module:", llama)


def test_generic_family_has_residual_sites_only():
    phi3 = tiny(tf.Phi3ForCausalLM, tf.Phi3Config(**SMALL, pad_token_id=0))
    assert model_family(phi3) == "generic"
    assert available_sites(phi3) == ["embed", "layers.0.resid_pre", "layers.0.resid_post", "layers.1.resid_pre",
                                     "layers.1.resid_post"]
    with pytest.raises(ValueError, match="'attn_z' is not available .*family generic.*layers.{0-1}.{resid_pre,"
                                         "resid_post}"):
        parse_site("layers.0.attn_z", phi3)


def test_a_model_without_layers_offers_only_module_sites():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    assert available_sites(model) == []
    with pytest.raises(ValueError, match="model has no known layer list.*valid sites: module:<path>"):
        parse_site("layers.0.resid_post", model)
    assert parse_site("module:0", model).d == 4
