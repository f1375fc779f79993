"""Query encoders for the CPU in int8: dynamic quantisation of every linear layer of a torch module.

Weights are stored as int8 (per output channel scales), activations are quantised on the fly per call, and the
matrix products run on int8 kernels (FBGEMM on x86, QNNPACK on ARM). Any encoder kind opts in by passing its text
tower (any ``nn.Module``) to :func:`int8_linears`; nothing else of the model changes (embeddings, LayerNorm and
attention stay fp32). `benchmarks/quantize.py` measures speed and recall against fp32.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

ENV_PRECISION = "LDOT_QUERY_PRECISION"  # fp32 or int8: how query encoders run on the CPU
PRECISIONS = ("fp32", "int8")


def query_precision() -> str:
    """The precision of query encoders on the CPU: ``$LDOT_QUERY_PRECISION`` (fp32 or int8), else fp32.

    int8 is about twice as fast for a base-size text tower and kept the task recall of a trained tiny model
    (within a point), but on the synthetic set it kept only ~92% of fp32's top 10 at 100k images (rank flips
    among near-ties), and a server in int8 would not print what a plain process prints: so it is an option,
    not the default (benchmarks/quantize.py)."""
    value = os.environ.get(ENV_PRECISION, "").strip().lower()
    return value if value in PRECISIONS else "fp32"


def int8_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return any(e in engines for e in ("fbgemm", "x86", "qnnpack"))


def int8_linears(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.Linear`` (subclasses too) replaced by a dynamically quantised int8 one (weights
    per output channel), in place; returned as is where this torch has no int8 kernels. Inference on the CPU only:
    the module is put in eval mode."""
    if not int8_available():
        return module
    module.eval()
    if isinstance(module, nn.Linear):
        return _int8(module) if module.weight.device.type == "cpu" else module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if child.weight.device.type == "cpu":  # not a tower left unloaded (meta) nor one on a GPU
                setattr(module, name, _int8(child))
        else:
            int8_linears(child)
    return module


def _int8(linear: nn.Linear) -> nn.Module:
    return Int8Linear(linear)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in int8 (symmetric, one scale per output row) and ``x`` quantised on
    each call (torch's dynamic quantised linear: FBGEMM on x86, QNNPACK on ARM). What `torch.ao`'s
    ``quantize_dynamic`` builds, in one pass over the weights (it packs each matrix three times: 9 s instead of
    the load's 0.4 s for a base-size tower at load ~11 here)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            weight = linear.weight.detach().float()
            scale = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-8).double()
            with warnings.catch_warnings():  # quantised tensors are deprecated in favour of torchao's
                warnings.simplefilter("ignore")
                qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                                     torch.qint8)
                bias = None if linear.bias is None else linear.bias.detach().float()
                self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, as torch's module does (no overflow in FBGEMM's AVX2 kernels)
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
