"""Triton kernels of fastdpo and their launchers (installed as `fastdpo.kernels`).

- logits_tile:      the shared in-register tile z = transform(X W^T + b)
- logprob_forward:  online log-softmax statistics and target gather, split over the vocabulary
- logprob_backward: recompute-and-accumulate dX, dW, db

Importing this package imports Triton; the CPU path in `fastdpo.chunked` never does.
"""

from .logprob_backward import logprob_backward
from .logprob_forward import logprob_forward

__all__ = ["logprob_forward", "logprob_backward"]
