"""`kernels/` imports as `fastdpo.kernels` (source checkout, editable install, built wheel) and never as a
top-level `kernels` module: that import name belongs to Hugging Face's `kernels` library, which
transformers imports whenever it is installed, with the repository root first on `sys.path` too (as
`python -m pytest` and `python -m benchmarks.worker` put it)."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("config", "logits_tile", "logprob_forward", "logprob_backward", "sparse_backward")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run_python(code: str, cwd: Path, python: str = sys.executable, **env) -> str:
    """stdout of `python -c code` run from `cwd` (which `-c` puts first on sys.path); fails the test on error."""
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environ.update(TRITON_INTERPRET="1", **env)
    run = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600, env=environ)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def where_kernels_import_from(cwd: Path, python: str = sys.executable, **env) -> tuple[Path, Path]:
    """(fastdpo's folder, the folder fastdpo.kernels' modules are loaded from) in a fresh interpreter."""
    out = run_python("import fastdpo, fastdpo.kernels.logprob_forward as k; print(fastdpo.__file__); print(k.__file__)",
                     cwd, python, **env)
    package_init, kernel_file = out.split()
    return Path(package_init).resolve().parent, Path(kernel_file).resolve().parent


@pytest.mark.skipif(not _installed("kernels"), reason="Hugging Face's kernels package is not installed")
def test_root_on_sys_path_leaves_import_kernels_to_hugging_face():
    """From the repository root (first on sys.path), `import kernels` is Hugging Face's package, and
    transformers, which imports it when installed, loads TRL's DPO trainer."""
    out = run_python("import kernels, sys; print(kernels.__file__); print(hasattr(kernels, 'CUDAProperties')); "
                     "print(sys.path[0] in ('', '.') or sys.path[0])", ROOT)
    kernels_file, has_hf_api, root_first = out.split()
    assert not Path(kernels_file).resolve().is_relative_to(ROOT), kernels_file
    assert has_hf_api == "True"
    assert root_first == "True"
    if _installed("trl"):
        run_python("import trl.trainer.dpo_trainer", ROOT)


def test_kernels_folder_is_no_regular_package():
    """The guarantee behind the test above, checked without Hugging Face's package: a regular package at
    the root would win the name `kernels` over any installed one."""
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_fastdpo_kernels_imports_here():
    import fastdpo.kernels.logprob_forward as forward

    assert forward.__name__ == "fastdpo.kernels.logprob_forward"
    assert Path(forward.__file__).resolve().parent in (ROOT / "kernels", Path(__import__("fastdpo").__file__).parent
                                                      / "kernels")


def test_source_checkout_imports_its_own_kernels(tmp_path):
    """A checkout that is not installed (its root on PYTHONPATH) takes fastdpo.kernels from its own kernels/."""
    checkout = tmp_path / "checkout"
    for folder in ("fastdpo", "kernels"):
        shutil.copytree(ROOT / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    package, kernels = where_kernels_import_from(tmp_path, PYTHONPATH=str(checkout))
    assert package == (checkout / "fastdpo").resolve()
    assert kernels == (checkout / "kernels").resolve()


def _fresh_venv(path: Path) -> str:
    """A new virtual environment that also sees this interpreter's packages (torch, triton), behind its own
    site-packages; returns its python."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    return str(path / "bin" / "python")


def _pip_install(python: str, *args: str) -> None:
    """Install into the venv of `python` with this interpreter's pip (`--python`, pip >= 22.3): offline,
    since the venv already sees every dependency."""
    run = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                          "--no-build-isolation", "--no-index", *args], timeout=600, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_editable_install_imports_its_own_kernels(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns("__pycache__", ".git", "*.egg-info", "build",
                                                                   "results", ".venv*", "venv"))
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, "-e", str(checkout))
    package, kernels = where_kernels_import_from(tmp_path, python)
    assert package == (checkout / "fastdpo").resolve()
    assert kernels == (checkout / "kernels").resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, timeout=600)
    (path,) = out.glob("fastdpo-*.whl")
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in KERNEL_MODULES:
        assert f"fastdpo/kernels/{module}.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package would shadow HF's"
    assert not [n for n in names if n.startswith("tests/") or n.startswith("benchmarks/")]


@pytest.mark.slow
def test_wheel_in_fresh_venv_runs_a_triton_forward(wheel, tmp_path):
    """Installed from the wheel, fastdpo.kernels comes from the venv's own fastdpo/kernels/, and one
    Triton-interpreter forward matches the float64 oracle."""
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, str(wheel))
    site = Path(run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, python).strip())
    package, kernels = where_kernels_import_from(tmp_path, python)
    assert package == (site / "fastdpo").resolve()
    assert kernels == (site / "fastdpo" / "kernels").resolve()
    code = (
        "import torch, fastdpo\n"
        "torch.manual_seed(0)\n"
        "h, w = torch.randn(7, 31), torch.randn(300, 31)\n"
        "t = torch.tensor([3, -100, 299, 0, 150, 7, -100])\n"
        "got = fastdpo.linear_logprobs(h, w, t, backend='triton')\n"
        "want = fastdpo.linear_logprobs(h.double(), w.double(), t, backend='reference')\n"
        "print(float((got.double() - want).abs().max()))\n"
    )
    assert float(run_python(code, tmp_path, python)) < 1e-4


def test_constraints_pin_every_declared_requirement():
    """constraints.txt (the tested set) pins each requirement pyproject.toml declares, dev and bench extras too."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"],
                *project["optional-dependencies"]["bench"]]
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert str(req.specifier).startswith("=="), line
            pinned[canonicalize_name(req.name)] = req.specifier
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt lacks {req.name}"
        version = str(pinned[name]).removeprefix("==")
        assert req.specifier.contains(version, prereleases=True), f"{text} excludes the pinned {version}"
