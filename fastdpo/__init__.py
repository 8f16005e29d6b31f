"""fastdpo: fused Triton kernels for DPO training of large-vocabulary language models.

    from fastdpo import FastDPOLoss, linear_logprobs
"""

from . import reference
from .dpo_loss import FastDPOLoss
from .logprobs import linear_logprobs
from .trl_patch import SUPPORTED_TRL, TRLVersionError, is_trl_patched, patch_trl, unpatch_trl
from .types import DPOOutput, TokenStats

__version__ = "0.1.0"

__all__ = [
    "FastDPOLoss", "DPOOutput", "TokenStats", "linear_logprobs", "reference",
    "patch_trl", "unpatch_trl", "is_trl_patched", "TRLVersionError", "SUPPORTED_TRL", "__version__",
]
