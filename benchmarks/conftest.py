"""The pytest-benchmark suite here runs only on request: `pytest benchmarks --benchmark-only`.

Plain `pytest` / `pytest tests` never collects it (pyproject's testpaths is tests/), and `pytest benchmarks` without
--benchmark-only skips it rather than spending minutes timing peers.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="timing suite: run `pytest benchmarks --benchmark-only`")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
