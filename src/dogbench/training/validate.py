"""Validation through the one forward path (``features.runner.ModelRunner``) at the precision that scores test:
training picks its best epoch, and WiSE-FT its mix, on the numbers the predictor gives."""

from __future__ import annotations

import numpy as np
import torch

from dogbench import distributed
from dogbench.backbones import Backbone, Preprocess
from dogbench.data import ImageError
from dogbench.device import Policy
from dogbench.features import ImageDataset, ModelRunner, effective_decoder, iter_batches
from dogbench.heads.fit import confusion_counts, confusion_scores
from dogbench.training.data import TrainData
from dogbench.training.model import Classifier, Trainable
from dogbench.training.recipe import TrainParams

VAL_BATCH_SIZE = 64  # the least validation batch (the training batch when larger)


class Validator:
    """Validation through the one forward path (``features.runner.ModelRunner``) at ``policy.precision``, the
    precision that scores test, so training picks its best epoch on the numbers the predictor gives. Under
    torchrun rank r scores images r, r + N, ... and the correct answers are summed over the ranks."""

    def __init__(self, data: TrainData, preprocess: Preprocess, *, policy: Policy, is_vit: bool, batch_size: int,
                 rank: int = 0, world: int = 1) -> None:
        self.labels = data.val_labels[rank::world]
        self.images = ImageDataset.for_preprocess(data.val[rank::world], preprocess, crop_to_box=data.crop_to_box,
                                                  reduced_decode=data.reduced_decode,
                                                  decoder=effective_decoder(data.decoder, preprocess))
        self.preprocess, self.n_classes, self.world = preprocess, data.n_classes, world
        self.policy, self.is_vit = policy, is_vit
        self.batches = [list(range(s, min(s + batch_size, len(self.images))))
                        for s in range(0, len(self.images), batch_size)]

    def proba(self, module: Classifier) -> np.ndarray:
        """(N, C) float64 probabilities of this rank's validation images, computed as the predictor computes a
        fine-tuned model's: the backbone's features through ``ModelRunner`` at ``policy.precision``, then the head
        in float64 (``LinearHead.predict_proba``)."""
        module.eval()
        runner = ModelRunner(module.backbone, self.preprocess, feature_dim=module.head.in_features,
                             policy=self.policy, is_vit=self.is_vit)
        feats = []
        for x, _, errors in iter_batches(self.images, self.batches, workers=0, prefetch=1, pin_memory=False):
            bad = [e for e in errors if e]
            if bad:
                raise ImageError(bad[0])
            feats.append(runner(x))
        if not feats:
            return np.zeros((0, self.n_classes), np.float64)
        X = torch.from_numpy(np.concatenate(feats)).to(self.policy.device, torch.float64)
        weight, bias = (p.detach().to(torch.float64) for p in (module.head.weight, module.head.bias))
        with torch.inference_mode():
            return torch.softmax(torch.nn.functional.linear(X, weight, bias), dim=1).cpu().numpy()

    def scores(self, module: Classifier) -> dict[str, float]:
        """Every ``TuneMetric`` of ``module`` on the validation images of every rank (their confusion counts
        summed over the ranks)."""
        confusion = confusion_counts(self.labels, self.proba(module).argmax(1), self.n_classes)
        if self.world > 1:
            confusion = distributed.all_sum(confusion.to(self.policy.device, torch.float64)).cpu()
        return confusion_scores(confusion)


def validation_proba(trainable: Trainable, backbone: Backbone, data: TrainData, params: TrainParams, *,
                     policy: Policy) -> np.ndarray:
    """(N, C) probabilities of ``trainable.model`` on ``data.val`` in one process, as training's per-epoch
    validation computes them (``Validator``: the predictor's forward path at ``policy.precision``)."""
    trainable.model.to(policy.device, memory_format=policy.memory_format(is_vit=trainable.is_vit))
    validator = Validator(data, backbone.preprocess, policy=policy, is_vit=trainable.is_vit,
                          batch_size=max(params.batch_size, VAL_BATCH_SIZE))
    return validator.proba(trainable.model)


def validation_score(trainable: Trainable, backbone: Backbone, data: TrainData, params: TrainParams, *,
                     policy: Policy) -> float:
    """``params.metric`` (top-1 by default) on ``data.val``, as training's per-epoch validation scores it
    (``validation_proba``)."""
    pred = validation_proba(trainable, backbone, data, params, policy=policy).argmax(1)
    return confusion_scores(confusion_counts(data.val_labels, pred, data.n_classes))[params.metric]
