"""linear_logprobs (torch tiles and Triton kernels) against the float64 oracle, values and gradients."""

import importlib

import pytest
import torch
from helpers import CONFIG_IDS, CONFIGS, DEVICE, as_reference, assert_close, leaf, random_targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdpo
from fastdpo import reference

# (targets shape, hidden, vocab): vocab never a multiple of the interpreter's 32-wide tile except
# 128, hidden sizes off the 16-wide K step, a single token, and token counts off the 16-row block.
SHAPES = [
    ((37,), 31, 300),
    ((2, 9), 96, 129),
    ((1,), 16, 50),
    ((3, 7), 31, 128),
]
TRANSFORMS = [
    {},
    {"softcap": 3.0},
    {"temperature": 0.7, "logit_scale": 1.3},
    {"softcap": 2.5, "temperature": 1.5, "logit_scale": 0.8},
]


def make_inputs(shape, hidden, vocab, dtype, bias=True, ignore_index=-100):
    # Weight scale keeps the logits' spread realistic (a few nats) for every hidden size.
    h = torch.randn(*shape, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) * (2.0 / hidden**0.5)
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    targets = random_targets(shape, vocab, ignore_index=ignore_index)
    return leaf(h, dtype), leaf(w, dtype), None if b is None else leaf(b, dtype), targets.to(DEVICE)


def check_against_reference(h, w, b, targets, backend, tol, ignore_index=-100, workspace_bytes=None, **transform):
    stats = fastdpo.linear_logprobs(h, w, targets, b, ignore_index, with_stats=True, backend=backend,
                                    workspace_bytes=workspace_bytes, **transform)
    refs = [as_reference(t) for t in (h, w)] + [None if b is None else as_reference(b)]
    expected = reference.token_stats(*refs[:2], targets.cpu(), refs[2], ignore_index, **transform)
    for name in ("logps", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(stats, name), getattr(expected, name), tol, name)
    assert torch.equal(stats.is_top1.cpu(), expected.is_top1), "is_top1"

    upstream = torch.randn(targets.shape, dtype=torch.float64)
    (stats.logps * upstream.to(stats.logps)).sum().backward()
    (expected.logps * upstream).sum().backward()
    for name, got, want in zip(("hidden", "weight", "bias"), (h, w, b), refs):
        if got is not None:
            assert_close(got.grad, want.grad, tol, f"grad {name}")


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape,hidden,vocab", SHAPES)
def test_matches_reference(backend, dtype, tol, shape, hidden, vocab):
    h, w, b, targets = make_inputs(shape, hidden, vocab, dtype)
    check_against_reference(h, w, b, targets, backend, tol)


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: "-".join(t) or "plain")
def test_logit_transforms(backend, dtype, tol, transform):
    h, w, b, targets = make_inputs((23,), 40, 200, dtype, bias=False)
    check_against_reference(h, w, b, targets, backend, tol, **transform)


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
def test_other_ignore_index(backend, dtype, tol):
    h, w, b, targets = make_inputs((4, 6), 31, 100, dtype, ignore_index=-1)
    check_against_reference(h, w, b, targets, backend, tol, ignore_index=-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_masked_gives_zeros_and_zero_grads(backend):
    h, w, b, _ = make_inputs((3, 5), 31, 100, torch.float32)
    targets = torch.full((3, 5), -100, device=DEVICE)
    logps = fastdpo.linear_logprobs(h, w, targets, b, backend=backend)
    assert torch.equal(logps, torch.zeros_like(logps))
    logps.sum().backward()
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_inputs_get_no_gradient(backend, frozen):
    h, w, b, targets = make_inputs((19,), 31, 100, torch.float32, bias=False)
    (h if frozen == "hidden" else w).requires_grad_(False)
    fastdpo.linear_logprobs(h, w, targets, backend=backend).sum().backward()
    h_ref, w_ref = as_reference(h), as_reference(w)
    reference.token_logprobs(h_ref, w_ref, targets.cpu()).sum().backward()
    trained, trained_ref = (w, w_ref) if frozen == "hidden" else (h, h_ref)
    assert (h if frozen == "hidden" else w).grad is None
    assert_close(trained.grad, trained_ref.grad, 1e-4, "grad of the trained input")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.bfloat16, 1e-2)], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("bias,softcap,with_stats", [(False, None, False), (False, None, True), (True, 4.0, False)],
                         ids=["linear", "linear-stats", "bias-softcap"])
def test_torch_path_several_token_blocks(monkeypatch, dtype, tol, bias, softcap, with_stats):
    """Blocks of 16 rows and 128-column slices: 37 scored rows end in a 5-row block that reuses the
    buffers sized for the first, and V=300 ends in a 44-column slice. bfloat16 inputs are gathered
    into float32 buffers."""
    chunked = importlib.import_module("fastdpo.chunked")
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 16)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 16 * 128)
    h, w, b, targets = make_inputs((50,), 31, 300, dtype, bias=bias)
    targets = torch.randint(0, 300, (50,), device=DEVICE)
    targets[torch.randperm(50)[:13]] = -100  # 37 scored rows: blocks of 16, 16 and 5
    logps = fastdpo.linear_logprobs(h, w, targets, b, softcap=softcap, with_stats=with_stats, backend="torch")
    logps = logps.logps if with_stats else logps
    refs = [as_reference(t) for t in (h, w)] + [None if b is None else as_reference(b)]
    expected = reference.token_logprobs(*refs[:2], targets.cpu(), refs[2], softcap=softcap)
    assert_close(logps, expected, 1e-10 if dtype == torch.float64 else 1e-5, "logps")
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    (logps * upstream.to(logps)).sum().backward()
    (expected * upstream).sum().backward()
    for name, got, want in zip(("hidden", "weight", "bias"), (h, w, b), refs):
        if got is not None:
            assert_close(got.grad, want.grad, tol, f"grad {name}")


def test_triton_several_vocabulary_chunks():
    """A workspace of two 32-column tiles: V=300 is walked in 5 chunks, the last 44 columns wide."""
    h, w, b, targets = make_inputs((21,), 31, 300, torch.float32)
    n_scored = int((targets != -100).sum())
    check_against_reference(h, w, b, targets, "triton", 1e-4, softcap=4.0, workspace_bytes=max(1, n_scored) * 64 * 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top1_is_the_first_argmax(backend):
    # Rows 3 and 7 of W are identical, so their logits tie for the maximum: only the first counts.
    w = torch.zeros(40, 16)
    w[3] = w[7] = 1.0
    h = torch.ones(2, 16)
    targets = torch.tensor([3, 7])
    stats = fastdpo.linear_logprobs(h.to(DEVICE), w.to(DEVICE), targets.to(DEVICE), with_stats=True,
                                    backend=backend)
    assert stats.is_top1.tolist() == [True, False]


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy under the interpreter, on NaN
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_input_gives_nan_not_a_crash(backend):
    h, w, b, targets = make_inputs((9,), 31, 100, torch.float32)
    targets[0] = 5
    with torch.no_grad():
        h[0, 0] = float("nan")
    logps = fastdpo.linear_logprobs(h, w, targets, b, backend=backend)
    assert torch.isnan(logps[0])
    assert torch.isfinite(logps[1:]).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.integers(1, 40), hidden=st.integers(1, 70), vocab=st.integers(1, 300), bias=st.booleans(),
       ignore_fraction=st.floats(0.0, 1.0))
def test_torch_path_any_shape(tokens, hidden, vocab, bias, ignore_fraction):
    h = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if bias else None
    targets = random_targets((tokens,), vocab, ignore_fraction)
    check_against_reference(h, w, b, targets, "torch", 1e-10)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.integers(1, 40), hidden=st.integers(1, 50), vocab=st.integers(1, 200))
def test_triton_any_shape(tokens, hidden, vocab):
    h, w, b, targets = make_inputs((tokens,), hidden, vocab, torch.float32)
    check_against_reference(h, w, b, targets, "triton", 1e-4)


@pytest.mark.parametrize("capability", [80, 90])
def test_triton_gpu_tile_configs_in_the_interpreter(monkeypatch, capability):
    """The GPU tiles (128 x 128 x 64 for 16-bit, 64 x 64 x 32 for fp32, GROUP_M swizzle) on odd sizes,
    in the interpreter: V=300 leaves a partial last tile, 150 rows a partial last token block."""
    for name in ("fastdpo.kernels.logprob_forward", "fastdpo.kernels.logprob_backward", "fastdpo.triton_head"):
        monkeypatch.setattr(importlib.import_module(name), "device_capability", lambda device: capability)
    h, w, b, targets = make_inputs((150,), 64, 300, torch.float16)
    check_against_reference(h, w, b, targets, "triton", 1e-2, softcap=5.0)
    h, w, b, targets = make_inputs((70,), 31, 200, torch.float32)
    check_against_reference(h, w, b, targets, "triton", 1e-4)
