"""benchmarks/gpu_check.py end to end on a CPU (--dry-run: every part at tiny sizes), and the pieces it reads
its targets with (benchmarks/gpu_targets.py), the budget, the wheels install and trl_step.py's skipped rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu_check, gpu_targets, impls, inputs  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every default part (a few minutes on 2 busy cores, ~1 minute idle)."""
    out = tmp_path_factory.mktemp("gpu-check") / "dry"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_runs_every_default_part(dry_run):
    out, results = dry_run
    assert results["dry_run"] and results["device"] == "cpu (dry run)"
    statuses = {name: part["status"] for name, part in results["parts"].items()}
    assert statuses == {**{p: "ok" for p in gpu_check.DEFAULT_PARTS}, "sparse": "skipped: not in --parts"}, statuses
    text = (out / "gpu_check.md").read_text()
    for heading in ("## Fused pass: trainable head", "## Frozen head", "## Fused pass at 64k tokens",
                    "## A whole DPOTrainer step", "## Kernels against cuBLAS", "## Phases at n=20, H=16, V=96",
                    "workspace sweep", "against tools/cost_model.fastdpo_fused"):
        assert heading in text, heading
    for folder in ("bench", "bench-frozen", "bench-long"):
        assert (out / folder / "results.json").exists()


def test_dry_run_fills_every_target(dry_run):
    _out, results = dry_run
    parts = results["parts"]
    checks = {(c["case"], c["measure"]): c for c in parts["bench"]["checks"]}
    assert len(checks) == len(gpu_targets.TRAINABLE_CHECKS)
    assert all(c["value"] is not None for c in checks.values()), checks  # every impl ran on the tiny case
    assert checks[("tiny-h32-v500", "fastdpo relative error")]["ok"]
    frozen = parts["frozen"]["checks"]
    assert {c["case"] for c in frozen} == {"tiny-h32-v500-frozen"} and len(frozen) == len(gpu_targets.FROZEN_CHECKS)
    assert [r["impl"] for r in parts["long"]["rows"]] == ["fastdpo"]
    # the fused route's model beside its measured time and peak
    model = {m["case"]: m for m in parts["bench"]["model"]}
    assert model["tiny-h32-v500"]["model_ms"] > 0 and model["tiny-h32-v500"]["model_peak_bytes"] > 0
    assert "model" not in parts["frozen"]
    # the kernels against cuBLAS, the fused logits kernel among them, and the sweep's two widths
    shape = parts["phases"]["shapes"][0]
    assert not shape["errors"], shape["errors"]
    assert {gpu_check.FUSED_LOGITS, "forward kernel", "logits_grad kernel (recompute)"} <= {
        r["phase"] for r in shape["rows"] if r["x_cublas"] is not None}
    assert any(k.startswith(gpu_check.FUSED_LOGITS) for k in shape["checks"])
    sweep = parts["phases"]["sweep"]
    assert [r["width"] for r in sweep["rows"]] == list(gpu_check.DRY_SWEEP_WIDTHS) and not sweep["errors"]
    steps = parts["step"]["rows"]
    assert {(r["head"], r["trl"]) for r in steps} == {(h, t) for h in ("trainable", "lora")
                                                      for t in ("stock", "patched")}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in steps), steps


def test_gpu_commands_name_the_target_cases():
    cmd = gpu_check.bench_command("bench", Path("out"), dry_run=False)
    assert cmd[cmd.index("--device") + 1] == "cuda"
    cases = cmd[cmd.index("--cases") + 1].split(",")
    assert sorted(cases) == sorted(["llama3.2-1b-4k", "llama3.2-1b-16k", "llama3-8b-4k", "llama3-8b-16k"])
    assert set(cmd[cmd.index("--impls") + 1].split(",")) == {"fastdpo", "fastdpo_2pass", "fastdpo_lean", "trl", "cce"}
    frozen = gpu_check.bench_command("frozen", Path("out"), dry_run=False)
    assert "--frozen" in frozen and frozen[frozen.index("--impls") + 1] == "fastdpo,trl"
    long = gpu_check.bench_command("long", Path("out"), dry_run=False)
    assert long[long.index("--cases") + 1] == "llama3.2-1b-64k"
    gpu_cases = {c.name: c for c in inputs.case_set("cuda", quick=False)}
    for name in cases:  # each pattern names exactly one case of the GPU set, and its frozen twin exists
        assert [c for c in gpu_cases if name in c] == [name] and f"{name}-frozen" in inputs.all_cases()
    assert all(i in impls.IMPLS for i in gpu_check.FUSED_IMPLS.split(","))
    dry = gpu_check.bench_command("frozen", Path("out"), dry_run=True)
    assert "--tiny" in dry and "--cases" not in dry and dry[dry.index("--device") + 1] == "cpu"


def test_phase_shapes_are_the_fused_pass_cases():
    assert gpu_check.PHASE_SHAPES[0] == gpu_check.SWEEP_SHAPE == (9830, 4096, 128256)
    assert set(gpu_check.PHASE_SHAPES) == {(n, h, 128256) for n in (9830, 2458) for h in (4096, 2048)}
    assert gpu_check.CUBLAS_RATIO_TARGET == 1.1 and gpu_check.CUBLAS_RATIO_GOAL == 1.05
    assert gpu_check.SWEEP_WIDTHS == (2048, 4096, 8192, 16384, 32768)


def test_the_budget_leaves_time_for_the_long_case():
    capped = sum(cap for part, cap in gpu_check.PART_CAPS_S.items() if part in gpu_check.DEFAULT_PARTS and cap)
    assert gpu_check.DEFAULT_BUDGET_S == 540
    assert capped + gpu_check.WRITE_RESERVE_S <= gpu_check.DEFAULT_BUDGET_S
    assert gpu_check.PART_CAPS_S["long"] is None and gpu_check.DEFAULT_PARTS[-1] == "long"
    assert "sparse" not in gpu_check.DEFAULT_PARTS


def _row(case, impl, ms, peak, err, status="ok"):
    return dict(case=case, impl=impl, ms=ms, peak_mem_bytes=peak, rel_err=err, status=status)


def test_fused_pass_checks_read_ratios_and_verdicts():
    rows = [_row("c", "fastdpo", 7.5, 600, 2e-3), _row("c", "trl", 10.0, 1000, 1e-2), _row("c", "cce", 20.0, 500, 5e-2),
            _row("c", "fastdpo_lean", 30.0, 560, 6e-3), _row("c", "fastdpo_2pass", None, None, None, "error: x"),
            _row("c-frozen", "fastdpo", 8.0, 100, 1e-3), _row("c-frozen", "trl", 10.0, 200, 1e-3)]
    checks = {(c["case"], c["measure"]): c for c in gpu_targets.fused_pass_checks(rows)}
    time = checks[("c", "fastdpo time / trl's")]
    assert time["value"] == pytest.approx(0.75) and time["ok"] and not time["goal_met"]
    assert gpu_targets.verdict(time) == "ok, goal missed"
    assert checks[("c", "fastdpo peak memory / trl's")]["value"] == pytest.approx(0.6)
    assert checks[("c", "fastdpo peak memory / cce's")]["value"] == pytest.approx(1.2)
    assert gpu_targets.verdict(checks[("c", "fastdpo peak memory / cce's")]) == "ok, goal met"
    lean = checks[("c", "fastdpo_lean relative error")]
    assert lean["ok"] is False and gpu_targets.verdict(lean) == "MISSED"
    assert checks[("c", "fastdpo_lean peak memory / cce's")]["ok"]  # 1.12 <= 1.15
    assert gpu_targets.verdict(checks[("c", "fastdpo_2pass time / trl's")]) == "not measured"
    frozen = checks[("c-frozen", "fastdpo time / trl's")]
    assert frozen["value"] == pytest.approx(0.8) and frozen["target"] == 0.7 and not frozen["ok"]
    assert ("c-frozen", "fastdpo peak memory / cce's") not in checks
    text = "\n".join(gpu_targets.checks_markdown(list(checks.values())))
    assert "| c | fastdpo time / trl's | 0.75 | 0.80 | 0.70 | ok, goal missed |" in text


def test_sweep_speeds_are_relative_to_the_widest_chunk():
    rows = [dict(width=w, chunks=1, CH=w * 4096, ms=dict(recompute=ms, dX=ms, dW=None))
            for w, ms in ((2048, 12.0), (4096, 10.4), (32768, 10.0))]
    out = gpu_check.sweep_speeds(dict(n=1, hidden=4096, vocab=1, rows=rows, errors={}))
    speeds = [r["speed"]["recompute"] for r in out["rows"]]
    assert speeds == pytest.approx([10 / 12, 10 / 10.4, 1.0]) and out["rows"][0]["speed"]["dW"] is None
    assert list(out["checks"].values()) == [True]  # 2048 x 4096 = 2^23 is below the bound; 4096 keeps 96%
    out["rows"][1]["ms"]["dX"] = 11.0
    assert list(gpu_check.sweep_speeds(out)["checks"].values()) == [False]
    assert "| 4096 | 2^24 | 1 |" in "\n".join(gpu_check.sweep_markdown(out))


def test_setup_installs_each_missing_peer_from_the_wheels(tmp_path, monkeypatch):
    calls, missing = [], [["trl", "cut-cross-entropy"], []]
    monkeypatch.setattr(gpu_check, "missing_peers", lambda: missing.pop(0))

    def fake_run_logged(cmd, timeout_s, log_path, env=None):
        calls.append(cmd)
        return dict(returncode=0, timed_out=False, tail="")

    monkeypatch.setattr(gpu_check, "run_logged", fake_run_logged)
    info = gpu_check.setup(tmp_path, 60.0, wheels=tmp_path)
    assert info["wheels"] == {"trl": "installed", "cut-cross-entropy": "installed"}
    assert info["peers_missing_after_wheels"] == [] and info["fastdpo_kernels_importable"]
    assert [cmd[-4:] for cmd in calls] == [["--no-index", "--find-links", str(tmp_path), dist]
                                           for dist in ("trl", "cut-cross-entropy")]
    assert all(cmd[1:4] == ["-m", "pip", "install"] for cmd in calls)


def test_trl_step_skips_a_missing_package(monkeypatch):
    import importlib

    from benchmarks import trl_step

    real = importlib.import_module

    def no_peft(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("No module named 'peft'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_peft)
    args = trl_step.parse_args(["--tiny"])
    row = trl_step.measure(args, "llama3.2-1b", "lora", patched=True)
    assert row["status"].startswith("skipped: peft not importable") and row["trl"] == "patched"
    text = "\n".join(gpu_targets.step_markdown([row, dict(row, trl="stock")]))
    assert "| llama3.2-1b | lora | - | - | - |" in text and "skipped: peft" in text


def test_step_markdown_pairs_stock_and_patched():
    rows = [dict(model="m", head="trainable", trl="stock", status="ok", ms=200.0, peak_bytes=4 << 30),
            dict(model="m", head="trainable", trl="patched", status="ok", ms=100.0, peak_bytes=2 << 30)]
    assert gpu_targets.step_markdown(rows)[2] == "| m | trainable | 200.0 | 100.0 | 2.00 | 4.00 | 2.00 | ok |"
