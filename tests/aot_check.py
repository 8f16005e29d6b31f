"""Compile every fastdpo kernel ahead of time for a GPU target, without a GPU, and report resources.

    python tests/aot_check.py 90      # prints one JSON line per kernel configuration

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
from fastdpo.kernels.logprob_backward import logprob_backward_kernel
from fastdpo.kernels.logprob_forward import logprob_forward_kernel

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes of dynamic shared memory per block (opt-in max)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# What Triton's launcher specializes on when the hidden size and row strides are multiples of 16 and
# the tensors are 16-byte aligned (the common case): the launchers then pick the larger "aligned"
# configuration, whose loads vectorize and whose K loop is software-pipelined.
ALIGNED_ARGS = ("x_ptr", "w_ptr", "b_ptr", "dx_ptr", "dw_ptr", "hidden_size", "stride_x", "stride_w", "stride_dx",
                "stride_dw")


def _attrs(kernel, aligned: bool) -> dict:
    if not aligned:
        return {}
    names = kernel.arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED_ARGS if n in names}


def _signature(kernel, types: dict, constexprs: dict) -> dict:
    names = kernel.arg_names
    return {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in names}


def _launch_options(cfg: dict) -> tuple[dict, dict]:
    options = {k: cfg[k] for k in ("num_warps", "num_stages")}
    return {k: v for k, v in cfg.items() if k not in options}, options


def forward_variants(capability: int, aligned: bool):
    for dtype in TRITON_TYPES:
        for with_stats in (False, True):
            for softcap in (False, True):
                cfg = config.forward_config(dtype, capability, aligned)
                blocks, options = _launch_options(cfg)
                t = TRITON_TYPES[dtype]
                types = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "rows_ptr": "*i64",
                         "targets_ptr": "*i64", "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32",
                         **{p: "*fp32" for p in ("max_ptr", "sum_exp_ptr", "target_logit_ptr", "z_sum_exp_ptr",
                                                 "sq_sum_exp_ptr", "z_sum_ptr", "max_before_ptr")}}
                constexprs = dict(blocks, HAS_BIAS=True, HAS_SOFTCAP=softcap, WITH_STATS=with_stats,
                                  INPUT_PRECISION=config.input_precision(dtype))
                name = f"forward {t} stats={with_stats} softcap={softcap}"
                yield logprob_forward_kernel, types, constexprs, options, name


def backward_variants(capability: int, aligned: bool):
    for dtype in TRITON_TYPES:
        for compute_dw, grad_filter in ((False, False), (True, False), (True, True)):
            cfg = config.backward_config(dtype, capability, aligned, grad_filter)
            blocks, options = _launch_options(cfg)
            t = TRITON_TYPES[dtype]
            types = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "rows_ptr": "*i64", "targets_ptr": "*i64",
                     "lse_ptr": "*fp32", "grad_ptr": "*fp32", "dx_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32",
                     "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32", "filter_eps": "fp32"}
            constexprs = dict(blocks, HAS_BIAS=True, HAS_SOFTCAP=True, FILTER=grad_filter, COMPUTE_DX=True,
                              COMPUTE_DW=compute_dw, COMPUTE_DB=True, INPUT_PRECISION=config.input_precision(dtype))
            name = f"backward {t} dW={compute_dw} filter={grad_filter}"
            yield logprob_backward_kernel, types, constexprs, options, name


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
        variants = (*forward_variants(capability, aligned), *backward_variants(capability, aligned))
        for kernel, types, constexprs, options, name in variants:
            src = ASTSource(fn=kernel, signature=_signature(kernel, types, constexprs), constexprs=constexprs,
                            attrs=_attrs(kernel, aligned))
            compiled = triton.compile(src, target=target, options=options)
            res = _resources(compiled.asm["ptx"], capability)
            ttgir = compiled.asm["ttgir"]
            yield dict(name=f"{name} {'aligned' if aligned else 'unaligned'}", capability=capability, **res,
                       shared=compiled.metadata.shared, shared_limit=SHARED_MEMORY_LIMIT[capability],
                       wgmma="wgmma" in compiled.asm["ptx"], pipelined="async_copy_global_to_local" in ttgir)


if __name__ == "__main__":
    for row in compile_all(int(sys.argv[1])):
        print(json.dumps(row), flush=True)
