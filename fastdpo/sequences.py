"""From per-token log-probs to per-sequence ones, and the label conventions in between."""

from __future__ import annotations

import torch


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face convention: position t predicts labels[t + 1]; the last position predicts nothing.

    Shifting the labels instead of the hidden states keeps the hidden states uncopied.
    """
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def completion_lengths(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return (targets != ignore_index).sum(-1)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of token_logps where mask is true: [S, T] -> [S] (whatever the masked positions hold)."""
    return torch.where(mask.bool(), token_logps, 0).sum(dim=-1)


def sequence_logprobs(token_logps: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      average: bool = False) -> torch.Tensor:
    """Sum (or mean over completion tokens) per sequence; 0 for a fully masked sequence."""
    sums = sequence_logps(token_logps, targets != ignore_index)
    if not average:
        return sums
    return sums / completion_lengths(targets, ignore_index).clamp(min=1).to(sums.dtype)
