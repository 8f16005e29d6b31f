"""FastDPOLoss: preference losses from final hidden states and the LM head, logits never materialized.

    policy logps   = log softmax(h W^T + b)[label] per completion token            (fused kernels)
    reference      = precomputed per-sequence log-probs, or the same kernels without grad
    loss           = any of fastdpo.losses (TRL's loss types, SimPO, ORPO), from per-sequence log-probs

The policy's and the reference's per-sequence sums go through one torch summation
(fastdpo.sequences), whatever the backend: with the same token log-probs they are the same bits, so at
the first step (policy = reference) the rewards are exactly 0. (An earlier fused Triton kernel summed
the policy in its own order; the loss math it fused is a few [B]-sized ops, microseconds against the
milliseconds of the head.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import fused_pass
from .backends import resolve_backend
from .logprobs import transformed_logprobs
from .losses import LossConfig, preference_loss_from_token_logps
from .sequences import shifted_targets
from .transform import LogitTransform
from .types import DPOOutput, TokenStats
from .validation import check_dpo_inputs, check_fused, check_logit_options, check_workspace_bytes


class FastDPOLoss(nn.Module):
    """Drop-in preference-loss module.

    forward(hidden_states [2B, T, H] (B chosen sequences, then B rejected), lm_head_weight [V, H],
    labels [2B, T] (Hugging Face convention: -100 ignored, shifted inside unless shift_labels=False),
    ...) -> DPOOutput with the scalar `loss` and detached per-pair log-probs, rewards and metrics.

    Options beyond the core ones carry TRL's DPOConfig names (loss_weights, f_divergence_type,
    f_alpha_divergence_coef, use_weighting, ld_alpha, discopop_tau) plus SimPO's simpo_gamma.
    `label_smoothing` with "sigmoid" gives conservative DPO (TRL 1.16's sigmoid ignores it).
    `token_metrics=True` adds the kernel-pass aggregates (entropy, mean logits, top-1 accuracy).
    `temperature`, `softcap` (Gemma's final_logit_softcapping) and `logit_scale` transform the logits
    as in linear_logprobs, for the policy and the reference alike. `grad_tolerance` (default 0, exact)
    lets the backward skip vocabulary tiles within a stated per-row budget of dropped probability mass,
    and `workspace_bytes` bounds the Triton backward's d_logits workspace (see linear_logprobs) and, on
    the PyTorch path, the fused pass's logits workspace (None: fused_pass.DEFAULT_WORKSPACE_BYTES).
    `fused=True` (the default) takes the fused routes where they apply: 3 GEMM passes over the head for
    a trainable head, 2 for a frozen one; `fused=False` keeps the two-pass path (fastdpo.fused_pass says
    which route a call takes, and why).
    """

    def __init__(self, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, average_log_prob: bool = False, reference_free: bool = False,
                 shift_labels: bool = True, backend: str = "auto", *, loss_weights: Sequence[float] | None = None,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 use_weighting: bool = False, ld_alpha: float | None = None, discopop_tau: float = 0.05,
                 simpo_gamma: float = 0.5, token_metrics: bool = False, temperature: float = 1.0,
                 softcap: float | None = None, logit_scale: float = 1.0, grad_tolerance: float = 0.0,
                 workspace_bytes: int | None = None, fused: bool = True):
        super().__init__()
        self.config = LossConfig(
            loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
            reference_free=reference_free, use_weighting=use_weighting, ld_alpha=ld_alpha, discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma, average_log_prob=average_log_prob, cdpo=True,
        )
        self.transform = LogitTransform(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
        check_logit_options(self.transform, grad_tolerance)
        check_workspace_bytes(workspace_bytes)
        self.ignore_index, self.shift_labels, self.backend = ignore_index, shift_labels, backend
        self.token_metrics = token_metrics
        self.grad_tolerance, self.workspace_bytes = grad_tolerance, workspace_bytes
        check_fused(fused)
        self.fused = fused

    @property
    def beta(self) -> float:
        return self.config.beta

    def forward(self, hidden_states, lm_head_weight, labels, lm_head_bias=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden_states=None, ref_lm_head_weight=None,
                ref_lm_head_bias=None) -> DPOOutput:
        cfg = self.config
        device = hidden_states.device if isinstance(hidden_states, torch.Tensor) else torch.device("cpu")
        backend = resolve_backend(self.backend, device)
        labels = check_dpo_inputs(hidden_states, lm_head_weight, labels, lm_head_bias,
                                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                  ref_hidden_states=ref_hidden_states, ref_lm_head_weight=ref_lm_head_weight,
                                  ref_lm_head_bias=ref_lm_head_bias, reference_required=cfg.needs_reference,
                                  ignore_index=self.ignore_index, backend=backend)
        targets = shifted_targets(labels, self.ignore_index) if self.shift_labels else labels
        completion = targets != self.ignore_index
        with_stats = self.token_metrics or cfg.needs_log_sum_sq_probs
        # A reference given to a loss that needs none (sft, simpo, orpo) still feeds the logged rewards.
        if not cfg.reference_free and ref_chosen_logps is None and ref_hidden_states is not None:
            ref_token_logps = self._reference_token_logps(targets, ref_hidden_states, ref_lm_head_weight,
                                                          ref_lm_head_bias, lm_head_weight, lm_head_bias, backend)
        else:
            ref_token_logps = None
        reference = dict(ref_token_logps=ref_token_logps, ref_chosen_logps=ref_chosen_logps,
                         ref_rejected_logps=ref_rejected_logps)
        fused = None
        if fused_pass.trainable_route(cfg, hidden_states, lm_head_weight, lm_head_bias, fused=self.fused,
                                      backend=backend, grad_tolerance=self.grad_tolerance):
            fused = fused_pass.fused_preference_loss(
                cfg, hidden_states, lm_head_weight, lm_head_bias, targets, completion, self.ignore_index,
                transform=self.transform, with_stats=with_stats, workspace_bytes=self.workspace_bytes,
                backend=backend, **reference)
        if fused is not None:
            terms, policy = fused
        else:
            policy = transformed_logprobs(hidden_states, lm_head_weight, targets, lm_head_bias, self.ignore_index,
                                          self.transform, with_stats=with_stats, backend=backend,
                                          grad_tolerance=self.grad_tolerance, workspace_bytes=self.workspace_bytes,
                                          fused=self.fused, inputs_checked=True)
            terms = preference_loss_from_token_logps(
                cfg, policy.logps if with_stats else policy, completion, **reference,
                log_sum_sq_probs=policy.log_sum_sq_probs if with_stats else None,
            )
        out = DPOOutput.from_sequences(terms.loss, terms.chosen_logps, terms.rejected_logps, terms.chosen_rewards,
                                       terms.rejected_rewards)
        if self.token_metrics:
            out.token_metrics = _token_metrics(policy, completion)
        return out

    def _reference_token_logps(self, targets, ref_hidden_states, ref_lm_head_weight, ref_lm_head_bias,
                               lm_head_weight, lm_head_bias, backend) -> torch.Tensor:
        """Per-token reference log-probs [2B, T] (per token, because ld_alpha splits them), no grad."""
        if ref_lm_head_weight is None:  # the reference shares the policy's head
            ref_lm_head_weight, ref_lm_head_bias = lm_head_weight, lm_head_bias
        with torch.no_grad():  # the head is not detached: a ZeRO-3 parameter's .detach() is its empty partition
            return transformed_logprobs(ref_hidden_states.detach(), ref_lm_head_weight, targets, ref_lm_head_bias,
                                        self.ignore_index, self.transform, backend=backend, inputs_checked=True)


def _token_metrics(stats: TokenStats, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means over completion tokens of the kernel-pass statistics (TRL's metric names), detached."""
    half, dtype = mask.shape[0] // 2, stats.logps.dtype

    def mean(values, rows=slice(None)):
        return (values[rows].detach().to(dtype) * mask[rows]).sum() / mask[rows].sum().clamp(min=1)

    return {
        "entropy": mean(stats.entropy),
        "mean_token_accuracy": mean(stats.is_top1),
        "logits/chosen": mean(stats.mean_logits, slice(0, half)),
        "logits/rejected": mean(stats.mean_logits, slice(half, None)),
    }
