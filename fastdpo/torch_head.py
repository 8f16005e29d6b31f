"""The PyTorch backend's head: the forward and the backward over the scored rows, on fastdpo.chunked's tiles.

Same shape as fastdpo.triton_head (fastdpo.ops dispatches to either with the same arguments):

    forward(hidden_2d, weight, bias, rows, targets, transform, *, with_stats, grad_tolerance, backward_plan)
        -> the softmax partials of the scored rows, merged over the vocabulary (fastdpo.softmax_stats)
    backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform, *, need_dx, need_dw, need_db,
             grad_tolerance, backward_plan, workspace_bytes)
        -> (dX [N, H], dW [V, H], db [V]) in the accumulation dtype, None where not needed
    backward_plan_like(hidden, weight, n_tokens, fake) -> the empty plan the forward fills

`rows` index the scored positions of hidden_2d [N, H] and `targets` are theirs; `lse` and `grad` are per
scored row. The backward plan is what the forward hands the backward when grad_tolerance > 0: here the
token blocks' kept vocabulary slices, bool [token blocks, slices] in the largest shape any count of scored
rows can give (a compiled graph needs a shape that follows from the inputs' shapes), all kept until the
forward plans (a forward that cannot plan, rows sent to the online fallback, leaves a dense backward).
workspace_bytes bounds the Triton backward's workspace and means nothing here.
"""

from __future__ import annotations

import torch

from . import chunked
from .softmax_stats import VocabPartials
from .transform import LogitTransform


def backward_plan_like(hidden: torch.Tensor, weight: torch.Tensor, n_tokens: int, fake: bool = False) -> torch.Tensor:
    shape = (-(-n_tokens // chunked.TOKEN_BLOCK), -(-weight.shape[0] // chunked.VOCAB_ALIGN))
    return (torch.empty if fake else torch.ones)(shape, dtype=torch.bool, device=hidden.device)


def forward(hidden_2d, weight, bias, rows, targets, transform: LogitTransform, *, with_stats: bool,
            grad_tolerance: float, backward_plan: torch.Tensor) -> VocabPartials:
    x = chunked.Rows(hidden_2d, rows, targets)
    buffers = chunked.BlockBuffers(x, weight.shape[0])
    merged = chunked.forward_partials(x, weight, bias, chunked.Transform(transform), with_stats, buffers,
                                      tolerance=grad_tolerance)
    if buffers.kept is not None and backward_plan.numel():  # the plan, made block by block
        plan = torch.tensor(buffers.kept, dtype=torch.bool, device=backward_plan.device)
        backward_plan[: plan.shape[0], : plan.shape[1]] = plan
    return merged


def backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform: LogitTransform, *, need_dx: bool,
             need_dw: bool, need_db: bool, grad_tolerance: float, backward_plan: torch.Tensor,
             workspace_bytes: int | None):
    dx, dw, db = zero_gradients(hidden_2d, weight, lse.dtype, need_dx, need_dw, need_db)
    x = chunked.Rows(hidden_2d, rows, targets)
    buffers = chunked.BlockBuffers(x, weight.shape[0])
    chunked.backward(x, weight, bias, lse, grad, chunked.Transform(transform), dx=dx, dw=dw, db=db, buffers=buffers,
                     kept=chunked.kept_slices(backward_plan, len(x), buffers.n_slices))
    return dx, dw, db


def zero_gradients(hidden_2d, weight, dtype: torch.dtype, need_dx: bool, need_dw: bool, need_db: bool):
    """(dX [N, H], dW [V, H], db [V]) zeros in `dtype`, None where not needed: the accumulators of the backward.

    fp32 (fp64 for fp64 inputs), cast to the input dtypes at the end: for fp32 inputs the cast is free and
    the accumulators are the gradients themselves."""
    def zeros(shape, wanted):
        return torch.zeros(shape, dtype=dtype, device=weight.device) if wanted else None

    return zeros(hidden_2d.shape, need_dx), zeros(weight.shape, need_dw), zeros(weight.shape[:1], need_db)
