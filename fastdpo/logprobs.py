"""`linear_logprobs`: per-token log softmax(h W^T + b)[target] without materializing the logits.

The fused forward compacts the positions whose target is not `ignore_index` (prompt and padding
tokens cost nothing), runs the forward of the chosen backend, keeps only lse per token for the
backward, and recomputes the logits there. Backends: fastdpo.kernels (Triton) or fastdpo.chunked
(PyTorch tiles); `reference` runs the naive oracle through plain autograd.

Forward and backward are torch.library custom ops (fastdpo.ops) with fake implementations and a
registered autograd formula, called eagerly and under torch.compile alike: one implementation, the
same bits compiled or not, and no graph break (the host syncs live inside the ops). Only the checks
that read metadata run here, where the compiler traces them.
"""

from __future__ import annotations

import torch

from . import fused_pass, ops, reference
from .backends import resolve_backend
from .ops import DOUBLE_BACKWARD_MESSAGE  # noqa: F401  (re-exported: tests and users import it from here)
from .ops import no_partials as _no_partials, scatter as _scatter  # noqa: F401  (fastdpo.distributed uses them)
from .types import TokenStats
from .validation import check_logprob_metadata, checked_targets, require_tensor, widen_labels


class LinearLogProbs(torch.autograd.Function):
    """The fused ops (fastdpo.ops) as an autograd.Function, for heads whose backward needs more around the
    ops (distributed._Zero3LogProbs gathers a ZeRO-3 head again); `linear_logprobs` calls the ops directly.
    Same arguments as fastdpo::logprobs_forward; returns logps, or the five TokenStats fields with_stats."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = torch.ops.fastdpo.logprobs_forward(*inputs)
        ops.save_for_backward(ctx, inputs, outputs)
        if not inputs[8]:  # with_stats
            return outputs[0]
        ctx.mark_non_differentiable(*outputs[1:ops.STAT_FIELDS])
        return tuple(outputs[:ops.STAT_FIELDS])

    @staticmethod
    def backward(ctx, grad_logps, *_unused_stat_grads):
        return (*ops.backward(ctx, grad_logps), *([None] * 9))


def linear_logprobs(hidden, weight, targets, bias=None, ignore_index: int = -100, *, temperature: float = 1.0,
                    softcap: float | None = None, logit_scale: float = 1.0, with_stats: bool = False,
                    backend: str | None = None, grad_tolerance: float = 0.0, workspace_bytes: int | None = None,
                    fused: bool = True):
    """Per-token log-probabilities of `targets` under logits = transform(hidden @ weight.T + bias).

    hidden [..., H], weight [V, H], targets [...] (not shifted; `ignore_index` positions get 0).
    transform(x) = softcap * tanh(x * logit_scale / softcap) / temperature (TRL's order).
    Returns float32 log-probs shaped like `targets` (float64 for float64 inputs on the torch and
    reference backends), differentiable w.r.t. hidden, weight and bias; with `with_stats`, a
    TokenStats whose other fields (entropy, log sum p^2, mean logit, is_top1) carry no gradient.
    grad_tolerance = δ > 0 lets the backward skip (token block, vocabulary tile) pairs, decided from the
    forward's exact per-tile probability masses before anything is recomputed: each row drops at most
    δ of probability mass in total (tiles holding a target are always kept), so the dropped part of row
    i's d_logits has L1 norm <= |g_i| δ and its dX error is <= |g_i| δ max_v ||W_v|| (fastdpo.sparse_plan).
    0 (the default) is exact. The log-probs do not depend on it.
    workspace_bytes bounds the Triton backward's d_logits workspace ([scored tokens, chunk] in the
    input dtype; at least one 128-column tile): None takes 1/64 of the device's memory, at most 1 GiB.
    Smaller workspaces mean more, narrower vocabulary chunks: the same result up to the rounding of
    dX's chunk sums (for given inputs and workspace, the bits are reproducible).
    fused=True (the default) takes the frozen-head route where it applies (hidden requires grad, weight
    and bias do not, backend 'torch', grad_tolerance 0; see fastdpo.fused_pass): the forward also forms
    dlogp/dh, so the backward is one scaling, 2 GEMM passes in all instead of 3. The log-probs are the
    same bits on either route.
    """
    from . import distributed  # heads split across processes: VocabShard, DTensor and ZeRO-3 heads (issue 10)
    if distributed.is_distributed_head(hidden, weight):  # before the type checks: a VocabShard is no tensor
        return distributed.linear_logprobs(hidden, weight, targets, bias, ignore_index, temperature=temperature,
                                           softcap=softcap, logit_scale=logit_scale, with_stats=with_stats,
                                           backend=backend, grad_tolerance=grad_tolerance)
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        require_tensor(name, value)
    require_tensor("bias", bias, optional=True)
    targets = widen_labels(targets)
    device = hidden.device
    backend = resolve_backend(backend, device)
    if torch.is_autocast_enabled(device.type) and hidden.is_floating_point():
        # Under autocast the head runs in the autocast dtype, as nn.Linear would.
        dtype = torch.get_autocast_dtype(device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    check_logprob_metadata(hidden, weight, targets, bias, ignore_index, backend, temperature=temperature,
                           softcap=softcap, logit_scale=logit_scale, grad_tolerance=grad_tolerance)
    targets = checked_targets(targets, weight.shape[0], ignore_index)
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes <= 0):
        raise ValueError(f"workspace_bytes must be None or a positive int (bytes), got {workspace_bytes!r}")
    transform = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    if fused_pass.frozen_route(hidden, weight, bias, fused=fused, backend=backend, grad_tolerance=grad_tolerance):
        with torch.autocast(device.type, enabled=False):
            return fused_pass.frozen_linear_logprobs(hidden, weight, targets, bias, ignore_index, transform,
                                                     with_stats)
    if backend == "reference":
        stats = reference.token_stats(hidden, weight, targets, bias, ignore_index, **transform)
        return stats if with_stats else stats.logps
    with torch.autocast(device.type, enabled=False):
        out = torch.ops.fastdpo.logprobs_forward(hidden, weight, bias, targets, ignore_index, float(logit_scale),
                                                 None if softcap is None else float(softcap), float(temperature),
                                                 with_stats, backend, workspace_bytes, float(grad_tolerance))
    return TokenStats(*out[:ops.STAT_FIELDS]) if with_stats else out[0]
