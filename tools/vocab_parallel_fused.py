"""FastDPOLoss's fused pass on a vocab-parallel head against its two-pass path, on gloo CPU ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tools/vocab_parallel_fused.py [--cases S] [--runs N]

Every rank builds the quick cases' inputs (benchmarks.inputs.make_inputs: a trained-model-like head, the same on
every rank), keeps its torch.chunk rows of the head as a VocabShard and runs both routes alternately. Per route:
time per step (the slowest rank's), the collectives each rank issued in one step, the rows the fused pass
recomputed (their own or borrowed target logit ~41 nats below the shard's maximum), and the errors of the loss,
dX and the rank's rows of dW against the single-process float64 reference.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fastdpo  # noqa: E402
from benchmarks import inputs, measure  # noqa: E402
from fastdpo import distributed  # noqa: E402


@contextlib.contextmanager
def counting():
    """Counter of the collectives issued and of the rows the fused pass recomputed, inside the block."""
    counts, originals = Counter(), {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}
    recompute = distributed.ShardStoredLogits._rows_recomputed

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    def recompute_spy(self, k, a, which, grad):
        counts["recomputed rows"] += which.numel()
        return recompute(self, k, a, which, grad)

    for name in originals:
        setattr(dist, name, counted(name))
    distributed.ShardStoredLogits._rows_recomputed = recompute_spy
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        distributed.ShardStoredLogits._rows_recomputed = recompute


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tools/vocab_parallel_fused.py", description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="", help="only the quick cases whose name contains this")
    p.add_argument("--runs", type=int, default=3, help="timed steps per route (after one warm-up)")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in inputs.case_set("cpu", quick=True):
        if args.cases not in case.name:
            continue
        saved = inputs.make_inputs(case, "cpu")
        ref = measure.reference_fp64(saved, case.softcap, inputs.BETA)
        rows = -(-case.vocab // world)
        start, end = rank * rows, min((rank + 1) * rows, case.vocab)
        hidden = saved["hidden"].clone().requires_grad_()
        shard = saved["weight"][start:end].clone().requires_grad_()
        head = distributed.VocabShard(shard, start, case.vocab)
        refs = {"ref_chosen_logps": saved["ref_chosen_logps"], "ref_rejected_logps": saved["ref_rejected_logps"]}
        losses = {name: fastdpo.FastDPOLoss(beta=inputs.BETA, softcap=case.softcap, backend="torch", fused=fused)
                  for name, fused in (("fused", True), ("two-pass", False))}
        times, counts, errors = {name: [] for name in losses}, {}, {}
        for name, loss_fn in losses.items():  # warm-up: the collectives, the recomputed rows and the errors
            with counting() as counts[name]:
                loss = measure.step(lambda: loss_fn(hidden, head, saved["labels"], **refs).loss, hidden, shard)
            errors[name] = measure.errors(loss, hidden.grad, shard.grad, {**ref, "grad_weight":
                                                                          ref["grad_weight"][start:end]})
        for _ in range(args.runs):  # alternately, so that a change in the machine's load reaches both
            for name, loss_fn in losses.items():
                dist.barrier()
                begin = time.perf_counter()
                measure.step(lambda: loss_fn(hidden, head, saved["labels"], **refs).loss, hidden, shard)
                elapsed = torch.tensor(time.perf_counter() - begin)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(float(elapsed))
        for name in losses:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in errors[name].items())
            print(f"rank {rank} {case.name} {name:8s}: min {min(times[name]):.2f} s, median "
                  f"{sorted(times[name])[len(times[name]) // 2]:.2f} s over {args.runs} steps; {dict(counts[name])}; "
                  f"{errs}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
