"""torch.compile(fullgraph=True) over linear_logprobs and FastDPOLoss: one graph, eager's bits.

The fused head is opaque to the compiler (custom ops in fastdpo.ops), so the same implementation runs
compiled and eager: with the "eager" and "aot_eager" backends, which run the traced ops as they are,
the loss, the log-probs, the statistics and the gradients must be bitwise equal. Inductor generates
its own kernels for the sequence sums and loss ops around the head (its reductions round
differently), so there the results agree within float32 round-off.
The Triton path runs through its interpreter without a GPU (TRITON_INTERPRET=1, CPU tensors: conftest.py)
and on the GPU's tensors where there is one.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastdpo
from helpers import DEVICE, random_targets

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not fastdpo.backends.triton_available(), reason="needs triton"))]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def head_inputs(shape=(3, 7), hidden_size=24, vocab=70, bias=True):
    hidden = torch.randn(*shape, hidden_size, device=DEVICE, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, hidden_size, device=DEVICE)).requires_grad_()
    b = torch.randn(vocab, device=DEVICE, requires_grad=True) if bias else None
    targets = random_targets(shape, vocab).to(DEVICE)
    targets.view(-1)[-1] = -100  # at least one ignored position
    return hidden, weight, b, targets


def run_with_grads(fn, leaves, *args):
    """fn(*args) -> (outputs, gradients of the leaves from the sum of the first output)."""
    for t in leaves:
        t.grad = None
    out = fn(*args)
    first = out[0] if isinstance(out, tuple) else out
    first.sum().backward()
    return out, [t.grad.clone() for t in leaves]


def graph_breaks(fn, *args) -> int:
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_count == 1, explanation.break_reasons
    return explanation.graph_break_count


def assert_bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual, expected), f"{what}: max |diff| {(actual - expected).abs().max().item():.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_stats", [False, True], ids=["logps", "stats"])
def test_linear_logprobs_compiles_to_one_graph_with_eager_bits(backend, with_stats):
    hidden, weight, bias, targets = head_inputs()
    options = dict(backend=backend, with_stats=with_stats, softcap=4.0 if with_stats else None)

    def head(hidden, weight, targets, bias):
        return tuple(fastdpo.linear_logprobs(hidden, weight, targets, bias, **options)) if with_stats else \
            fastdpo.linear_logprobs(hidden, weight, targets, bias, **options)

    assert graph_breaks(head, hidden, weight, targets, bias) == 0
    leaves = (hidden, weight, bias)
    expected, expected_grads = run_with_grads(head, leaves, hidden, weight, targets, bias)
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    actual, grads = run_with_grads(compiled, leaves, hidden, weight, targets, bias)
    for name, a, e in zip(fastdpo.TokenStats._fields, actual if with_stats else [actual],
                          expected if with_stats else [expected]):
        assert_bitwise(a, e, name)
    for name, a, e in zip(("d hidden", "d weight", "d bias"), grads, expected_grads):
        assert_bitwise(a, e, name)
    if with_stats:
        assert not any(t.requires_grad for t in actual[1:]), "only logps carries a gradient"


def test_sparse_backward_under_compile():
    """grad_tolerance > 0 keeps the Triton forward's per-tile lse as a full-size output for the backward."""
    pytest.importorskip("triton")
    hidden, weight, _, targets = head_inputs(shape=(40,), vocab=300, bias=False)
    hidden.data.mul_(3.0)  # peaked softmaxes: most (block, tile) pairs carry no mass and are skipped

    def head(hidden, weight, targets):
        return fastdpo.linear_logprobs(hidden, weight, targets, backend="triton", grad_tolerance=1e-3)

    expected, expected_grads = run_with_grads(head, (hidden, weight), hidden, weight, targets)
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    actual, grads = run_with_grads(compiled, (hidden, weight), hidden, weight, targets)
    assert_bitwise(actual, expected, "logps")
    for name, a, e in zip(("d hidden", "d weight"), grads, expected_grads):
        assert_bitwise(a, e, name)


def test_frozen_head_and_fully_ignored_batch():
    hidden, weight, _, targets = head_inputs(bias=False)
    weight.requires_grad_(False)
    compiled = torch.compile(fastdpo.linear_logprobs, backend="aot_eager", fullgraph=True)
    # A compiled graph takes the two-pass path (the frozen-head route is eager-only): the same code as
    # fused=False in eager mode.
    two_pass = functools.partial(fastdpo.linear_logprobs, fused=False)
    for labels in (targets, torch.full_like(targets, -100)):
        expected, (expected_grad,) = run_with_grads(two_pass, (hidden,), hidden, weight, labels)
        actual, (grad,) = run_with_grads(compiled, (hidden,), hidden, weight, labels)
        assert_bitwise(actual, expected, "logps")
        assert_bitwise(grad, expected_grad, "d hidden")


def dpo_batch(pairs=2, seq=9, hidden_size=24, vocab=70):
    hidden_states = torch.randn(2 * pairs, seq, hidden_size, device=DEVICE, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, hidden_size, device=DEVICE)).requires_grad_()
    bias = torch.randn(vocab, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, vocab, (2 * pairs, seq), device=DEVICE)
    labels[:, :3] = -100  # prompt
    labels[-1, -2:] = -100  # padding
    ref_hidden_states = hidden_states.detach() + 0.1 * torch.randn_like(hidden_states)
    return hidden_states, weight, bias, labels, ref_hidden_states


LOSS_CASES = {
    "sigmoid+sft-metrics": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], token_metrics=True),
    "ipo-wpo": dict(loss_type="ipo", use_weighting=True),
    "ld-dpo-softcap": dict(loss_type="sigmoid", ld_alpha=0.5, softcap=5.0),
    "simpo": dict(loss_type="simpo"),
}


def dpo_outputs(out: fastdpo.DPOOutput) -> dict[str, torch.Tensor]:
    values = {name: getattr(out, name) for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards",
                                                      "rejected_rewards", "reward_margins", "reward_accuracies")}
    return {**values, **out.token_metrics}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_fastdpoloss_compiles_to_one_graph_with_eager_bits(backend, case):
    hidden_states, weight, bias, labels, ref_hidden_states = dpo_batch()
    loss_fn = fastdpo.FastDPOLoss(backend=backend, **LOSS_CASES[case])

    def step(hidden_states, weight, labels, bias, ref_hidden_states):
        return loss_fn(hidden_states, weight, labels, bias, ref_hidden_states=ref_hidden_states)

    args = (hidden_states, weight, labels, bias, ref_hidden_states)
    assert graph_breaks(step, *args) == 0
    leaves = (hidden_states, weight, bias)
    # A compiled graph takes the two-pass path (the fused pass is eager-only): the same code as
    # fused=False in eager mode.
    two_pass = fastdpo.FastDPOLoss(backend=backend, fused=False, **LOSS_CASES[case])
    expected, expected_grads = _loss_and_grads(
        lambda *a: two_pass(*a[:4], ref_hidden_states=a[4]), leaves, args)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    actual, grads = _loss_and_grads(compiled, leaves, args)
    expected_values, actual_values = dpo_outputs(expected), dpo_outputs(actual)
    assert actual_values.keys() == expected_values.keys()
    for name, value in expected_values.items():
        assert_bitwise(actual_values[name], value, name)
    for name, a, e in zip(("d hidden_states", "d lm_head_weight", "d lm_head_bias"), grads, expected_grads):
        assert_bitwise(a, e, name)


def _loss_and_grads(step, leaves, args):
    for t in leaves:
        t.grad = None
    out = step(*args)
    out.loss.backward()
    return out, [t.grad.clone() for t in leaves]


def test_fastdpoloss_under_inductor():
    hidden_states, weight, bias, labels, ref_hidden_states = dpo_batch()
    loss_fn = fastdpo.FastDPOLoss(backend="torch", token_metrics=True)
    args = (hidden_states, weight, labels, bias)
    leaves = (hidden_states, weight, bias)
    expected, expected_grads = _loss_and_grads(lambda *a: loss_fn(*a, ref_hidden_states=ref_hidden_states), leaves,
                                               args)
    compiled = torch.compile(lambda *a: loss_fn(*a, ref_hidden_states=ref_hidden_states), backend="inductor",
                             fullgraph=True)
    actual, grads = _loss_and_grads(compiled, leaves, args)
    for name, value in dpo_outputs(expected).items():
        torch.testing.assert_close(dpo_outputs(actual)[name], value, rtol=1e-6, atol=1e-6, msg=name)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_labels_raise_under_compile(backend):
    hidden_states, weight, bias, labels, _ = dpo_batch()
    labels[1, 4] = 10_000
    loss_fn = torch.compile(fastdpo.FastDPOLoss(backend=backend, reference_free=True), backend="aot_eager",
                            fullgraph=True)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 70\) or ignore_index=-100; found \[10000\]"):
        loss_fn(hidden_states, weight, labels, bias)
    head = torch.compile(fastdpo.linear_logprobs, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 70\)"):
        head(hidden_states, weight, labels.clamp(min=-1), bias, backend=backend)


def test_double_backward_raises_eager_and_compiled():
    """Eager refuses create_graph=True with fastdpo's message; a compiled graph's backward is opaque and
    torch refuses to differentiate it (its own message, at the second differentiation)."""
    hidden, weight, bias, targets = head_inputs()
    logps = fastdpo.linear_logprobs(hidden, weight, targets, bias)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(logps.sum(), hidden, create_graph=True)
    logps = torch.compile(fastdpo.linear_logprobs, backend="aot_eager", fullgraph=True)(hidden, weight, targets, bias)
    (grad,) = torch.autograd.grad(logps.sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        grad.square().sum().backward()
