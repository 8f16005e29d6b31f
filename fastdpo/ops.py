"""The fused head as torch.library custom ops, so `torch.compile(fullgraph=True)` traces through it.

    fastdpo::checked_targets(targets, vocab_size, ignore_index, name) -> a copy of targets
    fastdpo::logprobs_forward(hidden, weight, bias, targets, ...)  -> (logps, entropy, log_sum_sq_probs,
                                                                       mean_logits, is_top1, lse, backward_plan)
    fastdpo::logprobs_backward(grad_logps, hidden, weight, bias, targets, lse, backward_plan, ...) -> (dX, dW, db)

The ops compact the scored positions (the `nonzero` of the targets that are not ignore_index), hand them to
the backend's head (fastdpo.torch_head or fastdpo.triton_head: a forward and a backward of one signature)
and scatter the per-token outputs back into the targets' shape. Another route (a pass that computes the
loss gradient inside the forward, say) adds its functions to both head modules in the same style, and a
branch here. The logit transform crosses the op boundary as three floats (`fused_logprobs` unpacks it)
and is packed again inside.

Everything that waits on the device's values lives inside the ops' implementations, where the
compiler never looks: the label range check, the compaction, the CPU path's overflow fallback and the
sparse backward's plan. What leaks into a graph is shapes that follow from the inputs' metadata alone
(fake implementations): every per-token output, the lse included, has the targets' shape (0 at
ignored positions), and the backward plan (what the sparse backward needs from the forward when
grad_tolerance > 0, else empty) has a shape fixed by the inputs' shapes too: see the heads'
`backward_plan_like`. Statistics that were not asked for, and gradients that are not needed, come
back as empty tensors (ops return no None).

Why the ops serve eager calls too, rather than only compiled ones: one implementation, so the
compiled graph and eager mode run the very same code and give the same bits. `LinearLogProbs` wraps
the same two ops in an autograd.Function for the ZeRO-3 head (fastdpo.distributed), whose backward
must gather the parameters around them; both autograd wrappers share `save_for_backward` and
`backward` below.

The range check is its own op returning a checked copy of the labels (a few bytes per token) because
an op without outputs would be dropped from compiled graphs as dead code; the copy is what the
callers go on with, so the check always runs first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_head
from .chunked import accumulation_dtype
from .softmax_stats import VocabPartials, logsumexp, token_stats
from .transform import LogitTransform
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


# --- the op boundary ---------------------------------------------------------------------------------------------


def fused_logprobs(hidden, weight, bias, targets, ignore_index: int, transform: LogitTransform, *, with_stats: bool,
                   backend: str, workspace_bytes: int | None, grad_tolerance: float, function=None):
    """The fused log-probs of a local head whose inputs are checked: TokenStats with `with_stats`, else logps.

    Calls fastdpo::logprobs_forward, or `function` (an autograd.Function over it, like LinearLogProbs) with the
    same arguments. Custom ops take primitives only (op_transform)."""
    run = torch.ops.fastdpo.logprobs_forward if function is None else function.apply
    with torch.autocast(hidden.device.type, enabled=False):
        out = run(hidden, weight, bias, targets, ignore_index, *op_transform(transform), with_stats, backend,
                  workspace_bytes, float(grad_tolerance))
    return TokenStats(*out[:STAT_FIELDS]) if with_stats else out[0]


def exact_backward(grad_logps, hidden, weight, bias, targets, lse, ignore_index: int, transform: LogitTransform, *,
                   backend: str, need: tuple[bool, bool, bool]) -> tuple:
    """fastdpo::logprobs_backward for a checked local head and its forward's lse, without a backward plan
    (grad_tolerance 0): (dX, dW, db), None where `need` says not needed."""
    plan = torch.zeros(0, dtype=torch.float32, device=hidden.device)
    grads = torch.ops.fastdpo.logprobs_backward(grad_logps, hidden, weight, bias, targets, lse, plan, ignore_index,
                                                *op_transform(transform), backend, None, 0.0, *need)
    return tuple(grad if wanted else None for grad, wanted in zip(grads, need))


def op_transform(transform: LogitTransform) -> tuple[float, float | None, float]:
    """(logit_scale, softcap, temperature) as the custom ops take them: the one place the transform is taken
    apart (`_transform` packs it again inside the ops)."""
    softcap = None if transform.softcap is None else float(transform.softcap)
    return float(transform.logit_scale), softcap, float(transform.temperature)


def _transform(logit_scale: float, softcap: float | None, temperature: float) -> LogitTransform:
    return LogitTransform(temperature=temperature, softcap=softcap, logit_scale=logit_scale)


# --- dispatch, compaction and scatter ----------------------------------------------------------------------------


def head_for(backend: str):
    """The backend's head module (forward, backward, backward_plan_like); 'triton' imports the kernels."""
    if backend == "triton":
        from . import triton_head

        return triton_head
    return torch_head


def backward_plan_like(backend: str, hidden, weight, n_tokens: int, grad_tolerance: float,
                       fake: bool = False) -> torch.Tensor:
    """The backward plan the forward fills when grad_tolerance > 0; empty otherwise (an exact backward)."""
    if grad_tolerance <= 0:
        return (torch.empty if fake else torch.zeros)((0,), dtype=torch.float32, device=hidden.device)
    return head_for(backend).backward_plan_like(hidden, weight, n_tokens, fake=fake)


def scored_rows(flat_targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Indices of the positions whose target is not ignored (a host sync: its length is data)."""
    return (flat_targets != ignore_index).nonzero().squeeze(1)


def no_partials(hidden: torch.Tensor, with_stats: bool) -> VocabPartials:
    """The merged partials of no scored row at all."""
    dtype = accumulation_dtype(hidden.dtype)
    fields = len(VocabPartials._fields) if with_stats else 3
    return VocabPartials(*(torch.zeros(0, dtype=dtype, device=hidden.device) for _ in range(fields)))


def token_outputs(merged: VocabPartials, rows: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                  with_stats: bool) -> list[torch.Tensor]:
    """The five TokenStats fields (the last four empty without `with_stats`) and lse, from the scored rows'
    merged partials, scattered into the targets' shape (0 at ignored positions)."""
    lse = logsumexp(merged)
    stats = token_stats(merged, lse, vocab_size)
    outputs = [scatter(stat, rows, targets.numel()).view(targets.shape)
               for stat in stats[:STAT_FIELDS if with_stats else 1]]
    outputs += [stat.new_empty(0) for stat in stats[len(outputs):]]
    return outputs + [scatter(lse, rows, targets.numel()).view(targets.shape)]


def scatter(values: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


# --- forward ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdpo::logprobs_forward", mutates_args=())
def logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     ignore_index: int, logit_scale: float, softcap: float | None, temperature: float,
                     with_stats: bool, backend: str, workspace_bytes: int | None,
                     grad_tolerance: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token outputs shaped like `targets`: the five TokenStats fields (the last four empty without
    `with_stats`), lse, and the backward plan (see the module docstring).
    workspace_bytes is the backward's: an input here so that autograd can save it."""
    hidden_2d, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = scored_rows(flat_targets, ignore_index)
    plan = backward_plan_like(backend, hidden, weight, flat_targets.numel(), grad_tolerance)
    if rows.numel() == 0:  # every position ignored: nothing to launch
        merged = no_partials(hidden, with_stats)
    else:
        merged = head_for(backend).forward(
            hidden_2d, weight, bias, rows, flat_targets[rows], _transform(logit_scale, softcap, temperature),
            with_stats=with_stats, grad_tolerance=grad_tolerance, backward_plan=plan)
    return (*token_outputs(merged, rows, targets, weight.shape[0], with_stats), plan)


@logprobs_forward.register_fake
def _(hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, with_stats, backend,
      workspace_bytes, grad_tolerance):
    dtype = accumulation_dtype(hidden.dtype)
    logps = targets.new_empty(targets.shape, dtype=dtype)
    stats = [logps.new_empty(targets.shape if with_stats else 0) for _ in range(STAT_FIELDS - 2)]
    is_top1 = targets.new_empty(targets.shape if with_stats else 0, dtype=torch.bool)
    plan = backward_plan_like(backend, hidden, weight, targets.numel(), grad_tolerance, fake=True)
    return (logps, *stats, is_top1, logps.new_empty(targets.shape), plan)


# --- backward --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdpo::logprobs_backward", mutates_args=())
def logprobs_backward(grad_logps: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, lse: torch.Tensor, backward_plan: torch.Tensor, ignore_index: int,
                      logit_scale: float, softcap: float | None, temperature: float, backend: str,
                      workspace_bytes: int | None, grad_tolerance: float, need_dx: bool,
                      need_dw: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX shaped like hidden, dW like weight, db like bias), each empty where not needed."""
    hidden_2d, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = scored_rows(flat_targets, ignore_index)
    if rows.numel() == 0:  # nothing was scored: the gradients are zero
        dx, dw, db = torch_head.zero_gradients(hidden_2d, weight, lse.dtype, need_dx, need_dw, need_db)
    else:
        grad_rows = grad_logps.reshape(-1).index_select(0, rows).to(lse.dtype).contiguous()
        dx, dw, db = head_for(backend).backward(
            hidden_2d, weight, bias, rows, flat_targets[rows], lse.reshape(-1).index_select(0, rows), grad_rows,
            _transform(logit_scale, softcap, temperature), need_dx=need_dx, need_dw=need_dw,
            need_db=need_db, grad_tolerance=grad_tolerance, backward_plan=backward_plan,
            workspace_bytes=workspace_bytes)
    empty = hidden.new_empty(0)
    return (empty if dx is None else dx.to(hidden.dtype).view(hidden.shape),
            empty.clone() if dw is None else dw.to(weight.dtype),
            empty.clone() if db is None else db.to(bias.dtype))


@logprobs_backward.register_fake
def _(grad_logps, hidden, weight, bias, targets, lse, backward_plan, ignore_index, logit_scale, softcap, temperature,
      backend, workspace_bytes, grad_tolerance, need_dx, need_dw, need_db):
    return (torch.empty_like(hidden) if need_dx else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else hidden.new_empty(0),
            torch.empty_like(bias) if need_db else hidden.new_empty(0))


# --- autograd (shared by the registered op and LinearLogProbs) ---------------------------------------------------


def save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    """`inputs` and `output` as logprobs_forward takes and returns them; only logps carries a gradient."""
    hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, _with_stats, backend, *rest = inputs
    lse, backward_plan = output[-2:]
    ctx.save_for_backward(hidden, weight, bias, targets, lse, backward_plan)
    # In logprobs_backward's order: ignore_index ... backend, then workspace_bytes, grad_tolerance.
    ctx.options = (ignore_index, logit_scale, softcap, temperature, backend, *rest)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])


def backward(ctx, grad_logps, *_unused_grads) -> tuple:
    """One gradient per input of logprobs_forward: dX, dW, db (None where autograd wants none), None after."""
    if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would carry no graph
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    hidden, weight, bias, targets, lse, backward_plan = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if bias is None:
        need = (need[0], need[1], False)
    grads = torch.ops.fastdpo.logprobs_backward(grad_logps, hidden, weight, bias, targets, lse, backward_plan,
                                                *ctx.options, *need)
    return (*(grad if wanted else None for grad, wanted in zip(grads, need)), *(None,) * (ctx.n_inputs - len(need)))


logprobs_forward.register_autograd(backward, setup_context=save_for_backward)


class LinearLogProbs(torch.autograd.Function):
    """fastdpo::logprobs_forward as an autograd.Function, for heads whose backward needs more around the ops
    (fastdpo.distributed.Zero3LogProbs gathers a ZeRO-3 head again): same arguments and outputs as the op."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = torch.ops.fastdpo.logprobs_forward(*inputs)
        save_for_backward(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, grad_logps, *_unused_grads):
        return backward(ctx, grad_logps)
