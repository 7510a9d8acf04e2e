"""Entries chosen on bf16 pre-activations (sae/mixed.py) against the float32 path's."""

import pytest
import torch

from jumpscope.sae import StepContext, kernels, mixed
from jumpscope.sae.registry import build


def _problem(seed=0, B=512, d=48, n=768):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(d, n, generator=g) / d ** 0.5
    b = torch.randn(n, generator=g) * 0.1
    return x, W, b, torch.addmm(b, x, W)


def _pairs(entries):
    return set(zip(entries.rows.tolist(), entries.cols.tolist()))


def _dense(entries, field="values"):
    out = torch.zeros(entries.shape)
    out[entries.rows, entries.cols] = getattr(entries, field)
    return out


def test_bf16_greater_compares_like_floats_for_any_sign_of_bound():
    g = torch.Generator().manual_seed(1)
    values = (torch.randn(64, 40, generator=g) * 3).bfloat16()
    values[0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("-inf")]).bfloat16()
    for bound in (torch.rand(40, generator=g) + 0.1, torch.randn(40, generator=g), torch.zeros(40)):
        got = mixed.bf16_greater(values, bound)
        rounded = (bound - mixed.UNIT_ROUNDOFF * bound.abs()).bfloat16().float()
        assert rounded.le(bound).all()  # the bound only moves down: a superset of values > bound
        expected = values.float() > rounded
        got[0, 2] = expected[0, 2] = False  # NaN: either (never an entry once recomputed)
        assert torch.equal(got, expected)
        assert not (values.float() > bound)[~got].any()


@pytest.mark.parametrize("k", [8, 32, 760])
def test_topk_entries_equal_the_float32_selection(k):
    x, W, b, z = _problem()
    exact, chosen = kernels.topk_entries(z, k), mixed.topk_entries(mixed.BF16Preactivations(x, W, b), k)
    assert _pairs(chosen) == _pairs(exact)
    torch.testing.assert_close(_dense(chosen), _dense(exact), rtol=0, atol=1e-5)


def test_jumprelu_entries_equal_the_float32_selection_including_negative_thresholds():
    x, W, b, z = _problem(seed=2)
    pre = mixed.BF16Preactivations(x, W, b)
    g = torch.Generator().manual_seed(3)
    for threshold in (torch.rand(z.shape[1], generator=g) + 0.8, torch.randn(z.shape[1], generator=g)):
        exact, chosen = kernels.jumprelu_entries(z, threshold, 0.05), mixed.jumprelu_entries(pre, threshold, 0.05)
        assert _pairs(chosen) == _pairs(exact)
        for field in ("active", "window", "at_or_above"):
            assert torch.equal(_dense(chosen, field), _dense(exact, field)), field
        torch.testing.assert_close(_dense(chosen, "pre"), _dense(exact, "pre"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k_aux", [4, 120, 300])  # entries, a block, every dead latent
def test_auxk_entries_are_the_float32_ones_up_to_bf16_rounding_in_both_layouts(k_aux):
    x, W, b, z = _problem(seed=4)
    dead = torch.zeros(z.shape[1], dtype=torch.bool)
    dead[::3] = True
    exact = kernels.auxk_entries(z, dead, k_aux)
    chosen = mixed.auxk_entries(mixed.BF16Preactivations(x, W, b), dead, k_aux)
    assert type(chosen) is type(exact)
    if isinstance(exact, kernels.Entries):  # near-ties may swap; values within bf16's rounding
        chosen_acts, exact_acts = _dense(chosen), _dense(exact)
        assert len(_pairs(chosen) ^ _pairs(exact)) <= 0.03 * exact.rows.numel()  # bf16 makes ties
    else:
        assert torch.equal(chosen.columns, exact.columns)
        chosen_acts, exact_acts = chosen.acts, exact.acts
    assert chosen_acts.dtype == torch.float32
    both = (chosen_acts > 0) & (exact_acts > 0)
    assert both.sum() >= 0.98 * (exact_acts > 0).sum()
    torch.testing.assert_close(chosen_acts[both], exact_acts[both], rtol=2 ** -6, atol=2 ** -5)


@pytest.mark.parametrize("sampled_bound", ["estimated", "too high", "too low"])
def test_batch_topk_entries_differ_from_float32_only_by_summation_order_at_the_boundary(monkeypatch, sampled_bound):
    x, W, b, z = _problem(seed=5)
    if sampled_bound != "estimated":  # too high: the check falls back to the exact bf16 bound
        monkeypatch.setattr(mixed, "sampled_bound",
                            lambda *_: torch.tensor(50.0 if sampled_bound == "too high" else -50.0))
    (exact, smallest), (chosen, smallest_mixed) = (kernels.batch_topk_entries(z, 16),
                                                   mixed.batch_topk_entries(mixed.BF16Preactivations(x, W, b), 16))
    assert chosen.rows.numel() == exact.rows.numel()
    swapped = _pairs(chosen) ^ _pairs(exact)
    assert all(abs(z[r, c] - smallest) < 1e-4 for r, c in swapped)  # ties up to float32 rounding
    assert abs(smallest_mixed - smallest) < 1e-4


def _step_against_float32(arch, options):
    """(loss, gradients) of one step with bf16 selection and of the float32 step."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(256, 32, generator=g)
    sae = build(arch, d_in=32, d_sae=640, kernel="sparse", seed=0, **options)
    sae.init_from_data(torch.randn(256, 32, generator=g))  # not x: its thresholds would tie with x's z
    steps = []
    for bf16 in (True, False):  # no dead latents: AuxK's own bf16 values are tested above
        sae.zero_grad()
        out = sae.loss(x, StepContext(bf16_selection=bf16))
        out.loss.backward()
        steps.append((out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    return steps


STEPS = [("topk", dict(k=12)), ("batchtopk", dict(k=12)), ("jumprelu", dict(target_l0=12, pre_act_coefficient=1e-3))]


# BatchTopK: entries tied with the batch's k * B-th value up to float32 rounding may swap
@pytest.mark.parametrize("arch, options, tolerance", [(a, o, 3e-3 if a == "batchtopk" else 1e-5) for a, o in STEPS])
def test_selection_alone_gives_the_float32_step(monkeypatch, arch, options, tolerance):
    monkeypatch.setattr(kernels, "_to_bf16", kernels._unchanged)  # float32 gathered products
    (loss, grads), (loss32, grads32) = _step_against_float32(arch, options)
    assert abs(loss - loss32) <= tolerance * loss32
    assert grads.keys() == grads32.keys()
    for name, grad in grads32.items():
        assert (grads[name] - grad).norm() <= 10 * tolerance * grad.norm(), name


@pytest.mark.parametrize("arch, options", STEPS)
def test_bf16_gathered_products_stay_within_bf16_rounding(arch, options):
    # each gathered term is rounded to bf16 (relative 2^-9) in its table and weight, each sum once:
    # about 3e-3 of each weight gradient; a sum accumulated in bf16 would be several times that
    (loss, grads), (loss32, grads32) = _step_against_float32(arch, options)
    assert abs(loss - loss32) <= 5e-4 * loss32
    for name, grad in grads32.items():
        error = (grads[name] - grad).norm() / grad.norm()
        assert error <= 1e-2, name
        if name in ("W_enc", "W_dec"):
            assert error > 1e-4, name  # the bf16 tables were used


def test_trainer_requests_bf16_selection_only_where_the_cpu_has_native_bf16(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert not mixed.bf16_selection_available(False, cpu)
    monkeypatch.setattr(mixed, "fast_bf16_matmul", lambda: False)
    with caplog.at_level("WARNING"):
        assert not mixed.bf16_selection_available(True, cpu)
    assert "no native bfloat16" in caplog.text
    monkeypatch.setattr(mixed, "fast_bf16_matmul", lambda: True)
    assert mixed.bf16_selection_available(True, cpu)
    monkeypatch.setattr(mixed, "_HINTED", [])
    caplog.clear()
    with caplog.at_level("INFO"):
        assert not mixed.bf16_selection_available(False, cpu) and not mixed.bf16_selection_available(False, cpu)
    assert caplog.text.count("--autocast bf16") == 1  # the hint, once
    assert not mixed.bf16_selection_available(True, torch.device("meta"))


def test_an_all_zero_encoder_gives_the_float32_entries():  # no bf16 error: the margin must stay positive
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(7))
    pre = mixed.BF16Preactivations(x, torch.zeros(8, 40), torch.zeros(40))
    entries, smallest = mixed.batch_topk_entries(pre, 3)
    assert entries.rows.numel() == 0 and smallest == float("inf")  # all z are 0: ReLU'd away, as in float32
    exact, _ = kernels.batch_topk_entries(torch.zeros(64, 40), 3)
    assert exact.rows.numel() == 0
    threshold = torch.full((40,), 0.01)
    chosen = mixed.jumprelu_entries(pre, threshold, 0.05)
    assert chosen.rows.numel() == 64 * 40  # every z = 0 lies in the kernel window
    assert _pairs(chosen) == _pairs(kernels.jumprelu_entries(torch.zeros(64, 40), threshold, 0.05))


def test_jumprelu_candidates_cover_outlier_features_and_wide_rows():
    # an LLM-like batch: one feature 30x the others on a few tokens, a BOS-like row 50x the norm,
    # and latents reading mostly that feature: their bf16 error is far above the typical row's
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1024, 64, generator=g)
    x[::16, 0] *= 30
    x[5] *= 50
    W = torch.randn(64, 512, generator=g) / 8
    W[0, :64] = 3.0  # concentrated columns
    b = torch.randn(512, generator=g) * 0.1
    z = torch.addmm(b, x, W)
    pre = mixed.BF16Preactivations(x, W, b)
    # thresholds just above each column's 95th percentile, where entries are dense, and just below
    # the wide row's pre-activations, whose bf16 errors are the largest
    for threshold, bandwidth in ((z.quantile(0.95, dim=0) + 1e-3, 0.01), (z.quantile(0.95, dim=0) + 1e-3, 0.1),
                                 (z[5] - 1e-4, 1e-4), (z[16] - 1e-4, 1e-4)):
        exact, chosen = kernels.jumprelu_entries(z, threshold, bandwidth), mixed.jumprelu_entries(pre, threshold, bandwidth)
        assert _pairs(chosen) == _pairs(exact)
        assert torch.equal(_dense(chosen, "active"), _dense(exact, "active"))


def test_kept_bf16_buffers_are_bounded_and_reused():
    for width in range(40, 40 + 2 * mixed.KEPT_SHAPES):  # more shapes than are kept
        x, W, b = torch.randn(8, 4), torch.randn(4, width), torch.zeros(width)
        first = mixed.BF16Preactivations(x, W, b).z
        again = mixed.BF16Preactivations(x * 2, W, b).z
        assert again.data_ptr() == first.data_ptr()  # the same storage, written again
        fresh = torch.cat([x * 2, torch.ones(8, 1)], 1).bfloat16() @ torch.cat([W, b[None]]).bfloat16()
        assert torch.equal(again, fresh)
    assert len(mixed._BUFFERS.tensors) <= 3 * mixed.KEPT_SHAPES


def test_the_padding_of_the_kept_buffers_is_zeroed_each_time():
    x, W, b = torch.randn(8, 5), torch.randn(5, 24), torch.randn(24)  # inner width 6, padded to 8
    mixed._buffer("inputs", 8, 8).fill_(float("nan"))  # whatever an earlier step left there
    mixed._buffer("encoder", 8, 24).fill_(float("nan"))
    z = mixed.BF16Preactivations(x, W, b).z
    fresh = torch.cat([x, torch.ones(8, 1)], 1).bfloat16() @ torch.cat([W, b[None]]).bfloat16()
    assert torch.equal(z, fresh)
