"""One rank of the multi-process checks in test_distributed.py (run by torchrun, 2 ranks over gloo on CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py SUITE OUT_DIR

Each check compares against the single-process float64 oracle (fastdpo.reference), computed on every rank from the
same seeded inputs, and records its relative errors (or the error message it expected) in OUT_DIR/rank<r>.json;
the tests assert on those. One launch runs a whole suite so the imports are paid once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
# The checkout under test, not whichever fastdpo is installed (torchrun puts the worker's folder first, not the root).
sys.path.insert(1, str(Path(__file__).parent.parent))

from helpers import relative_error  # noqa: E402

RESULTS: dict[str, dict] = {}


def check(fn):
    """Run one named check; record its return value, or the exception it raised."""
    try:
        RESULTS[fn.__name__] = fn() or {}
    except Exception as exc:  # recorded, and shown by the test
        RESULTS[fn.__name__] = {"exception": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return fn


def rank() -> int:
    return dist.get_rank()


@contextlib.contextmanager
def counting_fused_passes():
    """{"completed": n, "frozen": m}: how many fused passes (fastdpo.fused_pass) ran to the end inside the block, and
    how many calls took the frozen-head route."""
    from fastdpo import fused_pass

    counts, original, frozen = {"completed": 0, "frozen": 0}, fused_pass._fused_pass, fused_pass.frozen_linear_logprobs

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        counts["completed"] += result is not None
        return result

    def frozen_spy(*args, **kwargs):
        counts["frozen"] += 1
        return frozen(*args, **kwargs)

    fused_pass._fused_pass, fused_pass.frozen_linear_logprobs = spy, frozen_spy
    try:
        yield counts
    finally:
        fused_pass._fused_pass, fused_pass.frozen_linear_logprobs = original, frozen


def shard_rows(vocab: int):
    """torch.chunk's split, as DTensor's Shard(0) uses: this rank's [start, end)."""
    chunk = -(-vocab // dist.get_world_size())
    start = min(rank() * chunk, vocab)
    return start, min(start + chunk, vocab)


def expect_value_error(fn, *needles):
    try:
        fn()
    except ValueError as exc:
        message = str(exc)
        return {"raised": True, "matches": all(n in message for n in needles), "message": message}
    return {"raised": False}


# --------------------------------------------------------------------------------------------------------------------
# Heads: vocab-parallel, DTensor, DDP and FSDP2 patterns
# --------------------------------------------------------------------------------------------------------------------


def head_inputs(dtype, *, vocab=301, hidden=31, shape=(3, 7), with_bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.7
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.3 if with_bias else None
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < 0.3] = -100
    targets[1] = -100  # a fully masked row
    targets[0, 0], targets[0, 1] = 0, vocab - 1  # both ends of the vocabulary
    targets[2, 2] = int((h[2, 2] @ w.T).argmax())  # at least one top-1 hit
    # A tie for the top logit between the last row of the first shard and a later one: only the first of the tied
    # columns counts as top-1
    first = -(-vocab // 2) - 1
    w[vocab - 2] = w[first]
    h[2, 4], h[2, 5] = 3 * w[first], 3 * w[first]
    targets[2, 4], targets[2, 5] = vocab - 2, first
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(h), cast(w), cast(b), targets, grad_out


def oracle(h, w, b, targets, grad_out, **transform):
    leaves = [t.detach().double().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    from fastdpo import reference

    stats = reference.token_stats(leaves[0], leaves[1], targets, leaves[2] if b is not None else None, **transform)
    (stats.logps * grad_out).sum().backward()
    return stats, [t.grad for t in leaves]


def shard_errors(out, grad_out, expected, expected_grads, leaves, start, end) -> dict:
    """Backpropagate `out` (log-probs or TokenStats) against grad_out; its errors and those of the gradients of the
    leaves (hidden, the shard's rows, their bias or None) against the oracle's."""
    with_stats = not isinstance(out, torch.Tensor)
    logps = out.logps if with_stats else out
    (logps * grad_out.to(logps.dtype)).sum().backward()
    hidden, shard, bias = leaves
    errors = {"logps": relative_error(logps, expected.logps), "d_hidden": relative_error(hidden.grad,
                                                                                        expected_grads[0]),
              "d_weight_shard": relative_error(shard.grad, expected_grads[1][start:end])}
    if bias is not None:
        errors["d_bias_shard"] = relative_error(bias.grad, expected_grads[2][start:end])
    if with_stats:
        for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
            errors[name] = relative_error(getattr(out, name), getattr(expected, name))
    return errors


def compare_vocab_parallel(dtype, with_bias, with_stats, transform, use_dtensor=False, backend="torch"):
    import fastdpo

    h, w, b, targets, grad_out = head_inputs(dtype, with_bias=with_bias)
    expected, expected_grads = oracle(h, w, b, targets, grad_out, **transform)
    start, end = shard_rows(w.shape[0])
    hidden = h.clone().requires_grad_()
    shard = w[start:end].clone().requires_grad_()
    bias = b[start:end].clone().requires_grad_() if with_bias else None
    if use_dtensor:
        from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        head = DTensor.from_local(shard, mesh, [Shard(0)], shape=w.shape, stride=w.stride())
        head_bias = None if bias is None else DTensor.from_local(bias, mesh, [Shard(0)], shape=b.shape,
                                                                 stride=b.stride())
        hidden_in = DTensor.from_local(hidden, mesh, [Replicate()])
    else:
        head, head_bias, hidden_in = fastdpo.distributed.VocabShard(shard, start, w.shape[0]), bias, hidden
    out = fastdpo.linear_logprobs(hidden_in, head, targets, head_bias, with_stats=with_stats, backend=backend,
                                  **transform)
    errors = shard_errors(out, grad_out, expected, expected_grads, (hidden, shard, bias), start, end)
    if with_stats:
        errors["is_top1_mismatches"] = int((out.is_top1 != expected.is_top1).sum())
        errors["is_top1_hits"] = int(expected.is_top1.sum())
    return errors


def compare_dpo_loss_vocab_parallel(dtype, backend):
    """FastDPOLoss on a VocabShard (the reference through the same head) against the float64 oracle, and the fused
    passes it ran (a vocab-parallel head takes the two-pass route: fastdpo.fused_pass)."""
    import fastdpo
    from fastdpo.distributed import VocabShard

    h, w, _, _, _ = head_inputs(dtype, shape=(4, 9))
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, w.shape[0], (4, 9), generator=gen)
    labels[:, :3] = -100
    ref_h = h + 0.1 * torch.randn(h.shape, generator=gen, dtype=h.dtype)
    leaf_h, leaf_w = h.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    expected = fastdpo.reference.dpo_loss(leaf_h, leaf_w, labels, ref_hidden_states=ref_h.double(), beta=0.2)
    expected.loss.backward()
    start, end = shard_rows(w.shape[0])
    hidden, shard = h.clone().requires_grad_(), w[start:end].clone().requires_grad_()
    with counting_fused_passes() as passes:
        out = fastdpo.FastDPOLoss(beta=0.2, backend=backend)(hidden, VocabShard(shard, start, w.shape[0]), labels,
                                                               ref_hidden_states=ref_h)
        out.loss.backward()
    return {"fused_passes": passes["completed"], "loss": relative_error(out.loss, expected.loss), "d_hidden": relative_error(hidden.grad, leaf_h.grad),
            "d_weight_shard": relative_error(shard.grad, leaf_w.grad[start:end]),
            "rewards": relative_error(out.chosen_rewards, expected.chosen_rewards)}


def heads_suite():
    import fastdpo
    from fastdpo.distributed import VocabShard

    no_transform = dict()
    curved = dict(softcap=4.0, temperature=0.7, logit_scale=1.3)

    @check
    def vocab_parallel_fp64_stats():
        return compare_vocab_parallel(torch.float64, False, True, no_transform)

    @check
    def vocab_parallel_fp64_bias_softcap_stats():
        return compare_vocab_parallel(torch.float64, True, True, curved)

    @check
    def vocab_parallel_fp32_linear():  # the fast path of fastdpo.chunked (shifted forward, factored backward)
        return compare_vocab_parallel(torch.float32, False, False, no_transform)

    @check
    def vocab_parallel_fp32_bias_softcap():
        return compare_vocab_parallel(torch.float32, True, False, curved)

    @check
    def dtensor_shard0_fp64_stats():
        return compare_vocab_parallel(torch.float64, False, True, no_transform, use_dtensor=True)

    @check
    def dtensor_shard0_fp32_bias():
        return compare_vocab_parallel(torch.float32, True, False, curved, use_dtensor=True)

    @check
    def dpo_loss_vocab_parallel():
        return compare_dpo_loss_vocab_parallel(torch.float64, "torch")

    @check
    def labels_checked_against_global_vocab():
        h, w, _, targets, _ = head_inputs(torch.float32)
        start, end = shard_rows(w.shape[0])
        bad = targets.clone()
        bad[0, 3] = w.shape[0]
        head = VocabShard(w[start:end], start, w.shape[0])
        ok = fastdpo.linear_logprobs(h, head, targets)  # in-range labels of the other shard are fine
        result = expect_value_error(lambda: fastdpo.linear_logprobs(h, head, bad), "targets", str(w.shape[0]))
        return {**result, "finite": bool(torch.isfinite(ok).all())}

    @check
    def shards_that_do_not_tile_the_vocab():
        h, w, _, targets, _ = head_inputs(torch.float32)
        start, end = shard_rows(w.shape[0])
        head = VocabShard(w[start:end - 1], start, w.shape[0])  # a gap after every shard
        return expect_value_error(lambda: fastdpo.linear_logprobs(h, head, targets), "tile")

    @check
    def different_targets_on_ranks():
        h, w, _, targets, _ = head_inputs(torch.float32)
        start, end = shard_rows(w.shape[0])
        mine = targets.clone()
        mine[0, 0] = rank()
        head = VocabShard(w[start:end], start, w.shape[0])
        return expect_value_error(lambda: fastdpo.linear_logprobs(h, head, mine), "same hidden states and targets")

    @check
    def reference_backend_refused():
        h, w, _, targets, _ = head_inputs(torch.float32)
        start, end = shard_rows(w.shape[0])
        head = VocabShard(w[start:end], start, w.shape[0])
        return expect_value_error(lambda: fastdpo.linear_logprobs(h, head, targets, backend="reference"),
                                  "backend='torch' or 'triton'")

    triton_checks()

    @check
    def fsdp2_style_dtensor_with_plain_hidden_refused():
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        h, w, _, targets, _ = head_inputs(torch.float32)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        weight = distribute_tensor(w, mesh, [Shard(0)])
        labels = torch.where(targets[:2] == -100, 0, targets[:2])
        return {
            "logprobs": expect_value_error(lambda: fastdpo.linear_logprobs(h, weight, targets), "FSDP2",
                                           "register_fsdp_forward_method"),
            "loss": expect_value_error(lambda: fastdpo.FastDPOLoss(reference_free=True)(h[:2], weight, labels),
                                       "FSDP2"),
        }

    @check
    def dtensor_replicated_head():
        from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

        h, w, _, targets, grad_out = head_inputs(torch.float64)
        expected, expected_grads = oracle(h, w, None, targets, grad_out)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        hidden, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fastdpo.linear_logprobs(DTensor.from_local(hidden, mesh, [Replicate()]),
                                      DTensor.from_local(weight, mesh, [Replicate()]), targets)
        (out * grad_out).sum().backward()
        return {"logps": relative_error(out, expected.logps),
                "d_hidden": relative_error(hidden.grad, expected_grads[0]),
                "d_weight": relative_error(weight.grad, expected_grads[1])}

    @check
    def ddp_loss_inside_forward():
        return ddp_pattern(fused=True)

    @check
    def ddp_loss_inside_forward_two_pass():
        return ddp_pattern(fused=False)

    @check
    def fsdp2_loss_inside_registered_method():
        return fsdp2_pattern(fused=True)

    @check
    def fsdp2_loss_inside_registered_method_two_pass():
        return fsdp2_pattern(fused=False)


def triton_checks():
    """The vocab-parallel head on the Triton kernels (Triton's interpreter on CPU: float32 and float16 only)."""
    import fastdpo
    from fastdpo.distributed import VocabShard

    curved = dict(softcap=4.0, temperature=0.7, logit_scale=1.3)

    @check
    def vocab_parallel_triton_fp32_stats():
        return compare_vocab_parallel(torch.float32, False, True, {}, backend="triton")

    @check
    def vocab_parallel_triton_fp32_bias_softcap():  # fp32 softcap saturates: ties for top-1 differ from fp64
        return compare_vocab_parallel(torch.float32, True, False, curved, backend="triton")

    @check
    def dtensor_shard0_triton_fp32_bias():
        return compare_vocab_parallel(torch.float32, True, False, curved, use_dtensor=True, backend="triton")

    @check
    def dpo_loss_vocab_parallel_triton():
        return compare_dpo_loss_vocab_parallel(torch.float32, "triton")

    @check
    def triton_bits():
        """Bits of the Triton vocab-parallel head: run to run, across ranks, and its distance to the PyTorch path."""
        h, w, b, targets, grad_out = head_inputs(torch.float32, with_bias=True)
        start, end = shard_rows(w.shape[0])

        def run(backend):
            hidden, shard = h.clone().requires_grad_(), w[start:end].clone().requires_grad_()
            logps = fastdpo.linear_logprobs(hidden, VocabShard(shard, start, w.shape[0]), targets, b[start:end],
                                            backend=backend, softcap=4.0)
            (logps * grad_out.float()).sum().backward()
            return logps.detach(), hidden.grad, shard.grad

        first, again, torch_path = run("triton"), run("triton"), run("torch")
        everyone = [torch.empty_like(first[0]) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, first[0])
        return {"run_to_run_equal": all(torch.equal(x, y) for x, y in zip(first, again)),
                "ranks_equal": all(torch.equal(everyone[0], other) for other in everyone),
                "logps_vs_torch_path": relative_error(first[0], torch_path[0]),
                "d_hidden_vs_torch_path": relative_error(first[1], torch_path[1]),
                "d_weight_vs_torch_path": relative_error(first[2], torch_path[2])}


# --------------------------------------------------------------------------------------------------------------------
# FastDPOLoss's fused pass on a vocab-parallel head
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording_token_logps():
    """The per-token log-probs of every fastdpo.ops.token_outputs call inside the block (both vocab-parallel routes
    form their outputs there), and how many rows the fused pass recomputed (distributed.ShardStoredLogits)."""
    from fastdpo import distributed, ops

    record, original, recompute = {"logps": [], "recomputed": 0}, ops.token_outputs, \
        distributed.ShardStoredLogits._rows_recomputed

    def spy(*args, **kwargs):
        outputs = original(*args, **kwargs)
        record["logps"].append(outputs[0].detach().clone())
        return outputs

    def recompute_spy(self, k, a, which, grad):
        record["recomputed"] += which.numel()
        return recompute(self, k, a, which, grad)

    ops.token_outputs, distributed.ShardStoredLogits._rows_recomputed = spy, recompute_spy
    try:
        yield record
    finally:
        ops.token_outputs, distributed.ShardStoredLogits._rows_recomputed = original, recompute


def dpo_batch(dtype, *, vocab=301, hidden=31, pairs=3, length=11, with_bias=False, spread=1.0, seed=7):
    """Hidden states [2 pairs, length, hidden], a head (and bias), labels (prompt, padding, both ends of the
    vocabulary) and reference log-probs near the policy's, so that the loss is not saturated (its gradient is not 0).
    spread scales the hidden states, and so the logits."""
    h, w, b, _, _ = head_inputs(dtype, vocab=vocab, hidden=hidden, shape=(2 * pairs, length), with_bias=with_bias,
                                seed=seed)
    h = h * spread
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :3] = -100  # the prompt
    labels[1, 6:] = -100  # padding
    labels[0, 4], labels[pairs, 5], labels[2, 7] = 0, vocab - 1, 0  # both ends of the vocabulary
    from fastdpo import reference
    from fastdpo.sequences import shifted_targets

    targets = shifted_targets(labels, -100)
    policy = reference.sequence_logprobs(reference.token_logprobs(h.double(), w.double(), targets,
                                                                  None if b is None else b.double()), targets)
    ref = policy.view(2, pairs) + torch.randn(2, pairs, generator=gen, dtype=torch.float64) * 2
    return h, w, b, labels, ref


def run_dpo_loss(hidden, head, labels, bias, ref, *, fused, **options):
    """FastDPOLoss forward and backward: (output, the fused passes completed, the recorded per-token log-probs)."""
    import fastdpo

    loss = fastdpo.FastDPOLoss(beta=0.2, fused=fused, **{"backend": "torch", **options})
    with counting_fused_passes() as passes, recording_token_logps() as record:
        out = loss(hidden, head, labels, bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
        out.loss.backward()
    return out, passes["completed"], record


def vocab_parallel_head(layout, hidden, shard, bias, whole_shape):
    """(hidden, head, bias) as FastDPOLoss takes them: a VocabShard ('shard'), a Shard(0) DTensor head ('dtensor'), or
    one Replicate() x Shard(0) on the (dp, tp) mesh with each dp rank's own batch replicated on mesh["tp"]
    ('mesh_2d')."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

    from fastdpo.distributed import VocabShard

    if layout == "shard":
        start = shard_rows(whole_shape[0])[0]
        return hidden, VocabShard(shard, start, whole_shape[0]), bias
    if layout == "dtensor":
        mesh, head_placements, hidden_placements = init_device_mesh("cpu", (dist.get_world_size(),)), [Shard(0)], \
            [Replicate()]
    else:
        mesh, head_placements, hidden_placements = mesh_2d(), [Replicate(), Shard(0)], [Replicate()]
    head = DTensor.from_local(shard, mesh, head_placements, shape=whole_shape, stride=(whole_shape[1], 1))
    head_bias = None if bias is None else DTensor.from_local(bias, mesh, head_placements, shape=whole_shape[:1],
                                                             stride=(1,))
    hidden_mesh = mesh if mesh.ndim == 1 else mesh["tp"]
    return DTensor.from_local(hidden, hidden_mesh, hidden_placements), head, head_bias


def compare_fused_vocab_parallel(dtype, *, with_bias=False, transform=None, layout="shard", split=None,
                                 spread=1.0, backend="torch", **loss_options):
    """FastDPOLoss on a vocab-parallel head, fused and two-pass (fused=False), against one process with the whole head
    in float64: the loss, dX, the shard's rows of dW (and db), and the bits of the two routes' per-token log-probs,
    sequence log-probs and token metrics. `layout`: see vocab_parallel_head; `split`: rank 0's rows of a VocabShard
    (default: torch.chunk's, as Shard(0)); backend: the vocab-parallel runs' (the oracle's is 'torch');
    loss_options: FastDPOLoss's."""
    options = dict(**loss_options, **(transform or {}))
    if layout == "mesh_2d":  # each dp rank its own batch, one head
        mesh = mesh_2d()
        _, w, b, _, _ = dpo_batch(dtype, with_bias=with_bias, spread=spread)
        h, _, _, labels, ref = dpo_batch(dtype, spread=spread, seed=20 + mesh.get_local_rank("dp"))
        start, end = tp_rows(w.shape[0], mesh)
    else:
        h, w, b, labels, ref = dpo_batch(dtype, with_bias=with_bias, spread=spread)
        start, end = shard_rows(w.shape[0]) if split is None else ((0, split) if rank() == 0 else (split, w.shape[0]))
    whole = [t.double().clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    expected, _, _ = run_dpo_loss(whole[0], whole[1], labels, whole[2], ref, fused=False, **options)

    def vocab_parallel(fused):
        hidden, shard = h.clone().requires_grad_(), w[start:end].clone().requires_grad_()
        bias = b[start:end].clone().requires_grad_() if with_bias else None
        if layout == "shard" and split is not None:
            from fastdpo.distributed import VocabShard

            inputs = hidden, VocabShard(shard, start, w.shape[0]), bias
        else:
            inputs = vocab_parallel_head(layout, hidden, shard, bias, w.shape)
        out, passes, record = run_dpo_loss(inputs[0], inputs[1], labels, inputs[2], ref, fused=fused,
                                           backend=backend, **options)
        errors = {"loss": relative_error(out.loss, expected.loss),
                  "d_hidden": relative_error(hidden.grad, whole[0].grad),
                  "d_weight_shard": relative_error(shard.grad, whole[1].grad[start:end]),
                  "chosen_logps": relative_error(out.chosen_logps, expected.chosen_logps),
                  "rejected_logps": relative_error(out.rejected_logps, expected.rejected_logps)}
        if with_bias:
            errors["d_bias_shard"] = relative_error(bias.grad, whole[2].grad[start:end])
        return out, passes, record, errors

    (out, passes, record, errors), (two_pass, two_pass_passes, two_pass_record, two_pass_errors) = \
        vocab_parallel(True), vocab_parallel(False)
    bits = {"token_logps": torch.equal(record["logps"][-1], two_pass_record["logps"][-1]),
            "loss": torch.equal(out.loss, two_pass.loss),
            "sequence_logps": torch.equal(out.chosen_logps, two_pass.chosen_logps)
            and torch.equal(out.rejected_logps, two_pass.rejected_logps),
            "token_metrics": out.token_metrics.keys() == two_pass.token_metrics.keys()
            and all(torch.equal(out.token_metrics[k], two_pass.token_metrics[k]) for k in out.token_metrics)}
    return {"errors": errors, "two_pass_errors": two_pass_errors, "bits_equal_two_pass": bits,
            "fused_passes": passes, "two_pass_fused_passes": two_pass_passes,
            "recomputed_rows": record["recomputed"], "rows": end - start,
            "gradient_scale": float(whole[0].grad.abs().max())}  # a saturated loss would check nothing


def workspace_for_rows(vocab_rows: int) -> int:
    """The fused pass's workspace for dpo_batch's schedule over a shard of `vocab_rows` rows, in fp32."""
    from fastdpo import chunked
    from fastdpo.fused_pass import PairSchedule
    from fastdpo.sequences import shifted_targets

    _, _, _, labels, _ = dpo_batch(torch.float32)
    positions = (shifted_targets(labels, -100) != -100).reshape(-1).nonzero().squeeze(1)
    schedule = PairSchedule(positions, labels.shape[1], labels.shape[0] // 2, chunked.TOKEN_BLOCK)
    return schedule.slots * min(chunked.TOKEN_BLOCK, positions.numel()) * vocab_rows * 4


def fused_vocab_parallel_suite():
    curved = dict(softcap=4.0, temperature=0.7, logit_scale=1.3)

    @check
    def fused_vp_fp64_linear_metrics():
        return compare_fused_vocab_parallel(torch.float64, token_metrics=True)

    @check
    def fused_vp_fp32_linear():  # the shifted forward's tiles, no statistics: the common case
        return compare_fused_vocab_parallel(torch.float32)

    @check
    def fused_vp_fp64_bias_softcap_metrics():
        return compare_fused_vocab_parallel(torch.float64, with_bias=True, transform=curved, token_metrics=True)

    @check
    def fused_vp_fp32_bias_softcap():
        return compare_fused_vocab_parallel(torch.float32, with_bias=True, transform=curved)

    @check
    def fused_vp_fp64_uneven_split():  # 40 rows against 261
        return compare_fused_vocab_parallel(torch.float64, split=40, transform=dict(temperature=0.8))

    @check
    def fused_vp_fp32_uneven_split_bias():
        return compare_fused_vocab_parallel(torch.float32, split=230, with_bias=True)

    @check
    def fused_vp_fp32_budget_between_the_shards():  # fits rank 0's 40 rows, not rank 1's 261: two-pass on both
        return compare_fused_vocab_parallel(torch.float32, split=40, workspace_bytes=workspace_for_rows(100))

    @check
    def fused_vp_fp64_peaked_logits():  # logits over ~200 nats: rows the shifted forward hands to the online one
        return compare_fused_vocab_parallel(torch.float64, spread=8.0)

    @check
    def fused_vp_fp64_wpo():  # WPO's weights need log sum p^2 from the merged statistics (flat logits: weights ~1)
        return compare_fused_vocab_parallel(torch.float64, with_bias=True, transform=curved, use_weighting=True,
                                            spread=0.05)

    fused_dtensor_checks("dtensor", "fused_vp_dtensor")

    @check
    def fused_vp_triton_fp32_metrics():
        return compare_fused_vocab_parallel(torch.float32, backend="triton", token_metrics=True)

    @check
    def fused_vp_triton_fp32_uneven_split_bias_softcap():
        return compare_fused_vocab_parallel(torch.float32, backend="triton", split=230, with_bias=True,
                                            transform=curved)

    @check
    def fused_vp_bf16_bias_softcap():  # 16-bit inputs: fp32 tiles and accumulators, one rounding at the end
        return compare_fused_vocab_parallel(torch.bfloat16, with_bias=True, transform=curved)

    @check
    def fused_vp_triton_fp16_metrics():  # 16-bit d_logits for the GEMMs, an fp32 dW accumulator
        return compare_fused_vocab_parallel(torch.float16, backend="triton", token_metrics=True)

    @check
    def fused_vp_triton_dtensor_fp32_bias():
        return compare_fused_vocab_parallel(torch.float32, backend="triton", layout="dtensor", with_bias=True)


def fused_dtensor_checks(layout: str, prefix: str) -> None:
    """The fused pass on a DTensor head laid out as `layout` (see vocab_parallel_head): in float64 with the token
    metrics, and in float32 with a bias and softcap."""
    curved = dict(softcap=4.0, temperature=0.7, logit_scale=1.3)

    def fp64_metrics():
        return compare_fused_vocab_parallel(torch.float64, layout=layout, token_metrics=True)

    def fp32_bias_softcap():
        return compare_fused_vocab_parallel(torch.float32, layout=layout, with_bias=True, transform=curved)

    for scenario in (fp64_metrics, fp32_bias_softcap):
        scenario.__name__ = f"{prefix}_{scenario.__name__}"
        check(scenario)


class TinyLM(torch.nn.Module):
    """A toy causal LM whose forward returns FastDPOLoss's output: the pattern DDP and FSDP2 need."""

    def __init__(self, vocab=301, hidden=31, seed=0, fused=True):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=gen, dtype=torch.float64))
            self.lm_head.weight.copy_(torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.5)
        import fastdpo

        self.loss = fastdpo.FastDPOLoss(beta=0.1, backend="torch", fused=fused)

    def forward(self, input_ids, labels=None, ref_chosen_logps=None, ref_rejected_logps=None):
        hidden = torch.tanh(self.embed(input_ids))
        if labels is None:
            return hidden
        return self.loss(hidden, self.lm_head.weight, labels, ref_chosen_logps=ref_chosen_logps,
                         ref_rejected_logps=ref_rejected_logps).loss

    def dpo_loss(self, *args):  # the same, under another name, for register_fsdp_forward_method
        return self.forward(*args)


def pattern_batches(world):
    """Per-rank batches (2 pairs each) and the whole batch, fixed by seed."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 301, (world, 4, 8), generator=gen)
    labels = ids.clone()
    labels[..., :3] = -100
    ref = torch.randn(world, 2, 2, generator=gen, dtype=torch.float64) * 3 - 20
    return ids, labels, ref


def single_process_grads(dtype, world=None):
    """The oracle for a data-parallel step: the mean over `world` ranks (default: all) of each rank's loss, one
    process, float64."""
    world = world or dist.get_world_size()
    ids, labels, ref = pattern_batches(world)
    model = TinyLM().double()
    from fastdpo import reference

    total = 0
    for r in range(world):
        hidden = torch.tanh(model.embed(ids[r]))
        total = total + reference.dpo_loss(hidden, model.lm_head.weight, labels[r], ref_chosen_logps=ref[r, 0],
                                           ref_rejected_logps=ref[r, 1]).loss / world
    total.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def ddp_pattern(fused: bool):
    """The reduced gradients against the oracle, and how many fused passes FastDPOLoss ran (fused: the fused route,
    else the two-pass one)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids, labels, ref = pattern_batches(dist.get_world_size())
    model = DDP(TinyLM(fused=fused).double())
    r = rank()
    with counting_fused_passes() as passes:
        model(ids[r], labels[r], ref[r, 0], ref[r, 1]).backward()  # through the DDP wrapper: gradients all-reduced
    expected = single_process_grads(torch.float64)
    return {"fused_passes": passes["completed"],
            **{name: relative_error(p.grad, expected[name]) for name, p in model.module.named_parameters()}}


def fsdp2_pattern(fused: bool):
    """As ddp_pattern, under FSDP2: inside the root's forward the head is FSDP2's unsharded parameter, a plain
    tensor, and its gradient is reduce-scattered after the backward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    ids, labels, ref = pattern_batches(dist.get_world_size())
    model = TinyLM(fused=fused).double()
    fully_shard(model.embed)  # a unit of its own, like a transformer block
    fully_shard(model)  # the root unit owns lm_head: its weight is gathered while the root runs
    register_fsdp_forward_method(model, "dpo_loss")
    r = rank()
    with counting_fused_passes() as passes:
        model.dpo_loss(ids[r], labels[r], ref[r, 0], ref[r, 1]).backward()
    expected = single_process_grads(torch.float64)
    return {"fused_passes": passes["completed"], "head_grad_placements": str(model.lm_head.weight.grad.placements),
            **{name: relative_error(p.grad.full_tensor(), expected[name]) for name, p in model.named_parameters()}}


# --------------------------------------------------------------------------------------------------------------------
# 2-D meshes (4 ranks): a (dp, tp) mesh, the head Shard(0) on tp, data parallel (FSDP2) on dp
# --------------------------------------------------------------------------------------------------------------------


def mesh_2d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))


def tp_rows(vocab: int, mesh):
    """This rank's [start, end) of the vocabulary on the tp dimension (torch.chunk's split, as Shard(0))."""
    parts, index = mesh.size(1), mesh.get_local_rank("tp")
    chunk = -(-vocab // parts)
    start = min(index * chunk, vocab)
    return start, min(start + chunk, vocab)


def compare_mesh_2d(dtype, with_bias, with_stats, transform, backend):
    """A Shard(0)-on-tp head on the (dp, tp) mesh; each dp rank its own batch (hidden Shard(0) on dp, Replicate() on
    tp): log-probs and local gradients against the oracle of that batch."""
    import fastdpo
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = mesh_2d()
    _, w, b, _, _ = head_inputs(dtype, with_bias=with_bias)  # one head for the whole mesh
    h, _, _, targets, grad_out = head_inputs(dtype, seed=1 + mesh.get_local_rank("dp"))  # a batch per dp rank
    expected, expected_grads = oracle(h, w, b, targets, grad_out, **transform)
    start, end = tp_rows(w.shape[0], mesh)
    hidden, shard = h.clone().requires_grad_(), w[start:end].clone().requires_grad_()
    bias = b[start:end].clone().requires_grad_() if with_bias else None
    head_placements = [Replicate(), Shard(0)]
    head = DTensor.from_local(shard, mesh, head_placements, shape=w.shape, stride=w.stride())
    head_bias = None if bias is None else DTensor.from_local(bias, mesh, head_placements, shape=b.shape,
                                                             stride=b.stride())
    hidden_in = DTensor.from_local(hidden, mesh, [Shard(0), Replicate()])
    out = fastdpo.linear_logprobs(hidden_in, head, targets, head_bias, with_stats=with_stats, backend=backend,
                                  **transform)
    return shard_errors(out, grad_out, expected, expected_grads, (hidden, shard, bias), start, end)


class LocalEmbedding(torch.nn.Embedding):
    """An embedding whose weight may be a DTensor replicated over the whole mesh: looked up as the local tensor."""

    def forward(self, input_ids):
        from torch.distributed.tensor import DTensor

        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return torch.nn.functional.embedding(input_ids, weight)


class TensorParallelTinyLM(TinyLM):
    """TinyLM whose head is tensor parallel: the hidden states go to the loss as a replicated DTensor on the head's
    tensor-parallel mesh (its tp dimension where the head lives on the (dp, tp) mesh), each dp rank its own batch."""

    def __init__(self):
        super().__init__()
        self.embed.__class__ = LocalEmbedding

    def forward(self, input_ids, labels=None, ref_chosen_logps=None, ref_rejected_logps=None):
        from torch.distributed.tensor import DTensor, Replicate

        hidden = torch.tanh(self.embed(input_ids))
        head = self.lm_head.weight
        self.head_mesh_dims = head.device_mesh.ndim  # the head as FSDP2 hands it out inside the root's forward
        tp_mesh = head.device_mesh if head.device_mesh.ndim == 1 else head.device_mesh["tp"]
        hidden = DTensor.from_local(hidden, tp_mesh, [Replicate()])  # this dp rank's batch, replicated over tp
        return self.loss(hidden, head, labels, ref_chosen_logps=ref_chosen_logps,
                         ref_rejected_logps=ref_rejected_logps).loss


def fsdp_tp_errors(model, mesh):
    """One step of `model` on its dp rank's batch, the loss in the root's forward: the reduced gradients (full
    tensors) against the single-process mean over the dp ranks' losses."""
    ids, labels, ref = pattern_batches(mesh.size(0))
    r = mesh.get_local_rank("dp")
    with counting_fused_passes() as passes:
        model(ids[r], labels[r], ref[r, 0], ref[r, 1]).backward()
    expected = single_process_grads(torch.float64, mesh.size(0))
    head_grad = model.lm_head.weight.grad
    return {"head_grad_placements": str(head_grad.placements), "head_mesh_dims": model.head_mesh_dims,
            "fused_passes": passes["completed"],
            **{name: relative_error(p.grad.full_tensor(), expected[name]) for name, p in model.named_parameters()}}


def mesh_2d_suite():
    import fastdpo
    from torch.distributed.fsdp import DataParallelMeshDims, fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    curved = dict(softcap=4.0, temperature=0.7, logit_scale=1.3)

    @check
    def mesh_2d_torch_fp64_stats():
        return compare_mesh_2d(torch.float64, False, True, {}, "torch")

    @check
    def mesh_2d_torch_fp64_bias_softcap():
        return compare_mesh_2d(torch.float64, True, False, curved, "torch")

    @check
    def mesh_2d_triton_fp32_bias_softcap():
        return compare_mesh_2d(torch.float32, True, False, curved, "triton")

    fused_dtensor_checks("mesh_2d", "mesh_2d_fused")

    @check
    def mesh_2d_fused_triton_fp32_bias_softcap():
        return compare_fused_vocab_parallel(torch.float32, backend="triton", layout="mesh_2d", with_bias=True,
                                            transform=curved)

    @check
    def mesh_2d_fsdp_dp_tp_submesh():
        """fully_shard over dp of a model whose lm_head is ColwiseParallel over tp: FSDP2 hands out the head as a
        Shard(0) DTensor on the tp submesh inside the root's forward."""
        mesh = mesh_2d()
        model = TensorParallelTinyLM().double()
        parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel()})
        fully_shard(model.embed, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return fsdp_tp_errors(model, mesh)

    @check
    def mesh_2d_fsdp_spmd_mesh():
        """fully_shard with dp_mesh_dims on parameters that are DTensors of the whole (dp, tp) mesh: inside the root's
        forward the head is a DTensor on the 2-D mesh, Replicate() on dp and Shard(0) on tp."""
        mesh = mesh_2d()
        model = TensorParallelTinyLM().double()
        for module, placements in ((model.embed, [Replicate(), Replicate()]), (model.lm_head, [Replicate(), Shard(0)])):
            module.weight = torch.nn.Parameter(distribute_tensor(module.weight.detach(), mesh, placements))
        dims = DataParallelMeshDims(shard="dp")
        fully_shard(model.embed, mesh=mesh, dp_mesh_dims=dims)
        fully_shard(model, mesh=mesh, dp_mesh_dims=dims)
        return fsdp_tp_errors(model, mesh)

    @check
    def mesh_2d_head_sharded_on_both_dims_refused():
        mesh = mesh_2d()
        h, w, _, targets, _ = head_inputs(torch.float32)
        weight = distribute_tensor(w, mesh, [Shard(0), Shard(0)])
        hidden = DTensor.from_local(h, mesh, [Replicate(), Replicate()])
        return expect_value_error(lambda: fastdpo.linear_logprobs(hidden, weight, targets), "one mesh dimension",
                                  "FSDP2")

    @check
    def mesh_2d_hidden_split_over_tp_refused():
        mesh = mesh_2d()
        h, w, _, targets, _ = head_inputs(torch.float32)
        weight = distribute_tensor(w, mesh, [Replicate(), Shard(0)])
        hidden = DTensor.from_local(h, mesh, [Replicate(), Shard(0)])
        return expect_value_error(lambda: fastdpo.linear_logprobs(hidden, weight, targets),
                                  "replicated over the head's vocabulary dimension")


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu)
# --------------------------------------------------------------------------------------------------------------------


def zero3_config(**extra):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True, **extra}


def zero3_suite():
    import importlib

    import deepspeed

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build, minutes on a fresh machine);
    # gloo's collectives do the same job here. (`deepspeed.comm.torch` as an attribute is torch itself.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    @check
    def zero3_loss_inside_forward():
        ids, labels, ref = pattern_batches(dist.get_world_size())
        model = TinyLM().float()  # ZeRO-3 partitions half, bfloat16 and float32 parameters only
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=zero3_config())
        r = rank()
        with counting_fused_passes() as passes:
            loss = engine(ids[r], labels[r], ref[r, 0], ref[r, 1])
            engine.backward(loss)
        expected = single_process_grads(torch.float64)
        from deepspeed.utils import safe_get_full_grad

        partitioned = int(engine.module.lm_head.weight.numel() == 0)
        return {"partitioned_head": partitioned, "fused_passes": passes["completed"], **{name: relative_error(safe_get_full_grad(p), expected[name])
                                                    for name, p in engine.module.named_parameters()}}

    @check
    def zero3_shared_reference_head():
        """The reference log-probs through the same partitioned head (ref_hidden_states, no ref_lm_head_weight)."""
        import fastdpo
        from deepspeed.utils import safe_get_full_fp32_param

        ids, labels, _ = pattern_batches(dist.get_world_size())
        model = TinyLM().float()  # ZeRO-3 partitions half, bfloat16 and float32 parameters only
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=zero3_config())
        r = rank()
        hidden = engine(ids[r])
        ref_hidden = hidden.detach().flip(-1)
        full_head = safe_get_full_fp32_param(engine.module.lm_head.weight).double()
        loss = fastdpo.FastDPOLoss(beta=0.1, backend="torch")(hidden, engine.module.lm_head.weight, labels[r],
                                                              ref_hidden_states=ref_hidden).loss
        engine.backward(loss)
        expected = fastdpo.reference.dpo_loss(hidden.detach().double(), full_head, labels[r],
                                              ref_hidden_states=ref_hidden.double())
        return {"loss": relative_error(loss, expected.loss)}

    @check
    def zero3_loss_outside_forward():
        return zero3_outside_forward(deepspeed, fused=True)

    @check
    def zero3_loss_outside_forward_two_pass():
        return zero3_outside_forward(deepspeed, fused=False)

    @check
    def zero3_frozen_head_outside_forward():  # the frozen-head route (LoRA): its backward needs no head
        return zero3_outside_forward(deepspeed, fused=True, frozen_head=True)


def zero3_outside_forward(deepspeed, fused: bool, frozen_head: bool = False):
    """FastDPOLoss called directly on the partitioned lm_head.weight, on the hidden states the engine returns: the
    reduced gradients' errors, the fused passes run, the head's gathers in the forward and in the backward, and
    whether the head was gathered when its gradient reached ZeRO-3's hooks (frozen_head: the head has none)."""
    import fastdpo
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_grad

    ids, labels, ref = pattern_batches(dist.get_world_size())
    model = TinyLM().float()  # ZeRO-3 partitions half, bfloat16 and float32 parameters only
    model.lm_head.weight.requires_grad_(not frozen_head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=zero3_config())
    r = rank()
    hidden = engine(ids[r])
    head = engine.module.lm_head.weight
    partitioned = int(head.numel() == 0)
    status_at_hook = []
    hook = head.register_post_accumulate_grad_hook(lambda p: status_at_hook.append(p.ds_status.name)) \
        if head.requires_grad else None
    with counting_gathers(deepspeed) as gathers, counting_fused_passes() as passes:
        loss = fastdpo.FastDPOLoss(beta=0.1, backend="torch", fused=fused)(
            hidden, head, labels[r], ref_chosen_logps=ref[r, 0], ref_rejected_logps=ref[r, 1]).loss
        forward_gathers = gathers["count"]
        engine.backward(loss)
    if hook is not None:
        hook.remove()
    expected = single_process_grads(torch.float64)
    errors = {name: relative_error(safe_get_full_grad(p), expected[name])
              for name, p in engine.module.named_parameters() if p.requires_grad}
    repartitioned = int(head.numel() == 0)
    engine.step()
    return {"partitioned_head": partitioned, "partitioned_after_backward": repartitioned,
            "fused_passes": passes["completed"], "frozen_route": passes["frozen"], "forward_gathers": forward_gathers,
            "backward_gathers": gathers["count"] - forward_gathers,
            "gathered_at_grad_hook": [status == ZeroParamStatus.AVAILABLE.name for status in status_at_hook],
            **errors}


@contextlib.contextmanager
def counting_gathers(deepspeed):
    """{"count": n}: the deepspeed.zero.GatheredParameters blocks entered inside the block (fastdpo.distributed.gathered
    gathers a partitioned head with one, and makes none for a head that is already gathered)."""
    counts, original = {"count": 0}, deepspeed.zero.GatheredParameters

    class Counted(original):
        def __enter__(self):
            counts["count"] += 1
            return super().__enter__()

    deepspeed.zero.GatheredParameters = Counted
    try:
        yield counts
    finally:
        deepspeed.zero.GatheredParameters = original


# --------------------------------------------------------------------------------------------------------------------
# TRL's DPOTrainer under DDP and ZeRO-3, stock and patched
# --------------------------------------------------------------------------------------------------------------------


def train_trl(patched: bool, head_grads: bool = False, **overrides):
    """Train the tiny DPO setup of test_trl_patch.py; per-step logs, a checksum of the weights, and head calls.

    head_grads: also the head's gradient before each optimizer step (HeadGradients), and how the policy's head
    reached the log-prob function (`head_weights`)."""
    from tiny_models import cpu_dpo_config, perturbed_copy, tiny_llama, tiny_preference_dataset, tiny_tokenizer
    from trl import DPOTrainer
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    import fastdpo

    calls = {"stock": 0, "fastdpo": 0}
    stock_forward, real_logprobs = ChunkedLogProbFunction.forward, fastdpo.linear_logprobs

    head_weights = set()

    def spy_stock(ctx, *args, **kwargs):
        calls["stock"] += 1
        head_weights.add(head_weight_kind(args[1]))
        return stock_forward(ctx, *args, **kwargs)

    def spy_fastdpo(*args, **kwargs):
        calls["fastdpo"] += 1
        head_weights.add(head_weight_kind(args[1]))
        return real_logprobs(*args, **kwargs)

    ChunkedLogProbFunction.forward, fastdpo.linear_logprobs = staticmethod(spy_stock), spy_fastdpo
    policy = tiny_llama(0)
    ref_model = perturbed_copy(policy, scale=0.05, seed=1)
    config = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=2e-2, logging_steps=1, data_seed=0,
                  dataloader_num_workers=0)
    config.update(overrides)
    try:
        with fastdpo.patch_trl() if patched else contextlib.nullcontext():
            recorder = head_grad_callback()() if head_grads else None
            trainer = DPOTrainer(model=policy, ref_model=ref_model, args=cpu_dpo_config("fastdpo_ddp_", **config),
                                 train_dataset=tiny_preference_dataset(8, seed=0),
                                 processing_class=tiny_tokenizer(), callbacks=[recorder] if recorder else None)
            trainer.train()
    finally:
        ChunkedLogProbFunction.forward, fastdpo.linear_logprobs = stock_forward, real_logprobs
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    model = trainer.model_wrapped if hasattr(trainer, "model_wrapped") else trainer.model
    weights = [full_weight(p).double().sum().item() for p in trainer.model.parameters()]
    run = {"logs": logs, "weights": weights, "calls": calls, "wrapper": type(model).__name__}
    if head_grads:
        run.update(head_grads=recorder.steps, head_weights=sorted(head_weights))
    return run


def head_weight_kind(weight) -> str:
    """How a head's weight reached the log-prob function: the parameter itself (FSDP2's unsharded parameter inside
    its unit's forward), a DTensor, or a tensor computed from one (e.g. TRL's `weight.full_tensor()`)."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return "dtensor"
    return "parameter" if isinstance(weight, torch.nn.Parameter) else "computed"


def head_grad_callback():
    from transformers import TrainerCallback

    class HeadGradients(TrainerCallback):
        """The policy head's gradient as the optimizer gets it: its placements, and its full tensor's sum of absolute
        values and norm, per step (every rank joins the gather of a DTensor gradient)."""

        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grad = model.get_output_embeddings().weight.grad
            placements = str(getattr(grad, "placements", "local"))
            full = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            self.steps.append({"placements": placements, "abs_sum": full.double().abs().sum().item(),
                               "norm": full.double().norm().item()})

    return HeadGradients


def full_weight(param):
    if hasattr(param, "full_tensor"):  # an FSDP2 shard
        return param.full_tensor()
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return param.detach()


TRL_DDP_SCENARIOS = {
    # transformers asks DDP for find_unused_parameters exactly when gradient checkpointing is off
    "gc_off": dict(),
    "gc_on": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
    "gc_on_find_unused": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                              ddp_find_unused_parameters=True),
    "gc_off_no_find_unused": dict(ddp_find_unused_parameters=False),
}


def trl_ddp_suite():
    for name, overrides in TRL_DDP_SCENARIOS.items():
        def scenario(overrides=overrides):
            return {"stock": train_trl(False, **overrides), "patched": train_trl(True, **overrides)}

        scenario.__name__ = name
        check(scenario)


def trl_zero3_suite():
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see zero3_suite

    def zero3():
        config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        return {"stock": train_trl(False, deepspeed=config), "patched": train_trl(True, deepspeed=config)}

    check(zero3)


def fsdp2_on_cpu_ranks():
    """Accelerate's FSDP2 on CPU ranks, through the one switch Accelerate skips there.

    Accelerate 1.16 turns a process into an FSDP one (`distributed_type = FSDP`, `state.fsdp_plugin = plugin`) only
    in the branch of AcceleratorState.__init__ (accelerate/state.py) taken for accelerator devices (`MULTI_GPU`,
    `MULTI_NPU`, `MULTI_XPU`, ...). CPU ranks are `MULTI_CPU`, so the FSDP plugin that transformers hands it is
    dropped without a word and the model is wrapped in DDP instead. This applies that branch's two assignments on
    CPU ranks; everything after it is Accelerate's and TRL's own code: `fsdp2_prepare_model` (fully_shard per decoder
    layer, on the embedding, on the final norm with lm_head, on the root), the optimizer's switch to the sharded
    parameters, FSDP2's gradient clipping, and TRL's `prepare_fsdp` for the reference model.
    """
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = init


TRL_FSDP2_SCENARIOS = {
    "fsdp2": dict(),
    "fsdp2_gc_on": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
}


def trl_fsdp2_suite():
    fsdp2_on_cpu_ranks()
    fsdp = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    for name, overrides in TRL_FSDP2_SCENARIOS.items():
        def scenario(overrides=overrides):
            return {"stock": train_trl(False, head_grads=True, **fsdp, **overrides),
                    "patched": train_trl(True, head_grads=True, **fsdp, **overrides)}

        scenario.__name__ = name
        check(scenario)


SUITES = {"heads": heads_suite, "fused_vocab_parallel": fused_vocab_parallel_suite, "mesh_2d": mesh_2d_suite, "zero3": zero3_suite, "trl_ddp": trl_ddp_suite, "trl_fsdp2": trl_fsdp2_suite, "trl_zero3": trl_zero3_suite}


def main():
    suite, out_dir = sys.argv[1], Path(sys.argv[2])
    warnings.simplefilter("ignore")
    from tiny_models import offline_env

    offline_env()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    try:
        SUITES[suite]()
    finally:
        (out_dir / f"rank{rank()}.json").write_text(json.dumps(RESULTS, indent=1))
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
