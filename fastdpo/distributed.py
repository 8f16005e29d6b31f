"""LM heads split across processes: vocab-parallel shards, DTensor heads and DeepSpeed ZeRO-3 heads.

`linear_logprobs` (and so `FastDPOLoss`) comes here for a head that is not a plain local tensor (fastdpo.heads
tells which): a DTensor head comes back as local tensors or a VocabShard, a VocabShard is computed here, and a
ZeRO-3 head is gathered here around the local computation.


* `VocabShard(weight_shard, vocab_start, vocab_size, group)`: rank r holds rows [start_r, start_r + V_r) of W
  (a tensor-parallel, vocab-parallel head) and the same hidden states and targets as the other ranks of `group`.
  Each rank folds its own columns into the softmax partials of fastdpo.softmax_stats (m_r, s_r, t_r, and the
  statistics' a_r, q_r, u_r, b_r), with t_r the target logit when the target falls in the shard and 0 otherwise.
  One all-gather of the partials, merged in rank order by `softmax_stats.merge` (so every rank gets the same bits):

      m = max_r m_r,   s = sum_r s_r e^{m_r - m},   t = sum_r t_r,   lse = m + log s,   logp = t - lse.

  The backward recomputes the shard's logits with the global lse: dz_v = g (onehot_v - e^{z_v - lse}) on the rank's
  columns only, so dW_r (and db_r) stay local, and dX = sum_r dX_r is all-reduced (the input is replicated).
  Labels are checked against the global vocabulary, and the shards against each other (they must tile [0, V)).
* A DTensor weight with the hidden states a DTensor on the same mesh (tensor parallel, e.g. `ColwiseParallel` on
  lm_head): `Shard(0)` on one mesh dimension runs as a `VocabShard` of that dimension's group, a replicated head
  locally. On a (dp, tp) mesh the head is Replicate() on dp and Shard(0) on tp (what FSDP2 over dp hands out inside
  its unit's forward); the hidden states are replicated on tp and may be split by batch on dp, or are each rank's
  own batch as a replicated DTensor on the tp submesh.
  A DTensor weight with plain-tensor hidden states is what FSDP2 hands out outside the owning module's forward;
  computing there would leave the head's gradient unreduced, so it is refused with the ways to call it.
* A DeepSpeed ZeRO-3 partitioned parameter (`ds_id`): on the two-pass path, gathered for the forward and gathered
  again for the backward (the gradient then goes to the parameter through autograd, where ZeRO-3's hooks reduce and
  partition it). FastDPOLoss's fused route (fastdpo.fused_pass) gathers it once, for the forward that forms dW, and
  hands dW to autograd on a placeholder of the full shape (`full_shape_for_accumulation`): ZeRO-3's hooks need the
  gradient, not the parameter's values. The frozen route (a frozen head) gathers it for the forward alone.

The vocab-parallel head runs each shard through the backend's own head (fastdpo.torch_head or fastdpo.triton_head:
the same forward and backward as a local head, on the shard's rows with shard-local targets). FastDPOLoss's fused
route (fastdpo.fused_pass) keeps the shard's tiles instead (`shard_stored_logits`): the same forward block by block,
each block's partials merged by one all-gather, dW local and dX all-reduced once.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from . import chunked, ops, torch_head
from .backends import resolve_backend
from .heads import VocabShard, autocast_head, is_dtensor, is_zero3
from .softmax_stats import VocabPartials, logsumexp, merge, take
from .torch_fused import StoredLogits, combine_parts
from .transform import LogitTransform
from .types import TokenStats
from .validation import check_logprob_inputs, check_targets_in_range

__all__ = ["VocabShard", "local_head", "vocab_parallel_logprobs", "gathered", "full_shape_for_accumulation",
           "Zero3LogProbs"]


# --------------------------------------------------------------------------------------------------------------------
# DTensor heads
# --------------------------------------------------------------------------------------------------------------------

_FSDP2_HINT = (
    "Under FSDP2 (fully_shard), compute the loss inside the forward of the module that owns lm_head, where FSDP has "
    "gathered the weight into a plain tensor and reduce-scatters its gradient: e.g. return FastDPOLoss's loss from "
    "the model's forward, or from a method registered with torch.distributed.fsdp.register_fsdp_forward_method. "
    "For a tensor-parallel (vocab-parallel) head, pass the hidden states as a replicated DTensor on the head's mesh "
    "(DTensor.from_local(hidden, mesh, [Replicate()])), or pass fastdpo.distributed.VocabShard(weight.to_local(), "
    "vocab_start, vocab_size, group). Never pass weight.full_tensor(): its gradient is not reduced across ranks."
)


def local_head(hidden, weight, targets, bias):
    """(hidden, weight, targets, bias) as local tensors, with a VocabShard for the weight of a Shard(0) head, from a
    tensor-parallel DTensor head on a mesh of any number of dimensions; or a ValueError.

    On each mesh dimension the weight is Replicate() or Shard(0) (on one dimension at most: the tensor-parallel one).
    The hidden states are a DTensor on the head's mesh, replicated where the weight is sharded and, elsewhere (the
    data-parallel dimensions of a (dp, tp) mesh), replicated or split along a batch dimension; or, each rank with its
    own batch, a replicated DTensor on the head's tensor-parallel dimension alone (`mesh["tp"]`).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not is_dtensor(weight):
        raise ValueError(f"hidden is a DTensor but weight is a {type(weight).__name__}; pass both as DTensors on one "
                         "mesh (a tensor-parallel head) or both as local tensors")
    mesh = weight.device_mesh
    if not is_dtensor(hidden):
        raise ValueError(f"weight is a DTensor {weight.placements} but hidden is a plain tensor, which is how FSDP2 "
                         f"hands out its sharded parameters outside the owning module's forward. {_FSDP2_HINT}")
    vocab_dims = _vocab_dims(weight)
    on_submesh = hidden.device_mesh != mesh
    if on_submesh and not _is_vocab_submesh(hidden.device_mesh, mesh, vocab_dims):
        raise ValueError(f"a DTensor head needs hidden on the head's mesh or on its tensor-parallel (vocabulary) "
                         f"dimension, got weight on {mesh} {weight.placements} and hidden on {hidden.device_mesh}")
    for dim, placement in enumerate(hidden.placements):
        batch_split = isinstance(placement, Shard) and placement.dim < hidden.ndim - 1
        if not (placement == Replicate() or (batch_split and not on_submesh and dim not in vocab_dims)):
            raise ValueError(f"hidden must be replicated over the head's vocabulary dimension and replicated or split "
                             f"along a batch dimension over the others, got {hidden.placements} with weight "
                             f"{weight.placements}")

    def local(name, t, placements):
        if t is None or not isinstance(t, DTensor):
            return t
        if tuple(t.placements) != tuple(placements):
            raise ValueError(f"{name} must have placements {tuple(placements)}, got {t.placements}")
        return t.to_local()

    local_targets, local_bias = local("targets", targets, hidden.placements), local("bias", bias, weight.placements)
    if not vocab_dims:
        return hidden.to_local(), weight.to_local(), local_targets, local_bias
    shard = VocabShard(weight.to_local(), _shard_start(weight), weight.shape[0], mesh.get_group(vocab_dims[0]))
    return hidden.to_local(), shard, local_targets, local_bias


def _is_vocab_submesh(submesh, mesh, vocab_dims) -> bool:
    """Whether `submesh` is this rank's 1-D slice of `mesh` along the head's vocabulary dimension."""
    if submesh.ndim != 1 or len(vocab_dims) != 1:
        return False
    return dist.get_process_group_ranks(mesh.get_group(vocab_dims[0])) == submesh.mesh.tolist()


def _vocab_dims(weight) -> list[int]:
    """The mesh dimensions that split the head's vocabulary (none or one); a ValueError for any other layout."""
    from torch.distributed.tensor import Replicate, Shard

    if not all(p in (Replicate(), Shard(0)) for p in weight.placements):
        raise ValueError(f"a DTensor head must be sharded on the vocabulary dimension (Shard(0)) or replicated on "
                         f"each mesh dimension, got {weight.placements}")
    dims = [dim for dim, p in enumerate(weight.placements) if p == Shard(0)]
    if len(dims) > 1:
        raise ValueError(f"a DTensor head may split its vocabulary over one mesh dimension (the tensor-parallel one), "
                         f"got {weight.placements}: a head sharded again over a data-parallel dimension is FSDP2's "
                         f"sharded parameter outside its unit's forward. {_FSDP2_HINT}")
    return dims


def _shard_start(weight) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return int(offset[0])


# --------------------------------------------------------------------------------------------------------------------
# Vocab-parallel heads
# --------------------------------------------------------------------------------------------------------------------


def vocab_parallel_logprobs(hidden, shard: VocabShard, targets, bias, ignore_index, transform: LogitTransform, *,
                            with_stats: bool, backend: str | None, grad_tolerance: float,
                            workspace_bytes: int | None = None):
    """fastdpo.linear_logprobs for a vocab-parallel head (same outputs), on the PyTorch or the Triton head."""
    hidden, weight, bias, backend, _ = checked_shard(hidden, shard, targets, bias, ignore_index, transform, backend,
                                                     grad_tolerance)
    with torch.autocast(hidden.device.type, enabled=False):
        out = VocabParallelLogProbs.apply(hidden, weight, bias, targets, shard, ignore_index, transform, with_stats,
                                          SHARD_HEADS[backend], workspace_bytes)
    return TokenStats(*out) if with_stats else out


def checked_shard(hidden, shard: VocabShard, targets, bias, ignore_index, transform: LogitTransform,
                  backend: str | None, grad_tolerance: float):
    """(hidden, the shard's weight, bias) in the autocast dtype, the resolved backend, and the most rows any rank of
    the group holds (what every rank sizes a shared decision by); a ValueError for a bad head (see _check_shard)."""
    hidden, weight, bias = autocast_head(hidden, shard.weight, bias)
    backend = _shard_backend(backend, hidden)
    widest = _check_shard(hidden, shard, weight, targets, bias, ignore_index, transform, grad_tolerance, backend)
    return hidden, weight, bias, backend, widest


def _shard_backend(backend: str | None, hidden) -> str:
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    name = resolve_backend(backend, device)
    if name not in SHARD_HEADS:
        raise ValueError(f"a vocab-parallel head runs on backend='torch' or 'triton', got backend={backend!r}")
    return name


def _check_shard(hidden, shard, weight, targets, bias, ignore_index, transform, grad_tolerance, backend):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"VocabShard.weight must be a non-empty [rows, hidden] tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not 0 <= shard.vocab_start <= shard.vocab_start + weight.shape[0] <= shard.vocab_size:
        raise ValueError(f"VocabShard rows [{shard.vocab_start}, {shard.vocab_start + weight.shape[0]}) must lie in "
                         f"[0, vocab_size={shard.vocab_size})")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("a vocab-parallel head needs torch.distributed to be initialized (init_process_group)")
    # Everything but the label range against the shard (labels are global), then the labels against the vocabulary.
    local_probe = torch.full_like(targets, ignore_index) if isinstance(targets, torch.Tensor) else targets
    check_logprob_inputs(hidden, weight, local_probe, bias, ignore_index, backend, transform=transform,
                         grad_tolerance=grad_tolerance)
    check_targets_in_range(targets, shard.vocab_size, ignore_index)
    return _check_shards_agree(shard, weight.shape[0], hidden, targets)


def _check_shards_agree(shard: VocabShard, rows: int, hidden, targets) -> int:
    """One small all-gather: the shards must tile [0, V) in rank order, over the same targets everywhere. Returns the
    most rows a shard holds.

    A gap, an overlap or different labels on different ranks would otherwise give a finite, wrong loss.
    """
    flat = targets.reshape(-1).long()
    fingerprint = torch.stack([
        torch.tensor(shard.vocab_start), torch.tensor(rows), torch.tensor(shard.vocab_size),
        torch.tensor(hidden.numel()), torch.tensor(flat.numel()), flat.sum().cpu(),
        (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum().cpu(),
    ]).to(device=_collective_device(shard.group, hidden.device), dtype=torch.int64)
    everyone = _all_gather(fingerprint, shard.group).cpu()
    starts, sizes = everyone[:, 0], everyone[:, 1]
    ends = starts + sizes
    tiled = bool(starts[0] == 0) and bool((starts[1:] == ends[:-1]).all()) and int(ends[-1]) == shard.vocab_size
    if not tiled or not bool((everyone[:, 2] == shard.vocab_size).all()):
        spans = [(int(a), int(b)) for a, b in zip(starts, ends)]
        raise ValueError(f"VocabShard rows per rank {spans} with vocab_size {everyone[:, 2].tolist()} must tile "
                         f"[0, vocab_size) in rank order without gaps or overlaps")
    if not bool((everyone[:, 3:] == everyone[0, 3:]).all()):
        raise ValueError("a vocab-parallel head needs the same hidden states and targets on every rank of its group; "
                         "the targets differ between ranks")
    return int(sizes.max())


def _collective_device(group, fallback: torch.device) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cpu") if backend == "gloo" else fallback


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


_NO_PLAN = torch.empty(0)  # the backward plan of an exact backward: a shard holds no plan for the global budget (yet)


class VocabParallelLogProbs(torch.autograd.Function):
    """Per-token log-probs of a vocab-parallel head: the shard head's partials of the local columns, one all-gather,
    local dW, all-reduced dX. `head` is TorchShardHead or TritonShardHead."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, shard: VocabShard, ignore_index: int, transform: LogitTransform,
                with_stats: bool, head, workspace_bytes):
        hidden_2d, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        rows = ops.scored_rows(flat_targets, ignore_index)
        local_targets = flat_targets[rows] - shard.vocab_start  # outside [0, shard rows) for the other shards' labels
        in_shard = (local_targets >= 0) & (local_targets < weight.shape[0])
        if rows.numel() == 0:  # every position ignored, on every rank (the targets are the same)
            merged = ops.no_partials(hidden, with_stats)
        else:
            local = head.forward(hidden_2d, weight, bias, rows, local_targets, in_shard, transform, with_stats)
            merged = merge(gather_partials(local, shard.group))
        *stats, lse = ops.token_outputs(merged, rows, targets, shard.vocab_size, with_stats)

        ctx.save_for_backward(hidden_2d, weight, bias, rows, local_targets, in_shard,
                              lse.reshape(-1).index_select(0, rows))
        ctx.hidden_shape, ctx.group, ctx.transform = hidden.shape, shard.group, transform
        ctx.head, ctx.workspace_bytes = head, workspace_bytes
        if not with_stats:
            return stats[0]
        ctx.mark_non_differentiable(*stats[1:])
        return tuple(stats)

    @staticmethod
    def backward(ctx, grad_logps, *_unused_stat_grads):
        hidden_2d, weight, bias, rows, local_targets, in_shard, lse = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        # dX is summed over ranks: every rank computes it (zeros where it has no rows) to join the all-reduce.
        if rows.numel() == 0:
            dx, dw, db = torch_head.zero_gradients(hidden_2d, weight, lse.dtype, *need)
        else:
            grad_rows = grad_logps.reshape(-1).index_select(0, rows).to(lse.dtype).contiguous()
            dx, dw, db = ctx.head.backward(hidden_2d, weight, bias, rows, local_targets, in_shard, lse, grad_rows,
                                           ctx.transform, need, ctx.workspace_bytes)
            if dx is not None:
                dist.all_reduce(dx, group=ctx.group)
        return (
            None if dx is None else dx.to(hidden_2d.dtype).view(ctx.hidden_shape),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None, None, None, None, None, None, None,  # targets, shard, ignore_index, transform, with_stats, head, ws
        )


class TorchShardHead:
    """fastdpo.torch_head on a shard. It indexes W by target: rows whose target lies in another shard borrow a shard
    row (clamped), whose target logit and one-hot gradient are taken back out."""

    @staticmethod
    def forward(hidden_2d, weight, bias, rows, local_targets, in_shard, transform, with_stats) -> VocabPartials:
        clamped = local_targets.clamp(0, weight.shape[0] - 1)
        local = torch_head.forward(hidden_2d, weight, bias, rows, clamped, transform, with_stats=with_stats,
                                   grad_tolerance=0.0, backward_plan=_NO_PLAN)
        return _own_target_only(local, in_shard, local_targets, weight.shape[0])

    @staticmethod
    def backward(hidden_2d, weight, bias, rows, local_targets, in_shard, lse, grad_rows, transform, need,
                 workspace_bytes):
        """(dX [N, H], dW, db) in the accumulation dtype, None where not needed."""
        clamped = local_targets.clamp(0, weight.shape[0] - 1)
        dx, dw, db = torch_head.backward(hidden_2d, weight, bias, rows, clamped, lse, grad_rows, transform,
                                         need_dx=need[0], need_dw=need[1], need_db=need[2], grad_tolerance=0.0,
                                         backward_plan=_NO_PLAN, workspace_bytes=None)
        _remove_borrowed_onehot(hidden_2d, weight, bias, rows, clamped, grad_rows, ~in_shard,
                                chunked.Transform(transform), dx, dw, db)
        return dx, dw, db


class TritonShardHead:
    """fastdpo.triton_head on a shard: the kernels take the shard-local targets as they are. A target outside the
    shard's columns matches none of them, so it adds no target logit (t_r = 0) and no one-hot to the backward, and
    the statistics' max before the target covers none or all of the shard's columns, as it should."""

    @staticmethod
    def forward(hidden_2d, weight, bias, rows, local_targets, in_shard, transform, with_stats) -> VocabPartials:
        from . import triton_head

        local = triton_head.forward(hidden_2d, weight, bias, rows, local_targets, transform, with_stats=with_stats,
                                    grad_tolerance=0.0, backward_plan=_NO_PLAN)
        # The kernel writes the target logit only where the target is in the shard; elsewhere it is never written.
        return local._replace(target_logit=torch.where(in_shard, local.target_logit, 0.0))

    @staticmethod
    def backward(hidden_2d, weight, bias, rows, local_targets, in_shard, lse, grad_rows, transform, need,
                 workspace_bytes):
        """(dX [N, H] fp32, dW, db), None where not needed: dX stays fp32 until it is summed over the ranks."""
        from . import triton_head

        dx_rows, dw, db = triton_head.scored_rows_backward(
            triton_head.row_major(hidden_2d), triton_head.row_major(weight), bias, rows, local_targets, lse,
            grad_rows, transform, need_dx=need[0], need_dw=need[1], need_db=need[2], workspace_bytes=workspace_bytes)
        if dx_rows is None:
            return None, dw, db
        dx = torch.zeros(hidden_2d.shape, dtype=dx_rows.dtype, device=dx_rows.device)
        return dx.index_copy_(0, rows, dx_rows), dw, db


SHARD_HEADS = {"torch": TorchShardHead, "triton": TritonShardHead}


def _own_target_only(local: VocabPartials, in_shard, local_targets, shard_rows: int) -> VocabPartials:
    """The shard's partials with the borrowed (clamped) targets of out-of-shard rows taken back out."""
    parts = local._replace(target_logit=torch.where(in_shard, local.target_logit, 0.0))
    if parts.with_stats:
        # Rows whose target lies beyond the shard have every shard column before their target.
        beyond = local_targets >= shard_rows
        parts = parts._replace(max_before_target=torch.where(beyond, local.max, local.max_before_target))
    return parts


def gather_partials(local: VocabPartials, group) -> VocabPartials:
    """Every rank's partials of the same rows, stacked in rank order ([ranks, rows] each): one all-gather."""
    fields = [f for f in local if f is not None]
    stacked = torch.stack(fields)  # [fields, rows]
    device = _collective_device(group, stacked.device)
    gathered = _all_gather(stacked.to(device), group).to(stacked.device)  # [ranks, fields, rows]
    return VocabPartials(*gathered.unbind(1))


def _remove_borrowed_onehot(hidden_2d, weight, bias, rows, targets, grad, borrowed, torch_transform: chunked.Transform,
                            dx, dw, db) -> None:
    """Subtract g * d z_y'/d(x, W, b) of the rows that borrowed a shard row y' as their target."""
    index = borrowed.nonzero().squeeze(1)
    if index.numel() == 0:
        return
    hidden_rows, borrowed_targets = rows[index], targets[index]
    xs = hidden_2d.index_select(0, hidden_rows).to(grad.dtype)
    ws = weight.index_select(0, borrowed_targets).to(grad.dtype)
    raw = (xs * ws).sum(1)
    if bias is not None:
        raw = raw + bias.index_select(0, borrowed_targets).to(grad.dtype)
    z = torch_transform(raw)
    d_raw = torch_transform.scale_gradient_(grad[index].clone(), z)
    if dx is not None:
        dx.index_add_(0, hidden_rows, ws * d_raw[:, None], alpha=-1)
    if dw is not None:
        dw.index_add_(0, borrowed_targets, xs * d_raw[:, None], alpha=-1)
    if db is not None:
        db.index_add_(0, borrowed_targets, d_raw, alpha=-1)


class _ShardBlocks:
    """What the fused pass on a shard adds to a backend's StoredLogits (fastdpo.torch_fused, fastdpo.triton_fused):
    the shard-local targets, each token block's partials merged over the ranks, and dX summed over them."""

    # The rows' order, where the backend's schedule reorders them (triton_fused.StoredLogits sets both): x's rows as
    # indices into the caller's, and its inverse.
    order = caller_order = None

    def _shard_rows(self, x: chunked.Rows, weight, shard: VocabShard, *, clamp: bool) -> chunked.Rows:
        """x with shard-local targets: clamped into the shard (borrowed rows) or as they are (matching no column)."""
        self.local_targets, self.group, self.gathered = x.targets - shard.vocab_start, shard.group, {}
        self.in_shard = (self.local_targets >= 0) & (self.local_targets < weight.shape[0])
        targets = self.local_targets.clamp(0, weight.shape[0] - 1) if clamp else self.local_targets
        return chunked.Rows(x.hidden, x.rows, targets)

    def _merge_block(self, k: int, local: VocabPartials):
        """Block k's partials (own target logits only) merged over the ranks by one all-gather, in rank order as
        VocabParallelLogProbs merges: (merged, lse, sum_{r != me} s_r e^{m_r - lse})."""
        everyone = self.gathered[k] = gather_partials(local, self.group)
        merged = merge(everyone)
        lse = logsumexp(merged)
        me = torch.tensor([dist.get_rank(self.group)], device=lse.device)
        others = (everyone.sum_exp * torch.exp(everyone.max - lse)).index_fill_(0, me, 0).sum(0)
        return merged, lse, others

    def merged_partials(self) -> VocabPartials:
        """The blocks' gathered [ranks, rows] partials merged at once, as the two-pass route merges its one
        all-gather: in the caller's row order where the backend's schedule reordered the rows (the ranks' merge is
        a torch reduction, which may round a row by its place among the others), then back in x's order."""
        self.complete()  # the backend's queued backward, before dX is summed over the ranks
        everyone = VocabPartials(*(None if parts[0] is None else torch.cat(parts, dim=-1)
                                   for parts in zip(*(self.gathered[k] for k in range(len(self.blocks))))))
        if self.order is None:
            return merge(everyone)
        return take(merge(take(everyone, self.caller_order)), self.order)

    def sum_dx(self) -> None:
        """dX summed over the ranks (the input is replicated): the pass's one all-reduce."""
        if self.dx is not None:
            dist.all_reduce(self.dx, group=self.group)


class ShardStoredLogits(_ShardBlocks, StoredLogits):
    """The fused pass's workspace on a vocab-parallel shard, PyTorch path (fastdpo.fused_pass's trainable route).

    `x` holds the global targets. Each token block runs TorchShardHead's forward (the same tiles: a row whose target
    lies in another shard borrows a shard row, clamped), its tiles kept in a slot, and the block's partials are
    merged over the ranks by one all-gather, as VocabParallelLogProbs merges the whole forward's: the same bits.

    The tiles stay relative to the shard's own shift (the own or borrowed target logit t' on the shifted path, the
    shard's running maximum online). StoredLogits.backward_rows normalises them by partials[k] and sets each row's
    stored target entry to g * target_gap[k]; after the merge both describe the whole vocabulary (lse: the global one):
        partials[k]      shifted: sum_exp = e^{lse - t'} (p = e / sum_exp), online: max = lse, sum_exp = 1
        target_gap[k]    own target:  1 - p_y = excl e^{shift - lse} + sum_{r != me} s_r e^{m_r - lse}, excl the
                                      shard's target-free sum: the gathered partials hold the other shards' sums
                         borrowed:    -p_{y'} = -e^{t' - lse} (an ordinary column of this shard: no one-hot)
    Rows that the shifted forward hands to the online one are recomputed with the global lse (their borrowed
    one-hot taken back out). dX is this shard's share; sum_dx() all-reduces it, once per pass.
    """

    def __init__(self, x: chunked.Rows, weight, bias, transform: chunked.Transform, with_stats: bool, n_slots: int, *,
                 shard: VocabShard, need_dx: bool, need_dw: bool, need_db: bool):
        super().__init__(self._shard_rows(x, weight, shard, clamp=True), weight, bias, transform, with_stats, n_slots,
                         need_dx=need_dx, need_dw=need_dw, need_db=need_db)

    def forward(self, k: int) -> VocabPartials:
        """Block k's partials merged over the ranks (one all-gather), the shard's tiles kept."""
        local = super().forward(k)
        r0, r1 = self.blocks[k]
        in_shard = self.in_shard[r0:r1]
        own = _own_target_only(local, in_shard, self.local_targets[r0:r1], self.weight.shape[0])
        merged, lse, others = self._merge_block(k, own)
        excl, row_max, _ = combine_parts(self.buffers.parts)
        shift = local.max if self.shifted else row_max
        gap = excl * torch.exp(shift - lse) + others
        self.target_gap[k] = torch.where(in_shard, gap, -torch.exp(local.target_logit - lse))
        # The rows that the parent recomputes (self.rerun) read logsumexp(partials[k]): exactly lse for them.
        recomputed = self.rerun[k] if self.shifted else torch.ones_like(in_shard)
        self.partials[k] = local._replace(max=torch.where(recomputed, lse, local.max),
                                          sum_exp=torch.where(recomputed, 1.0, torch.exp(lse - local.max)))
        return merged

    def _rows_recomputed(self, k: int, a: int, which: torch.Tensor, grad: torch.Tensor) -> None:
        index = which + self.blocks[k][0] + a
        rows = self.x.subset(index)
        _remove_borrowed_onehot(self.x.hidden, self.weight, self.bias, rows.rows, rows.targets, grad[which],
                                ~self.in_shard[index], self.transform, self.dx, self.dw, self.db)


@functools.cache
def shard_stored_logits(backend: str):
    """The fused pass's StoredLogits on a shard for `backend` ('torch' or 'triton'; the latter imports Triton)."""
    if backend == "torch":
        return ShardStoredLogits
    from . import triton_fused

    class TritonShardStoredLogits(_ShardBlocks, triton_fused.StoredLogits):
        """The Triton backend's counterpart of ShardStoredLogits: the forward kernel (TritonShardHead's) takes the
        shard-local targets as they are, so a target in another shard matches no stored column (no target logit, no
        target-free exclusion, no one-hot). The stored z are absolute, so only lse and 1 - p_y change after the merge:
        partials[k] becomes (max = lse, sum_exp = 1), and gap[k] (this shard's target-free mass relative to the local
        lse) is rescaled to the global one and gets the other shards' sums added."""

        def __init__(self, x: chunked.Rows, weight, bias, transform: LogitTransform, with_stats: bool, n_slots: int,
                     *, shard: VocabShard, need_dx: bool, need_dw: bool, need_db: bool, schedule):
            super().__init__(self._shard_rows(x, weight, shard, clamp=False), weight, bias, transform, with_stats,
                             n_slots, need_dx=need_dx, need_dw=need_dw, need_db=need_db, schedule=schedule)

        @staticmethod
        def dx_dtype(hidden: torch.Tensor) -> torch.dtype:
            """fp32: each rank's dX is a partial sum, rounded once after the all-reduce (sum_dx)."""
            return torch.float32

        def forward(self, k: int) -> VocabPartials:
            local = super().forward(k)
            r0, r1 = self.blocks[k]
            in_shard = self.in_shard[r0:r1]
            # The kernel writes the target logit only where the target is in the shard (TritonShardHead.forward).
            own = local._replace(target_logit=torch.where(in_shard, local.target_logit, 0.0))
            merged, lse, others = self._merge_block(k, own)
            self.gap[k] = self.gap[k] * torch.exp(logsumexp(local) - lse) + others
            self.partials[k] = VocabPartials(lse, torch.ones_like(lse), own.target_logit)
            return merged

    return TritonShardStoredLogits


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 heads
# --------------------------------------------------------------------------------------------------------------------


def gathered(*params):
    """Gather the ZeRO-3 partitioned parameters among `params` for the duration of the block (no-op otherwise).

    Parameters already gathered (inside their module's forward, or by TRL around its fused head) are left alone:
    partitioning them on exit would pull them from under their owner.
    """
    pending = {id(p): p for p in params if p is not None and is_zero3(p) and not _is_available(p)}
    if not pending:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(pending.values()))


def full_shape_for_accumulation(*params) -> None:
    """Called from a backward function that returns full [V, H] gradients of ZeRO-3 partitioned parameters it did
    not gather: give each such parameter a full-shape placeholder until the backward pass is done.

    ZeRO-3 takes a partitioned parameter's gradient as autograd accumulates it into `param.grad` at full size, and
    its post-accumulate-grad hook reduce-scatters that and frees it; the values of the parameter play no part.
    Autograd's accumulation, though, lays the gradient out after the parameter's own tensor, and a partitioned
    parameter's tensor is empty (its values live in `ds_tensor`), which fails. The placeholder is one zero broadcast
    to the full shape (a stride-0 view: no memory, no communication); the parameter gets its empty tensor back once
    the backward pass is done.
    """
    for param in params:
        if param is None or not is_zero3(param) or _is_available(param):
            continue
        partition, placeholder = param.data, torch.zeros((), dtype=param.dtype, device=param.device)
        param.data = placeholder.expand(param.ds_shape)
        torch.autograd.Variable._execution_engine.queue_callback(lambda p=param, old=partition, new=placeholder:
                                                                 _restore_partition(p, old, new))


def _restore_partition(param, partition, placeholder) -> None:
    # Unless ZeRO-3 gathered the parameter meanwhile (a tied weight's other use): its data is then its own.
    if param.data.data_ptr() == placeholder.data_ptr() and param.data.stride() == (0,) * param.data.dim():
        param.data = partition


def _is_available(param) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


class Zero3LogProbs(ops.LinearLogProbs):
    """LinearLogProbs whose backward gathers the ZeRO-3 head again (the forward's gather is released on return).

    The gather outlives the backward function: autograd accumulates the returned gradient into the parameter after
    it returns, and ZeRO-3's gradient hook then reduces and partitions it, both on the full-size parameter. The
    parameters are partitioned again once the whole backward pass is done. Inside the model's forward ZeRO-3
    fetches the head itself for the backward, and nothing is gathered here.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, *args):
        ctx.zero3_params = (weight, bias)
        return ops.LinearLogProbs.forward(ctx, hidden, weight, bias, *args)

    @staticmethod
    def backward(ctx, *grads):
        gather = gathered(*ctx.zero3_params)
        gather.__enter__()
        try:
            return ops.LinearLogProbs.backward(ctx, *grads)
        finally:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: gather.__exit__(None, None, None))
