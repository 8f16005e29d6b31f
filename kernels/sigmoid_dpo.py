"""Per-sequence sums of token log-probs and the sigmoid DPO loss, with its gradient, in one kernel.

One program per preference pair i (chosen row i, rejected row i + B of a [2B, T] token matrix):

    c = sum_t logp[i, t],  r = sum_t logp[i + B, t]         (divided by the completion length when averaging)
    margin = beta * ((c - c_ref) - (r - r_ref))
    loss_i = -(1 - ls) * log sigma(margin) - ls * log sigma(-margin)          (ls: label smoothing)
    dloss_i/dc = beta * (-(1 - ls) * sigma(-margin) + ls * sigma(margin)),    dloss_i/dr = -dloss_i/dc

The per-token gradient is then dloss/dc (divided by the length when averaging) for every completion
token of the sequence, so the backward is a broadcast and needs no kernel of its own.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def log1p(y):
    # Goldberg's trick: exact to a few ulps for tiny y, where log(1 + y) would round 1 + y first.
    # (libdevice's log1p does not run in Triton's interpreter.)
    u = 1.0 + y
    exact = u == 1.0
    return tl.where(exact, y, tl.log(u) * (y / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def log_sigmoid(x):
    # min(x, 0) - log1p(exp(-|x|)): no overflow for large |x|, full precision for small losses.
    return tl.minimum(x, 0.0) - log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sequence_sum(logps_ptr, targets_ptr, row, seq_len, ignore_index, BLOCK_T: tl.constexpr):
    total = tl.zeros((BLOCK_T,), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.float32)
    base = row.to(tl.int64) * seq_len
    for t_start in range(0, seq_len, BLOCK_T):
        offs = t_start + tl.arange(0, BLOCK_T)
        in_row = offs < seq_len
        targets = tl.load(targets_ptr + base + offs, mask=in_row, other=ignore_index)
        valid = in_row & (targets != ignore_index)
        total += tl.load(logps_ptr + base + offs, mask=valid, other=0.0)
        count += valid.to(tl.float32)
    return tl.sum(total, axis=0), tl.sum(count, axis=0)


@triton.jit
def sigmoid_dpo_kernel(
    logps_ptr, targets_ptr, ref_ptr, seq_logps_ptr, loss_ptr, seq_grad_ptr,
    num_pairs, seq_len, ignore_index, beta, label_smoothing,
    AVERAGE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pair = tl.program_id(0)
    chosen, n_chosen = sequence_sum(logps_ptr, targets_ptr, pair, seq_len, ignore_index, BLOCK_T)
    rejected, n_rejected = sequence_sum(logps_ptr, targets_ptr, pair + num_pairs, seq_len, ignore_index, BLOCK_T)
    if AVERAGE:  # a fully masked sequence has sum 0 and count 0: keep its log-prob at 0
        chosen = chosen / tl.maximum(n_chosen, 1.0)
        rejected = rejected / tl.maximum(n_rejected, 1.0)
    ref_chosen = tl.load(ref_ptr + pair)
    ref_rejected = tl.load(ref_ptr + pair + num_pairs)
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    loss = -(1 - label_smoothing) * log_sigmoid(margin) - label_smoothing * log_sigmoid(-margin)
    d_chosen = beta * (-(1 - label_smoothing) * tl.sigmoid(-margin) + label_smoothing * tl.sigmoid(margin))
    d_rejected = -d_chosen
    if AVERAGE:
        d_chosen = d_chosen / tl.maximum(n_chosen, 1.0)
        d_rejected = d_rejected / tl.maximum(n_rejected, 1.0)
    tl.store(seq_logps_ptr + pair, chosen)
    tl.store(seq_logps_ptr + pair + num_pairs, rejected)
    tl.store(loss_ptr + pair, loss)
    tl.store(seq_grad_ptr + pair, d_chosen)
    tl.store(seq_grad_ptr + pair + num_pairs, d_rejected)


def sigmoid_dpo(token_logps, targets, ref_logps, *, beta, label_smoothing, ignore_index, average):
    """token_logps float32 [2B, T] (0 where ignored), targets [2B, T], ref_logps float32 [2B].

    Returns (sequence log-probs [2B], per-pair losses [B], per-token gradient scale per sequence [2B]:
    d loss_i / d logp[s, t] for every completion token t of sequence s).
    """
    num_seqs, seq_len = token_logps.shape
    num_pairs = num_seqs // 2
    seq_logps = torch.empty(num_seqs, device=token_logps.device, dtype=torch.float32)
    seq_grad = torch.empty_like(seq_logps)
    losses = torch.empty(num_pairs, device=token_logps.device, dtype=torch.float32)
    sigmoid_dpo_kernel[(num_pairs,)](
        token_logps, targets, ref_logps, seq_logps, losses, seq_grad,
        num_pairs, seq_len, ignore_index, float(beta), float(label_smoothing),
        AVERAGE=average, BLOCK_T=min(1024, triton.next_power_of_2(seq_len)),
    )
    return seq_logps, losses, seq_grad
