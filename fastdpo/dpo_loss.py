"""FastDPOLoss: the DPO loss from final hidden states and the LM head, logits never materialized.

    policy logps   = sum over completion tokens of log softmax(h W^T + b)[label]   (fused kernels)
    reference      = precomputed per-sequence log-probs, or the same kernels without grad
    loss           = -log sigma(beta * ((c - c_ref) - (r - r_ref)))               (Rafailov et al. 2023)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backends import resolve_backend
from .fused_sigmoid import fused_sigmoid_dpo
from .logprobs import linear_logprobs
from .sequences import sequence_logprobs, shifted_targets
from .types import DPOOutput
from .validation import check_dpo_inputs

LOSS_TYPES = ("sigmoid",)


class FastDPOLoss(nn.Module):
    """Drop-in DPO loss module.

    forward(hidden_states [2B, T, H] (B chosen sequences, then B rejected), lm_head_weight [V, H],
    labels [2B, T] (Hugging Face convention: -100 ignored, shifted inside unless shift_labels=False),
    ...) -> DPOOutput with the scalar `loss` and detached per-pair log-probs and rewards.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, average_log_prob: bool = False, reference_free: bool = False,
                 shift_labels: bool = True, backend: str = "auto"):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.ignore_index, self.average_log_prob = ignore_index, average_log_prob
        self.reference_free, self.shift_labels, self.backend = reference_free, shift_labels, backend

    def forward(self, hidden_states, lm_head_weight, labels, lm_head_bias=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden_states=None, ref_lm_head_weight=None,
                ref_lm_head_bias=None) -> DPOOutput:
        check_dpo_inputs(hidden_states, lm_head_weight, labels, ref_chosen_logps=ref_chosen_logps,
                         ref_rejected_logps=ref_rejected_logps, ref_hidden_states=ref_hidden_states,
                         reference_free=self.reference_free)
        backend = resolve_backend(self.backend, hidden_states.device)
        targets = shifted_targets(labels, self.ignore_index) if self.shift_labels else labels
        token_logps = linear_logprobs(hidden_states, lm_head_weight, targets, lm_head_bias, self.ignore_index,
                                      backend=backend)
        ref_logps = self._reference_logps(targets, token_logps, ref_chosen_logps, ref_rejected_logps,
                                          ref_hidden_states, ref_lm_head_weight, ref_lm_head_bias, lm_head_weight,
                                          lm_head_bias, backend)
        if backend == "triton":
            loss, policy_logps = fused_sigmoid_dpo(
                token_logps, targets, ref_logps, beta=self.beta, label_smoothing=self.label_smoothing,
                ignore_index=self.ignore_index, average=self.average_log_prob)
        else:
            policy_logps = sequence_logprobs(token_logps, targets, self.ignore_index, self.average_log_prob)
            loss = self._sigmoid_loss(policy_logps - ref_logps)
        num_pairs = policy_logps.shape[0] // 2
        rewards = self.beta * (policy_logps - ref_logps)
        return DPOOutput.from_sequences(loss, policy_logps[:num_pairs], policy_logps[num_pairs:], rewards[:num_pairs],
                                        rewards[num_pairs:])

    def _sigmoid_loss(self, log_ratios: torch.Tensor) -> torch.Tensor:
        num_pairs = log_ratios.shape[0] // 2
        margin = self.beta * (log_ratios[:num_pairs] - log_ratios[num_pairs:])
        smoothing = self.label_smoothing
        return (-(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)).mean()

    def _reference_logps(self, targets, token_logps, ref_chosen_logps, ref_rejected_logps, ref_hidden_states,
                         ref_lm_head_weight, ref_lm_head_bias, lm_head_weight, lm_head_bias, backend) -> torch.Tensor:
        """Per-sequence reference log-probs [2B] (zeros when reference-free), never differentiated."""
        dtype = token_logps.dtype
        if self.reference_free:
            return torch.zeros(targets.shape[0], dtype=dtype, device=targets.device)
        if ref_chosen_logps is not None:
            return torch.cat([ref_chosen_logps, ref_rejected_logps]).detach().to(dtype)
        if ref_lm_head_weight is None:  # the reference shares the policy's head
            ref_lm_head_weight, ref_lm_head_bias = lm_head_weight, lm_head_bias
        with torch.no_grad():
            ref_tokens = linear_logprobs(ref_hidden_states.detach(), ref_lm_head_weight.detach(), targets,
                                         None if ref_lm_head_bias is None else ref_lm_head_bias.detach(),
                                         self.ignore_index, backend=backend)
            return sequence_logprobs(ref_tokens, targets, self.ignore_index, self.average_log_prob).to(dtype)
