"""Choices the head search was measured with and left out: feature normalisation before the probe, and averaging
the probabilities of the best trials instead of taking the best one.

    .venv/bin/python benchmarks/head_choices.py --config configs/shared-dev.toml --out choices.json

For every backbone of the config (cached features; run ``dogbench run`` on it first), split as ``dogbench run``
splits: (1) the C-swept logistic probe on standardised features, on L2-normalised then standardised features, and
on signed-square-root ("power") then standardised features, each swept on validation and scored on test after
training on train; (2) a 100-trial study started from the probe (as ``dogbench run`` tunes), then the average of
the probabilities of its k best completed trials, each trained on train, for k = 1, 3, 5, 10. Validation top-1
picks; test top-1 is reported beside it so a choice that only wins on validation shows as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_tune import shared_dev_features  # this folder's benchmark: the config's cached features, split

from dogbench.config import TuneConfig
from dogbench.tune import build_head, sweep_logistic_C, tune_head

NORMALISATIONS = {
    "standardise": lambda X: X,
    "l2 + standardise": lambda X: X / np.linalg.norm(X, axis=1, keepdims=True).clip(min=1e-12),
    "power + standardise": lambda X: np.sign(X) * np.sqrt(np.abs(X)),
}


def top1(proba: np.ndarray, classes: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(classes[proba.argmax(axis=1)] == y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args(argv)
    report: dict[str, dict] = {}
    for f in shared_dev_features(args.config):
        label = f.name.split()[0]
        rows: dict[str, dict] = {}
        for name, norm in NORMALISATIONS.items():
            Xtr, Xva, Xte = (norm(X.astype(np.float32)) for X in (f.X_train, f.X_val, f.X_test))
            sweep = sweep_logistic_C(Xtr, f.y_train, Xva, f.y_val)
            head = sweep.heads[(sweep.C, 0.0)]
            rows[f"probe, {name}"] = {"C": sweep.C, "val_top1": sweep.val_top1,
                                      "test_top1": float(np.mean(head.predict(Xte) == f.y_test))}
            print(f"{label:6s} probe, {name:22s} C={sweep.C:<8.3g} val {sweep.val_top1:.4f}  "
                  f"test {rows[f'probe, {name}']['test_top1']:.4f}", flush=True)
            if name == "standardise":
                baseline = sweep
        tuned = tune_head(f.X_train, f.y_train, f.X_val, f.y_val, cfg=TuneConfig(trials=args.trials),
                          storage=None, study_name=label, progress=False, baseline=baseline)
        best = sorted((h for h in tuned.history if h["state"] == "COMPLETE"), key=lambda h: -h["value"])[:10]
        probas_val, probas_test = [], []
        for h in best:
            head = build_head(h["params"], max_epochs=h["best_epoch"], seed=0).fit(f.X_train, f.y_train)
            probas_val.append(head.predict_proba(f.X_val))
            probas_test.append(head.predict_proba(f.X_test))
            classes = head.classes_
        for k in (1, 3, 5, 10):
            r = rows[f"average of the {k} best trials"] = {
                "val_top1": top1(np.mean(probas_val[:k], axis=0), classes, f.y_val),
                "test_top1": top1(np.mean(probas_test[:k], axis=0), classes, f.y_test),
                "trials": [h["number"] for h in best[:k]], "kinds": [h["params"]["head"] for h in best[:k]],
            }
            print(f"{label:6s} average of the {k:2d} best trials ({'+'.join(sorted(set(r['kinds'])))}): "
                  f"val {r['val_top1']:.4f}  test {r['test_top1']:.4f}", flush=True)
        report[label] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
