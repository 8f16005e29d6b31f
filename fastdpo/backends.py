"""Which implementation computes the log-probs: the Triton kernels, the PyTorch tiles, or the oracle."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "FASTDPO_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The concrete backend for tensors on `device`: 'triton', 'torch' or 'reference'.

    `requested` None (or "auto") defers to $FASTDPO_BACKEND, then to the device: Triton for CUDA
    tensors, the PyTorch path otherwise. Triton on CPU tensors needs TRITON_INTERPRET=1.
    """
    name = requested if requested not in (None, "auto") else os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        source = "backend" if requested not in (None, "auto") else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package; use backend='torch'")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run the "
                "kernels on CPU tensors in Triton's interpreter, or use backend='torch'"
            )
    return name
