"""Sparse training kernels (sae/kernels.py) give the dense reference path's loss, activations,
reconstruction and every parameter gradient, for JumpReLU, TopK (with AuxK) and BatchTopK."""

import copy
import dataclasses

import pytest
import torch

from jumpscope.sae import StepContext, build, kernels, mixed
from jumpscope.train import Trainer, TrainerConfig
from recipes import adam_build

D_IN, D_SAE, BATCH = 8, 64, 96
TOL = dict(rtol=1e-4, atol=1e-5)


def with_kernel(sae, kernel):
    copied = copy.deepcopy(sae)
    copied.cfg = dataclasses.replace(sae.cfg, kernel=kernel)
    return copied


def data(seed=0, d=D_IN):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, d, generator=generator) + 0.2


def randomise(sae, seed=1, b_enc_shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=generator) + b_enc_shift)
        sae.b_dec.copy_(0.3 * torch.randn(sae.b_dec.shape, generator=generator))
        sae.W_enc.add_(0.1 * torch.randn(sae.W_enc.shape, generator=generator))


def run(sae, x, ctx, target, extra_acts_loss=False):
    out = sae.loss(x, ctx, target)
    total = out.loss + (0.1 * out.feature_acts.pow(2).sum() if extra_acts_loss else 0.0)
    sae.zero_grad(set_to_none=True)
    total.backward()
    return out, {name: p.grad for name, p in sae.named_parameters()}


def assert_paths_agree(sae, x, ctx, target=None, extra_acts_loss=False):
    dense, sparse = with_kernel(sae, "dense"), with_kernel(sae, "sparse")
    out_d, grads_d = run(dense, x, ctx, target, extra_acts_loss)
    out_s, grads_s = run(sparse, x, ctx, target, extra_acts_loss)
    torch.testing.assert_close(out_s.loss, out_d.loss, **TOL)
    assert out_s.terms.keys() == out_d.terms.keys()
    for key in out_d.terms:
        torch.testing.assert_close(out_s.terms[key], out_d.terms[key], **TOL)
    torch.testing.assert_close(out_s.feature_acts, out_d.feature_acts.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out_s.reconstruction, out_d.reconstruction, **TOL)
    for name, grad in grads_d.items():
        assert grad is not None or grads_s[name] is None or not grads_s[name].any(), name
        if grad is not None:
            assert grads_s[name] is not None, name
            torch.testing.assert_close(grads_s[name], grad, **TOL, msg=lambda m: f"{name}: {m}")
    for name, buffer in dense.named_buffers():
        torch.testing.assert_close(dict(sparse.named_buffers())[name], buffer, **TOL)
    return out_d


JUMPRELU_CASES = [
    dict(log_threshold=False, l0_coefficient=0.3),
    dict(log_threshold=True, l0_coefficient=0.3),
    dict(log_threshold=False, target_l0=6.0),
    dict(log_threshold=True, target_l0=6.0, apply_b_dec_to_input=True),
    dict(log_threshold=False, l0_coefficient=0.3, apply_b_dec_to_input=True),
    dict(log_threshold=False, target_l0=6.0, d_out=5, b_dec_init="zeros"),  # transcoder
    dict(log_threshold=True, l0_coefficient=0.3, d_out=5, b_dec_init="zeros"),
    dict(log_threshold=False, target_l0=6.0, pre_act_coefficient=0.05),  # dense term beside the sparse path
    dict(log_threshold=True, l0_coefficient=0.3, pre_act_coefficient=0.05, apply_b_dec_to_input=True),
]


def jumprelu_sae(**fields):
    sae = adam_build("jumprelu", d_in=D_IN, d_sae=D_SAE, bandwidth=0.5, threshold_init_l0=8, seed=3, **fields)
    sae.init_from_data(data(seed=9))
    randomise(sae)
    return sae


@pytest.mark.parametrize("fields", JUMPRELU_CASES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("extra_acts_loss", [False, True])
def test_jumprelu_sparse_matches_dense(fields, extra_acts_loss):
    sae = jumprelu_sae(**fields)
    x = data()
    target = data(seed=5, d=5) if fields.get("d_out") else None
    entries = kernels.jumprelu_entries(sae.pre_activation(x).detach(), sae.threshold.detach(), 0.5)
    window, active = entries.window.bool(), entries.active.bool()
    assert (window & ~active).sum() > 10 and (window & active).sum() > 10  # both sides of theta
    assert (active & ~window).sum() > 10
    assert_paths_agree(sae, x, StepContext(sparsity_scale=0.7), target, extra_acts_loss)


def test_jumprelu_sparsity_term_alone_trains_only_the_threshold():
    sae = with_kernel(jumprelu_sae(l0_coefficient=1.0), "sparse")
    sae.loss(data(), StepContext()).terms["sparsity"].backward()
    assert sae.W_enc.grad is None and sae.W_dec.grad is None
    assert torch.count_nonzero(sae.threshold_raw.grad) > 0


def test_jumprelu_with_nothing_active_or_in_the_window():
    sae = jumprelu_sae(l0_coefficient=0.3)
    with torch.no_grad():
        sae.threshold_raw.fill_(1e3)
    out = assert_paths_agree(sae, data(), StepContext())
    assert not out.feature_acts.any()


def test_jumprelu_sparse_needs_the_l0_loss():
    with pytest.raises(ValueError, match="kernel='sparse'"):
        adam_build("jumprelu", d_in=4, d_sae=8, sparsity_loss="tanh", kernel="sparse")
    with pytest.raises(ValueError, match="kernel must be"):
        adam_build("topk", d_in=4, d_sae=8, k=2, kernel="fast")


def topk_sae(arch, b_enc_shift=0.0, **fields):
    sae = adam_build(arch, d_in=D_IN, d_sae=D_SAE, k=6, seed=4, **fields)
    randomise(sae, b_enc_shift=b_enc_shift)
    return sae


def dead_mask(fraction=0.3, seed=2):
    return torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed)) < fraction


TOPK_CASES = [
    dict(),
    dict(b_enc_shift=-1.5),  # many of the top-k (and aux) pre-activations are negative: ReLU'd to 0
    dict(k_aux=40),  # more than the dead latents: all of them are used
    dict(apply_b_dec_to_input=False, d_out=5),  # transcoder
]


@pytest.fixture(params=["positive", "block", "entries"])
def aux_layout(request, monkeypatch):
    """AuxK's selection as the positive dead entries where it can be (as training runs), or, from
    the top-k over the dead pool, as a dense block of the dead latents or as an entry list."""
    if request.param != "positive":
        monkeypatch.setattr(kernels, "_positive_dead_entries", lambda *args: None)
        monkeypatch.setattr(kernels, "AUX_MAX_DENSITY", 0.0 if request.param == "block" else 1.0)
    return request.param


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("fields", TOPK_CASES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_topk_sparse_matches_dense(arch, fields, aux_layout):
    sae = topk_sae(arch, **fields)
    target = data(seed=5, d=5) if fields.get("d_out") else None
    out = assert_paths_agree(sae, data(), StepContext(dead_mask=dead_mask()), target, extra_acts_loss=True)
    assert out.terms["aux"] > 0
    if fields.get("b_enc_shift"):
        assert ((out.feature_acts > 0).sum(-1) < 6).any()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_auxk_gradient_reaches_dead_encoder_columns(arch, aux_layout):
    sae = with_kernel(topk_sae(arch), "sparse")
    dead = dead_mask()
    sae.loss(data(), StepContext(dead_mask=dead)).terms["aux"].backward()
    assert (sae.W_enc.grad[:, dead].abs().sum(0) > 0).any()
    assert (sae.b_enc.grad[dead] != 0).any()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_without_dead_latents(arch):
    sae = topk_sae(arch)
    assert_paths_agree(sae, data(), StepContext(dead_mask=torch.zeros(D_SAE, dtype=torch.bool)))
    assert_paths_agree(sae, data(), StepContext())


def test_batchtopk_eval_mode_uses_the_dense_threshold_path():
    sae = with_kernel(topk_sae("batchtopk"), "sparse")
    sae.loss(data(), StepContext())
    sae.eval()
    out = sae.loss(data(seed=1), StepContext())
    torch.testing.assert_close(out.feature_acts, sae.threshold_activation(sae.pre_activation(data(seed=1))))


def test_flat_topk_prefilter_is_exact():
    flat = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    keep = 5000
    fast = kernels._flat_topk_index(flat, keep).sort().values
    assert torch.equal(fast, flat.topk(keep).indices.sort().values)


def test_auto_picks_sparse_only_on_cpu_at_low_density():
    z = torch.zeros(4, 4096)
    assert kernels.use_sparse("auto", z, 32 / 4096)
    assert not kernels.use_sparse("auto", z, 0.5)
    assert not kernels.use_sparse("auto", torch.zeros(4, 64), 0.01)  # tiny: dense
    assert kernels.use_sparse("sparse", torch.zeros(4, 64), 0.5) and not kernels.use_sparse("dense", z, 0.0)


def stream(n_batches, rows=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(48, D_IN, generator=generator)
    for _ in range(n_batches):
        codes = (torch.rand(rows, 48, generator=generator) < 0.1) * torch.rand(rows, 48, generator=generator)
        yield codes @ dictionary + 0.3


@pytest.mark.parametrize("arch, fields", [
    ("jumprelu", dict(target_l0=6, bandwidth=0.2)),
    ("jumprelu", dict(l0_coefficient=0.05, log_threshold=True, threshold_init_l0=6, apply_b_dec_to_input=True)),
    ("topk", dict(k=6)),
    ("batchtopk", dict(k=6)),
])
def test_training_with_sparse_kernel_matches_dense(arch, fields):
    saes = {kernel: adam_build(arch, d_in=D_IN, d_sae=D_SAE, seed=7, kernel=kernel, **fields)
            for kernel in ("dense", "sparse")}
    # a short dead window so that AuxK is active for the TopK architectures
    cfg = TrainerConfig(total_tokens=128 * 12, batch_size=128, init_sample_tokens=256, log_every=4,
                        checkpoint_every=0, dead_tokens=256, progress=False, device="cpu")
    trained = Trainer(saes, cfg).fit(stream(12))
    dense, sparse = trained["dense"].state_dict(), trained["sparse"].state_dict()
    for key, value in dense.items():
        torch.testing.assert_close(sparse[key], value, rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_sddmm_fallback_without_sampled_addmm(monkeypatch):
    sae = topk_sae("topk")
    x, ctx = data(), StepContext(dead_mask=dead_mask())
    expected = run(with_kernel(sae, "sparse"), x, ctx, None)[1]

    def unsupported(*args, **kwargs):
        raise NotImplementedError("sampled_addmm")

    monkeypatch.setattr(torch.sparse, "sampled_addmm", unsupported)
    grads = run(with_kernel(sae, "sparse"), x, ctx, None)[1]
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, **TOL)


def graph_names(tensor):
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:  # by node, not type: branches repeat types
            seen.add(id(node))
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_auto_takes_the_sparse_path_on_cpu_when_sparse_enough():
    x = torch.randn(256, D_IN)
    for l0, sparse in ((8, True), (200, False)):
        sae = adam_build("jumprelu", d_in=D_IN, d_sae=512, threshold_init_l0=l0, bandwidth=0.05)
        sae.init_from_data(x)
        assert ("_SparseSAEBackward" in graph_names(sae.loss(x, StepContext()).loss)) == sparse
    topk = adam_build("topk", d_in=D_IN, d_sae=512, k=8)
    assert "_SparseSAEBackward" in graph_names(topk.loss(x, StepContext()).loss)
    topk = adam_build("topk", d_in=D_IN, d_sae=256, k=8)  # below AUTO_MIN_LATENTS
    assert "_SparseSAEBackward" not in graph_names(topk.loss(x, StepContext()).loss)


def test_auto_on_cuda_takes_the_sparse_path_from_the_measured_widths(monkeypatch):
    # sparse_wanted reads only the device's type, so the policy is checked without a GPU
    cuda, mps = torch.device("cuda"), torch.device("mps")
    assert not kernels.sparse_wanted("auto", cuda, kernels.CUDA_MIN_LATENTS // 2, 0.004)
    assert kernels.sparse_wanted("auto", cuda, kernels.CUDA_MIN_LATENTS, 0.004)
    assert kernels.sparse_wanted("auto", cuda, kernels.CUDA_MIN_LATENTS, None)
    assert not kernels.sparse_wanted("auto", cuda, kernels.CUDA_MIN_LATENTS, 0.5)  # too dense
    assert not kernels.sparse_wanted("auto", mps, 1 << 20, 0.004)
    assert kernels.sparse_wanted("sparse", mps, 8, 0.5) and not kernels.sparse_wanted("dense", cuda, 1 << 20, 0.004)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: device == ("cuda",))
    assert not kernels.sparse_wanted("auto", cuda, kernels.CUDA_MIN_LATENTS, 0.004)
    assert kernels.sparse_wanted("auto", cuda, kernels.CUDA_AUTOCAST_MIN_LATENTS, 0.004)
    assert kernels.sparse_wanted("auto", torch.device("cpu"), 512, 0.004)  # the CPU's rule ignores CUDA autocast


def test_pre_act_penalty_gradients_match_dense_at_quantile_init_ties():
    # The quantile threshold init makes theta equal one pre-activation per latent (a tie, where
    # ReLU(theta - z) has no gradient); the sparse form must treat those ties like the dense path.
    x = torch.randn(512, D_IN) + 0.3
    grads = {}
    for kernel in ("dense", "sparse"):
        sae = adam_build("jumprelu", d_in=D_IN, d_sae=D_SAE, target_l0=6, pre_act_coefficient=0.05, kernel=kernel)
        sae.init_from_data(x)
        assert ((sae.pre_activation(x) == sae.threshold).sum(0) >= 1).all()  # ties are present
        sae.loss(x, StepContext()).loss.backward()
        grads[kernel] = {name: p.grad.clone() for name, p in sae.named_parameters()}
    for name, dense in grads["dense"].items():
        error = (grads["sparse"][name] - dense).norm() / dense.norm().clamp_min(1e-30)
        assert error < 1e-5, (name, error.item())


def test_row_topk_shortlist_is_exact():
    # the grouped shortlist (sae/kernels.py row_topk) picks the same entries as a full top-k
    generator = torch.Generator().manual_seed(0)
    for rows, n, k in ((64, 4096, 64), (32, 16384, 32), (16, 1024, 7)):
        z = torch.randn(rows, n, generator=generator) + torch.randn(n, generator=generator)
        values, cols = kernels.row_topk(z, k)
        expected = z.topk(k, dim=-1)
        assert torch.equal(cols.sort(-1).values, expected.indices.sort(-1).values)
        assert torch.equal(values.sort(-1).values, expected.values.sort(-1).values)


def test_jumprelu_entries_with_the_bias_folded_into_the_threshold():
    # jumprelu.py passes x_in @ W_enc and b_enc separately: the same entries, bit for bit
    generator = torch.Generator().manual_seed(0)
    product = torch.randn(256, 1024, generator=generator)
    bias, threshold = 0.5 * torch.randn(1024, generator=generator), 1.5 + 0.3 * torch.rand(1024, generator=generator)
    z = product + bias
    z[3, :50] = threshold[:50]  # ties at theta
    product[3, :50] = z[3, :50] - bias[:50]
    z = product + bias
    folded = kernels.jumprelu_entries(product, threshold, 0.05, bias=bias)
    plain = kernels.jumprelu_entries(z, threshold, 0.05)
    for name in ("rows", "cols", "values", "active", "window", "pre", "at_or_above"):
        assert torch.equal(getattr(folded, name), getattr(plain, name)), name


@pytest.mark.parametrize("arch, fields", [
    ("jumprelu", dict(threshold_init_l0=12, bandwidth=0.05)),
    ("jumprelu", dict(threshold_init_l0=12, bandwidth=0.05, pre_act_coefficient=0.05, apply_b_dec_to_input=True)),
    ("topk", dict(k=12)),
    ("batchtopk", dict(k=12)),
])
def test_sparse_matches_dense_on_the_large_fast_paths(arch, fields):
    # d_sae 1024, 256 tokens: the shortlist top-k and the wordwise nonzero run (the other tests
    # are too small for them)
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(0)) + 0.2
    sae = adam_build(arch, d_in=D_IN, d_sae=1024, seed=5, **fields)
    sae.init_from_data(x)
    randomise(sae)
    dead = torch.rand(1024, generator=torch.Generator().manual_seed(1)) < 0.1
    assert_paths_agree(sae, x, StepContext(dead_mask=dead, sparsity_scale=0.7), extra_acts_loss=True)


@pytest.mark.parametrize("rows", [0, 5, 64, 130, 4096])
def test_column_sum_is_the_float64_sum(rows):
    # JumpReLU's pre-activation gap needs sum_b x_b in float64 (two large sums nearly cancel there)
    x = torch.randn(rows, 9, generator=torch.Generator().manual_seed(rows)) * 50 + 1000
    got = kernels.column_sum(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x.double().sum(0), rtol=1e-7, atol=1e-6 * rows)


def auxk_reference(z, dead, k_aux):
    """The dense path's AuxK selection (topk.py): the top k_aux over the dead latents, ReLU'd, as a set."""
    pool = torch.where(dead, z, torch.tensor(float("-inf"))).float()
    values, cols = pool.topk(k_aux, dim=1)
    return {(r, int(c), float(v)) for r in range(z.shape[0]) for v, c in zip(values[r], cols[r]) if v > 0}


def as_set(chosen):
    if isinstance(chosen, kernels.AuxEntries):  # the block layout: its nonzero acts
        rows, at = chosen.acts.nonzero(as_tuple=True)
        return {(int(r), int(chosen.columns[c]), float(chosen.acts[r, c])) for r, c in zip(rows, at)}
    return {(int(r), int(c), float(v)) for r, c, v in zip(chosen.rows, chosen.cols, chosen.values)}


@pytest.mark.parametrize("many_dead", [True, False])  # compared over z, or over their columns copied out
@pytest.mark.parametrize("k_aux", [3, 50])
def test_auxk_positive_entries_are_the_relud_top_k(k_aux, many_dead):
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(40, 64, generator=generator) - 2.0  # mostly negative: few positives per token
    z[5, :] = torch.rand(64, generator=generator) + 0.1  # one token with every latent positive
    z[7, 1] = float("inf")  # latent 1 is live
    if many_dead:  # a NaN never counts (the dense block the top-k falls back to with few dead keeps it)
        z[6, 0] = float("nan")
    dead = torch.zeros(64, dtype=torch.bool)
    dead[0::16 if not many_dead else 1] = True
    if many_dead:
        dead[1::4] = False
    assert (dead.sum() > kernels.AUX_GATHER_FRACTION * 64) == many_dead
    chosen = kernels.auxk_entries(z, dead, k_aux)
    # token 5's positive dead values (48 or 4) exceed k_aux 3: the top-k runs; under 50 the comparison does
    assert isinstance(chosen, kernels.Entries) or k_aux == 3
    assert as_set(chosen) == auxk_reference(torch.nan_to_num(z, nan=-1.0), dead, k_aux)
    columns = dead.nonzero().squeeze(1)
    pool = None if many_dead else z.index_select(1, columns)
    fast = kernels._positive_dead_entries(z, dead, columns, pool, k_aux, kernels.greater)
    assert (fast is None) == (k_aux == 3)


def test_auxk_positive_entries_on_bf16_values():
    generator = torch.Generator().manual_seed(8)
    z = (torch.randn(30, 80, generator=generator) - 2.5).bfloat16()
    dead = torch.rand(80, generator=generator) < 0.6
    chosen = kernels.auxk_entries(z, dead, 10, mixed.bf16_greater)
    assert chosen.values.dtype == torch.float32 and chosen.rows.numel() > 0
    assert as_set(chosen) == auxk_reference(z.float(), dead, 10)
