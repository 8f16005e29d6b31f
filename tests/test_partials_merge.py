"""The forward table's merge kernel (kernels/partials_merge.py): softmax_stats.merge's formulas against float64,
and each row's bits whatever rows are merged with it (what lets the fused route merge block by block)."""

import pytest
import torch
from helpers import DEVICE

from fastdpo.kernels.partials_merge import merge_partials
from fastdpo.softmax_stats import VocabPartials, merge


def table_of(logits: torch.Tensor, tile: int, with_stats: bool) -> torch.Tensor:
    """The forward kernel's [F, T, n] partials of logits [n, V] over tiles of `tile` columns (float64)."""
    parts = []
    for c in range(0, logits.shape[1], tile):
        z = logits[:, c:c + tile]
        m = z.max(1).values
        p = torch.exp(z - m[:, None])
        fields = [m, p.sum(1)]
        if with_stats:
            fields += [(p * z).sum(1), (p * p).sum(1), z.sum(1), z.max(1).values - 1.0]
        parts.append(torch.stack(fields))
    return torch.stack(parts, dim=1)


@pytest.mark.parametrize("with_stats", [False, True], ids=["plain", "stats"])
def test_merge_matches_float64_and_the_torch_merge(with_stats):
    logits = torch.randn(300, 1000, dtype=torch.float64, device=DEVICE) * 6
    table = table_of(logits, 96, with_stats)  # 11 tiles, the last one short
    merged, gap = merge_partials(table.float().contiguous())
    expected = merge(VocabPartials(table[0], table[1], table[0][:1], *table[2:]))
    fields = [expected.max, expected.sum_exp]
    if with_stats:
        fields += [expected.z_sum_exp, expected.sq_sum_exp, expected.z_sum, expected.max_before_target]
    assert merged.shape[0] == len(fields)
    for got, want in zip(merged, fields):
        # fp32 sums of 11 tiles (a and u near zero where their terms cancel): against the largest magnitude
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    lse = merged[0].double() + torch.log(merged[1].double())
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=1e-6, atol=1e-6)
    assert gap is None


def test_one_minus_p_target_from_the_target_free_sums():
    logits = torch.randn(200, 500, dtype=torch.float64, device=DEVICE) * 4
    targets = torch.randint(0, 500, (200,), device=DEVICE)
    table = table_of(logits, 64, False)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    excl = torch.stack([torch.exp(others[:, c:c + 64] - table[0, j][:, None]).sum(1)
                        for j, c in enumerate(range(0, 500, 64))])
    _, gap = merge_partials(table.float().contiguous(), excl.float().contiguous())
    want = 1 - torch.softmax(logits, 1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(gap.double(), want, rtol=1e-5, atol=1e-7)


def test_a_rows_bits_do_not_depend_on_the_rows_beside_it():
    table = table_of(torch.randn(333, 700, dtype=torch.float64, device=DEVICE) * 5, 32, True).float().contiguous()
    whole, _ = merge_partials(table)
    order = torch.randperm(333, device=DEVICE)
    shuffled, _ = merge_partials(table[:, :, order].contiguous())
    assert torch.equal(shuffled, whole[:, order])
    block, _ = merge_partials(table[:, :, 97:130].contiguous())  # 33 rows at an odd offset
    assert torch.equal(block, whole[:, 97:130])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, the interpreter's numpy
def test_nan_and_inf_logits_stay_nan():
    table = table_of(torch.randn(4, 100, dtype=torch.float64, device=DEVICE), 32, False).float()
    table[0, 1, 0] = float("nan")
    table[0, 2, 1] = float("inf")
    merged, _ = merge_partials(table.contiguous())
    lse = merged[0] + torch.log(merged[1])
    assert lse[:2].isnan().all() and lse[2:].isfinite().all()
