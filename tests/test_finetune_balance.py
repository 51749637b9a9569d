"""Imbalanced classes in fine-tuning (``data.balance``, ``tune.metric``): class-balanced draws that replay and
resume, the class-weighted loss (hard and mixed targets) by hand, the validation metric that picks the epoch,
and the run's settings reaching the trained recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from dogbench.config import from_mapping
from dogbench.data import Sample
from dogbench.rundir import TRAIN_STATE_FILE as STATE_FILE
from dogbench.training import (
    TrainData,
    build_trainable,
    draw_probabilities,
    epoch_batches,
    load_for_training,
    train,
)
from dogbench.training.recipe import loss_function
from test_training import POLICY, TINY, params_for, train_files


def imbalanced_data(root: Path, counts: tuple[int, ...] = (12, 2, 2), val_per_class: int = 4) -> TrainData:
    """Tiny JPEGs whose colour says the class: ``counts[c]`` training images of class c, ``val_per_class`` each
    for validation."""
    from conftest import class_image

    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    train_s, val_s = [], []
    for c, n in enumerate(counts):
        for i in range(n + val_per_class):
            path = root / f"c{c}_{i}.jpg"
            class_image(c, size=(40, 36), rng=rng).save(path)
            (train_s if i < n else val_s).append(Sample(path, path.stem, c, "train", None))
    return TrainData(tuple(train_s), np.array([s.label for s in train_s]), tuple(val_s),
                     np.array([s.label for s in val_s]), len(counts))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return imbalanced_data(tmp_path_factory.mktemp("imbalanced"))


def test_the_sampler_draws_every_class_equally_and_replays_each_epoch() -> None:
    labels = np.array([0] * 40 + [1] * 4 + [2] * 4 + [4] * 2)  # class 3 has no image
    p = draw_probabilities(labels)
    assert p.sum() == pytest.approx(1.0)
    assert [p[labels == c].sum() for c in (0, 1, 2, 4)] == pytest.approx([0.25] * 4)
    first = epoch_batches(len(labels), 5, seed=3, epoch=0, draw=p)
    assert all(np.array_equal(a, b) for a, b in zip(first, epoch_batches(len(labels), 5, seed=3, epoch=0, draw=p),
                                                    strict=True))
    assert not np.array_equal(np.concatenate(first), np.concatenate(epoch_batches(len(labels), 5, seed=3, epoch=1,
                                                                                  draw=p)))
    drawn = np.concatenate([np.concatenate(epoch_batches(len(labels), 5, seed=3, epoch=e, draw=p))
                            for e in range(200)])
    shares = np.bincount(labels[drawn], minlength=5) / len(drawn)
    assert shares[3] == 0 and np.abs(shares[[0, 1, 2, 4]] - 0.25).max() < 0.02, shares
    plain = np.concatenate(epoch_batches(len(labels), 5, seed=3, epoch=0))
    assert sorted(plain.tolist()) == list(range(len(labels)))  # without draws: a permutation, as before


def test_the_weighted_loss_is_n_over_k_n_k_per_row_for_hard_and_mixed_targets() -> None:
    params = params_for("full", "cnn", label_smoothing=0.0)
    y = torch.tensor([0, 0, 0, 1])
    counts = torch.bincount(y, minlength=2).double()
    w = (4 / (2 * counts)).float()  # scikit-learn's class_weight="balanced": [2/3, 2]
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 0.0], [0.3, -1.0]])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    hard = loss_function(params, mixed=False, class_weights=w, device=torch.device("cpu"))
    assert float(hard(logits, y)) == pytest.approx(float((ce * w[y]).mean()), rel=1e-6)
    mixed = loss_function(params, mixed=True, class_weights=w, device=torch.device("cpu"))
    onehot = torch.nn.functional.one_hot(y, 2).float()
    assert float(mixed(logits, onehot)) == pytest.approx(float(hard(logits, y)), rel=1e-6)
    half = torch.tensor([[0.5, 0.5]] * 4)  # a 50/50 mix weighs the mean of the two classes' weights
    expected = -(half * torch.log_softmax(logits, 1)).sum(1) * (0.5 * w[0] + 0.5 * w[1])
    assert float(mixed(logits, half)) == pytest.approx(float(expected.mean()), rel=1e-6)
    plain = loss_function(params, mixed=False, class_weights=None, device=torch.device("cpu"))
    assert float(plain(logits, y)) == pytest.approx(float(ce.mean()), rel=1e-6)


def _run(data: TrainData, folder: Path, stop_at: int = -1, **changes: object):
    params = params_for("full", "cnn", epochs=2, **changes)
    backbone = load_for_training(TINY["cnn"], params)

    def on_step(step: int) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    return train(build_trainable(backbone, data.n_classes, params), backbone, data, params, train_files(folder),
                 policy=POLICY, checkpoint_every=2, progress=False, on_step=on_step)


def test_sampler_training_interrupted_mid_epoch_resumes_bitwise_and_picks_the_epoch_by_the_metric(
        data: TrainData, tmp_path: Path) -> None:
    whole = _run(data, tmp_path / "whole", balance="sampler", metric="balanced_top1")
    with pytest.raises(KeyboardInterrupt):  # 16 images, batch 4: 4 steps an epoch; stopped at step 6 (epoch 2)
        _run(data, tmp_path / "cut", stop_at=6, balance="sampler", metric="balanced_top1")
    resumed = _run(data, tmp_path / "cut", balance="sampler", metric="balanced_top1")
    assert resumed.resumed and not whole.resumed
    a, b = (torch.load(d / STATE_FILE, weights_only=True) for d in (tmp_path / "whole", tmp_path / "cut"))
    assert a["step"] == b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"] == b["history"]
    best_a, best_b = (safetensors.torch.load_file(o.best_path) for o in (whole, resumed))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    scores = [h["val_balanced_top1"] for h in whole.history]
    assert all(0 <= h["val_top1"] <= 1 for h in whole.history)
    assert whole.best_val_top1 == max(scores) and whole.best_epoch == scores.index(max(scores)) + 1


def test_the_balance_reaches_the_loss_and_the_draws(data: TrainData, tmp_path: Path) -> None:
    losses = {b: _run(data, tmp_path / b, balance=b).history[0]["train_loss"] for b in ("none", "weights", "sampler")}
    assert len(set(losses.values())) == 3, losses  # the same seed: only the balance differs


def test_the_runs_balance_and_metric_reach_fine_tunings_recipe_and_old_states_keep_their_digest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dogbench.protocols import finetune

    class Stop(Exception):
        pass

    def capture(cfg, run, bcfg, data, params, **kwargs):
        raise Stop(params)

    monkeypatch.setattr(finetune, "_train_once", capture)
    cfg = from_mapping({"data": {"balance": "sampler"}, "tune": {"metric": "macro_f1"},
                        "finetune": {"methods": ["frozen", "lora"]}})
    with pytest.raises(Stop) as stopped:
        finetune.tune_and_train(cfg, None, TINY["vit"], "lora", None, is_vit=True, probe=None,  # type: ignore[arg-type]
                                policy=POLICY, progress=False)
    params = stopped.value.args[0]
    assert (params.balance, params.metric) == ("sampler", "macro_f1")
    assert params.to_dict()["balance"] == "sampler" and params.to_dict()["metric"] == "macro_f1"
    plain = dataclasses.replace(params, balance="none", metric="top1").to_dict()
    assert "balance" not in plain and "metric" not in plain  # a state saved before these settings still resumes
