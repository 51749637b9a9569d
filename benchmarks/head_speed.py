"""Speed of the pieces the head search is built from, on the 2-core development machine.

    DOGBENCH_CACHE=... .venv/bin/python benchmarks/head_speed.py --config benchmarks/shared-dev.toml --out speed.json

(1) The logistic head (full-batch L-BFGS) against scikit-learn's LogisticRegression (lbfgs) on the same standardised
features of the config's first backbone, at C = 1e-3, 1e-2, 0.1: fit seconds, iterations, validation top-1 and the
share of identical test predictions. (2) Warm starts: L-BFGS iterations at 1.3 C from zero and from the solution at
C. (3) One MLP-1024 epoch on 9,600 x 768 synthetic rows in fp32 and under bf16 autocast, at batch 256 and 512, with
and without dropout. Every timing is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from bench_tune import shared_dev_features, synthetic_features
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from dogbench.heads import FeatureData, LogisticHead, MLPHead


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    f = shared_dev_features(args.config)[0]
    data = FeatureData.from_arrays(f.X_train, f.y_train, eval_set=(f.X_val, f.y_val))
    scaler = StandardScaler().fit(f.X_train)
    report: dict = {"features": f.name, "logistic": [], "warm_start": [], "mlp_epoch": []}
    X_val, X_test = scaler.transform(f.X_val), scaler.transform(f.X_test)
    for C in (1e-3, 1e-2, 0.1):
        ours_s, ours = timed(lambda C=C: LogisticHead(C=C).fit_prepared(data), args.repeats)
        sk_s, sk = timed(lambda C=C: LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(f.X_train),
                                                                                 f.y_train), args.repeats)
        row = {"C": C, "ours_s": ours_s, "ours_iterations": ours.n_iter_, "ours_val_top1": ours.best_val_top1_,
               "sklearn_s": sk_s, "sklearn_iterations": int(sk.n_iter_[0]),
               "sklearn_val_top1": float(np.mean(sk.predict(X_val) == f.y_val)),
               "same_test_predictions": float(np.mean(ours.predict(f.X_test) == sk.predict(X_test)))}
        report["logistic"].append(row)
        warm = LogisticHead(C=1.3 * C).fit_prepared(data, init=ours.module_.state_dict())
        cold = LogisticHead(C=1.3 * C).fit_prepared(data)
        report["warm_start"].append({"C": 1.3 * C, "from_zero": cold.n_iter_, "from_solution_at_C": warm.n_iter_})
        print(f"C={C:g}: logistic {ours_s:.2f} s ({ours.n_iter_} it, val {ours.best_val_top1_:.4f}) | scikit-learn "
              f"{sk_s:.2f} s ({row['sklearn_iterations']} it, val {row['sklearn_val_top1']:.4f}) | same test "
              f"predictions {row['same_test_predictions']:.4f} | 1.3C from zero {cold.n_iter_} it, warm "
              f"{warm.n_iter_} it", flush=True)
    syn = synthetic_features()
    mlp_data = FeatureData.from_arrays(syn.X_train, syn.y_train)
    for precision in ("fp32", "bf16"):
        for batch in (256, 512):
            for dropout in (0.0, 0.4):
                head = MLPHead(hidden_size=1024, dropout=dropout, batch_size=batch, max_epochs=3, precision=precision)
                seconds, _ = timed(lambda head=head: head.fit_prepared(mlp_data), args.repeats)
                report["mlp_epoch"].append({"precision": precision, "batch_size": batch, "dropout": dropout,
                                            "epoch_s": seconds / 3})
                print(f"MLP-1024 {precision} batch {batch} dropout {dropout}: {seconds / 3:.3f} s/epoch", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
