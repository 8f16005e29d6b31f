"""One command on a GPU machine: every speed and memory target of fastdpo measured in one call, in ~540 s.

    python benchmarks/gpu_check.py --budget-s 540 --wheels DIR      # the device run (DIR: the peer wheels)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check     # every part at tiny sizes on a CPU (1-3 min)
    python benchmarks/gpu_check.py [--out DIR] [--budget-s S] [--parts A,B] [--skip A,B] [--wheels DIR] [--dry-run]

The device run needs torch and triton (as installed there) and, for the peer rows, wheels of transformers, peft,
trl, liger-kernel and cut-cross-entropy (with their dependencies that torch does not bring: accelerate, datasets,
tokenizers, safetensors, huggingface-hub and theirs) in a folder given by --wheels DIR: peer wheels in that folder
are pip-installed offline first if the peers are missing (`pip install --no-index --find-links DIR <peer>`, one
peer at a time). A peer that is still missing gives `skipped:` rows, never a failed run.

Parts, in this order, each in its own process with its own time limit (one failure or hang loses only that part;
the results are rewritten after every part, and the bench parts' run.py rewrites its own after every case):
  setup   `fastdpo.kernels` importable (`pip install -e .` if not); peers from --wheels if missing
  phases  kernel speed against cuBLAS for the same GEMM shapes at the fused-pass cases' scored rows (60% of 4k and
          16k tokens, H 4096 and 2048, V 128,256): the forward kernel, the d_logits recompute kernel, the fused
          route's logits kernel (logprob_forward with STORE_LOGITS, fp32 blocks) each "within 1.1x of cuBLAS"
          (goal 1.05x); the two-pass dX/dW GEMMs and end to end next to tools/cost_model.py; at Llama-3-8B 16k the
          two-pass backward's workspace sweep (chunks of 2k-32k columns: each chunk GEMM's speed relative to the
          widest, "C*H >= 2^24 keeps >= 95%"); the device's bf16 GEMM rate and copy bandwidth
  bench   `benchmarks/run.py` on Llama-3.2-1B and Llama-3-8B heads at 4k and 16k tokens (bf16, sigmoid DPO, ~60% of
          tokens scored): fastdpo (fused=True), fastdpo_2pass (fused=False), fastdpo_lean (impls.LEAN_*), TRL 1.16's
          chunked head, Cut Cross-Entropy; the targets (gpu_targets.py): time <= 0.8x TRL's (goal 0.7x), peak above
          the inputs <= 0.6x TRL's, relative error <= 5e-3 against float64, peak <= 1.6x CCE's (goal 1.3x), lean
          peak <= 1.15x CCE's
  frozen  the same four cases with the head frozen (`run.py --frozen`): fastdpo's frozen route vs TRL's head with
          a frozen weight, time <= 0.7x TRL's
  step    benchmarks/trl_step.py: a whole DPOTrainer step, Llama-3.2-1B and Qwen2.5-0.5B configurations (random
          weights), 8 pairs x 1,024 tokens, bf16, stock vs patched TRL, trainable head and LoRA: step time, peak memory
  tests   `pytest tests/test_gpu.py` (bf16 against the float64 oracle)
  long    the bench at Llama-3.2-1B 64k tokens, with whatever time is left
  sparse  (only when named in --parts) grad_tolerance=2**-10 at Llama-3-8B 16k: the kept fraction and the sparse
          kernels next to tools/cost_model.py. Not a target any more, so not run by default (it took ~15 s).
Budget (--budget-s, default 540 s): each part's cap is PART_CAPS_S (less what is left if that is less); the caps
sum to 500 s, long takes the rest. Estimates from the earlier H200 runs (benchmarks/results/nvidia-h200/: about
63 s per run.py case with six implementations, ~12 s of it the input preparation and the float64 reference in a
fresh process; the GPU tests 29 s; the phases of three shapes 14 s): setup 10 s (+ ~30 s when peers come from
wheels), phases 35 s, bench 130 s (4 cases x ~33 s), frozen 80 s (4 x ~20 s), step 75 s (8 trainer runs of
~8 s after ~10 s of imports), tests 30 s, leaving ~160 s for long (one case, ~45 s). Time that earlier parts leave
under their caps goes to the later ones; WRITE_RESERVE_S stays for writing the results.

Results: <out>/gpu_check.json and gpu_check.md (default out: benchmarks/results/<device-name-slug>/, e.g.
nvidia-h200), each part's log and files (bench/, bench-frozen/, bench-long/: run.py's results; step.json);
torch, triton, CUDA and driver versions and the device name inside. Without a CUDA device it prints why and
exits with status 2, running nothing, unless --dry-run: then every part runs on the CPU at tiny sizes (the Triton
kernels in Triton's interpreter) into a new folder benchmarks/results/runs/<time>-gpu-check-dry-run/, which checks
that the script works end to end and measures nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/gpu_check.py` puts benchmarks/ first on sys.path
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_targets  # noqa: E402

PARTS = ("setup", "phases", "bench", "frozen", "step", "tests", "long", "sparse")
DEFAULT_PARTS = tuple(p for p in PARTS if p != "sparse")
DEFAULT_BUDGET_S = 540.0
# Caps (s); None: whatever is left. Estimates from the H200 runs are in the module docstring.
PART_CAPS_S = {"setup": 60.0, "phases": 60.0, "bench": 150.0, "frozen": 90.0, "step": 100.0, "tests": 40.0,
               "long": None, "sparse": 60.0}
WRITE_RESERVE_S = 15.0
CHILD_PARTS = ("phases", "sparse")  # parts that run in a child process of this script
# Peers: (module, distribution), installed from --wheels in this order when missing
PEERS = (("transformers", "transformers"), ("peft", "peft"), ("trl", "trl"), ("liger_kernel", "liger-kernel"),
         ("cut_cross_entropy", "cut-cross-entropy"))
NO_GPU_MESSAGE = ("gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); nothing was run. "
                  "It is meant for a session with a GPU (or --dry-run): see `python benchmarks/gpu_check.py --help`.")


# --- arguments, names, budget --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device-name-slug>")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock seconds for everything (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default {','.join(DEFAULT_PARTS)})")
    p.add_argument("--skip", default="", help="comma-separated parts not to run")
    p.add_argument("--wheels", type=Path, default=None,
                   help="a folder of peer wheels, pip-installed offline in the setup part if the peers are missing")
    p.add_argument("--dry-run", action="store_true",
                   help="every part on the CPU at tiny sizes (Triton's interpreter): checks the script, "
                        "measures nothing")
    # internal: one part in a child process
    p.add_argument("--part", choices=CHILD_PARTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts, args.skip = _part_list(p, "--parts", args.parts), set(_part_list(p, "--skip", args.skip))
    if args.budget_s <= WRITE_RESERVE_S:
        p.error(f"--budget-s must exceed {WRITE_RESERVE_S:.0f} s (the time kept to write the results), "
                f"got {args.budget_s}")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels: {args.wheels} is not a folder")
    return args


def _part_list(parser, option: str, text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"{option}: unknown part(s) {unknown}; choose from {list(PARTS)}")
    return names


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


def _finish(res: dict, timeout_s: float, what: str) -> dict:
    """A child's status from its exit: timed out, failed, or ok."""
    if res["timed_out"]:
        res["status"] = f"error: timed out after {timeout_s:.0f} s (what finished is kept)"
    elif res["returncode"] != 0:
        res["status"] = f"error: {what} exit {res['returncode']} (see {res['log']})"
    return res


# --- parts ------------------------------------------------------------------------------------------------------


def child_env(dry_run: bool = False) -> dict:
    """The children's environment: the Triton kernels compiled on a GPU, interpreted on a CPU dry run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def missing_peers() -> list[str]:
    """Distributions of the peers whose module is not importable here, in install order."""
    importlib.invalidate_caches()
    return [dist for module, dist in PEERS if importlib.util.find_spec(module) is None]


def setup(out_dir: Path, timeout_s: float, wheels: Path | None = None, dry_run: bool = False) -> dict:
    """fastdpo (editable) if `fastdpo.kernels` does not import; each missing peer from the wheels folder."""
    deadline = time.monotonic() + timeout_s
    info = {}
    env = child_env(dry_run)
    probe = [sys.executable, "-c", "import fastdpo.kernels"]
    check = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        info["install_fastdpo"] = run_logged(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
            deadline - time.monotonic(), out_dir / "setup-fastdpo.log", env=env)
        check = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    info["peers_missing"] = missing_peers()
    if wheels is not None:
        info["wheels"] = {dist: _install_wheel(dist, wheels, deadline, out_dir, env) for dist in info["peers_missing"]}
        info["peers_missing_after_wheels"] = missing_peers()
    info["fastdpo_kernels_importable"] = check.returncode == 0
    if check.returncode != 0:
        info["status"] = "error: fastdpo.kernels does not import: " + check.stderr.strip()[-500:]
    return info


def _install_wheel(dist: str, wheels: Path, deadline: float, out_dir: Path, env: dict) -> str:
    left = deadline - time.monotonic()
    if left < 5:
        return "not tried: no time left in the part"
    res = run_logged([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), dist],
                     left, out_dir / f"setup-{dist}.log", env=env)
    return "installed" if res["returncode"] == 0 and not res["timed_out"] else (
        f"error: pip exit {res['returncode']}{' (timed out)' if res['timed_out'] else ''}: {res['tail'][-300:]}")


def run_tests(out_dir: Path, timeout_s: float, dry_run: bool = False) -> dict:
    res = run_logged([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"], timeout_s,
                     out_dir / "tests.log", env=child_env(dry_run))
    res["summary"] = pytest_summary(res["tail"])
    return _finish(res, timeout_s, "pytest")


def run_child_part(out_dir: Path, timeout_s: float, part: str, dry_run: bool = False) -> dict:
    """A child part (phases or sparse) in its own process; it rewrites <part>.json as it goes."""
    part_json = out_dir / f"{part}.json"
    part_json.unlink(missing_ok=True)
    res = run_logged([sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-out", str(part_json),
                      "--part-budget-s", str(max(1.0, timeout_s - 10))] + (["--dry-run"] if dry_run else []),
                     timeout_s, out_dir / f"{part}.log", env=child_env(dry_run))
    if part_json.exists():  # the child rewrites it after every shape, so a timeout keeps what it measured
        res.update(json.loads(part_json.read_text()))
    return _finish(res, timeout_s, part)


# The bench parts: (run.py's output folder, its arguments beyond --device/--out). The fused-pass cases first, the
# frozen-head twins, then 64k tokens with what time is left. A dry run takes the tiny case for each.
FUSED_CASES = "llama3.2-1b-4k,llama3-8b-4k,llama3.2-1b-16k,llama3-8b-16k"
FUSED_IMPLS = "fastdpo,fastdpo_2pass,fastdpo_lean,trl,cce"
BENCH_PARTS = {
    "bench": ("bench", ["--cases", FUSED_CASES, "--impls", FUSED_IMPLS]),
    "frozen": ("bench-frozen", ["--frozen", "--cases", FUSED_CASES, "--impls", "fastdpo,trl"]),
    "long": ("bench-long", ["--cases", "llama3.2-1b-64k", "--impls", FUSED_IMPLS]),
}


def bench_command(part: str, bench_dir: Path, dry_run: bool) -> list[str]:
    _folder, extra = BENCH_PARTS[part]
    if dry_run:  # the tiny case instead of the named ones; `long` repeats the bench's command, so fastdpo alone
        at = extra.index("--cases")
        extra = extra[:at] + ["--tiny"] + extra[at + 2:]
        if part == "long":
            extra = extra[:-1] + ["fastdpo"]
    device = "cpu" if dry_run else "cuda"
    return [sys.executable, "benchmarks/run.py", "--device", device, "--out", str(bench_dir), *extra]


def run_bench(out_dir: Path, timeout_s: float, part: str = "bench", dry_run: bool = False) -> dict:
    bench_dir = out_dir / BENCH_PARTS[part][0]
    res = run_logged(bench_command(part, bench_dir, dry_run), timeout_s, out_dir / f"{part}.log",
                     env=child_env(dry_run))
    res["out"] = str(bench_dir)
    results_json = bench_dir / "results.json"
    res["rows"] = json.loads(results_json.read_text()).get("rows", []) if results_json.exists() else []
    res["checks"] = gpu_targets.fused_pass_checks(res["rows"])
    if results_json.exists() and part != "frozen":
        res["model"] = fused_model(json.loads(results_json.read_text()))
    if res["timed_out"]:
        res["status"] = (f"error: stopped at the budget ({timeout_s:.0f} s); the cases run.py finished are in "
                         f"{bench_dir}/results.json" if res["rows"] else
                         f"error: stopped at the budget ({timeout_s:.0f} s) before run.py finished a case")
    elif res["returncode"] != 0:
        res["status"] = (f"error: benchmarks/run.py exit {res['returncode']} (see {part}.log, which ends with the "
                         "rows that errored)")
    return res


def fused_model(results: dict) -> list[dict]:
    """tools/cost_model.fastdpo_fused's time and peak for each case fastdpo ran in run.py's `results` (its scored
    tokens, positions and sequence length from the case record), beside what was measured: the model's check."""
    from tools import cost_model as cm

    out, device = [], cm.model_device(str(results.get("device", "")))
    for r in results.get("rows", []):
        case = results.get("cases", {}).get(r["case"], {})
        if r["impl"] != "fastdpo" or r.get("status") != "ok" or not case.get("valid_tokens"):
            continue
        shape = cm.Shape(case["valid_tokens"], case["hidden"], case["vocab"], tokens=case["tokens"],
                         seq_len=case["seq_len"])
        p = cm.fastdpo_fused(shape, device)
        out.append(dict(case=r["case"], measured_ms=r.get("ms"), model_ms=p.time_s * 1e3,
                        measured_peak_bytes=r.get("peak_mem_bytes"), model_peak_bytes=p.peak_bytes, notes=p.notes))
    return out


def run_step(out_dir: Path, timeout_s: float, dry_run: bool = False) -> dict:
    """benchmarks/trl_step.py into step.json (rewritten after each trainer run, so a timeout keeps the others)."""
    step_json = out_dir / "step.json"
    step_json.unlink(missing_ok=True)
    size = (["--tiny", "--models", "llama3.2-1b"] if dry_run else
            ["--device", "cuda", "--models", "llama3.2-1b,qwen2.5-0.5b", "--heads", "trainable,lora", "--pairs", "8",
             "--seq-len", "1024", "--warmup", "2", "--steps", "3"])
    res = run_logged([sys.executable, "benchmarks/trl_step.py", *size, "--json", str(step_json)], timeout_s,
                     out_dir / "step.log", env=child_env(dry_run))
    res["rows"] = json.loads(step_json.read_text())["rows"] if step_json.exists() else []
    return _finish(res, timeout_s, "benchmarks/trl_step.py")


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


_fmt = gpu_targets._fmt
BENCH_TITLES = {"bench": "Fused pass: trainable head", "frozen": "Frozen head", "long": "Fused pass at 64k tokens"}


def markdown(results: dict) -> str:
    v = results.get("versions", {})
    parts = results.get("parts", {})
    lines = [f"# gpu_check on {results.get('device', '?')}", "",
             f"torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}, driver {v.get('driver')}, "
             f"commit {str(v.get('commit'))[:12]}; started {results.get('started')}"
             + ("; DRY RUN on a CPU (tiny sizes, nothing measured)" if results.get("dry_run") else ""), "",
             "| part | status | seconds |", "|---|---|---|"]
    for name, part in parts.items():
        lines.append(f"| {name} | {part.get('status')} | {part.get('seconds', '-')} |")
    if parts.get("tests", {}).get("summary"):
        lines += ["", "Tests: " + ", ".join(f"{v} {k}" for k, v in parts["tests"]["summary"].items())]
    for name, title in BENCH_TITLES.items():
        lines += bench_markdown(title, parts.get(name, {}))
    if parts.get("step", {}).get("rows"):
        lines += ["", "## A whole DPOTrainer step (benchmarks/trl_step.py)", ""]
        lines += gpu_targets.step_markdown(parts["step"]["rows"])
    lines += phases_markdown(parts.get("phases", {}))
    lines += sparse_markdown(parts.get("sparse", {}))
    return "\n".join(lines) + "\n"


def bench_markdown(title: str, part: dict) -> list[str]:
    if not part.get("rows"):
        return []
    lines = (["", f"## {title} (run.py's rows: {part.get('out')}/results.md)", ""]
             + gpu_targets.checks_markdown(part.get("checks", [])) + [""] + gpu_targets.rows_markdown(part["rows"]))
    if part.get("model"):
        lines += ["", "fastdpo (the fused route) against tools/cost_model.fastdpo_fused:", "",
                  "| case | measured ms | model ms | measured peak MiB | model peak MiB | model |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m['case']} | {_fmt(m['measured_ms'], '.1f')} | {m['model_ms']:.1f} "
                  f"| {_fmt(m['measured_peak_bytes'] and m['measured_peak_bytes'] / 2**20, '.0f')} "
                  f"| {m['model_peak_bytes'] / 2**20:.0f} | {m['notes']} |" for m in part["model"]]
    return lines


def phases_markdown(phases: dict) -> list[str]:
    lines = []
    if phases.get("ceilings"):
        c = phases["ceilings"]
        lines += ["", f"Measured ceilings: {_fmt(c.get('bf16_tflops'), '.0f')} TFLOP/s bf16 (8192^3 mm), "
                      f"{_fmt(c.get('copy_tbps'), '.2f')} TB/s device copy (read + write)."]
    lines += kernel_summary(phases.get("shapes", []))
    for shape in phases.get("shapes", []):
        lines += shape_markdown(shape)
    if phases.get("sweep"):
        lines += sweep_markdown(phases["sweep"])
    for key in ("ceilings_error", "sweep_error"):
        if phases.get(key):
            lines += ["", f"Phases part, {key.removesuffix('_error')}: {phases[key]}"]
    return lines


def kernel_summary(shapes: list[dict]) -> list[str]:
    """Each kernel's time over cuBLAS's for the same GEMM shape, one row per kernel, one column per shape."""
    measured = [s for s in shapes if s.get("rows")]
    if not measured:
        return []
    ratios = [{r["phase"]: r.get("x_cublas") for r in s["rows"]} for s in measured]
    lines = ["", f"## Kernels against cuBLAS (target {CUBLAS_RATIO_TARGET}x, goal {CUBLAS_RATIO_GOAL}x)", "",
             "| kernel | " + " | ".join(f"n={s['n']}, H={s['hidden']}" for s in measured) + " |",
             "|---|" + "---|" * len(measured)]
    for kernel in KERNEL_ROWS:
        lines.append(f"| {kernel} | " + " | ".join(_fmt(r.get(kernel), ".2f") for r in ratios) + " |")
    return lines


def shape_markdown(shape: dict) -> list[str]:
    if shape.get("error"):
        return ["", f"## Phases at n={shape['n']}, H={shape['hidden']}, V={shape['vocab']}: {shape['error']}"]
    lines = ["", f"## Phases at n={shape['n']}, H={shape['hidden']}, V={shape['vocab']}", "",
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
    if shape.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in shape["errors"].items())]
    return lines


def sweep_markdown(sweep: dict) -> list[str]:
    lines = ["", f"## Two-pass backward, workspace sweep at n={sweep['n']}, H={sweep['hidden']}, V={sweep['vocab']}",
             "", "Each chunk GEMM over the whole vocabulary; speed relative to the widest chunk's.", "",
             "| chunk columns C | C*H | chunks | recompute ms | dX ms | dW ms | recompute speed | dX speed "
             "| dW speed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sweep.get("rows", []):
        ms, speed = r["ms"], r.get("speed", {})
        lines.append(f"| {r['width']} | 2^{r['CH'].bit_length() - 1} | {r['chunks']} | "
                     + " | ".join(_fmt(ms.get(k), ".2f") for k in ("recompute", "dX", "dW")) + " | "
                     + " | ".join(_fmt(speed.get(k), ".1%") for k in ("recompute", "dX", "dW")) + " |")
    verdicts = (f"{k}: {'not measured' if ok is None else 'ok' if ok else 'MISSED'}"
                for k, ok in sweep.get("checks", {}).items())
    lines += ["", "Checks: " + "; ".join(verdicts)]
    if sweep.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in sweep["errors"].items())]
    return lines


def write_results(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "gpu_check.json", out_dir / "gpu_check.md"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(results))
    return paths


# --- the phases part (child process, on the GPU) --------------------------------------------------------------------

CUBLAS_RATIO_TARGET = 1.1  # each kernel within 1.1x of cuBLAS for the same GEMM shape
CUBLAS_RATIO_GOAL = 1.05
SCORED_FRACTION = 0.6  # the fused-pass cases score ~60% of their tokens (benchmarks/inputs.py's labels)
HEADS = {"llama3-8b": 4096, "llama3.2-1b": 2048}  # hidden sizes; both with V = 128,256
VOCAB = 128256
# Phase shapes (scored rows, H, V), most important first; later ones run while the part's time lasts.
PHASE_SHAPES = tuple((round(SCORED_FRACTION * tokens), hidden, VOCAB) for tokens in (16384, 4096)
                     for hidden in HEADS.values())
# The two-pass backward's workspace sweep at Llama-3-8B 16k: chunk widths (vocabulary columns), widest last
SWEEP_SHAPE = PHASE_SHAPES[0]
SWEEP_WIDTHS = (2048, 4096, 8192, 16384, 32768)
SWEEP_SPEED_TARGET = 0.95  # a chunk with C*H >= 2^24 keeps >= 95% of the widest chunk's GEMM speed
SWEEP_FULL_SPEED_CH = 2**24
# A CPU dry run: tiny shapes, the kernels in Triton's interpreter (fp32)
DRY_PHASE_SHAPES = ((20, 16, 96),)
DRY_SWEEP_WIDTHS = (32, 64)
# tools/cost_model.py's per-phase model (ms), called as fn(cost_model.Shape, cost_model.Device) where present



CUBLAS_LOGITS = "cuBLAS logits (X W^T, chunked)"
CUBLAS_LOGITS_BLOCKS = "cuBLAS logits (X W^T, token blocks)"
FUSED_LOGITS = "fused logits kernel (STORE_LOGITS)"
KERNEL_ROWS = ("forward kernel", "logits_grad kernel (recompute)", FUSED_LOGITS)  # checked against cuBLAS
# Rows that are differences of two measured ones: (row, measured, less the measured)
DIFFERENCES = (("dX GEMM + add (cuBLAS)", "backward chunks with dX", "logits_grad kernel (recompute)"),
               ("dW GEMM (cuBLAS)", "backward chunks with dW", "logits_grad kernel (recompute)"))


def model_rows(n: int, hidden: int, vocab: int, device_name: str, workspace_bytes: int) -> tuple[dict, float]:
    """The cost model's prediction for the shape on the model device closest to device_name: ms per measured
    phase (tools/cost_model.phase_rows) and the peak bytes above the inputs."""
    from tools import cost_model as cm

    shape, options = cm.Shape(n, hidden, vocab), cm.Options(workspace_bytes=workspace_bytes)
    return (cm.phase_rows(n, hidden, vocab, device_name, workspace_bytes),
            cm.fastdpo(shape, cm.model_device(device_name), options).peak_bytes)


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
    from fastdpo import triton_head
    from fastdpo.transform import LogitTransform
    from fastdpo.kernels import config, logprob_forward

    dev = torch.device(device)
    dtype = getattr(torch, dtype_name)
    h = torch.randn(n, hidden, device=dev, dtype=dtype)
    w = (torch.randn(vocab, hidden, device=dev) * hidden**-0.5 * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=dev)
    rows = torch.arange(n, device=dev)
    workspace = config.default_workspace_bytes(dev, n, vocab, hidden, dtype)
    width = triton_head.chunk_width(n, w, workspace)
    chunks = [(s, min(s + width, vocab)) for s in range(0, vocab, width)]
    model_ms, model_peak = model_rows(n, hidden, vocab, device_name, workspace)
    out = dict(n=n, hidden=hidden, vocab=vocab, chunk_width=width, chunks=len(chunks),
               config=config.gemm_config(dtype, config.device_capability(dev), hidden), workspace_bytes=workspace,
               model_ms=model_ms, model_peak_bytes=model_peak, rows=[], errors={})
    measured = {}

    def row(phase, ms, cublas=None, note=""):
        measured[phase] = ms
        cublas_ms = measured.get(cublas) if cublas else None
        out["rows"].append(dict(phase=phase, ms=ms, model_ms=model_ms.get(phase), cublas_ms=cublas_ms,
                                x_cublas=ms / cublas_ms if ms and cublas_ms else None, note=note))

    def timed(phase, fn, cublas=None, note=""):
        row(phase, _timed(bench, fn, phase, out["errors"]), cublas, note)

    logits = torch.empty(n, width, device=dev, dtype=dtype)

    def cublas_logits():
        for c0, c1 in chunks:
            torch.mm(h, w[c0:c1].T, out=logits[:, : c1 - c0])

    timed(CUBLAS_LOGITS, cublas_logits, note="2nVH into a bf16 chunk: the forward kernel's GEMM on cuBLAS")
    del logits
    timed("forward kernel", lambda: logprob_forward.logprob_forward(h, w, None, rows, targets), cublas=CUBLAS_LOGITS)
    _time_fused_logits(timed, h, w, targets, config)
    with torch.no_grad():
        timed("forward (end to end)", lambda: fastdpo.linear_logprobs(h, w, targets, backend="triton"))
    _tile_lse, lse = forward_logsumexps(h, w, rows, targets)
    grad = torch.randn(n, device=dev)

    def backward(**need):
        flags = dict(need_dx=False, need_dw=False, need_db=False) | need
        return lambda: triton_head.scored_rows_backward(h, w, None, rows, targets, lse, grad, LogitTransform(),
                                                        workspace_bytes=workspace, **flags)

    timed("logits_grad kernel (recompute)", backward(), cublas=CUBLAS_LOGITS, note=f"{len(chunks)} chunk(s) of {width}")
    timed("backward chunks with dX", backward(need_dx=True), note="the recompute, then dX_scored += D W per chunk")
    timed("backward chunks with dW", backward(need_dw=True), note="the recompute, then dW = D^T X per chunk")
    for phase, total, less in DIFFERENCES:
        parts = measured.get(total), measured.get(less)
        row(phase, parts[0] - parts[1] if None not in parts else None, note=f"{total} less {less}")
    gemms = [measured.get(CUBLAS_LOGITS), measured.get("dX GEMM + add (cuBLAS)"), measured.get("dW GEMM (cuBLAS)")]
    measured["cuBLAS 8P"] = 2 * gemms[0] + gemms[1] + gemms[2] if None not in gemms else None

    hg = h.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    upstream = torch.randn(n, device=dev)

    def step():
        hg.grad = wg.grad = None
        (fastdpo.linear_logprobs(hg, wg, targets, backend="triton") * upstream).sum().backward()

    timed("forward + backward (end to end)", step, cublas="cuBLAS 8P",
          note="cuBLAS column: 2 x logits + dX + dW products alone")
    out["peak_bytes"] = _peak_above_inputs(step, hg, wg) if dev.type == "cuda" else None
    out["checks"] = kernel_checks(out["rows"])
    return out


def kernel_checks(rows: list[dict]) -> dict:
    """'<kernel> within 1.1x of cuBLAS' (and the 1.05x goal) -> bool, for the kernels measured."""
    checks = {}
    for r in rows:
        if r["phase"] in KERNEL_ROWS and r.get("x_cublas") is not None:
            checks[f"{r['phase']} within {CUBLAS_RATIO_TARGET}x of cuBLAS"] = r["x_cublas"] <= CUBLAS_RATIO_TARGET
            checks[f"{r['phase']} within {CUBLAS_RATIO_GOAL}x of cuBLAS (goal)"] = r["x_cublas"] <= CUBLAS_RATIO_GOAL
    return checks


def _time_fused_logits(timed, h, w, targets, config) -> None:
    """The fused route's forward (logprob_forward with STORE_LOGITS, token block by token block into one slot of
    exp-space tiles in the input dtype, as fastdpo.triton_fused.StoredLogits runs it) against cuBLAS writing the
    same blocks of logits in the input dtype."""
    import torch

    from fastdpo.chunked import Rows
    from fastdpo.kernels import logprob_forward
    from fastdpo.triton_fused import StoredLogits

    n, vocab = h.shape[0], w.shape[0]
    block = min(n, StoredLogits.block_rows(Rows(h, None, None)))
    blocks = [(r0, min(r0 + block, n)) for r0 in range(0, n, block)]
    rows = torch.arange(n, device=h.device)
    slot = torch.empty(block, vocab, device=h.device, dtype=h.dtype)

    def cublas_blocks():
        for r0, r1 in blocks:
            torch.mm(h[r0:r1], w.T, out=slot[: r1 - r0])

    def fused_blocks():
        for r0, r1 in blocks:
            logprob_forward.logprob_forward(h, w, None, rows[r0:r1], targets[r0:r1], slot=slot)

    timed(CUBLAS_LOGITS_BLOCKS, cublas_blocks, note=f"{len(blocks)} block(s) of {block} rows, {h.dtype} out")
    timed(FUSED_LOGITS, fused_blocks, cublas=CUBLAS_LOGITS_BLOCKS,
          note="the fused route's pass 1: exp(z - m) kept in slots of the input dtype")


def measure_sweep(n: int, hidden: int, vocab: int, widths, bench, device: str = "cuda",
                  dtype_name: str = "bfloat16") -> dict:
    """The two-pass backward's chunk GEMMs at each chunk width (the recompute kernel through the library's chunk loop
    with the workspace of that width; the dX and dW cuBLAS products over the same chunks), over the whole vocabulary,
    and each one's speed relative to the widest chunk's."""
    import torch

    from fastdpo import triton_head
    from fastdpo.transform import LogitTransform

    dev, dtype = torch.device(device), getattr(torch, dtype_name)
    h = torch.randn(n, hidden, device=dev, dtype=dtype)
    w = (torch.randn(vocab, hidden, device=dev) * hidden**-0.5 * 3).to(dtype)
    targets, rows = torch.randint(0, vocab, (n,), device=dev), torch.arange(n, device=dev)
    _tile_lse, lse = forward_logsumexps(h, w, rows, targets)
    grad = torch.randn(n, device=dev)
    d = torch.randn(n, max(widths), device=dev, dtype=dtype) * 1e-3
    dx = torch.zeros(n, hidden, device=dev, dtype=torch.float32)
    dw = torch.empty_like(w)
    out = dict(n=n, hidden=hidden, vocab=vocab, rows=[], errors={})
    for asked in widths:
        workspace = n * asked * w.element_size()
        width = triton_head.chunk_width(n, w, workspace)
        chunks = [(c0, min(c0 + width, vocab)) for c0 in range(0, vocab, width)]

        def recompute(workspace=workspace):
            triton_head.scored_rows_backward(h, w, None, rows, targets, lse, grad, LogitTransform(), need_dx=False,
                                             need_dw=False, need_db=False, workspace_bytes=workspace)

        def dx_products(chunks=chunks):
            for c0, c1 in chunks:
                triton_head.accumulate_product(dx, d[:, : c1 - c0], w[c0:c1])

        def dw_products(chunks=chunks):
            for c0, c1 in chunks:
                torch.mm(d[:, : c1 - c0].T, h, out=dw[c0:c1])

        ms = {phase: _timed(bench, fn, f"{phase} at {width}", out["errors"])
              for phase, fn in (("recompute", recompute), ("dX", dx_products), ("dW", dw_products))}
        out["rows"].append(dict(width=width, chunks=len(chunks), CH=width * hidden, ms=ms))
    return sweep_speeds(out)


def sweep_speeds(out: dict) -> dict:
    """Each row's speed per phase relative to the widest chunk's (its time / this time), and the check that chunks
    with C*H >= 2^24 keep >= 95% of it."""
    widest = max(out["rows"], key=lambda r: r["width"])
    for r in out["rows"]:
        r["speed"] = {phase: widest["ms"][phase] / ms if ms and widest["ms"].get(phase) else None
                      for phase, ms in r["ms"].items()}
    full = [s for r in out["rows"] if r["CH"] >= SWEEP_FULL_SPEED_CH for s in r["speed"].values() if s is not None]
    out["checks"] = {f"chunks with C*H >= 2^24 keep >= {SWEEP_SPEED_TARGET:.0%} of the widest's speed":
                     min(full) >= SWEEP_SPEED_TARGET if full else None}
    return out


def forward_logsumexps(h, w, rows, targets):
    """(per-tile logsumexp [vocabulary tiles, n], each row's lse [n]) from the Triton forward's table, merged
    over the tiles by the library (fastdpo.softmax_stats)."""
    import torch

    from fastdpo.kernels.logprob_forward import logprob_forward
    from fastdpo.softmax_stats import VocabPartials, logsumexp, merge

    table, target_logit = logprob_forward(h, w, None, rows, targets)
    return table[0] + torch.log(table[1]), logsumexp(merge(VocabPartials(table[0], table[1], target_logit[None])))


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


def child_bench(dry_run: bool):
    """(bench(fn) -> ms, device, dtype name, device name) for a child part: triton's do_bench median on the GPU
    after one call (compilation outside the timing); on a dry run one timed call after one warm-up call."""
    if dry_run:
        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        return bench, "cpu", "float32", "cpu (dry run)"
    import torch
    import triton.testing

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    return bench, "cuda", "bfloat16", torch.cuda.get_device_name(0)


def phases_child(part_out: Path, budget_s: float, dry_run: bool = False) -> int:
    """The ceilings, the first shape, the workspace sweep, then the other shapes while time lasts; part_out is
    rewritten after each."""
    deadline = time.monotonic() + budget_s
    bench, device, dtype_name, device_name = child_bench(dry_run)
    shapes, widths = (DRY_PHASE_SHAPES, DRY_SWEEP_WIDTHS) if dry_run else (PHASE_SHAPES, SWEEP_WIDTHS)
    result = dict(device=device_name, shapes=[], skipped_shapes=[])

    def save(what):
        part_out.write_text(json.dumps(result, indent=2, default=str))
        print(f"[phases] {what} done", flush=True)
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()

    if not dry_run:
        _record(result, "ceilings", lambda: measure_ceilings(bench))
        save("ceilings")
    for i, (n, hidden, vocab) in enumerate(shapes):
        if i and time.monotonic() > deadline - 15:  # a shape takes ~5-10 s once the kernels are compiled
            result["skipped_shapes"].append([n, hidden, vocab])
            continue
        try:
            result["shapes"].append(measure_shape(n, hidden, vocab, bench, device_name, device, dtype_name))
        except Exception as exc:  # noqa: BLE001
            result["shapes"].append(dict(n=n, hidden=hidden, vocab=vocab, error=f"{type(exc).__name__}: {exc}",
                                         traceback=traceback.format_exc()[-2000:]))
        save(f"n={n} H={hidden} V={vocab}")
        if i == 0:
            sweep_shape = shapes[0] if dry_run else SWEEP_SHAPE
            _record(result, "sweep", lambda: measure_sweep(*sweep_shape, widths, bench, device, dtype_name))
            save("workspace sweep")
    return 0


def _record(result: dict, key: str, fn) -> None:
    """result[key] = fn(), or result[key + '_error'] with what went wrong: one failure keeps the other rows."""
    try:
        result[key] = fn()
    except Exception as exc:  # noqa: BLE001
        result[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
        result[f"{key}_traceback"] = traceback.format_exc()[-2000:]


# --- the sparse part (child process, on the GPU): grad_tolerance's block-sparse backward ------------------------------

# Llama-3-8B head, 16 sequences of 1024 tokens (trained-LM-like inputs score only the completions), grad_tolerance
# 2**-10 (the setting the README reports).
SPARSE_SHAPE = (16384, 4096, 128256)
SPARSE_TOLERANCE = 2.0**-10


def kept_statistics(tile_lse, lse, targets, block_m: int, block_v: int, tolerance: float) -> dict:
    """The plan's kept pairs (fastdpo.sparse_plan.kept_pairs) and what kept_summary reads from them."""
    from fastdpo import sparse_plan

    return kept_summary(sparse_plan.kept_pairs(tile_lse, lse, targets, block_m, block_v, tolerance))


def kept_summary(kept) -> dict:
    """The kept fraction f of (token block, vocabulary tile) pairs, and the share s of the kept pairs in tiles
    every block keeps, read from the distinct kept tiles as the cost model counts them:
    distinct = pairs (s / blocks + 1 - s)."""
    blocks, tiles = kept.shape
    pairs = int(kept.sum())
    distinct = int(kept.any(0).sum())
    shared = (1 - distinct / pairs) / (1 - 1 / blocks) if pairs and blocks > 1 else 0.0
    return dict(kept_fraction=pairs / (blocks * tiles), kept_shared=min(1.0, max(0.0, shared)), pairs=pairs,
                distinct_tiles=distinct, blocks=blocks, tiles=tiles, kept=kept)


def sparse_model(n: int, hidden: int, vocab: int, device_name: str, workspace_bytes: int, f: float,
                 shared: float, tokens: int | None = None) -> dict:
    """The cost model at the measured f and s: dense and grad_tolerance totals (ms), its per-phase sparse times."""
    from tools import cost_model as cm

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
    from fastdpo import sparse_plan, triton_head
    from fastdpo.kernels import config, sparse_backward

    dev, dtype = torch.device(device), getattr(torch, dtype_name)
    out = []
    for kind in kinds:
        h, w, targets = _case_inputs(kind, n, hidden, vocab, dev, dtype)
        rows = (targets != -100).nonzero().squeeze(1)
        row_targets = targets[rows]
        cfg, _tiles = sparse_backward.sparse_gemm_options(dtype, config.device_capability(dev), hidden)
        tile_lse, lse = forward_logsumexps(h, w, rows, row_targets)
        stats = kept_statistics(tile_lse, lse, row_targets, cfg["BLOCK_M"], cfg["BLOCK_V"], tolerance)
        kept = stats.pop("kept")
        workspace = config.default_workspace_bytes(dev, rows.numel(), vocab, hidden, dtype)
        res = dict(inputs=kind, scored_rows=rows.numel(), tolerance=tolerance, **stats,
                   break_even=triton_head.SPARSE_BREAK_EVEN, workspace_bytes=workspace, rows=[], errors={},
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
        del h, w, hg, wg, tile_lse
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _stand_in_case(h, w, rows, targets, lse, cfg, fraction, bench, device_name, workspace) -> dict:
    """The three sparse kernels on the last inputs with cost_model.stand_in_kept's mask at `fraction` (pairs
    spread evenly over the tiles): calibrates the kernels' model where the inputs keep too much."""
    from tools import cost_model as cm

    blocks, tiles = -(-rows.numel() // cfg["BLOCK_M"]), -(-w.shape[0] // cfg["BLOCK_V"])
    stats = kept_summary(cm.stand_in_kept(blocks, tiles, fraction).to(w.device))
    kept = stats.pop("kept")
    res = dict(inputs=f"stand-in mask f={fraction:g}", scored_rows=rows.numel(), tolerance=0.0, **stats, rows=[],
               errors={}, model=sparse_model(rows.numel(), h.shape[1], w.shape[0], device_name, workspace,
                                             stats["kept_fraction"], stats["kept_shared"], tokens=h.shape[0]))

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


def sparse_child(part_out: Path, budget_s: float, dry_run: bool = False) -> int:
    bench, device, dtype_name, device_name = child_bench(dry_run)
    n, hidden, vocab = (48, 16, 300) if dry_run else SPARSE_SHAPE
    result = dict(device=device_name, budget_s=budget_s, shape=dict(n=n, hidden=hidden, vocab=vocab), cases=[])
    _record(result, "cases", lambda: measure_sparse(n, hidden, vocab, bench, device_name, device, dtype_name))
    if "cases_error" in result:  # the markdown's name for it
        result["error"] = result.pop("cases_error")
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
        return phases_child(args.part_out, args.part_budget_s or 120.0, args.dry_run)
    if args.part == "sparse":
        return sparse_child(args.part_out, args.part_budget_s or 120.0, args.dry_run)
    import torch

    if not args.dry_run and not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    name = "cpu (dry run)" if args.dry_run else device_name or torch.cuda.get_device_name(0)
    out_dir = args.out or default_out(name, args.dry_run)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(device=name, slug=device_slug(name), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   budget_s=args.budget_s, dry_run=args.dry_run, versions=_safe_versions(), parts={})
    dry = args.dry_run
    steps = {"setup": lambda t: setup(out_dir, t, args.wheels, dry),
             "phases": lambda t: run_child_part(out_dir, t, "phases", dry),
             **{part: (lambda t, part=part: run_bench(out_dir, t, part, dry)) for part in BENCH_PARTS},
             "step": lambda t: run_step(out_dir, t, dry),
             "tests": lambda t: run_tests(out_dir, t, dry),
             "sparse": lambda t: run_child_part(out_dir, t, "sparse", dry)}
    for part in PARTS:
        if part in args.skip or part not in args.parts:
            results["parts"][part] = dict(status="skipped: --skip" if part in args.skip else "skipped: not in --parts")
            continue
        run_part(results, part, steps[part], budget.for_part(PART_CAPS_S.get(part)))
        write_results(results, out_dir)
    paths = write_results(results, out_dir)
    print(markdown(results))
    print("[gpu_check] wrote " + ", ".join(str(p) for p in paths))
    return 0


def default_out(device_name: str, dry_run: bool) -> Path:
    """benchmarks/results/<device slug>/; a dry run writes to a new git-ignored folder instead."""
    if dry_run:
        from benchmarks.run import new_run_dir

        return new_run_dir("gpu-check-dry-run")
    return REPO / "benchmarks" / "results" / device_slug(device_name)


def _safe_versions() -> dict:
    try:
        return versions()
    except Exception as exc:  # noqa: BLE001
        return dict(error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    raise SystemExit(main())
