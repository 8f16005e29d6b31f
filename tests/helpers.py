"""Test helpers: input builders, a relative-error assertion, and dispatch-mode recorders' shared parts."""

from __future__ import annotations

import gc

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def run_custom_op_inside(mode, func, args, kwargs):
    """For a TorchDispatchMode: run one of fastdpo's custom ops (fastdpo.ops, opaque to the mode) through its
    Python body under `mode`, so that the mode sees the ops inside; None for any other op."""
    if func.namespace != "fastdpo":
        return None
    import fastdpo.ops

    with mode:
        return getattr(fastdpo.ops, func._opname)._init_fn(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create while the mode is active (tensors alive before,
    such as the inputs, are not counted): each new storage is tracked until it is freed.

    Every op's outputs are looked at; a storage not seen before (and not an argument's: views and in-place
    results) is counted with its size until a weak reference says it is gone. Triton's interpreter copies
    each kernel argument through a byte buffer: uint8 storages are left out. Dispatch modes are per thread:
    run the PyTorch path single-threaded. `at_peak` lists (bytes, op, shape, dtype) of what was live then.
    """

    UNCHECKED_BYTES = 8 << 10

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, tuple]] = {}
        self.peak, self.at_peak, self.checked = 0, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = run_custom_op_inside(self, func, args, kwargs)
        if out is None:
            out = func(*args, **(kwargs or {}))
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype != torch.uint8]
        if not made:
            return out
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in made:
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in inputs and (key not in self.live or self.live[key][0].expired()):
                self.live[key] = (StorageWeakRef(storage), storage.nbytes(), (str(func), tuple(t.shape), t.dtype))
        held = self.held
        if held > self.checked + self.UNCHECKED_BYTES:
            # Reachable tensors only, not garbage in reference cycles awaiting Python's collector. A full collection
            # at every new peak would take most of a test's time: peaks up to UNCHECKED_BYTES above the last
            # collected one are taken as they are (an overestimate of at most that much).
            gc.collect()
            held = self.held
            self.checked = max(self.checked, held)
        if held > self.peak:
            self.peak = held
            self.at_peak = sorted(((nbytes, *what) for _, nbytes, what in self.live.values()), reverse=True,
                                  key=lambda item: item[0])
        return out

    @property
    def held(self) -> int:
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        return sum(nbytes for _, nbytes, _ in self.live.values())
