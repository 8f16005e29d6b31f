"""Heads split across processes, with 2 gloo ranks on CPU, against the single-process float64 oracle.

Each suite is one torchrun launch of tests/distributed_worker.py (imports paid once); every check in it compares
loss / log-probs and the gradients of the head and the hidden states with fastdpo.reference on the same inputs, on
each rank, or records the ValueError it expects. Vocabulary 301 over 2 ranks: shards of 151 and 150 rows, labels in
both, at both ends of the vocabulary, masked positions and a fully masked row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2
FP64, FP32 = 1e-12, 1e-5
BF16, FP16 = 1e-2, 2e-3  # the gradients' one rounding to the input dtype (2^-9, 2^-11 relative)


def gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


# A port torchrun picked can be taken by another process before the ranks bind it (many test runs on one machine).
PORT_TAKEN = ("EADDRINUSE", "address already in use", "Address already in use")
# A rank killed by std::terminate in C++ (gloo's or c10d's threads; seen about once in 15 runs of a TRL suite and
# once in a README example, on a loaded 2-core machine, never reproduced in isolation): no line of Python raised,
# so the run is tried once more rather than failed.
NATIVE_ABORT = ("terminate called without an active exception",)


def torchrun(args, timeout=240, env=None, cwd=None, world=WORLD) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=world *args` in a subprocess; one retry if its port was taken or a
    rank aborted in native code (NATIVE_ABORT)."""
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *map(str, args)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=cwd)
        if proc.returncode == 0 or not any(text in proc.stderr for text in PORT_TAKEN + NATIVE_ABORT):
            break
    return proc


def run_suite(suite: str, tmp_path_factory, timeout=240, env=None, world=WORLD) -> list[dict]:
    """Run one worker suite on `world` gloo ranks; the per-rank results."""
    out = tmp_path_factory.mktemp(suite)
    proc = torchrun([WORKER, suite, out], timeout=timeout, env=env, world=world)
    results = [out / f"rank{r}.json" for r in range(world)]
    if not all(path.exists() for path in results):
        pytest.fail(f"{suite} ranks did not finish (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(path.read_text()) for path in results]


def result(ranks: list[dict], name: str) -> list[dict]:
    per_rank = [r[name] for r in ranks]
    for r, entry in enumerate(per_rank):
        assert "exception" not in entry, f"rank {r}: {entry['exception']}\n{entry.get('traceback', '')}"
    return per_rank


def assert_errors_below(ranks, name, tol):
    for r, errors in enumerate(result(ranks, name)):
        for key, err in errors.items():
            if key.startswith("is_top1"):
                continue
            assert err <= tol, f"rank {r} {name}: {key} relative error {err:.2e} > {tol:.0e}"
        if "is_top1_mismatches" in errors:
            assert errors["is_top1_mismatches"] == 0 and errors["is_top1_hits"] > 0, errors


def assert_refused(entry, r, name):
    assert entry["raised"], f"rank {r} {name}: no ValueError"
    assert entry["matches"], f"rank {r} {name}: unexpected message {entry['message']!r}"


def test_vocab_shard_needs_an_initialized_process_group():
    import fastdpo
    from fastdpo.distributed import VocabShard

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    hidden, weight = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="init_process_group"):
        fastdpo.linear_logprobs(hidden, VocabShard(weight, 0, 20), torch.tensor([1, 15, -100]))
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size=20\)"):
        fastdpo.linear_logprobs(hidden, VocabShard(weight, 15, 20), torch.tensor([1, 15, -100]))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    return run_suite("heads", tmp_path_factory)


@pytest.mark.parametrize("name,tol", [
    ("vocab_parallel_fp64_stats", FP64),
    ("vocab_parallel_fp64_bias_softcap_stats", FP64),
    ("vocab_parallel_fp32_linear", FP32),
    ("vocab_parallel_fp32_bias_softcap", FP32),
    ("dtensor_shard0_fp64_stats", FP64),
    ("dtensor_shard0_fp32_bias", FP32),
    ("dtensor_replicated_head", FP64),
    ("vocab_parallel_triton_fp32_stats", FP32),
    ("vocab_parallel_triton_fp32_bias_softcap", FP32),
    ("dtensor_shard0_triton_fp32_bias", FP32),
])
def test_matches_single_process_oracle(heads, name, tol):
    """Log-probs / loss, statistics and the gradients of hidden states, head shard (and bias) on every rank."""
    assert_errors_below(heads, name, tol)


@pytest.mark.parametrize("name,tol", [("dpo_loss_vocab_parallel", FP64), ("dpo_loss_vocab_parallel_triton", FP32)])
def test_dpo_loss_on_a_vocab_parallel_head(heads, name, tol):
    """FastDPOLoss on a VocabShard takes the fused route (fastdpo.fused_pass) and matches the oracle."""
    for r, entry in enumerate(result(heads, name)):
        entry = dict(entry)
        assert entry.pop("fused_passes") == 1, (r, name)
        assert_errors_below([{name: entry}], name, tol)


# --------------------------------------------------------------------------------------------------------------------
# FastDPOLoss's fused pass on vocab-parallel heads
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_vocab_parallel(tmp_path_factory):
    return run_suite("fused_vocab_parallel", tmp_path_factory)


def assert_fused_matches_two_pass_and_oracle(ranks, name, tol, *, rows=None, recomputed=False):
    """The fused route ran (and fused=False did not), its log-probs, loss and token metrics are the two-pass
    vocab-parallel path's bits, and both routes' loss, dX and the shard's dW (db) match the single-process oracle."""
    for r, entry in enumerate(result(ranks, name)):
        assert (entry["fused_passes"], entry["two_pass_fused_passes"]) == (1, 0), (r, name, "routes")
        assert entry["gradient_scale"] > 1e-2, (r, name, "a saturated loss checks nothing")
        assert all(entry["bits_equal_two_pass"].values()), (r, name, entry["bits_equal_two_pass"])
        assert_errors_below([{name: entry["errors"]}], name, tol)
        assert_errors_below([{name: entry["two_pass_errors"]}], name, tol)
        if rows is not None:
            assert entry["rows"] == rows[r], (r, name, entry["rows"])
        if recomputed:  # rows the shifted forward handed to the online one, on every rank
            assert entry["recomputed_rows"] > 0, (r, name)


@pytest.mark.parametrize("name,tol", [
    ("fused_vp_fp64_linear_metrics", FP64),
    ("fused_vp_fp32_linear", FP32),
    ("fused_vp_fp64_bias_softcap_metrics", FP64),
    ("fused_vp_fp32_bias_softcap", FP32),
    ("fused_vp_fp64_wpo", FP64),
    ("fused_vp_dtensor_fp64_metrics", FP64),
    ("fused_vp_dtensor_fp32_bias_softcap", FP32),
    ("fused_vp_triton_fp32_metrics", FP32),
    ("fused_vp_triton_dtensor_fp32_bias", FP32),
    ("fused_vp_bf16_bias_softcap", BF16),
    ("fused_vp_triton_fp16_metrics", FP16),
])
def test_fused_pass_on_a_vocab_parallel_head(fused_vocab_parallel, name, tol):
    """FastDPOLoss on a VocabShard or a Shard(0) DTensor head (vocabulary 301: shards of 151 and 150 rows) takes the
    fused route, on the PyTorch path or the Triton backend (its interpreter here): each token block's partials merged
    over the ranks by one all-gather, dW local, dX all-reduced once."""
    assert_fused_matches_two_pass_and_oracle(fused_vocab_parallel, name, tol)


@pytest.mark.parametrize("name,tol,rows", [("fused_vp_fp64_uneven_split", FP64, (40, 261)),
                                           ("fused_vp_fp32_uneven_split_bias", FP32, (230, 71)),
                                           ("fused_vp_triton_fp32_uneven_split_bias_softcap", FP32, (230, 71))])
def test_fused_pass_on_an_uneven_vocab_split(fused_vocab_parallel, name, tol, rows):
    assert_fused_matches_two_pass_and_oracle(fused_vocab_parallel, name, tol, rows=rows)


def test_vocab_parallel_ranks_decide_the_route_together(fused_vocab_parallel):
    """A workspace that would fit rank 0's shard (40 rows) but not rank 1's (261): every rank decides by the widest
    shard, so both take the two-pass route (one rank fused and one not would wait on each other's collectives)."""
    name = "fused_vp_fp32_budget_between_the_shards"
    for r, entry in enumerate(result(fused_vocab_parallel, name)):
        assert (entry["fused_passes"], entry["two_pass_fused_passes"]) == (0, 0), (r, name)
        assert entry["rows"] == (40, 261)[r] and all(entry["bits_equal_two_pass"].values()), (r, entry)
        assert_errors_below([{name: entry["errors"]}], name, FP32)


def test_fused_pass_on_a_vocab_parallel_head_recomputes_far_targets(fused_vocab_parallel):
    """Logits spread over ~200 nats: rows whose (own or borrowed) target logit lies far below the shard's maximum
    leave the shifted forward; the fused pass recomputes their gradients with the global lse."""
    assert_fused_matches_two_pass_and_oracle(fused_vocab_parallel, "fused_vp_fp64_peaked_logits", FP64,
                                             recomputed=True)


@pytest.mark.parametrize("name,fused_passes", [
    ("ddp_loss_inside_forward", 1),
    ("ddp_loss_inside_forward_two_pass", 0),
    ("fsdp2_loss_inside_registered_method", 1),
    ("fsdp2_loss_inside_registered_method_two_pass", 0),
])
def test_data_parallel_loss_on_each_route(heads, name, fused_passes):
    """DDP, and FSDP2 with the loss inside the unit that owns the head: FastDPOLoss takes the fused route (its dX and
    dW handed to autograd in the backward, where DDP all-reduces and FSDP2 reduce-scatters them) or, with
    fused=False, the two-pass one; either way the reduced gradients equal the single-process float64 oracle's."""
    for r, entry in enumerate(result(heads, name)):
        entry = dict(entry)
        assert entry.pop("fused_passes") == fused_passes, (r, name)
        if name.startswith("fsdp2"):
            assert entry.pop("head_grad_placements") == "(Shard(dim=0),)", (r, entry)
        assert_errors_below([{name: entry}], name, FP64)


@pytest.mark.parametrize("name", [
    "labels_checked_against_global_vocab",
    "shards_that_do_not_tile_the_vocab",
    "different_targets_on_ranks",
    "reference_backend_refused",
])
def test_bad_vocab_parallel_input_is_refused_on_every_rank(heads, name):
    for r, entry in enumerate(result(heads, name)):
        assert_refused(entry, r, name)
    if name == "labels_checked_against_global_vocab":
        assert all(entry["finite"] for entry in result(heads, name))


def test_vocab_parallel_triton_bits(heads):
    """The Triton vocab-parallel head gives the same bits run to run and on every rank (the partials are merged in
    rank order), and agrees with the PyTorch vocab-parallel path to float32 round-off.

    Not bitwise with the PyTorch path, by construction: the two backends sum the hidden dimension in different
    orders (Triton's K loop of tl.dot tiles against torch's GEMM on its own tiles) and fold the vocabulary in
    different slices (kernel tiles of 32 columns in the interpreter against the PyTorch path's 128-aligned slices,
    whose linear heads shift every tile by the target logit), so their logits differ in the last bits.
    """
    for r, entry in enumerate(result(heads, "triton_bits")):
        assert entry["run_to_run_equal"] and entry["ranks_equal"], (r, entry)
        for key in ("logps_vs_torch_path", "d_hidden_vs_torch_path", "d_weight_vs_torch_path"):
            assert 0 <= entry[key] <= FP32, (r, key, entry[key])


def test_fsdp2_sharded_weight_outside_its_unit_is_refused_with_the_way_to_call_it(heads):
    name = "fsdp2_style_dtensor_with_plain_hidden_refused"
    for r, entry in enumerate(result(heads, name)):
        assert_refused(entry["logprobs"], r, name)
        assert_refused(entry["loss"], r, name)


# --------------------------------------------------------------------------------------------------------------------
# 2-D meshes: 4 gloo ranks as a (dp=2, tp=2) mesh
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_2d(tmp_path_factory):
    return run_suite("mesh_2d", tmp_path_factory, world=4)


@pytest.mark.parametrize("name,tol", [
    ("mesh_2d_torch_fp64_stats", FP64),
    ("mesh_2d_torch_fp64_bias_softcap", FP64),
    ("mesh_2d_triton_fp32_bias_softcap", FP32),
])
def test_head_sharded_on_the_tp_dimension_of_a_2d_mesh(mesh_2d, name, tol):
    """A Replicate() x Shard(0) head on the (dp, tp) mesh, each dp rank its own batch: log-probs, statistics, dX and
    the rank's rows of dW (and db) against the float64 oracle of that rank's batch."""
    assert_errors_below(mesh_2d, name, tol)


@pytest.mark.parametrize("name,tol", [("mesh_2d_fused_fp64_metrics", FP64), ("mesh_2d_fused_fp32_bias_softcap", FP32),
                                      ("mesh_2d_fused_triton_fp32_bias_softcap", FP32)])
def test_fused_pass_on_a_head_sharded_on_the_tp_dimension_of_a_2d_mesh(mesh_2d, name, tol):
    """FastDPOLoss on a Replicate() x Shard(0) head, each dp rank its own batch: the fused route, the two-pass
    route's log-probs bit for bit, and the oracle of the rank's batch (the all-gathers and dX's all-reduce over tp)."""
    assert_fused_matches_two_pass_and_oracle(mesh_2d, name, tol)


@pytest.mark.parametrize("name,head_mesh_dims", [("mesh_2d_fsdp_dp_tp_submesh", 1), ("mesh_2d_fsdp_spmd_mesh", 2)])
def test_fsdp2_over_dp_with_a_tensor_parallel_head(mesh_2d, name, head_mesh_dims):
    """FSDP2 on dp, the head Shard(0) on tp, the loss in the root's forward (where FSDP2 hands out the head as a
    DTensor on the tp submesh, or with dp_mesh_dims on the whole 2-D mesh): FastDPOLoss takes the fused route, the
    head's gradient comes back sharded, and every reduced gradient equals the single-process oracle's mean over the
    dp batches."""
    for r, entry in enumerate(result(mesh_2d, name)):
        assert entry.pop("head_mesh_dims") == head_mesh_dims, (r, entry)
        assert entry.pop("fused_passes") == 1, (r, entry)  # a tensor-parallel head: the fused route
        assert "Shard(dim=0)" in entry.pop("head_grad_placements"), (r, entry)
    assert_errors_below(mesh_2d, name, FP64)


@pytest.mark.parametrize("name", ["mesh_2d_head_sharded_on_both_dims_refused", "mesh_2d_hidden_split_over_tp_refused"])
def test_bad_2d_layouts_are_refused(mesh_2d, name):
    for r, entry in enumerate(result(mesh_2d, name)):
        assert_refused(entry, r, name)


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# --------------------------------------------------------------------------------------------------------------------

ZERO3_TOL = 1e-6  # the model runs and DeepSpeed reduces in float32 (ZeRO-3 refuses float64 parameters)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'fastdpo[dev]')")
    return run_suite("zero3", tmp_path_factory, env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("name", ["zero3_loss_inside_forward", "zero3_shared_reference_head"])
def test_zero3_partitioned_head(zero3, name):
    """FastDPOLoss on ZeRO-3's partitioned lm_head.weight: the reduced gradients equal the float64 oracle's (inside
    the forward, on the fused route)."""
    for r, entry in enumerate(result(zero3, name)):
        assert entry.pop("partitioned_head", 1) == 1, "the head was not partitioned: the check proves nothing"
        assert entry.pop("fused_passes", 1) == 1, (r, name)
    assert_errors_below(zero3, name, ZERO3_TOL)


@pytest.mark.parametrize("name,fused_passes,frozen_route,backward_gathers,grad_hooks", [
    ("zero3_loss_outside_forward", 1, 0, 0, [False]),
    ("zero3_loss_outside_forward_two_pass", 0, 0, 1, [True]),
    ("zero3_frozen_head_outside_forward", 0, 1, 0, []),
])
def test_zero3_head_gathered_once_on_the_fused_routes(zero3, name, fused_passes, frozen_route, backward_gathers,
                                                      grad_hooks):
    """FastDPOLoss on the partitioned lm_head.weight, outside the engine's forward. The fused route gathers the head
    once, for the forward that forms dW, and hands dW to ZeRO-3's gradient hook with the head still partitioned; the
    two-pass route (fused=False) gathers it again for the backward; a frozen head (the frozen route) is gathered for
    the forward alone. All: the float64 oracle's reduced gradients, and the head partitioned again after the
    backward."""
    for r, entry in enumerate(result(zero3, name)):
        entry = dict(entry)
        assert entry.pop("partitioned_head") == 1, "the head was not partitioned: the check proves nothing"
        assert entry.pop("partitioned_after_backward") == 1, "the head stayed gathered after the backward"
        assert entry.pop("fused_passes") == fused_passes, (r, name)
        assert entry.pop("frozen_route") == frozen_route, (r, name)
        assert entry.pop("forward_gathers") == 1, (r, name)
        assert entry.pop("backward_gathers") == backward_gathers, (r, name)
        assert entry.pop("gathered_at_grad_hook") == grad_hooks, (r, name)
        assert_errors_below([{name: entry}], name, ZERO3_TOL)


# --------------------------------------------------------------------------------------------------------------------
# TRL's DPOTrainer with fastdpo.patch_trl() under DDP and ZeRO-3
# --------------------------------------------------------------------------------------------------------------------

TRL_RTOL, TRL_ATOL = 1e-4, 5e-5  # as in test_trl_patch.py: float32 rounding compounded over a few optimizer steps


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def trl_ddp(tmp_path_factory):
    if not trl_available():
        pytest.skip("trl is not installed")
    return run_suite("trl_ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def trl_zero3(tmp_path_factory):
    import importlib.util

    if not trl_available() or importlib.util.find_spec("deepspeed") is None:
        pytest.skip("trl and deepspeed are needed")
    return run_suite("trl_zero3", tmp_path_factory, env={"DS_ACCELERATOR": "cpu"})


def assert_trains_like_stock(ranks, name, wrapper):
    import math

    runs = result(ranks, name)
    for r, run in enumerate(runs):
        stock, patched = run["stock"], run["patched"]
        assert stock["wrapper"] == patched["wrapper"] == wrapper
        assert stock["calls"]["stock"] > 0 and stock["calls"]["fastdpo"] == 0
        assert patched["calls"]["stock"] == 0 and patched["calls"]["fastdpo"] > 0, "fastdpo's head did not run"
        assert len(stock["logs"]) == len(patched["logs"]) == 3
        assert len({entry["loss"] for entry in stock["logs"]}) > 1  # a moving policy, not the step-1 constant
        for step, (a, b) in enumerate(zip(stock["logs"], patched["logs"]), start=1):
            assert a.keys() == b.keys(), f"rank {r} step {step}: logged keys differ"
            for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "logits/chosen", "rewards/margins"):
                assert key in a, key
            for key in a:
                assert math.isclose(a[key], b[key], rel_tol=TRL_RTOL, abs_tol=TRL_ATOL), \
                    f"rank {r} step {step} {key}: stock {a[key]} vs patched {b[key]}"
        for x, y in zip(stock["weights"], patched["weights"]):
            assert math.isclose(x, y, rel_tol=TRL_RTOL, abs_tol=TRL_ATOL)
    # The gradients were reduced across ranks: both ranks end with the same weights
    assert runs[0]["patched"]["weights"] == runs[1]["patched"]["weights"]


@pytest.fixture(scope="module")
def trl_fsdp2(tmp_path_factory):
    if not trl_available():
        pytest.skip("trl is not installed")
    return run_suite("trl_fsdp2", tmp_path_factory)


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_gc_on"])
def test_patched_trl_under_accelerate_fsdp2(trl_fsdp2, name):
    """Accelerate's FSDP plugin, fsdp_version=2, on 2 CPU ranks (with the one switch Accelerate skips on CPU ranks:
    see distributed_worker.fsdp2_on_cpu_ranks): like stock TRL in every logged metric and the trained weights; the
    policy's head reaches the log-prob function as FSDP2's unsharded parameter (never a gathered copy), and its
    gradient comes to the optimizer as a Shard(0) DTensor equal to stock FSDP2's reduce-scattered one."""
    import math

    assert_trains_like_stock(trl_fsdp2, name, "FSDPLlamaForCausalLM")
    for r, run in enumerate(result(trl_fsdp2, name)):
        stock, patched = run["stock"], run["patched"]
        assert stock["head_weights"] == patched["head_weights"] == ["parameter"], (r, stock, patched)
        assert len(stock["head_grads"]) == len(patched["head_grads"]) == 3
        for step, (a, b) in enumerate(zip(stock["head_grads"], patched["head_grads"]), start=1):
            assert a["placements"] == b["placements"] == "(Shard(dim=0),)", (r, step, a, b)
            for key in ("abs_sum", "norm"):
                assert math.isclose(a[key], b[key], rel_tol=TRL_RTOL), f"rank {r} step {step} head grad {key}: {a} {b}"


@pytest.mark.parametrize("name", ["gc_off", "gc_on", "gc_on_find_unused", "gc_off_no_find_unused"])
def test_patched_trl_under_ddp(trl_ddp, name):
    """2-rank DDP, with and without gradient checkpointing and find_unused_parameters: like stock, all metrics."""
    assert_trains_like_stock(trl_ddp, name, "DistributedDataParallel")


def test_patched_trl_under_zero3(trl_zero3):
    """ZeRO-3 (2 CPU ranks): the patched head runs on the partitioned lm_head and trains like stock TRL."""
    assert_trains_like_stock(trl_zero3, "zero3", "DeepSpeedEngine")


# --------------------------------------------------------------------------------------------------------------------
# The README's scaling-out examples run as they stand
# --------------------------------------------------------------------------------------------------------------------


def readme_examples() -> dict[str, str]:
    """The README's python blocks that start with a `# torchrun ...` line, by script name."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(# torchrun --nproc_per_node 2 (\S+)\n.*?)```", readme, flags=re.S)
    return {name: code for code, name in blocks}


def test_readme_has_the_scaling_out_examples():
    assert set(readme_examples()) == {"data_parallel.py", "vocab_parallel.py"}


@pytest.mark.parametrize("name", ["data_parallel.py", "vocab_parallel.py"])
def test_readme_example_runs_on_two_ranks(name, tmp_path):
    script = tmp_path / name
    script.write_text(readme_examples()[name])
    proc = torchrun([script], cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
