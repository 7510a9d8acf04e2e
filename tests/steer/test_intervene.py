"""Steering, clamping and ablating SAE latents while a model runs or generates (jumpscope.steer)."""

import math

import pytest
import torch

from jumpscope.analysis import logit_lens
from jumpscope.models.splice import replace_sites
from jumpscope.sae import build as build_sae
from jumpscope.steer import Ablate, Clamp, Steer, generate_ids, generate_with, intervene
from jumpscope.steer.intervene import forward_offset
from tiny_models import CASES, N_LAYERS, PARAMS, build, ids_for

D = 32  # hidden width of every tiny model
SITE = "layers.1.resid_post"
CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "neox"]


def topk_sae(seed=0, d_sae=64, k=8, **fields):
    return build_sae("topk", d_in=D, d_sae=d_sae, k=k, seed=seed, **fields).eval()


def run(model, ids, capture_site=None):
    """(the model's first output: logits or last hidden state, the activation at capture_site as the
    next layer reads it, i.e. after any intervention hooked before this call)."""
    seen = {}

    def capture(x):
        seen["x"] = x.detach().clone()
        return x

    with torch.no_grad(), replace_sites(model, {capture_site: capture} if capture_site else {}):
        out = model(input_ids=ids)[0]
    return out, seen.get("x")


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def by_hand(sae, edit):
    """x -> x + (edit(f) - f) @ W_dec with f = sae.encode(x): the intervention formula, written out."""

    def transform(x):
        with torch.no_grad():
            f = sae.encode(x)
            return x + (edit(f.clone()) - f) @ sae.W_dec

    return transform


# -- ablation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_ablation_removes_exactly_the_latents_contribution(name):
    model, _ = build(name)
    ids, sae = ids_for(), topk_sae()
    clean, x = run(model, ids, SITE)
    acts = sae.encode(x).detach()
    latent = int((acts > 0).sum((0, 1)).argmax())  # active on many positions
    assert (acts[..., latent] > 0).any()
    with intervene(model, {SITE: (sae, [Ablate([latent])])}):
        ablated, x_ablated = run(model, ids, SITE)
    delta = -acts[..., latent:latent + 1] * sae.W_dec[latent].detach()
    torch.testing.assert_close(x_ablated, x + delta, atol=1e-5, rtol=0)
    hand, _ = run_with(model, ids, {SITE: lambda y: y + delta})
    torch.testing.assert_close(ablated, hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ablated, clean, atol=1e-3)  # the latent mattered


def run_with(model, ids, transforms):
    with replace_sites(model, transforms):
        return run(model, ids)


def test_ablating_an_inactive_latent_changes_nothing():
    model, _ = build("llama")
    ids, sae = ids_for(), build_sae("relu", d_in=D, d_sae=16, seed=1).eval()
    with torch.no_grad():
        sae.b_enc[5] = -1e3  # latent 5 never fires
    clean, x = run(model, ids, SITE)
    assert not (sae.encode(x)[..., 5] > 0).any() and (sae.encode(x) > 0).any()
    with intervene(model, {SITE: (sae, [Ablate(5)])}):
        ablated, _ = run(model, ids)
    assert torch.equal(ablated, clean)


# -- clamping -------------------------------------------------------------------------------------
def test_clamping_to_the_current_value_changes_nothing_and_to_v_moves_by_the_formula():
    model, _ = build("llama")
    ids, sae = ids_for(), build_sae("relu", d_in=D, d_sae=16, seed=2).eval()
    with torch.no_grad():  # latent 3 fires with the same value 1.5 everywhere: W_enc column 0, b_enc 1.5
        sae.W_enc[:, 3] = 0.0
        sae.b_enc[3] = 1.5
    clean, x = run(model, ids, SITE)
    with intervene(model, {SITE: (sae, [Clamp(3, 1.5)])}):
        same, _ = run(model, ids)
    torch.testing.assert_close(same, clean, atol=1e-6, rtol=0)
    with intervene(model, {SITE: (sae, [Clamp(3, 4.0)])}):
        clamped, x_clamped = run(model, ids, SITE)
    torch.testing.assert_close(x_clamped, x + 2.5 * sae.W_dec[3].detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(clamped, clean, atol=1e-3)


def test_clamp_reaches_the_value_with_an_orthonormal_decoder():
    model, _ = build("gpt2")
    ids = ids_for()
    sae = build_sae("relu", d_in=D, d_sae=D, seed=3, apply_b_dec_to_input=False).eval()
    with torch.no_grad():  # W_dec orthonormal, W_enc its transpose: encode(x + c W_dec[i])[i] = f[i] + c
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_enc.fill_(1e-3)
    _, x = run(model, ids, SITE)
    latent = int((sae.encode(x) > 0).sum((0, 1)).argmax())
    active = sae.encode(x)[..., latent] > 0  # where the pre-activation is the latent (ReLU's linear part)
    with intervene(model, {SITE: (sae, [Clamp(latent, 2.0)])}):
        _, x_clamped = run(model, ids, SITE)
    reached = sae.encode(x_clamped)[..., latent].detach()[active]
    assert active.sum() >= 6
    torch.testing.assert_close(reached, torch.full_like(reached, 2.0), atol=1e-4, rtol=0)


# -- steering -------------------------------------------------------------------------------------
def themed_sae(model, token):
    """A ReLU SAE whose latent 0 writes (and reads) the direction the final norm maps onto token
    ``token``'s unembedding: its logit lens is well defined."""
    from jumpscope.analysis import unembedding

    W_U, gain = unembedding(model)
    direction = W_U[token] / gain
    direction = direction - direction.mean()  # LayerNorm removes the mean; keep only what survives it
    sae = build_sae("relu", d_in=D, d_sae=8, seed=4, apply_b_dec_to_input=False).eval()
    with torch.no_grad():
        sae.W_dec[0] = direction / direction.norm()
        sae.W_enc[:, 0] = sae.W_dec[0]
    return sae


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_steering_raises_the_latent_and_the_tokens_its_logit_lens_promotes(name):
    model, _ = build(name)
    ids, last = ids_for(), f"layers.{N_LAYERS - 1}.resid_post"
    sae = themed_sae(model, token=11)
    promoted = logit_lens(sae, model, n=5).promoted_ids[0]
    assert 11 in promoted.tolist()
    clean, x = run(model, ids, last)
    alpha = 4 * float(x.norm(dim=-1).mean())
    with intervene(model, {last: (sae, [Steer(0, alpha)])}):
        steered, x_steered = run(model, ids, last)
    assert (sae.encode(x_steered)[..., 0] > sae.encode(x)[..., 0] + 0.5 * alpha).all()
    p_clean = clean.softmax(-1)[..., promoted].sum(-1)
    p_steered = steered.softmax(-1)[..., promoted].sum(-1)
    # random tiny models have small logits, so probabilities move little; the ranking moves all the way
    assert (p_steered > p_clean).all() and p_steered.mean() > 1.15 * p_clean.mean()
    assert (steered.argmax(-1) == promoted[0]).all() and not (clean.argmax(-1) == promoted[0]).all()


def test_steering_needs_no_encoder_pass_and_equals_the_latent_edit():
    model, _ = build("neox")
    ids, sae = ids_for(), topk_sae(seed=5)
    with intervene(model, {SITE: (sae, [Steer(7, 3.0), Steer(9, -2.0)])}):
        steered, _ = run(model, ids)
    hand, _ = run_with(model, ids, {SITE: lambda y: y + 3.0 * sae.W_dec[7].detach() - 2.0 * sae.W_dec[9].detach()})
    torch.testing.assert_close(steered, hand, atol=1e-5, rtol=1e-5)
    with intervene(model, {SITE: (sae, [Ablate([1]), Steer(7, 3.0)])}):  # mixed: one encode, same steering
        mixed, _ = run(model, ids)
    edit = by_hand(sae, lambda f: torch.cat([f[..., :1], torch.zeros_like(f[..., 1:2]), f[..., 2:]], -1))
    hand, _ = run_with(model, ids, {SITE: lambda y: edit(y) + 3.0 * sae.W_dec[7].detach()})
    torch.testing.assert_close(mixed, hand, atol=1e-5, rtol=1e-5)


def test_edits_apply_in_order():
    sae = topk_sae()
    x = torch.randn(4, D)
    f = sae.encode(x).detach()
    from jumpscope.steer import site_transform

    out = site_transform(sae, [Clamp(5, 0.0), Steer(5, 2.0)])(x)
    torch.testing.assert_close(out, x + (2.0 - f[:, 5:6]) * sae.W_dec[5].detach(), atol=1e-5, rtol=0)
    out = site_transform(sae, [Steer(5, 2.0), Clamp(5, 0.0)])(x)
    torch.testing.assert_close(out, x - f[:, 5:6] * sae.W_dec[5].detach(), atol=1e-5, rtol=0)


# -- every family, several sites at once ----------------------------------------------------------
@pytest.mark.parametrize("name,cls", PARAMS)
def test_interventions_at_several_sites_match_the_formula_in_every_family(name, cls):
    model, _ = build(name, cls)
    ids = ids_for()
    saes = {"layers.0.attn_out": topk_sae(1), "layers.1.mlp_out": topk_sae(2), "layers.2.resid_post": topk_sae(3)}
    edits = {"layers.0.attn_out": [Ablate([0, 1, 2, 3])], "layers.1.mlp_out": [Clamp(4, 2.0), Steer(5, 1.5)],
             "layers.2.resid_post": [Steer(6, 3.0)]}

    def clamp_steer(f):
        f[..., 4] = 2.0
        f[..., 5] += 1.5
        return f

    def ablate(f):
        f[..., :4] = 0.0
        return f

    clean, _ = run(model, ids)
    with intervene(model, {site: (sae, edits[site]) for site, sae in saes.items()}):
        edited, _ = run(model, ids)
    hand, _ = run_with(model, ids, {"layers.0.attn_out": by_hand(saes["layers.0.attn_out"], ablate),
                                    "layers.1.mlp_out": by_hand(saes["layers.1.mlp_out"], clamp_steer),
                                    "layers.2.resid_post": by_hand(saes["layers.2.resid_post"],
                                                                   lambda f: f + 3.0 * torch.eye(64)[6])})
    torch.testing.assert_close(edited, hand, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(edited, clean, atol=1e-3)
    assert hook_count(model) == 0


@pytest.mark.parametrize("name", CAUSAL)
def test_generation_with_a_strong_steer_differs_and_without_edits_is_identical(name):
    model, _ = build(name)
    ids, sae = ids_for()[:, :5], topk_sae()
    plain = generate_ids(model, None, ids, max_new_tokens=8)
    assert plain.shape == (2, 13)
    assert torch.equal(generate_ids(model, None, ids, {SITE: (sae, [])}, max_new_tokens=8), plain)
    assert torch.equal(generate_ids(model, None, ids, {}, max_new_tokens=8), plain)
    steered = generate_ids(model, None, ids, {SITE: (sae, [Steer(3, 50.0)])}, max_new_tokens=8)
    assert torch.equal(steered[:, :5], ids) and not torch.equal(steered, plain)
    assert hook_count(model) == 0


# -- positions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_new_positions_leave_the_prompt_alone_with_and_without_a_kv_cache(name):
    model, _ = build(name)  # gemma2: 5 + 10 tokens run past its sliding window of 8
    ids, sae = ids_for()[:, :5], topk_sae()
    interventions = {SITE: (sae, [Steer(3, 50.0)])}
    plain = generate_ids(model, None, ids, max_new_tokens=10)
    cached = generate_ids(model, None, ids, interventions, max_new_tokens=10, positions="new")
    assert torch.equal(cached[:, :6], plain[:, :6])  # the first new token comes from the prompt's forward
    assert not torch.equal(cached, plain)
    recomputed = ids  # no KV cache: every forward reads the whole sequence, the prompt stays unedited
    with torch.no_grad(), intervene(model, interventions, positions="new"):
        for _ in range(10):
            recomputed = torch.cat([recomputed, model(input_ids=recomputed).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(recomputed, cached)


class _FakeCache:
    def __init__(self, length):
        self.length = length

    def get_seq_length(self):
        return self.length


@pytest.mark.parametrize("kwargs, offset", [
    ({"input_ids": torch.zeros(1, 1)}, 0),  # no cache: the whole sequence
    ({"past_key_values": _FakeCache(7)}, 7),  # transformers 4.x
    ({"cache": _FakeCache(7), "position_ids": torch.tensor([[7]])}, 7),  # transformers 5.x generate
    ({"kv_store": _FakeCache(9)}, 9),  # any keyword holding a cache object
    ({"past_key_values": ((torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)),)}, 5),  # legacy tuples
    ({"cache_position": torch.tensor([6])}, 6),
    ({"position_ids": torch.tensor([[3, 4], [3, 4]])}, 3),
    ({"cache": object(), "use_cache": True}, None),  # a cache nothing tells the length of
])
def test_the_forward_offset_is_read_from_every_calling_convention(kwargs, offset):
    assert forward_offset(kwargs) == offset


def test_new_positions_refuse_a_cached_step_whose_offset_cannot_be_seen():
    """A forward shorter than the prompt at offset 0 is a cached step whose cache went unseen:
    "new" must raise rather than silently edit nothing (the transformers 5.x regression)."""
    model, _ = build("llama")
    ids, sae = ids_for()[:, :5], topk_sae()
    with torch.no_grad(), intervene(model, {SITE: (sae, [Steer(3, 50.0)])}, positions="new"):
        prompt = model(input_ids=ids).logits  # the prompt itself is never edited
        assert torch.equal(model(input_ids=ids).logits, prompt)  # re-reading it (no cache) is fine
        with pytest.raises(RuntimeError, match="KV cache"):
            model(input_ids=ids[:, -1:])
    torch.testing.assert_close(prompt, model(input_ids=ids).logits, atol=0, rtol=0)


def test_a_start_position_edits_only_positions_from_it():
    model, _ = build("llama")
    ids, sae = ids_for(), topk_sae()
    _, x = run(model, ids, SITE)
    with intervene(model, {SITE: (sae, [Steer(2, 5.0)])}, positions=4):
        _, x_steered = run(model, ids, SITE)
    torch.testing.assert_close(x_steered[:, :4], x[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(x_steered[:, 4:], x[:, 4:] + 5.0 * sae.W_dec[2].detach(), atol=1e-5, rtol=0)


def test_hooks_are_removed_on_exit_and_when_the_block_raises():
    model, _ = build("gpt2")
    ids, sae = ids_for(), topk_sae()
    clean, _ = run(model, ids)
    for positions in ("all", "new"):
        with pytest.raises(RuntimeError, match="inside"):
            with intervene(model, {SITE: (sae, [Steer(1, 9.0), Ablate(2)])}, positions=positions):
                assert hook_count(model) > 0
                raise RuntimeError("raised inside")
        assert hook_count(model) == 0
    assert torch.equal(run(model, ids)[0], clean)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    model, _ = build("llama")
    ids, sae = ids_for()[:, :4], topk_sae()
    state = torch.get_rng_state()
    first = generate_ids(model, None, ids, max_new_tokens=10, temperature=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(generate_ids(model, None, ids, {SITE: (sae, [])}, max_new_tokens=10, temperature=1.0, seed=3),
                       first)
    others = [generate_ids(model, None, ids, max_new_tokens=10, temperature=1.0, seed=s) for s in (4, 5)]
    assert any(not torch.equal(o, first) for o in others)


# -- bad inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,error,match", [
    (lambda: Steer(-1, 1.0), ValueError, "count from 0"),
    (lambda: Steer(True, 1.0), TypeError, "int"),
    (lambda: Steer(1.5, 1.0), TypeError, "int"),
    (lambda: Steer(1, math.nan), ValueError, "finite"),
    (lambda: Steer(1, math.inf), ValueError, "finite"),
    (lambda: Clamp(1, -0.5), ValueError, ">= 0"),
    (lambda: Clamp(1, math.nan), ValueError, "finite"),
    (lambda: Ablate([]), ValueError, "at least one"),
    (lambda: Ablate([1, -2]), ValueError, "count from 0"),
])
def test_invalid_interventions_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_targets_give_clear_errors_and_leave_no_hooks():
    model, _ = build("llama")
    sae = topk_sae()
    transcoder = build_sae("topk", d_in=D, d_sae=64, d_out=D, k=4, apply_b_dec_to_input=False,
                           site="layers.0.mlp_in", target_site="layers.0.mlp_out")
    cases = [({SITE: (sae, [Steer(64, 1.0)])}, ValueError, "out of range .* 64 latents"),
             ({SITE: (sae, [Ablate([3, 99])])}, ValueError, "latent 99 is out of range"),
             ({"layers.7.resid_post": (sae, [Steer(1, 1.0)])}, ValueError, "layers"),
             ({"nonsense": (sae, [Steer(1, 1.0)])}, ValueError, "valid sites"),
             ({SITE: (build_sae("topk", d_in=16, d_sae=32, k=4), [Steer(1, 1.0)])}, ValueError, "does not fit"),
             ({"layers.0.mlp_out": (transcoder, [Steer(1, 1.0)])}, ValueError, "transcoder"),
             ({SITE: (sae, [("steer", 1, 2.0)])}, TypeError, "unknown intervention"),
             ({SITE: sae}, TypeError, r"\(sae, \[Steer"),
             ([(SITE, sae)], TypeError, "mapping")]
    for interventions, error, match in cases:
        with pytest.raises(error, match=match):
            with intervene(model, interventions):
                pass
        assert hook_count(model) == 0
    for positions in ("some", -1, True):
        with pytest.raises(ValueError, match="positions"):
            with intervene(model, {SITE: (sae, [Steer(1, 1.0)])}, positions=positions):
                pass
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, None, ids_for(), max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_ids(model, None, ids_for(), temperature=-1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate_with(model, None, "text")


def test_generation_refuses_a_model_without_a_language_model_head():
    encoder, _ = build("bert", CASES["bert"][2][1])
    with pytest.raises(ValueError, match="language-model head"):
        generate_ids(encoder, None, ids_for(), max_new_tokens=2)


# -- text helpers and the command line ------------------------------------------------------------
