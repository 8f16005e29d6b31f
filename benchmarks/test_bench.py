"""pytest-benchmark over the quick cases, for tracking over time: `pytest benchmarks --benchmark-only`.

Same inputs, adapters and loss as run.py, measured in-process (no memory figures: use run.py for those).
Each test also checks the implementation against the float64 reference, so a fast wrong kernel fails.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import impls, inputs, measure, worker

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = inputs.case_set(DEVICE, quick=True)
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def prepared(request):
    case = request.param
    saved = inputs.make_inputs(case, DEVICE)
    return case, saved, measure.reference_fp64(saved, case.softcap, inputs.BETA)


@pytest.mark.parametrize("name", list(impls.IMPLS))
def test_forward_backward(benchmark, prepared, name):
    case, saved, ref = prepared
    inp = worker.leaf_inputs(saved)
    try:
        run, note = impls.IMPLS[name](inp, case)
    except measure.Skip as exc:
        pytest.skip(str(exc))
    h, w = inp["hidden"], inp["weight"]
    loss = measure.step(run, h, w)  # warm-up (compilation, autotuning) and the gradients to check
    errs = measure.errors(loss, h.grad, w.grad, ref)

    def one_step():
        measure.step(run, h, w)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(case=case.name, tokens=case.tokens, hidden=case.hidden, vocab=case.vocab,
                                dtype=case.dtype, note=note, rel_err=max(errs.values()))
    benchmark.pedantic(one_step, rounds=3 if DEVICE == "cpu" else 20, iterations=1)
    assert max(errs.values()) < TOLERANCE[case.dtype], errs
