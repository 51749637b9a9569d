"""`dogbench export` of a finished run's best model: wall time, file sizes, and per-image CPU latency of the ONNX
file under onnxruntime against dogbench's own predict path and plain timm on the export, on the same photos.

    .venv/bin/python benchmarks/export_speed.py RUN_DIR --json export_speed.json

RUN_DIR is a finished run (the shared-dev run: ``dogbench run --config configs/shared-dev-20.toml``).
Photos: the 80 whole photos of ``../shared/data/stanford-dogs-originals`` (``--photos`` to change). Each latency
is the median of ``--repeats`` timed passes (one warm-up pass first) over the photos, one image per call (batch 1,
what a service sees), decoding included, divided by the number of photos; all measured in this one process, so
the ratios hold on a noisy machine. Threads: torch and onnxruntime both use the machine's cores (their defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dogbench.export import ExportConfig, export_run, load_export
from dogbench.export.onnx_model import INPUT, OUTPUT
from dogbench.inference import collect_images, load_run

ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-dogs-originals" / "Images"


def _median_ms(fn: Callable[[Path], object], photos: list[Path], repeats: int) -> float:
    for p in photos[:4]:
        fn(p)  # warm-up
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in photos:
            fn(p)
        passes.append((time.perf_counter() - t0) / len(photos) * 1000)
    return statistics.median(passes)


def _onnx_runner(folder: Path) -> Callable[[Path], np.ndarray]:
    import onnxruntime
    import timm.data
    from PIL import Image

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = json.loads(session.get_modelmeta().custom_metadata_map["preprocess"])
    resize_crop = timm.data.create_transform(input_size=tuple(cfg["input_size"]), interpolation=cfg["interpolation"],
                                             crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], use_prefetcher=True)

    def run(photo: Path) -> np.ndarray:
        pixels = resize_crop(Image.open(photo).convert("RGB")).unsqueeze(0).numpy()
        return session.run([OUTPUT], {INPUT: pixels})[0]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--photos", type=Path, default=ORIGINALS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="dogbench-export-")) / "export"
    t0 = time.perf_counter()
    report = export_run(args.run_dir, out, ExportConfig(formats=("timm", "onnx")))
    wall = time.perf_counter() - t0
    photos = collect_images([args.photos])
    predictor = load_run(args.run_dir).models[report.label]
    exported = load_export(out)
    onnx = _onnx_runner(out)
    with torch.inference_mode():
        latency = {"dogbench predict": _median_ms(lambda p: predictor.predict_proba([p]), photos, args.repeats),
                   "timm export": _median_ms(lambda p: exported.predict_proba([p]), photos, args.repeats),
                   "onnxruntime": _median_ms(onnx, photos, args.repeats)}
    doc = {"model": report.label, "name": report.name, "why": report.why, "export_wall_s": round(wall, 2),
           "files": dict(report.files), "checks": [c.describe() for c in report.checks], "photos": len(photos),
           "repeats": args.repeats, "threads": torch.get_num_threads(), "latency_ms_per_image":
           {k: round(v, 2) for k, v in latency.items()}}
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
