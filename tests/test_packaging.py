"""Packaging promises: no top-level `kernels` package, no triton or diffusers import at `import sagesla`."""

import importlib.util
import pathlib
import subprocess
import sys

import sagesla


def test_kernels_installs_under_sagesla_only():
    import sagesla.kernels

    assert pathlib.Path(sagesla.kernels.__file__).parent.name == "kernels"
    spec = importlib.util.find_spec("kernels")
    ours = pathlib.Path(sagesla.kernels.__file__).parent.resolve()
    assert spec is None or pathlib.Path(spec.origin).parent.resolve() != ours


def test_import_does_not_pull_triton_or_diffusers():
    code = "import sys, sagesla; print('triton' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False False"


def test_public_api():
    assert sagesla.__all__ == sorted(sagesla.__all__)
    for name in sagesla.__all__:
        assert hasattr(sagesla, name)
