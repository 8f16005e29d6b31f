"""Small result containers shared by the fused paths and the reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token outputs of one pass over the vocabulary; only `logps` carries a gradient."""

    logps: torch.Tensor
    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor


@dataclass
class DPOOutput:
    """What a DPO step returns: the loss to backpropagate and detached per-pair values to log."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_margins: torch.Tensor
    reward_accuracies: torch.Tensor
    # With FastDPOLoss(token_metrics=True): means over completion tokens of the kernel-pass statistics,
    # under TRL's names ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected").
    token_metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_sequences(cls, loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> "DPOOutput":
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        return cls(
            loss=loss,
            chosen_logps=chosen_logps.detach(),
            rejected_logps=rejected_logps.detach(),
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            reward_margins=chosen_rewards - rejected_rewards,
            reward_accuracies=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        )

    def metrics(self) -> dict[str, float]:
        """Means of the logged values under TRL's metric names."""
        return {
            **{name: value.item() for name, value in self.token_metrics.items()},
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margins": self.reward_margins.mean().item(),
            "rewards/accuracies": self.reward_accuracies.mean().item(),
            "logps/chosen": self.chosen_logps.mean().item(),
            "logps/rejected": self.rejected_logps.mean().item(),
        }
