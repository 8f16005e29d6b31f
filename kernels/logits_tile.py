"""The one tile every fastdpo kernel starts from: z = transform(X[rows] @ W[cols]^T + b[cols]).

transform(x) = softcap * tanh(x * logit_scale / softcap) / temperature   (with softcap)
             = x * logit_scale / temperature                             (without)

This is TRL's order (scale, cap, then temperature), so a patched TRL trainer sees the same logits.
The tile lives in registers only: the forward folds it into per-row softmax partials, the backward
turns it into d_logits. Both kernels run the same GEMM: one program per (token block x vocabulary
tile), in the grouped order of Triton's matmul tutorial, with the tile shape of config.gemm_config.
X rows are addressed through an index vector so that prompt and padding tokens are never touched
and never copied.
"""

import triton
import triton.language as tl

from .config import input_precision


@triton.jit
def tanh(x):
    # libdevice's tanh does not run in Triton's interpreter; this identity is exact enough in fp32.
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def transform_logits(raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    z = raw * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z * inv_temperature


@triton.jit
def transform_derivative(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """dz/draw, written in terms of z so the backward needs no second copy of the raw tile."""
    if HAS_SOFTCAP:
        capped = z / (softcap * inv_temperature)  # = tanh(raw * logit_scale / softcap)
        return logit_scale * inv_temperature * (1 - capped * capped)
    else:
        return logit_scale * inv_temperature


@triton.jit
def grouped_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_M: tl.constexpr):
    """(token block, vocabulary tile) of a linear program id, GROUP_M token blocks at a time.

    Programs that run together share GROUP_M X blocks and sweep the same W tiles, so each W tile is
    read from HBM once per group and reused from L2 by the group's other blocks: W traffic is
    V*H*bytes per group instead of per token block.
    """
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_v = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP_M * tiles_v
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    return pid_m, pid_v


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr,
    rows, row_mask, cols, col_mask,
    hidden_size, stride_x, stride_w,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # rows are int64 already; cols are widened here because col * stride_w passes 2^31 for V*H > 2^31.
    x_rows = x_ptr + rows[:, None] * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    # K-loop: BLOCK_K columns of X and W at a time, accumulated in fp32 by tl.dot.
    for k_start in range(0, hidden_size, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden_size
        x = tl.load(x_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return transform_logits(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)


def tile_arguments(hidden, weight, bias, rows, targets, transform=None) -> dict:
    """The launch arguments, by name, that every kernel built on `logits_tile` takes: the operands
    (hidden [N, H] with a unit stride along H, weight [V, H], bias [V] or None, rows and targets [n]),
    their sizes and strides, the transform's scalars and the compile-time switches.

    `transform` is anything with `logit_scale`, `softcap` and `temperature` attributes
    (fastdpo.transform.LogitTransform); None is the identity. Without a bias or a softcap the kernel
    never reads that argument, so the weight and 1.0 stand in for them.
    """
    logit_scale, softcap, temperature = (1.0, None, 1.0) if transform is None else (
        transform.logit_scale, transform.softcap, transform.temperature)
    return dict(
        x_ptr=hidden, w_ptr=weight, b_ptr=weight if bias is None else bias, rows_ptr=rows, targets_ptr=targets,
        n_rows=rows.numel(), vocab_size=weight.shape[0], hidden_size=weight.shape[1],
        stride_x=hidden.stride(0), stride_w=weight.stride(0),
        logit_scale=float(logit_scale), softcap=1.0 if softcap is None else float(softcap),
        inv_temperature=1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, INPUT_PRECISION=input_precision(hidden.dtype),
    )
