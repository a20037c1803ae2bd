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
