"""One command for a GPU session: GPU tests, per-phase times next to the cost model, the side-by-side benchmark.

    python benchmarks/gpu_check.py [--wheels DIR] [--out DIR] [--copy-to DIR] [--budget-s 540] [--skip PARTS]

Parts, in this order, each in its own process with its own time limit (one failure or hang loses only that
part; whatever finished is written after every part):
  setup   install carried wheels (--wheels), make `fastdpo.kernels` importable (`pip install -e .` if needed)
  tests   `python -m pytest tests/test_gpu.py -q` (bf16 against the float64 oracle)
  phases  triton.testing.do_bench of fastdpo's phases (forward kernel, logits_grad over the chunks, the dX and
          dW GEMMs, forward and forward+backward end to end) next to cost_model.py's prediction and next to
          cuBLAS (torch.mm) for the same GEMM shapes ("within 1.35x of cuBLAS"), the peak memory above the
          inputs next to the model's, and the device's measured ceilings (bf16 GEMM rate, copy bandwidth)
  sparse  grad_tolerance=2**-10 (issue 13) at Llama-3-8B 16k on trained-LM-like inputs (benchmarks/inputs.py)
          and on the random ones: the kept fraction f the plan gives (sparse_plan.kept_pairs on the forward
          kernel's tile logsumexps) and the share of kept pairs in shared tiles, forward+backward with and
          without the tolerance, the plan and the three sparse kernels alone, each next to cost_model.py at f
  bench   `python benchmarks/run.py --device cuda --out <results>/bench` with every peer that imports; stopped
          at the remaining budget (run.py rewrites its results after each case, so finished cases stay)
Results: <out>/gpu_check.json and gpu_check.md (default out: benchmarks/results/<device-name-slug>/, e.g.
nvidia-h100-80gb-hbm3), with the logs; torch, triton, CUDA and driver versions and the device name inside.
Without a CUDA device it prints why and exits with status 2, running nothing.

Fits one 10-minute device call: the default budget is 540 s of wall time in all (setup <= 90 s, tests
<= 150 s, phases <= 150 s, sparse <= 120 s, the bench gets the rest less 15 s to write the results).

Carrying the peers. The GPU image has torch, triton and transformers but none of the peers, and nothing can be
downloaded there, so their wheels travel with the call. Here (no GPU), once, in the repository root:

    echo /wheels/ >> .git/info/exclude
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets dill multiprocess

(about 3 MB; trl's head also needs datasets, and datasets dill and multiprocess, which the image lacks.)
quack-kernels (0.6.5, 0.7 MB) needs nvidia-cutlass-dsl, whose CUDA 13 library wheel is 92 MB: over the 64 MiB a
call may carry, so quack cannot travel this way and is reported as not importable. Then one device call:

    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --wheels wheels --copy-to $OUT",
        carry=["wheels"], timeout_s=600)

--wheels installs them with `pip install --no-index --no-deps --target <tmp>` and puts that folder first on
PYTHONPATH for every part. --copy-to copies the result files (at most 8, flat) to a folder that comes back
from the device; commit them under benchmarks/results/<device>/ here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/gpu_check.py` puts benchmarks/ first on sys.path
    sys.path.insert(0, str(REPO))

PARTS = ("setup", "tests", "phases", "sparse", "bench")
DEFAULT_BUDGET_S = 540.0
PART_CAPS_S = {"setup": 90.0, "tests": 150.0, "phases": 150.0, "sparse": 120.0}
WRITE_RESERVE_S = 15.0
COPY_LIMIT = 8  # files that come back from a device call
CUBLAS_RATIO_TARGET = 1.35  # issue 9: measured within 1.35x of cuBLAS for the same GEMMs
# Phase shapes (scored tokens, H, V), most important first; later ones run while the part's time lasts.
PHASE_SHAPES = ((16384, 4096, 128256), (4096, 4096, 128256), (8192, 2304, 256000))
CHILD_PARTS = ("phases", "sparse")  # parts that run in a child process on the GPU
# The sparse part: Llama-3-8B head, 16 sequences of 1024 tokens (trained-LM-like inputs score only the completions),
# grad_tolerance 2**-10 (issue 13's setting).
SPARSE_SHAPE = (16384, 4096, 128256)
SPARSE_TOLERANCE = 2.0**-10
NO_GPU_MESSAGE = ("gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); nothing was run. "
                  "It is meant for a session with a GPU: see `python benchmarks/gpu_check.py --help`.")


# --- arguments, names, budget --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device-name-slug>")
    p.add_argument("--wheels", type=Path, default=None, help="folder of carried peer wheels to install first")
    p.add_argument("--copy-to", type=Path, default=None, help="also copy the result files (flat) here")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock seconds for everything")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip, of {','.join(PARTS)}")
    # internal: one part in a child process
    p.add_argument("--part", choices=CHILD_PARTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = sorted(args.skip - set(PARTS))
    if unknown:
        p.error(f"--skip: unknown part(s) {unknown}; choose from {list(PARTS)}")
    if args.budget_s <= WRITE_RESERVE_S:
        p.error(f"--budget-s must exceed {WRITE_RESERVE_S:.0f} s (the time kept to write the results), "
                f"got {args.budget_s}")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels: {args.wheels} is not a folder")
    return args


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the folder name benchmarks/run.py uses too)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


class Budget:
    def __init__(self, total_s: float, clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + total_s

    def left(self) -> float:
        return max(0.0, self.deadline - self.clock() - WRITE_RESERVE_S)

    def for_part(self, cap: float | None) -> float:
        return self.left() if cap is None else min(cap, self.left())


def pytest_summary(output: str) -> dict:
    """Counts from pytest's last summary line ('3 passed, 1 failed, 2 skipped in 9.1s')."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", line)
        if found:
            counts = {("error" if k.startswith("error") else k): int(v) for v, k in found}
            break
    return counts


# --- running things with a time limit ---------------------------------------------------------------------------


def run_logged(cmd: list[str], timeout_s: float, log_path: Path, env: dict | None = None) -> dict:
    """Run cmd in its own process group, output to log_path; on timeout kill that group (only what we started)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    return dict(returncode=rc, timed_out=timed_out, seconds=round(time.monotonic() - start, 1),
                log=log_path.name, tail=log_path.read_text()[-3000:])


def run_part(results: dict, name: str, fn, timeout_s: float) -> None:
    """results['parts'][name] = fn(timeout_s) plus status and seconds; an exception is recorded, never raised."""
    start = time.monotonic()
    if timeout_s < 5:
        results["parts"][name] = dict(status="skipped: no time left in the budget")
        return
    try:
        out = fn(timeout_s)
        out.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - one part's failure must not lose the others
        out = dict(status=f"error: {type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
    out["seconds"] = round(time.monotonic() - start, 1)
    results["parts"][name] = out
    print(f"[gpu_check] {name}: {out['status']} ({out['seconds']} s)", flush=True)


# --- parts ------------------------------------------------------------------------------------------------------


def child_env(site: Path | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def setup(args, out_dir: Path, timeout_s: float) -> tuple[dict, Path | None]:
    """Install the carried wheels into a fresh folder, and fastdpo (editable) if `fastdpo.kernels` does not import."""
    info, site = {}, None
    deadline = time.monotonic() + timeout_s
    if args.wheels is not None:
        wheels = sorted(str(p) for p in args.wheels.glob("*.whl"))
        site = Path(tempfile.mkdtemp(prefix="fastdpo-site-"))
        info["wheels"] = [Path(w).name for w in wheels]
        if wheels:
            info["install_wheels"] = run_logged(
                [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                 "--target", str(site), *wheels], deadline - time.monotonic(), out_dir / "setup.log")
            sys.path.insert(0, str(site))
    probe = [sys.executable, "-c", "import fastdpo.kernels"]
    env = child_env(site)
    if subprocess.run(probe, cwd=REPO, env=env, capture_output=True, timeout=120).returncode != 0:
        info["install_fastdpo"] = run_logged(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
            deadline - time.monotonic(), out_dir / "setup-fastdpo.log", env=env)
    check = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    info["fastdpo_kernels_importable"] = check.returncode == 0
    if check.returncode != 0:
        info["status"] = "error: fastdpo.kernels does not import: " + check.stderr.strip()[-500:]
    return info, site


def run_tests(out_dir: Path, site: Path | None, timeout_s: float) -> dict:
    res = run_logged([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"], timeout_s,
                     out_dir / "tests.log", env=child_env(site))
    res["summary"] = pytest_summary(res["tail"])
    if res["timed_out"]:
        res["status"] = f"error: timed out after {timeout_s:.0f} s"
    elif res["returncode"] != 0:
        res["status"] = f"error: pytest exit {res['returncode']}"
    return res


def run_phases(out_dir: Path, site: Path | None, timeout_s: float, part: str = "phases") -> dict:
    """A child part (phases or sparse) in its own process; it rewrites <part>.json as it goes."""
    part_json = out_dir / f"{part}.json"
    part_json.unlink(missing_ok=True)
    res = run_logged([sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-out", str(part_json),
                      "--part-budget-s", str(max(1.0, timeout_s - 10))], timeout_s, out_dir / f"{part}.log",
                     env=child_env(site))
    if part_json.exists():  # the child rewrites it after every shape, so a timeout keeps what it measured
        res.update(json.loads(part_json.read_text()))
    if res["timed_out"]:
        res["status"] = f"error: timed out after {timeout_s:.0f} s"
    elif res["returncode"] != 0:
        res["status"] = f"error: exit {res['returncode']}"
    return res


def run_bench(out_dir: Path, site: Path | None, timeout_s: float) -> dict:
    bench_dir = out_dir / "bench"
    res = run_logged([sys.executable, "benchmarks/run.py", "--device", "cuda", "--out", str(bench_dir)], timeout_s,
                     out_dir / "bench.log", env=child_env(site))
    res["out"] = str(bench_dir)
    res["files"] = sorted(p.name for p in bench_dir.glob("*")) if bench_dir.is_dir() else []
    if res["timed_out"]:
        res["status"] = (f"error: stopped at the budget ({timeout_s:.0f} s); the cases run.py finished are in "
                         f"{bench_dir}/results.json" if "results.json" in res["files"] else
                         f"error: stopped at the budget ({timeout_s:.0f} s) before run.py finished a case")
    elif res["returncode"] != 0:
        res["status"] = f"error: benchmarks/run.py exit {res['returncode']} (see bench.log)"
    return res


# --- versions and results -----------------------------------------------------------------------------------------


def _command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    from importlib import metadata

    import torch

    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=str(torch.version.cuda),
               driver=_command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
               or "unknown",
               commit=_command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"]) or "unknown")
    for name in ("triton", "fastdpo", "trl", "transformers", "liger-kernel", "cut-cross-entropy", "quack-kernels"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    v = results.get("versions", {})
    lines = [f"# gpu_check on {results.get('device', '?')}", "",
             f"torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}, driver {v.get('driver')}, "
             f"commit {str(v.get('commit'))[:12]}; started {results.get('started')}", "",
             "| part | status | seconds |", "|---|---|---|"]
    for name, part in results.get("parts", {}).items():
        lines.append(f"| {name} | {part.get('status')} | {part.get('seconds', '-')} |")
    tests = results.get("parts", {}).get("tests", {})
    if tests.get("summary"):
        lines += ["", "Tests: " + ", ".join(f"{v} {k}" for k, v in tests["summary"].items())]
    phases = results.get("parts", {}).get("phases", {})
    if phases.get("ceilings"):
        c = phases["ceilings"]
        lines += ["", f"Measured ceilings: {_fmt(c.get('bf16_tflops'), '.0f')} TFLOP/s bf16 (8192^3 mm), "
                      f"{_fmt(c.get('copy_tbps'), '.2f')} TB/s device copy (read + write)."]
    for shape in phases.get("shapes", []):
        lines += ["", f"## Phases at n={shape['n']}, H={shape['hidden']}, V={shape['vocab']} (bf16)", "",
                  "| phase | measured ms | model ms | cuBLAS ms | x cuBLAS | note |", "|---|---|---|---|---|---|"]
        for row in shape.get("rows", []):
            lines.append(f"| {row['phase']} | {_fmt(row.get('ms'), '.2f')} | {_fmt(row.get('model_ms'), '.2f')} "
                         f"| {_fmt(row.get('cublas_ms'), '.2f')} | {_fmt(row.get('x_cublas'), '.2f')} "
                         f"| {row.get('note', '')} |")
        mem = shape.get("peak_bytes")
        lines += ["", f"Peak memory above the inputs, forward+backward: {_fmt(mem and mem / 2**30, '.2f')} GiB "
                      f"measured, {_fmt(shape.get('model_peak_bytes', 0) / 2**30, '.2f')} GiB modelled."]
        if shape.get("checks"):
            verdicts = (f"{k}: {'ok' if ok else 'MISSED'}" for k, ok in shape["checks"].items())
            lines += ["", "Checks: " + "; ".join(verdicts)]
    lines += sparse_markdown(results.get("parts", {}).get("sparse", {}))
    bench = results.get("parts", {}).get("bench", {})
    if bench.get("files"):
        lines += ["", f"Side-by-side benchmark: {bench.get('out')}/ ({', '.join(bench['files'])})"]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "gpu_check.json", out_dir / "gpu_check.md"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(results))
    return paths


def copy_results(out_dir: Path, dest: Path) -> list[Path]:
    """Copy the most useful result files flat into dest, at most COPY_LIMIT of them."""
    wanted = ["gpu_check.json", "gpu_check.md", "tests.log", "phases.log", "bench/results.json", "bench/results.md",
              "bench.log", "setup.log"]
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for rel in wanted:
        src = out_dir / rel
        if src.is_file() and len(copied) < COPY_LIMIT:
            target = dest / rel.replace("/", "-")
            shutil.copyfile(src, target)
            copied.append(target)
    return copied


# --- the phases part (child process, on the GPU) --------------------------------------------------------------------


# Measured phase -> the cost model's phases it covers (empty: the whole step).
MEASURED_TO_MODEL = {
    "forward kernel": ("forward kernel",),
    "forward (end to end)": ("forward kernel", "forward merge (torch)"),
    "logits_grad kernel (recompute)": ("logits_grad kernel (recompute)",),
    "dX GEMM + add (cuBLAS)": ("dX GEMM (cuBLAS, fp32 out)", "dX_scored += product"),
    "dW GEMM (cuBLAS)": ("dW GEMM (cuBLAS)",),
    "forward + backward (end to end)": (),
}
CUBLAS_LOGITS = "cuBLAS logits (X W^T, chunked)"


def model_rows(n: int, hidden: int, vocab: int, device_name: str, workspace_bytes: int) -> tuple[dict, float]:
    """The cost model's per-phase prediction (ms) for the shape, on the model device closest to device_name."""
    from benchmarks import cost_model as cm

    device = cm.DEVICES["h200" if "h200" in device_name.lower() else "h100"]
    p = cm.fastdpo(cm.Shape(n, hidden, vocab), device, cm.Options(workspace_bytes=workspace_bytes))
    model = {ph.name: ph.time_s(device, p.shape.dtype) * 1e3 for ph in p.phases}
    return {phase: sum(model.get(k, 0.0) for k in keys) if keys else p.time_s * 1e3
            for phase, keys in MEASURED_TO_MODEL.items()}, p.peak_bytes


def measure_ceilings(bench) -> dict:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: torch.mm(a, b))
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    return dict(bf16_tflops=2 * 8192**3 / mm_ms / 1e9, copy_tbps=2 * src.numel() * 4 / copy_ms / 1e9)


def measure_shape(n: int, hidden: int, vocab: int, bench, device_name: str, device: str = "cuda",
                  dtype_name: str = "bfloat16") -> dict:
    """One shape's phases; device/dtype are parameters only so that a CPU test can walk this code."""
    import torch

    import fastdpo
    from fastdpo.kernels import config, logprob_backward, logprob_forward

    dev = torch.device(device)
    dtype = getattr(torch, dtype_name)
    h = torch.randn(n, hidden, device=dev, dtype=dtype)
    w = (torch.randn(vocab, hidden, device=dev) * hidden**-0.5 * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=dev)
    rows = torch.arange(n, device=dev)
    cfg = config.gemm_config(dtype, config.device_capability(dev), hidden)
    workspace = config.default_workspace_bytes(dev)
    width = config.vocab_chunk_width(n, vocab, h.element_size(), cfg["BLOCK_V"], workspace)
    starts = list(range(0, vocab, width))
    model_ms, model_peak = model_rows(n, hidden, vocab, device_name, workspace)
    out = dict(n=n, hidden=hidden, vocab=vocab, chunk_width=width, chunks=len(starts), config=cfg,
               workspace_bytes=workspace, model_ms=model_ms, model_peak_bytes=model_peak, rows=[], errors={})
    measured = {}

    def row(phase, fn, cublas=None, note=""):
        ms = measured[phase] = _timed(bench, fn, phase, out["errors"])
        cublas_ms = measured.get(cublas) if cublas else None
        out["rows"].append(dict(phase=phase, ms=ms, model_ms=model_ms.get(phase), cublas_ms=cublas_ms,
                                x_cublas=ms / cublas_ms if ms and cublas_ms else None, note=note))

    ws = torch.randn(n, width, device=dev).to(dtype)
    logits_buf = torch.empty(n, width, device=dev, dtype=dtype)
    dw = torch.empty_like(w)
    dx32 = torch.zeros(n, hidden, device=dev)

    def chunks():
        return [(s, min(width, vocab - s)) for s in starts]

    def cublas_logits():
        for s, c in chunks():
            torch.mm(h, w[s:s + c].T, out=logits_buf[:, :c])

    def dx_chunks():
        for s, c in chunks():
            dx32.add_(_mm_fp32(ws[:, :c], w[s:s + c]))

    def dw_chunks():
        for s, c in chunks():
            torch.mm(ws[:, :c].T, h, out=dw[s:s + c])

    row(CUBLAS_LOGITS, cublas_logits, note="2nVH into a bf16 chunk: the forward kernel's GEMM on cuBLAS")
    row("forward kernel", lambda: logprob_forward.logprob_forward(h, w, None, rows, targets), cublas=CUBLAS_LOGITS)
    with torch.no_grad():
        row("forward (end to end)", lambda: fastdpo.linear_logprobs(h, w, targets, backend="triton"))
    lse = _lse_from_table(logprob_forward, h, w, rows, targets, vocab)
    grad = torch.randn(n, device=dev)

    def logits_grad_chunks():
        for s, c in chunks():
            logprob_backward.logits_grad(h, w, None, rows, targets, lse, grad, ws[:, :c], s)

    row("logits_grad kernel (recompute)", logits_grad_chunks, cublas=CUBLAS_LOGITS,
        note=f"{len(starts)} chunk(s) of {width}")
    row("dX GEMM + add (cuBLAS)", dx_chunks, note="torch.mm(out_dtype=fp32), then dX_scored +=")
    row("dW GEMM (cuBLAS)", dw_chunks)
    parts = [measured.get(CUBLAS_LOGITS), measured.get("dX GEMM + add (cuBLAS)"), measured.get("dW GEMM (cuBLAS)")]
    measured["cuBLAS 8P"] = 2 * parts[0] + parts[1] + parts[2] if all(parts) else None
    del ws, logits_buf, dw, dx32

    hg = h.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    upstream = torch.randn(n, device=dev)

    def step():
        hg.grad = wg.grad = None
        (fastdpo.linear_logprobs(hg, wg, targets, backend="triton") * upstream).sum().backward()

    row("forward + backward (end to end)", step, cublas="cuBLAS 8P",
        note="cuBLAS column: 2 x logits + dX + dW products alone")
    out["peak_bytes"] = _peak_above_inputs(step, hg, wg) if dev.type == "cuda" else None
    ratios = {r["phase"]: r["x_cublas"] for r in out["rows"] if r["x_cublas"] is not None}
    out["checks"] = {f"{k} within {CUBLAS_RATIO_TARGET}x of cuBLAS": v <= CUBLAS_RATIO_TARGET
                     for k, v in ratios.items()}
    return out


def _mm_fp32(a, b):
    import torch

    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):  # a torch or device without mm(out_dtype=)
        return torch.mm(a, b).float()


def _lse_from_table(logprob_forward, h, w, rows, targets, vocab):
    """lse per row from the forward's [F, vocab tiles, n] table (F0 = max, F1 = sum of exp); logprob_forward:
    the fastdpo.kernels.logprob_forward module."""
    import math

    import torch

    try:
        table, _target = logprob_forward.logprob_forward(h, w, None, rows, targets)
        m = table[0].amax(0)
        return m + torch.log((table[1] * torch.exp(table[0] - m)).sum(0))
    except Exception:  # noqa: BLE001 - timing only needs plausible values
        return torch.full((rows.numel(),), math.log(vocab) + 5.0, device=h.device)


def _peak_above_inputs(step, hidden, weight) -> int | None:
    import gc

    import torch

    try:
        hidden.grad = weight.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    except Exception:  # noqa: BLE001
        return None


def phases_child(part_out: Path, budget_s: float) -> int:
    """Measure the phase shapes in order while time lasts, rewriting part_out after each."""
    import torch
    import triton.testing

    deadline = time.monotonic() + budget_s
    device_name = torch.cuda.get_device_name(0)

    def bench(fn):
        fn()  # compile and warm up outside the timing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    result = dict(device=device_name, shapes=[], skipped_shapes=[])
    try:
        result["ceilings"] = measure_ceilings(bench)
    except Exception as exc:  # noqa: BLE001
        result["ceilings_error"] = f"{type(exc).__name__}: {exc}"
    part_out.write_text(json.dumps(result, indent=2, default=str))
    for i, (n, hidden, vocab) in enumerate(PHASE_SHAPES):
        if i and time.monotonic() > deadline - 60:  # a shape takes about a minute with compilation
            result["skipped_shapes"].append([n, hidden, vocab])
            continue
        try:
            result["shapes"].append(measure_shape(n, hidden, vocab, bench, device_name))
        except Exception as exc:  # noqa: BLE001
            result["shapes"].append(dict(n=n, hidden=hidden, vocab=vocab, error=f"{type(exc).__name__}: {exc}",
                                         traceback=traceback.format_exc()[-2000:]))
        torch.cuda.empty_cache()
        part_out.write_text(json.dumps(result, indent=2, default=str))
        print(f"[phases] n={n} H={hidden} V={vocab} done", flush=True)
    return 0


# --- the sparse part (child process, on the GPU): grad_tolerance's block-sparse backward ------------------------------


def kept_statistics(tile_lse, lse, targets, block_m: int, block_v: int, tolerance: float) -> dict:
    """The plan's kept fraction f of (token block, vocabulary tile) pairs, and the share s of the kept pairs in
    tiles every block keeps, read from the distinct kept tiles as the cost model counts them:
    distinct = pairs (s / blocks + 1 - s)."""
    from fastdpo import sparse_plan

    kept = sparse_plan.kept_pairs(tile_lse, lse, targets, block_m, block_v, tolerance)
    blocks, tiles = kept.shape
    pairs = int(kept.sum())
    distinct = int(kept.any(0).sum())
    shared = (1 - distinct / pairs) / (1 - 1 / blocks) if pairs and blocks > 1 else 0.0
    return dict(kept_fraction=pairs / (blocks * tiles), kept_shared=min(1.0, max(0.0, shared)), pairs=pairs,
                distinct_tiles=distinct, blocks=blocks, tiles=tiles, kept=kept)


def sparse_model(n: int, hidden: int, vocab: int, device_name: str, workspace_bytes: int, f: float,
                 shared: float, tokens: int | None = None) -> dict:
    """The cost model at the measured f and s: dense and grad_tolerance totals (ms), its per-phase sparse times."""
    from benchmarks import cost_model as cm

    device = cm.DEVICES["h200" if "h200" in device_name.lower() else "h100"]
    shape = cm.Shape(n, hidden, vocab, tokens=tokens)
    options = cm.Options(workspace_bytes=workspace_bytes, kept_fraction=f, kept_shared=shared)
    dense = cm.fastdpo(shape, device, options)
    sparse = cm.fastdpo_sparse(shape, device, options)
    phases = {ph.name: ph.time_s(device, shape.dtype) * 1e3 for ph in sparse.phases}
    return dict(dense_ms=dense.time_s * 1e3, tolerance_ms=sparse.time_s * 1e3, path=sparse.details["path"],
                ratio=sparse.time_s / dense.time_s, phases_ms=phases, device=device.name)


def _case_inputs(kind: str, n: int, hidden: int, vocab: int, dev, dtype):
    """(hidden [N, H], weight [V, H], targets [N] with -100 where not scored) of one input kind."""
    import torch

    if kind == "random":  # measure_shape's inputs: every position scored, a near-flat softmax
        h = torch.randn(n, hidden, device=dev, dtype=dtype)
        w = (torch.randn(vocab, hidden, device=dev) * hidden**-0.5 * 3).to(dtype)
        return h, w, torch.randint(0, vocab, (n,), device=dev)
    from benchmarks import inputs as bench_inputs

    seq_len = min(1024, max(2, n // 2))
    case = bench_inputs.Case("gpu-check-lm-like", "gpu-check", max(2, n // seq_len), seq_len, hidden, vocab,
                             str(dtype).removeprefix("torch."))
    # "Zipf-LM": the frequency-ordered model of a trained LM (make_lm_inputs); else the clustered generator.
    made = (bench_inputs.make_lm_inputs(case, device=str(dev)) if kind == "Zipf-LM"
            else bench_inputs.make_inputs(case, device=str(dev)))
    targets = bench_inputs.shifted_targets(made["labels"]).flatten()
    return made["hidden"].flatten(0, 1), made["weight"], targets


def measure_sparse(n: int, hidden: int, vocab: int, bench, device_name: str, device: str = "cuda",
                   dtype_name: str = "bfloat16", kinds=("Zipf-LM", "trained-LM-like", "random"),
                   tolerance: float = SPARSE_TOLERANCE, stand_in_fraction: float = 0.1) -> list[dict]:
    """Per input kind: the kept fraction the plan gives, forward+backward with grad_tolerance and without, the
    plan and the sparse kernels alone, each next to the cost model at that f (device/dtype: for a CPU test)."""
    import torch

    import fastdpo
    from fastdpo import sparse_plan, vocab_chunks
    from fastdpo.kernels import config, logprob_forward, sparse_backward

    dev, dtype = torch.device(device), getattr(torch, dtype_name)
    out = []
    for kind in kinds:
        h, w, targets = _case_inputs(kind, n, hidden, vocab, dev, dtype)
        rows = (targets != -100).nonzero().squeeze(1)
        row_targets = targets[rows]
        cfg, _tiles = sparse_backward.sparse_gemm_options(dtype, config.device_capability(dev), hidden)
        table, _ = logprob_forward.logprob_forward(h, w, None, rows, row_targets)
        tile_lse = table[0] + torch.log(table[1])
        lse = torch.logsumexp(tile_lse, dim=0)
        stats = kept_statistics(tile_lse, lse, row_targets, cfg["BLOCK_M"], cfg["BLOCK_V"], tolerance)
        kept = stats.pop("kept")
        workspace = config.default_workspace_bytes(dev)
        res = dict(inputs=kind, scored_rows=rows.numel(), tolerance=tolerance, **stats,
                   break_even=vocab_chunks.SPARSE_BREAK_EVEN, workspace_bytes=workspace, rows=[], errors={},
                   model=sparse_model(rows.numel(), hidden, vocab, device_name, workspace, stats["kept_fraction"],
                                      stats["kept_shared"], tokens=h.shape[0]))
        measured = {}

        def row(phase, fn, model_ms=None):
            ms = measured[phase] = _timed(bench, fn, phase, res["errors"])
            res["rows"].append(dict(phase=phase, ms=ms, model_ms=model_ms))

        model = res["model"]
        row("sparse plan: kept_pairs", lambda: sparse_plan.kept_pairs(tile_lse, lse, row_targets, cfg["BLOCK_M"],
                                                                        cfg["BLOCK_V"], tolerance),
            model["phases_ms"].get("sparse plan: kept_pairs (torch)"))
        max_pairs = max(1, workspace // (cfg["BLOCK_M"] * cfg["BLOCK_V"] * h.element_size()))
        if 0 < stats["pairs"] <= max_pairs:  # one chunk: time the three kernels alone
            _time_sparse_kernels(row, model["phases_ms"], h, w, rows, row_targets, lse, kept, cfg)
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        upstream = torch.randn(targets.shape, device=dev)

        def step(tol):
            def run():
                hg.grad = wg.grad = None
                logps = fastdpo.linear_logprobs(hg, wg, targets, backend="triton", grad_tolerance=tol)
                (logps * upstream).sum().backward()
            return run

        row("forward + backward, exact", step(0.0), model["dense_ms"])
        row(f"forward + backward, grad_tolerance={tolerance:g}", step(tolerance), model["tolerance_ms"])
        exact, sparse = measured.get("forward + backward, exact"), measured.get(f"forward + backward, "
                                                                               f"grad_tolerance={tolerance:g}")
        res["measured_ratio"] = sparse / exact if exact and sparse else None
        out.append(res)
        if kind == kinds[-1] and stand_in_fraction:  # the kernels at a set f, whatever the inputs give
            out.append(_stand_in_case(h, w, rows, row_targets, lse, cfg, stand_in_fraction, bench, device_name,
                                      workspace))
        del h, w, hg, wg, table, tile_lse
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _stand_in_case(h, w, rows, targets, lse, cfg, fraction, bench, device_name, workspace) -> dict:
    """The three sparse kernels on the last inputs with cost_model.stand_in_kept's mask at `fraction` (pairs
    spread evenly over the tiles): calibrates the kernels' model where the inputs keep too much."""
    from benchmarks import cost_model as cm

    blocks, tiles = -(-rows.numel() // cfg["BLOCK_M"]), -(-w.shape[0] // cfg["BLOCK_V"])
    kept = cm.stand_in_kept(blocks, tiles, fraction).to(w.device)
    pairs, distinct = int(kept.sum()), int(kept.any(0).sum())
    shared = min(1.0, max(0.0, (1 - distinct / pairs) / (1 - 1 / blocks))) if pairs and blocks > 1 else 0.0
    res = dict(inputs=f"stand-in mask f={fraction:g}", scored_rows=rows.numel(), tolerance=0.0,
               kept_fraction=pairs / (blocks * tiles), kept_shared=shared, pairs=pairs, distinct_tiles=distinct,
               blocks=blocks, tiles=tiles, rows=[], errors={},
               model=sparse_model(rows.numel(), h.shape[1], w.shape[0], device_name, workspace, pairs / (blocks * tiles),
                                  shared, tokens=h.shape[0]))

    def row(phase, fn, model_ms=None):
        res["rows"].append(dict(phase=phase, ms=_timed(bench, fn, phase, res["errors"]), model_ms=model_ms))

    _time_sparse_kernels(row, res["model"]["phases_ms"], h, w, rows, targets, lse, kept, cfg)
    return res


def _timed(bench, fn, phase: str, errors: dict) -> float | None:
    """bench(fn) in ms, or None with the error recorded under `phase`: one failing row keeps the others."""
    try:
        return bench(fn)
    except Exception as exc:  # noqa: BLE001 - keep measuring the other rows
        errors[phase] = f"{type(exc).__name__}: {exc}"[:500]
        return None


def _time_sparse_kernels(row, model_ms, h, w, rows, targets, lse, kept, cfg) -> None:
    import torch

    from fastdpo import sparse_plan
    from fastdpo.kernels import sparse_backward

    pairs = sparse_plan.pair_lists(kept, 0, kept.shape[1])
    d_tiles = torch.empty((pairs.count, cfg["BLOCK_M"] * cfg["BLOCK_V"]), dtype=w.dtype, device=w.device)
    grad = torch.randn(rows.numel(), device=w.device)
    dx = torch.zeros((rows.numel(), h.shape[1]), dtype=torch.float32, device=w.device)
    dw = torch.empty_like(w)
    row("sparse_logits_grad kernel", lambda: sparse_backward.sparse_logits_grad(
        h, w, None, rows, targets, lse, grad, pairs.pair_block, pairs.pair_tile, d_tiles),
        model_ms.get("sparse_logits_grad kernel"))
    row("sparse_dx kernel", lambda: sparse_backward.sparse_dx(d_tiles, w, pairs.block_start, pairs.pair_tile, dx,
                                                              accumulate=False), model_ms.get("sparse_dx kernel"))
    row("sparse_dw kernel", lambda: sparse_backward.sparse_dw(d_tiles, h, rows, pairs.tile_start, pairs.csc_block,
                                                              pairs.csc_slot, 0, dw, None, w.shape[0]),
        model_ms.get("sparse_dw kernel (writes every tile)"))


def sparse_child(part_out: Path, budget_s: float) -> int:
    import torch
    import triton.testing

    device_name = torch.cuda.get_device_name(0)

    def bench(fn):
        fn()  # compile and warm up outside the timing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")

    n, hidden, vocab = SPARSE_SHAPE
    result = dict(device=device_name, budget_s=budget_s, shape=dict(n=n, hidden=hidden, vocab=vocab), cases=[])
    try:
        result["cases"] = measure_sparse(n, hidden, vocab, bench, device_name)
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-2000:]
    part_out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def sparse_markdown(part: dict) -> list[str]:
    lines = []
    for case in part.get("cases", []):
        m = case.get("model", {})
        lines += ["", f"## grad_tolerance={case.get('tolerance', 0):g} on {case['inputs']} inputs "
                      f"({case.get('scored_rows')} scored rows, H={part.get('shape', {}).get('hidden')}, "
                      f"V={part.get('shape', {}).get('vocab')})", "",
                  f"Kept fraction f = {case['kept_fraction']:.4f} ({case['pairs']} of {case['blocks']} x "
                  f"{case['tiles']} pairs; {case['distinct_tiles']} distinct tiles, shared share s = "
                  f"{case['kept_shared']:.2f}); dispatch threshold {case.get('break_even')}. Model at that f and s: "
                  f"{_fmt(m.get('tolerance_ms'), '.1f')} ms ({m.get('path')} path) vs "
                  f"{_fmt(m.get('dense_ms'), '.1f')} ms dense, {_fmt(m.get('ratio'), '.2f')}x; measured "
                  f"{_fmt(case.get('measured_ratio'), '.2f')}x.", "",
                  "| phase | measured ms | model ms |", "|---|---|---|"]
        for r in case.get("rows", []):
            lines.append(f"| {r['phase']} | {_fmt(r.get('ms'), '.2f')} | {_fmt(r.get('model_ms'), '.2f')} |")
    if part.get("error"):
        lines += ["", f"Sparse part error: {part['error']}"]
    return lines


# --- main ---------------------------------------------------------------------------------------------------------


def main(argv=None, cuda_available: bool | None = None, device_name: str | None = None) -> int:
    """cuda_available and device_name default to what torch reports (tests pass them to run without a GPU)."""
    args = parse_args(argv)
    if args.part == "phases":
        return phases_child(args.part_out, args.part_budget_s or 120.0)
    if args.part == "sparse":
        return sparse_child(args.part_out, args.part_budget_s or 120.0)
    import torch

    if not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    name = device_name or torch.cuda.get_device_name(0)
    out_dir = args.out or REPO / "benchmarks" / "results" / device_slug(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(device=name, slug=device_slug(name), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   budget_s=args.budget_s, versions=_safe_versions(), parts={})
    site = None

    def do_setup(timeout_s):
        nonlocal site
        info, site = setup(args, out_dir, timeout_s)
        return info

    steps = [("setup", do_setup), ("tests", lambda t: run_tests(out_dir, site, t)),
             ("phases", lambda t: run_phases(out_dir, site, t)),
             ("sparse", lambda t: run_phases(out_dir, site, t, part="sparse")), ("bench", lambda t: run_bench(out_dir, site, t))]
    for part, fn in steps:
        if part in args.skip:
            results["parts"][part] = dict(status="skipped: --skip")
            continue
        run_part(results, part, fn, budget.for_part(PART_CAPS_S.get(part)))
        if part == "setup":  # the carried wheels are installed now
            results["versions"] = _safe_versions()
        write_results(results, out_dir)
    paths = write_results(results, out_dir)
    if args.copy_to is not None:
        paths = copy_results(out_dir, args.copy_to)
    print(markdown(results))
    print("[gpu_check] wrote " + ", ".join(str(p) for p in paths))
    return 0


def _safe_versions() -> dict:
    try:
        return versions()
    except Exception as exc:  # noqa: BLE001
        return dict(error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    raise SystemExit(main())
