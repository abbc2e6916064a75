"""Our top-level `kernels` package must not be taken for Hugging Face's `kernels` by transformers."""

import subprocess
import sys

SCRIPT = """
import kernels
import transformers
from transformers.utils import import_utils
assert kernels.__file__.startswith(%r), kernels.__file__
assert not import_utils.is_kernels_available()
from experts.builtin import build_model
import torch
model = build_model("mixtral")
out = model(torch.tensor([[1, 2, 3]])).logits
assert out.shape == (1, 3, 128) and torch.isfinite(out).all()
print("ok")
"""


def test_transformers_works_beside_our_kernels_package():
    import kernels
    from pathlib import Path

    root = str(Path(kernels.__file__).parent)
    result = subprocess.run([sys.executable, "-c", SCRIPT % root], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
