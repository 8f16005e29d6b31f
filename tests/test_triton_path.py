"""The Triton backend's structure, checked without a GPU: what it allocates, its workspace bound,
its reproducibility, and log-probs that do not depend on what else the call computes."""

import pytest
import torch
from helpers import DEVICE, leaf, random_targets, run_custom_op_inside
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastdpo
from fastdpo.kernels.config import device_capability, gemm_config

TOKENS, HIDDEN, VOCAB = 48, 16, 1000  # V*H = 16,000 elements, well below the ~34,000 logits of n*V


class RecordOutputs(TorchDispatchMode):
    """Records (op, dtype, shape) of every new tensor (not a view of an input) that ops create while active.

    Triton's interpreter copies each kernel argument through a byte buffer and views it back
    (uint8 copies, `set_`): those are the interpreter's, not fastdpo's, and are left out.
    """

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = run_custom_op_inside(self, func, args, kwargs)  # fastdpo's custom ops: the ops inside them
        if inside is not None:
            return inside
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("set_"):
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.outputs += [(str(func), t.dtype, tuple(t.shape)) for t in tree_leaves(out)
                         if isinstance(t, torch.Tensor) and t.dtype != torch.uint8
                         and t.untyped_storage().data_ptr() not in inputs]  # views and in-place results alias an input
        return out


def inputs(dtype=torch.float16, bias=False):
    h = leaf(torch.randn(TOKENS, HIDDEN), dtype)
    w = leaf(torch.randn(VOCAB, HIDDEN) * HIDDEN**-0.5 * 2, dtype)
    b = leaf(torch.randn(VOCAB), dtype) if bias else None
    targets = random_targets((TOKENS,), VOCAB).to(DEVICE)
    return h, w, b, targets


def run_step(h, w, b, targets, **options):
    with RecordOutputs() as recorder:
        logps = fastdpo.linear_logprobs(h, w, targets, b, backend="triton", **options)
        logps.sum().backward()
    return recorder.outputs


def numel(shape):
    return torch.Size(shape).numel()


@pytest.mark.parametrize("bias", [False, True])
def test_16bit_step_makes_no_fp32_tensor_the_size_of_the_weight(bias):
    h, w, b, targets = inputs(bias=bias)
    outputs = run_step(h, w, b, targets)
    fp32_weight_sized = [o for o in outputs if o[1] == torch.float32 and numel(o[2]) >= VOCAB * HIDDEN]
    assert not fp32_weight_sized, fp32_weight_sized
    assert w.grad.dtype == torch.float16 and h.grad.dtype == torch.float16


def test_no_tensor_holds_the_logits_and_the_workspace_keeps_its_bound():
    h, w, b, targets = inputs()
    n_scored = int((targets != -100).sum())
    block_v = gemm_config(torch.float16, device_capability(h.device), HIDDEN)["BLOCK_V"]
    budget = n_scored * 3 * block_v * 2  # three vocabulary tiles of fp16 d_logits
    outputs = run_step(h, w, b, targets, workspace_bytes=budget)
    logits_sized = [o for o in outputs if numel(o[2]) >= n_scored * VOCAB]
    assert not logits_sized, logits_sized
    workspaces = [o for o in outputs if o[1] == torch.float16 and len(o[2]) == 2 and o[2][0] == n_scored
                  and o[2][1] not in (HIDDEN,)]
    assert workspaces, "no d_logits workspace was recorded: the check would pass vacuously"
    assert all(numel(shape) * 2 <= budget for _, _, shape in workspaces), workspaces


def test_frozen_head_makes_no_weight_gradient_and_frozen_hidden_no_fp32_dx():
    h, w, b, targets = inputs()
    w.requires_grad_(False)
    weight_shaped = [o for o in run_step(h, w, b, targets) if o[2] == (VOCAB, HIDDEN)]
    assert not weight_shaped, weight_shaped
    h, w, b, targets = inputs()
    h.requires_grad_(False)
    fp32_dx = [o for o in run_step(h, w, b, targets) if o[1] == torch.float32 and o[2] == (TOKENS, HIDDEN)
               or o[1] == torch.float32 and len(o[2]) == 2 and o[2][1] == HIDDEN]
    assert not fp32_dx, fp32_dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitwise_reproducible(dtype):
    h, w, b, targets = inputs(dtype, bias=True)

    def step():
        for t in (h, w, b):
            t.grad = None
        logps = fastdpo.linear_logprobs(h, w, targets, b, softcap=5.0, backend="triton",
                                        workspace_bytes=TOKENS * 64 * 4)
        (logps * torch.linspace(-1, 1, TOKENS, device=DEVICE)).sum().backward()
        return logps.detach(), h.grad, w.grad, b.grad

    for first, second in zip(step(), step()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logps_do_not_depend_on_gradients_statistics_or_workspace(dtype):
    h, w, b, targets = inputs(dtype, bias=True)
    with_grad = fastdpo.linear_logprobs(h, w, targets, b, backend="triton")
    with torch.no_grad():
        without_grad = fastdpo.linear_logprobs(h, w, targets, b, backend="triton")
    with_stats = fastdpo.linear_logprobs(h, w, targets, b, backend="triton", with_stats=True).logps
    detached = fastdpo.linear_logprobs(h.detach(), w.detach(), targets, b.detach(), backend="triton",
                                       workspace_bytes=1)
    for other in (without_grad, with_stats, detached):
        assert torch.equal(with_grad.detach(), other.detach())


def test_gradients_do_not_depend_on_the_workspace():
    h, w, b, targets = inputs(torch.float32, bias=True)

    def grads(workspace_bytes):
        for t in (h, w, b):
            t.grad = None
        fastdpo.linear_logprobs(h, w, targets, b, backend="triton", workspace_bytes=workspace_bytes).sum().backward()
        return h.grad, w.grad, b.grad

    # Chunking only regroups the same sums: dX adds the chunks' fp32 products, dW's rows come from
    # GEMMs of another shape (which may block their K loop differently).
    for narrow, wide in zip(grads(1), grads(None)):
        torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GiB"])
def test_workspace_bytes_is_validated(bad):
    h, w, b, targets = inputs(torch.float32)
    with pytest.raises(ValueError, match="workspace_bytes"):
        fastdpo.linear_logprobs(h, w, targets, backend="triton", workspace_bytes=bad)
