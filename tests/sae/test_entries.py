"""sae/entries.py: the entry list's three products against dense float64 references."""

import pytest
import torch

from jumpscope.sae import entries as entries_module
from jumpscope.sae.entries import Entries, block_width


def entry_list(n_rows, n_cols, per_row, seed=0, cols_in=None, shuffled=False):
    """Entries grouped by row; ``cols_in`` restricts the columns (leaving some blocks empty),
    ``shuffled`` leaves each row's columns unsorted (as TopK's selection gives them)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.arange(n_cols) if cols_in is None else cols_in
    cols = torch.stack([pool[torch.randperm(len(pool), generator=generator)[:per_row]] for _ in range(n_rows)])
    if not shuffled:
        cols = cols.sort(1).values
    rows = torch.arange(n_rows).repeat_interleave(per_row)
    values = torch.rand(n_rows * per_row, generator=generator)
    return Entries(rows, cols.reshape(-1), values, torch.ones_like(values), (n_rows, n_cols))


def dense(e: Entries) -> torch.Tensor:
    return torch.zeros(e.shape, dtype=torch.float64).index_put_((e.rows, e.cols), e.values.double())


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("n_cols,cols_in", [(640, None), (600, None), (640, torch.arange(128, 256))])
def test_blocked_sampled_product_is_the_dot_product_at_every_entry(monkeypatch, shuffled, n_cols, cols_in):
    # 64-row blocks: several blocks, a last one cut short (600), or all entries in one block (128-255)
    monkeypatch.setattr(entries_module, "SDDMM_BLOCK_BYTES", 64 * 24 * 4)
    generator = torch.Generator().manual_seed(1)
    left, right = torch.randn(50, 24, generator=generator), torch.randn(n_cols, 24, generator=generator)
    e = entry_list(50, n_cols, 9, cols_in=cols_in, shuffled=shuffled)
    assert block_width(right) == 64
    got = e.sddmm(left, right)
    want = (left.double()[e.rows] * right.double()[e.cols]).sum(1)
    assert len(e._blocks) == 1  # the blocked path ran
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_sampled_product_without_sampled_addmm(monkeypatch):
    monkeypatch.setattr(entries_module, "SDDMM_BLOCK_BYTES", 64 * 24 * 4)
    generator = torch.Generator().manual_seed(2)
    left, right = torch.randn(30, 24, generator=generator), torch.randn(300, 24, generator=generator)
    e = entry_list(30, 300, 7, shuffled=True)
    want = e.sddmm(left, right)

    def missing(*args, **kwargs):
        raise NotImplementedError("no sampled_addmm here")

    monkeypatch.setattr(torch.sparse, "sampled_addmm", missing)
    blocked = e.sddmm(left, right)
    monkeypatch.setattr(entries_module, "SDDMM_BLOCK_BYTES", 1 << 30)  # one block: the plain path
    whole = e.sddmm(left, right)
    torch.testing.assert_close(blocked, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-6)


def test_block_width_is_a_power_of_two_that_fits():
    for d, itemsize_dtype in ((384, torch.float32), (576, torch.float32), (2048, torch.float32), (384, torch.float64),
                              (100_000, torch.float32)):
        width = block_width(torch.empty(4, d, dtype=itemsize_dtype))
        assert width & (width - 1) == 0 and width >= 64
        assert width == 64 or width * d * torch.empty(0, dtype=itemsize_dtype).element_size() <= (3 << 19)
    assert block_width(torch.empty(4, 384)) == 1024


def test_gathers_are_the_csr_products():
    generator = torch.Generator().manual_seed(3)
    e = entry_list(40, 70, 6, seed=3, shuffled=True)
    table_cols, table_rows = torch.randn(70, 5, generator=generator), torch.randn(40, 5, generator=generator)
    torch.testing.assert_close(e.gather_rows(table_cols, e.values).double(), dense(e) @ table_cols.double())
    torch.testing.assert_close(e.gather_cols(table_rows, e.values).double(), dense(e).T @ table_rows.double())
    assert torch.equal(e.flat_index(), e.rows * 70 + e.cols)


def test_bf16_tables_give_float32_sums_within_bf16_rounding():
    generator = torch.Generator().manual_seed(4)
    e = entry_list(200, 300, 16, seed=4, shuffled=True)
    table_cols, table_rows = torch.randn(300, 64, generator=generator), torch.randn(200, 64, generator=generator)
    for got, want in ((e.gather_rows(table_cols.bfloat16(), e.values), dense(e) @ table_cols.double()),
                      (e.gather_cols(table_rows.bfloat16(), e.values), dense(e).T @ table_rows.double())):
        assert got.dtype == torch.float32
        error = (got.double() - want).norm() / want.norm()
        assert 1e-4 < error < 4e-3  # rounded (2^-9 relative per input), but summed in float32


def sparse_acts(shape, density, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=generator) < density
    return torch.rand(shape, generator=generator) * keep


def test_sparse_decode_is_the_dense_product_and_keeps_zeros_nan_and_batch_dims():
    table = torch.randn(600, 24, generator=torch.Generator().manual_seed(1))
    acts = sparse_acts((3, 40, 600), 0.05)
    acts[0, 0] = 0.0  # a row with no entry: b_dec alone in a decode
    acts[1, 2, 7] = -0.0
    acts[2, 5, 11] = float("nan")
    got = entries_module.sparse_decode(acts, table)
    reference = acts.double() @ table.double()
    assert got is not None and got.shape == (3, 40, 24)
    assert torch.equal(got.isnan(), reference.isnan()) and got[2, 5].isnan().all()
    finite = ~reference.isnan()
    assert torch.allclose(got[finite].double(), reference[finite], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0, 0], torch.zeros(24))


def test_sparse_decode_declines_where_the_dense_product_is_needed_or_cheaper():
    table = torch.randn(600, 8)
    acts = sparse_acts((16, 600), 0.05)
    assert entries_module.sparse_decode(sparse_acts((16, 600), 0.3), table) is None  # too dense
    assert entries_module.sparse_decode(acts[:, :500], table[:500]) is None  # too few latents
    assert entries_module.sparse_decode(acts.double(), table.double()) is None
    assert entries_module.sparse_decode(acts[:0], table) is None
    recorded = acts.clone().requires_grad_()
    assert entries_module.sparse_decode(recorded, table) is None  # autograd would lose the values' gradient
    with torch.no_grad():
        assert entries_module.sparse_decode(recorded, table.requires_grad_()) is not None


def test_an_sae_decodes_through_entries_at_inference_and_densely_under_autograd(monkeypatch):
    from jumpscope.sae import build

    taken = []
    real = entries_module.sparse_decode

    def spy(acts, table):
        out = real(acts, table)
        taken.append(out is not None)
        return out

    monkeypatch.setattr("jumpscope.sae.base.sparse_decode", spy)
    sae = build("topk", d_in=16, d_sae=1024, k=8, seed=0)
    x = torch.randn(32, 16)
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    assert taken == [True]
    assert torch.allclose(recon, acts @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-6)
    acts = acts.clone().requires_grad_()
    sae.decode(acts).sum().backward()  # the dense product, so the gradient reaches acts and W_dec
    assert taken == [True, False]
    assert torch.allclose(acts.grad, sae.W_dec.sum(1).expand_as(acts).detach(), rtol=1e-5, atol=1e-6)
    assert sae.W_dec.grad is not None
