"""Triton kernels of fastdpo and their launchers (installed as `fastdpo.kernels`).

- logits_tile:      the shared in-register tile z = transform(X W^T + b)
- logprob_forward:  online log-softmax statistics and target gather, split over the vocabulary
- logprob_backward: recompute-and-accumulate dX, dW, db
- sigmoid_dpo:      per-sequence sums and the sigmoid DPO loss with its gradient

Importing this package imports Triton; the CPU path in `fastdpo.chunked` never does.
"""

from .logprob_backward import logprob_backward
from .logprob_forward import logprob_forward
from .sigmoid_dpo import sigmoid_dpo

__all__ = ["logprob_forward", "logprob_backward", "sigmoid_dpo"]
