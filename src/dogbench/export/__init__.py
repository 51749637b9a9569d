"""`dogbench export`: one model of a finished run out of dogbench, in timm's own format, ONNX and a Space.

``export_run(run, out, ExportConfig(...))`` writes the folder (config.json + model.safetensors via timm's
``save_for_hf``, model.onnx, README.md as a Hugging Face model card, app.py for a Space), each format checked
against dogbench's predict path; ``load_export(folder)`` reads a timm export back as a classifier.

Names load on first use (PEP 562): ``spec``'s checks run in the CLI before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "TOLERANCE": "spec", "ExportConfig": "spec", "ExportError": "spec", "ExportReport": "spec", "Format": "spec",
    "ParityCheck": "spec", "parse_formats": "spec", "is_export": "spec", "serve_export": "space",
    "ExportedModel": "loaded", "load_export": "loaded",
    "choose_model": "run", "export_run": "run",
    "MLPNotExpressible": "timm_model",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'dogbench.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dogbench.export.{_HOMES[name]}"), name)
