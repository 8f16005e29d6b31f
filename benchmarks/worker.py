"""Subprocess side of the runner (run.py starts these; not meant to be called by hand).

    python -m benchmarks.worker prep  --case NAME --device D --dir TMP
        build the case's inputs and float64 reference once, save them under TMP/NAME/, print @@INFO {json}
    python -m benchmarks.worker bench --case NAME --device D --dir TMP --impls a,b [--quick]
        load them, measure each implementation in turn: @@START name, @@STEP {json} after each step, then @@ROW {json}

Measuring in a subprocess keeps one implementation's memory (and crashes) out of another's numbers: on CPU the
peak RSS of a process is the only honest memory figure, so there each implementation gets its own process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import impls as impls_mod
from . import inputs as inputs_mod
from . import measure
from .measure import Skip

TAG_INFO, TAG_START, TAG_STEP, TAG_ROW = "@@INFO ", "@@START ", "@@STEP ", "@@ROW "

# Timed runs per implementation on CPU: (min, max, budget in seconds). At least 3 for a spread, unless one step
# alone takes longer than the budget (then 1). With 5 s the default set's 12 rows fit in 5 minutes on 2 idle
# cores: the slowest row (F.linear_cross_entropy at V=65,536, 25 s a step) costs warm-up + 1 run + memory step.
CPU_RUNS = {True: (3, 5, 5.0), False: (3, 3, 30.0)}


def emit(tag: str, payload) -> None:
    print(tag + (payload if isinstance(payload, str) else json.dumps(payload)), flush=True)


def base_row(impl: str, case: inputs_mod.Case) -> dict:
    return {"impl": impl, "case": case.name, "tokens": case.tokens, "hidden": case.hidden, "vocab": case.vocab,
            "dtype": case.dtype, "ms": None, "ms_min": None, "ms_max": None, "runs": None, "peak_mem_bytes": None,
            "rel_err": None, "status": "error: not run"}


def leaf_inputs(saved: dict, frozen_head: bool = False) -> dict:
    """Fresh leaf tensors for one implementation (gradients must not leak from one to the next); a frozen head's
    weight does not require grad."""
    return {
        "hidden": saved["hidden"].detach().clone().requires_grad_(True),
        "weight": saved["weight"].detach().clone().requires_grad_(not frozen_head),
        "labels": saved["labels"],
        "targets": inputs_mod.shifted_targets(saved["labels"]),
        "ref_chosen_logps": saved["ref_chosen_logps"],
        "ref_rejected_logps": saved["ref_rejected_logps"],
    }


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def bench_impl(name: str, make, saved: dict, case, ref: dict, device: str, quick: bool = False,
               on_step=None) -> dict:
    """Measure one implementation; never raises (a failure becomes the row's status).

    on_step(done, planned, what) reports progress: after the warm-up and after each timed run (CPU only).
    """
    row = base_row(name, case)
    inp = None
    report = on_step or (lambda done, planned, what: None)
    try:
        inp = leaf_inputs(saved, case.frozen_head)
        run, row["note"] = make(inp, case)
        h, w = inp["hidden"], inp["weight"]
        t0 = time.perf_counter()
        loss = measure.step(run, h, w)  # warm-up: compiles/autotunes; its gradients are the ones checked
        report(0, None, f"warm-up {time.perf_counter() - t0:.1f} s")
        errs = measure.errors(loss, h.grad, w.grad, ref, frozen_head=case.frozen_head)
        h.grad = w.grad = None
        del loss
        if not all(math.isfinite(e) for e in errs.values()):
            row["status"] = "error: non-finite loss or gradients"
            return row
        row["rel_err_parts"] = errs
        row["rel_err"] = max(errs.values())
        if device == "cuda":
            row["peak_mem_bytes"] = measure.cuda_peak_bytes(run, h, w)
            times = measure.cuda_times_ms(run, h, w)
        else:
            min_runs, max_runs, budget_s = CPU_RUNS[quick]
            times, row["peak_mem_bytes"] = measure.cpu_measure(
                run, h, w, max_runs=max_runs, budget_s=budget_s, min_runs=min_runs,
                on_step=lambda done, planned, ms: report(done, planned, f"run {done}/{planned}: {ms:,.0f} ms"))
        row.update(measure.spread(times))
        row["status"] = "ok"
    except Skip as exc:
        row["status"] = f"skipped: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure of a peer is a result, not a crash of the run
        row["status"] = "error: " + ("out of memory" if "out of memory" in str(exc).lower() else _describe(exc))
        row.update(ms=None, ms_min=None, ms_max=None, runs=None, peak_mem_bytes=None)
    finally:
        del inp
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def cpu_name() -> str:
    import os

    model = "unknown model"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads)"


# --- subcommands ------------------------------------------------------------------------------------------------


def prep(case, device: str, case_dir: Path) -> dict:
    t0 = time.perf_counter()
    saved = inputs_mod.build_inputs(case, device)
    stats = inputs_mod.input_stats(saved, case.softcap)
    # The share of the backward fastdpo_tol computes on these inputs (the same for every implementation)
    stats["kept_fraction"] = measure.kept_fraction(saved["hidden"], saved["weight"], saved["labels"], case.softcap)
    stats["grad_tolerance"] = measure.SPARSE_TOLERANCE
    # Bigger float64 chunks on a GPU (fewer, larger GEMMs); the CPU budget keeps the prep process small
    ref = measure.reference_fp64(saved, case.softcap, inputs_mod.BETA,
                                 budget_bytes=(8 << 30) if device == "cuda" else (1 << 30))
    case_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in saved.items() if torch.is_tensor(v)}, case_dir / "inputs.pt")
    torch.save(ref, case_dir / "ref.pt")
    info = {**stats, "scale": saved["scale"], "ref_loss": ref["loss"].item(), "versions": impls_mod.versions(),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name()}
    if device == "cuda":
        info["cublas_ms"] = measure.cublas_roofline_ms(saved["hidden"], saved["weight"], stats["valid_tokens"])
    info["prep_s"] = time.perf_counter() - t0
    return info


def bench(case, device: str, case_dir: Path, names: list[str], quick: bool) -> None:
    saved = torch.load(case_dir / "inputs.pt", map_location=device, weights_only=True)
    ref = torch.load(case_dir / "ref.pt", map_location="cpu", weights_only=True)
    for name in names:
        emit(TAG_START, name)

        def on_step(done, planned, what, name=name):
            emit(TAG_STEP, {"impl": name, "done": done, "planned": planned, "what": what})

        emit(TAG_ROW, bench_impl(name, impls_mod.IMPLS[name], saved, case, ref, device, quick, on_step))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    p.add_argument("cmd", choices=("prep", "bench"))
    p.add_argument("--case", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", required=True)
    p.add_argument("--impls", default=",".join(impls_mod.IMPLS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    case = inputs_mod.all_cases()[args.case]
    case_dir = Path(args.dir) / case.name
    if args.cmd == "prep":
        emit(TAG_INFO, prep(case, args.device, case_dir))
    else:
        bench(case, args.device, case_dir, args.impls.split(","), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
