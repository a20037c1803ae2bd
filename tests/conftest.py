"""Test setup: run Triton kernels under the interpreter when no GPU is present, and keep the repository root off
sys.path.

TRITON_INTERPRET must be set before anything imports triton-jitted code, so this runs first.
No GPU driver is queried: the check looks for a device node only.

`make test` runs the pytest console script, which does not put the current directory on sys.path; `python -m
pytest` from the root does, and the root's `kernels/` folder then shadows the PyPI package `kernels` that
transformers imports (ImportError at collection). The package is installed as `specedit.kernels`, so the root is
never needed on sys.path: drop it for either way of starting pytest.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Property-based tests (hypothesis): bounded so that the default run stays fast; SPECEDIT_FUZZ=1 runs the
# long fuzz (thousands of cases) on demand, e.g. `SPECEDIT_FUZZ=1 .venv/bin/pytest -q tests/test_fuzz.py`.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("specedit", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("specedit-fuzz", parent=settings.get_profile("specedit"), max_examples=1000)
settings.load_profile("specedit-fuzz" if os.environ.get("SPECEDIT_FUZZ") else "specedit")
