"""Launch configurations: one fixed, checked choice per (dtype, device kind); no autotuning.

One GEMM tile serves both kernels that form logits tiles (the forward's statistics and the
backward's d_logits), so that the backward recomputes exactly the forward's tiles: the same
(token block x vocabulary tile) partition, the same K order, the same bits. The tile depends only on
the dtype and the device, never on pointer alignment or on whether statistics or gradients are
wanted: the policy's and the reference's log-probs come out bitwise identical for the same inputs.
tests/test_compile.py builds every configuration for sm_80 and sm_90 and checks spills, shared
memory, wgmma and the absence of atomics; tools/cost_model.py reads the same functions.
"""

import importlib.util
import os

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
    On sm_90 the 16-bit aligned tiles run in persistent_config's driver, two tiles per accumulator.
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


# The one switch between the two GEMM drivers of the dense kernels (forward, d_logits recompute):
# FASTDPO_PERSISTENT_TMA=0 runs the one-program-per-tile pointer kernels everywhere, so that a GPU run
# can time both drivers on the same inputs; by default persistent_config decides.
PERSISTENT_TMA = os.environ.get("FASTDPO_PERSISTENT_TMA", "1") != "0"
HAS_TENSOR_DESCRIPTORS = importlib.util.find_spec("triton.tools.tensor_descriptor") is not None
# The persistent driver's programs on CPU tensors (the interpreter, or a GPU configuration borrowed by a
# test there): a few, so that each loops over several tiles.
INTERPRETER_PROGRAMS = 3


def persistent_config(dtype: torch.dtype, capability: int | None, hidden_size: int | None = None, *,
                      widest_epilogue: bool = False) -> dict | None:
    """The persistent, descriptor-fed driver of gemm_config's tile, or None where the pointer kernels run.

    It reads the scored rows of X compacted into a contiguous [n, H] buffer and W through tensor
    descriptors (TMA on sm_90: `cp.async.bulk.tensor`, no address arithmetic in registers), runs
    NUM_SMS programs that claim GEMM tiles in grouped order (the tutorial's persistent matmul), and
    computes SUBTILES adjacent BLOCK_V tiles per K loop: BLOCK_M x (SUBTILES x BLOCK_V) in one
    accumulator, then the epilogue tile by tile (column halves, tl.split), so each BLOCK_V tile gets
    exactly the epilogue, the table entries and the d_logits it gets from the pointer driver.
    - sm_90, 16-bit, hidden size a multiple of 16: 128 x 256 x 64 (SUBTILES = 2) with 8 warps, two
      warpgroups of wgmma m64n256k16 (Liger's Hopper tile); 3 stages of 48 KiB (128 + 256
      rows x 64 x 2 B; a 4th, 192 KiB, leaves no room for STORE_LOGITS's 64 KiB staging of z). Each loaded X
      element feeds 256 multiply-adds, each W element 128: a quarter fewer operand bytes per FLOP than
      128 x 128. FLATTEN: the tile loop and the K loop are pipelined as one, so the next tile's first
      loads are in flight during this tile's epilogue (unflattened, more variants spill).
    - Interpreter, 16-bit: gemm_config's 16 x 32 tile, SUBTILES = 2, 3 programs, so that the tests run
      the persistent loop, both column halves and the half past the vocabulary's end (descriptors run
      in the interpreter).
    - widest_epilogue (the forward with STORE_LOGITS, statistics and a softcap) on sm_90: SUBTILES = 1,
      128 x 128: its epilogue beside the second half's accumulator spills 16 bytes (tests/aot_check.py).
    - sm_80 (no TMA), fp32, other hidden sizes: None.
    The partition into BLOCK_M x BLOCK_V tiles, the K order and the epilogue are the pointer driver's:
    only who loads the operands and how many tiles one accumulator holds change. Each logit is the same
    K-ordered chain of k16 MMA steps whatever the accumulator's width, so every variant and both drivers
    give the same z (equal bits in the interpreter's tests; FASTDPO_PERSISTENT_TMA=0 runs the pointer
    driver on a GPU for the same comparison).
    """
    if not (PERSISTENT_TMA and HAS_TENSOR_DESCRIPTORS) or dtype == torch.float32 or (hidden_size or 0) % 16:
        return None
    if capability is None:
        return dict(SUBTILES=2, NUM_SMS=INTERPRETER_PROGRAMS, FLATTEN=False)
    if capability < 90:
        return None
    return dict(SUBTILES=1 if widest_epilogue else 2, NUM_SMS=None, FLATTEN=True, num_warps=8, num_stages=3)


# The two-pass backward's d_logits workspace, [n scored rows, C columns] in the input dtype, sized by
# arithmetic rather than as a share of the device's memory. Per chunk of C vocabulary columns the backward
# runs three GEMMs: the recompute [n, C] (K = H), dX [n, H] += D W_c (K = C) and dW_c [C, H] = D^T X (K = n).
# dX's output does not depend on C; the recompute's and dW's outputs do, and a GEMM runs at its large-size
# speed once its output fills a few waves of tiles: 2^24 elements are 512 cuBLAS tiles of 128 x 256, 3.9
# waves on a 132-SM H100/H200 (two or more on any GPU of up to 256 SMs), where the last partial wave and the
# launch's ramp cost a few percent (a model; tools/cost_model.py puts it beside the GPU measurements). So
# C is the smallest whole number of BLOCK_V tiles with C * min(n, H) >= 2^24: ~4k columns at H = 4096, 8k at
# H = 2048, and never more than the vocabulary. The workspace is then n * C * element bytes: 78 MiB for
# 10,000 bf16 rows at H = 4096, about 32 MiB (2^24 bf16 values) whenever n <= H. It depends on the
# shapes, the dtype and the device kind (through BLOCK_V) alone, never on free memory: the chunking
# decides how dX's chunk products are summed, and the same inputs must give the same bits.
MIN_CHUNK_GEMM_OUTPUT = 1 << 24


def default_chunk_width(n_rows: int, vocab_size: int, hidden_size: int, block_v: int) -> int:
    """The default chunk: the fewest whole BLOCK_V tiles whose recompute and dW GEMMs each write at least
    MIN_CHUNK_GEMM_OUTPUT elements (C * min(n, H) >= 2^24), at most the (tile-rounded) vocabulary."""
    columns = triton.cdiv(MIN_CHUNK_GEMM_OUTPUT, max(1, min(n_rows, hidden_size)))
    return min(triton.cdiv(columns, block_v), triton.cdiv(vocab_size, block_v)) * block_v


def default_workspace_bytes(device: torch.device, n_rows: int, vocab_size: int, hidden_size: int,
                            dtype: torch.dtype) -> int:
    """The workspace of default_chunk_width: n * C * element bytes (see MIN_CHUNK_GEMM_OUTPUT)."""
    block_v = gemm_config(dtype, device_capability(device), hidden_size)["BLOCK_V"]
    width = default_chunk_width(n_rows, vocab_size, hidden_size, block_v)
    return max(1, n_rows) * width * dtype.itemsize


def vocab_chunk_width(n_rows: int, vocab_size: int, element_bytes: int, block_v: int, workspace_bytes: int) -> int:
    """Vocabulary columns per backward chunk: the most whole BLOCK_V tiles whose [n_rows, width]
    d_logits fit in workspace_bytes, at least one tile and at most the (tile-rounded) vocabulary."""
    per_tile = max(1, n_rows) * block_v * element_bytes
    tiles = max(1, workspace_bytes // per_tile)
    return min(tiles, triton.cdiv(vocab_size, block_v)) * block_v
