"""Imbalanced classes: a deliberately imbalanced slice of ../shared's Stanford Dogs (20 breeds; 40 training images
for 5 of them, 4 for the other 15; their official test images) as a labels CSV, then ``dogbench run`` with
``tune.metric = balanced_top1`` and ``data.balance`` = none, weights and sampler (frozen features, one cache;
with ``--finetune lp-ft`` that method too, balanced the same way: a weighted loss or class-balanced draws).

    .venv/bin/python benchmarks/imbalance.py --out /tmp/imbalance --trials 20 --finetune lp-ft --epochs 8

Writes ``imbalance.json`` in --out and prints a Markdown table: per balance, the tuned head's and the C-swept
probe's test top-1, balanced top-1 and macro-F1, and each balanced head against ``none`` on the same test images
(paired bootstrap of the top-1 difference, exact McNemar): the paired tests compare per-image correctness.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.io

from dogbench.cli import main as dogbench
from dogbench.evaluate import compare_paired
from dogbench.rundir import RunDir

SHARED = Path(__file__).resolve().parents[2] / "shared"
BALANCES = ("none", "weights", "sampler")


def _files(lists: Path, split: str) -> list[str]:
    mat = scipy.io.loadmat(lists / f"{split}_list.mat")
    return sorted(str(f[0][0]) for f in mat["file_list"])


def write_slice(dev: Path, out: Path, *, breeds: int, rich: int, rich_n: int, poor_n: int,
                test_n: int) -> tuple[Path, list[str]]:
    """labels.csv (path,label,split) in ``out`` over a link to ``dev``/Images: the first ``breeds`` breeds, the
    first ``rich`` of them with ``rich_n`` training images, the rest ``poor_n``; ``test_n`` test images each.
    Returns the file and the frequent breeds' names."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "Images").exists():
        (out / "Images").symlink_to(dev / "Images", target_is_directory=True)
    chosen = sorted(p.name for p in (dev / "Images").iterdir())[:breeds]
    rows = ["path,label,split"]
    for split in ("train", "test"):
        files = _files(dev / "lists", split)
        for k, breed in enumerate(chosen):
            n = test_n if split == "test" else (rich_n if k < rich else poor_n)
            rows += [f"Images/{f},{breed.split('-', 1)[1]},{split}" for f in files if f.startswith(breed + "/")][:n]
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out / "labels.csv", [b.split("-", 1)[1] for b in chosen[:rich]]


def scores(run: Path, label: str) -> dict:
    m = json.loads((run / "results.json").read_text())["models"][label]
    pick = ("top1", "balanced_top1", "macro_f1")
    base = m.get("baseline") or {}
    return {"head": m["head"]["kind"] if "head" in m else label.split("/")[1], "tuned": {k: m["test"][k] for k in pick},
            "probe": {k: base["test"][k] for k in pick} if base else None, "per_class": m["test"]["per_class"]}


def _row(balance: str, label: str, s: dict, paired: dict | None) -> str:
    t, p = s["tuned"], s["probe"]
    vs = "" if paired is None else (
        f"{paired['delta_top1'] * 100:+.1f} [{paired['delta_top1_ci95'][0] * 100:+.1f}, "
        f"{paired['delta_top1_ci95'][1] * 100:+.1f}], p = {paired['mcnemar_p']:.3g}")
    probe = f"{p['top1']:.3f} | {p['balanced_top1']:.3f} | {p['macro_f1']:.3f}" if p else "- | - | -"
    return (f"| {label} | {balance} | {s['head']} | {t['top1']:.3f} | {t['balanced_top1']:.3f} | {t['macro_f1']:.3f} | "
            f"{probe} | {vs} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--test-n", type=int, default=20, help="test images per breed")
    parser.add_argument("--finetune", default="", help="a fine-tuning method to run beside the frozen heads")
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs")
    args = parser.parse_args(argv)
    dev = args.shared / "data" / "stanford-dogs-dev"
    weights = args.shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    csv, frequent = write_slice(dev, args.out / "data", breeds=20, rich=5, rich_n=40, poor_n=4, test_n=args.test_n)
    labels = ["cnn"] + ([f"cnn/{args.finetune}"] if args.finetune else [])
    ladder = ["--methods", f"frozen,{args.finetune}", "--epochs", str(args.epochs),
              "--set", "finetune.crop_scale=[0.25,1.0]"] if args.finetune else []
    table: dict[str, dict[str, dict]] = {}
    for balance in BALANCES:
        run = args.out / f"run-{balance}"
        code = dogbench(["run", "--data", str(csv), "--out", str(run), "--cache-dir", str(args.out / "cache"),
                         "--backbone", f"cnn=tf_efficientnet_lite0@{weights}", "--trials", str(args.trials),
                         "--set", f"data.balance={balance}", "--set", "tune.metric=balanced_top1", *ladder,
                         "--set", "report.enabled=false", "--quiet", "--force"])
        if code != 0:
            return code
        table[balance] = {label: scores(run, label) for label in labels}
    paired: dict[str, dict[str, dict]] = {}
    for label in labels:
        correct = {}
        for balance in BALANCES:
            p = RunDir(args.out / f"run-{balance}").read_predictions(label)
            correct[balance] = p.proba.argmax(axis=1) == p.y_true
        paired[label] = {b: compare_paired(b, correct[b], "none", correct["none"]).to_dict() for b in BALANCES[1:]}
    (args.out / "imbalance.json").write_text(json.dumps({"scores": table, "paired": paired}, indent=2))
    print("| model | data.balance | head | test top-1 | balanced top-1 | macro-F1 | probe top-1 | probe balanced | "
          "probe macro-F1 | vs none: top-1 diff [95% CI], McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label in labels:
        for balance in BALANCES:
            print(_row(balance, label, table[balance][label], paired[label].get(balance)))
    for label in labels:
        for balance in BALANCES:
            per_class = table[balance][label]["per_class"]
            rare = [r for c, r in per_class.items() if c not in frequent]
            often = [r for c, r in per_class.items() if c in frequent]
            print(f"{label} {balance}: mean test recall of the {len(rare)} rare breeds {np.mean(rare):.3f}, "
                  f"of the {len(often)} frequent {np.mean(often):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
