"""Helpers shared by the tests: FLOP counting, the fused switch, devices, the data."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnlib.core import set_fused  # noqa: F401  (re-exported for the tests)
from attnlib.data import data_root

# The test-suite (and the notebooks nbval runs, which inherit the environment) uses the quick
# profile even on a GPU machine, unless the caller asks for another.
os.environ.setdefault("ATTNLIB_PROFILE", "quick")

CUDA = torch.cuda.is_available()
requires_data = pytest.mark.skipif(not (data_root() / "train.txt").is_file(),
                                   reason="CamVid not found: set ATTNLIB_DATA to the data folder")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none is present on this machine")


def measured_flops(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward pass as ``FlopCounterMode`` counts them, split into conv and matmul."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    conv = counts.pop("aten.convolution", 0)
    return {"conv": conv, "matmul": sum(counts.values())}


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Give every parameter and BN statistic random values, so zero-initialised outputs do not hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module
