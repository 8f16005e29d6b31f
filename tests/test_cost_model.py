"""The GPU cost model (tools/cost_model.py) and the GPU session script's CPU-runnable parts (gpu_check.py)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import cost_model as cm  # noqa: E402
from benchmarks import gpu_check  # noqa: E402

H100 = cm.DEVICES["h100"]
LLAMA_16K = cm.Shape(16384, 4096, 128256)


# --- the model reads kernels/config.py ------------------------------------------------------------------------------


def test_model_reads_the_launch_config(monkeypatch):
    base = cm.fastdpo(LLAMA_16K, H100)
    assert base.details["config"] == cm.kernel_config.gemm_config(LLAMA_16K.dtype, H100.capability, LLAMA_16K.hidden)
    original = cm.kernel_config.gemm_config

    def narrow_tiles(dtype, capability, hidden_size=None):
        return dict(original(dtype, capability, hidden_size), BLOCK_V=64, GROUP_M=1)

    monkeypatch.setattr(cm.kernel_config, "gemm_config", narrow_tiles)
    narrow = cm.fastdpo(LLAMA_16K, H100)
    assert narrow.details["config"]["BLOCK_V"] == 64
    # Narrower vocabulary tiles: a twice as tall partials table, W re-read for every token block.
    assert narrow.hbm_bytes > base.hbm_bytes * 1.5
    assert narrow.flops == base.flops


def test_model_reads_the_chunk_width_and_workspace(monkeypatch):
    calls = []
    original = cm.kernel_config.vocab_chunk_width

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(cm.kernel_config, "vocab_chunk_width", spy)
    p = cm.fastdpo(LLAMA_16K, H100, cm.Options(workspace_bytes=256 * cm.MiB))
    assert calls and calls[-1][-1] == 256 * cm.MiB
    assert p.details["chunk_width"] == original(*calls[-1])
    assert p.workspace_bytes <= 256 * cm.MiB
    # The default workspace is whatever config.default_workspace_bytes answers for the shape on the modelled device:
    # n x the default chunk (C x min(n, H) >= MIN_CHUNK_GEMM_OUTPUT) in bf16.
    default = cm.fastdpo(LLAMA_16K, H100).details
    assert default["workspace_budget"] == LLAMA_16K.n * 4096 * 2 and default["chunk_width"] == 4096
    monkeypatch.setattr(cm.kernel_config, "MIN_CHUNK_GEMM_OUTPUT", 1 << 25)
    assert cm.fastdpo(LLAMA_16K, H100).details["chunk_width"] == 8192


def test_smaller_workspace_means_more_chunks_and_less_peak_memory():
    big = cm.fastdpo(LLAMA_16K, H100, cm.Options(workspace_bytes=1 << 30))
    small = cm.fastdpo(LLAMA_16K, H100, cm.Options(workspace_bytes=64 * cm.MiB))
    assert small.details["chunks"] > big.details["chunks"]
    assert small.peak_bytes < big.peak_bytes
    assert small.flops == big.flops


# --- FLOPs, atomics, the design's figures --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [LLAMA_16K, cm.Shape(4096, 2304, 256000), cm.Shape(1000, 96, 50257)])
def test_fastdpo_flops_are_8P_and_6P_with_a_frozen_head(shape):
    assert cm.fastdpo(shape, H100).flops == pytest.approx(8 * shape.P)
    assert cm.fastdpo(shape, H100, cm.Options(frozen_head=True)).flops == pytest.approx(6 * shape.P)
    assert cm.fastdpo(shape, H100, cm.Options(frozen_hidden=True)).flops == pytest.approx(6 * shape.P)


def test_fastdpo_has_no_atomics_and_stays_within_its_memory_bound():
    p = cm.fastdpo(LLAMA_16K, H100)
    assert p.atomic_bytes == 0
    n, H, V = LLAMA_16K.n, LLAMA_16K.hidden, LLAMA_16K.vocab
    # The memory bound: gradients in their own dtypes + workspace + O(n H) fp32 (+ the small lse table).
    bound = (V * H + n * H) * 2 + p.workspace_bytes + 3 * 4 * n * H + 4 * n * 1100
    assert p.peak_bytes <= bound


# The side-by-side benchmark's Llama-3-8B 16k case: 16 sequences of 1,024 positions, 10,169 scored (8 pairs).
BENCH_8B_16K = cm.Shape(10169, 4096, 128256, tokens=16384)


def test_fused_route_is_6P_without_atomics_and_within_readme_memory_formula():
    p = cm.fastdpo_fused(BENCH_8B_16K, cm.DEVICES["h200"])
    assert p.flops == pytest.approx(6 * BENCH_8B_16K.P)
    assert p.atomic_bytes == 0
    assert p.details["block_rows"] == 256 and p.details["dw_gemms"] == 8 and p.details["dw_accumulator_bytes"] == 2
    # README "Memory": the ring (slots x 256 x V x 2) + bf16 dW + dX [N, H] + the held blocks' tables (and the
    # last one's target-free sums) + a run's rows
    H, V, slots = BENCH_8B_16K.hidden, BENCH_8B_16K.vocab, p.details["slots"]
    block_field = 4 * 256 * -(-V // 128)
    formula = slots * 256 * V * 2 + V * H * 2 + 16384 * H * 2 + (2 * slots + 1) * block_field + 2 * slots * 256 * H * 2
    assert p.peak_bytes == pytest.approx(formula)
    assert p.time_s < cm.fastdpo(BENCH_8B_16K, cm.DEVICES["h200"]).time_s  # 3 passes against 4


def test_fused_route_takes_an_fp32_dw_past_a_dozen_gemms():
    """32 pairs (64k positions of 1,024-token sequences): 32 dW GEMMs, an fp32 accumulator and its cast."""
    shape = cm.Shape(40310, 2048, 128256, tokens=65536)
    p = cm.fastdpo_fused(shape, cm.DEVICES["h200"])
    assert p.details["dw_gemms"] == 32 > cm.MAX_ROUNDED_DW_GEMMS
    assert p.details["dw_accumulator_bytes"] == 4
    assert any(ph.name == "dW cast" for ph in p.phases)


def test_frozen_route_is_4P_with_one_u_gemm_per_group():
    p = cm.fastdpo_fused(BENCH_8B_16K, cm.DEVICES["h200"], cm.Options(frozen_head=True))
    assert p.design == "fastdpo frozen" and p.flops == pytest.approx(4 * BENCH_8B_16K.P)
    assert not any("dW" in ph.name for ph in p.phases)
    u_gemm = next(ph for ph in p.phases if ph.name.startswith("U GEMM"))
    assert u_gemm.launches == -(-BENCH_8B_16K.n // (cm.FROZEN_SLOTS * 256))


def test_fused_route_constants_are_the_librarys():
    from fastdpo import triton_fused
    from fastdpo.chunked import Rows

    assert cm.MAX_ROUNDED_DW_GEMMS == triton_fused.MAX_ROUNDED_DW_GEMMS
    assert cm.FROZEN_SLOTS == triton_fused.FROZEN_SLOTS
    assert cm.FUSED_BLOCK_TILES * cm.kernel_config.gemm_config(torch.bfloat16, 90, 4096)["BLOCK_M"] == 256
    rows = Rows(torch.empty(0, 4096, dtype=torch.bfloat16), None, None)
    block_m = cm.kernel_config.gemm_config(torch.bfloat16, None, 4096)["BLOCK_M"]  # this machine's: no GPU
    assert triton_fused.StoredLogits.block_rows(rows) == cm.FUSED_BLOCK_TILES * block_m


def test_frozen_head_drops_the_dW_memory():
    full = cm.fastdpo(LLAMA_16K, H100)
    frozen = cm.fastdpo(LLAMA_16K, H100, cm.Options(frozen_head=True))
    assert full.peak_bytes - frozen.peak_bytes >= LLAMA_16K.vocab * LLAMA_16K.hidden * 2
    assert not any("dW" in ph.name for ph in frozen.phases)


def test_old_design_matches_its_estimated_figures():
    old = cm.old_fastdpo(LLAMA_16K, H100)
    assert old.atomic_bytes / cm.GB == pytest.approx(540, rel=0.03)  # 2 N V H / 128 fp32 adds
    forward = next(ph for ph in old.phases if ph.name == "forward kernel")
    assert forward.hbm_bytes / cm.GB == pytest.approx(270, rel=0.05)  # X re-read per 64-wide vocab tile
    assert 0.8 * 0.600 <= old.time_s <= 1.25 * 0.600  # "modelled total ~ 600 ms"


def test_fastdpo_meets_its_target_on_h100():
    """Llama-3-8B head, 16k tokens: within 1.25x of 8P at 800 TFLOP/s (~108 ms)."""
    p = cm.fastdpo(LLAMA_16K, H100)
    floor = 8 * LLAMA_16K.P / 800e12
    assert cm.dense_floor_s(LLAMA_16K, H100) == pytest.approx(floor)
    assert p.time_s <= 1.25 * floor
    assert p.time_s >= floor  # a model that beats the dense floor is broken
    assert p.time_s < cm.old_fastdpo(LLAMA_16K, H100).time_s / 5


def test_grouped_order_keeps_x_in_l2_and_a_row_owning_order_does_not():
    e, (n, H, V) = 2, (16384, 4096, 128256)
    grouped = cm.Tiling(128, 128, 8, H100.sms)
    x_reads, w_reads = cm.operand_traffic(n, V, H, e, e, grouped, H100)
    assert x_reads == n * H * e  # each X block read once
    assert w_reads == pytest.approx(V * H * e * n / (128 * 8))  # W once per group of 8 token blocks
    row_owner = cm.Tiling(128, 64, H100.sms, H100.sms)
    x_reads, w_reads = cm.operand_traffic(n, V, H, e, e, row_owner, H100)
    assert x_reads == n * H * e * -(-V // 64)
    assert w_reads == V * H * e


def test_peers_follow_their_published_structure():
    preds = {p.design: p for p in cm.predict_all(LLAMA_16K, H100)}
    assert set(cm.DESIGNS) and len(preds) == len(cm.DESIGNS)
    P = LLAMA_16K.P
    assert preds["TRL 1.16 chunked head"].flops == pytest.approx(8 * P)
    assert preds["Cut Cross-Entropy 25.1.1"].flops == pytest.approx(8 * P)
    for name in ("Liger 0.8.5 FLCE", "quack linear CE", "torch 2.13 F.linear_cross_entropy"):
        assert preds[name].flops == pytest.approx(6 * P)  # gradients computed in the forward, no recompute
    assert preds["Cut Cross-Entropy 25.1.1"].atomic_bytes > 100 * cm.GB
    # TRL keeps an fp32 [V, H] buffer and its cast copy: more memory than fastdpo.
    assert preds["TRL 1.16 chunked head"].peak_bytes > preds["fastdpo"].peak_bytes
    for p in preds.values():
        assert p.time_s > 0 and p.peak_bytes > 0 and p.hbm_bytes > 0


def test_cce_filter_cuts_its_backward():
    full = cm.cut_cross_entropy(LLAMA_16K, H100)
    filtered = cm.cut_cross_entropy(LLAMA_16K, H100, cm.Options(kept_fraction=0.1))
    assert filtered.atomic_bytes == pytest.approx(0.1 * full.atomic_bytes, rel=0.01)
    assert filtered.time_s < full.time_s / 3


def test_cli_prints_the_markdown_tables(capsys):
    assert cm.main(["--device", "h200", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "a model, not a measurement" in out
    for label, _shape in cm.CASES:
        assert label in out
    assert "fastdpo" in out and "Cut Cross-Entropy" in out
    assert cm.main(["--tflops", "400", "--hbm-tbps", "2"]) == 0
    assert "(custom)" in capsys.readouterr().out


# --- fastdpo with grad_tolerance: the block-sparse backward --------------------------------------------------------

triton_head = importlib.import_module("fastdpo.triton_head")
sparse_backward = importlib.import_module("fastdpo.kernels.sparse_backward")


@pytest.fixture
def sparse_always(monkeypatch):
    monkeypatch.setattr(triton_head, "SPARSE_BREAK_EVEN", 1.0)


@pytest.mark.parametrize("shape", [LLAMA_16K, cm.Shape(4096, 2304, 256000), cm.Shape(1000, 96, 50257)])
@pytest.mark.parametrize("f", [0.02, 0.1, 0.37, 1.0])
def test_sparse_flops_are_2P_plus_f_times_the_backward(shape, f, sparse_always):
    P = shape.P
    assert cm.fastdpo_sparse(shape, H100, cm.Options(kept_fraction=f)).flops == pytest.approx(2 * P + f * 6 * P)
    for frozen in (dict(frozen_head=True), dict(frozen_hidden=True)):
        p = cm.fastdpo_sparse(shape, H100, cm.Options(kept_fraction=f, **frozen))
        assert p.flops == pytest.approx(2 * P + f * 4 * P)
    assert not any("dw" in ph.name.lower() for ph in cm.fastdpo_sparse(shape, H100, cm.Options(
        kept_fraction=f, frozen_head=True)).phases)


def test_sparse_dispatch_follows_triton_head_threshold(monkeypatch):
    monkeypatch.setattr(triton_head, "SPARSE_BREAK_EVEN", 0.3)
    dense = cm.fastdpo(LLAMA_16K, H100)
    above = cm.fastdpo_sparse(LLAMA_16K, H100, cm.Options(kept_fraction=0.31))
    below = cm.fastdpo_sparse(LLAMA_16K, H100, cm.Options(kept_fraction=0.3))
    assert above.details["path"] == "dense" and below.details["path"] == "sparse"
    assert above.flops == pytest.approx(dense.flops)
    plan = [ph for ph in above.phases if ph.name.startswith("sparse plan")]
    assert plan and above.time_s == pytest.approx(dense.time_s + sum(ph.time_s(H100, LLAMA_16K.dtype) for ph in plan))
    assert below.flops < dense.flops
    assert above.details["break_even"] == 0.3


@pytest.mark.parametrize("device", ["h100", "h200"])
@pytest.mark.parametrize("shared", [0.0, 0.5, 1.0])
def test_sparse_meets_its_target_at_small_f(device, shared, sparse_always):
    """grad_tolerance's target: total <= 0.6x the dense path at the kept fraction of trained-LM-like inputs."""
    dev = cm.DEVICES[device]
    dense = cm.fastdpo(LLAMA_16K, dev).time_s
    for f in (0.02, 0.05):
        p = cm.fastdpo_sparse(LLAMA_16K, dev, cm.Options(kept_fraction=f, kept_shared=shared))
        assert p.time_s <= cm.SPARSE_TARGET_RATIO * dense
        # never below the forward, which the sparse path does not change
        forward = sum(ph.time_s(dev, LLAMA_16K.dtype) for ph in p.phases[:2])
        assert p.time_s > forward + f * 6 * LLAMA_16K.P / dev.gemm_flops


@pytest.mark.parametrize("shared", [0.0, 0.5, 1.0])
def test_sparse_cost_grows_with_f_and_with_disjoint_tiles(shared, sparse_always):
    fractions = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0]
    preds = [cm.fastdpo_sparse(LLAMA_16K, H100, cm.Options(kept_fraction=f, kept_shared=shared)) for f in fractions]
    for a, b in zip(preds, preds[1:]):
        assert a.time_s < b.time_s and a.hbm_bytes < b.hbm_bytes and a.flops < b.flops
        assert a.workspace_bytes <= a.details["workspace_budget"]
    if shared < 1.0:
        more_shared = cm.fastdpo_sparse(LLAMA_16K, H100, cm.Options(kept_fraction=0.1, kept_shared=1.0))
        assert more_shared.hbm_bytes < preds[fractions.index(0.1)].hbm_bytes
    even = cm.sparse_break_even(LLAMA_16K, H100, cm.Options(kept_shared=shared))
    assert even is not None and 0.1 < even < 1.0


def test_sparse_model_reads_the_kernel_tiles_and_chunks(monkeypatch, sparse_always):
    base = cm.fastdpo_sparse(LLAMA_16K, H100, cm.Options(kept_fraction=0.1))
    assert base.details["sparse_tiles"] == sparse_backward.sparse_gemm_options(LLAMA_16K.dtype, H100.capability,
                                                                               LLAMA_16K.hidden)[1]
    original = sparse_backward.sparse_gemm_options

    def narrow_h(*args):
        cfg, tiles = original(*args)
        return cfg, dict(tiles, BLOCK_H=64)

    monkeypatch.setattr(sparse_backward, "sparse_gemm_options", narrow_h)
    narrow = cm.fastdpo_sparse(LLAMA_16K, H100, cm.Options(kept_fraction=0.1))
    assert narrow.hbm_bytes > base.hbm_bytes * 1.2  # D tiles re-read once per H slice: twice the slices
    assert narrow.flops == base.flops
    monkeypatch.setattr(sparse_backward, "sparse_gemm_options", original)
    # The workspace holds whole BLOCK_M x BLOCK_V tiles; sparse_plan.tile_chunks cuts the chunks.
    tile = 128 * 128 * LLAMA_16K.elem
    small = cm.fastdpo_sparse(LLAMA_16K, H100, cm.Options(kept_fraction=0.1, workspace_bytes=1000 * tile))
    # The default workspace (16,384 rows x 4,096 columns in bf16: 128 MiB) holds 4,096 tiles of the 12,826 kept.
    assert base.details["chunks"] == 4 and small.details["chunks"] == 13 and small.details["max_pairs"] == 1000
    assert small.workspace_bytes <= 1000 * tile < base.workspace_bytes
    # (at f = 0.1 both peaks are the plan's, which the workspace does not change)
    assert small.flops == pytest.approx(base.flops) and small.peak_bytes <= base.peak_bytes


def test_stand_in_kept_mask_has_the_fraction():
    for f in (0.0, 0.013, 0.1, 0.5, 1.0):
        kept = cm.stand_in_kept(128, 1002, f)
        assert abs(kept.float().mean().item() - f) < 1e-3
        assert kept.sum(0).max() - kept.sum(0).min() <= 1  # spread evenly over the tiles
    pairs = cm.sparse_chunk_pairs(128, 1002, 0.1, 1000)
    assert sum(t for t, _ in pairs) == 1002 and sum(p for _, p in pairs) == pytest.approx(0.1 * 128 * 1002)


def test_cli_sparse_lines(capsys):
    assert cm.main(["--kept-fraction", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "fastdpo grad_tolerance at Llama-3-8B 16k, f=0.05 (sparse path" in out and "meets" in out
    assert "fastdpo grad_tolerance (sparse)" in out
    assert cm.main(["--markdown"]) == 0
    out = capsys.readouterr().out
    assert "dense vs sparse backward (a model)" in out and "break-even" in out
    for bad in (["--kept-fraction", "1.5"], ["--kept-shared", "-0.1"]):
        with pytest.raises(SystemExit):
            cm.parse_args(bad)


# --- gpu_check.py without a GPU ------------------------------------------------------------------------------------


def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "r")], cuda_available=False) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_gpu_check_arguments(tmp_path):
    args = gpu_check.parse_args([])
    assert args.out is None and args.skip == set() and args.budget_s == gpu_check.DEFAULT_BUDGET_S
    args = gpu_check.parse_args(["--out", str(tmp_path), "--skip", "bench, tests", "--budget-s", "100"])
    assert args.out == tmp_path and args.skip == {"bench", "tests"} and args.budget_s == 100
    for bad in (["--skip", "nope"], ["--parts", "setup,nope"], ["--budget-s", "5"],
                ["--wheels", str(tmp_path / "no")]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_gpu_check_helpers():
    assert gpu_check.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.pytest_summary("....\n3 passed, 1 failed, 2 skipped in 9.10s\n") == dict(passed=3, failed=1,
                                                                                              skipped=2)
    assert gpu_check.pytest_summary("no summary") == {}
    now = [0.0]
    budget = gpu_check.Budget(100.0, clock=lambda: now[0])
    assert budget.for_part(30.0) == 30.0
    now[0] = 80.0
    assert budget.for_part(30.0) == pytest.approx(100 - 80 - gpu_check.WRITE_RESERVE_S)
    rows, peak = gpu_check.model_rows(16384, 4096, 128256, "NVIDIA H100 80GB HBM3", 1 << 30)
    assert set(rows) == set(cm.MEASURED_TO_MODEL)
    one_gib = cm.Options(workspace_bytes=1 << 30)
    assert rows["forward + backward (end to end)"] == pytest.approx(cm.fastdpo(LLAMA_16K, H100, one_gib).time_s * 1e3)
    assert peak > 0


def test_gpu_check_parts_fail_alone(tmp_path):
    results = {"parts": {}}
    gpu_check.run_part(results, "boom", lambda t: 1 / 0, timeout_s=60)
    gpu_check.run_part(results, "fine", lambda t: {"value": t}, timeout_s=60)
    gpu_check.run_part(results, "late", lambda t: {}, timeout_s=1)
    assert results["parts"]["boom"]["status"].startswith("error: ZeroDivisionError")
    assert results["parts"]["fine"] == dict(value=60, status="ok", seconds=results["parts"]["fine"]["seconds"])
    assert results["parts"]["late"]["status"].startswith("skipped")
    slow = gpu_check.run_logged([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(30)"], 2.0,
                                tmp_path / "slow.log")
    assert slow["timed_out"] and slow["seconds"] < 20 and "hi" in slow["tail"]


def test_gpu_check_writes_its_results(tmp_path, capsys):
    out = tmp_path / "results"
    rc = gpu_check.main(["--out", str(out), "--skip", ",".join(gpu_check.PARTS)],
                        cuda_available=True, device_name="NVIDIA H100 80GB HBM3")
    assert rc == 0
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["device"] == "NVIDIA H100 80GB HBM3" and saved["slug"] == "nvidia-h100-80gb-hbm3"
    assert set(saved["parts"]) == set(gpu_check.PARTS)
    assert {"torch", "triton", "driver", "cuda"} <= set(saved["versions"])
    assert "# gpu_check on NVIDIA H100 80GB HBM3" in (out / "gpu_check.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]


def test_gpu_check_markdown_of_a_full_result():
    shape = dict(n=16384, hidden=4096, vocab=128256, peak_bytes=3 << 30, model_peak_bytes=2.8e9,
                 rows=[dict(phase="forward kernel", ms=30.0, model_ms=25.3, cublas_ms=24.0, x_cublas=1.25, note="")],
                 checks={"forward kernel within 1.35x of cuBLAS": True})
    results = dict(device="NVIDIA H200", versions=dict(torch="2.11"), started="now",
                   parts=dict(tests=dict(status="ok", seconds=50, summary=dict(passed=7)),
                              phases=dict(status="ok", seconds=90, ceilings=dict(bf16_tflops=790, copy_tbps=4.3),
                                          shapes=[shape]),
                              bench=dict(status="error: benchmarks/run.py exit 2 (see bench.log)", files=[])))
    text = gpu_check.markdown(results)
    assert "7 passed" in text and "790 TFLOP/s" in text and "| forward kernel | 30.00 | 25.30 | 24.00 | 1.25 |" in text
    assert "run.py exit 2" in text and "3.00 GiB measured" in text


def test_gpu_check_tolerates_a_failing_benchmark_runner(tmp_path):
    res = gpu_check.run_bench(tmp_path, timeout_s=120)  # no CUDA here: run.py refuses --device cuda
    assert res["status"].startswith("error: benchmarks/run.py exit")
    assert (tmp_path / "bench.log").exists()


def test_gpu_check_phase_measurement_code_runs_on_cpu(monkeypatch):
    """Walk measure_shape with the real kernels in the interpreter (fp32, tiny shape, two vocabulary chunks): the
    backward rows run the library's chunk loop, every row is timed, the GEMM rows are differences."""
    from fastdpo.kernels import logprob_backward

    chunks = set()
    logits_grad = logprob_backward.logits_grad

    def recording_logits_grad(h, w, bias, rows, targets, lse, grad, out, col_start, **transform):
        chunks.add((col_start, out.shape[1]))
        return logits_grad(h, w, bias, rows, targets, lse, grad, out, col_start, **transform)

    monkeypatch.setattr(logprob_backward, "logits_grad", recording_logits_grad)
    monkeypatch.setattr(cm.kernel_config, "MIN_CHUNK_GEMM_OUTPUT", 16 * 64)  # two chunks: 64 columns at H = 16
    times = iter(range(1, 100))

    def bench(fn):
        fn()
        return float(next(times))

    out = gpu_check.measure_shape(24, 16, 70, bench, "cpu test", device="cpu", dtype_name="float32")
    assert not out["errors"], out["errors"]
    assert out["chunks"] == 2 and chunks == {(0, 64), (64, 6)}
    ms = {r["phase"]: r["ms"] for r in out["rows"]}
    assert set(cm.MEASURED_TO_MODEL) <= set(ms) and gpu_check.CUBLAS_LOGITS in ms
    for phase, total, less in gpu_check.DIFFERENCES:
        assert ms[phase] == ms[total] - ms[less]
    fwd = next(r for r in out["rows"] if r["phase"] == "forward kernel")
    assert fwd["x_cublas"] == ms["forward kernel"] / ms[gpu_check.CUBLAS_LOGITS] and fwd["model_ms"] > 0


def test_gpu_check_lse_is_the_reference_logsumexp():
    import torch

    h, w = torch.randn(20, 16), torch.randn(70, 16)
    rows, targets = torch.arange(3, 20), torch.randint(0, 70, (17,))
    tile_lse, lse = gpu_check.forward_logsumexps(h, w, rows, targets)
    expected = (h[rows] @ w.T).double().logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tile_lse.logsumexp(0).double(), expected, rtol=1e-5, atol=1e-5)


def test_gpu_check_kept_statistics_reads_f_and_sharing():
    import torch

    blocks, bm, bv, tiles = 4, 16, 32, 6
    n = blocks * bm
    lse = torch.zeros(n)

    def table(hot_tiles):  # per row: mass 1/len on its hot tiles, 1e-12 elsewhere
        mass = torch.full((tiles, n), 1e-12)
        for row, hot in enumerate(hot_tiles):
            mass[hot, row] = 1.0 / len(hot)
        return mass.log()

    same = [[0, 1]] * n
    stats = gpu_check.kept_statistics(table(same), lse, torch.zeros(n, dtype=torch.long), bm, bv, 2**-10)
    assert stats["kept_fraction"] == pytest.approx(2 / tiles) and stats["kept_shared"] == pytest.approx(1.0)
    own = [[row // bm] for row in range(n)]
    targets = torch.tensor([(row // bm) * bv for row in range(n)])
    stats = gpu_check.kept_statistics(table(own), lse, targets, bm, bv, 2**-10)
    assert stats["kept_fraction"] == pytest.approx(1 / tiles) and stats["kept_shared"] == pytest.approx(0.0)
    assert stats["pairs"] == blocks and stats["distinct_tiles"] == blocks


def test_gpu_check_sparse_part_runs_on_cpu(monkeypatch):
    """Walk measure_sparse with the real kernels in the interpreter (fp32, tiny shape): every row timed."""
    monkeypatch.setattr(triton_head, "SPARSE_BREAK_EVEN", 1.0)
    # One chunk of tile pairs, so that the three kernels are timed alone (the default bound holds n x V here).
    monkeypatch.setattr(cm.kernel_config, "default_workspace_bytes", lambda *_shapes: 64 << 20)

    def bench(fn):
        fn()
        return 1.0

    cases = gpu_check.measure_sparse(48, 16, 300, bench, "cpu test", device="cpu", dtype_name="float32",
                                     tolerance=2**-6)
    assert [c["inputs"] for c in cases] == ["Zipf-LM", "trained-LM-like", "random", "stand-in mask f=0.1"]
    stand_in = cases.pop()
    assert [r["phase"] for r in stand_in["rows"]] == ["sparse_logits_grad kernel", "sparse_dx kernel",
                                                       "sparse_dw kernel"]
    assert not stand_in["errors"] and abs(stand_in["kept_fraction"] - 0.1) < 0.05
    for case in cases:
        assert not case["errors"], case["errors"]
        assert 0 < case["kept_fraction"] <= 1 and 0 <= case["kept_shared"] <= 1
        phases = [r["phase"] for r in case["rows"]]
        assert "sparse plan: kept_pairs" in phases and "forward + backward, grad_tolerance=0.015625" in phases
        assert case["model"]["tolerance_ms"] > 0 and case["measured_ratio"] == 1.0
    lm_like = cases[0]
    assert "sparse_dx kernel" in [r["phase"] for r in lm_like["rows"]]
    assert lm_like["scored_rows"] < 48  # prompts and padding are not scored
    text = gpu_check.markdown(dict(device="cpu", parts=dict(sparse=dict(status="ok", shape=dict(hidden=16, vocab=300),
                                                                        cases=cases))))
    assert "grad_tolerance=0.015625 on trained-LM-like inputs" in text and "| sparse_dx kernel | 1.00 |" in text


# --- calibration against the H200's measurements ------------------------------------------------------------------


H200_RESULTS = REPO / "benchmarks" / "results" / "nvidia-h200"


@pytest.mark.parametrize("run", ["phases.json", "phases-run2.json"])
def test_phase_rows_model_every_measured_phase_within_20_percent_on_the_h200(run):
    """phase_rows (what gpu_check's phases table shows beside its measurements) against the H200's runs, at the
    workspace they ran with: the measured constants (device rate, Triton efficiencies) must keep it close."""
    results = json.loads((H200_RESULTS / run).read_text())
    compared = 0
    for shape in results["shapes"]:
        model = cm.phase_rows(shape["n"], shape["hidden"], shape["vocab"], results["device"],
                              workspace_bytes=shape["workspace_bytes"])
        for row in shape["rows"]:
            assert row["phase"] in model, row["phase"]
            if row["ms"] is not None:
                assert model[row["phase"]] == pytest.approx(row["ms"], rel=0.2), (shape["n"], row["phase"])
                compared += 1
    assert compared >= 15


def test_measured_triton_efficiencies_are_below_cublas():
    assert cm.TRITON_RECOMPUTE_EFFICIENCY < cm.TRITON_EFFICIENCY < cm.CUBLAS_EFFICIENCY
    rows = cm.phase_rows(16384, 4096, 128256, "NVIDIA H200")
    assert rows["forward kernel"] == pytest.approx(rows["cuBLAS logits (X W^T, chunked)"] / cm.TRITON_EFFICIENCY,
                                                   rel=0.05)
