"""Autograd wrapper of the fused per-sequence-sum + sigmoid DPO kernel (kernels/sigmoid_dpo.py).

The kernel returns, for every sequence, d loss_pair / d logp_token (the same for all completion
tokens of a sequence), so the backward is one broadcast over the [2B, T] token matrix.
"""

from __future__ import annotations

import torch


class FusedSigmoidDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logps, targets, ref_logps, beta, label_smoothing, ignore_index, average):
        from .kernels import sigmoid_dpo

        seq_logps, losses, seq_grad = sigmoid_dpo(
            token_logps.float().contiguous(), targets.contiguous(), ref_logps.float().contiguous(), beta=beta,
            label_smoothing=label_smoothing, ignore_index=ignore_index, average=average,
        )
        ctx.save_for_backward(targets, seq_grad)
        ctx.ignore_index, ctx.num_pairs, ctx.logps_dtype = ignore_index, losses.numel(), token_logps.dtype
        ctx.mark_non_differentiable(seq_logps)
        return losses.mean(), seq_logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_seq_logps):
        targets, seq_grad = ctx.saved_tensors
        per_sequence = seq_grad * (grad_loss / ctx.num_pairs)
        grad_tokens = torch.where(targets != ctx.ignore_index, per_sequence[:, None], 0.0)
        return grad_tokens.to(ctx.logps_dtype), None, None, None, None, None, None


def fused_sigmoid_dpo(token_logps, targets, ref_logps, *, beta, label_smoothing, ignore_index, average):
    """(mean loss, per-sequence log-probs [2B]) from token log-probs [2B, T] in one kernel."""
    return FusedSigmoidDPO.apply(token_logps, targets, ref_logps, beta, label_smoothing, ignore_index, average)
