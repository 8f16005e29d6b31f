"""Online-softmax statistics over slices of the vocabulary: how slices merge, and what they yield.

A slice of the vocabulary leaves, per token (see kernels/logprob_forward.py for the definitions),
m, s, t and optionally a, q, u, b. Two slices merge exactly:

    m = max(m1, m2),   s = s1 e^{m1-m} + s2 e^{m2-m},   a likewise,   q = q1 e^{2(m1-m)} + q2 e^{2(m2-m)}
    t = t1 + t2 (the target lies in one slice),   u = u1 + u2,   b = max(b1, b2)

Any shift works in place of m (lse = m + log s whatever m is, as long as no exp overflows): the CPU
path's linear heads shift by the target logit and skip the max pass.

and the whole vocabulary gives lse = m + log s, logp = t - lse. The Triton launcher returns one
row per vocabulary split, the CPU path folds one tile at a time; both end here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .types import TokenStats


class VocabPartials(NamedTuple):
    max: torch.Tensor
    sum_exp: torch.Tensor
    target_logit: torch.Tensor
    z_sum_exp: torch.Tensor | None = None
    sq_sum_exp: torch.Tensor | None = None
    z_sum: torch.Tensor | None = None
    max_before_target: torch.Tensor | None = None
    # Set by paths whose `max` is a shift rather than the row's largest logit (the CPU path's shifted
    # forward): top-1 decided there from the tiles themselves. None: decided from max and max_before_target.
    is_top1: torch.Tensor | None = None

    @property
    def with_stats(self) -> bool:
        return self.z_sum_exp is not None


def merge(parts: VocabPartials) -> VocabPartials:
    """Reduce partials stacked along dim 0 (one row per vocabulary slice) to one row."""
    new_max = parts.max.max(dim=0).values
    # A +inf maximum (inf logits) makes the rescale NaN, and the loss NaN, as it should be.
    rescale = torch.exp(parts.max - new_max)
    merged = VocabPartials(new_max, (parts.sum_exp * rescale).sum(0), parts.target_logit.sum(0))
    if not parts.with_stats:
        return merged
    return merged._replace(
        z_sum_exp=(parts.z_sum_exp * rescale).sum(0),
        sq_sum_exp=(parts.sq_sum_exp * rescale * rescale).sum(0),
        z_sum=parts.z_sum.sum(0),
        max_before_target=parts.max_before_target.max(dim=0).values,
    )


def take(parts: VocabPartials, index: torch.Tensor) -> VocabPartials:
    """The partials of rows `index` (the last dim), in that order."""
    return VocabPartials(*(None if f is None else f[..., index] for f in parts))


def logsumexp(merged: VocabPartials) -> torch.Tensor:
    return merged.max + torch.log(merged.sum_exp)


def token_stats(merged: VocabPartials, lse: torch.Tensor, vocab_size: int) -> TokenStats:
    """Per-token outputs from fully merged partials (stats fields zero/False when not computed)."""
    logps = merged.target_logit - lse
    if not merged.with_stats:
        zeros = torch.zeros_like(logps)
        return TokenStats(logps, zeros, zeros, zeros, torch.zeros_like(logps, dtype=torch.bool))
    log_sum_exp = torch.log(merged.sum_exp)
    return TokenStats(
        logps=logps,
        entropy=lse - merged.z_sum_exp / merged.sum_exp,
        log_sum_sq_probs=torch.log(merged.sq_sum_exp) - 2 * log_sum_exp,
        mean_logits=merged.z_sum / vocab_size,
        is_top1=(merged.is_top1.bool() if merged.is_top1 is not None
                 else (merged.target_logit >= merged.max) & (merged.target_logit > merged.max_before_target)),
    )
