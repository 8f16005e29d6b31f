"""Time one forward+backward of fastdpo and the naive loss on the quick CPU shape, idle or beside a busy process.

    python tools/contention.py [--busy N] [--impls fastdpo,naive] [--runs 3]

--busy N starts N pure-Python busy loops (`while True: pass`, one core each) before timing and stops them after.
Prints one line per implementation: the median and every run's seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import impls, inputs, measure, worker  # noqa: E402

CASE = inputs.Case("cpu-2k-h256-v64k", "cpu-h256-v64k", 8, 256, 256, 65536, "float32")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--busy", type=int, default=0)
    p.add_argument("--impls", default="fastdpo,naive")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    saved = inputs.make_inputs(CASE)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for name in args.impls.split(","):
            inp = worker.leaf_inputs(saved)
            run, _ = getattr(impls, f"make_{name}")(inp, CASE)
            measure.step(run, inp["hidden"], inp["weight"])  # warm-up
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                measure.step(run, inp["hidden"], inp["weight"])
                times.append(time.perf_counter() - start)
            print(f"{name:8s} busy={args.busy} median {statistics.median(times):6.2f} s  runs "
                  + " ".join(f"{t:.2f}" for t in times), flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
