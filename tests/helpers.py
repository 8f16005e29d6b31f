"""Test helpers: input builders and a relative-error assertion."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (backend, dtype, tolerance on max|err| / max|expected|) against the float64 reference.
# float16 gradients go through a float16 copy of d_logits in the MMAs, hence the looser bound.
CONFIGS = [
    ("torch", torch.float64, 1e-10),
    ("torch", torch.float32, 1e-4),
    ("triton", torch.float32, 1e-4),
    ("triton", torch.float16, 1e-2),
]
CONFIG_IDS = [f"{b}-{str(d).removeprefix('torch.')}" for b, d, _ in CONFIGS]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    # The floor keeps an all-zero expectation (vocab of 1, fully masked rows) from turning round-off
    # into an infinite relative error.
    scale = expected.abs().max().clamp(min=1e-3)
    return float((actual - expected).abs().max() / scale)


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def random_targets(shape, vocab, ignore_fraction=0.3, ignore_index=-100):
    targets = torch.randint(0, vocab, shape)
    targets[torch.rand(shape) < ignore_fraction] = ignore_index
    return targets


def leaf(t: torch.Tensor, dtype: torch.dtype, device=DEVICE) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype).requires_grad_()


def as_reference(t: torch.Tensor) -> torch.Tensor:
    """The same values in float64 on the CPU, as a fresh leaf: the oracle sees the rounded inputs."""
    return t.detach().double().cpu().requires_grad_()
