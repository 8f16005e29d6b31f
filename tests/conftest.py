"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable must be
set before anything imports fastdpo.kernels (kernels are bound to the interpreter when decorated).
Every test gets fresh random inputs: the seed is printed (shown on failure) and can be pinned with
FASTDPO_TEST_SEED to reproduce a run.
"""

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int(os.environ.get("FASTDPO_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"FASTDPO_TEST_SEED={seed}")
    return seed


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Dispatch modes are per thread: with one thread the CPU path's workers run on the caller's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
