"""Two checks behind docs/results/finetuning.md's EfficientNet-Lite0 LP-FT discussion, on ../shared's features:

1. the probe's head on the pretrained network, with batch norms in eval mode (their pretrained statistics) and in
   train mode (statistics of each 32-image batch), scored on the first 256 validation images: why
   ``finetune.freeze_bn_stats`` is on by default;
2. the probe and the tuned head's configuration fitted on the training split alone vs what the frozen protocol
   reports after refitting them on train + validation: how much of LP-FT's gap is the protocol.

    DOGBENCH_CACHE=... python benchmarks/lpft_checks.py --config configs/finetune-cnn.toml --run R

``R`` is the run folder ``dogbench finetune --config configs/finetune-cnn.toml`` wrote (its tuning is read).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dogbench.config import load_config, resolve
from dogbench.data.download import prepare_dataset
from dogbench.device import Policy
from dogbench.features import ImageDataset
from dogbench.protocols.finetune import probe_head, train_data
from dogbench.protocols.frozen import Tuning, extract_stage
from dogbench.rundir import RunDir
from dogbench.training import build_trainable, load_for_training, resolve_params
from dogbench.tune import build_head, make_logistic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = resolve(load_config(args.config))
    dataset = prepare_dataset(cfg.data, progress=False)
    bcfg = cfg.backbones[0]
    bf = extract_stage(cfg, dataset, progress=False)[bcfg.label]
    tuning = RunDir(args.run).read_tuning(bcfg.label, Tuning.from_dict)
    X, y, s = bf.features.features, bf.features.labels, bf.splits
    data, _, _ = train_data(cfg, dataset, bf)
    probe = probe_head(cfg, bf, tuning, len(dataset.classes))

    params = resolve_params(cfg.finetune, "lp-ft", is_vit=False, policy=Policy.resolve("cpu"))
    backbone = load_for_training(bcfg, params)
    model = build_trainable(backbone, len(dataset.classes), params, head_init=probe).model
    images = ImageDataset.for_preprocess(data.val[:256], backbone.preprocess, crop_to_box=False, reduced_decode=True,
                                         decoder="auto")
    for mode in ("eval", "train"):
        model.train(mode == "train")
        logits = []
        with torch.no_grad():
            for start in range(0, 256, 32):
                x = torch.stack([images[j][0] for j in range(start, start + 32)])
                logits.append(model(backbone.preprocess.normalize(x)).numpy())
        top1 = float((np.concatenate(logits).argmax(1) == data.val_labels[:256]).mean())
        print(f"probe head on the network, batch norm in {mode} mode: val top-1 {top1:.4f} (256 images)")

    tuned = build_head(tuning.tune.best_params, max_epochs=tuning.tune.best_epoch, seed=0, device="cpu")
    tuned.fit(X[s.train], y[s.train])
    plain = make_logistic(tuning.baseline.C, device="cpu").fit(X[s.train], y[s.train])
    for name, head in (("tuned head's configuration", tuned), ("C-swept probe", plain)):
        print(f"{name} fitted on train only: val {(head.predict(X[s.val]) == y[s.val]).mean():.4f}, "
              f"test {(head.predict(X[s.test]) == y[s.test]).mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
