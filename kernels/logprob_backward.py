"""Backward of the fused LM-head log-prob, Triton part: recompute logits tiles into d_logits.

With lse saved by the forward and g_i = dL/d logp_i, the gradient of logp_i = z_{i,y_i} - lse_i is

    dL/dz_{i,v}   = g_i * (1[v == y_i] - softmax(z_i)_v),     softmax(z_i)_v = exp(z_{i,v} - lse_i)
    dL/draw_{i,v} = dL/dz_{i,v} * dz/draw                     (scale, softcap and temperature)

and then dX[i] = sum_v dL/draw[i, v] W[v], dW[v] = sum_i dL/draw[i, v] X[i], db[v] = sum_i dL/draw[i, v].
fastdpo.triton_head walks the vocabulary in chunks: for each chunk this kernel writes dL/draw for
[scored rows x chunk] into a workspace, in the input dtype (fp32 math, one rounding, as cuBLAS would
round an operand), and cuBLAS turns the workspace into dX and dW with two GEMMs. The kernel runs
the forward's GEMM (same tile, same grouped order, same K loop, same driver: logits_tile), so it
recomputes the forward's exact logits, and every workspace element has one writer: no atomics anywhere.

With grad_tolerance > 0 the backward may skip tiles altogether: kernels/sparse_backward.py.

Cost per chunk of C columns at the Llama-3-8B head (n = 16,384, H = 4096, bf16): 2 n C H FLOPs of
recompute, n C x 2 bytes written; over the vocabulary 2 n V H = 17.2 TFLOP and 4.2 GB of workspace
writes (read twice more by the GEMMs). On sm_90 the persistent driver runs 128 x 256 x 64 GEMM tiles
(two 128 x 128 epilogue tiles): 202 GB of L2->SM operand traffic instead of 269 GB at 128 x 128, and
X read from the [n, H] rows that the dW GEMM takes anyway (triton_head gathers them once). atomics 0.
"""

import triton
import triton.language as tl

from .config import device_capability, gemm_config, persistent_config
from .logits_tile import (column_halves, descriptor_arguments, finish_logits, grouped_tile, persistent_launch,
                          raw_tile, raw_tile_tma, tile_arguments, token_block,
                          transform_derivative)


@triton.jit
def row_terms(targets_ptr, lse_ptr, grad_ptr, offs_m, row_mask):
    """Per token row: its target, lse and dL/dlogp."""
    targets = tl.load(targets_ptr + offs_m, mask=row_mask, other=-1).to(tl.int32)  # V < 2^31: half the registers
    lse = tl.load(lse_ptr + offs_m, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + offs_m, mask=row_mask, other=0.0)
    return targets, lse, grad


@triton.jit
def d_logits_epilogue(
    acc, b_ptr, row_mask, cols, col_mask, targets, lse, grad, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """dL/draw from a tile's raw product acc (0 outside the matrix), fp32, and the tile's mask."""
    z = finish_logits(acc, b_ptr, cols, col_mask, logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP)
    valid = row_mask[:, None] & col_mask[None, :]
    # onehot - softmax; tl.where, not a multiply: padded rows/columns may hold inf (0 * inf = NaN).
    d_soft = tl.where(valid, tl.where(cols[None, :] == targets[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]), 0.0)
    d_raw = grad[:, None] * d_soft * transform_derivative(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    return d_raw, valid


@triton.jit
def d_logits_tile(
    x_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, grad_ptr, pid_m, cols, col_mask,
    n_rows, hidden_size, stride_x, stride_w, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dL/draw on token block pid_m x `cols`, fp32 in registers (0 outside the matrix), and that mask.

    The forward's GEMM (raw_tile, same K loop): the recomputed z are the forward's own."""
    offs_m, row_mask, rows = token_block(rows_ptr, pid_m, n_rows, BLOCK_M)
    targets, lse, grad = row_terms(targets_ptr, lse_ptr, grad_ptr, offs_m, row_mask)
    acc = raw_tile(x_ptr, w_ptr, rows, row_mask, cols, col_mask, hidden_size, stride_x, stride_w,
                   BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
    return d_logits_epilogue(acc, b_ptr, row_mask, cols, col_mask, targets, lse, grad, logit_scale, softcap,
                             inv_temperature, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def store_d_logits(
    acc, local_tile, offs_m, row_mask, targets, lse, grad, b_ptr, out_ptr,
    vocab_size, col_start, chunk_width, stride_out, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Tile local_tile of the chunk (BLOCK_V columns from col_start + local_tile BLOCK_V) into out."""
    local_cols = local_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_start + local_cols  # col_start is a multiple of BLOCK_V: these are the forward's tiles
    col_mask = (local_cols < chunk_width) & (cols < vocab_size)
    d_raw, valid = d_logits_epilogue(acc, b_ptr, row_mask, cols, col_mask, targets, lse, grad, logit_scale, softcap,
                                     inv_temperature, HAS_BIAS, HAS_SOFTCAP)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + local_cols[None, :]
    tl.store(out, d_raw.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def logits_grad_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, grad_ptr, out_ptr,
    n_rows, vocab_size, col_start, chunk_width, hidden_size, stride_x, stride_w, stride_out,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The pointer driver: one program per (token block, vocabulary tile of the chunk)."""
    pid_m, pid_v = grouped_tile(tl.program_id(0), n_rows, chunk_width, BLOCK_M, BLOCK_V, GROUP_M)
    offs_m, row_mask, rows = token_block(rows_ptr, pid_m, n_rows, BLOCK_M)
    targets, lse, grad = row_terms(targets_ptr, lse_ptr, grad_ptr, offs_m, row_mask)
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_start + local_cols
    acc = raw_tile(x_ptr, w_ptr, rows, row_mask, cols, (local_cols < chunk_width) & (cols < vocab_size),
                   hidden_size, stride_x, stride_w, BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
    store_d_logits(acc, pid_v, offs_m, row_mask, targets, lse, grad, b_ptr, out_ptr, vocab_size, col_start,
                   chunk_width, stride_out, logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def logits_grad_tma_kernel(
    x_desc, w_desc, b_ptr, targets_ptr, lse_ptr, grad_ptr, out_ptr,
    n_rows, vocab_size, col_start, chunk_width, hidden_size, stride_out,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILES: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The persistent driver (config.persistent_config), the forward's: same GEMM tiles, same K loop,
    the epilogue one BLOCK_V tile at a time."""
    BLOCK_N: tl.constexpr = SUBTILES * BLOCK_V
    n_tiles = tl.cdiv(n_rows, BLOCK_M) * tl.cdiv(chunk_width, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, n_rows, chunk_width, BLOCK_M, BLOCK_N, GROUP_M)
        acc = raw_tile_tma(x_desc, w_desc, pid_m * BLOCK_M, col_start + pid_n * BLOCK_N, hidden_size,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < n_rows
        targets, lse, grad = row_terms(targets_ptr, lse_ptr, grad_ptr, offs_m, row_mask)
        if SUBTILES == 1:
            store_d_logits(acc, pid_n, offs_m, row_mask, targets, lse, grad, b_ptr, out_ptr, vocab_size, col_start,
                           chunk_width, stride_out, logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP,
                           BLOCK_V)
        else:
            left, right = column_halves(acc, BLOCK_M, BLOCK_V)
            store_d_logits(left, 2 * pid_n, offs_m, row_mask, targets, lse, grad, b_ptr, out_ptr, vocab_size,
                           col_start, chunk_width, stride_out, logit_scale, softcap, inv_temperature, HAS_BIAS,
                           HAS_SOFTCAP, BLOCK_V)
            store_d_logits(right, 2 * pid_n + 1, offs_m, row_mask, targets, lse, grad, b_ptr, out_ptr, vocab_size,
                           col_start, chunk_width, stride_out, logit_scale, softcap, inv_temperature, HAS_BIAS,
                           HAS_SOFTCAP, BLOCK_V)


def logits_grad(hidden, weight, bias, rows, targets, lse, grad, out, col_start, *, transform=None, x_scored=None):
    """Write dL/draw for the selected rows and vocabulary columns [col_start, col_start + out.shape[1])
    into `out` ([n, width], unit stride along columns, any row stride). col_start must be a multiple
    of the tile width (config.gemm_config's BLOCK_V) so that the tiles are the forward's; transform:
    see logits_tile.tile_arguments; x_scored: hidden[rows] when the caller has it (the persistent
    driver reads the scored rows compacted)."""
    n_rows, hidden_size = rows.numel(), weight.shape[1]
    cfg = gemm_config(hidden.dtype, device_capability(hidden.device), hidden_size)
    width = out.shape[1]
    assert col_start % cfg["BLOCK_V"] == 0 and out.stride(1) == 1
    outputs = dict(lse_ptr=lse, grad_ptr=grad, out_ptr=out, col_start=col_start, chunk_width=width,
                   stride_out=out.stride(0))
    persistent = persistent_config(hidden.dtype, device_capability(hidden.device), hidden_size)
    if persistent is None:
        grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]) * triton.cdiv(width, cfg["BLOCK_V"]),)
        logits_grad_kernel[grid](**tile_arguments(hidden, weight, bias, rows, targets, transform), **outputs, **cfg)
    elif n_rows:
        gemm_tiles = triton.cdiv(n_rows, cfg["BLOCK_M"]) * triton.cdiv(width, cfg["BLOCK_V"] * persistent["SUBTILES"])
        grid, persistent = persistent_launch(persistent, gemm_tiles, hidden.device)
        logits_grad_tma_kernel[grid](
            **descriptor_arguments(hidden, weight, bias, rows, targets, transform, cfg, persistent, x_scored),
            **outputs, **dict(cfg, **persistent))
