"""Backward of the fused LM-head log-prob: recompute each logits tile, never store it.

With lse saved by the forward and g_i = dL/d logp_i, the gradient of logp_i = z_{i,y_i} - lse_i is

    dL/dz_{i,v}   = g_i * (1[v == y_i] - softmax(z_i)_v),     softmax(z_i)_v = exp(z_{i,v} - lse_i)
    dL/draw_{i,v} = dL/dz_{i,v} * dz/draw                     (scale, softcap and temperature)
    dX[i]  += dL/draw[i, tile] @ W[tile]          dW[tile] += dL/draw[:, tile]^T @ X[rows]
    db[tile] += sum_i dL/draw[i, tile]

One program owns one (token block, vocab tile) pair: it recomputes z with the same K-loop as the
forward, forms dL/draw in registers, and streams H in BLOCK_K slices, adding its dX and dW
contributions to fp32 buffers with atomics (every X row and W row is shared by many programs).
dX, dW and db are each skipped at compile time when the input does not require a gradient, so a
frozen head (LoRA) costs no dW traffic at all.

Optional gradient filter (Cut Cross-Entropy's, Wijmans et al. 2024): with filter_eps > 0 a program
whose |onehot - softmax| stays below filter_eps everywhere skips its dX / dW / db products. On a
trained model most of the vocabulary is such tiles; each skipped d_logit is below filter_eps * |g|.
filter_eps = 0 (the default) is exact.
"""

import triton
import triton.language as tl

from .config import backward_config, device_capability, is_aligned, input_precision
from .logits_tile import logits_tile, transform_derivative


@triton.jit
def grouped_tile(pid, n_rows, vocab_size, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (token block, vocab tile) so that GROUP_M token blocks that run
    together sweep the same W tiles, which then come from L2 instead of HBM."""
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_v = tl.cdiv(vocab_size, BLOCK_V)
    per_group = GROUP_M * tiles_v
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    return pid_m, pid_v


@triton.jit
def logprob_backward_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, grad_ptr,
    dx_ptr, dw_ptr, db_ptr,
    n_rows, vocab_size, hidden_size, stride_x, stride_w, stride_dx, stride_dw,
    logit_scale, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_v = grouped_tile(tl.program_id(0), n_rows, vocab_size, BLOCK_M, BLOCK_V, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_m, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + offs_m, mask=row_mask, other=0.0)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab_size

    z = logits_tile(
        x_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, hidden_size, stride_x, stride_w,
        logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K,
        INPUT_PRECISION,
    )
    valid = row_mask[:, None] & col_mask[None, :]
    # onehot - softmax; tl.where, not a multiply: padded rows/columns may hold inf (0 * inf = NaN).
    d_soft = tl.where(valid, tl.where(cols[None, :] == targets[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]), 0.0)
    needed = True
    if FILTER:  # Cut Cross-Entropy's criterion: some |onehot - softmax| reaches filter_eps
        needed = tl.max(tl.max(tl.abs(d_soft), axis=1), axis=0) >= filter_eps
    if needed:
        d_raw = grad[:, None] * d_soft * transform_derivative(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        accumulate_products(
            d_raw, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, rows, row_mask, cols, col_mask, hidden_size,
            stride_x, stride_w, stride_dx, stride_dw, COMPUTE_DX, COMPUTE_DW, COMPUTE_DB, BLOCK_K, INPUT_PRECISION,
        )


@triton.jit
def accumulate_products(
    d_raw, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, rows, row_mask, cols, col_mask, hidden_size,
    stride_x, stride_w, stride_dx, stride_dw,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """db += colsum(d_raw); dX[rows] += d_raw @ W[cols]; dW[cols] += d_raw^T @ X[rows], H in BLOCK_K slices."""
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(d_raw, axis=0), mask=col_mask)
    # The MMAs take d_raw in the input dtype (as cuBLAS would); accumulation stays fp32.
    d_in = d_raw.to(x_ptr.dtype.element_ty)
    x_rows = x_ptr + rows[:, None] * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    dx_rows = dx_ptr + rows[:, None] * stride_dx
    dw_rows = dw_ptr + cols.to(tl.int64)[:, None] * stride_dw
    for k_start in range(0, hidden_size, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden_size
        if COMPUTE_DX:
            w = tl.load(w_rows + offs_k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            d_x = tl.dot(d_in, w, input_precision=INPUT_PRECISION)
            tl.atomic_add(dx_rows + offs_k[None, :], d_x, mask=row_mask[:, None] & k_mask[None, :])
        if COMPUTE_DW:
            x = tl.load(x_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            d_w = tl.dot(tl.trans(d_in), x, input_precision=INPUT_PRECISION)
            tl.atomic_add(dw_rows + offs_k[None, :], d_w, mask=col_mask[:, None] & k_mask[None, :])


def logprob_backward(hidden, weight, bias, rows, targets, lse, grad, *, grad_hidden, grad_weight, grad_bias,
                     logit_scale=1.0, softcap=None, temperature=1.0, filter_eps=0.0):
    """Accumulate the log-prob gradients of the selected rows into fp32 buffers.

    grad_hidden: float32 [N, H] or None (rows index into it), grad_weight: float32 [V, H] or None,
    grad_bias: float32 [V] or None; all must be zero-initialised (or hold earlier contributions).
    """
    n_rows, (vocab_size, hidden_size) = rows.numel(), weight.shape
    if n_rows == 0 or (grad_hidden is None and grad_weight is None and grad_bias is None):
        return
    aligned = is_aligned(hidden_size, *(t for t in (hidden, weight, bias, grad_hidden, grad_weight) if t is not None))
    cfg = backward_config(hidden.dtype, device_capability(hidden.device), aligned, grad_filter=filter_eps > 0)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]) * triton.cdiv(vocab_size, cfg["BLOCK_V"]),)
    placeholder = lse  # any float32 tensor: the pointer of a gradient that is compiled out
    logprob_backward_kernel[grid](
        hidden, weight, bias if bias is not None else weight, rows, targets, lse, grad,
        placeholder if grad_hidden is None else grad_hidden,
        placeholder if grad_weight is None else grad_weight,
        placeholder if grad_bias is None else grad_bias,
        n_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0),
        hidden_size if grad_hidden is None else grad_hidden.stride(0),
        hidden_size if grad_weight is None else grad_weight.stride(0),
        float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature), float(filter_eps),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, FILTER=filter_eps > 0,
        COMPUTE_DX=grad_hidden is not None, COMPUTE_DW=grad_weight is not None, COMPUTE_DB=grad_bias is not None,
        INPUT_PRECISION=input_precision(hidden.dtype), **cfg,
    )
