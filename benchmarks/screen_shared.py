"""``dogbench screen`` against probing everything: the five real backbones of ../shared/weights plus three randomly
initialised ones on ../shared/data/stanford-dogs-dev, screened for 3 finalists, then one full ``dogbench run`` of
all eight in the same cache. Reports whether the screen's finalists are the full run's top 3 by validation top-1,
the rung each random backbone left at, and the images each extracted (the screen's rungs against probing all eight
on the whole training split), in one run.

    .venv/bin/python benchmarks/screen_shared.py --out /tmp/screen-bench [--classes 30] [--third]

``--third`` gives the screen a budget of a third of the images that probing all eight on the whole training split
extracts: with three finalists of eight probed on the whole split the screen cannot extract less than 3/8 of it.

Writes ``screen-bench.json`` in --out and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dogbench.cli import main as dogbench
from dogbench.config import from_mapping, parse_backbone_spec
from dogbench.data import open_dataset, select_classes
from dogbench.screen.command import ScreenRequest, screen

SHARED = Path(__file__).resolve().parents[2] / "shared"
RANDOM = ("rand_resnet18=resnet18@random", "rand_mnv2=mobilenetv2_100@random,seed=1",
          "rand_lite0=tf_efficientnet_lite0@random,seed=2")


def real_specs(weights: Path) -> list[str]:
    return [
        f"lite0=tf_efficientnet_lite0@{weights / 'tf_efficientnet_lite0.in1k.safetensors'}",
        f"lite1=tf_efficientnet_lite1@{weights / 'tf_efficientnet_lite1.in1k.safetensors'}",
        f"lite2=tf_efficientnet_lite2@{weights / 'tf_efficientnet_lite2.in1k.safetensors'}",
        f"mnv2=mobilenetv2_100@{weights / 'mobilenetv2_100.deepsort_in1k.safetensors'}",
        f"dinov2=vit_small_patch14_dinov2@{weights / 'vit_small_patch14_dinov2.imgfocus.fp16.safetensors'},"
        "img_size=224,crop_pct=0.875",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--classes", type=int, default=None, help="the first N breeds only")
    parser.add_argument("--third", action="store_true", help="a budget of a third of probing everything")
    args = parser.parse_args(argv)
    data = args.shared / "data" / "stanford-dogs-dev"
    specs = real_specs(args.shared / "weights") + list(RANDOM)
    cache = args.out / "cache"
    dataset = open_dataset(data)
    if args.classes:
        dataset = select_classes(dataset, args.classes)
    screen_cache = args.out / ("cache-screen-third" if args.third else "cache-screen")  # a cold cache: what it costs
    cfg = from_mapping({"features": {"cache_dir": str(screen_cache)}, "tune": {"trials": 20},
                        "report": {"enabled": False}, **({"data": {"classes": args.classes}} if args.classes else {})})
    start = time.perf_counter()
    budget = len(specs) * len(dataset.split("train")) // 3 if args.third else None
    folder = args.out / ("screen-third" if args.third else "screen")
    request = ScreenRequest(tuple(parse_backbone_spec(s) for s in specs), None, 3, budget, None, folder, force=True)
    outcome, rows = screen(cfg, dataset, request, progress=False)
    screen_s = time.perf_counter() - start
    start = time.perf_counter()
    full = args.out / "full"
    classes = ["--classes", str(args.classes)] if args.classes else []
    code = dogbench(["run", "--data", str(data), "--out", str(full), "--cache-dir", str(cache), *classes,
                     *[x for s in specs for x in ("--backbone", s)], "--trials", "20",
                     "--set", "report.enabled=false", "--quiet", "--force"])
    if code != 0:
        return code
    full_s = time.perf_counter() - start
    models = json.loads((full / "results.json").read_text())["models"]
    by_val = sorted(models, key=lambda m: -models[m]["val"]["top1"])
    n_train = len(dataset.split("train"))
    report = {
        "finalists": list(outcome.finalists), "full_top3_by_val": by_val[:3],
        "same": set(outcome.finalists) == set(by_val[:3]),
        "random_rungs": {r["label"]: r["rung"] for r in rows if r["label"].startswith("rand_")},
        "screen_extracted_rungs": outcome.extracted, "probe_all_on_train": len(specs) * n_train,
        "ratio": len(specs) * n_train / max(1, outcome.extracted), "budget_images": budget,
        "last_rung_per_class": outcome.plan.rungs[-1].per_class, "whole_split": outcome.plan.whole_split,
        "screen_s": screen_s, "full_run_s": full_s,
        "full_val_top1": {m: models[m]["val"]["top1"] for m in by_val},
        "full_test_top1": {m: models[m]["test"]["top1"] for m in by_val},
        "screen_cv_top1": {r["label"]: r["cv"]["top1"] if r["cv"] else None for r in rows},
        "logme_tau": outcome.logme_tau, "logme_p": outcome.logme_p,
    }
    (args.out / "screen-bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
