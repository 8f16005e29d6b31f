"""fastdpo: fused Triton kernels for DPO training of large-vocabulary language models.

    from fastdpo import FastDPOLoss, linear_logprobs
"""

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path


def _bind_checkout_kernels() -> None:
    """Make `fastdpo.kernels` the checkout's top-level `kernels/` folder in a source checkout or an
    editable install (a wheel packs the same files as `fastdpo/kernels/`, found the ordinary way).

    The folder has no `__init__.py` on purpose: `import kernels` belongs to Hugging Face's `kernels`
    package (transformers imports it), and a folder without one is only a namespace portion, which loses
    to that installed regular package even when the checkout's root is first on `sys.path`. setuptools'
    editable finder does not find a `package-dir`-mapped package without `__init__.py`, so the binding
    is made here, before anything imports a kernel module.
    """
    name, here = f"{__name__}.kernels", Path(__file__).resolve().parent
    folder = here.parent / "kernels"
    if name in sys.modules or (here / "kernels").is_dir() or not (folder / "logprob_forward.py").is_file():
        return
    spec = ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    sys.modules[name] = importlib.util.module_from_spec(spec)


_bind_checkout_kernels()

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
