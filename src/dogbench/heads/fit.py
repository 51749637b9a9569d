"""How heads train: the data they train on (checked, standardised, on the device), the AdamW epoch loop with early
stopping, the full-batch L-BFGS solve, and the dropout the MLP head uses.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_X_y, column_or_1d
from torch import nn

from dogbench.config import Balance, Precision, TuneMetric

PREDICT_CHUNK = 8192  # rows per forward pass at inference

OnEpoch = Callable[[int, float], None]  # on_epoch(epoch, val_top1), after each epoch's validation


@dataclass(frozen=True)
class FitResult:
    """What training reports: epochs run, the epoch kept (L-BFGS: its iterations), its top-1, per-epoch records."""

    n_epochs: int
    best_epoch: int
    best_val_top1: float | None  # the best validation score in the head's metric (top-1 unless another is set)
    history: list[dict[str, Any]]


def standard_scaling(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the columns of X (n, d), each (d,) float32; zeros and ones without ``standardize``."""
    if not standardize:
        return np.zeros(X.shape[1], dtype=np.float32), np.ones(X.shape[1], dtype=np.float32)
    std = X.std(axis=0, dtype=np.float64)
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    scale = np.where(std > 0, std, 1.0).astype(np.float32)
    return mean, scale


def standardise(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """(n, d) float32 tensor of ``(X - mean) / scale`` on ``device``."""
    return torch.from_numpy((X - mean) / scale).to(device)


def _label_indices(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Labels -> indices into the sorted ``classes``; labels not among them are an error."""
    idx = np.searchsorted(classes, y).clip(max=len(classes) - 1)
    unknown = classes[idx] != y
    if unknown.any():
        unseen = np.unique(y[unknown])[:10].tolist()
        raise ValueError(f"eval_set has labels not seen in training: {unseen}")
    return idx


@dataclass(frozen=True, eq=False)
class FeatureData:
    """Feature rows (and validation rows) checked, standardised and on the device: what ``fit`` trains on. A search
    builds it once with ``from_arrays`` and passes it to ``fit_prepared`` in every trial."""

    X: torch.Tensor  # (n, d) float32, (X - mean) / scale
    y: torch.Tensor  # (n,) int64 indices into classes
    classes: np.ndarray  # (n_classes,) sorted labels
    mean: np.ndarray  # (d,) float32; zeros without standardisation
    scale: np.ndarray  # (d,) float32; ones without standardisation
    standardize: bool
    val: tuple[torch.Tensor, torch.Tensor] | None  # (n_val, d) float32 standardised, (n_val,) int64 indices

    @classmethod
    def from_arrays(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        *,
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
        standardize: bool = True,
        device: str | torch.device = "cpu",
    ) -> FeatureData:
        """Check (X, y), find the classes and, with ``standardize``, the per-feature mean and scale of X."""
        X, y = check_X_y(X, y, dtype=np.float32, order="C")
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        mean, scale = standard_scaling(X, standardize)
        val = None
        if eval_set is not None:
            X_val = check_array(eval_set[0], dtype=np.float32, order="C")
            y_val = _label_indices(classes, column_or_1d(eval_set[1]))
            if X_val.shape[1] != X.shape[1]:
                raise ValueError(f"eval_set has {X_val.shape[1]} features, X has {X.shape[1]}")
            if len(y_val) != X_val.shape[0]:
                raise ValueError(f"eval_set has {X_val.shape[0]} rows of X but {len(y_val)} labels")
            val = (standardise(X_val, mean, scale, device), torch.from_numpy(y_val.astype(np.int64)).to(device))
        X_t = standardise(X, mean, scale, device)
        return cls(X_t, torch.from_numpy(y_idx.astype(np.int64)).to(device), classes, mean, scale, standardize, val)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def to(self, device: str | torch.device) -> FeatureData:
        """The same data on ``device`` (the tensors themselves when they are there already)."""
        val = None if self.val is None else (self.val[0].to(device), self.val[1].to(device))
        return dataclasses.replace(self, X=self.X.to(device), y=self.y.to(device), val=val)


class FastDropout(nn.Module):
    """Inverted dropout drawing its mask as 16-bit slices of 64-bit random words: ``nn.Dropout``'s distribution
    (p rounded to a multiple of 1/65536) at about an eighth of its cost on CPU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = min(round(self.p * 65536), 65535)  # drop where a uniform int16 falls below cut - 32768
        if not self.training or cut == 0:
            return x
        words = torch.randint(-(2**63), 2**63 - 1, (-(-x.numel() // 4),), dtype=torch.int64, device=x.device)
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= cut - 32768
        return x * keep * (65536 / (65536 - cut))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _predictions(module: nn.Module, X: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.inference_mode():
        return torch.cat([module(X[start : start + PREDICT_CHUNK]).argmax(dim=1)
                          for start in range(0, X.shape[0], PREDICT_CHUNK)])


def val_scores(module: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Every ``TuneMetric`` of ``module`` on (X, y) (``confusion_scores``)."""
    pred = _predictions(module, X)
    return confusion_scores(confusion_counts(y, pred, int(max(int(y.max()), int(pred.max()))) + 1))


def confusion_counts(y: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray, n_classes: int) -> torch.Tensor:
    """The (true, predicted) count matrix of class indices ``y`` and ``pred`` (tensors stay on their device)."""
    y, pred = torch.as_tensor(y, dtype=torch.int64), torch.as_tensor(pred, dtype=torch.int64)
    return torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes).view(n_classes, n_classes)


def confusion_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Every ``TuneMetric`` from a (true, predicted) count matrix: top-1; balanced top-1, the mean recall of the
    classes with rows (scikit-learn's ``balanced_accuracy_score``); macro-F1 over the classes with rows or
    predictions. Fine-tuning's validation sums the matrix over its ranks first."""
    tp, support, predicted = confusion.diag().double(), confusion.sum(1).double(), confusion.sum(0).double()
    seen, present = support > 0, (support + predicted) > 0
    return {
        TuneMetric.TOP1.value: float(tp.sum() / support.sum()),
        TuneMetric.BALANCED_TOP1.value: float((tp[seen] / support[seen]).mean()),
        TuneMetric.MACRO_F1.value: float((2 * tp[present] / (support[present] + predicted[present])).mean()),
    }


def _validate(module: nn.Module, val: tuple[torch.Tensor, torch.Tensor], metric: str, record: dict[str, Any]) -> float:
    """Score ``val`` into ``record`` (``val_top1``, and ``val_<metric>`` for another metric); the metric's value."""
    scores = val_scores(module, *val)
    record["val_top1"] = scores[TuneMetric.TOP1.value]
    if metric != TuneMetric.TOP1:
        record[f"val_{metric}"] = scores[metric]
    return scores[metric]


def balanced_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class loss weights n / (K n_k) (scikit-learn's ``class_weight="balanced"``): every class weighs the same
    in total; a class without rows gets 0."""
    counts = torch.bincount(y, minlength=n_classes).double()
    weights = torch.where(counts > 0, y.shape[0] / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0,
                           weight: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy, each row weighted by its class's ``weight`` (sum over rows / n, as scikit-learn's).
    ``target``: class indices, or (n, C) soft targets (mixup / cutmix, smoothing already in them), whose row
    weight is the targets' mix of the class weights."""
    if target.ndim == 2:
        loss = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
        return (loss if weight is None else loss * (target @ weight.to(target.dtype))).mean()
    if weight is None:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    return (F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
            * weight[target]).mean()


def _epoch_loss(
    module: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, *, batch_size: int,
    label_smoothing: float, bf16: bool, weight: torch.Tensor | None = None,
) -> float:
    """One optimiser step per ``batch_size`` rows of (X, y), in order; the mean training loss over the rows."""
    loss_sum = torch.zeros((), device=X.device)
    for start in range(0, X.shape[0], batch_size):
        xb, yb = X[start : start + batch_size], y[start : start + batch_size]
        with torch.autocast(X.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = weighted_cross_entropy(module(xb), yb, label_smoothing=label_smoothing, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * yb.shape[0]
    return float(loss_sum) / X.shape[0]


def train_adamw(
    module: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    seed: int,
    on_epoch: OnEpoch | None,
    bf16: bool = False,
    balance: str = Balance.NONE,
    metric: str = TuneMetric.TOP1,
) -> FitResult:
    """Mini-batch AdamW at a constant learning rate (a refit for ``best_epoch`` epochs retraces the validated run);
    with ``val``, early stopping on ``metric`` that restores the best epoch's weights. ``bf16``: forward and
    backward under bf16 autocast (weights, optimiser and validation stay fp32). ``balance``: weights = a
    class-weighted loss; sampler = each epoch draws its n rows with replacement, every class equally likely
    (seeded like the shuffle)."""
    n = X.shape[0]  # X: (n, d) float32 standardised, y: (n,) int64 class indices
    fused = X.device.type in ("cpu", "cuda")  # one kernel per step instead of a loop over parameters
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    shuffle = torch.Generator().manual_seed(seed)
    precision = (Precision.BF16 if bf16 else Precision.FP32).value
    history: list[dict[str, Any]] = []
    n_classes = int(y.max()) + 1 if balance != Balance.NONE else 0  # y indexes the classes: every one has rows
    weight = balanced_weights(y, n_classes) if balance == Balance.WEIGHTS else None
    row_p = balanced_weights(y, n_classes)[y].cpu().double() if balance == Balance.SAMPLER else None
    best_epoch, best_top1, best_state = 0, -1.0, None
    for epoch in range(1, max_epochs + 1):
        module.train()
        if row_p is None:
            perm = torch.randperm(n, generator=shuffle).to(X.device)
        else:
            perm = torch.multinomial(row_p, n, replacement=True, generator=shuffle).to(X.device)
        # one gather per epoch; the batches are views of it
        loss = _epoch_loss(module, optimizer, X[perm], y[perm], batch_size=batch_size,
                           label_smoothing=label_smoothing, bf16=bf16, weight=weight)
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "precision": precision}
        history.append(record)
        if val is None:
            continue
        val_top1 = _validate(module, val, metric, record)
        if val_top1 > best_top1:
            best_epoch, best_top1 = epoch, val_top1
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, val_top1)
        if epoch - best_epoch >= patience:
            break
    module.eval()
    if best_state is None:
        return FitResult(len(history), len(history), None, history)
    module.load_state_dict(best_state)
    return FitResult(len(history), best_epoch, best_top1, history)


def lbfgs(
    module: nn.Linear,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    C: float,
    label_smoothing: float,
    max_iter: int,
    tol: float,
    on_epoch: OnEpoch | None,
    balance: str = Balance.NONE,
    metric: str = TuneMetric.TOP1,
) -> FitResult:
    """Minimise mean cross-entropy + ||W||^2 / (2 C n) (bias unpenalised) by full-batch L-BFGS with a strong-Wolfe
    line search, until the largest gradient entry is at most ``tol``, progress stalls, or ``max_iter`` runs out
    (then a ConvergenceWarning). One "epoch": the solve; its record holds loss, iterations and ``converged``.
    ``balance`` weights or sampler: each row's loss weighted by n / (K n_k) (a full batch has no draws to balance:
    the weights are the sampler's expectation); ``metric``: the validation score reported."""
    l2 = 1.0 / (C * X.shape[0])
    weight = balanced_weights(y, module.out_features) if balance != Balance.NONE else None
    optimizer = torch.optim.LBFGS(
        module.parameters(), lr=1.0, max_iter=max_iter, max_eval=25 * max_iter, tolerance_grad=tol,
        tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = weighted_cross_entropy(module(X), y, label_smoothing=label_smoothing, weight=weight)
        loss = loss + 0.5 * l2 * module.weight.pow(2).sum()
        loss.backward()
        return loss

    module.train()
    optimizer.step(closure)
    iterations = int(optimizer.state[module.weight].get("n_iter", 0))
    loss = float(closure().detach())  # the objective and its gradient where the solve ended
    gradient = max(float(p.grad.abs().max()) for p in module.parameters())
    module.eval()
    converged = gradient <= tol  # else max_iter ran out, or progress stalled at float32 resolution
    if not converged and iterations >= max_iter:
        warnings.warn(f"L-BFGS stopped after {iterations} iterations with largest gradient {gradient:.2g} > tol "
                      f"{tol:g} (C={C:g}); raise max_iter or tol", ConvergenceWarning, stacklevel=4)
    record: dict[str, Any] = {"epoch": 1, "train_loss": loss, "iterations": iterations, "converged": converged}
    if val is None:
        return FitResult(1, iterations, None, [record])
    score = _validate(module, val, metric, record)
    if on_epoch is not None:
        on_epoch(1, score)
    return FitResult(1, iterations, score, [record])
