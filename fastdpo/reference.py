"""The naive oracle: materializes every logit, in float32 (float64 when given float64).

Everything in fastdpo is tested against these functions. They are deliberately the plainest possible
statement of the math, with no chunking and no cleverness; they use O(tokens x vocab) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sequences import shifted_targets
from .types import DPOOutput, TokenStats


def _oracle_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def logits(hidden, weight, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """transform(hidden @ weight.T + bias) in float32/float64, TRL's transform order."""
    dtype = _oracle_dtype(hidden, weight, bias)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_stats(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                logit_scale=1.0) -> TokenStats:
    """Per-token log p(target) and the logged aggregates; zeros (False) at ignored positions."""
    z = logits(hidden, weight, bias, temperature, softcap, logit_scale)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    logp_all = F.log_softmax(z, dim=-1)
    p = logp_all.exp()
    target_logit = z.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    first_argmax = z.argmax(dim=-1)  # torch returns the first maximal index
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return TokenStats(
        logps=torch.where(valid, logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1), zero),
        entropy=torch.where(valid, -(p * logp_all).sum(-1), zero),
        log_sum_sq_probs=torch.where(valid, torch.logsumexp(2 * logp_all, dim=-1), zero),
        mean_logits=torch.where(valid, z.mean(-1), zero),
        is_top1=valid & (first_argmax == safe_targets) & (target_logit >= z.max(-1).values),
    )


def token_logprobs(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                   logit_scale=1.0) -> torch.Tensor:
    """log_softmax(logits)[target] per token, 0 at ignored positions; differentiable."""
    return token_stats(hidden, weight, targets, bias, ignore_index, temperature, softcap, logit_scale).logps


def sequence_logprobs(token_logps, targets, ignore_index=-100, average=False) -> torch.Tensor:
    """Sum (or mean over completion tokens) of token log-probs per sequence; 0 for a fully masked sequence."""
    valid = targets != ignore_index
    sums = torch.where(valid, token_logps, 0.0).sum(-1)
    return sums / valid.sum(-1).clamp(min=1) if average else sums


def sigmoid_dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0) -> DPOOutput:
    """Rafailov et al. 2023, eq. 7, with the conservative-DPO label smoothing of Mitchell 2023."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return DPOOutput.from_sequences(losses.mean(), chosen, rejected, chosen_rewards, rejected_rewards)


def dpo_loss(hidden_states, lm_head_weight, labels, lm_head_bias=None, ref_chosen_logps=None,
             ref_rejected_logps=None, ref_hidden_states=None, ref_lm_head_weight=None, ref_lm_head_bias=None, *,
             beta=0.1, label_smoothing=0.0, ignore_index=-100, average_log_prob=False, reference_free=False,
             shift_labels: bool = True) -> DPOOutput:
    """The sigmoid DPO loss computed the naive way; same arguments and output as FastDPOLoss."""
    targets = shifted_targets(labels, ignore_index) if shift_labels else labels
    num_pairs = hidden_states.shape[0] // 2

    def per_sequence(hidden, weight, bias):
        token_logps = token_logprobs(hidden, weight, targets, bias, ignore_index)
        return sequence_logprobs(token_logps, targets, ignore_index, average_log_prob)

    policy = per_sequence(hidden_states, lm_head_weight, lm_head_bias)
    if reference_free:
        ref = torch.zeros_like(policy)
    elif ref_chosen_logps is not None:
        ref = torch.cat([ref_chosen_logps, ref_rejected_logps]).to(policy.dtype)
    else:
        ref_weight = lm_head_weight if ref_lm_head_weight is None else ref_lm_head_weight
        ref_bias = lm_head_bias if ref_lm_head_weight is None else ref_lm_head_bias
        with torch.no_grad():
            ref = per_sequence(ref_hidden_states, ref_weight, ref_bias)
    return sigmoid_dpo(policy[:num_pairs], policy[num_pairs:], ref[:num_pairs], ref[num_pairs:], beta,
                       label_smoothing)

