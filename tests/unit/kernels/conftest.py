"""Triton runs on the CPU here, through its interpreter.

triton.jit reads TRITON_INTERPRET when it decorates a kernel, so the variable is set before any
`kernels.triton_*` module is imported; tests import those modules lazily (see the fixtures).
"""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _triton_module(name: str):
    module = importlib.import_module(f"kernels.{name}")
    from kernels.triton_common import is_interpreted

    kernels = [obj for obj in vars(module).values() if obj.__class__.__name__ in ("InterpretedFunction", "JITFunction")]
    assert kernels and all(is_interpreted(k) for k in kernels), f"kernels.{name} was imported before TRITON_INTERPRET=1"
    return module


@pytest.fixture(scope="session")
def triton_gating():
    return _triton_module("triton_gating")


@pytest.fixture(scope="session")
def triton_align():
    return _triton_module("triton_align")


@pytest.fixture(scope="session")
def triton_expert_mlp():
    return _triton_module("triton_expert_mlp")


@pytest.fixture(scope="session")
def triton_combine():
    return _triton_module("triton_combine")
