"""The built wheel installs `kernels/` as fastdpo.kernels and never as a top-level `kernels` module
(that import name belongs to Hugging Face's `kernels` library)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, timeout=600)
    (path,) = out.glob("fastdpo-*.whl")
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdpo/kernels/__init__.py" in names
    assert "fastdpo/kernels/logprob_forward.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package would shadow HF's"
    assert not [n for n in names if n.startswith("tests/") or n.startswith("benchmarks/")]


def test_wheel_imports_from_its_own_files(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("import fastdpo, fastdpo.kernels, importlib.util; "
            "print(fastdpo.kernels.__file__); "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec is None or 'fastdpo' not in spec.origin)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    kernels_file, no_top_level_kernels = run.stdout.split()
    assert Path(kernels_file).resolve().is_relative_to(tmp_path.resolve())
    assert no_top_level_kernels == "True"
