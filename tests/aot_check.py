"""Compile every fastdpo kernel ahead of time for a GPU target, without a GPU, and report resources.

    python tests/aot_check.py 90            # prints one JSON line per kernel configuration
    python tests/aot_check.py 90 --table    # the same as benchmarks/results/compile/resources.txt's lines

Run in a process without TRITON_INTERPRET (the interpreter replaces kernels by Python functions).
For each default launch configuration (kernels/config.py) it reports registers, spills (cuobjdump's
LOCAL), and shared memory against the target's limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triton.backends.nvidia.compiler import get_ptxas

from fastdpo.kernels import config
from fastdpo.kernels.logprob_backward import logits_grad_kernel, logits_grad_tma_kernel
from fastdpo.kernels.logprob_forward import logprob_forward_kernel, logprob_forward_tma_kernel
from fastdpo.kernels.partials_merge import BLOCK_N, merge_partials_kernel
from fastdpo.kernels.stored_logits import DEVICE_BLOCKS, stored_logits_grad_kernel
from fastdpo.kernels.sparse_backward import (
    sparse_dw_kernel,
    sparse_dx_kernel,
    sparse_gemm_options,
    sparse_logits_grad_kernel,
)

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes of dynamic shared memory per block (opt-in max)
SM_COUNT = {80: 108, 90: 132}  # A100, H100/H200: the persistent driver's NUM_SMS
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# What Triton's launcher specializes on when the hidden size and row strides are multiples of 16 and
# the tensors are 16-byte aligned (the common case): loads vectorize and the K loop is pipelined.
# Hidden sizes off the 16-multiple get their own, smaller tile (config.gemm_config).
ALIGNED_ARGS = ("x_ptr", "w_ptr", "b_ptr", "out_ptr", "d_ptr", "dx_ptr", "dw_ptr", "hidden_size", "stride_x",
                "stride_w", "stride_out", "stride_dx", "stride_dw", "slot_ptr", "stride_slot")


def _attrs(kernel, aligned: bool) -> dict:
    if not aligned:
        return {}
    names = kernel.arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED_ARGS if n in names}


def _signature(kernel, types: dict, constexprs: dict) -> dict:
    names = kernel.arg_names
    return {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in names}


def _launch_options(cfg: dict) -> tuple[dict, dict]:
    options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in options}, options


def _operand_types(t: str) -> dict:
    return {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "rows_ptr": "*i64", "targets_ptr": "*i64",
            "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32"}


def gemm_driver(kernels, dtype, capability: int, hidden_size: int, t: str, widest_epilogue: bool = False):
    """The default driver of a dense GEMM kernel family (config.persistent_config), its block sizes,
    launch options, operand types and a name suffix: the persistent TMA kernel where config picks it
    (descriptors in place of X/W pointers, rows and strides), else the pointer kernel."""
    pointer_kernel, tma_kernel = kernels
    blocks, options = _launch_options(config.gemm_config(dtype, capability, hidden_size))
    persistent = config.persistent_config(dtype, capability, hidden_size, widest_epilogue=widest_epilogue)
    if persistent is None:
        return pointer_kernel, blocks, options, _operand_types(t), ""
    tma_blocks, tma_options = _launch_options(dict(persistent, NUM_SMS=SM_COUNT[capability]))
    types = dict(_operand_types(t), x_desc=f"tensordesc<{t}[{blocks['BLOCK_M']},{blocks['BLOCK_K']}]>",
                 w_desc=f"tensordesc<{t}[{blocks['BLOCK_V'] * persistent['SUBTILES']},{blocks['BLOCK_K']}]>")
    return tma_kernel, dict(blocks, **tma_blocks), dict(options, **tma_options), types, f" tma{persistent['SUBTILES']}"


def forward_variants(capability: int, hidden_size: int):
    for dtype, t in TRITON_TYPES.items():
        for store in (False, True):  # STORE_LOGITS: the fused route's forward (exp(z - m) into a workspace slot)
            for with_stats in (False, True):
                for softcap in (False, True):
                    kernel, blocks, options, operands, driver = gemm_driver(
                        (logprob_forward_kernel, logprob_forward_tma_kernel), dtype, capability, hidden_size, t,
                        widest_epilogue=store and with_stats and softcap)
                    # the slot in the input dtype: the tiles in exp space (fastdpo.triton_fused)
                    types = dict(operands, table_ptr="*fp32", target_logit_ptr="*fp32", slot_ptr=f"*{t}",
                                 excl_ptr="*fp32")
                    constexprs = dict(blocks, HAS_BIAS=True, HAS_SOFTCAP=softcap, WITH_STATS=with_stats,
                                      STORE_LOGITS=store, INPUT_PRECISION=config.input_precision(dtype))
                    if driver:  # the slot behind a descriptor too (triton_fused pads its rows to 16 bytes)
                        types["slot_ptr"] = f"tensordesc<{t}[{blocks['BLOCK_M']},{blocks['BLOCK_V']}]>"
                        constexprs["SLOT_DESCRIPTOR"] = True
                    name = f"forward {t} stats={with_stats} softcap={softcap}" + (" store" if store else "") + driver
                    yield kernel, types, constexprs, options, name


def backward_variants(capability: int, hidden_size: int):
    for dtype, t in TRITON_TYPES.items():
        kernel, blocks, options, operands, driver = gemm_driver(
            (logits_grad_kernel, logits_grad_tma_kernel), dtype, capability, hidden_size, t)
        for softcap in (False, True):
            types = dict(operands, lse_ptr="*fp32", grad_ptr="*fp32", out_ptr=f"*{t}")
            constexprs = dict(blocks, HAS_BIAS=True, HAS_SOFTCAP=softcap, INPUT_PRECISION=config.input_precision(dtype))
            yield kernel, types, constexprs, options, f"logits_grad {t} softcap={softcap}{driver}"


def stored_logits_variants(capability: int, hidden_size: int):
    """The fused route's elementwise d_logits from a slot of exp-space tiles in the input dtype (no matrix product)."""
    blocks, options = _launch_options(DEVICE_BLOCKS)
    for dtype, t in TRITON_TYPES.items():
        tile_v = config.gemm_config(dtype, capability, hidden_size)["BLOCK_V"]
        for softcap in (False, True):
            types = {"slot_ptr": f"*{t}", "out_ptr": f"*{t}", "tile_max_ptr": "*fp32", "targets_ptr": "*i64",
                     "target_logit_ptr": "*fp32", "lse_ptr": "*fp32", "grad_ptr": "*fp32", "gap_ptr": "*fp32",
                     "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32"}
            yield (stored_logits_grad_kernel, types, dict(blocks, HAS_SOFTCAP=softcap, TILE_V=tile_v), options,
                   f"stored_logits_grad {t} softcap={softcap}")


def merge_variants(capability: int, hidden_size: int):
    """The forward table's merge over the vocabulary tiles, row by row (fp32 tables whatever the input dtype)."""
    for with_stats in (False, True):
        for with_gap in (False, True):  # 1 - p_y too: the fused route's blocks
            types = {"table_ptr": "*fp32", "excl_ptr": "*fp32", "out_ptr": "*fp32", "gap_ptr": "*fp32"}
            yield (merge_partials_kernel, types, dict(WITH_STATS=with_stats, WITH_GAP=with_gap, BLOCK_N=BLOCK_N),
                   dict(num_warps=4), f"partials_merge stats={with_stats} gap={with_gap}")


def sparse_variants(capability: int, hidden_size: int):
    """The block-sparse backward (grad_tolerance > 0): d_logits over a work list, dX and dW GEMMs."""
    for dtype, t in TRITON_TYPES.items():
        cfg, gemm_tiles = sparse_gemm_options(dtype, capability, hidden_size)
        options = {k: cfg[k] for k in ("num_warps", "num_stages")}
        precision = config.input_precision(dtype)
        for softcap in (False, True):
            types = dict(_operand_types(t), lse_ptr="*fp32", grad_ptr="*fp32", pair_block_ptr="*i32",
                         pair_tile_ptr="*i32", out_ptr=f"*{t}")
            constexprs = dict(HAS_BIAS=True, HAS_SOFTCAP=softcap, BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"],
                              BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=precision)
            yield sparse_logits_grad_kernel, types, constexprs, options, f"sparse_logits_grad {t} softcap={softcap}"
        tiles, options = _launch_options(gemm_tiles)
        tiles["INPUT_PRECISION"] = precision
        for accumulate in (False, True):
            types = {"d_ptr": f"*{t}", "w_ptr": f"*{t}", "block_start_ptr": "*i32", "pair_tile_ptr": "*i32",
                     "dx_ptr": "*fp32"}
            yield (sparse_dx_kernel, types, dict(tiles, ACCUMULATE=accumulate), options,
                   f"sparse_dx {t} accumulate={accumulate}")
        for compute_dw, compute_db in ((True, True), (True, False), (False, True)):
            types = {"d_ptr": f"*{t}", "x_ptr": f"*{t}", "rows_ptr": "*i64", "tile_start_ptr": "*i32",
                     "pair_block_ptr": "*i32", "pair_slot_ptr": "*i32", "dw_ptr": f"*{t}", "db_ptr": "*fp32"}
            yield (sparse_dw_kernel, types, dict(tiles, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db), options,
                   f"sparse_dw {t} dW={compute_dw} db={compute_db}")


# Loads the software pipeliner issues ahead of their use: cp.async copies, TMA copies (descriptor loads).
PIPELINED_LOADS = ("async_copy_global_to_local", "async_tma_copy_global_to_local")


def _resources(ptx: str, capability: int) -> dict:
    """ptxas's own account: registers, stack frame and spill stores/loads (cuobjdump shows no spills)."""
    ptxas = get_ptxas(capability).path  # the ptxas Triton itself used for this target
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        text = subprocess.run([ptxas, "-v", f"-arch={arch}", path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True).stderr
    used = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(registers=int(used.group(1)), stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)))


def compile_all(capability: int):
    target = GPUTarget("cuda", capability, 32)
    for aligned in (True, False):
        # The unaligned launches are those of hidden sizes off the 16-multiple (config picks their tile).
        hidden_size = 4096 if aligned else 4095
        variants = (*forward_variants(capability, hidden_size), *backward_variants(capability, hidden_size),
                    *sparse_variants(capability, hidden_size), *stored_logits_variants(capability, hidden_size),
                    *merge_variants(capability, hidden_size))
        for kernel, types, constexprs, options, name in variants:
            src = ASTSource(fn=kernel, signature=_signature(kernel, types, constexprs), constexprs=constexprs,
                            attrs=_attrs(kernel, aligned))
            compiled = triton.compile(src, target=target, options=options)
            ptx = compiled.asm["ptx"]
            res = _resources(ptx, capability)
            yield dict(name=f"{name} {'aligned' if aligned else 'unaligned'}", capability=capability, **res,
                       shared=compiled.metadata.shared, shared_limit=SHARED_MEMORY_LIMIT[capability],
                       wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx,
                       pipelined=any(op in compiled.asm["ttgir"] for op in PIPELINED_LOADS),
                       atomics=sorted(set(re.findall(r"\b(?:atom|red)\.[\w.]+", ptx))))


def table_line(row: dict) -> str:
    flags = " ".join(flag if row[flag] else "-" for flag in ("wgmma", "tma", "pipelined"))
    return (f"{row['capability']} {row['name']} regs {row['registers']} spills {row['spill_stores']} "
            f"smem {row['shared']} {flags} atomics {' '.join(row['atomics']) or 'none'}")


if __name__ == "__main__":
    for row in compile_all(int(sys.argv[1])):
        print(table_line(row) if "--table" in sys.argv[2:] else json.dumps(row), flush=True)
