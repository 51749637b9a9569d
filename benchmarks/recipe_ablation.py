"""The fine-tuning recipe's parts, one at a time (issue 29): ``dogbench run`` with today's defaults, then with each
part on (EMA, mixup + cutmix, RandAugment, random erasing), then all together: same data, epochs and seed, one
feature cache; validation top-1 for choosing, test top-1 scored once, each row against the defaults' on the same
validation and the same test images (paired bootstrap of the top-1 difference, exact McNemar). The validation
pairs come from each row's saved model (its best epoch's) scored again on the run's own validation split: that
must reproduce the validation top-1 the run recorded, or the script stops. Rerunning the command reuses finished
rows (``dogbench run`` resumes and reuses its run folders) and scores them again.

    .venv/bin/python benchmarks/recipe_ablation.py --out /tmp/ablation --classes 20 --method lp-ft --epochs 8

Writes ``recipe_ablation.json`` in --out and prints a Markdown table (the train seconds are wall time, only
comparable on a quiet machine). The default backbone is EfficientNet-Lite0
(../shared/weights); ``--backbone LABEL=SPEC`` takes any other (the weak DINOv2 ViT of the issue, say).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dogbench.cli import main as dogbench
from dogbench.data.download import prepare_dataset
from dogbench.evaluate import compare_paired
from dogbench.inference import load_run
from dogbench.protocols.finetune import train_data
from dogbench.protocols.frozen import extract_stage
from dogbench.rundir import RunDir

SHARED = Path(__file__).resolve().parents[2] / "shared"
RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # timm's train.py and DeiT's


def variants(ema_decay: float, re_prob: float) -> dict[str, list[str]]:
    """Each row's settings (--set values) on top of the defaults."""
    parts = {
        "ema": [f"finetune.ema_decay={ema_decay}"],
        "mixup+cutmix": ["finetune.mixup=0.8", "finetune.cutmix=1.0"],
        "randaugment": [f"finetune.randaugment={RANDAUGMENT}"],
        "random erasing": [f"finetune.re_prob={re_prob}"],
    }
    return {"defaults": [], **parts, "all": [s for settings in parts.values() for s in settings]}


def row_scores(run: Path, label: str) -> dict[str, float]:
    """The fine-tuned row's validation top-1 (what chose its epoch) and test top-1."""
    m = json.loads((run / "results.json").read_text())["models"][label]
    return {"val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"],
            "train_wall_s": m["training"]["train_wall_s"], "best_epoch": m["training"]["best_epoch"]}


def val_correct(run: Path, label: str) -> np.ndarray:
    """Each validation image right or wrong under the row's fine-tuned model, the best epoch's: the run's own
    split (rebuilt from its saved config and the feature cache), through the inference path validation used."""
    cfg = RunDir(run).read_config()
    if cfg.finetune.refit:
        raise SystemExit(f"{run}: a refit model was trained on the validation images too; leave finetune.refit off")
    dataset = prepare_dataset(cfg.data, progress=False)
    data, _, _ = train_data(cfg, dataset, extract_stage(cfg, dataset, progress=False)[label.split("/")[0]])
    model = load_run(run, device=cfg.features.device).models[label]  # where validation ran
    proba, _ = model.predict_views([s.path for s in data.val], plain=True,
                                   boxes=[s.box for s in data.val] if model.crop_to_box else None)
    return proba[0].argmax(axis=1) == data.val_labels


def _vs(paired: dict | None) -> str:
    return "-" if paired is None else (
        f"{paired['delta_top1'] * 100:+.1f} [{paired['delta_top1_ci95'][0] * 100:+.1f}, "
        f"{paired['delta_top1_ci95'][1] * 100:+.1f}], p = {paired['mcnemar_p']:.3g}")


def _line(name: str, s: dict[str, float], paired: dict | None, paired_val: dict | None) -> str:
    return (f"| {name} | {s['val_top1']:.3f} | {_vs(paired_val)} | {s['test_top1']:.3f} | {_vs(paired)} | "
            f"{s['best_epoch']} | {s['train_wall_s']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "stanford-dogs-dev")
    parser.add_argument("--backbone", default=f"cnn=tf_efficientnet_lite0@{SHARED / 'weights'}"
                                               "/tf_efficientnet_lite0.in1k.safetensors")
    parser.add_argument("--classes", type=int, default=0, help="the first N breeds only (0: all)")
    parser.add_argument("--method", default="lp-ft", help="the fine-tuning method (full, lp-ft, partial, lora)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=20, help="the frozen head's trials (lp-ft starts from its probe)")
    parser.add_argument("--ema-decay", type=float, default=0.998,
                        help="the EMA row's decay: about an epoch's average suits a short run (1 - 1 / steps per "
                             "epoch; timm's 0.9998 is for 100k+ steps)")
    parser.add_argument("--re-prob", type=float, default=0.25)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="more settings for every row")
    args = parser.parse_args(argv)
    label = f"{args.backbone.split('=', 1)[0]}/{args.method}"
    common = ["--data", str(args.data), "--cache-dir", str(args.out / "cache"), "--backbone", args.backbone,
              "--methods", f"frozen,{args.method}", "--epochs", str(args.epochs), "--trials", str(args.trials),
              "--set", f"finetune.seed={args.seed}", "--set", "report.enabled=false", "--quiet",
              *(["--classes", str(args.classes)] if args.classes else []),
              *(a for s in args.set for a in ("--set", s))]
    rows = variants(args.ema_decay, args.re_prob)
    table, correct, val = {}, {}, {}
    for name, settings in rows.items():
        run = args.out / ("run-" + name.replace(" ", "-").replace("+", "-"))
        # a finished row with the same settings is reused by `dogbench run` itself; changed ones are refused
        code = dogbench(["run", "--out", str(run), *common, *(a for s in settings for a in ("--set", s))])
        if code != 0:
            return code
        table[name] = row_scores(run, label)
        p = RunDir(run).read_predictions(label)
        correct[name] = p.proba.argmax(axis=1) == p.y_true
        val[name] = val_correct(run, label)
        table[name]["val_top1_again"] = float(val[name].mean())
        if abs(table[name]["val_top1_again"] - table[name]["val_top1"]) > 0.5 / len(val[name]):  # one path
            raise SystemExit(f"{name}: validation scored again gives {table[name]['val_top1_again']:.4f}, "
                             f"the run recorded {table[name]['val_top1']:.4f}")
    paired, paired_val = ({name: compare_paired(name, right[name], "defaults", right["defaults"]).to_dict()
                           for name in rows if name != "defaults"} for right in (correct, val))
    (args.out / "recipe_ablation.json").write_text(json.dumps(
        {"label": label, "settings": rows, "args": {k: str(v) for k, v in vars(args).items()}, "scores": table,
         "paired": paired, "paired_val": paired_val}, indent=2))
    print(f"{label}, {args.epochs} epochs, seed {args.seed}")
    print("| recipe | val top-1 | vs defaults on validation (points [95% CI], McNemar p) | test top-1 | "
          "vs defaults on test | best epoch | train s |")
    print("|---|---|---|---|---|---|---|")
    for name in rows:
        print(_line(name, table[name], paired.get(name), paired_val.get(name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
