"""The logit transform every path applies to the raw logits h W^T + b, TRL's order:

    transform(x) = softcap * tanh(x * logit_scale / softcap) / temperature   (with softcap)
                 = x * logit_scale / temperature                             (without)

One frozen value carried from the public API down to the backends; the kernels read its fields
(kernels/logits_tile.tile_arguments). Custom ops take primitives only: fastdpo.ops.fused_logprobs
unpacks it into the ops' float arguments, and the ops pack it again; nothing else takes it apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogitTransform:
    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0
