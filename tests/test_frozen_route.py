"""The frozen-head route on the Triton backend (fastdpo.triton_fused.FrozenStoredLogits, in Triton's interpreter):
FastDPOLoss and linear_logprobs against the float64 oracle, the Triton two-pass route's bits, determinism,
GEMM passes counted tile by tile, and memory. The helpers are tests/test_fused_pass.py's and
tests/test_triton_fused.py's; the PyTorch path's frozen route is tested in tests/test_fused_pass.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, relative_error
from test_fused_pass import (
    GemmPasses,
    LargestTensors,
    assert_peaked_rows_exact,
    frozen_head_steps,
    head_inputs,
    leaves,
    make_batch,
    oracle,
    outputs,
    precomputed_reference,
    run,
)
from test_triton_fused import CASE_IDS, CASES, TOL, DotTiles, pass_batch

import fastdpo
from fastdpo import reference, triton_fused
from fastdpo.chunked import Rows
from fastdpo.sequences import shifted_targets


class FrozenSpy:
    """Counts the frozen route's forwards on Triton."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = triton_fused.FrozenStoredLogits.forward_with_u

        def spy(head):
            self.calls += 1
            return original(head)

        monkeypatch.setattr(triton_fused.FrozenStoredLogits, "forward_with_u", spy)


@pytest.fixture
def frozen_spy(monkeypatch):
    return FrozenSpy(monkeypatch)


def logprobs_and_grad(hs, w, targets, bias, dtype, upstream, **options):
    """linear_logprobs with stats on a frozen Triton head, then any upstream loss: (stats, grad of hidden)."""
    h, weight, b = leaves(hs, w, bias, dtype, frozen=True)
    stats = fastdpo.linear_logprobs(h, weight, targets, b, backend="triton", with_stats=True, **options)
    (stats.logps * upstream.float()).square().sum().backward()
    return stats, h.grad


# --- linear_logprobs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head,dtype", CASES, ids=CASE_IDS)
def test_linear_logprobs_against_float64_and_the_two_pass_bits(head, dtype, frozen_spy):
    """H = 31, V = 300 (not a multiple of the 32-column tile), a fully masked sequence, a one-token completion,
    rows over several 64-row token blocks; with stats; any upstream loss."""
    hs, w, labels = make_batch(pairs=2, seq_len=70)
    bias, options = head_inputs(head, w)
    targets = shifted_targets(labels)
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    stats, grad = logprobs_and_grad(hs, w, targets, bias, dtype, upstream, **options)
    again, again_grad = logprobs_and_grad(hs, w, targets, bias, dtype, upstream, **options)
    assert frozen_spy.calls == 2
    two_pass, two_pass_grad = logprobs_and_grad(hs, w, targets, bias, dtype, upstream, fused=False, **options)
    assert frozen_spy.calls == 2
    for got, repeated, want in zip(stats, again, two_pass):
        assert torch.equal(got, want) and torch.equal(repeated, want)  # the two-pass route's bits, every run
    assert torch.equal(grad, again_grad)
    h64 = hs.clone().requires_grad_()
    logps = reference.token_logprobs(h64, w, targets, bias, **options)
    (logps * upstream).square().sum().backward()
    assert_close(stats.logps, logps, TOL[dtype], "logps")
    assert grad.dtype == dtype
    assert_close(grad, h64.grad, max(TOL[dtype], 1.05 * relative_error(two_pass_grad, h64.grad)), "grad hidden")
    assert bool((grad[targets == -100] == 0).all())


def test_nothing_scored_gives_a_zero_gradient(frozen_spy):
    hs, w, _ = make_batch(pairs=1, seq_len=20)
    targets = torch.full(hs.shape[:2], -100)
    stats, grad = logprobs_and_grad(hs, w, targets, None, torch.float32, torch.ones(targets.shape))
    assert frozen_spy.calls == 0  # no rows: nothing to run
    assert bool((stats.logps == 0).all()) and bool((grad == 0).all())


def test_peaked_rows_keep_their_gradient(frozen_spy):
    """Rows with p_y >= 0.999: U = t'_y (1 - p_y) W_y - sum_{v != y} p_v t'_v W_v is a small difference; the
    target entry of D comes from the sum of the other probabilities, so each row keeps its relative accuracy."""
    assert_peaked_rows_exact("triton", rows=320, hidden=32, vocab=256)
    assert frozen_spy.calls == 1


# --- FastDPOLoss --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head,dtype", [("bias+temperature", torch.float32), ("softcap+scale", torch.float16)],
                         ids=["bias+temperature-float32", "softcap+scale-float16"])
def test_fastdpoloss_against_float64_and_the_two_pass_bits(head, dtype, frozen_spy):
    """H = 96, V = 257; WPO weights and token metrics (the stats); outputs the two-pass route's bits, every run."""
    hs, w, labels = make_batch(pairs=2, seq_len=60, hidden=96, vocab=257)
    bias, head_options = head_inputs(head, w)
    loss_options = dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], beta=0.2, use_weighting=True,
                        **precomputed_reference(hs, w, labels, bias, **head_options))
    options = dict(token_metrics=True, backend="triton", dtype=dtype, frozen=True, **head_options, **loss_options)
    out, grads = run(hs, w, labels, bias, **options)
    again, again_grads = run(hs, w, labels, bias, **options)
    assert frozen_spy.calls == 2
    two_pass, two_pass_grads = run(hs, w, labels, bias, fused=False, **options)
    for name, value in outputs(two_pass).items():
        assert torch.equal(outputs(out)[name], value), name
        assert torch.equal(outputs(again)[name], value), name
    assert torch.equal(grads[0], again_grads[0])
    assert grads[1] is None and grads[2] is None
    expected, expected_grads = oracle(hs, w, labels, bias, head_options, **loss_options)
    assert_close(out.loss, expected.loss, TOL[dtype], "loss")
    assert grads[0].dtype == dtype
    tol = max(TOL[dtype], 1.05 * relative_error(two_pass_grads[0], expected_grads[0]))
    assert_close(grads[0], expected_grads[0], tol, "grad hidden")


# --- passes over n·H·V, tl.dot tiles and torch products alike -------------------------------------------------------


@pytest.mark.parametrize("fused,passes", [(True, 2), (False, 3)])
def test_frozen_head_passes(fused, passes, monkeypatch, one_thread, frozen_spy):
    """The forward's logits tiles (1 pass) and U = D W (1 pass); the two-pass route recomputes the tiles."""
    hs, w, labels, n = pass_batch()
    dots = DotTiles(monkeypatch)
    for step in frozen_head_steps(hs, w, labels, "triton", fused):
        dots.flops = 0
        with GemmPasses(n, 32, 512) as products:
            step()
        assert products.passes + dots.flops / products.unit == pytest.approx(passes, abs=1e-6)
        assert dots.flops / products.unit == pytest.approx(1 if fused else 2, abs=1e-6)  # the logits tiles
    assert frozen_spy.calls == 2 * int(fused)


# --- memory -------------------------------------------------------------------------------------------------------


def test_a_few_slots_and_no_tokens_by_vocabulary_tensor(frozen_spy, one_thread):
    hs, w, labels = make_batch(pairs=3, seq_len=150, vocab=512)
    h, weight, _ = leaves(hs, w, None, torch.float16, frozen=True)
    vocab, tokens = w.shape[0], labels.numel()
    block = triton_fused.FrozenStoredLogits.block_rows(Rows(h.detach().reshape(-1, h.shape[-1]), None, None))
    ring = triton_fused.FROZEN_SLOTS * block * vocab  # the slots of one U GEMM
    assert ring < tokens * vocab / 4
    ref = precomputed_reference(hs, w, labels)
    with LargestTensors(w.shape) as seen:
        fastdpo.FastDPOLoss(backend="triton")(h, weight, labels, **ref).loss.backward()
    assert frozen_spy.calls == 1
    assert seen.largest <= max(ring, vocab * w.shape[1], tokens * w.shape[1])
    assert seen.head_shaped_fp32 == 0
