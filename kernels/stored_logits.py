"""d_logits from stored tiles: the fused route's elementwise pass (fastdpo.triton_fused).

The forward (kernels/logprob_forward.py with STORE_LOGITS) left each row's tiles in exp space in a
workspace slot [rows, V] of the input dtype: e_iv = exp(z_iv - m_ij), m_ij the row's maximum over the
forward's vocabulary tile j (BLOCK_V columns; the table's m, [tiles, rows]). Once the loss has given
g_i = dL/dlogp_i for the rows, this kernel writes, with lse_i, the target logit t_i and
gap_i = 1 - p_{i,y_i} = sum_{v != y_i} p_iv from the forward,

    p_iv = e_iv exp(m_ij - lse_i)                             (exact but for e's one rounding)
    D_iv = g_i * (-p_iv) * transform'(z_iv)                   v != y_i, z_iv = m_ij + log e_iv
    D_iy = g_i * gap_i * transform'(t_i)                      the target entry, without the
                                                              cancellation of 1 - p_y when p_y -> 1

in the input dtype (fp32 math, one rounding), into `out` [rows, V]: the operand of cuBLAS's dX = D W
and dW += D^T X. `out` may be the slot itself (each element is read and written by the same program,
at the same offsets). transform' needs z only with a softcap; there an e that underflowed to 0 (fp16
below 2^-24) gives p = 0 and D = 0, never log(0).

Why a kernel and not torch ops: per element it reads e and writes D once, 2 + 2 bytes for bf16; m is one
fp32 per row and 128 columns, read from L2. The same formula in torch ops makes at least four full fp32
temporaries (the rescale, the product with g, the transform's factor, the one-hot), each written and read:
about 36 bytes per element, and as much memory again as the slot. At Llama-3-8B (n = 16,384,
V = 128,256) that is 8.4 GB against 76 GB.

One program per (BLOCK_R rows, BLOCK_C columns); every element of `out` has one writer; no atomics.
"""

import triton
import triton.language as tl

from .logits_tile import transform_derivative

# Interpreter: small tiles keep numpy fast. GPU: 8 x 512 elements per program over 8 warps, 16 elements a
# thread (with 4 warps ptxas spills in the sm_80 softcap variants; tests/test_compile.py).
INTERPRETER_BLOCKS = dict(BLOCK_R=16, BLOCK_C=64, num_warps=4)
DEVICE_BLOCKS = dict(BLOCK_R=8, BLOCK_C=512, num_warps=8)


@triton.jit
def stored_logits_grad_kernel(
    slot_ptr, out_ptr, tile_max_ptr, targets_ptr, target_logit_ptr, lse_ptr, grad_ptr, gap_ptr,
    n_rows, vocab_size, stride_slot, stride_out, stride_tile_max,
    logit_scale, softcap, inv_temperature,
    HAS_SOFTCAP: tl.constexpr, TILE_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = offs_r < n_rows
    valid = row_mask[:, None] & (cols < vocab_size)[None, :]
    targets = tl.load(targets_ptr + offs_r, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + offs_r, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + offs_r, mask=row_mask, other=0.0)
    gap = tl.load(gap_ptr + offs_r, mask=row_mask, other=0.0)
    tile_max = tl.load(tile_max_ptr + (cols // TILE_V).to(tl.int64)[None, :] * stride_tile_max + offs_r[:, None],
                       mask=valid, other=0.0)
    offs_r = offs_r.to(tl.int64)[:, None]
    e = tl.load(slot_ptr + offs_r * stride_slot + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    is_target = cols[None, :] == targets[:, None]
    d_soft = tl.where(is_target, gap[:, None], -e * tl.exp(tile_max - lse[:, None]))
    if HAS_SOFTCAP:  # transform' of z: the exact target logit at the target, m + log e elsewhere (e > 0)
        target_logit = tl.load(target_logit_ptr + offs_r, mask=row_mask[:, None], other=0.0)
        z = tl.where(is_target, target_logit, tile_max + tl.log(tl.where(e > 0, e, 1.0)))
        d_soft = tl.where(is_target | (e > 0), d_soft, 0.0)
    else:
        z = e  # transform' is a constant without a softcap
    d_raw = grad[:, None] * d_soft * transform_derivative(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    tl.store(out_ptr + offs_r * stride_out + cols[None, :], d_raw.to(out_ptr.dtype.element_ty), mask=valid)


def stored_logits_grad(slot, out, tile_max, targets, target_logit, lse, grad, gap, *, tile_v: int, transform):
    """Write D (module docstring) for the rows of `slot` ([n, V], exp space) into `out` ([n, V], unit column
    stride; may be `slot`); tile_max fp32 [tiles, n] (unit row stride), the maximum of each tile_v columns;
    targets int64 [n]; target_logit, lse, grad and gap fp32 [n]; transform: a fastdpo.transform.LogitTransform."""
    n_rows, vocab_size = out.shape
    assert slot.stride(1) == 1 and out.stride(1) == 1 and tile_max.stride(1) == 1 and slot.shape[0] >= n_rows
    blocks = dict(INTERPRETER_BLOCKS if slot.device.type != "cuda" else DEVICE_BLOCKS)
    grid = (triton.cdiv(n_rows, blocks["BLOCK_R"]), triton.cdiv(vocab_size, blocks["BLOCK_C"]))
    stored_logits_grad_kernel[grid](
        slot, out, tile_max, targets, target_logit, lse, grad, gap, n_rows, vocab_size, slot.stride(0),
        out.stride(0), tile_max.stride(0),
        float(transform.logit_scale), 1.0 if transform.softcap is None else float(transform.softcap),
        1.0 / float(transform.temperature), HAS_SOFTCAP=transform.softcap is not None, TILE_V=tile_v, **blocks,
    )
