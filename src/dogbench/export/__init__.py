"""`dogbench export`: one model of a finished run out of dogbench, in timm's own format, ONNX and a Space.

``export_run(run, out, ExportConfig(...))`` writes the folder (config.json + model.safetensors via timm's
``save_for_hf``, model.onnx, README.md as a Hugging Face model card, app.py for a Space), each format checked
against dogbench's predict path; ``load_export(folder)`` reads a timm export back as a classifier.
"""

from dogbench.export.loaded import ExportedModel, load_export
from dogbench.export.run import choose_model, export_run
from dogbench.export.spec import (
    TOLERANCE,
    ExportConfig,
    ExportError,
    ExportReport,
    Format,
    ParityCheck,
    parse_formats,
)
from dogbench.export.timm_model import MLPNotExpressible

__all__ = [
    "TOLERANCE",
    "ExportConfig",
    "ExportError",
    "ExportReport",
    "ExportedModel",
    "Format",
    "MLPNotExpressible",
    "ParityCheck",
    "choose_model",
    "export_run",
    "load_export",
    "parse_formats",
]
