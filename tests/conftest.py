"""Test setup: the Triton interpreter on machines without a GPU, seeds, and the ``gpu`` marker."""

import os
import pathlib
import re

import torch

# Must be set before any @triton.jit runs, i.e. before sagesla.kernels' Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _hypothesis_profiles() -> None:
    """Property tests: "ci" (the default) draws the same examples on every run (derandomize, no example database),
    so a failure reproduces anywhere; "explore" draws fresh ones (HYPOTHESIS_PROFILE=explore, with
    SAGESLA_FUZZ_SCALE=10 for ten times the examples). Interpreted kernels are slow: no deadline.
    Without hypothesis (a bare GPU image) tests/test_fuzz.py skips itself.
    """
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", derandomize=True, database=None, deadline=None, suppress_health_check=slow_ok)
    settings.register_profile("explore", deadline=None, suppress_health_check=slow_ok)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_multigpu = pytest.mark.skip(reason="needs 2 CUDA devices")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif "multigpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(skip_multigpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(42)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def gpu_nan_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the interpreter's ``tl.minimum`` / ``tl.maximum`` drop NaN, as the GPU's do (a no-op on CUDA).

    The interpreter evaluates them with numpy's NaN-propagating minimum / maximum, which would hide a kernel that
    turns a NaN into a finite value on the GPU. (``tl.max`` reductions already skip NaN there, as on the GPU.)
    """
    if HAS_CUDA:
        return
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    monkeypatch.setattr(InterpreterBuilder, "create_maxnumf", lambda self, a, b: self.binary_op(a, b, np.fmax))
    monkeypatch.setattr(InterpreterBuilder, "create_minnumf", lambda self, a, b: self.binary_op(a, b, np.fmin))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): with
    ``pytest -n 2`` on 2 busy cores, torch's default threads oversubscribe them and tiny models' forwards measured
    50x slower (0.5 s instead of 0.01 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_wan() -> torch.nn.Module:
    """A freshly built tiny diffusers ``WanTransformer3DModel`` (skips without diffusers)."""
    pytest.importorskip("diffusers")
    from sagesla.wan_shapes import tiny_wan_transformer

    return tiny_wan_transformer()


@pytest.fixture
def run_readme_example(tmp_path, monkeypatch, capsys):
    """Run the first Python block under a README heading in an empty folder; returns what it printed."""

    def run(heading: str) -> str:
        readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
        code = re.search(r"```python\n(.*?)```", readme.split(heading, 1)[1], re.DOTALL)[1]
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "README.md", "exec"), {})
        return capsys.readouterr().out

    return run
