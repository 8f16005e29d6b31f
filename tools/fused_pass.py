"""FastDPOLoss's fused pass against its two-pass path: time per step and error against float64.

    python tools/fused_pass.py [--cases SUBSTR] [--runs N]

Both routes run in this process, alternately (run.py measures peak memory, one process per implementation),
on the quick cases' inputs (inputs.make_inputs: a trained-model-like head, about 60% of the tokens scored)
with the sigmoid loss. The errors are relative to the largest magnitude of the float64 reference.

16-bit weights: how dW's accumulator over the groups costs accuracy (an fp32 buffer, a bf16 gradient
accumulating in place, stochastic rounding) is measured by tools/dw_accumulation.py: the rounding of an add
does not depend on the device (README, "Routes").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import fastdpo  # noqa: E402
from benchmarks import inputs, measure, worker  # noqa: E402


def route_step(inp: dict, case, fused: bool):
    loss_fn = fastdpo.FastDPOLoss(beta=inputs.BETA, loss_type="sigmoid", softcap=case.softcap, backend="torch",
                                  fused=fused)
    refs = {"ref_chosen_logps": inp["ref_chosen_logps"], "ref_rejected_logps": inp["ref_rejected_logps"]}
    return lambda: loss_fn(inp["hidden"], inp["weight"], inp["labels"], **refs).loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python tools/fused_pass.py", description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="", help="only the quick cases whose name contains this")
    p.add_argument("--runs", type=int, default=3, help="timed steps per route (after one warm-up)")
    args = p.parse_args(argv)
    for case in inputs.case_set("cpu", quick=True):
        if args.cases not in case.name:
            continue
        saved = inputs.make_inputs(case, "cpu")
        ref = measure.reference_fp64(saved, case.softcap, inputs.BETA)
        routes = {"fused": True, "two-pass": False}
        leaves = {name: worker.leaf_inputs(saved) for name in routes}
        steps = {name: route_step(leaves[name], case, fused) for name, fused in routes.items()}
        times = {name: [] for name in routes}
        errors = {}
        for name in routes:  # warm-up, and the gradients to check
            inp = leaves[name]
            loss = measure.step(steps[name], inp["hidden"], inp["weight"])
            errors[name] = measure.errors(loss, inp["hidden"].grad, inp["weight"].grad, ref)
        for _ in range(args.runs):  # alternately, so that a change in the machine's load reaches both
            for name in routes:
                inp = leaves[name]
                start = time.perf_counter()
                measure.step(steps[name], inp["hidden"], inp["weight"])
                times[name].append(time.perf_counter() - start)
        for name in routes:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in errors[name].items())
            print(f"{case.name} {name:8s}: min {min(times[name]):.2f} s, median {sorted(times[name])[len(times[name]) // 2]:.2f} s"
                  f" over {args.runs} steps; {errs}")


if __name__ == "__main__":
    main()
