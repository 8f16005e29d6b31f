"""The fused head as torch.library custom ops, so `torch.compile(fullgraph=True)` traces through it.

    fastdpo::checked_targets(targets, vocab_size, ignore_index, name) -> a copy of targets
    fastdpo::logprobs_forward(hidden, weight, bias, targets, ...)  -> (logps, entropy, log_sum_sq_probs,
                                                                       mean_logits, is_top1, lse, tile_lse)
    fastdpo::logprobs_backward(grad_logps, hidden, weight, bias, targets, lse, tile_lse, ...) -> (dX, dW, db)

Everything that waits on the device's values lives inside the ops' implementations, where the
compiler never looks: the label range check, the `nonzero` compaction of the scored positions, the
CPU path's overflow fallback and the sparse backward's plan. What leaks into a graph is shapes that
follow from the inputs' metadata alone (fake implementations): every per-token output, the lse
included, has the targets' shape (0 at ignored positions), and what the sparse backward needs from
the forward when grad_tolerance > 0 (else empty) has a shape fixed by the inputs' shapes too: on
Triton the per-tile lse [vocabulary tiles, tokens], on the CPU path its plan of kept slices, bool
[token blocks, slices] at the largest size any count of scored tokens can give. The backward recomputes the scored rows from the targets. Statistics that were not
asked for, and gradients that are not needed, come back as empty tensors (ops return no None).

Why the ops serve eager calls too, rather than only compiled ones: one implementation, so the
compiled graph and eager mode run the very same code and give the same bits. `LinearLogProbs`
(fastdpo.logprobs) wraps the same two ops in an autograd.Function for the ZeRO-3 head, whose
backward must gather the parameters around them; both autograd wrappers share `save_for_backward`
and `backward` below.

The range check is its own op returning a checked copy of the labels (a few bytes per token) because
an op without outputs would be dropped from compiled graphs as dead code; the copy is what the
callers go on with, so the check always runs first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import chunked
from .softmax_stats import VocabPartials, logsumexp, merge, token_stats
from .types import TokenStats

DOUBLE_BACKWARD_MESSAGE = (
    "fastdpo.linear_logprobs does not support double backward (torch.autograd.grad or backward with "
    "create_graph=True, e.g. for a gradient penalty): its gradients come from fused kernels and carry no graph. "
    "Use backend='reference' for higher-order gradients."
)
STAT_FIELDS = len(TokenStats._fields)


# --- label range -----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdpo::checked_targets", mutates_args=())
def checked_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str) -> torch.Tensor:
    """`targets` (copied) once every one of them is in [0, vocab_size) or ignore_index; else a ValueError."""
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):
        bad = targets[out_of_range][:5].tolist()
        raise ValueError(f"{name} must be in [0, {vocab_size}) or ignore_index={ignore_index}; found {bad}")
    return targets.clone()


@checked_targets.register_fake
def _(targets, vocab_size, ignore_index, name):
    return torch.empty_like(targets)


# --- forward ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdpo::logprobs_forward", mutates_args=())
def logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     ignore_index: int, logit_scale: float, softcap: float | None, temperature: float,
                     with_stats: bool, backend: str, workspace_bytes: int | None,
                     grad_tolerance: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token outputs shaped like `targets`: the five TokenStats fields (the last four empty without
    `with_stats`), lse, and the per-tile lse [tiles, tokens] (Triton with grad_tolerance > 0; else empty).
    workspace_bytes is the backward's: an input here so that autograd can save it."""
    keep_tile_lse = keeps_tile_lse(backend, grad_tolerance)
    hidden_2d, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = scored_rows(flat_targets, ignore_index)
    row_targets = flat_targets[rows]
    n_tokens, vocab_size = flat_targets.numel(), weight.shape[0]
    transform = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    tile_lse = _tile_lse_like(hidden, weight, n_tokens, keep_tile_lse, backend)
    if rows.numel() == 0:  # every position ignored: nothing to launch
        merged = no_partials(hidden, with_stats)
    elif backend == "triton":
        from .kernels.logprob_forward import logprob_forward

        table, target_logit = logprob_forward(row_major(hidden_2d), row_major(weight), bias, rows, row_targets,
                                              with_stats=with_stats, **transform)
        merged = merge(VocabPartials(table[0], table[1], target_logit[None], *table[2:]))
        if keep_tile_lse:
            # Each (vocabulary tile, row)'s logsumexp: with the row's lse it gives the tile's exact
            # probability mass, which the sparse backward budgets.
            tile_lse.index_copy_(1, rows, table[0] + torch.log(table[1]))
    else:
        x = chunked.Rows(hidden_2d, rows, row_targets)
        buffers = chunked.BlockBuffers(x, vocab_size)
        merged = chunked.forward_partials(x, weight, bias, chunked.Transform(**transform), with_stats, buffers,
                                          tolerance=grad_tolerance)
        if buffers.kept is not None and tile_lse.numel():  # the CPU path's plan, made block by block
            plan = torch.tensor(buffers.kept, dtype=torch.bool, device=tile_lse.device)
            tile_lse[: plan.shape[0], : plan.shape[1]] = plan
    return (*per_token_outputs(merged, rows, targets.shape, vocab_size, with_stats), tile_lse)


def per_token_outputs(merged: VocabPartials, rows: Tensor, shape, vocab_size: int, with_stats: bool) -> list[Tensor]:
    """The five TokenStats fields (the last four empty without `with_stats`) and lse, each shaped `shape`,
    from the scored rows' merged partials: every route computes its log-probs here."""
    n_tokens = math.prod(shape)
    lse = logsumexp(merged)
    stats = token_stats(merged, lse, vocab_size)
    outputs = [scatter(stat, rows, n_tokens).view(shape) for stat in stats[:STAT_FIELDS if with_stats else 1]]
    outputs += [stat.new_empty(0) for stat in stats[len(outputs):]]
    return [*outputs, scatter(lse, rows, n_tokens).view(shape)]


@logprobs_forward.register_fake
def _(hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, with_stats, backend,
      workspace_bytes, grad_tolerance):
    dtype = chunked.accumulation_dtype(hidden.dtype)
    logps = targets.new_empty(targets.shape, dtype=dtype)
    stats = [logps.new_empty(targets.shape if with_stats else 0) for _ in range(STAT_FIELDS - 2)]
    is_top1 = targets.new_empty(targets.shape if with_stats else 0, dtype=torch.bool)
    tile_lse = _tile_lse_like(hidden, weight, targets.numel(), keeps_tile_lse(backend, grad_tolerance), backend,
                              fake=True)
    return (logps, *stats, is_top1, logps.new_empty(targets.shape), tile_lse)


def keeps_tile_lse(backend: str, grad_tolerance: float) -> bool:
    return grad_tolerance > 0


def _tile_lse_like(hidden, weight, n_tokens: int, keep: bool, backend: str, fake: bool = False) -> torch.Tensor:
    """What the sparse backward needs from the forward, when kept (else empty):
    - Triton: the per-tile lse table, [vocabulary tiles of the Triton forward, tokens] fp32 (0 for ignored
      positions);
    - the CPU path: its plan, bool [token blocks, slices] in the largest shape any scored-token count can
      give (blocks of chunked.TOKEN_BLOCK rows, slices no narrower than chunked.VOCAB_ALIGN columns).
    Both shapes follow from the inputs' shapes alone, as a compiled graph needs."""
    make = torch.empty if fake else torch.zeros
    if not keep:
        return make((0,), dtype=torch.float32, device=hidden.device)
    if backend == "triton":
        return make((_forward_tiles(weight), n_tokens), dtype=torch.float32, device=hidden.device)
    shape = (-(-n_tokens // chunked.TOKEN_BLOCK), -(-weight.shape[0] // chunked.VOCAB_ALIGN))
    # All kept until the forward plans: a forward that cannot plan (rows sent to the online fallback)
    # leaves a dense backward.
    return (torch.empty if fake else torch.ones)(shape, dtype=torch.bool, device=hidden.device)


def _forward_tiles(weight: torch.Tensor) -> int:
    from .kernels.config import device_capability, gemm_config

    block_v = gemm_config(weight.dtype, device_capability(weight.device), weight.shape[1])["BLOCK_V"]
    return -(-weight.shape[0] // block_v)


def scored_rows(flat_targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Indices of the positions whose target is not ignored (a host sync: its length is data)."""
    return (flat_targets != ignore_index).nonzero().squeeze(1)


def no_partials(hidden: torch.Tensor, with_stats: bool) -> VocabPartials:
    dtype = chunked.accumulation_dtype(hidden.dtype)
    fields = len(VocabPartials._fields) if with_stats else 3
    return VocabPartials(*(torch.zeros(0, dtype=dtype, device=hidden.device) for _ in range(fields)))


def row_major(t: torch.Tensor) -> torch.Tensor:
    # The kernels assume a unit stride along the hidden dimension; rows may be strided.
    return t if t.stride(-1) == 1 else t.contiguous()


def scatter(values: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


# --- backward --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdpo::logprobs_backward", mutates_args=())
def logprobs_backward(grad_logps: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, lse: torch.Tensor, tile_lse: torch.Tensor, ignore_index: int,
                      logit_scale: float, softcap: float | None, temperature: float, backend: str,
                      workspace_bytes: int | None, grad_tolerance: float, need_dx: bool,
                      need_dw: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX shaped like hidden, dW like weight, db like bias), each empty where not needed."""
    hidden_2d, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = scored_rows(flat_targets, ignore_index)
    row_targets, row_lse = flat_targets[rows], lse.reshape(-1).index_select(0, rows)
    grad_rows = grad_logps.reshape(-1).index_select(0, rows).to(lse.dtype).contiguous()
    transform = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    if backend == "triton" and rows.numel() > 0:
        from .vocab_chunks import backward

        hidden_2d, weight = row_major(hidden_2d), row_major(weight)
        dx_rows, dw, db = backward(hidden_2d, weight, bias, rows, row_targets, row_lse, grad_rows, transform,
                                   need_dx=need_dx, need_dw=need_dw, need_db=need_db,
                                   workspace_bytes=workspace_bytes, tolerance=grad_tolerance,
                                   tile_lse=tile_lse.index_select(1, rows) if tile_lse.numel() else None)
        dx = None
        if dx_rows is not None:
            dx = torch.zeros(hidden_2d.shape, dtype=hidden.dtype, device=hidden.device)
            dx = dx.index_copy_(0, rows, dx_rows.to(hidden.dtype))
    else:
        # fp32 (fp64 for fp64 inputs) accumulators, cast to the input dtypes at the end: for fp32
        # inputs the cast is free and the accumulators are the gradients themselves.
        def zeros(shape, wanted):
            return torch.zeros(shape, dtype=lse.dtype, device=weight.device) if wanted else None

        dx, dw, db = zeros(hidden_2d.shape, need_dx), zeros(weight.shape, need_dw), zeros(weight.shape[:1], need_db)
        if rows.numel() > 0:  # else nothing was scored: the gradients are zero
            x = chunked.Rows(hidden_2d, rows, row_targets)
            buffers = chunked.BlockBuffers(x, weight.shape[0])
            chunked.backward(x, weight, bias, row_lse, grad_rows, chunked.Transform(**transform), dx=dx, dw=dw, db=db,
                             buffers=buffers,
                             kept=chunked.kept_slices(tile_lse, len(x), buffers.n_slices))
    empty = hidden.new_empty(0)
    return (empty if dx is None else dx.to(hidden.dtype).view(hidden.shape),
            empty.clone() if dw is None else dw.to(weight.dtype),
            empty.clone() if db is None else db.to(bias.dtype))


@logprobs_backward.register_fake
def _(grad_logps, hidden, weight, bias, targets, lse, tile_lse, ignore_index, logit_scale, softcap, temperature,
      backend, workspace_bytes, grad_tolerance, need_dx, need_dw, need_db):
    return (torch.empty_like(hidden) if need_dx else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else hidden.new_empty(0),
            torch.empty_like(bias) if need_db else hidden.new_empty(0))


# --- autograd (shared by the registered op and fastdpo.logprobs.LinearLogProbs) ----------------------------------


def save_for_backward(ctx, inputs: tuple, outputs: tuple) -> None:
    """`inputs` and `outputs` as logprobs_forward takes and returns them."""
    hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, _with_stats, backend, *rest = inputs
    lse, tile_lse = outputs[-2:]
    ctx.save_for_backward(hidden, weight, bias, targets, lse, tile_lse)
    # In logprobs_backward's order: ignore_index ... backend, then workspace_bytes, grad_tolerance.
    ctx.options = (ignore_index, logit_scale, softcap, temperature, backend, *rest)


def backward(ctx, grad_logps) -> tuple:
    """(dX, dW, db), None where autograd wants none."""
    if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would carry no graph
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    hidden, weight, bias, targets, lse, tile_lse = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if bias is None:
        need = (need[0], need[1], False)
    grads = torch.ops.fastdpo.logprobs_backward(grad_logps, hidden, weight, bias, targets, lse, tile_lse,
                                                *ctx.options, *need)
    return tuple(grad if wanted else None for grad, wanted in zip(grads, need))


def _setup_context(ctx, inputs, output):
    save_for_backward(ctx, inputs, output)
    ctx.mark_non_differentiable(*output[1:])  # only logps carries a gradient


def _backward(ctx, grad_logps, *_unused_grads):
    return (*backward(ctx, grad_logps), *([None] * 9))


logprobs_forward.register_autograd(_backward, setup_context=_setup_context)
