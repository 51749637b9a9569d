"""The ONNX file: resized and centre-cropped uint8 pixels (B, 3, H, W) in, calibrated probabilities out.

Normalisation is inside the graph, computed as dogbench computes it (``Preprocess.normalize``), so a caller only
resizes and crops (the file's metadata says how: "preprocess", and the class names: "label_names"). Written by
torch's TorchScript exporter: the torch.export-based one takes 5 to 15 times longer on a CPU (7 s against 1.4 s
for a tiny ResNet, 20 s for EfficientNet-Lite0) and, below opset 18, writes another opset than asked for.
Checked with onnxruntime before the export counts as written.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dogbench.backbones import Preprocess
from dogbench.export.spec import ExportError

ONNX_FILE = "model.onnx"
INPUT, OUTPUT = "pixels", "probabilities"
MIN_OPSET = 14  # scaled_dot_product_attention (ViTs) needs 14


class PixelsToProbabilities(nn.Module):
    """uint8 pixels -> normalised float32 -> the backbone and the folded head (standardisation and temperature in
    its weights) -> softmax."""

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32).div(255).sub(self.mean).div(self.std)
        return torch.softmax(self.model(x), dim=1)


def check_onnx_installed() -> None:
    """Refuse the onnx format, before anything is written, where its extra is not installed."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format onnx needs {' and '.join(missing)}: pip install 'dogbench[export]', or export "
                          "--format timm")


def max_opset() -> int:
    """The newest opset both the installed torch exporter and onnx know."""
    import onnx
    from torch.onnx import _constants  # torch publishes no public constant for its exporter's range

    return min(_constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())


def check_opset(opset: int | None) -> None:
    """Refuse an opset the installed torch cannot write, naming the ones it can."""
    if opset is not None and not MIN_OPSET <= opset <= max_opset():
        raise ExportError(f"The installed torch {torch.__version__} cannot write ONNX opset {opset} for this "
                          f"export: choose --opset {MIN_OPSET} to {max_opset()}, or leave it out for torch's default")


def write_onnx(model: nn.Module, preprocess: Preprocess, path: Path, *, example: torch.Tensor, opset: int | None,
               metadata: Mapping[str, Any]) -> int:
    """Write ``model`` with its preprocessing as ``path`` (dynamic batch), ``metadata`` (and the resize and crop
    the input needs, "preprocess") JSON-encoded as the file's metadata properties; the opset written."""
    import onnx

    check_opset(opset)
    wrapped = PixelsToProbabilities(model, preprocess).eval()
    example = example[:2] if len(example) >= 2 else example.repeat(2, 1, 1, 1)  # batch 1 would be traced fixed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice (module docstring)
        try:
            torch.onnx.export(wrapped, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        except (RuntimeError, ValueError) as err:
            raise ExportError(f"torch {torch.__version__} could not write the model as ONNX opset "
                              f"{opset or 'default'}: {str(err).strip().splitlines()[0]}") from None
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in {**metadata,
                                                                       "preprocess": preprocess.to_dict()}.items()})
    onnx.save(proto, str(path))
    return int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))


def onnx_proba(path: Path, pixels: torch.Tensor) -> np.ndarray:
    """Probabilities of uint8 ``pixels`` through ``path`` with onnxruntime on the CPU (float64)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: pixels.numpy()})[0].astype(np.float64)
