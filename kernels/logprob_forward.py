"""Forward of the fused LM-head log-prob: per-token partial softmax statistics, logits never stored.

For a token block X (BLOCK_M rows picked by index) and a contiguous slice of the vocabulary, the
kernel streams W in tiles of BLOCK_V rows, forms z = transform(X W^T + b) in registers and keeps,
per token, the online-softmax state over the slice (Milakov & Gimelshein 2018):

    m = max_v z_v,   s = sum_v exp(z_v - m),   t = z_target   (0 if the target is outside the slice)

and, when statistics are requested, also
    a = sum_v exp(z_v - m) z_v       (entropy  = lse - a / s)
    q = sum_v exp(2 (z_v - m))       (log sum p^2 = log q - 2 log s, after merging)
    u = sum_v z_v                    (mean logit = u / V)
    b = max_{v < target} z_v         (the target is the first argmax iff t >= max z and t > b)

When token blocks alone cannot fill the GPU, the vocabulary is split across programs (grid axis 1)
and each split writes its own partial row; the caller merges the splits with a logsumexp, which is
O(tokens x splits) work. The whole forward is one pass over W per token block.
"""

import torch
import triton
import triton.language as tl

from .config import device_capability, forward_config, is_aligned, input_precision, num_vocab_splits
from .logits_tile import logits_tile


@triton.jit
def logprob_forward_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr,
    max_ptr, sum_exp_ptr, target_logit_ptr,
    z_sum_exp_ptr, sq_sum_exp_ptr, z_sum_ptr, max_before_ptr,
    n_rows, vocab_size, hidden_size, stride_x, stride_w, cols_per_split,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_m, mask=row_mask, other=-1)
    col_start = split * cols_per_split

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    z_sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    sq_sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    z_sum = tl.zeros((BLOCK_M,), tl.float32)
    max_before = tl.full((BLOCK_M,), float("-inf"), tl.float32)

    # Every split walks cols_per_split columns (a multiple of BLOCK_V); only the last split runs past
    # the vocabulary, into tiles that the mask empties. It has no more tiles than the others, so the
    # critical path is unchanged.
    for tile in range(0, cols_per_split // BLOCK_V):
        cols = col_start + tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab_size
        z = logits_tile(
            x_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, hidden_size, stride_x, stride_w,
            logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K,
            INPUT_PRECISION,
        )
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)  # exp(-inf) = 0 on the first tile
        p = tl.exp(z - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        if WITH_STATS:
            z_finite = tl.where(col_mask[None, :], z, 0.0)  # keeps 0 * -inf out of the sums
            z_sum_exp = z_sum_exp * rescale + tl.sum(p * z_finite, axis=1)
            sq_sum_exp = sq_sum_exp * rescale * rescale + tl.sum(p * p, axis=1)
            z_sum += tl.sum(z_finite, axis=1)
            before = tl.where(cols[None, :] < targets[:, None], z, float("-inf"))
            max_before = tl.maximum(max_before, tl.max(before, axis=1))
        running_max = new_max

    out = split * n_rows + offs_m
    tl.store(max_ptr + out, running_max, mask=row_mask)
    tl.store(sum_exp_ptr + out, sum_exp, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if WITH_STATS:
        tl.store(z_sum_exp_ptr + out, z_sum_exp, mask=row_mask)
        tl.store(sq_sum_exp_ptr + out, sq_sum_exp, mask=row_mask)
        tl.store(z_sum_ptr + out, z_sum, mask=row_mask)
        tl.store(max_before_ptr + out, max_before, mask=row_mask)


def logprob_forward(hidden, weight, bias, rows, targets, *, logit_scale=1.0, softcap=None, temperature=1.0,
                    with_stats=False, num_splits=None):
    """Partial softmax statistics of the selected rows of `hidden` ([N, H]) against `weight` ([V, H]).

    rows: int64 [n] indices into hidden; targets: int64 [n] in [0, V).
    Returns (max, sum_exp, target_logit, z_sum_exp, sq_sum_exp, z_sum, max_before_target), each
    float32 [splits, n]; the last four are None without `with_stats`.
    """
    n_rows, (vocab_size, hidden_size) = rows.numel(), weight.shape
    aligned = is_aligned(hidden_size, *(t for t in (hidden, weight, bias) if t is not None))
    cfg = forward_config(hidden.dtype, device_capability(hidden.device), aligned)
    block_v = cfg["BLOCK_V"]
    splits = num_vocab_splits(n_rows, vocab_size, cfg["BLOCK_M"], block_v, hidden.device, num_splits)
    cols_per_split = triton.cdiv(triton.cdiv(vocab_size, splits), block_v) * block_v
    splits = triton.cdiv(vocab_size, cols_per_split)  # no empty split after rounding up
    n_outputs = 7 if with_stats else 3
    partials = torch.empty((n_outputs, splits, n_rows), device=hidden.device, dtype=torch.float32)
    stat_ptrs = list(partials[3:]) if with_stats else [partials[0]] * 4  # unused pointers when no stats
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), splits)
    logprob_forward_kernel[grid](
        hidden, weight, bias if bias is not None else weight, rows, targets,
        partials[0], partials[1], partials[2], *stat_ptrs,
        n_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0), cols_per_split,
        float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_STATS=with_stats,
        INPUT_PRECISION=input_precision(hidden.dtype), **cfg,
    )
    return tuple(partials) if with_stats else (*partials, None, None, None, None)
