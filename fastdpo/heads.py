"""What kind of LM head a caller passed, and the dtype the head runs in. A leaf: torch only.

* a plain local tensor: fastdpo.ops computes it;
* a `VocabShard` (this rank's rows of a vocab-parallel head) or a DTensor head: fastdpo.distributed turns it
  into local tensors or a VocabShard;
* a DeepSpeed ZeRO-3 partitioned parameter: gathered around the forward and the backward (fastdpo.distributed),
  or around the forward alone on the fused and frozen routes (fastdpo.fused_pass).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's rows [vocab_start, vocab_start + weight.shape[0]) of a [vocab_size, H] head split over `group`.

    Pass it where a head weight goes (`linear_logprobs(hidden, VocabShard(...), targets)`,
    `FastDPOLoss()(hidden_states, VocabShard(...), labels)`); a bias, if any, is this rank's [weight.shape[0]] slice.
    Every rank of `group` (default: the world) must pass the same hidden states and targets.
    """

    weight: torch.Tensor
    vocab_start: int
    vocab_size: int
    group: object = None


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return False
    return isinstance(t, DTensor)


def is_zero3(t) -> bool:
    return hasattr(t, "ds_id")  # what DeepSpeed ZeRO-3 marks its partitioned parameters with


LOCAL, DTENSOR, VOCAB_SHARD, ZERO3 = "local", "dtensor", "vocab_shard", "zero3"


def head_kind(hidden, weight) -> str:
    """LOCAL (a plain tensor head), DTENSOR (hidden or weight a DTensor), VOCAB_SHARD or ZERO3."""
    if isinstance(weight, VocabShard):
        return VOCAB_SHARD
    if is_dtensor(weight) or is_dtensor(hidden):
        return DTENSOR
    return ZERO3 if is_zero3(weight) else LOCAL


def is_distributed_head(hidden, weight) -> bool:
    """Whether the head is split across processes (a VocabShard, a DTensor or a ZeRO-3 partition): its local
    tensor is not the [vocab, hidden] head, so fastdpo.distributed checks and computes it."""
    return head_kind(hidden, weight) != LOCAL


def autocast_head(hidden, weight, bias):
    """Under autocast the head runs in the autocast dtype, as nn.Linear would: (hidden, weight, bias) cast to it."""
    if not (isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type)
            and hidden.is_floating_point()):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
