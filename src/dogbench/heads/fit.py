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

from dogbench.config import Precision

PREDICT_CHUNK = 8192  # rows per forward pass at inference

OnEpoch = Callable[[int, float], None]  # on_epoch(epoch, val_top1), after each epoch's validation


@dataclass(frozen=True)
class FitResult:
    """What training reports: epochs run, the epoch kept (L-BFGS: its iterations), its top-1, per-epoch records."""

    n_epochs: int
    best_epoch: int
    best_val_top1: float | None
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


def top1(module: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``module`` on (X, y), evaluated in chunks without autograd."""
    module.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, X.shape[0], PREDICT_CHUNK):
            logits = module(X[start : start + PREDICT_CHUNK])
            correct += int((logits.argmax(dim=1) == y[start : start + PREDICT_CHUNK]).sum())
    return correct / X.shape[0]


def _epoch_loss(
    module: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, *, batch_size: int,
    label_smoothing: float, bf16: bool,
) -> float:
    """One optimiser step per ``batch_size`` rows of (X, y), in order; the mean training loss over the rows."""
    loss_sum = torch.zeros((), device=X.device)
    for start in range(0, X.shape[0], batch_size):
        xb, yb = X[start : start + batch_size], y[start : start + batch_size]
        with torch.autocast(X.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(module(xb), yb, label_smoothing=label_smoothing)
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
) -> FitResult:
    """Mini-batch AdamW at a constant learning rate (a refit for ``best_epoch`` epochs retraces the validated run);
    with ``val``, early stopping that restores the best epoch's weights. ``bf16``: forward and backward under bf16
    autocast (weights, optimiser and validation stay fp32)."""
    n = X.shape[0]  # X: (n, d) float32 standardised, y: (n,) int64 class indices
    fused = X.device.type in ("cpu", "cuda")  # one kernel per step instead of a loop over parameters
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    shuffle = torch.Generator().manual_seed(seed)
    precision = (Precision.BF16 if bf16 else Precision.FP32).value
    history: list[dict[str, Any]] = []
    best_epoch, best_top1, best_state = 0, -1.0, None
    for epoch in range(1, max_epochs + 1):
        module.train()
        perm = torch.randperm(n, generator=shuffle).to(X.device)
        # one gather per epoch; the batches are views of it
        loss = _epoch_loss(module, optimizer, X[perm], y[perm], batch_size=batch_size,
                           label_smoothing=label_smoothing, bf16=bf16)
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "precision": precision}
        history.append(record)
        if val is None:
            continue
        record["val_top1"] = val_top1 = top1(module, *val)
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
) -> FitResult:
    """Minimise mean cross-entropy + ||W||^2 / (2 C n) (bias unpenalised) by full-batch L-BFGS with a strong-Wolfe
    line search, until the largest gradient entry is at most ``tol``, progress stalls, or ``max_iter`` runs out
    (then a ConvergenceWarning). One "epoch": the solve; its record holds loss, iterations and ``converged``."""
    l2 = 1.0 / (C * X.shape[0])
    optimizer = torch.optim.LBFGS(
        module.parameters(), lr=1.0, max_iter=max_iter, max_eval=25 * max_iter, tolerance_grad=tol,
        tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(X), y, label_smoothing=label_smoothing)
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
    if val is not None:
        record["val_top1"] = top1(module, *val)
        if on_epoch is not None:
            on_epoch(1, record["val_top1"])
    return FitResult(1, iterations, record.get("val_top1"), [record])
