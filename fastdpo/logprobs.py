"""`linear_logprobs`: per-token log softmax(h W^T + b)[target] without materializing the logits.

The fused forward compacts the positions whose target is not `ignore_index` (prompt and padding
tokens cost nothing), runs the forward of the chosen backend, keeps only lse per token for the
backward, and recomputes the logits there. Backends: fastdpo.triton_head (the Triton kernels) or
fastdpo.torch_head (PyTorch tiles); `reference` runs the naive oracle through plain autograd.

Forward and backward are torch.library custom ops (fastdpo.ops) with fake implementations and a
registered autograd formula, called eagerly and under torch.compile alike: one implementation, the
same bits compiled or not, and no graph break (the host syncs live inside the ops). Only the checks
that read metadata run here, where the compiler traces them.

A head split across processes (fastdpo.heads) comes back from fastdpo.distributed as local tensors
(a replicated DTensor head), is computed there (a vocab-parallel shard), or is gathered around the
local computation (a ZeRO-3 partitioned parameter).
"""

from __future__ import annotations

import contextlib

from . import distributed, fused_pass, ops, reference
from .heads import DTENSOR, LOCAL, ZERO3, VocabShard, autocast_head, head_kind
from .ops import DOUBLE_BACKWARD_MESSAGE  # noqa: F401  (tests and users import it from here)
from .transform import LogitTransform
from .validation import check_fused, checked_local_head


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
    and bias do not, backend 'torch' or 'triton', grad_tolerance 0; see fastdpo.fused_pass): the forward also forms
    dlogp/dh, so the backward is one scaling, 2 GEMM passes in all instead of 3. The log-probs are the
    same bits on either route.
    """
    check_fused(fused)
    transform = LogitTransform(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    return transformed_logprobs(hidden, weight, targets, bias, ignore_index, transform, with_stats=with_stats,
                                backend=backend, grad_tolerance=grad_tolerance, workspace_bytes=workspace_bytes,
                                fused=fused)


def transformed_logprobs(hidden, weight, targets, bias, ignore_index: int, transform: LogitTransform, *,
                         with_stats: bool = False, backend: str | None = None, grad_tolerance: float = 0.0,
                         workspace_bytes: int | None = None, fused: bool = True, inputs_checked: bool = False):
    """linear_logprobs with the logit transform as one value (what FastDPOLoss holds).

    inputs_checked: the caller (FastDPOLoss, fastdpo.validation.check_dpo_inputs) has already checked a local
    head under its own argument names, range-checked the targets and resolved the backend: only the autocast
    cast remains (one label check, one host sync, per head and step)."""
    kind = head_kind(hidden, weight)
    if kind == DTENSOR:  # before the type checks: the local tensors, or a VocabShard
        hidden, weight, targets, bias = distributed.local_head(hidden, weight, targets, bias)
    if isinstance(weight, VocabShard):
        return distributed.vocab_parallel_logprobs(hidden, weight, targets, bias, ignore_index, transform,
                                                   with_stats=with_stats, backend=backend,
                                                   grad_tolerance=grad_tolerance, workspace_bytes=workspace_bytes)
    function = distributed.Zero3LogProbs if kind == ZERO3 else None  # gathers the head again for the backward
    with distributed.gathered(weight, bias) if kind == ZERO3 else contextlib.nullcontext():  # for the forward
        if inputs_checked and kind == LOCAL:
            hidden, weight, bias = autocast_head(hidden, weight, bias)
        else:
            hidden, weight, targets, bias, backend = checked_local_head(
                hidden, weight, targets, bias, ignore_index, backend, transform, grad_tolerance, workspace_bytes)
        # A frozen ZeRO-3 head too: the frozen route's backward needs no head, so it is not gathered again.
        if fused_pass.frozen_route(hidden, weight, bias, fused=fused, backend=backend, grad_tolerance=grad_tolerance):
            return fused_pass.frozen_linear_logprobs(hidden, weight, targets, bias, ignore_index, transform,
                                                     with_stats, backend)
        if backend != "reference":
            return ops.fused_logprobs(hidden, weight, bias, targets, ignore_index, transform, with_stats=with_stats,
                                      backend=backend, workspace_bytes=workspace_bytes, grad_tolerance=grad_tolerance,
                                      function=function)
    if function is not None:
        raise ValueError("backend='reference' cannot keep a ZeRO-3 partitioned head for its backward; use 'torch' or "
                         "'triton'")
    stats = reference.token_stats(hidden, weight, targets, bias, ignore_index, temperature=transform.temperature,
                                  softcap=transform.softcap, logit_scale=transform.logit_scale)
    return stats if with_stats else stats.logps
