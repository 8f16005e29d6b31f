"""`linear_logprobs`: per-token log softmax(h W^T + b)[target] without materializing the logits.

The autograd function compacts the positions whose target is not `ignore_index` (prompt and padding
tokens cost nothing), runs the forward of the chosen backend, keeps only lse per token for the
backward, and recomputes the logits there. Backends: fastdpo.kernels (Triton) or fastdpo.chunked
(PyTorch tiles); `reference` runs the naive oracle through plain autograd.
"""

from __future__ import annotations

import torch

from . import chunked, reference
from .backends import resolve_backend
from .softmax_stats import VocabPartials, logsumexp, merge, token_stats
from .types import TokenStats
from .validation import check_logprob_inputs, require_tensor, widen_labels


DOUBLE_BACKWARD_MESSAGE = (
    "fastdpo.linear_logprobs does not support double backward (torch.autograd.grad or backward with "
    "create_graph=True, e.g. for a gradient penalty): its gradients come from fused kernels and carry no graph. "
    "Use backend='reference' for higher-order gradients."
)


class LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, with_stats,
                backend, grad_filter_eps, workspace_bytes, grad_tolerance):
        hidden_2d = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != ignore_index).nonzero().squeeze(1)
        row_targets = flat_targets[rows]
        transform = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
        if rows.numel() == 0:  # every position ignored: nothing to launch
            merged = _no_partials(hidden, with_stats)
        elif backend == "triton":
            from .kernels import logprob_forward

            hidden_2d, weight = _row_major(hidden_2d), _row_major(weight)
            table, target_logit = logprob_forward(hidden_2d, weight, bias, rows, row_targets, with_stats=with_stats,
                                                  **transform)
            merged = merge(VocabPartials(table[0], table[1], target_logit[None], *table[2:]))
            # Each (vocabulary tile, row)'s logsumexp, [tiles, n] fp32, kept for the backward: with the
            # row's lse it gives the tile's exact probability mass, which a sparse backward can budget.
            ctx.tile_lse = table[0] + torch.log(table[1])
        else:
            x = chunked.Rows(hidden_2d, rows, row_targets)
            ctx.buffers = chunked.BlockBuffers(x, weight.shape[0])  # reused by the backward
            merged = chunked.forward_partials(x, weight, bias, chunked.Transform(**transform), with_stats,
                                              ctx.buffers, tolerance=grad_tolerance)
        lse = logsumexp(merged)
        stats = token_stats(merged, lse, weight.shape[0])

        ctx.save_for_backward(hidden_2d, weight, bias, rows, row_targets, lse)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.backend, ctx.transform, ctx.grad_filter_eps = backend, transform, grad_filter_eps
        ctx.workspace_bytes, ctx.grad_tolerance = workspace_bytes, grad_tolerance
        stats = stats if with_stats else stats[:1]
        outputs = [_scatter(stat, rows, flat_targets.numel()).view(targets.shape) for stat in stats]
        if not with_stats:
            return outputs[0]
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_logps, *_unused_stat_grads):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would carry no graph
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        hidden_2d, weight, bias, rows, row_targets, lse = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grad_rows = grad_logps.reshape(-1).index_select(0, rows).to(lse.dtype).contiguous()
        if ctx.backend == "triton" and rows.numel() > 0:
            return _triton_backward(ctx, hidden_2d, weight, bias, rows, row_targets, lse, grad_rows)
        # fp32 (fp64 for fp64 inputs) accumulators, cast to the input dtypes at the end: for fp32
        # inputs the cast is free and the accumulators are the gradients themselves.
        acc_dtype = lse.dtype

        def zeros(shape, wanted):
            return torch.zeros(shape, dtype=acc_dtype, device=weight.device) if wanted else None

        dx, dw, db = zeros(hidden_2d.shape, need_dx), zeros(weight.shape, need_dw), zeros(weight.shape[:1], need_db)
        if rows.numel() == 0:  # nothing was scored: the gradients are zero
            pass
        else:
            chunked.backward(chunked.Rows(hidden_2d, rows, row_targets), weight, bias, lse, grad_rows,
                             chunked.Transform(**ctx.transform), dx=dx, dw=dw, db=db,
                             filter_eps=ctx.grad_filter_eps, buffers=ctx.buffers, tolerance=ctx.grad_tolerance)
        return (
            None if dx is None else dx.to(ctx.hidden_dtype).view(ctx.hidden_shape),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            *([None] * 10),
        )


def _triton_backward(ctx, hidden_2d, weight, bias, rows, row_targets, lse, grad_rows):
    """The vocabulary-chunked backward (fastdpo.vocab_chunks): dW comes back in the weight's dtype,
    dX for the scored rows in fp32, scattered here into the hidden states' shape and dtype."""
    from .vocab_chunks import backward

    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx_rows, dw, db = backward(hidden_2d, weight, bias, rows, row_targets, lse, grad_rows, ctx.transform,
                               need_dx=need_dx, need_dw=need_dw, need_db=need_db,
                               workspace_bytes=ctx.workspace_bytes, filter_eps=ctx.grad_filter_eps,
                               tolerance=ctx.grad_tolerance, tile_lse=ctx.tile_lse)
    dx = None
    if dx_rows is not None:
        dx = torch.zeros(hidden_2d.shape, dtype=ctx.hidden_dtype, device=hidden_2d.device)
        dx = dx.index_copy_(0, rows, dx_rows.to(ctx.hidden_dtype)).view(ctx.hidden_shape)
    return dx, dw, None if db is None else db.to(bias.dtype), *([None] * 10)


def _no_partials(hidden: torch.Tensor, with_stats: bool) -> VocabPartials:
    dtype = chunked.accumulation_dtype(hidden.dtype)
    fields = len(VocabPartials._fields) if with_stats else 3
    return VocabPartials(*(torch.zeros(0, dtype=dtype, device=hidden.device) for _ in range(fields)))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    # The kernels assume a unit stride along the hidden dimension; rows may be strided.
    return t if t.stride(-1) == 1 else t.contiguous()


def _scatter(values: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


def linear_logprobs(hidden, weight, targets, bias=None, ignore_index: int = -100, *, temperature: float = 1.0,
                    softcap: float | None = None, logit_scale: float = 1.0, with_stats: bool = False,
                    backend: str | None = None, grad_filter_eps: float = 0.0, workspace_bytes: int | None = None,
                    grad_tolerance: float = 0.0):
    """Per-token log-probabilities of `targets` under logits = transform(hidden @ weight.T + bias).

    hidden [..., H], weight [V, H], targets [...] (not shifted; `ignore_index` positions get 0).
    transform(x) = softcap * tanh(x * logit_scale / softcap) / temperature (TRL's order).
    Returns float32 log-probs shaped like `targets` (float64 for float64 inputs on the torch and
    reference backends), differentiable w.r.t. hidden, weight and bias; with `with_stats`, a
    TokenStats whose other fields (entropy, log sum p^2, mean logit, is_top1) carry no gradient.
    grad_filter_eps > 0 lets the backward skip (token block, vocab tile) pairs whose |onehot - softmax|
    stays below it everywhere (Cut Cross-Entropy's gradient filter; the torch path skips only tiles
    without a target); each skipped d_logit is below grad_filter_eps * |g|. 0 is exact.
    workspace_bytes bounds the Triton backward's d_logits workspace ([scored tokens, chunk] in the
    input dtype; at least one 128-column tile): None takes 1/64 of the device's memory, at most 1 GiB.
    Smaller workspaces mean more, narrower vocabulary chunks: the same result up to the rounding of
    dX's chunk sums (for given inputs and workspace, the bits are reproducible).
    """
    from . import distributed  # heads split across processes: VocabShard, DTensor and ZeRO-3 heads (issue 10)
    if distributed.is_distributed_head(hidden, weight):
        return distributed.linear_logprobs(hidden, weight, targets, bias, ignore_index, temperature=temperature,
                                           softcap=softcap, logit_scale=logit_scale, with_stats=with_stats,
                                           backend=backend, grad_filter_eps=grad_filter_eps)
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
    check_logprob_inputs(hidden, weight, targets, bias, ignore_index, backend, temperature=temperature,
                         softcap=softcap, logit_scale=logit_scale, grad_filter_eps=grad_filter_eps)
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes <= 0):
        raise ValueError(f"workspace_bytes must be None or a positive int (bytes), got {workspace_bytes!r}")
    transform = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    if backend == "reference":
        stats = reference.token_stats(hidden, weight, targets, bias, ignore_index, **transform)
        return stats if with_stats else stats.logps
    with torch.autocast(device.type, enabled=False):
        out = LinearLogProbs.apply(hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature,
                                   with_stats, backend, float(grad_filter_eps), workspace_bytes,
                                   float(grad_tolerance))
    return TokenStats(*out) if with_stats else out
