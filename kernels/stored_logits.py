"""d_logits from stored logits: the fused route's elementwise pass (fastdpo.triton_fused).

The forward (kernels/logprob_forward.py with STORE_LOGITS) left each row's z (after the transform) in a
workspace slot, fp32 [rows, V]. Once the loss has given g_i = dL/dlogp_i for the rows, this kernel
writes, with lse_i and gap_i = 1 - p_{i,y_i} = sum_{v != y_i} p_iv from the forward,

    D_iv = g_i * (-exp(z_iv - lse_i)) * transform'(z_iv)       v != y_i
    D_iy = g_i * gap_i * transform'(z_iy)                       the target entry, without the
                                                                cancellation of 1 - p_y when p_y -> 1

in the input dtype (fp32 math, one rounding), into `out` [rows, V]: the operand of cuBLAS's dX = D W
and dW += D^T X. For fp32 inputs `out` may be the slot itself (each element is read and written by
the same program, at the same offsets).

Why a kernel and not torch ops: per element it reads z (4 bytes) and writes D once (2 bytes for bf16):
6 bytes. The same formula in torch ops makes at least four full fp32 temporaries (z - lse, exp, the
product with g, the transform's factor), each written and read: about 36 bytes per element, and as
much memory again as the slot. At Llama-3-8B (n = 16,384, V = 128,256) that is 12.6 GB against 76 GB.

One program per (BLOCK_R rows, BLOCK_C columns); every element of `out` has one writer; no atomics.
"""

import triton
import triton.language as tl

from .logits_tile import transform_derivative

# Interpreter: small tiles keep numpy fast. GPU: 8 x 512 fp32 per program (16 KiB of z) over 8 warps, 16
# elements a thread (with 4 warps ptxas spills in the sm_80 softcap variants; tests/test_compile.py).
INTERPRETER_BLOCKS = dict(BLOCK_R=16, BLOCK_C=64, num_warps=4)
DEVICE_BLOCKS = dict(BLOCK_R=8, BLOCK_C=512, num_warps=8)


@triton.jit
def stored_logits_grad_kernel(
    slot_ptr, out_ptr, targets_ptr, lse_ptr, grad_ptr, gap_ptr,
    n_rows, vocab_size, stride_slot, stride_out,
    logit_scale, softcap, inv_temperature,
    HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = offs_r < n_rows
    valid = row_mask[:, None] & (cols < vocab_size)[None, :]
    targets = tl.load(targets_ptr + offs_r, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + offs_r, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + offs_r, mask=row_mask, other=0.0)
    gap = tl.load(gap_ptr + offs_r, mask=row_mask, other=0.0)
    offs_r = offs_r.to(tl.int64)[:, None]
    z = tl.load(slot_ptr + offs_r * stride_slot + cols[None, :], mask=valid, other=0.0)
    d_soft = tl.where(cols[None, :] == targets[:, None], gap[:, None], -tl.exp(z - lse[:, None]))
    d_raw = grad[:, None] * d_soft * transform_derivative(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    tl.store(out_ptr + offs_r * stride_out + cols[None, :], d_raw.to(out_ptr.dtype.element_ty), mask=valid)


def stored_logits_grad(slot, out, targets, lse, grad, gap, *, transform):
    """Write D (module docstring) for the rows of `slot` ([n, V] fp32) into `out` ([n, V], unit column
    stride); targets int64 [n], lse, grad and gap fp32 [n]; transform: a fastdpo.transform.LogitTransform."""
    n_rows, vocab_size = out.shape
    assert slot.stride(1) == 1 and out.stride(1) == 1 and slot.shape[0] >= n_rows
    blocks = dict(INTERPRETER_BLOCKS if slot.device.type != "cuda" else DEVICE_BLOCKS)
    grid = (triton.cdiv(n_rows, blocks["BLOCK_R"]), triton.cdiv(vocab_size, blocks["BLOCK_C"]))
    stored_logits_grad_kernel[grid](
        slot, out, targets, lse, grad, gap, n_rows, vocab_size, slot.stride(0), out.stride(0),
        float(transform.logit_scale), 1.0 if transform.softcap is None else float(transform.softcap),
        1.0 / float(transform.temperature), HAS_SOFTCAP=transform.softcap is not None, **blocks,
    )
