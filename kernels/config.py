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


def forward_config(dtype: torch.dtype, capability: int | None) -> dict:
    if capability is None:
        return _small_tiles()
    # The forward keeps the fp32 logits tile, its exponentials and the running statistics in
    # registers. On Hopper, wgmma holds a 64 x 128 accumulator in 8 warps without spilling; Ampere's
    # mma needs more registers per output, so there the vocab tile is 64. BLOCK_K=64 16-bit columns
    # per MMA step. fp32 operands go through FMA-based dots that need twice the registers: 64 x 64 x 16.
    # (tests/test_compile.py checks every choice for spills and shared memory on sm_80 and sm_90.)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, num_warps=8, num_stages=3)
    block_v = 128 if capability >= 90 else 64
    return dict(BLOCK_M=64, BLOCK_V=block_v, BLOCK_K=64, num_warps=8, num_stages=3)


def backward_config(dtype: torch.dtype, capability: int | None) -> dict:
    if capability is None:
        return dict(_small_tiles(), GROUP_M=4)
    # The backward keeps the d_logits tile alive across a second K loop (fp32 in registers plus a
    # 16-bit copy as an MMA operand) next to the dX and dW partial products, so its tile is 64 x 64,
    # with a K step of 64 on Hopper and 32 on Ampere (more registers per mma output). GROUP_M token
    # blocks walk the vocabulary together so that their W tiles are reused from L2.
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=1)
    block_k = 64 if capability >= 90 else 32
    return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=2)


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
