"""Test setup: without a GPU, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before anything imports Triton, so this runs before the package is imported.
"""
import os
import sys

import pytest

assert "triton" not in sys.modules, "conftest must run before Triton is imported"

import torch  # noqa: E402  (torch does not import Triton eagerly)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture
def force_backend(monkeypatch):
    """Returns a function that forces DPO_KERNELS_BACKEND for the rest of the test."""

    def force(name: str):
        monkeypatch.setenv("DPO_KERNELS_BACKEND", name)

    return force


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
