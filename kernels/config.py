"""Launch configurations: one fixed, checked choice per (dtype, device kind); no autotuning.

Autotuning would rerun kernels that accumulate with atomics (and take minutes under the
interpreter), so each kernel has a default that tests/test_compile.py builds for sm_80 and sm_90
and checks for register spills and shared-memory use.
"""

import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: honour torch's TF32 switch so that "fp32" means what the user asked torch for.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _small_tiles() -> dict:
    # The interpreter runs tiles as numpy arrays: small tiles keep CI fast and still exercise every
    # mask (tl.dot needs every dimension >= 16).
    return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1)


def device_capability(device: torch.device) -> int | None:
    """sm version as an int (80, 90, ...), or None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def is_aligned(hidden_size: int, *tensors: torch.Tensor) -> bool:
    """Whether Triton will specialize the launch as 16-aligned: hidden size and row strides multiples
    of 16 elements and 16-byte aligned data. Then loads vectorize, the K loop is software-pipelined,
    and registers go much further, so the launchers take the larger tiles below."""
    return hidden_size % 16 == 0 and all(
        t.data_ptr() % 16 == 0 and (t.dim() < 2 or t.stride(0) % 16 == 0) for t in tensors
    )


def forward_config(dtype: torch.dtype, capability: int | None, aligned: bool = False) -> dict:
    if capability is None:
        return _small_tiles()
    # The forward keeps the fp32 logits tile, its exponentials and the running statistics in
    # registers; every choice below is the largest that tests/test_compile.py finds free of spills
    # (and within shared memory) on sm_80 and sm_90, with statistics and softcap compiled in.
    # - aligned 16-bit: 128 tokens per block (W is re-read once per token block, so larger blocks
    #   halve the W traffic) x 64 vocab rows, BLOCK_K=64, 3 stages (128 x 128 spills on sm_90 with
    #   Triton 3.6 once the statistics are compiled in).
    # - unaligned 16-bit (odd hidden sizes): scalar loads cost registers, so 64 tokens.
    # - fp32 operands go through FMA-based dots with twice the registers: 64 x 64 x 16, 2 stages.
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, num_warps=8, num_stages=2)
    hopper = capability >= 90
    if aligned:
        return dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_V=128 if hopper else 64, BLOCK_K=64, num_warps=8, num_stages=3)


def backward_config(dtype: torch.dtype, capability: int | None, aligned: bool = False,
                    grad_filter: bool = False) -> dict:
    if capability is None:
        return dict(_small_tiles(), GROUP_M=4)
    # The backward keeps the d_logits tile alive across a second K loop (fp32 in registers plus a
    # 16-bit copy as an MMA operand) next to the dX and dW partial products. Each program adds its
    # dX (BLOCK_M x H) and dW (BLOCK_V x H) contributions with atomics, so the atomic traffic falls
    # as the tile grows: aligned launches take 128 x 128 on Hopper (128 x 64 with the gradient
    # filter, whose branch keeps more values alive) and 128 x 64 on Ampere; unaligned ones 64 x 64.
    # GROUP_M token blocks walk the vocabulary together so that their W tiles are reused from L2.
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=1)
    hopper = capability >= 90
    if aligned:
        if hopper:
            block_v = 64 if grad_filter else 128
            return dict(BLOCK_M=128, BLOCK_V=block_v, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=64 if hopper else 32, GROUP_M=8, num_warps=8, num_stages=2)


def num_vocab_splits(n_rows: int, vocab_size: int, block_m: int, block_v: int, device: torch.device,
                     requested: int | None = None) -> int:
    """How many programs share one token block's vocabulary: enough to fill every SM twice."""
    max_splits = triton.cdiv(vocab_size, block_v)
    if requested is not None:
        return max(1, min(requested, max_splits))
    if device.type != "cuda":
        return 1
    token_blocks = triton.cdiv(n_rows, block_m)
    target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_splits, triton.cdiv(target_programs, token_blocks)))
