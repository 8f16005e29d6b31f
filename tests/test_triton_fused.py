"""The fused route on the Triton backend (fastdpo.triton_fused, in Triton's interpreter): the float64
oracle, the Triton two-pass route's bits, determinism, the fallbacks, GEMM passes counted tile by tile,
and memory. The helpers are tests/test_fused_pass.py's (the PyTorch path's tests); the frozen-head route on
Triton is tests/test_frozen_route.py's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close, relative_error
from test_fused_pass import (  # noqa: F401  (spy is a fixture)
    GemmPasses,
    LargestTensors,
    assert_as_close_as_two_pass,
    assert_same_as_two_pass,
    assert_two_pass_bits_and_repeat,
    head_inputs,
    make_batch,
    oracle,
    outputs,
    peaked_rows,
    precomputed_reference,
    run,
    spy,
)
from triton.runtime import interpreter

import fastdpo
from fastdpo import fused_pass, reference, triton_fused
from fastdpo.chunked import Rows
from fastdpo.sequences import shifted_targets
from fastdpo.triton_fused import StoredLogits

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}  # against float64, relative to the largest magnitude


def slot_bytes(hs, w, dtype=torch.float32):
    rows = Rows(hs.reshape(-1, hs.shape[-1]).to(dtype), torch.arange(10**6), torch.zeros(10**6))
    return StoredLogits.slot_bytes(rows, w.shape[0])


def schedule(hs, labels, dtype=torch.float32) -> fused_pass.PairSchedule:
    """The fused pass's schedule of this batch on the Triton backend (its token blocks)."""
    rows = shifted_targets(labels).reshape(-1).ne(-100).nonzero().squeeze(1)
    block = StoredLogits.block_rows(Rows(hs.reshape(-1, hs.shape[-1]).to(dtype), rows, rows))
    return fused_pass.pair_schedule("triton", rows, labels.shape[1], labels.shape[0] // 2, block)


def just_enough_workspace(hs, w, labels, dtype=torch.float32) -> int:
    return schedule(hs, labels, dtype).slots * slot_bytes(hs, w, dtype)


def several_groups_batch(**sizes):
    """make_batch's random lengths, drawn until the schedule holds several blocks at once and forms the loss
    gradient in several groups of pairs (a few draws in a hundred have one of either)."""
    for _ in range(100):
        hs, w, labels = make_batch(**sizes)
        plan = schedule(hs, labels)
        if plan.slots >= 2 and sum(step.ready > step.done for step in plan.steps) >= 2:
            return hs, w, labels
    raise AssertionError("no batch with several groups in 100 draws")


# --- the float64 oracle -----------------------------------------------------------------------------------------


# (the interpreter is slow: each head once in float32, the softcapped one in float16 too)
CASES = [("linear", torch.float32), ("bias+temperature", torch.float32), ("softcap+scale", torch.float32),
         ("softcap+scale", torch.float16)]
CASE_IDS = [f"{head}-{str(dtype).removeprefix('torch.')}" for head, dtype in CASES]


@pytest.mark.parametrize("head,dtype", CASES, ids=CASE_IDS)
def test_against_float64(head, dtype, spy):
    """Odd sizes (H = 31, V = 300: not a multiple of the 32-column tile), a fully masked rejected sequence,
    a one-token completion, and just the workspace the schedule needs."""
    hs, w, labels = several_groups_batch(pairs=3, seq_len=70)
    bias, head_options = head_inputs(head, w)
    options = dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], beta=0.2,
                   **precomputed_reference(hs, w, labels, bias, **head_options))
    out, grads = run(hs, w, labels, bias, dtype=dtype, backend="triton",
                     workspace_bytes=just_enough_workspace(hs, w, labels, dtype), **options, **head_options)
    assert spy.completed == 1
    _, two_pass_grads = run(hs, w, labels, bias, dtype=dtype, backend="triton", fused=False, **options, **head_options)
    expected, expected_grads = oracle(hs, w, labels, bias, head_options, **options)
    assert_close(out.loss, expected.loss, TOL[dtype], "loss")
    for name in ("chosen_logps", "rejected_logps"):
        assert_close(getattr(out, name), getattr(expected, name), TOL[dtype], name)
    for name, got, two_pass, want in zip(("hidden", "weight", "bias"), grads, two_pass_grads, expected_grads):
        if want is not None:
            assert got.dtype == dtype
            assert_close(got, want, max(TOL[dtype], 1.05 * relative_error(two_pass, want)), f"grad {name}")


@pytest.mark.parametrize("options", [
    dict(loss_type="hinge", use_weighting=True, token_metrics=True, f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], ld_alpha=0.4),
], ids=["wpo-js-hinge", "rpo-ld"])
def test_loss_options_against_float64(options, spy):
    hs, w, labels = make_batch(pairs=2, seq_len=60, hidden=96, vocab=257)
    ref = precomputed_reference(hs, w, labels)
    out, grads = run(hs, w, labels, backend="triton", **options, **ref)
    assert spy.completed == 1
    _, two_pass_grads = run(hs, w, labels, backend="triton", fused=False, **options, **ref)
    expected, expected_grads = oracle(hs, w, labels, **options, **ref)
    assert_close(out.loss, expected.loss, TOL[torch.float32], "loss")
    for name, got, two_pass, want in zip(("hidden", "weight"), grads, two_pass_grads, expected_grads):
        assert_as_close_as_two_pass(got, two_pass, want, f"grad {name}")


def test_peaked_rows_keep_their_gradient(spy):
    """Rows with p_y >= 0.999: their dX = g ((1 - p_y) W_y - sum_{v != y} p_v W_v) is a small difference.
    The target entry of d_logits comes from the sum of the other probabilities, not from 1 - p_y, so
    each row's gradient keeps its relative accuracy (the two-pass route's cancels there)."""
    # 4 pairs: over 300 seeds, 20 or more scored rows with p_y >= 0.999 (with 2 pairs a seed in ~100 had fewer than 10)
    hs, w, labels = make_batch(pairs=4, seq_len=60, hidden=32, vocab=128, masked_row=False)
    scored = shifted_targets(labels) != -100
    hs[scored] *= 8
    labels[:, 1:][scored[:, :-1]] = (hs[scored] @ w.T).argmax(1)  # each target its row's largest logit
    ref = precomputed_reference(hs, w, labels)
    _, grads = run(hs, w, labels, backend="triton", **ref)
    assert spy.completed == 1
    _, expected_grads = oracle(hs, w, labels, **ref)
    peaked = peaked_rows(reference.token_logprobs(hs, w, shifted_targets(labels))) & scored
    assert int(peaked.sum()) >= 10
    want = expected_grads[0][peaked]
    row_error = (grads[0][peaked].double() - want).norm(dim=1) / want.norm(dim=1)
    assert float(row_error.max()) < 1e-3  # the two-pass route: ~1 (its 1 - p_y is all rounding)


def test_fp16_tiles_that_underflow_in_exp_space(spy):
    """The slots hold exp(z - m) per 32-column tile in fp16: with a softcap of 30 and logits spread over its whole
    range, most entries fall below fp16's 2^-24 and are stored as 0. They contribute p = 0 (never log 0 in the
    softcap's derivative), and the gradient keeps fp16's accuracy against float64."""
    hs, w, labels = make_batch(pairs=2, seq_len=60, hidden=32, vocab=257)
    hs *= 12  # raw logits of a few tens: capped at +-30, many of a tile's entries 20+ below its maximum
    head_options = dict(softcap=30.0)
    z = 30.0 * torch.tanh(hs.reshape(-1, hs.shape[-1]) @ w.T / 30.0)
    spread = z[:, :256].view(z.shape[0], 8, 32)
    underflow = (spread - spread.amax(-1, keepdim=True) < -17.4).double().mean()  # exp(-17.4) < 2^-24 / 2
    assert underflow > 0.2, underflow
    reference_inputs = precomputed_reference(hs, w, labels, **head_options)
    options = dict(**reference_inputs, **head_options)
    out, grads = run(hs, w, labels, dtype=torch.float16, backend="triton", **options)
    assert spy.completed == 1
    two_pass, two_pass_grads = run(hs, w, labels, dtype=torch.float16, backend="triton", fused=False, **options)
    assert torch.equal(out.loss, two_pass.loss)  # (fp16 inputs at logits of +-30: the loss's error is theirs)
    _, expected_grads = oracle(hs, w, labels, None, head_options, **reference_inputs)
    for name, got, two_pass, want in zip(("hidden", "weight"), grads, two_pass_grads, expected_grads):
        assert torch.isfinite(got).all()
        assert_close(got, want, max(TOL[torch.float16], 1.05 * relative_error(two_pass, want)), f"grad {name}")


# --- dW accumulation -----------------------------------------------------------------------------------------------


def test_dw_accumulates_in_the_weight_dtype_for_a_few_gemms_only():
    """One rounding per dW GEMM: a 16-bit gradient is its own accumulator up to MAX_ROUNDED_DW_GEMMS GEMMs (the
    consecutive blocks a step releases, cut where the ring wraps); fp32 weights always are."""
    def schedule_releasing(*releases):
        return SimpleNamespace(steps=[SimpleNamespace(release=list(r)) for r in releases])

    assert triton_fused._slot_runs([3, 4, 5, 6], 4) == [[3], [4, 5, 6]]  # slot 0 follows slot 3: a second GEMM
    assert triton_fused._slot_runs([1, 2, 5], 8) == [[1, 2], [5]]
    limit = triton_fused.MAX_ROUNDED_DW_GEMMS
    few = schedule_releasing(*([2 * i, 2 * i + 1] for i in range(limit)))  # limit GEMMs of two blocks each
    assert triton_fused.dw_accumulator_dtype(torch.bfloat16, few, 64) == torch.bfloat16
    assert triton_fused.dw_accumulator_dtype(torch.bfloat16, few, 3) == torch.float32  # some runs wrap: 2 GEMMs
    many = schedule_releasing(*([i] for i in range(limit + 1)))
    assert triton_fused.dw_accumulator_dtype(torch.float16, many, 64) == torch.float32
    assert triton_fused.dw_accumulator_dtype(torch.float32, many, 64) == torch.float32


def test_many_dw_gemms_take_an_fp32_accumulator(spy, one_thread):
    """Many short pairs: a dW GEMM per pair, more than MAX_ROUNDED_DW_GEMMS, so a 16-bit weight's dW is summed in
    fp32 and cast once; the gradients match float64 like the two-pass route's."""
    hs, w, labels = make_batch(pairs=2 * triton_fused.MAX_ROUNDED_DW_GEMMS, seq_len=40, hidden=31, vocab=100,
                               masked_row=False)
    plan = schedule(hs, labels, torch.float16)
    gemms = sum(len(triton_fused._slot_runs(step.release, plan.slots)) for step in plan.steps)
    assert gemms > triton_fused.MAX_ROUNDED_DW_GEMMS
    ref = precomputed_reference(hs, w, labels)
    with LargestTensors(w.shape) as seen:
        out, grads = run(hs, w, labels, dtype=torch.float16, backend="triton", **ref)
    assert spy.completed == 1
    assert seen.head_shaped_fp32 == 1
    _, two_pass_grads = run(hs, w, labels, dtype=torch.float16, backend="triton", fused=False, **ref)
    _, expected_grads = oracle(hs, w, labels, **ref)
    for name, got, two_pass, want in zip(("hidden", "weight"), grads, two_pass_grads, expected_grads):
        assert got.dtype == torch.float16
        assert_close(got, want, max(TOL[torch.float16], 1.05 * relative_error(two_pass, want)), f"grad {name}")


# --- bitwise: the Triton two-pass route's log-probs and metrics, run to run ---------------------------------------


@pytest.mark.parametrize("head,dtype", CASES[1::2], ids=CASE_IDS[1::2])
def test_logps_and_metrics_are_the_two_pass_bits_and_runs_repeat_bitwise(head, dtype, spy):
    hs, w, labels = make_batch(pairs=2, seq_len=70)
    assert_two_pass_bits_and_repeat(hs, w, labels, *head_inputs(head, w), spy, TOL[dtype], backend="triton",
                                    dtype=dtype, workspace_bytes=just_enough_workspace(hs, w, labels, dtype))


# --- the fallbacks ----------------------------------------------------------------------------------------------


def test_a_pair_too_long_for_the_workspace_takes_the_two_pass_path(spy):
    hs, w, labels = make_batch(pairs=2, seq_len=100, vocab=100)
    labels[:, 4:] = torch.randint(0, w.shape[0], labels[:, 4:].shape)  # every sequence ~100 tokens long
    assert schedule(hs, labels).slots >= 2
    needed = just_enough_workspace(hs, w, labels)
    assert_same_as_two_pass(hs, w, labels, backend="triton", workspace_bytes=needed - slot_bytes(hs, w),
                            **precomputed_reference(hs, w, labels))
    assert spy.calls == 1 and spy.completed == 0


# --- passes over n·H·V, tl.dot tiles and torch products alike -----------------------------------------------------


class DotTiles:
    """Counts 2·M·N·K FLOPs for every tl.dot tile Triton's interpreter computes."""

    def __init__(self, monkeypatch):
        self.flops = 0
        create_dot = interpreter.InterpreterBuilder.create_dot

        def counted(builder, a, b, d, *args):
            (m, k), n = a.data.shape[-2:], b.data.shape[-1]
            self.flops += 2 * m * n * k
            return create_dot(builder, a, b, d, *args)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counted)


def pass_batch():
    """n = 4 x 48 scored rows, H = 32, V = 512: whole interpreter tiles (16 x 32 x 16), so every FLOP a
    tile computes is one of the n·H·V products, and padding cannot hide or add a pass."""
    hs, w, labels = make_batch(pairs=2, seq_len=64, hidden=32, vocab=512, prompt=16, masked_row=False)
    labels[:, 16:] = torch.randint(0, 512, labels[:, 16:].shape)
    n = int((shifted_targets(labels) != -100).sum())
    assert n == 192
    return hs.float(), w.float(), labels, n


@pytest.mark.parametrize("fused,passes", [(True, 3), (False, 4)])
def test_trainable_head_passes(fused, passes, monkeypatch, one_thread, spy):
    hs, w, labels, n = pass_batch()
    ref = precomputed_reference(hs.double(), w.double(), labels)
    h, weight = hs.clone().requires_grad_(), w.clone().requires_grad_()
    dots = DotTiles(monkeypatch)
    with GemmPasses(n, 32, 512) as products:
        fastdpo.FastDPOLoss(backend="triton", fused=fused)(h, weight, labels, **ref).loss.backward()
    assert spy.completed == int(fused)
    assert products.passes + dots.flops / products.unit == pytest.approx(passes, abs=1e-6)
    assert dots.flops / products.unit == pytest.approx(1 if fused else 2, abs=1e-6)  # the logits tiles


# --- memory -----------------------------------------------------------------------------------------------------


def test_no_tokens_by_vocabulary_tensor(spy, one_thread):
    hs, w, labels = make_batch(pairs=3, seq_len=150, vocab=512)
    hs, w = hs.half(), w.half()
    vocab, tokens = w.shape[0], labels.numel()
    workspace = just_enough_workspace(hs, w, labels, torch.float16)
    ring = workspace // 2  # the slots hold fp16 tiles (in exp space)
    assert ring < tokens * vocab / 2
    ref = precomputed_reference(hs.double(), w.double(), labels)
    h, weight = hs.clone().requires_grad_(), w.clone().requires_grad_()
    with LargestTensors(w.shape) as seen:
        fastdpo.FastDPOLoss(backend="triton", workspace_bytes=workspace)(h, weight, labels, **ref).loss.backward()
    assert spy.completed == 1
    assert seen.largest <= max(ring, vocab * w.shape[1], tokens * w.shape[1])
    assert seen.largest < tokens * vocab
    assert seen.head_shaped_fp32 == 0  # a few dW GEMMs: the fp16 gradient is their accumulator
    assert weight.grad.dtype == torch.float16
