"""The kernels build ahead of time for sm_80 and sm_90 without a GPU, in every default configuration:
no register spills, shared memory within one block's limit, wgmma for 16-bit inputs on Hopper, TMA
(`cp.async.bulk.tensor`) in Hopper's 16-bit dense GEMM kernels (the persistent driver of
kernels/config.persistent_config), and no atomic instruction at all (every output element has one writer)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

AOT_SCRIPT = Path(__file__).with_name("aot_check.py")


@pytest.fixture(scope="module", params=[80, 90], ids=["sm80", "sm90"])
def compiled(request):
    # A fresh process without TRITON_INTERPRET: the interpreter replaces kernels by Python functions.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # This checkout's fastdpo, not whichever one is installed (the script's own folder is tests/).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(AOT_SCRIPT.parent.parent), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, str(AOT_SCRIPT), str(request.param)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return request.param, rows


def test_every_variant_compiles(compiled):
    capability, rows = compiled
    names = {row["name"].split()[0] for row in rows}
    assert names == {"forward", "logits_grad", "sparse_logits_grad", "sparse_dx", "sparse_dw", "stored_logits_grad",
                     "partials_merge"}
    assert len(rows) == 2 * (24 + 6 + 21 + 6 + 4)  # aligned and unaligned launches
    stored = [row for row in rows if " store" in row["name"] and row["name"].endswith(" aligned")]
    assert len(stored) == 12  # the fused route's forward


def test_no_atomics(compiled):
    _, rows = compiled
    atomic = [(r["name"], r["atomics"]) for r in rows if r["atomics"]]
    assert not atomic, f"kernels use atomic instructions: {atomic}"


def test_no_register_spills(compiled):
    _, rows = compiled
    spilling = [(r["name"], r["spill_stores"], r["registers"]) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"kernels spill registers: {spilling}"


def test_shared_memory_within_limit(compiled):
    _, rows = compiled
    over = [(r["name"], r["shared"], r["shared_limit"]) for r in rows if r["shared"] > r["shared_limit"]]
    assert not over, over


def has_matrix_product(row) -> bool:
    # the bias-only sparse_dw variant, the elementwise stored_logits_grad and the table's merge have none
    return "dW=False" not in row["name"] and not row["name"].startswith(("stored_logits_grad", "partials_merge"))


def test_aligned_16bit_launches_are_software_pipelined(compiled):
    _, rows = compiled
    aligned = [r for r in rows if r["name"].endswith(" aligned") and ("bf16" in r["name"] or "fp16" in r["name"])
               and has_matrix_product(r)]
    assert aligned and all(r["pipelined"] for r in aligned), [r["name"] for r in aligned if not r["pipelined"]]


def test_hopper_uses_wgmma_for_16bit_inputs(compiled):
    capability, rows = compiled
    if capability != 90:
        pytest.skip("wgmma is a Hopper instruction")
    sixteen_bit = [r for r in rows if ("bf16" in r["name"] or "fp16" in r["name"]) and has_matrix_product(r)]
    assert sixteen_bit and all(r["wgmma"] for r in sixteen_bit)


def test_hopper_dense_16bit_kernels_read_through_tma(compiled):
    """The forward (every epilogue, the fused route's STORE_LOGITS included) and the d_logits recompute
    take the persistent descriptor driver for aligned 16-bit inputs on sm_90, the pointer driver elsewhere."""
    capability, rows = compiled
    dense = [r for r in rows if r["name"].split()[0] in ("forward", "logits_grad") and r["name"].endswith(" aligned")
             and ("bf16" in r["name"] or "fp16" in r["name"])]
    assert len(dense) == 2 * (8 + 2)
    if capability == 90:
        assert all(r["tma"] and " tma" in r["name"] for r in dense), [r["name"] for r in dense if not r["tma"]]
        assert sum(" tma2" in r["name"] for r in dense) == len(dense) - 2  # 128 x 256 but the widest epilogue
    else:
        assert not any(r["tma"] for r in dense)
