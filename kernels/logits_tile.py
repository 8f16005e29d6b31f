"""The one tile every fastdpo kernel starts from: z = transform(X[rows] @ W[cols]^T + b[cols]).

transform(x) = softcap * tanh(x * logit_scale / softcap) / temperature   (with softcap)
             = x * logit_scale / temperature                             (without)

This is TRL's order (scale, cap, then temperature), so a patched TRL trainer sees the same logits.
The tile lives in registers only: the forward folds it into per-row softmax partials, the backward
turns it into d_logits. Both kernels run the same GEMM on the tiles of config.gemm_config (BLOCK_M
tokens x BLOCK_V vocabulary rows, K loop of BLOCK_K, grouped order of Triton's matmul tutorial),
through one of two drivers that differ only in how operands arrive:

- pointer driver (raw_tile): one program per tile; X rows addressed through an index vector, so
  prompt and padding tokens are never touched and never copied. sm_80, fp32, odd hidden sizes, the
  sparse backward, and everything when config.PERSISTENT_TMA is off.
- persistent driver (raw_tile_tma, config.persistent_config): NUM_SMS programs loop over GEMM tiles;
  the scored rows of X, compacted once into [n, H], and W are read through tensor descriptors (TMA
  on sm_90); one accumulator may hold SUBTILES adjacent tiles (column_halves splits it back), so the
  epilogues, written once per tile, serve both drivers.

Same partition, same K order, same epilogue code: both drivers give the same z, bit for bit.
"""

import torch
import triton
import triton.language as tl

from .config import INTERPRETER_PROGRAMS, input_precision

try:  # host-side tensor descriptors (Triton >= 3.4); config.persistent_config asks before they are used
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


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
def token_block(rows_ptr, pid_m, n_rows, BLOCK_M: tl.constexpr):
    """The pointer driver's token block pid_m: its offsets into the scored rows, their mask, and the rows of X
    they gather (int64: row * stride_x passes 2^31 for N * H > 2^31)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    return offs_m, row_mask, rows


@triton.jit
def raw_tile(
    x_ptr, w_ptr, rows, row_mask, cols, col_mask, hidden_size, stride_x, stride_w,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The pointer driver's K loop: X[rows] @ W[cols]^T in fp32, rows gathered through their indices."""
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
    return acc


@triton.jit
def raw_tile_tma(
    x_desc, w_desc, first_row, first_col, hidden_size,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The descriptor driver's K loop, the same K order: rows [first_row, +BLOCK_M) of the compacted X
    and [first_col, +BLOCK_N) of W, BLOCK_K at a time; the descriptors fill out-of-bounds rows with zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, hidden_size, BLOCK_K):
        x = x_desc.load([first_row, k_start])
        w = w_desc.load([first_col, k_start])
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def column_halves(acc, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BLOCK_M, 2 BLOCK_V] -> its two [BLOCK_M, BLOCK_V] column halves (the tutorial's EPILOGUE_SUBTILE)."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_V)), (0, 2, 1)))


@triton.jit
def finish_logits(acc, b_ptr, cols, col_mask, logit_scale, softcap, inv_temperature,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = transform(acc + b[cols]): the epilogues' first step, whichever driver formed acc."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return transform_logits(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)


def tile_arguments(hidden, weight, bias, rows, targets, transform=None) -> dict:
    """The launch arguments, by name, that every pointer-driver kernel takes: the operands
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


def descriptor_arguments(hidden, weight, bias, rows, targets, transform, cfg: dict, persistent: dict,
                         x_scored=None) -> dict:
    """tile_arguments for the persistent driver: X's scored rows compacted ([n, H], `x_scored` when the
    caller has it already) and W behind tensor descriptors in place of the pointers, rows and strides."""
    args = tile_arguments(hidden, weight, bias, rows, targets, transform)
    for name in ("x_ptr", "w_ptr", "rows_ptr", "stride_x", "stride_w"):
        del args[name]
    x = hidden.index_select(0, rows) if x_scored is None else x_scored
    block_n = cfg["BLOCK_V"] * persistent["SUBTILES"]
    args.update(x_desc=TensorDescriptor.from_tensor(tma_operand(x), [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                w_desc=TensorDescriptor.from_tensor(tma_operand(weight), [block_n, cfg["BLOCK_K"]]))
    return args


def tma_operand(t: torch.Tensor) -> torch.Tensor:
    """t itself when TMA can read it (16-byte aligned base and row stride, unit column stride), else an
    aligned copy: the driver, hence the bits, never depends on where a tensor happens to start."""
    return t if descriptor_ready(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def descriptor_ready(t: torch.Tensor) -> bool:
    """TMA's requirements on a 2-D tensor: unit column stride, 16-byte aligned base and row stride."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def persistent_launch(persistent: dict, n_tiles: int, device: torch.device) -> tuple[tuple, dict]:
    """The persistent driver's grid (one program per SM, fewer when there are fewer tiles) and its
    compile-time switches, NUM_SMS filled in from the device."""
    num_sms = persistent["NUM_SMS"] or (torch.cuda.get_device_properties(device).multi_processor_count
                                        if device.type == "cuda" else INTERPRETER_PROGRAMS)
    return (max(1, min(num_sms, n_tiles)),), dict(persistent, NUM_SMS=num_sms)
