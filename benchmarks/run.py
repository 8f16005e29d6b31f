"""fastdpo benchmark runner: every implementation, same inputs, same sigmoid DPO loss.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out DIR] [--cases SUBSTR,...] [--impls a,b,...]

For each case a `prep` worker builds the inputs (a trained-model-like head, see inputs.py) and the float64
reference once; `bench` workers then measure the implementations. On CPU each implementation runs in its own
process (peak RSS is per process); on GPU one process per case measures them in turn with the CUDA allocator's
peak, and a crash only costs the implementation that was running. Results are rewritten after every case, so an
interrupted run still leaves a valid results.json.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.impls import IMPLS  # noqa: E402
from benchmarks.inputs import Case, case_set  # noqa: E402
from benchmarks.report import MiB  # noqa: E402
from benchmarks.worker import TAG_INFO, TAG_ROW, TAG_START, base_row  # noqa: E402


# --- arguments ----------------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv=None, cuda_available=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized shapes (minutes on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device-kind>")
    p.add_argument("--cases", default=None, help="comma-separated substrings of case names to keep")
    p.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per worker before it is killed (default 600 with --quick, else 3600)")
    args = p.parse_args(argv)
    available = _cuda_available() if cuda_available is None else cuda_available
    if args.device is None:
        args.device = "cuda" if available else "cpu"
    elif args.device == "cuda" and not available:
        p.error("--device cuda: no CUDA device is available")
    if args.impls is not None:
        args.impls = [x.strip() for x in args.impls.split(",") if x.strip()]
        unknown = sorted(set(args.impls) - set(IMPLS))
        if unknown:
            p.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    else:
        args.impls = list(IMPLS)
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 3600.0
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / device_kind(args.device)
    return args


def select_cases(device: str, quick: bool, patterns: str | None) -> list[Case]:
    cases = list(case_set(device, quick))
    if patterns:
        keep = [x.strip() for x in patterns.split(",") if x.strip()]
        cases = [c for c in cases if any(k in c.name for k in keep)]
    return cases


def device_kind(device: str) -> str:
    """'cpu', or the GPU's name as a folder name ('nvidia-h200'), read without creating a CUDA context here."""
    if device == "cpu":
        return "cpu"
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "cuda"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


# --- workers ------------------------------------------------------------------------------------------------------


def launch_worker(argv: list[str], on_line, timeout: float, log_path: Path) -> tuple[int, str]:
    """Run `python -m benchmarks.worker ARGV`, feeding tagged stdout lines to on_line as they arrive.

    Library chatter (warnings, compile logs) goes to log_path; its tail comes back for error messages.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", *argv], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        killed = []

        def kill():  # only this worker, which we started
            killed.append(True)
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("@@"):
                    on_line(line.rstrip("\n"))
                else:
                    log.write(line)
            rc = proc.wait()
        finally:
            timer.cancel()
    tail = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()][-3:]
    if killed:
        tail.append(f"(killed after {timeout:.0f} s)")
    return rc, " / ".join(tail)


def parse_tagged(line: str):
    import json

    for tag in (TAG_INFO, TAG_ROW):
        if line.startswith(tag):
            return tag, json.loads(line[len(tag):])
    if line.startswith(TAG_START):
        return TAG_START, line[len(TAG_START):].strip()
    return None, None


def run_case(case: Case, names: list[str], isolate: bool, launch, progress=None) -> list[dict]:
    """Rows for every name, in order, whatever the workers do.

    launch(names, on_line) -> (returncode, stderr tail) runs one bench worker over `names`. isolate=True: one worker
    per implementation (CPU). Otherwise one worker for all; if it dies, the implementation it was running gets an
    `error:` row and a new worker continues with the rest.
    """
    rows: dict[str, dict] = {}
    pending = list(names)
    while pending:
        batch = pending[:1] if isolate else list(pending)
        current: list[str | None] = [None]

        def on_line(line):
            tag, payload = parse_tagged(line)
            if tag == TAG_START:
                current[0] = payload
                if progress:
                    progress("start", case, payload, None)
            elif tag == TAG_ROW:
                rows[payload["impl"]] = payload
                current[0] = None
                if progress:
                    progress("row", case, payload["impl"], payload)

        rc, tail = launch(batch, on_line)
        done = [n for n in batch if n in rows]
        if len(done) < len(batch):
            # The worker died (or never reported): blame the one it had started, or the first unreported one
            culprit = current[0] if current[0] in batch and current[0] not in rows else \
                next(n for n in batch if n not in rows)
            row = base_row(culprit, case)
            row["status"] = f"error: worker exited with code {rc}" + (f": {tail}" if tail else "")
            rows[culprit] = row
            if progress:
                progress("row", case, culprit, row)
        pending = [n for n in pending if n not in rows]
    return [rows[n] for n in names]


def prep_case(case: Case, device: str, tmp: Path, timeout: float) -> tuple[dict | None, str]:
    info: dict = {}

    def on_line(line):
        tag, payload = parse_tagged(line)
        if tag == TAG_INFO:
            info.update(payload)

    rc, tail = launch_worker(["prep", "--case", case.name, "--device", device, "--dir", str(tmp)], on_line,
                             timeout, tmp / f"{case.name}.prep.log")
    return (info if rc == 0 and info else None), tail


# --- progress and derived columns ---------------------------------------------------------------------------------


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def __call__(self, event, case, impl, row):
        if event == "start":
            print(f"[{self.done + 1:3d}/{self.total}] {case.name:<22} {impl:<10}", end=" ", flush=True)
            return
        self.done += 1
        if row["status"] == "ok":
            print(f"{row['ms']:10.1f} ms {row['peak_mem_bytes'] / MiB:9.1f} MiB  err {row['rel_err']:.1e}  "
                  f"[{time.perf_counter() - self.t0:5.0f} s]", flush=True)
        else:
            print(f"{'':>10}    {'':>9}       {row['status'][:100]}", flush=True)

    def skip_line(self, case, impl, row):
        self("start", case, impl, None)
        self("row", case, impl, row)


def add_roofline(rows: list[dict], info: dict, case: Case) -> None:
    """GPU only: time over cuBLAS's time for the same four GEMMs, and achieved TFLOP/s (8 x scored x H x V)."""
    if "cublas_ms" not in info:
        return
    flops = 8.0 * info["valid_tokens"] * case.hidden * case.vocab
    for r in rows:
        if r["status"] == "ok":
            r["roofline"] = r["ms"] / info["cublas_ms"]
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12


# --- main ---------------------------------------------------------------------------------------------------------


def save(results: dict, out: Path, cases: list[Case], plots: bool = False) -> None:
    report.write_json(results, out)
    report.write_markdown(results, out)
    if plots:
        for path in report.write_plots(results, out, {c.name: c.group for c in cases}):
            print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = select_cases(args.device, args.quick, args.cases)
    if not cases:
        print("no case matches --cases", file=sys.stderr)
        return 2
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                else argv))
    results = {"device": args.device, "command": command.strip(), "versions": {}, "cases": {}, "rows": []}
    tmp = Path(tempfile.mkdtemp(prefix="fastdpo-bench-"))
    progress = Progress(len(cases) * len(args.impls))
    print(f"{len(cases)} case(s) x {len(args.impls)} implementation(s) on {args.device}; results -> {args.out}")
    try:
        for case in cases:
            t0 = time.perf_counter()
            info, tail = prep_case(case, args.device, tmp, args.timeout)
            if info is None:
                print(f"== {case.name}: building inputs failed: {tail}")
                for name in args.impls:
                    row = base_row(name, case)
                    row["status"] = f"error: input preparation failed: {tail}"[:300]
                    results["rows"].append(row)
                    progress.skip_line(case, name, row)
                continue
            results["device"] = info.pop("device_name", args.device)
            results["versions"] = info.pop("versions", results["versions"])
            results["cases"][case.name] = {**case.to_dict(), **info}
            print(f"== {case.name}: {case.tokens} tokens ({info['valid_tokens']} scored), H={case.hidden}, "
                  f"V={case.vocab}, {case.dtype}; mean entropy {info['mean_entropy']:.2f} nats, target top-1 "
                  f"{info['target_top1']:.0%} (inputs + fp64 reference {time.perf_counter() - t0:.0f} s)", flush=True)

            def launch(names, on_line, case=case):
                argv = ["bench", "--case", case.name, "--device", args.device, "--dir", str(tmp), "--impls",
                        ",".join(names)] + (["--quick"] if args.quick else [])
                return launch_worker(argv, on_line, args.timeout, tmp / f"{case.name}.{names[0]}.log")

            rows = run_case(case, args.impls, args.device == "cpu", launch, progress)
            add_roofline(rows, info, case)
            results["rows"].extend(rows)
            save(results, args.out, cases)
            shutil.rmtree(tmp / case.name, ignore_errors=True)  # inputs of big cases are GBs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save(results, args.out, cases, plots=True)
    print()
    print(report.table(results))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
