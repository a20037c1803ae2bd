"""Test setup: run Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before anything imports triton-jitted code, so this runs first.
No GPU driver is queried: the check looks for a device node only.
"""

import os

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
