"""Fast tests of the benchmark runner (benchmarks/): everything but the measurements themselves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import impls, inputs, measure, report, run, worker  # noqa: E402
from benchmarks.inputs import Case  # noqa: E402

TINY = Case("tiny", "tiny", 4, 48, 32, 500, "float32")
TINY_CAP = Case("tiny-cap", "tiny", 4, 48, 32, 500, "float32", softcap=30.0)


# --- arguments ----------------------------------------------------------------------------------------------------


def test_defaults_without_cuda():
    # No flag on a CPU machine: the small set, into a new git-ignored run folder, never a committed one
    args = run.parse_args([], cuda_available=False)
    assert args.device == "cpu" and args.quick
    assert args.out.parent == REPO / "benchmarks" / "results" / "runs" and args.out.name.endswith("-cpu")
    assert not args.out.exists()
    assert args.impls == list(impls.DEFAULT_IMPLS)
    assert args.timeout == 600.0
    assert "benchmarks/results/runs/" in (REPO / ".gitignore").read_text().split()


def test_full_cpu_set_and_gpu_default():
    full = run.parse_args(["--full"], cuda_available=False)
    assert not full.quick and full.timeout == 3600.0 and full.out.name.endswith("-cpu-full")
    assert len(run.select_cases("cpu", full.quick, None)) > len(run.select_cases("cpu", True, None))
    gpu = run.parse_args(["--out", "x"], cuda_available=True)
    assert gpu.device == "cuda" and not gpu.quick  # on a GPU the default is the GPU set
    assert run.parse_args(["--quick"], cuda_available=True).quick
    with pytest.raises(SystemExit):
        run.parse_args(["--quick", "--full"], cuda_available=False)


def test_explicit_out_is_used(tmp_path):
    assert run.parse_args(["--out", str(tmp_path / "cpu")], cuda_available=False).out == tmp_path / "cpu"


def test_new_run_dir_never_reuses_a_folder(tmp_path, monkeypatch):
    from datetime import datetime

    monkeypatch.setattr(run, "RESULTS", tmp_path)
    now = datetime(2026, 1, 2, 3, 4, 5)
    first = run.new_run_dir("cpu", now)
    assert first == tmp_path / "runs" / "20260102-030405-cpu"
    first.mkdir(parents=True)
    assert run.new_run_dir("cpu", now) == tmp_path / "runs" / "20260102-030405-cpu-2"


def test_cuda_requested_without_cuda_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run.parse_args(["--device", "cuda"], cuda_available=False)
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_impl_selection_and_unknown_impl(tmp_path):
    args = run.parse_args(["--impls", "naive, trl", "--out", str(tmp_path)], cuda_available=False)
    assert args.impls == ["naive", "trl"] and args.out == tmp_path
    with pytest.raises(SystemExit):
        run.parse_args(["--impls", "naive,nope"], cuda_available=False)


def test_every_required_implementation_is_registered():
    assert list(impls.IMPLS) == ["fastdpo", "fastdpo_2pass", "fastdpo_lean", "fastdpo_tol", "naive", "trl", "liger",
                                 "cce", "torch_lce"]
    # fastdpo's other settings run when named (gpu_check.py names them), so the default set keeps its length
    assert list(impls.DEFAULT_IMPLS) == ["fastdpo", "fastdpo_tol", "naive", "trl", "liger", "cce", "torch_lce"]


def test_frozen_and_tiny_sets():
    gpu = inputs.case_set("cuda", quick=False)
    frozen = inputs.case_set("cuda", quick=False, frozen_head=True)
    assert [c.name for c in frozen] == [f"{c.name}-frozen" for c in gpu]
    assert all(c.frozen_head for c in frozen) and not any(c.frozen_head for c in gpu)
    assert [(c.tokens, c.hidden, c.vocab) for c in frozen] == [(c.tokens, c.hidden, c.vocab) for c in gpu]
    assert {c.name for c in frozen} <= set(inputs.all_cases())  # workers look cases up by name
    args = run.parse_args(["--tiny", "--frozen"], cuda_available=False)
    assert args.quick and args.out.name.endswith("-cpu-tiny-frozen")
    assert [c.name for c in run.select_cases("cpu", True, None, frozen=True, tiny=True)] == ["tiny-h32-v500-frozen"]


def test_frozen_head_inputs_and_errors(tiny_case):
    saved, ref = tiny_case
    inp = worker.leaf_inputs(saved, frozen_head=True)
    assert inp["hidden"].requires_grad and not inp["weight"].requires_grad
    errs = measure.errors(ref["loss"], ref["grad_hidden"], None, ref, frozen_head=True)
    assert errs == {"loss": 0.0, "hidden": 0.0}  # no weight gradient to check (nor an inf for its absence)


def test_lean_setting_bounds_the_workspace(tiny_case):
    saved, _ref = tiny_case
    inp = worker.leaf_inputs(saved)
    assert impls.LEAN_WORKSPACE_BYTES == 32 << 20  # README's smallest-memory setting
    _run, note = impls.make_fastdpo_lean(inp, TINY)
    assert f"workspace_bytes={impls.LEAN_WORKSPACE_BYTES}" in note and f"fused={impls.LEAN_FUSED}" in note


def test_case_filter():
    assert [c.name for c in run.select_cases("cpu", True, "v64k")] == ["cpu-2k-h256-v64k"]
    assert run.select_cases("cpu", True, "nothing-matches") == []
    # in the order the patterns are given; a case matched by two patterns runs once
    order = [c.name for c in run.select_cases("cuda", False, "llama3-8b-4k,llama3.2-1b-4k,4k")]
    assert order[:2] == ["llama3-8b-4k", "llama3.2-1b-4k"] and len(order) == len(set(order)) > 2


# --- case sets ----------------------------------------------------------------------------------------------------


def test_quick_cpu_cases_are_two_2k_token_heads():
    cases = inputs.case_set("cpu", quick=True)
    assert {(c.n_seqs, c.seq_len, c.hidden, c.vocab, c.dtype) for c in cases} == {
        (8, 256, 256, 32768, "float32"), (8, 256, 256, 65536, "float32")}
    assert len(inputs.case_set("cpu", quick=False)) > len(cases)


def test_gpu_case_set_uses_real_heads_in_bf16():
    cases = inputs.case_set("cuda", quick=False)
    heads = {(c.hidden, c.vocab, c.softcap) for c in cases}
    assert heads == {(2048, 128256, None), (4096, 128256, None), (3584, 152064, None), (2304, 256000, 30.0)}
    assert all(c.dtype == "bfloat16" and c.n_seqs % 2 == 0 for c in cases)
    assert min(c.tokens for c in cases) == 4096 and max(c.tokens for c in cases) == 65536
    long = [c for c in cases if c.n_seqs == 2]
    assert len(long) == 1 and long[0].tokens == 32768 and long[0].seq_len == 16384
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert set(names) <= set(inputs.all_cases())  # workers look cases up by name


# --- input generator ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [TINY, TINY_CAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("target", [1.5, 3.5])
def test_entropy_calibration(case, target):
    inp = inputs.make_inputs(case, target_entropy=target)
    stats = inputs.input_stats(inp, case.softcap)
    assert abs(stats["mean_entropy"] - target) < 0.4, stats
    assert stats["target_top1"] > 0.3  # peaked on the target, not uniform (log 500 = 6.2 nats)


def test_generator_shapes_labels_and_determinism():
    a, b = inputs.make_inputs(TINY, seed=3), inputs.make_inputs(TINY, seed=3)
    assert a["hidden"].shape == (4, 48, 32) and a["weight"].shape == (500, 32)
    assert torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["labels"], b["labels"])
    labels = a["labels"]
    assert (labels[:, 0] == inputs.IGNORE_INDEX).all()  # prompts are masked
    valid = labels != inputs.IGNORE_INDEX
    assert 0 < valid.sum() < labels.numel()
    # chosen row i and rejected row i + B share the prompt
    first_valid = valid.float().argmax(1)
    assert torch.equal(first_valid[:2], first_valid[2:])
    t = inputs.shifted_targets(labels)
    assert torch.equal(t[:, :-1], labels[:, 1:]) and (t[:, -1] == inputs.IGNORE_INDEX).all()


def test_calibration_handles_softcap_saturation():
    # One strong logit per row plus a spread: with softcap the entropy falls, then rises again once every logit
    # saturates at +-softcap (U-shaped); the calibration must land on the falling branch
    gen = torch.Generator().manual_seed(0)
    base = 0.1 * torch.randn(32, 1000, generator=gen)
    base[:, 0] = 1.0

    def entropy(s):
        return inputs.token_entropy(inputs.transform(base * s, 10.0)).mean().item()

    assert entropy(1e4) > 5.0 and min(entropy(s) for s in (15, 20, 25)) < 2.5  # really U-shaped
    s = inputs.calibrate_scale(base, 10.0, target=3.0)
    assert entropy(s) == pytest.approx(3.0, abs=0.05)
    assert entropy(1.2 * s) < entropy(s)  # falling branch


# --- reference and errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [TINY, TINY_CAP], ids=["plain", "softcap"])
def test_fp64_reference_matches_autograd(case):
    inp = inputs.make_inputs(case)
    ref = measure.reference_fp64(inp, case.softcap, inputs.BETA, budget_bytes=40_000)  # forces several chunks
    h = inp["hidden"].double().requires_grad_(True)
    w = inp["weight"].double().requires_grad_(True)
    t = inputs.shifted_targets(inp["labels"])
    logp = inputs.transform(h @ w.T, case.softcap).log_softmax(-1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    seq = logp.masked_fill(t == inputs.IGNORE_INDEX, 0).sum(-1)
    loss = measure.sigmoid_dpo(seq, inp["ref_chosen_logps"].double(), inp["ref_rejected_logps"].double(),
                               inputs.BETA)
    loss.backward()
    assert ref["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    assert measure.rel_err(h.grad, ref["grad_hidden"]) < 1e-10
    assert measure.rel_err(w.grad, ref["grad_weight"]) < 1e-10


def test_rel_err():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert measure.rel_err(torch.tensor([3.0, 4.0]), ref) == 0
    assert measure.rel_err(torch.tensor([3.0, 3.0]), ref) == pytest.approx(0.2)
    assert measure.rel_err(None, ref) == math.inf


# --- one implementation in-process: ok, skipped, error ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_case():
    saved = inputs.make_inputs(TINY)
    return saved, measure.reference_fp64(saved, None, inputs.BETA)


def test_naive_row_is_ok_and_accurate(tiny_case):
    saved, ref = tiny_case
    row = worker.bench_impl("naive", impls.make_naive, saved, TINY, ref, "cpu", quick=True)
    assert row["status"] == "ok", row
    assert row["rel_err"] < 1e-5 and row["ms"] > 0 and row["peak_mem_bytes"] >= 0
    assert set(report.ROW_KEYS) <= set(row)
    assert row["runs"] >= 3 and row["ms_min"] <= row["ms"] <= row["ms_max"]  # a spread, not a single run


def test_wrong_implementation_shows_in_rel_err(tiny_case):
    saved, ref = tiny_case

    def make_wrong(inp, case):
        run, note = impls.make_naive(inp, case)
        return (lambda: 1.5 * run()), note

    row = worker.bench_impl("wrong", make_wrong, saved, TINY, ref, "cpu", quick=True)
    assert row["status"] == "ok" and row["rel_err"] == pytest.approx(0.5, rel=1e-3)


def test_failing_peer_becomes_error_row(tiny_case):
    saved, ref = tiny_case

    def make_broken(inp, case):
        def run():
            raise RuntimeError("kernel exploded")
        return run, "broken"

    row = worker.bench_impl("broken", make_broken, saved, TINY, ref, "cpu")
    assert row["status"] == "error: RuntimeError: kernel exploded"
    assert row["ms"] is None and row["rel_err"] is None


def test_missing_peer_becomes_skipped_row(tiny_case, monkeypatch):
    saved, ref = tiny_case
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    for name in ("liger", "cce"):
        row = worker.bench_impl(name, impls.IMPLS[name], saved, TINY, ref, "cpu")
        assert row["status"].startswith("skipped: ") and "not importable" in row["status"], row
        assert 'pip install -e ".[bench]"' in row["status"]


def test_peers_without_softcap_are_skipped(tiny_case):
    saved, ref = tiny_case
    for name in ("liger", "torch_lce"):
        row = worker.bench_impl(name, impls.IMPLS[name], saved, TINY_CAP, ref, "cpu")
        assert row["status"].startswith("skipped: ") and "softcap" in row["status"]


def test_nan_result_is_an_error(tiny_case):
    saved, ref = tiny_case

    def make_nan(inp, case):
        run, note = impls.make_naive(inp, case)
        return (lambda: run() * float("nan")), note

    assert worker.bench_impl("nan", make_nan, saved, TINY, ref, "cpu")["status"].startswith("error: non-finite")


# --- orchestration with fake workers ------------------------------------------------------------------------------


def _row(name, case=TINY, ms=1.0):
    row = worker.base_row(name, case)
    row.update(ms=ms, peak_mem_bytes=10, rel_err=1e-7, status="ok")
    return row


def fake_launcher(die_on=(), calls=None):
    """A bench worker that reports every name but dies right after starting any name in die_on."""

    def launch(names, on_line):
        if calls is not None:
            calls.append(list(names))
        for n in names:
            on_line(worker.TAG_START + n)
            if n in die_on:
                return -11, "Segmentation fault"
            on_line(worker.TAG_ROW + json.dumps(_row(n)))
        return 0, ""

    return launch


def test_run_case_isolated_runs_one_worker_per_impl():
    calls = []
    rows = run.run_case(TINY, ["a", "b", "c"], True, fake_launcher(calls=calls))
    assert calls == [["a"], ["b"], ["c"]]
    assert [r["impl"] for r in rows] == ["a", "b", "c"] and all(r["status"] == "ok" for r in rows)


def test_run_case_worker_crash_costs_only_the_running_impl():
    calls = []
    rows = run.run_case(TINY, ["a", "b", "c"], False, fake_launcher(die_on={"b"}, calls=calls))
    assert calls == [["a", "b", "c"], ["c"]]  # a new worker picks up after the crash
    assert [r["impl"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["status"].startswith("error: worker exited with code -11")
    assert "Segmentation fault" in rows[1]["status"]
    assert rows[0]["status"] == rows[2]["status"] == "ok"


def test_run_case_silent_worker_death():
    rows = run.run_case(TINY, ["a", "b"], True, lambda names, on_line: (1, "ImportError: boom"))
    assert [r["status"] for r in rows] == ["error: worker exited with code 1: ImportError: boom"] * 2


def fake_worker_process(statuses: dict):
    """run.launch_worker's stand-in: prep reports fixed statistics; bench gives each name in `statuses` a row with
    that status (a skip or an error) and every other name an ok row after two step reports."""

    def launch_worker(argv, on_line, timeout, log_path):
        cmd, case = argv[0], argv[argv.index("--case") + 1]
        if cmd == "prep":
            on_line(worker.TAG_INFO + json.dumps({"mean_entropy": 2.5, "target_top1": 0.7, "mean_target_logp": -1.5,
                                                  "valid_tokens": 1000, "versions": {"torch": "x"},
                                                  "device_name": "cpu"}))
            return 0, ""
        for name in argv[argv.index("--impls") + 1].split(","):
            on_line(worker.TAG_START + name)
            if name in statuses:
                row = worker.base_row(name, inputs.all_cases()[case])
                row["status"] = statuses[name]
            else:
                on_line(worker.TAG_STEP + json.dumps({"impl": name, "done": 0, "planned": None, "what": "warm-up"}))
                on_line(worker.TAG_STEP + json.dumps({"impl": name, "done": 1, "planned": 3, "what": "run 1/3"}))
                row = _row(name, inputs.all_cases()[case])
            on_line(worker.TAG_ROW + json.dumps(row))
        return 0, ""

    return launch_worker


def test_main_end_to_end_with_fake_workers(tmp_path, monkeypatch, capsys):
    """main(): prep + bench workers (faked), progress lines, results.json/.md in --out."""
    monkeypatch.setattr(run, "launch_worker", fake_worker_process({"liger": "skipped: liger-kernel not importable"}))
    monkeypatch.setattr(report, "write_plots", lambda *a, **k: [])
    # A peer that is not installed is a skip, not a failure: exit status 0
    assert run.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls", "naive,liger"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    report.validate(results)
    assert [(r["case"], r["impl"]) for r in results["rows"]] == [
        ("cpu-2k-h256-v32k", "naive"), ("cpu-2k-h256-v32k", "liger"),
        ("cpu-2k-h256-v64k", "naive"), ("cpu-2k-h256-v64k", "liger")]
    assert results["versions"] == {"torch": "x"}
    load = results["machine_load"]  # how busy the machine was, kept with the numbers
    assert load["wall_s"] >= 0 and load["cores"] >= 1
    if Path("/proc/stat").exists():
        assert load["other_processes_cores"] >= 0
    assert results["cases"]["cpu-2k-h256-v32k"]["mean_entropy"] == 2.5
    md = (tmp_path / "results.md").read_text()
    assert "skipped: liger-kernel not importable" in md and "| cpu-2k-h256-v64k | naive |" in md
    out = capsys.readouterr().out
    assert "mean entropy 2.50" in out
    lines = out.splitlines()
    assert any(x.split()[:2] == ["cpu-2k-h256-v32k", "liger"] and "skipped: liger-kernel" in x for x in lines)
    assert any(x.split()[:2] == ["cpu-2k-h256-v64k", "naive"] and " ms " in x for x in lines)
    verdict = out[out.index("wrote "):]  # what follows the final table
    assert "cpu-2k-h256-v64k liger: skipped: liger-kernel not importable" in verdict
    assert "FAILED" not in verdict and "all 2 measured row(s) ok" in verdict


@pytest.mark.parametrize("failing", ["trl", "fastdpo"])
def test_an_error_row_is_listed_after_the_table_and_fails_the_run(failing, tmp_path, monkeypatch, capsys):
    """An installed peer (or fastdpo itself) that errors: every such row named under the final table, exit status 1;
    a peer that is not installed stays a skip beside it."""
    error = "error: ImportError: cannot import name 'CUDAProperties' from 'kernels'"
    monkeypatch.setattr(run, "launch_worker", fake_worker_process({failing: error,
                                                                   "cce": "skipped: cut-cross-entropy not importable"}))
    monkeypatch.setattr(report, "write_plots", lambda *a, **k: [])
    rc = run.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls", f"naive,{failing},cce"])
    assert rc == run.EXIT_ROWS_FAILED != 0
    verdict = capsys.readouterr().out.split("wrote ")[-1]  # what follows the final table
    assert "FAILED: 2 of 6 row(s) ended in an error" in verdict
    for case in ("cpu-2k-h256-v32k", "cpu-2k-h256-v64k"):
        assert f"  {case} {failing}: {error}" in verdict.splitlines()
        assert f"  {case} cce: skipped: cut-cross-entropy not importable" in verdict.splitlines()
    assert [r["status"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]].count(error) == 2


def test_progress_moves_with_steps_and_beats_without_a_terminal(capsys):
    progress = run.Progress(1, ["a", "b"], interactive=False, heartbeat_s=0.05)
    progress.start_case(TINY)
    progress("start", TINY, "a", None)
    progress("step", TINY, "a", {"impl": "a", "done": 1, "planned": 2, "what": "run 1/2: 10 ms"})
    assert progress.bar.n == pytest.approx(0.5)  # warm-up and one of two runs done, the memory step to come
    assert progress.eta_s() is not None
    import time

    time.sleep(0.3)
    progress("row", TINY, "a", _row("a"))
    assert progress.bar.n == 1
    progress.end_case()
    out = capsys.readouterr().out
    assert "... a: run 1/2: 10 ms (case 00:00 elapsed, ETA 00:0" in out  # the heartbeat
    assert [x.split()[:2] for x in out.splitlines() if not x.startswith("  ...")] == [["tiny", "a"]]


def test_failed_input_preparation_gives_error_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "launch_worker", lambda argv, on_line, timeout, log: (1, "MemoryError"))
    monkeypatch.setattr(report, "write_plots", lambda *a, **k: [])
    rc = run.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls", "naive", "--cases", "v32k"])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "error: input preparation failed: MemoryError"
    assert rc == run.EXIT_ROWS_FAILED


# --- results files ------------------------------------------------------------------------------------------------


def _results():
    skipped = worker.base_row("liger", TINY_CAP)
    skipped["status"] = "skipped: LigerFusedLinearDPOLoss has no final-logit softcap"
    failed = worker.base_row("cce", TINY)
    failed["status"] = "error: RuntimeError: a | b"
    ok = _row("naive")
    ok["rel_err_parts"] = {"loss": 1e-8, "hidden": float("nan"), "weight": 1e-7}
    return {"device": "cpu", "versions": {"torch": "2.13"}, "rows": [ok, skipped, failed]}


def test_results_json_schema_roundtrip(tmp_path):
    path = report.write_json(_results(), tmp_path)
    data = json.loads(path.read_text())  # strict JSON: the NaN became null
    assert data["rows"][0]["rel_err_parts"]["hidden"] is None
    assert set(data) >= {"device", "versions", "rows"}
    for row in data["rows"]:
        assert set(report.ROW_KEYS) <= set(row)
    assert [r["status"].split(":")[0] for r in data["rows"]] == ["ok", "skipped", "error"]


@pytest.mark.parametrize("breakage", ["missing key", "bad status", "ok without ms", "no device"])
def test_validate_rejects_bad_results(breakage):
    results = _results()
    if breakage == "missing key":
        del results["rows"][0]["peak_mem_bytes"]
    elif breakage == "bad status":
        results["rows"][1]["status"] = "skip"
    elif breakage == "ok without ms":
        results["rows"][0]["ms"] = None
    else:
        del results["device"]
    with pytest.raises(ValueError):
        report.validate(results)


def test_markdown_table(tmp_path):
    md = report.write_markdown(_results(), tmp_path).read_text()
    lines = [x for x in md.splitlines() if x.startswith("| tiny")]
    assert len(lines) == 3
    assert all(x.count("|") == lines[0].count("|") for x in lines)  # the '|' inside a status is escaped
    assert "skipped: LigerFusedLinearDPOLoss has no final-logit softcap" in md
    assert "x cuBLAS" not in md  # CPU results have no roofline columns
    gpu = _results()
    gpu["rows"][0].update(roofline=1.3, tflops=512.0)
    assert "| 1.30 | 512 |" in report.table(gpu)


def test_roofline_columns():
    rows = [_row("naive", ms=20.0), worker.base_row("cce", TINY)]
    run.add_roofline(rows, {"cublas_ms": 10.0, "valid_tokens": 1000}, TINY)
    assert rows[0]["roofline"] == 2.0
    assert rows[0]["tflops"] == pytest.approx(8 * 1000 * 32 * 500 / 20e-3 / 1e12)
    assert "roofline" not in rows[1]


@pytest.mark.parametrize("sizes", [1, 2], ids=["bars-for-one-size", "lines-over-sizes"])
def test_plots_are_written(tmp_path, sizes):
    pytest.importorskip("matplotlib")
    results = _results()
    if sizes == 2:
        results["rows"].append({**_row("naive"), "tokens": 2 * TINY.tokens})
    paths = report.write_plots(results, tmp_path, {"tiny": "tiny"})
    assert [p.name for p in paths] == ["time.png", "memory.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or a sandbox that forbids it
        return False
    return True


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux's writable /proc/self/clear_refs")
def test_cpu_peak_is_one_steps_new_memory():
    # In a subprocess: cpu_measure fixes glibc's mmap threshold for the rest of the process.
    script = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from benchmarks import measure
h = torch.zeros(4, 8, requires_grad=True)
w = torch.zeros(1 << 20, 8, requires_grad=True)  # its gradient: 32 MiB
times, peak = measure.cpu_measure(lambda: w.sum() + h.sum(), h, w, max_runs=3, budget_s=10.0)
print(len(times), peak)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    runs, peak = map(int, out.split())
    assert runs == 3
    assert 32 << 20 <= peak < 33 << 20, f"{peak / 2**20:.2f} MiB for a 32 MiB gradient"


def test_spread_in_table_and_validation():
    results = _results()
    results["rows"][0].update(ms=2.0, ms_min=1.5, ms_max=3.0, runs=4)
    assert "| 2.0 | 1.5-3.0 (4) |" in report.table(results)
    report.validate(results)
    results["rows"][0]["ms_min"] = 2.5  # min above the median
    with pytest.raises(ValueError):
        report.validate(results)


def test_planned_runs():
    assert measure.planned_runs(1.0, 8.0, 3, 5) == 5
    assert measure.planned_runs(3.0, 8.0, 3, 5) == 3  # at least 3 for a spread, even past the budget
    assert measure.planned_runs(9.0, 8.0, 3, 5) == 1  # one step over the whole budget: one run


def test_report_redraws_older_results_without_spread(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = _results()
    results["rows"][0]["runs"] = 2  # recorded before min/max were kept
    results["cases"] = {"tiny": {"group": "tiny-group"}}
    report.write_json(results, tmp_path)
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| - (2) |" in md and "predates recording the spread" in md
    assert {p.name for p in tmp_path.iterdir()} >= {"time.png", "memory.png"}


def test_machine_load_is_described():
    load = {"wall_s": 300.0, "cores": 2, "own_cpu_s": 500.0, "loadavg_start": 3.0, "loadavg_end": 2.5,
            "other_processes_cores": 1.46}
    text = run.describe_load(load)
    assert "other processes used 1.46 of 2 cores" in text and "inflated" in text
    md = report.markdown({**_results(), "machine_load": load})
    assert "other processes used 1.46 of 2 cores on average" in md


def test_ci_installs_with_the_readme_commands():
    # The README's install block, line for line, is what .ci/run runs: a newcomer and CI install the same way
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [x.strip() for x in block.splitlines() if x.strip()]
    assert any(c.endswith('install -e ".[dev,bench]"') for c in commands)
    assert any("--index-url https://download.pytorch.org/whl/cpu" in c for c in commands)
    ci = [x.strip() for x in (REPO / ".ci" / "run").read_text().splitlines() if "pip install" in x]
    assert ci == commands


# --- the trained-LM model and the kept fraction --------------------------------------------------------------------

LM_TINY = Case("lm-tiny", "lm", 4, 65, 128, 4096, "float32", inputs="lm")


@pytest.mark.parametrize("target", [1.0, 2.0])
def test_lm_inputs_reach_the_entropy(target):
    shape = inputs.LMShape(zipf=1.0, target_entropy=target)
    stats = inputs.input_stats(inputs.make_lm_inputs(LM_TINY, shape), None)
    assert abs(stats["mean_entropy"] - target) < 0.3, stats
    assert stats["mean_target_logp"] > -6.0  # the next token is likely, as under a trained model


def test_lm_inputs_fall_with_the_id_and_repeat_with_a_seed():
    a, b = inputs.make_lm_inputs(LM_TINY, seed=5), inputs.make_lm_inputs(LM_TINY, seed=5)
    assert torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["weight"], b["weight"])
    assert torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["hidden"], inputs.make_lm_inputs(LM_TINY, seed=6)["hidden"])
    # Mean probability per id over positions, in log-spaced id bands: frequent (low) ids first, roughly
    p = torch.softmax(a["hidden"].flatten(0, 1) @ a["weight"].T, dim=-1).mean(0)
    per_id = torch.stack([p[lo:hi].mean() for lo, hi in ((0, 64), (64, 512), (512, 4096))])
    assert (per_id[:-1] > 2 * per_id[1:]).all(), per_id
    # Next tokens too: more of them among the low ids
    labels = a["labels"][a["labels"] != inputs.IGNORE_INDEX]
    assert (labels < 512).float().mean() > 0.5


def test_build_inputs_picks_the_generator():
    assert torch.equal(inputs.build_inputs(TINY)["hidden"], inputs.make_inputs(TINY)["hidden"])
    assert torch.equal(inputs.build_inputs(LM_TINY)["hidden"], inputs.make_lm_inputs(LM_TINY)["hidden"])
    with pytest.raises(ValueError, match="case.inputs"):
        inputs.build_inputs(Case("x", "x", 2, 8, 8, 64, "float32", inputs="nope"))
    # the default cases keep the clustered generator, so committed results keep their meaning
    assert all(c.inputs == "clustered" for c in inputs.case_set("cpu", True) + inputs.case_set("cpu", False))
    assert [c.inputs for c in inputs.case_set("cpu", True, sparse=True)] == ["lm"]
    assert set(c.name for c in inputs.case_set("cpu", True, sparse=True)) <= set(inputs.all_cases())


def test_kept_fraction_matches_the_cpu_path_plan(monkeypatch):
    # The worker's independent count against the plan the PyTorch tile path itself builds in its forward
    import fastdpo
    from fastdpo import chunked

    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 128 * 256)  # 16 slices of the tiny vocabulary: some to skip
    inp = inputs.make_lm_inputs(LM_TINY)
    tol = 2.0**-10
    kept = measure.kept_fraction(inp["hidden"], inp["weight"], inp["labels"], None, tol)
    plans = []
    original = chunked.kept_slices

    def spy(*args, **kwargs):
        plan = original(*args, **kwargs)
        plans.append(plan)
        return plan

    h = inp["hidden"].clone().requires_grad_(True)
    targets = inputs.shifted_targets(inp["labels"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunked, "kept_slices", spy)
        fastdpo.linear_logprobs(h, inp["weight"], targets, backend="torch", grad_tolerance=tol).sum().backward()
    assert len(plans) == 1 and plans[0] is not None
    plan = torch.tensor(plans[0])
    assert kept == pytest.approx(plan.float().mean().item())
    assert 0 < kept < 1  # something is skipped, targets' slices are kept
    assert measure.kept_fraction(inp["hidden"], inp["weight"], inp["labels"], None, 0.0) == 1.0


def test_kept_fraction_column_in_the_report():
    rows = [dict(worker.base_row(name, TINY), status="ok", ms=1.0, peak_mem_bytes=1, rel_err=1e-6)
            for name in ("fastdpo", "fastdpo_tol")]
    run.add_kept_fraction(rows, {"kept_fraction": 0.25, "grad_tolerance": 2.0**-10})
    assert "kept_fraction" not in rows[0] and rows[1]["kept_fraction"] == 0.25
    results = {"device": "cpu", "versions": {}, "rows": rows,
               "cases": {"tiny": {**TINY.to_dict(), "valid_tokens": 10, "kept_fraction": 0.25}}}
    text = report.markdown(results)
    assert "| kept |" in text and "| 0.250 |" in text
    assert text.count("0.250") == 2  # the fastdpo_tol row and the case table
