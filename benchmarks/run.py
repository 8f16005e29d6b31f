"""fastdpo benchmark runner: every implementation, same inputs, same sigmoid DPO loss.

    python benchmarks/run.py                  # the set for the device present: CPU (under 5 min on 2 cores) or GPU
    python benchmarks/run.py --full           # CPU: the long set (2k-8k tokens, V up to 131k; about an hour)
    python benchmarks/run.py --sparse         # the model of a trained LM's softmax (inputs.make_lm_inputs)
    python benchmarks/run.py --frozen         # the same cases with the LM head frozen (no dW)
    python benchmarks/run.py --tiny           # one tiny case in seconds: checks the harness, measures nothing
    python benchmarks/run.py [--device cpu|cuda] [--out DIR] [--cases SUBSTR,...] [--impls a,b,...]

Results go to a new folder, benchmarks/results/runs/<time>-<device>/ (git-ignored); committed results are
rewritten only when named with --out (e.g. --out benchmarks/results/cpu).

For each case a `prep` worker builds the inputs (a trained-model-like head, see inputs.py) and the float64
reference once; `bench` workers then measure the implementations. On CPU each implementation runs in its own
process (peak RSS is per process); on GPU one process per case measures them in turn with the CUDA allocator's
peak, and a crash only costs the implementation that was running. Results are rewritten after every case, so an
interrupted run still leaves a valid results.json.

Under the final table it lists every row that ended in an error, and exits with status 1 if there is one: an
installed peer, the naive loss or fastdpo itself failed. A peer that is not installed (or cannot express a
case) is a `skipped:` row and leaves the exit status 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.impls import DEFAULT_IMPLS, IMPLS  # noqa: E402
from benchmarks.inputs import Case, case_set  # noqa: E402
from benchmarks.report import MiB  # noqa: E402
from benchmarks.worker import TAG_INFO, TAG_ROW, TAG_START, TAG_STEP, base_row  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# --- arguments ----------------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv=None, cuda_available=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="CPU: the long set (about an hour on 2 cores)")
    size.add_argument("--quick", action="store_true",
                      help="the small CPU-sized shapes (the default on CPU; on a GPU, those shapes in bf16)")
    size.add_argument("--sparse", action="store_true",
                      help="the trained-LM-like inputs (inputs.make_lm_inputs), where fastdpo_tol skips work")
    size.add_argument("--tiny", action="store_true",
                      help="one tiny case, all implementations in one worker: seconds, to check the harness")
    p.add_argument("--frozen", action="store_true",
                   help="the frozen-head twins of the set's cases (weight.requires_grad False, no dW)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--out", type=Path, default=None,
                   help="default: a new folder benchmarks/results/runs/<time>-<device>; "
                        "name a committed one (benchmarks/results/cpu) to replace its results")
    p.add_argument("--cases", default=None,
                   help="comma-separated substrings of case names to keep, run in the order they are given")
    settings = ", ".join(name for name in IMPLS if name not in DEFAULT_IMPLS)
    p.add_argument("--impls", default=None,
                   help=f"comma-separated subset of {','.join(IMPLS)} (default: all but {settings})")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per worker before it is killed (default 600 for the small set, else 3600)")
    args = p.parse_args(argv)
    available = _cuda_available() if cuda_available is None else cuda_available
    if args.device is None:
        args.device = "cuda" if available else "cpu"
    elif args.device == "cuda" and not available:
        p.error("--device cuda: no CUDA device is available")
    # The small set is the default on CPU; on a GPU the real heads are (and --quick asks for the small shapes)
    args.quick = args.quick or args.sparse or args.tiny or (args.device == "cpu" and not args.full)
    if args.impls is not None:
        args.impls = [x.strip() for x in args.impls.split(",") if x.strip()]
        unknown = sorted(set(args.impls) - set(IMPLS))
        if unknown:
            p.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    else:
        args.impls = list(DEFAULT_IMPLS)
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 3600.0
    if args.out is None:
        label = "-tiny" if args.tiny else "-sparse" if args.sparse else "" if args.quick else "-full"
        args.out = new_run_dir(device_kind(args.device) + label + ("-frozen" if args.frozen else ""))
    return args


def new_run_dir(label: str, now: datetime | None = None) -> Path:
    """benchmarks/results/runs/<YYYYmmdd-HHMMSS>-<label>, a folder no earlier run wrote (git-ignored)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / "runs" / f"{stamp}-{label}"
    n = 1
    while path.exists():
        n += 1
        path = RESULTS / "runs" / f"{stamp}-{label}-{n}"
    return path


def select_cases(device: str, quick: bool, patterns: str | None, sparse: bool = False, frozen: bool = False,
                 tiny: bool = False) -> list[Case]:
    cases = list(case_set(device, quick, sparse, frozen_head=frozen, tiny=tiny))
    if patterns:  # in the order of the first pattern each case matches (the set's order among equals)
        keep = [x.strip() for x in patterns.split(",") if x.strip()]
        first = {c.name: next((i for i, k in enumerate(keep) if k in c.name), None) for c in cases}
        cases = sorted((c for c in cases if first[c.name] is not None), key=lambda c: first[c.name])
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
        except BaseException:  # Ctrl-C or SIGTERM of the runner: no orphaned worker keeps a core busy
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
    tail = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()][-3:]
    if killed:
        tail.append(f"(killed after {timeout:.0f} s)")
    return rc, " / ".join(tail)


def parse_tagged(line: str):
    import json

    for tag in (TAG_INFO, TAG_ROW, TAG_STEP):
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
            elif tag == TAG_STEP:
                if progress:
                    progress("step", case, payload.get("impl"), payload)
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
    """What a person watching sees while a run goes on.

    Per case, a bar over its implementations (tqdm) with the elapsed time and an ETA, moved by the workers' step
    reports (warm-up, each timed run) and redrawn every second, so a slow implementation never looks hung; one
    line per finished row, and a plain line for every skip or error. Without a terminal (CI logs, a file) the
    bar is off and a heartbeat line comes every `heartbeat_s` instead.
    """

    def __init__(self, n_cases: int, impls: list[str], interactive: bool | None = None, heartbeat_s: float = 30.0):
        self.n_cases, self.impls, self.t0 = n_cases, impls, time.perf_counter()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.heartbeat_s = heartbeat_s if not self.interactive else 1.0
        self.bar = None
        self.case_index, self.finished, self.current, self.what = 0, 0, None, ""
        self._stop = threading.Event()
        self._thread = None

    # --- a case ---

    def start_case(self, case: Case) -> None:
        from tqdm import tqdm

        self.case_index += 1
        self.finished, self.current, self.what = 0, "inputs", "building the inputs and the float64 reference"
        self.impls_t0 = None
        self.bar = tqdm(total=len(self.impls), desc=f"case {self.case_index}/{self.n_cases} {case.name}",
                        unit="impl", disable=not self.interactive, leave=False, dynamic_ncols=True,
                        bar_format="{desc} {bar} {n:.1f}/{total:.0f} impls [{elapsed}{postfix}]")
        self.case_t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def end_case(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    # --- events from run_case ---

    def __call__(self, event, case, impl, payload):
        if event == "start":
            self.current, self.what = impl, "building"
            self.impls_t0 = self.impls_t0 or time.perf_counter()
            self._move(0.0)
        elif event == "step":
            planned = payload.get("planned") or 3  # unknown until the first timed run: a guess for the bar
            self.what = payload.get("what", "")
            self._move((1 + payload.get("done", 0)) / (planned + 2))  # warm-up, timed runs, the memory step
        else:
            self.finished += 1
            self.current = None
            self._move(0.0)
            self.write(self.row_line(payload))

    def row_line(self, row) -> str:
        head = f"{row['case']:<22} {row['impl']:<10}"
        if row["status"] != "ok":
            return f"{head} {row['status']}"
        runs = row.get("runs") or 0
        spread = (f" (min-max {row['ms_min']:,.0f}-{row['ms_max']:,.0f}, {runs} runs)" if runs > 1 else
                  " (1 run)" if runs == 1 else "")
        return (f"{head} {row['ms']:10,.1f} ms{spread}  {row['peak_mem_bytes'] / MiB:9.1f} MiB  "
                f"err {row['rel_err']:.1e}  [{self._clock(time.perf_counter() - self.t0)}]")

    def skip_line(self, case, impl, row):
        self("row", case, impl, row)

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    # --- internals ---

    def _move(self, fraction: float) -> None:
        if self.bar is None:
            return
        self.bar.n = self.finished + min(fraction, 0.99)
        self._render()

    def _render(self) -> None:
        eta = self.eta_s()
        doing = f", {self.current}: {self.what}" if self.current else ""
        self.bar.set_postfix_str(f"ETA {'?' if eta is None else self._clock(eta)}{doing}", refresh=True)

    def eta_s(self) -> float | None:
        """Seconds left in this case at the pace of its implementations so far (input preparation excluded)."""
        done = self.bar.n if self.bar is not None else 0.0
        if done <= 0 or self.impls_t0 is None:
            return None
        return (time.perf_counter() - self.impls_t0) * (len(self.impls) - done) / done

    @staticmethod
    def _clock(seconds: float) -> str:
        from tqdm import tqdm

        return tqdm.format_interval(seconds)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.interactive:
                self._render()
            elif self.current is not None:
                eta = self.eta_s()
                self.write(f"  ... {self.current}: {self.what} (case {self._clock(time.perf_counter() - self.case_t0)}"
                           f" elapsed, ETA {'?' if eta is None else self._clock(eta)})")


def add_roofline(rows: list[dict], info: dict, case: Case) -> None:
    """GPU only: time over cuBLAS's time for the same four GEMMs, and achieved TFLOP/s (8 x scored x H x V)."""
    if "cublas_ms" not in info:
        return
    flops = 8.0 * info["valid_tokens"] * case.hidden * case.vocab
    for r in rows:
        if r["status"] == "ok":
            r["roofline"] = r["ms"] / info["cublas_ms"]
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12


def add_kept_fraction(rows: list[dict], info: dict) -> None:
    """fastdpo_tol rows: the share of (token block, vocabulary tile) pairs its backward computed (prep's plan)."""
    for r in rows:
        if r["impl"] == "fastdpo_tol" and info.get("kept_fraction") is not None:
            r["kept_fraction"] = info["kept_fraction"]
            r["grad_tolerance"] = info.get("grad_tolerance")


# --- how busy the machine was -------------------------------------------------------------------------------------


class MachineLoad:
    """CPU time that other processes took while this run went on, from /proc/stat less our own (and our workers').

    Timings on a shared machine are slower and noisier (on 2 cores, a CPU step of fastdpo took 10x its idle time
    while other jobs used 1.5 cores), so every results file says how busy the machine was. None where /proc/stat
    is missing (not Linux).
    """

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self.machine_busy_s(), self.own_cpu_s()
        self.loadavg0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    @staticmethod
    def machine_busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own_cpu_s() -> float:
        import resource

        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    def busy_now(self, sample_s: float = 1.0) -> float | None:
        """Cores that other processes keep busy right now, over sample_s (the load average lags by minutes)."""
        b0, o0 = self.machine_busy_s(), self.own_cpu_s()
        time.sleep(sample_s)
        b1, o1 = self.machine_busy_s(), self.own_cpu_s()
        return None if b0 is None or b1 is None else max(0.0, (b1 - b0) - (o1 - o0)) / sample_s

    def summary(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy1 = self.machine_busy_s()
        out = {"wall_s": round(wall, 1), "cores": os.cpu_count(), "own_cpu_s": round(self.own_cpu_s() - self.own0, 1),
               "loadavg_start": self.loadavg0, "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "other_processes_cores": None}
        if busy1 is not None and self.busy0 is not None and wall > 0:
            others = (busy1 - self.busy0) - out["own_cpu_s"]
            out["other_processes_cores"] = round(max(0.0, others) / wall, 2)
        return out


def describe_load(load: dict) -> str:
    others = load.get("other_processes_cores")
    if others is None:
        return f"{load['wall_s']:.0f} s in all (machine load unknown)"
    return (f"{load['wall_s']:.0f} s in all; other processes used {others:.2f} of {load['cores']} cores on average "
            f"(load average {load['loadavg_start']:.1f} at the start, {load['loadavg_end']:.1f} at the end)"
            + ("; timings are inflated by them" if others > 0.2 else ""))


# --- main ---------------------------------------------------------------------------------------------------------


WRITTEN = ("results.json", "results.md", "time.png", "memory.png")


def save(results: dict, out: Path, cases: list[Case], plots: bool = False) -> None:
    report.write_json(results, out)
    report.write_markdown(results, out)
    if plots:
        for path in report.write_plots(results, out, {c.name: c.group for c in cases}):
            print(f"wrote {path}")


def describe_set(args) -> str:
    return _describe_sizes(args) + (", head frozen (--frozen)" if args.frozen else "")


def _describe_sizes(args) -> str:
    if args.tiny:
        return "the tiny harness check (--tiny)"
    if args.sparse:
        return "the trained-LM-like set (--sparse)"
    if args.device == "cpu":
        return "the CPU set (under 5 minutes on 2 cores)" if args.quick else "the full CPU set (--full)"
    return "the small shapes in bf16 (--quick)" if args.quick else "the GPU set (real LM heads)"


def foreign_files(out: Path) -> list[str]:
    """Files already in `out` that this run will not rewrite (they stay, describing an earlier run)."""
    return sorted(p.name for p in out.iterdir() if p.is_file() and p.name not in WRITTEN) if out.is_dir() else []


EXIT_ROWS_FAILED = 1  # some implementation that is installed (a peer, the naive loss, fastdpo) errored


def error_rows(rows: list[dict]) -> list[dict]:
    """Rows of an implementation that ran and failed. A peer that is not installed, or cannot express the case,
    is `skipped:` (impls.Skip), never an error; fastdpo and the naive loss are never skipped."""
    return [r for r in rows if r["status"].startswith("error: ")]


def outcome_lines(rows: list[dict]) -> list[str]:
    """The run's verdict under the table: every error row in full, then the skips, each on its own line."""
    failed, skipped = error_rows(rows), [r for r in rows if r["status"].startswith("skipped: ")]
    lines = []
    if skipped:
        lines += ["", f"{len(skipped)} row(s) skipped (not installed, or the case is beyond the implementation):"]
        lines += [f"  {r['case']} {r['impl']}: {r['status']}" for r in skipped]
    if failed:
        lines += ["", f"FAILED: {len(failed)} of {len(rows)} row(s) ended in an error "
                      f"(exit status {EXIT_ROWS_FAILED}):"]
        lines += [f"  {r['case']} {r['impl']}: {r['status']}" for r in failed]
    else:
        lines += ["", f"all {len(rows) - len(skipped)} measured row(s) ok"]
    return lines


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the worker is killed, the temporary inputs removed


def main(argv=None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cases = select_cases(args.device, args.quick, args.cases, args.sparse, args.frozen, args.tiny)
    if not cases:
        print("no case matches --cases", file=sys.stderr)
        return 2
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                else argv))
    results = {"device": args.device, "command": command.strip(), "versions": {}, "cases": {}, "rows": []}
    tmp = Path(tempfile.mkdtemp(prefix="fastdpo-bench-"))
    progress = Progress(len(cases), args.impls)
    print(f"{describe_set(args)}: {len(cases)} case(s) x {len(args.impls)} implementation(s) on {args.device}; "
          f"results -> {args.out}", flush=True)
    if foreign_files(args.out):
        print(f"note: {args.out} also holds {', '.join(foreign_files(args.out))}, not written by this run")
    load = MachineLoad()
    busy = load.busy_now()
    if busy is not None and busy > 0.3:
        print(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: timings will be slower and "
              "noisier than on an idle machine (results.md records how busy it stayed)", flush=True)
    try:
        for case in cases:
            progress.start_case(case)
            try:
                run_one_case(case, args, tmp, results, progress)
            finally:
                progress.end_case()
            save(results, args.out, cases)
            shutil.rmtree(tmp / case.name, ignore_errors=True)  # inputs of big cases are GBs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine_load"] = load.summary()
    save(results, args.out, cases, plots=not args.tiny)  # the tiny check draws no plots (matplotlib costs seconds)
    print()
    print(report.table(results))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.md'}: {describe_load(results['machine_load'])}")
    print("\n".join(outcome_lines(results["rows"])))
    return EXIT_ROWS_FAILED if error_rows(results["rows"]) else 0


def run_one_case(case: Case, args, tmp: Path, results: dict, progress: Progress) -> None:
    t0 = time.perf_counter()
    info, tail = prep_case(case, args.device, tmp, args.timeout)
    if info is None:
        progress.write(f"== {case.name}: building inputs failed: {tail}")
        for name in args.impls:
            row = base_row(name, case)
            row["status"] = f"error: input preparation failed: {tail}"[:300]
            results["rows"].append(row)
            progress.skip_line(case, name, row)
        return
    results["device"] = info.pop("device_name", args.device)
    results["versions"] = info.pop("versions", results["versions"])
    results["cases"][case.name] = {**case.to_dict(), **info}
    progress.write(f"== {case.name}: {case.tokens} tokens ({info['valid_tokens']} scored), H={case.hidden}, "
                   f"V={case.vocab}, {case.dtype}; mean entropy {info['mean_entropy']:.2f} nats, target top-1 "
                   f"{info['target_top1']:.0%} (inputs + fp64 reference {time.perf_counter() - t0:.0f} s)")

    def launch(names, on_line):
        argv = ["bench", "--case", case.name, "--device", args.device, "--dir", str(tmp), "--impls",
                ",".join(names)] + (["--quick"] if args.quick else [])
        return launch_worker(argv, on_line, args.timeout, tmp / f"{case.name}.{names[0]}.log")

    # On CPU each implementation gets its own process (peak RSS); the tiny check trades that for seconds
    rows = run_case(case, args.impls, args.device == "cpu" and not args.tiny, launch, progress)
    add_roofline(rows, info, case)
    add_kept_fraction(rows, info)
    results["rows"].extend(rows)


if __name__ == "__main__":
    sys.exit(main())
