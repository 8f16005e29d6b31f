"""The fused routes: the loss gradient formed in the forward, so the head costs 3 GEMM passes, or 2 when frozen.

With n scored tokens and P = n·H·V, one pass over the head is a GEMM of 2P FLOPs. The two-pass path
(fastdpo.ops) spends 4 passes on a trainable head (logits; their recompute in the backward; dX; dW) and
3 on a frozen one. Which route a call takes:

- **fused** (FastDPOLoss, trainable head: the weight or bias requires grad; 3 passes): taken when
  `fused=True` (the default), gradients are being recorded, the backend is 'torch' or 'triton'
  (fastdpo.torch_fused or fastdpo.triton_fused computes the tiles), grad_tolerance is 0,
  the head is a local tensor, a ZeRO-3 partition or a vocab-parallel head (see "Heads split across
  processes"), not under torch.compile,
  every loss type is pair-local (fastdpo.losses.PAIR_COUPLED_LOSS_TYPES: 'aot' and 'aot_unpaired' sort the
  batch), and the pair schedule below fits `workspace_bytes` (default DEFAULT_WORKSPACE_BYTES; on a GPU,
  triton_fused.default_workspace_bytes). On the PyTorch path, rows whose target logit lies more than ~41
  nats below their row's maximum (or with inf/NaN logits) leave the shifted forward for the online one
  (chunked.forward_block); the fused pass's backward recomputes their tiles from the merged lse, so they cost
  one more pass each (a trained LM's rare targets do this). The Triton forward is online throughout: no rerun.
- **frozen** (FastDPOLoss and linear_logprobs, frozen head: hidden requires grad, weight and bias do not;
  2 passes, any upstream loss): `fused=True`, gradients recorded, backend 'torch' or 'triton',
  grad_tolerance 0, a local head or a ZeRO-3 partition (gathered for the forward alone: the backward needs
  no head), not compiling. The forward forms U_i = dlogp_i/dh_i (fp32 [n, H]; _frozen_forward picks the
  backend's: fastdpo.torch_fused.FrozenAccumulator accumulates it beside the PyTorch path's tiles,
  fastdpo.triton_fused.FrozenStoredLogits stores each token block's tiles in one slot, turns them into
  d_logits with g = 1 in place and multiplies by W); the backward returns g ⊙ U. No workspace bound is
  checked: on Triton the forward holds 4 slots of block_rows x V in the input dtype (251 MiB at Llama-3-8B).
- **two-pass** everywhere else, including every forward without gradients (evaluation, the reference):
  there it is one pass, the forward alone.

Heads split across processes (fastdpo.distributed), on the trainable route:
- DDP, and FSDP2 with the loss inside the unit that owns the head: the head is a local tensor there (FSDP2's
  unsharded parameter), so the fused route applies as is; dX and dW reach autograd in the backward, where DDP
  all-reduces and FSDP2 reduce-scatters them.
- ZeRO-3 partition: gathered once, for the forward, which forms dW; nothing is gathered for the backward (the
  two-pass path gathers twice). ZeRO-3 takes the gradient as autograd accumulates it into the full-size
  `param.grad`, which its post-accumulate-grad hook reduce-scatters; the backward gives the partitioned
  parameter a stride-0 full-shape placeholder for that (distributed.full_shape_for_accumulation).
- VocabShard and DTensor heads split by vocabulary (tensor parallel: Shard(0) on a 1-D mesh, or on the tp dimension
  of a (dp, tp) mesh): every rank of the group runs the pass over its shard in the same schedule
  (fastdpo.distributed.shard_stored_logits: the backend's StoredLogits on the shard). Per token block: the shard's
  forward (the two-pass vocab-parallel head's own: on the PyTorch path a row whose target lies in another shard
  borrows a shard row, so the shifted tiles stay relative to a logit the shard holds; Triton stores z and its
  kernels take the shard-local target as it is) into its slot, then one all-gather of the block's partials (m, s,
  t and the statistics), merged in rank order as the two-pass path merges its one all-gather: the log-probs are
  its bits, and the loss and g the same on every rank. The tiles are then normalised by the global lse; the own
  target's entry is g (1 - p_y), 1 - p_y = the shard's target-free sum plus the other shards' sums (the gathered
  partials hold them: nothing more is gathered); a borrowed or foreign target's column is an ordinary one.
  dW and db stay local; dX is the shard's share, all-reduced once at the end (as the two-pass backward does).
  Per step: 3 passes over the shard's n·H·V/tp (the two-pass path: 4), ceil(n / block_rows) all-gathers of a
  block's partials and one all-reduce of dX [N, H] (the two-pass path: one all-gather, one all-reduce), beside
  the shards' consistency check (one small all-gather, both routes). Every rank decides the workspace fit by the
  widest shard, so all take the same route. Rows whose own or borrowed target logit lies ~41 nats below the
  shard's maximum leave the shifted forward here too, and are recomputed as above (one more pass each).

Patched TRL's loss route (fastdpo.trl_patch) runs the same pass through `fused_token_pass` on the
compact tokens TRL's head receives, when `token_pass_route` holds (the fused rule, backend 'torch' or
'triton', a local head, with some gradient wanted, trainable or frozen head): it returns the per-token outputs and the predicted per-token loss gradient beside
dX, dW and db, and TRL's backward decides what to do with them.

Every route computes its log-probs with the same tiles and merges, so they are the same bits on every
route, and the loss and metrics come from one evaluation of fastdpo.losses on the full batch.

The fused pass, step by step. The scored rows are compacted and cut into the forward's token blocks
(StoredLogits.block_rows: chunked.TOKEN_BLOCK rows on the PyTorch path, 256 on Triton); pair i is
sequences i and i + B. On the PyTorch path the rows keep their order (chosen sequences first) and the
blocks are computed in the order `PairSchedule` chooses (alternating between the chosen and the rejected
half, whichever has completed fewer pairs); on Triton the rows are taken pair by pair and the blocks in
order (`PairMajorSchedule`: about half the slots held at once). Each block goes into a slot of the
workspace. As soon as both halves of some pairs are computed, the loss is evaluated on the whole
batch, with the pairs not yet computed holding placeholder
log-probs, and differentiated with respect to the token log-probs: for a pair-local loss the gradient of
the completed pairs is exact (the lengths, the reference log-probs and 'sft''s token count are known for
the whole batch up front; WPO's weights are detached per pair). Their rows' tiles become d_logits in place
and give dX, dW and db; a slot is freed once all its rows are done. Memory: the slots the schedule needs
at once (block_rows x V values each: fp32 on the PyTorch path, exp-space tiles in the input dtype on
Triton; a pair whose sequences span many blocks needs more), dX and dW (README, "Memory").

16-bit weights: the PyTorch path accumulates dW in an fp32 [V, H] and casts it at the end. On Triton, where
that buffer would cost 2 bytes per weight beyond a bf16 gradient, the gradient is its own accumulator while
the schedule runs at most triton_fused.MAX_ROUNDED_DW_GEMMS dW GEMMs (one rounding each: relative error
~1.6e-3 sqrt(k / 2) after k, measured by tools/dw_accumulation.py against float64; README, "Routes"), and
fp32 past that. Stochastic rounding measured worse at every k.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import chunked, ops
from .distributed import checked_shard, full_shape_for_accumulation, gathered, local_head, shard_stored_logits
from .heads import DTENSOR, LOCAL, ZERO3, VocabShard, autocast_head, head_kind, is_dtensor, is_zero3
from .losses import LossConfig, LossTerms, preference_loss_from_token_logps
from .ops import DOUBLE_BACKWARD_MESSAGE
from .softmax_stats import logsumexp, take, token_stats
from .torch_fused import FrozenAccumulator, StoredLogits
from .transform import LogitTransform
from .types import TokenStats
from .validation import checked_local_head

# The fused pass's workspace bound when the caller gives none: 512 MiB. At V = 65,536 in fp32 a slot of
# 128 rows is 32 MiB, so 16 slots: pairs whose longer sequence has up to about 14 blocks (~1,800 scored
# tokens) fit; at V = 128,256, 8 slots (~770 tokens). Longer pairs take the two-pass path.
DEFAULT_WORKSPACE_BYTES = 512 << 20
SECOND_BACKWARD_MESSAGE = (
    "FastDPOLoss's fused pass hands its gradients over at the first backward, so its loss cannot be "
    "backpropagated twice (retain_graph=True); pass fused=False to FastDPOLoss for that.")
# What a pair that is not computed yet holds while the loss is differentiated for the others: a finite
# log-prob per token, so that every loss term stays finite.
PLACEHOLDER_LOGP = -1.0


def _plain_tensors(*tensors) -> bool:
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _enabled(fused: bool, grad_tolerance: float) -> bool:
    return fused and grad_tolerance == 0 and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _common_rule(fused: bool, backend: str, grad_tolerance: float, hidden, weight, bias) -> bool:
    # A VocabShard or DTensor head (tensor parallel) has a rule of its own (trainable_route).
    return (_enabled(fused, grad_tolerance) and backend in ("torch", "triton") and _plain_tensors(hidden, weight, bias)
            and head_kind(hidden, weight) in (LOCAL, ZERO3))


def _vocab_parallel(weight) -> bool:
    """A VocabShard, or a DTensor head split by vocabulary (Shard(0) on a mesh dimension)."""
    return isinstance(weight, VocabShard) or (is_dtensor(weight) and any(p.is_shard(0) for p in weight.placements))


def frozen_route(hidden, weight, bias, *, fused: bool, backend: str, grad_tolerance: float) -> bool:
    """Whether linear_logprobs (and so FastDPOLoss) takes the frozen-head route (see the module docstring)."""
    return (_common_rule(fused, backend, grad_tolerance, hidden, weight, bias)
            and hidden.requires_grad and not weight.requires_grad and (bias is None or not bias.requires_grad))


def trainable_route(config: LossConfig, hidden, weight, bias, *, fused: bool, backend: str,
                    grad_tolerance: float) -> bool:
    """Whether FastDPOLoss takes the fused route; `pair_schedule_fits` is checked by fused_preference_loss."""
    if _vocab_parallel(weight):  # the shard's tiles (distributed.shard_stored_logits)
        rule = _enabled(fused, grad_tolerance) and backend in ("torch", "triton")
        weight = getattr(weight, "weight", weight)
    else:
        rule = _common_rule(fused, backend, grad_tolerance, hidden, weight, bias)
    return rule and config.pair_local and (weight.requires_grad or (bias is not None and bias.requires_grad))


def token_pass_route(hidden, weight, bias, *, backend: str) -> bool:
    """Whether fused_token_pass serves this head call (patched TRL's loss route): the rule above, with some
    gradient wanted (a frozen head gives dX alone: 2 passes, as the frozen route)."""
    # A local head, on either backend: what patched TRL's parity tests check.
    return (_common_rule(True, backend, 0.0, hidden, weight, bias) and head_kind(hidden, weight) == LOCAL
            and any(t is not None and t.requires_grad for t in (hidden, weight, bias)))


# --- the pair schedule -----------------------------------------------------------------------------------------


@dataclass
class Step:
    block: int | None  # the token block computed at this step (None: already computed by the other half)
    done: int  # pairs [done, ready) are complete after this step
    ready: int
    release: list[int]  # blocks whose rows are all done after this step


class PairSchedule:
    """In which order the token blocks are computed, and when each pair's gradient can be formed.

    rows: the compacted scored positions (flat indices into [2B, T], ascending); block: rows per block.
    """

    order = caller_order = None  # the rows are taken in their ascending order (PairMajorSchedule reorders them)

    def __init__(self, rows: torch.Tensor, seq_len: int, pairs: int, block: int):
        seq = (rows // seq_len).tolist()
        self.n_rows, self.block, self.pairs = len(seq), block, pairs
        self.n_chosen = bisect.bisect_left(seq, pairs)
        counts_c, counts_r = [0] * pairs, [0] * pairs
        for s in seq:
            (counts_c if s < pairs else counts_r)[s % pairs] += 1
        self.chosen_end, self.rejected_end = _running(counts_c, 0), _running(counts_r, self.n_chosen)
        n_blocks = -(-self.n_rows // block)
        self.needed = _pairs_needed([s % pairs for s in seq], block)
        self.steps = self._plan(n_blocks)
        self.slots = self._peak_slots()

    def _plan(self, n_blocks: int) -> list[Step]:
        block, nc = self.block, self.n_chosen
        chosen_blocks = list(range(-(-nc // block)))
        rejected_blocks = list(range(nc // block, n_blocks)) if self.n_rows > nc else []
        covered_c, covered_r, ic, ir = 0, nc, 0, 0
        computed, steps, done, held = set(), [], 0, []
        while ic < len(chosen_blocks) or ir < len(rejected_blocks):
            done_c = bisect.bisect_right(self.chosen_end, covered_c)
            done_r = bisect.bisect_right(self.rejected_end, covered_r)
            take_chosen = ir >= len(rejected_blocks) or (ic < len(chosen_blocks) and done_c <= done_r)
            if take_chosen:
                k, ic = chosen_blocks[ic], ic + 1
                covered_c = min(nc, (k + 1) * block)
            else:
                k, ir = rejected_blocks[ir], ir + 1
                covered_r = min(self.n_rows, (k + 1) * block)
            new = k not in computed
            computed.add(k)
            if new:
                held.append(k)
            ready = min(bisect.bisect_right(self.chosen_end, covered_c),
                        bisect.bisect_right(self.rejected_end, covered_r))
            release = [j for j in held if self.needed[j] <= ready]
            held = [j for j in held if self.needed[j] > ready]
            steps.append(Step(k if new else None, done, ready, release))
            done = ready
        assert done == self.pairs or self.n_rows == 0, "every pair is completed by the last block"
        return steps

    def _peak_slots(self) -> int:
        held, peak = 0, 0
        for step in self.steps:
            held += step.block is not None
            peak = max(peak, held)
            held -= len(step.release)
        return peak

    def runs(self, done: int, ready: int) -> list[tuple[int, int, int]]:
        """(block, first, end) row ranges within blocks of pairs [done, ready): chosen rows, then rejected."""
        starts = (self.chosen_end[done - 1] if done else 0, self.rejected_end[done - 1] if done else self.n_chosen)
        ends = (self.chosen_end[ready - 1], self.rejected_end[ready - 1])
        return [run for start, end in zip(starts, ends) for run in self._block_runs(start, end)]

    def _block_runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Rows [start, end) as (block, first, end) ranges within blocks."""
        out = []
        while start < end:
            k = start // self.block
            stop = min(end, (k + 1) * self.block)
            out.append((k, start - k * self.block, stop - k * self.block))
            start = stop
        return out


class PairMajorSchedule(PairSchedule):
    """The Triton backend's schedule: the scored rows reordered pair by pair (pair i's chosen rows, then its
    rejected rows; `order` gives them as indices into the ascending rows, `caller_order` its inverse), the blocks
    computed in order.

    A pair's rows are then contiguous, so the blocks held at once are those from the first incomplete pair's
    first block to the current one: at most ceil((L + block - 1) / block) + 1 for pairs of up to L scored rows
    (PairSchedule holds a pair's chosen and rejected blocks apart: about twice that). Blocks are released in
    order, so a step's released blocks are consecutive (one dW GEMM over them: triton_fused.StoredLogits).
    Every row's tiles are computed alone (no GEMM mixes rows), so the log-probs do not depend on the order.
    """

    def __init__(self, rows: torch.Tensor, seq_len: int, pairs: int, block: int):
        seq = rows // seq_len
        pair = seq % pairs
        self.order = torch.sort(2 * pair + seq // pairs, stable=True).indices  # stable: positions ascending
        self.caller_order = torch.argsort(self.order)
        pair_of_row = pair[self.order].tolist()
        self.n_rows, self.block, self.pairs = len(pair_of_row), block, pairs
        counts = [0] * pairs
        for p in pair_of_row:
            counts[p] += 1
        self.pair_end = _running(counts, 0)
        n_blocks = -(-self.n_rows // block)
        needed = _pairs_needed(pair_of_row, block)
        self.steps, done, held = [], 0, []
        for k in range(n_blocks):
            held.append(k)
            ready = bisect.bisect_right(self.pair_end, min(self.n_rows, (k + 1) * block))
            release = [j for j in held if needed[j] <= ready]
            held = held[len(release):]
            self.steps.append(Step(k, done, ready, release))
            done = ready
        self.slots = self._peak_slots()

    def runs(self, done: int, ready: int) -> list[tuple[int, int, int]]:
        return self._block_runs(self.pair_end[done - 1] if done else 0, self.pair_end[ready - 1])


def pair_schedule(backend: str, rows: torch.Tensor, seq_len: int, pairs: int, block: int) -> PairSchedule:
    """The fused pass's schedule on `backend`: PairMajorSchedule on Triton (whose ring of slots and batched dW
    need blocks released in order), PairSchedule on the PyTorch path (rows in their ascending order)."""
    return (PairMajorSchedule if backend == "triton" else PairSchedule)(rows, seq_len, pairs, block)


def _pairs_needed(pair_of_row: list[int], block: int) -> list[int]:
    """Per block of `block` rows, the last pair (+1) it holds a row of: its slot is free once that many pairs are
    done."""
    needed = [0] * -(-len(pair_of_row) // block)
    for r, p in enumerate(pair_of_row):
        needed[r // block] = max(needed[r // block], p + 1)
    return needed


def _running(counts: list[int], start: int) -> list[int]:
    out, total = [], start
    for c in counts:
        total += c
        out.append(total)
    return out


# --- the loss gradient of completed pairs ------------------------------------------------------------------------


class LossGradients:
    """dloss/dlogp per token for the pairs completed so far, from fastdpo.losses on the whole batch.

    The token log-probs (and log sum p^2, for WPO) not yet computed hold placeholders; for a pair-local
    loss (LossConfig.pair_local) they do not reach the completed pairs' gradients.
    """

    def __init__(self, config: LossConfig, mask: torch.Tensor, dtype: torch.dtype, with_stats: bool, **reference):
        self.config, self.mask, self.reference = config, mask, reference
        self.logps = torch.full(mask.shape, PLACEHOLDER_LOGP, dtype=dtype, device=mask.device)
        self.log_sum_sq = torch.zeros_like(self.logps) if with_stats else None

    def record(self, positions: torch.Tensor, logps: torch.Tensor, log_sum_sq: torch.Tensor | None) -> None:
        self.logps.view(-1).index_copy_(0, positions, logps)
        if self.log_sum_sq is not None:
            self.log_sum_sq.view(-1).index_copy_(0, positions, log_sum_sq)

    def token_grads(self) -> torch.Tensor:
        """[2B * T] gradient of the batch's loss w.r.t. each token's log-prob (at the current values)."""
        with torch.enable_grad():
            logps = self.logps.detach().requires_grad_()
            terms = preference_loss_from_token_logps(self.config, logps, self.mask,
                                                     log_sum_sq_probs=self.log_sum_sq, **self.reference)
            (grad,) = torch.autograd.grad(terms.loss, logps, allow_unused=True)
        return (torch.zeros_like(logps) if grad is None else grad).reshape(-1)


class _AttachGradients(torch.autograd.Function):
    """The loss, with the gradients the forward already formed: the backward only scales them."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, dx, dw, db, zero3_params):
        ctx.grads, ctx.zero3_params = (dx, dw, db), zero3_params
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        if ctx.grads is None:
            raise RuntimeError(SECOND_BACKWARD_MESSAGE)
        # Handed over, not kept: with no other reference left, autograd makes dW the weight's .grad
        # without a copy (a kept reference would cost a second [V, H]).
        grads, ctx.grads = ctx.grads, None
        # A ZeRO-3 head is not gathered again: its dW reaches ZeRO-3's hooks on a full-shape placeholder.
        full_shape_for_accumulation(*ctx.zero3_params)
        if bool(grad == 1):  # the usual case
            return (None, *grads, None, None, None, None)
        return (None, *(None if t is None else t * grad.to(t.dtype) for t in grads), None, None, None, None)


def fused_preference_loss(config: LossConfig, hidden, weight, bias, targets, mask, ignore_index: int, *,
                          transform: LogitTransform, with_stats: bool, workspace_bytes: int | None,
                          backend: str = "torch", ref_token_logps=None, ref_chosen_logps=None,
                          ref_rejected_logps=None) -> tuple[LossTerms, TokenStats | torch.Tensor] | None:
    """The fused route of FastDPOLoss on `backend` ('torch' or 'triton'): (loss terms, the policy's per-token
    TokenStats, or log-probs without with_stats), with the loss carrying the gradients; None when nothing is
    scored or the pair schedule does not fit workspace_bytes: the caller then takes the two-pass path.
    Under autocast the head runs in the autocast dtype, as on the two-pass path (heads.autocast_head).
    A ZeRO-3 head is gathered for the pass and checked here (FastDPOLoss leaves a partition's checks to the
    gathered head); where the schedule does not fit, the two-pass path gathers it again, twice. A vocab-parallel
    head (a VocabShard, or a DTensor head: its local tensors) is checked here as the two-pass path checks it."""
    if head_kind(hidden, weight) == DTENSOR:  # a tensor-parallel DTensor head: its local tensors and a VocabShard
        hidden, weight, targets, bias = local_head(hidden, weight, targets, bias)
    shard = None  # a vocab-parallel head's _Shard
    zero3_params = tuple(p for p in (weight, bias) if p is not None and is_zero3(p))
    with gathered(weight, bias):  # a ZeRO-3 head: once, for the forward that forms dW (nothing for the backward)
        if zero3_params:  # FastDPOLoss leaves a partition's checks to the gathered head
            hidden, weight, targets, bias, _ = checked_local_head(hidden, weight, targets, bias, ignore_index, backend,
                                                                  transform, 0.0, workspace_bytes)
        elif isinstance(weight, VocabShard):  # and a shard's to fastdpo.distributed
            vocab_shard = weight
            hidden, weight, bias, backend, widest = checked_shard(hidden, vocab_shard, targets, bias, ignore_index,
                                                                  transform, backend, 0.0)
            shard = _Shard(vocab_shard, widest)
        else:
            hidden, weight, bias = autocast_head(hidden, weight, bias)
        # The gradients are formed here, by hand; only the loss's own are recorded (LossGradients).
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            result = _fused_pass(config, hidden, weight, bias, targets, mask, ignore_index, transform, with_stats,
                                 workspace_bytes, dict(ref_token_logps=ref_token_logps,
                                                       ref_chosen_logps=ref_chosen_logps,
                                                       ref_rejected_logps=ref_rejected_logps), backend, shard)
        if result is None:
            return None
        terms, policy, (dx, dw, db) = result
        # Applied on the gathered head: autograd checks dW against the [V, H] shape the head has here.
        terms.loss = _AttachGradients.apply(terms.loss, hidden, weight, bias, dx, dw, db, zero3_params)
    return terms, policy


def _stored_logits(backend: str, device: torch.device):
    """The backend's StoredLogits (one interface), the transform it takes and its default workspace bound."""
    if backend == "triton":
        from . import triton_fused  # imports Triton

        return (triton_fused.StoredLogits, lambda transform: transform,
                triton_fused.default_workspace_bytes(device, DEFAULT_WORKSPACE_BYTES))
    return StoredLogits, chunked.Transform, DEFAULT_WORKSPACE_BYTES


@chunked.Workers.serial_caller()  # see there: the loss is evaluated on this thread per group of pairs
def _fused_pass(config, hidden, weight, bias, targets, mask, ignore_index, transform, with_stats, workspace_bytes,
                reference, backend="torch", shard=None):
    """shard: a vocab-parallel head's _Shard, else None."""
    hidden_2d, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = ops.scored_rows(flat_targets, ignore_index)
    if rows.numel() == 0:
        return None  # nothing scored: the two-pass path's forward alone
    x = chunked.Rows(hidden_2d, rows, flat_targets[rows])
    result = _scheduled_pass(config, x, rows, weight, bias, mask, transform, with_stats, workspace_bytes, reference,
                             need_dx=hidden.requires_grad, backend=backend, shard=shard)
    if result is None:
        return None
    merged, _, head = result
    if shard is not None:
        head.sum_dx()
    outputs = ops.token_outputs(merged, rows, targets, _vocab_size(weight, shard), with_stats)
    policy = TokenStats(*outputs[:ops.STAT_FIELDS]) if with_stats else outputs[0]
    terms = preference_loss_from_token_logps(config, policy.logps if with_stats else policy, mask, **reference,
                                             log_sum_sq_probs=policy.log_sum_sq_probs if with_stats else None)
    return terms, policy, _gradients(head, hidden, weight, bias)


@chunked.Workers.serial_caller()  # see there: the loss is evaluated on this thread per group of pairs
def fused_token_pass(config: LossConfig, hidden, weight, bias, targets, mask, transform: LogitTransform, *,
                     with_stats: bool, workspace_bytes: int | None, ref_chosen_logps, ref_rejected_logps,
                     backend: str):
    """The fused pass on `backend` ('torch' or 'triton') for a caller that computes the loss itself (patched
    TRL's loss route).

    hidden [n, H] and targets [n] are the scored tokens of mask [2B, T], in row-major order (TRL's compact
    head call). Without gradients recorded, returns (outputs, predicted, (dX, dW, db)): `outputs` as
    ops.token_outputs gives them over the n tokens (the TokenStats fields, then lse; the two-pass path's
    bits), `predicted` [n] the gradient of fastdpo's loss w.r.t. each token's log-prob, from which dX, dW
    and db were formed (None where not needed). None when nothing is scored or the schedule does not fit
    workspace_bytes."""
    if targets.numel() == 0:
        return None
    positions = mask.reshape(-1).nonzero().squeeze(1)
    x = chunked.Rows(hidden, torch.arange(targets.numel(), device=targets.device), targets)
    reference = dict(ref_token_logps=None, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    result = _scheduled_pass(config, x, positions, weight, bias, mask, transform, with_stats, workspace_bytes,
                             reference, need_dx=hidden.requires_grad, backend=backend)
    if result is None:
        return None
    merged, predicted, head = result
    outputs = ops.token_outputs(merged, x.rows, targets, weight.shape[0], with_stats)
    return outputs, predicted, _gradients(head, hidden, weight, bias)


def _gradients(head: StoredLogits, hidden, weight, bias):
    dx = None if head.dx is None else head.dx.to(hidden.dtype).view(hidden.shape)
    dw = None if head.dw is None else head.dw.to(weight.dtype)
    db = None if head.db is None else head.db.to(bias.dtype)
    return dx, dw, db


class _Shard(NamedTuple):
    """A vocab-parallel head's VocabShard, and the most rows a rank of its group holds (the workspace bound)."""

    head: VocabShard
    widest: int


def _vocab_size(weight, shard: _Shard | None) -> int:
    return weight.shape[0] if shard is None else shard.head.vocab_size


def _scheduled_pass(config, x: chunked.Rows, positions, weight, bias, mask, transform, with_stats, workspace_bytes,
                    reference, *, need_dx: bool, backend: str = "torch", shard=None):
    """The pass over the scored rows x (row r is position positions[r] of mask's [2B, T]): (merged partials,
    each row's loss gradient, the StoredLogits holding dX, dW, db), or None if the schedule does not fit.
    shard: as _fused_pass's; every rank of its group then decides the fit by the widest shard."""
    head_class, head_transform, default_budget = _stored_logits(backend, weight.device)
    extra = {} if shard is None else {"shard": shard.head}
    if shard is not None:
        head_class = shard_stored_logits(backend)
    schedule = pair_schedule(backend, positions, mask.shape[1], mask.shape[0] // 2, head_class.block_rows(x))
    budget = default_budget if workspace_bytes is None else workspace_bytes
    if schedule.slots * head_class.slot_bytes(x, weight.shape[0] if shard is None else shard.widest) > budget:
        return None
    if schedule.order is not None:  # the rows in the schedule's order; the results come back in the caller's
        order = schedule.order
        x, positions = chunked.Rows(x.hidden, x.rows[order], x.targets[order]), positions[order]
        extra["schedule"] = schedule
    head = head_class(x, weight, bias, head_transform(transform), with_stats, schedule.slots, **extra,
                      need_dx=need_dx, need_dw=weight.requires_grad, need_db=bias is not None and bias.requires_grad)
    grads = LossGradients(config, mask, x.dtype, with_stats, **reference)
    row_grads = torch.zeros(len(x), dtype=x.dtype, device=positions.device)
    for step in schedule.steps:
        if step.block is not None:
            partials = head.forward(step.block)
            r0, r1 = head.blocks[step.block]
            stats = token_stats(partials, logsumexp(partials), _vocab_size(weight, shard))
            grads.record(positions[r0:r1], stats.logps, stats.log_sum_sq_probs if with_stats else None)
        if step.ready > step.done:
            token_grads = grads.token_grads()
            for k, a, b in schedule.runs(step.done, step.ready):
                r0 = head.blocks[k][0]
                row_grads[r0 + a: r0 + b] = token_grads.index_select(0, positions[r0 + a: r0 + b])
        # A block's d_logits and GEMMs wait until all its rows have their g, and the backends run the GEMMs of
        # the blocks released together at once, rather than one per group of pairs (each would stream dW).
        for k in step.release:
            r0, r1 = head.blocks[k]
            head.backward_rows(k, 0, r1 - r0, row_grads[r0:r1])
            head.release(k)
    merged = head.merged_partials()
    if schedule.order is None:
        return merged, row_grads, head
    return take(merged, schedule.caller_order), row_grads[schedule.caller_order], head


# --- the frozen-head route ---------------------------------------------------------------------------------------


def _frozen_forward(backend: str, x: chunked.Rows, weight, bias, transform: LogitTransform, with_stats: bool):
    """The frozen route's forward over the scored rows x on `backend` ('torch' or 'triton'): (merged partials,
    U [rows, H] in the accumulation dtype), U_i = dlogp_i/dh_i."""
    if backend == "triton":
        from . import triton_fused  # imports Triton

        return triton_fused.FrozenStoredLogits(x, weight, bias, transform, with_stats).forward_with_u()
    head_transform = chunked.Transform(transform)
    accumulator = FrozenAccumulator(x, weight, bias, head_transform)
    merged = chunked.forward_partials(x, weight, bias, head_transform, with_stats, accumulator)
    return merged, accumulator.finish(merged)


class FrozenHeadLogProbs(torch.autograd.Function):
    """Per-token log-probs whose backward is g ⊙ U, U from the forward (_frozen_forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, transform, with_stats, backend):
        hidden_2d, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        rows = ops.scored_rows(flat_targets, ignore_index)
        if rows.numel() == 0:
            merged, u = ops.no_partials(hidden, with_stats), None
        else:
            merged, u = _frozen_forward(backend, chunked.Rows(hidden_2d, rows, flat_targets[rows]), weight, bias,
                                        transform, with_stats)
        outputs = ops.token_outputs(merged, rows, targets, weight.shape[0], with_stats)
        ctx.rows, ctx.u, ctx.hidden_shape, ctx.hidden_dtype = rows, u, hidden.shape, hidden.dtype
        if not with_stats:
            return outputs[0]
        ctx.mark_non_differentiable(*outputs[1:ops.STAT_FIELDS])
        return tuple(outputs[:ops.STAT_FIELDS])

    @staticmethod
    def backward(ctx, grad_logps, *_unused_stat_grads):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        rows, u = ctx.rows, ctx.u
        dx = torch.zeros(ctx.hidden_shape[:-1].numel(), ctx.hidden_shape[-1], dtype=ctx.hidden_dtype,
                         device=grad_logps.device)
        if u is not None:
            grad = grad_logps.reshape(-1).index_select(0, rows).to(u.dtype)
            dx.index_copy_(0, rows, (u * grad[:, None]).to(dx.dtype))
        return dx.view(ctx.hidden_shape), None, None, None, None, None, None, None


def frozen_linear_logprobs(hidden, weight, targets, bias, ignore_index: int, transform: LogitTransform,
                           with_stats: bool, backend: str):
    """The frozen-head route for checked inputs (already cast under autocast, as fastdpo.ops' are)."""
    with torch.autocast(hidden.device.type, enabled=False):
        out = FrozenHeadLogProbs.apply(hidden, weight, bias, targets, ignore_index, transform, with_stats, backend)
    return TokenStats(*out) if with_stats else out
