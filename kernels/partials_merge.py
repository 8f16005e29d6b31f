"""The forward's per-tile softmax partials merged over the vocabulary, row by row (fastdpo.triton_head,
fastdpo.triton_fused).

kernels/logprob_forward.py leaves, per vocabulary tile j and row i, a table [F, T, n] (fp32) of
m_ij, s_ij and with statistics a_ij, q_ij, u_ij, b_ij (see there). Per row, in a fixed order over j:

    M_i = max_j m_ij                      s_i = sum_j s_ij e^{m_ij - M_i}       a_i likewise
    q_i = sum_j q_ij e^{2 (m_ij - M_i)}   u_i = sum_j u_ij                      b_i = max_j b_ij

(fastdpo.softmax_stats.merge's formulas), and with the target-free sums e_ij of STORE_LOGITS, also
1 - p_{i,y_i} = sum_j e_ij e^{m_ij - lse_i}, lse_i = M_i + log s_i.

Why a kernel: each row is folded by one thread in the same order whatever the number of rows and the
row's place among them, so a token block's rows merged alone (the fused route, block by block) give the
bits of all rows merged at once (the two-pass route). A torch reduction over dim 0 gives no such
promise (its split of the tiles may depend on the shape, and on CPU the vectorized body and the tail
round differently). It also reads the table once per pass (two passes: the max, then the sums) where
the torch merge writes and reads a rescale temporary per field: at Llama-3-8B (n = 16,384, 1,002 tiles)
the table is 131 MB (394 MB with statistics), about 0.1 ms per pass at 3 TB/s.

One program per BLOCK_N rows, T tiles in a loop; every output has one writer; no atomics.
"""

import torch
import triton
import triton.language as tl

from .logprob_forward import PLAIN_FIELDS, STAT_FIELDS

# 128 rows a program over 4 warps: one row per thread, each tile's fields read as 512-byte rows.
BLOCK_N = 128


@triton.jit
def merge_partials_kernel(
    table_ptr, excl_ptr, out_ptr, gap_ptr, n_rows, n_tiles,
    WITH_STATS: tl.constexpr, WITH_GAP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < n_rows
    field = n_tiles.to(tl.int64) * n_rows  # int64: fields x tiles x rows passes 2^31 at ~a million rows
    new_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for j in range(n_tiles):
        new_max = tl.maximum(new_max, tl.load(table_ptr + j * n_rows + rows, mask=mask, other=0.0),
                             propagate_nan=tl.PropagateNan.ALL)  # NaN logits stay NaN, as torch's max
    # A row of -inf maxima (no real column) never occurs; +inf logits make the rescale NaN, as in torch.
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    z_sum_exp = tl.zeros([BLOCK_N], tl.float32)
    sq_sum_exp = tl.zeros([BLOCK_N], tl.float32)
    z_sum = tl.zeros([BLOCK_N], tl.float32)
    before = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for j in range(n_tiles):
        at = table_ptr + j * n_rows + rows
        rescale = tl.exp(tl.load(at, mask=mask, other=0.0) - new_max)
        sum_exp += tl.load(at + field, mask=mask, other=1.0) * rescale  # (rows past n: log s finite)
        if WITH_STATS:
            z_sum_exp += tl.load(at + 2 * field, mask=mask, other=0.0) * rescale
            sq_sum_exp += tl.load(at + 3 * field, mask=mask, other=0.0) * rescale * rescale
            z_sum += tl.load(at + 4 * field, mask=mask, other=0.0)
            before = tl.maximum(before, tl.load(at + 5 * field, mask=mask, other=0.0),
                                propagate_nan=tl.PropagateNan.ALL)
    out = out_ptr + rows
    tl.store(out, new_max, mask=mask)
    tl.store(out + n_rows, sum_exp, mask=mask)
    if WITH_STATS:
        tl.store(out + 2 * n_rows, z_sum_exp, mask=mask)
        tl.store(out + 3 * n_rows, sq_sum_exp, mask=mask)
        tl.store(out + 4 * n_rows, z_sum, mask=mask)
        tl.store(out + 5 * n_rows, before, mask=mask)
    if WITH_GAP:  # 1 - p_y = sum_j e_j exp(m_j - lse): the tiles in the same order
        lse = new_max + tl.log(sum_exp)
        gap = tl.zeros([BLOCK_N], tl.float32)
        for j in range(n_tiles):
            at = j * n_rows + rows
            gap += tl.load(excl_ptr + at, mask=mask, other=0.0) * tl.exp(
                tl.load(table_ptr + at, mask=mask, other=0.0) - lse)
        tl.store(gap_ptr + rows, gap, mask=mask)


def merge_partials(table: torch.Tensor, excl: torch.Tensor | None = None):
    """table fp32 [F, T, n] (F = 2 or 6, contiguous) -> (merged fp32 [F, n]: M, s and the statistics a, q, u, b;
    with excl (fp32 [T, n], the target-free sums) also 1 - p_y, fp32 [n], else None)."""
    fields, n_tiles, n_rows = table.shape
    assert table.is_contiguous() and fields in (PLAIN_FIELDS, STAT_FIELDS)
    merged = torch.empty((fields, n_rows), dtype=torch.float32, device=table.device)
    gap = torch.empty(n_rows, dtype=torch.float32, device=table.device) if excl is not None else None
    if n_rows:
        assert excl is None or (excl.is_contiguous() and excl.shape == (n_tiles, n_rows))
        merge_partials_kernel[(triton.cdiv(n_rows, BLOCK_N),)](
            table, table if excl is None else excl, merged, merged if gap is None else gap, n_rows, n_tiles,
            WITH_STATS=fields == STAT_FIELDS, WITH_GAP=excl is not None, BLOCK_N=BLOCK_N, num_warps=4)
    return merged, gap
