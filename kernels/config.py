"""Launch configurations: one fixed, checked choice per (dtype, device kind); no autotuning.

One GEMM tile serves both kernels that form logits tiles (the forward's statistics and the
backward's d_logits), so that the backward recomputes exactly the forward's tiles: the same
(token block x vocabulary tile) partition, the same K order, the same bits. The tile depends only on
the dtype and the device, never on pointer alignment or on whether statistics or gradients are
wanted: the policy's and the reference's log-probs come out bitwise identical for the same inputs.
tests/test_compile.py builds every configuration for sm_80 and sm_90 and checks spills, shared
memory, wgmma and the absence of atomics; tools/cost_model.py reads the same functions.
"""

import torch
import triton


def input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: honour torch's TF32 switch so that "fp32" means what the user asked torch for.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def device_capability(device: torch.device) -> int | None:
    """sm version as an int (80, 90, ...), or None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def gemm_config(dtype: torch.dtype, capability: int | None, hidden_size: int | None = None) -> dict:
    """The logits tile: BLOCK_M scored tokens x BLOCK_V vocabulary rows, K loop of BLOCK_K.

    - Interpreter (capability None): 16 x 32 x 16, the smallest tl.dot allows; numpy runs the tiles,
      so small ones keep the tests fast and still cross every mask.
    - 16-bit inputs, hidden size a multiple of 16 (None: assumed so): 128 x 128 x 64 with 8 warps, two
      warpgroups of wgmma m64n128k16 on sm_90 (mma.sync on sm_80); 4 stages on sm_90 (4 x 32 KiB of
      operands in shared memory), 3 on sm_80 (164 KiB). Every loaded element feeds 128 multiply-adds.
    - 16-bit inputs with another hidden size: loads are scalar and cost registers: 64 x 64 x 32.
    - fp32 inputs (FMA, or tf32 MMA): 64 x 64 x 16 with 4 warps and 2 stages; fp32 operands take
      twice the registers of 16-bit ones (K=32, 8 warps or 3 stages spill in some fp32 variant).
    Every choice is the largest that tests/test_compile.py builds without spills for sm_80 and sm_90.
    The tile depends on nothing that differs between a policy and its reference (never on pointer
    alignment): equal inputs give equal bits. GROUP_M token blocks sweep the vocabulary together
    (Triton's grouped matmul order), so a W tile comes from HBM once per group and from L2 after.
    """
    if capability is None:
        return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    if hidden_size is not None and hidden_size % 16:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4 if capability >= 90 else 3)


# The backward's d_logits workspace, [scored tokens, chunk] in the input dtype. 1 GiB holds 32,768
# vocabulary columns of 16,384 bf16 rows (a quarter of Llama 3's vocabulary): chunk GEMMs of
# 16k x 32k x 4k, large enough for cuBLAS to run at full speed, in 4 chunks.
MAX_DEFAULT_WORKSPACE = 1 << 30
INTERPRETER_WORKSPACE = 64 << 20


def default_workspace_bytes(device: torch.device) -> int:
    """1/64 of the device's memory, at most 1 GiB (64 MiB off CUDA).

    Total memory, not free memory: the chunking decides how dX's chunk products are summed, and free
    memory changes from step to step, while the same inputs must give the same bits.
    """
    if device.type != "cuda":
        return INTERPRETER_WORKSPACE
    return min(MAX_DEFAULT_WORKSPACE, torch.cuda.get_device_properties(device).total_memory // 64)


def vocab_chunk_width(n_rows: int, vocab_size: int, element_bytes: int, block_v: int, workspace_bytes: int) -> int:
    """Vocabulary columns per backward chunk: the most whole BLOCK_V tiles whose [n_rows, width]
    d_logits fit in workspace_bytes, at least one tile and at most the (tile-rounded) vocabulary."""
    per_tile = max(1, n_rows) * block_v * element_bytes
    tiles = max(1, workspace_bytes // per_tile)
    return min(tiles, triton.cdiv(vocab_size, block_v)) * block_v
