"""Triton kernels of fastdpo and their launchers (installed as `fastdpo.kernels`).

- config:           the one GEMM tile shape (per dtype and device) and the backward's workspace chunks
- logits_tile:      the shared in-register tile z = transform(X W^T + b) and the grouped program order
- logprob_forward:  GEMM + epilogue: per-(vocabulary tile, row) softmax partials and the target logit
- logprob_backward: GEMM + epilogue: d_logits of a vocabulary chunk into a workspace

Importing this package imports Triton; the CPU path in `fastdpo.chunked` never does.
"""

from .logprob_backward import logits_grad
from .logprob_forward import logprob_forward

__all__ = ["logprob_forward", "logits_grad"]
