"""Harvested activations equal the same quantities computed another way, for every site of every family."""

import math

import pytest
import torch

from jumpscope.models.harvest import Harvester, harvest
from jumpscope.models.sites import available_sites
from tiny_models import N_LAYERS, PARAMS, T, build, ids_for

def base_of(model):
    base = model.base_model  # transformers 4.5x's Gemma3ForCausalLM names a prefix it lacks: fall back to .model
    return model.model if base is model and hasattr(model, "model") else base


def layer_of(model, family, L):
    base = base_of(model)
    return {"gpt2": lambda: base.h, "bert": lambda: base.encoder.layer}.get(family, lambda: base.layers)()[L]


def final_norm(model, family):
    base = base_of(model)
    return {"llama": "norm", "gemma2": "norm", "gpt2": "ln_f", "gpt_neox": "final_layer_norm"}.get(family) and \
        getattr(base, {"llama": "norm", "gemma2": "norm", "gpt2": "ln_f", "gpt_neox": "final_layer_norm"}[family])


def hand_attn_z(model, family, L, resid_pre):
    """Concatenated head outputs computed from the layer's q/k/v projections (families without extras)."""
    layer = layer_of(model, family, L)
    B = resid_pre.shape[0]
    if family == "gpt2":
        a, x = layer.attn, layer.ln_1(resid_pre)
        q, k, v = a.c_attn(x).split(a.embed_dim, dim=2)
        H, causal = a.num_heads, True
    elif family == "bert":
        a = layer.attention.self
        q, k, v = a.query(resid_pre), a.key(resid_pre), a.value(resid_pre)
        H, causal = a.num_attention_heads, False
    else:
        a, x = layer.self_attn, layer.input_layernorm(resid_pre)
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        H, causal = model.config.num_attention_heads, True
    hd = q.shape[-1] // H
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, -1, hd).transpose(1, 2)
    v = v.view(B, T, -1, hd).transpose(1, 2)
    if family == "llama":
        mod = __import__(type(a).__module__, fromlist=["apply_rotary_pos_emb"])
        cos, sin = base_of(model).rotary_emb(x, torch.arange(T).unsqueeze(0))
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name,cls", PARAMS)
def test_every_site_matches_an_independent_computation(name, cls):
    model, family = build(name, cls)
    sites = available_sites(model)
    assert len(sites) == 1 + 6 * N_LAYERS
    ids = ids_for()
    acts = Harvester(model, sites).activations(ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        assert len(hs) == N_LAYERS + 1
        close(acts["embed"], hs[0])
        for L in range(N_LAYERS):
            g = {k: acts[f"layers.{L}.{k}"] for k in ("resid_pre", "resid_post", "attn_z", "attn_out", "mlp_in",
                                                      "mlp_out")}
            for k, t in g.items():
                assert t.shape[:2] == (2, T) and t.dtype == torch.float32, k
            close(g["resid_pre"], hs[L])
            if L < N_LAYERS - 1:
                close(g["resid_post"], hs[L + 1])
            else:  # decoders return the final norm's output as the last hidden state
                norm = final_norm(model, family)
                close(norm(g["resid_post"]) if norm is not None else g["resid_post"], hs[L + 1])
            layer = layer_of(model, family, L)
            x, ao, mi, mo, post = g["resid_pre"], g["attn_out"], g["mlp_in"], g["mlp_out"], g["resid_post"]
            if family in ("llama", "gemma2"):
                assert g["attn_z"].shape[-1] == model.config.num_attention_heads * layer.self_attn.head_dim
                if family == "gemma2":  # post-norms sit between the projections and the residual add
                    close(layer.post_attention_layernorm(layer.self_attn.o_proj(g["attn_z"])), ao)
                    close(layer.pre_feedforward_layernorm(x + ao), mi)
                    close(layer.post_feedforward_layernorm(layer.mlp(mi)), mo)
                else:
                    close(layer.self_attn.o_proj(g["attn_z"]), ao)
                    close(layer.post_attention_layernorm(x + ao), mi)
                    close(layer.mlp(mi), mo)
                close(x + ao + mo, post)
            elif family == "gpt2":
                assert g["attn_z"].shape[-1] == 32
                close(layer.attn.c_proj(g["attn_z"]), ao)
                close(layer.ln_2(x + ao), mi)
                close(layer.mlp(mi), mo)
                close(x + ao + mo, post)
            elif family == "gpt_neox":
                close(layer.attention.dense(g["attn_z"]), ao)
                parallel = model.config.use_parallel_residual
                close(layer.post_attention_layernorm(x if parallel else x + ao), mi)
                close(layer.mlp(mi), mo)
                close(x + ao + mo, post)
            else:  # bert: post-LN
                close(layer.attention.output.dense(g["attn_z"]), ao)
                close(layer.attention.output.LayerNorm(ao + x), mi)
                close(layer.output.dense(layer.intermediate(mi)), mo)
                close(layer.output.LayerNorm(mo + mi), post)
            if name in ("llama", "mistral", "qwen2", "gpt2", "bert", "roberta"):
                close(g["attn_z"], hand_attn_z(model, family, L, x))


@pytest.mark.parametrize("name", ["llama", "gpt2", "neox", "bert", "gemma2"])
@pytest.mark.parametrize("sites,stop_in", [(["embed"], 0), (["layers.0.resid_pre"], 0),
                                           (["layers.0.resid_post"], 0), (["layers.0.mlp_out", "embed"], 0),
                                           (["layers.1.attn_z", "layers.0.mlp_in"], 1)])
def test_forward_stops_after_the_last_needed_layer(name, sites, stop_in):
    """Layers after ``stop_in`` are never entered; layers before it complete; the model's forward never returns."""
    model, family = build(name)
    layers = [layer_of(model, family, L) for L in range(N_LAYERS)]
    entered, done, handles = [0] * N_LAYERS, [0] * N_LAYERS, []
    for L, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda *a, L=L: entered.__setitem__(L, entered[L] + 1)))
        handles.append(layer.register_forward_hook(lambda *a, L=L: done.__setitem__(L, done[L] + 1)))
    finished = []
    handles.append(model.register_forward_hook(lambda *a: finished.append(1)))
    try:
        Harvester(model, sites).activations(ids_for())
    finally:
        for h in handles:
            h.remove()
    assert entered[stop_in + 1:] == [0] * (N_LAYERS - stop_in - 1)
    assert done[:stop_in] == [1] * stop_in
    if sites[0] in ("embed", "layers.0.resid_pre"):
        assert done == [0] * N_LAYERS
    assert finished == []


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_even_when_the_forward_fails():
    model, _ = build("llama")
    ids = ids_for()
    Harvester(model, ["layers.2.resid_post"]).activations(ids)  # first use may add transformers' own hooks
    model(ids, output_hidden_states=True)
    before = hook_count(model)
    with pytest.raises(IndexError):
        Harvester(model, ["layers.1.mlp_out", "embed"]).activations(ids + 1000)  # ids beyond the vocabulary
    assert hook_count(model) == before
    # a module: site whose module never runs: a clear error, hooks removed too
    model.unused = torch.nn.Linear(2, 2)
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="without reaching site.*module:unused"):
        Harvester(model, ["module:unused", "layers.0.attn_z"]).activations(ids)
    assert hook_count(model) == before


def test_module_escape_hatch_reads_outputs_and_keyword_inputs():
    model, family = build("llama")
    ids = ids_for()
    site_in = "module:model.layers.1.self_attn:input"  # LlamaDecoderLayer passes hidden_states= as a keyword
    acts = Harvester(model, [site_in, "module:model.layers.1.input_layernorm", "module:model.layers.1.mlp.up_proj",
                             "layers.1.resid_pre"]).activations(ids)
    layer = layer_of(model, family, 1)
    close(acts[site_in], layer.input_layernorm(acts["layers.1.resid_pre"]))
    close(acts["module:model.layers.1.input_layernorm"], acts[site_in])
    assert acts["module:model.layers.1.mlp.up_proj"].shape == (2, T, 64)
    logits = Harvester(model, ["module:lm_head"]).activations(ids)["module:lm_head"]
    close(logits, model(ids).logits)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_harvest_keeps_exactly_the_train_mask_rows_aligned_across_sites(name):
    model, _ = build(name)
    ids = ids_for(B=3)
    g = torch.Generator().manual_seed(5)
    train = torch.rand(3, T, generator=g) > 0.4
    train[:, 0] = False  # BOS
    sites = ["layers.1.mlp_in", "layers.1.mlp_out", "layers.2.resid_post"]
    full = Harvester(model, sites).activations(ids)
    batches = [(ids, train), (ids[:1], train[:1])]
    out = list(harvest(model, batches, sites))
    assert len(out) == 2
    for site in sites:
        rows = out[0][site]
        assert rows.shape == (int(train.sum()), full[site].shape[-1]) and rows.dtype == torch.float32
        assert rows.device.type == "cpu" and not rows.is_inference()
        close(rows, torch.stack([full[site][b, t] for b in range(3) for t in range(T) if train[b, t]]))
        assert out[1][site].shape[0] == int(train[0].sum())
    bf16 = next(harvest(model, [(ids, train)], sites, dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())


def test_harvest_with_padding_drops_pad_rows_and_matches_the_unpadded_sequence():
    model, family = build("llama")
    ids = ids_for(B=2)
    attn = torch.ones(2, T, dtype=torch.bool)
    attn[1, 8:] = False  # right padding on the second sequence
    train = attn.clone()
    train[:, 0] = False
    (rows,) = [b["layers.1.resid_post"] for b in harvest(model, [(ids, train, attn)], ["layers.1.resid_post"])]
    assert rows.shape[0] == (T - 1) + 7
    alone = Harvester(model, ["layers.1.resid_post"]).activations(ids[1:, :8])["layers.1.resid_post"][0, 1:]
    close(rows[T - 1:], alone)


def test_transcoder_pairs_stay_aligned():
    model, family = build("gpt2")
    ids = ids_for()
    train = torch.ones(2, T, dtype=torch.bool)
    train[:, :2] = False
    batch = next(harvest(model, [(ids, train)], ["layers.2.mlp_in", "layers.2.mlp_out"]))
    layer = layer_of(model, family, 2)
    with torch.no_grad():
        close(layer.mlp(batch["layers.2.mlp_in"]), batch["layers.2.mlp_out"])
