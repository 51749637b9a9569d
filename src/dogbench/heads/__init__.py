"""Classifier heads trained with torch on cached features, behind the scikit-learn contract.

``LogisticHead`` is multinomial L2 logistic regression solved to convergence by full-batch L-BFGS (the
objective of scikit-learn's ``LogisticRegression(C=...)``, so the C-swept probe and the search share one model);
``LinearHead`` is the same model trained by mini-batch AdamW with early stopping; ``MLPHead`` is the reference's
dense head (``Linear -> activation -> Dropout`` repeated ``n_layers`` times, then ``Linear``). The AdamW heads
train at a constant learning rate and stop early on validation top-1 when given an ``eval_set``. Every head
saves to a directory as ``head.json`` + ``head.safetensors`` (no pickle).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y, column_or_1d, validate_data
from torch import nn

from dogbench.atomic import atomic_write_bytes, atomic_write_text
from dogbench.config import HEAD_KINDS, HeadKind
from dogbench.device import fast_bf16_matmul
from dogbench.errors import DogbenchError

__all__ = [
    "HEAD_KINDS",
    "META_FILE",
    "TENSORS_FILE",
    "Activation",
    "Head",
    "HeadKind",
    "HeadFileError",
    "HeadIdentityError",
    "LinearHead",
    "LogisticHead",
    "MLPHead",
    "TrainingData",
    "check_identity",
    "head_class",
    "head_identity",
    "load_head",
    "read_head_meta",
    "make_head",
]

META_FILE = "head.json"
TENSORS_FILE = "head.safetensors"
FORMAT_VERSION = 1
_PREDICT_CHUNK = 8192  # rows per forward pass at inference


class Activation(StrEnum):
    GELU = "gelu"
    RELU = "relu"


_ACTIVATIONS: dict[Activation, type[nn.Module]] = {Activation.GELU: nn.GELU, Activation.RELU: nn.ReLU}


E = TypeVar("E", bound=StrEnum)


def _parse_choice(enum_cls: type[E], value: str, what: str) -> E:
    """``enum_cls(value)``, or a ValueError that suggests the closest name and lists the valid ones."""
    try:
        return enum_cls(value)
    except ValueError:
        known = [member.value for member in enum_cls]
        close = difflib.get_close_matches(str(value), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown {what} {value!r}.{hint} Known: {', '.join(known)}") from None


@dataclass(frozen=True)
class _TrainResult:
    n_epochs: int
    best_epoch: int
    best_val_top1: float | None
    history: list[dict[str, float]]


def _top1(module: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``module`` on (X, y), evaluated in chunks without autograd."""
    module.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, X.shape[0], _PREDICT_CHUNK):
            logits = module(X[start : start + _PREDICT_CHUNK])
            correct += int((logits.argmax(dim=1) == y[start : start + _PREDICT_CHUNK]).sum())
    return correct / X.shape[0]


def _train(
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
    on_epoch: Callable[[int, float], None] | None,
    bf16: bool = False,
) -> _TrainResult:
    """Mini-batch AdamW; with ``val``, early stopping that restores the best epoch's weights. With ``bf16`` the
    forward and backward passes run under bf16 autocast (weights, optimiser and validation stay fp32).

    The learning rate is constant, so a refit for ``best_epoch`` epochs on train+val follows the
    trajectory that tuning validated (a cosine schedule would be compressed into the shorter run).
    """
    n = X.shape[0]  # X: (n, d) float32 standardised, y: (n,) int64 class indices
    fused = X.device.type in ("cpu", "cuda")  # one kernel per step instead of a loop over parameters
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    shuffle = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best_epoch, best_top1, best_state = 0, -1.0, None
    for epoch in range(1, max_epochs + 1):
        module.train()
        perm = torch.randperm(n, generator=shuffle).to(X.device)
        X_epoch, y_epoch = X[perm], y[perm]  # one gather per epoch; the batches are views of it
        loss_sum = torch.zeros((), device=X.device)
        for start in range(0, n, batch_size):
            xb, yb = X_epoch[start : start + batch_size], y_epoch[start : start + batch_size]
            with torch.autocast(X.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(module(xb), yb, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * yb.shape[0]
        record = {"epoch": epoch, "train_loss": float(loss_sum) / n, "precision": "bf16" if bf16 else "fp32"}
        history.append(record)
        if val is None:
            continue
        record["val_top1"] = top1 = _top1(module, *val)
        if top1 > best_top1:
            best_epoch, best_top1 = epoch, top1
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, top1)
        if epoch - best_epoch >= patience:
            break
    module.eval()
    if best_state is None:
        return _TrainResult(len(history), len(history), None, history)
    module.load_state_dict(best_state)
    return _TrainResult(len(history), best_epoch, best_top1, history)


class _Dropout(nn.Module):
    """Inverted dropout drawing its mask as 16-bit slices of 64-bit random words.

    Same distribution as ``nn.Dropout`` (with p rounded to a multiple of 1/65536) but about 8x
    cheaper on CPU, where per-element Bernoulli sampling took over half of an MLP training step.
    """

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


def _classifier_layer(in_features: int, n_classes: int) -> nn.Linear:
    """Final layer, initialised small (N(0, 0.01^2), zero bias) so training starts near uniform."""
    layer = nn.Linear(in_features, n_classes)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


def _standardise(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, device: str | torch.device) -> torch.Tensor:
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
class TrainingData:
    """Training rows (and validation rows, when given) checked, standardised and on the device: what ``fit`` trains on.

    ``fit`` builds one per call. A search that trains many heads on the same rows builds it once with
    ``from_arrays`` and passes it to ``fit_prepared`` in every trial, so no trial repeats the conversion.
    """

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
    ) -> TrainingData:
        """Check (X, y), find the classes and, with ``standardize``, the per-feature mean and scale of X."""
        X, y = check_X_y(X, y, dtype=np.float32, order="C")
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if standardize:
            std = X.std(axis=0, dtype=np.float64)
            mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
            scale = np.where(std > 0, std, 1.0).astype(np.float32)
        else:
            mean, scale = np.zeros(X.shape[1], dtype=np.float32), np.ones(X.shape[1], dtype=np.float32)
        val = None
        if eval_set is not None:
            X_val = check_array(eval_set[0], dtype=np.float32, order="C")
            y_val = _label_indices(classes, column_or_1d(eval_set[1]))
            if X_val.shape[1] != X.shape[1]:
                raise ValueError(f"eval_set has {X_val.shape[1]} features, X has {X.shape[1]}")
            if len(y_val) != X_val.shape[0]:
                raise ValueError(f"eval_set has {X_val.shape[0]} rows of X but {len(y_val)} labels")
            val = (_standardise(X_val, mean, scale, device), torch.from_numpy(y_val.astype(np.int64)).to(device))
        X_t = _standardise(X, mean, scale, device)
        return cls(X_t, torch.from_numpy(y_idx.astype(np.int64)).to(device), classes, mean, scale, standardize, val)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def to(self, device: str | torch.device) -> TrainingData:
        """The same data on ``device`` (the tensors themselves when they are there already)."""
        val = None if self.val is None else (self.val[0].to(device), self.val[1].to(device))
        return dataclasses.replace(self, X=self.X.to(device), y=self.y.to(device), val=val)


def _rng_devices(device: torch.device) -> list[int]:
    """Accelerator indices whose RNG state training on ``device`` consumes (dropout masks)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Shared fit / predict / save logic; subclasses define ``__init__``, ``_build_module`` and ``_train_module``."""

    _kind: ClassVar[HeadKind]

    standardize: bool
    seed: int
    device: str

    def _build_module(self, n_features: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def _train_module(
        self, module: nn.Module, data: TrainingData, on_epoch: Callable[[int, float], None] | None
    ) -> _TrainResult:
        raise NotImplementedError

    def _param_problems(self) -> list[str]:
        return []

    def _check_params(self) -> None:
        problems = self._param_problems()
        if problems:
            raise ValueError(f"Invalid {type(self).__name__} parameters: " + "; ".join(problems))

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
        on_epoch: Callable[[int, float], None] | None = None,
    ) -> Self:
        """Train on (X, y). With ``eval_set``, the epoch-trained heads stop early on its top-1 and keep the best
        epoch; the logistic head records its top-1 as it converges.

        ``on_epoch(epoch, val_top1)`` runs after each epoch (for the logistic head: once, after the solve) when
        ``eval_set`` is given; whatever it raises (e.g. ``optuna.TrialPruned``) propagates.
        To train for a fixed number of epochs (e.g. a refit for a tuned ``best_epoch``), set ``max_epochs``
        with ``set_params``.
        """
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32, order="C")
        if eval_set is not None:
            eval_set = (validate_data(self, eval_set[0], reset=False, dtype=np.float32, order="C"), eval_set[1])
        data = TrainingData.from_arrays(X, y, eval_set=eval_set, standardize=self.standardize, device=self.device)
        return self._fit_data(data, on_epoch=on_epoch)

    def fit_prepared(
        self, data: TrainingData, *, on_epoch: Callable[[int, float], None] | None = None,
        init: Mapping[str, torch.Tensor] | None = None,
    ) -> Self:
        """``fit`` on data already checked and standardised by ``TrainingData.from_arrays``.

        The data's ``standardize`` must be this head's. Training is the same as ``fit`` on the arrays the data
        was built from, to the bit; only the per-call conversion is skipped. ``init`` (the ``module_.state_dict()``
        of a head of this kind fitted on the same data) starts training from those weights: a warm start.
        """
        self._check_params()
        if data.standardize != self.standardize:
            raise ValueError(
                f"TrainingData was built with standardize={data.standardize}, this head has {self.standardize}"
            )
        self.n_features_in_ = data.n_features
        if hasattr(self, "feature_names_in_"):  # left by an earlier fit on a DataFrame
            del self.feature_names_in_
        return self._fit_data(data.to(self.device), on_epoch=on_epoch, init=init)

    def _fit_data(
        self, data: TrainingData, *, on_epoch: Callable[[int, float], None] | None,
        init: Mapping[str, torch.Tensor] | None = None,
    ) -> Self:
        device = torch.device(self.device)
        # Init and dropout draw from torch's global RNG: seed it locally, leave the caller's state alone.
        with torch.random.fork_rng(devices=_rng_devices(device), device_type=device.type):
            torch.manual_seed(self.seed)
            module = self._build_module(data.n_features, len(data.classes)).to(device)
            if init is not None:
                module.load_state_dict(init)
            result = self._train_module(module, data, on_epoch)
        # Learned state is set only once training has finished (on_epoch may abort it).
        self.classes_, self.mean_, self.scale_, self.module_ = data.classes, data.mean, data.scale, module
        self.n_epochs_ = result.n_epochs
        self.best_epoch_ = result.best_epoch
        self.best_val_top1_ = result.best_val_top1
        self.history_ = result.history
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, n_classes) float64 class probabilities, columns in ``classes_`` order.

        The forward pass runs in float64 so a row's output does not depend on its batch.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        model = copy.deepcopy(self.module_).to(torch.float64).eval()
        Xs = _standardise(X, self.mean_, self.scale_, self.device)
        proba = np.empty((X.shape[0], len(self.classes_)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, X.shape[0], _PREDICT_CHUNK):
                logits = model(Xs[start : start + _PREDICT_CHUNK].to(torch.float64))
                proba[start : start + _PREDICT_CHUNK] = torch.softmax(logits, dim=1).cpu().numpy()
        return proba

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most probable label per row (ties go to the earlier class), in the original label type."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    def save(
        self, path: Path, *, identity: Mapping[str, Any] | None = None, class_names: Sequence[str] | None = None,
        temperature: float | None = None,
    ) -> None:
        """Write ``path/head.safetensors`` then ``path/head.json`` (params, classes, learned scalars).

        ``identity`` says what the head belongs to (the backbone's timm tag, weights sha256, feature key,
        preprocessing) and ``class_names`` what its labels mean; both are checked and returned on load;
        ``temperature`` is the calibration fitted on validation (``predict_proba`` stays uncalibrated). The
        device it was trained on is not saved: a head loads on the CPU unless asked otherwise. Each file is
        replaced atomically; the JSON, written last, records the tensors' sha256 so a torn pair is detected.
        """
        check_is_fitted(self)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
        tensors["mean"] = torch.from_numpy(self.mean_)
        tensors["scale"] = torch.from_numpy(self.scale_)
        blob = safetensors.torch.save(tensors)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self._kind.value,
            "params": {k: v for k, v in self.get_params().items() if k != "device"},
            "classes": self.classes_.tolist(),
            "class_names": list(class_names) if class_names is not None else None,
            "identity": dict(identity) if identity is not None else None,
            "temperature": temperature,
            "n_features_in": int(self.n_features_in_),
            "n_epochs": self.n_epochs_,
            "best_epoch": self.best_epoch_,
            "best_val_top1": self.best_val_top1_,
            "history": self.history_,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        }
        text = json.dumps(meta, indent=2)  # fails before writing anything if classes are not JSON-able
        atomic_write_bytes(path / TENSORS_FILE, blob)
        atomic_write_text(path / META_FILE, text)

    @classmethod
    def load(cls, path: Path, *, device: str = "cpu") -> Self:
        """Load a head saved by ``save``; it must be of this class (``load_head`` takes any kind)."""
        head = load_head(path, device=device)
        if not isinstance(head, cls):
            raise TypeError(f"{path} holds a {type(head).__name__}, not a {cls.__name__}; use load_head()")
        return head

    def _restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.classes_ = np.asarray(meta["classes"])
        self.n_features_in_ = meta["n_features_in"]
        self.mean_ = tensors.pop("mean").numpy()
        self.scale_ = tensors.pop("scale").numpy()
        state = {k.removeprefix("module."): v for k, v in tensors.items()}
        with torch.device("meta"):  # shapes only: no init, no RNG draws
            module = self._build_module(self.n_features_in_, len(self.classes_))
        module.load_state_dict(state, assign=True)
        self.module_ = module.to(self.device).eval()
        self.n_epochs_ = meta["n_epochs"]
        self.best_epoch_ = meta["best_epoch"]
        self.best_val_top1_ = meta["best_val_top1"]
        self.history_ = meta["history"]


TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast where bf16 matmuls are fast, else fp32


class _EpochHead(_TorchHead):
    """A head trained by mini-batch AdamW for up to ``max_epochs``, stopping early on validation top-1."""

    lr: float
    weight_decay: float
    label_smoothing: float
    max_epochs: int
    patience: int
    batch_size: int
    precision: str

    def _param_problems(self) -> list[str]:
        checks = [
            (self.precision in TRAIN_PRECISIONS,
             f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
        ]
        return [message for ok, message in checks if not ok]

    def _train_module(
        self, module: nn.Module, data: TrainingData, on_epoch: Callable[[int, float], None] | None
    ) -> _TrainResult:
        return _train(
            module, data.X, data.y, val=data.val, lr=self.lr, weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing, batch_size=self.batch_size, max_epochs=self.max_epochs,
            patience=self.patience, seed=self.seed, on_epoch=on_epoch, bf16=self._bf16(data.X.device),
        )

    def _bf16(self, device: torch.device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and fast_bf16_matmul(device))


def _lbfgs(
    module: nn.Linear,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    C: float,
    label_smoothing: float,
    max_iter: int,
    tol: float,
    on_epoch: Callable[[int, float], None] | None,
) -> _TrainResult:
    """Minimise mean cross-entropy + ||W||^2 / (2 C n) (bias unpenalised; scikit-learn's LogisticRegression
    objective divided by C n) by full-batch L-BFGS with a strong-Wolfe line search, until the largest gradient
    entry is at most ``tol``, progress stalls (no change of the loss or the weights above 1e-9), or ``max_iter``
    iterations have run (then, short of ``tol``, a ConvergenceWarning as scikit-learn gives). A start that already
    meets ``tol`` (a warm start from this objective's solution) is returned unchanged. One "epoch": the solve; its
    record holds the final loss, iterations and ``converged``."""
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
    record = {"epoch": 1, "train_loss": loss, "iterations": iterations, "converged": converged}
    if val is not None:
        record["val_top1"] = _top1(module, *val)
        if on_epoch is not None:
            on_epoch(1, record["val_top1"])
    return _TrainResult(1, iterations, record.get("val_top1"), [record])


class LogisticHead(_TorchHead):
    """Multinomial L2 logistic regression on (optionally standardised) features, solved by full-batch L-BFGS.

    The objective is scikit-learn's ``LogisticRegression(C=C)`` (L2 on the weights, not the bias), plus optional
    label smoothing; the fit is deterministic and runs to convergence, so ``seed`` only exists for a uniform
    interface. ``best_epoch_`` is the number of L-BFGS iterations, ``best_val_top1_`` the converged model's
    top-1 on ``eval_set``.
    """

    _kind = HeadKind.LOGISTIC

    def __init__(
        self,
        *,
        C: float = 1.0,
        label_smoothing: float = 0.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        standardize: bool = True,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.C = C
        self.label_smoothing = label_smoothing
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.seed = seed
        self.device = device

    def _param_problems(self) -> list[str]:
        checks = [
            (self.C > 0, f"C must be > 0, got {self.C}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.max_iter >= 1, f"max_iter must be >= 1, got {self.max_iter}"),
            (self.tol > 0, f"tol must be > 0, got {self.tol}"),
        ]
        return [message for ok, message in checks if not ok]

    def _build_module(self, n_features: int, n_classes: int) -> nn.Module:
        layer = nn.Linear(n_features, n_classes)
        nn.init.zeros_(layer.weight)  # the solver's start (scikit-learn's too): uniform probabilities
        nn.init.zeros_(layer.bias)
        return layer

    @property
    def n_iter_(self) -> int:
        """L-BFGS iterations run (scikit-learn's name); AttributeError before fit, as for any learned attribute."""
        return self.best_epoch_

    def _train_module(
        self, module: nn.Module, data: TrainingData, on_epoch: Callable[[int, float], None] | None
    ) -> _TrainResult:
        return _lbfgs(
            module, data.X, data.y, val=data.val, C=self.C, label_smoothing=self.label_smoothing,
            max_iter=self.max_iter, tol=self.tol, on_epoch=on_epoch,
        )


class LinearHead(_EpochHead):
    """Multinomial logistic regression on (optionally standardised) features, trained by mini-batch AdamW."""

    _kind = HeadKind.LINEAR

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        max_epochs: int = 100,
        patience: int = 10,
        batch_size: int = 256,
        precision: str = "auto",
        standardize: bool = True,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.precision = precision
        self.standardize = standardize
        self.seed = seed
        self.device = device

    def _build_module(self, n_features: int, n_classes: int) -> nn.Module:
        return _classifier_layer(n_features, n_classes)


def fitted_linear_head(
    layer: nn.Linear, *, best_epoch: int, best_val_top1: float, history: list[dict[str, Any]]
) -> LinearHead:
    """A LinearHead holding a linear layer trained elsewhere (a fine-tuned model's classifier) on raw features,
    classes 0..C-1: saved, loaded, identity-checked and used by the inference path like any tuned head."""
    n_classes, n_features = layer.weight.shape
    head = LinearHead(standardize=False)
    head.classes_ = np.arange(n_classes)
    head.mean_ = np.zeros(n_features, dtype=np.float32)
    head.scale_ = np.ones(n_features, dtype=np.float32)
    head.module_ = copy.deepcopy(layer).cpu().float().eval().requires_grad_(False)
    head.n_features_in_ = n_features
    head.n_epochs_, head.best_epoch_, head.best_val_top1_, head.history_ = len(history), best_epoch, best_val_top1, \
        history
    return head


class MLPHead(_EpochHead):
    """``(Linear -> activation -> Dropout) x n_layers -> Linear``; hidden layers use torch's default init."""

    _kind = HeadKind.MLP

    def __init__(
        self,
        *,
        hidden_size: int = 1024,
        n_layers: int = 1,
        dropout: float = 0.5,
        activation: str = "gelu",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        max_epochs: int = 100,
        patience: int = 10,
        batch_size: int = 256,
        precision: str = "auto",
        standardize: bool = True,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.dropout = dropout
        self.activation = activation
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.precision = precision
        self.standardize = standardize
        self.seed = seed
        self.device = device

    def _param_problems(self) -> list[str]:
        checks = [
            (self.hidden_size >= 1, f"hidden_size must be >= 1, got {self.hidden_size}"),
            (self.n_layers >= 1, f"n_layers must be >= 1 (use LinearHead for none), got {self.n_layers}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
        ]
        return super()._param_problems() + [message for ok, message in checks if not ok]

    def _check_params(self) -> None:
        super()._check_params()
        _parse_choice(Activation, self.activation, "activation")

    def _build_module(self, n_features: int, n_classes: int) -> nn.Module:
        act = _ACTIVATIONS[Activation(self.activation)]
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(self.n_layers):
            layers += [nn.Linear(width, self.hidden_size), act(), _Dropout(self.dropout)]
            width = self.hidden_size
        layers.append(_classifier_layer(width, n_classes))
        return nn.Sequential(*layers)


_HEAD_CLASSES: dict[HeadKind, type[LogisticHead | LinearHead | MLPHead]] = {
    HeadKind.LOGISTIC: LogisticHead,
    HeadKind.LINEAR: LinearHead,
    HeadKind.MLP: MLPHead,
}


Head = LogisticHead | LinearHead | MLPHead


def head_class(kind: str) -> type[Head]:
    """The class of a head kind (one of ``HEAD_KINDS``); a ValueError names the valid kinds."""
    return _HEAD_CLASSES[_parse_choice(HeadKind, kind, "head kind")]


def make_head(kind: str, **params: Any) -> Head:
    """Construct a head by kind name (one of ``HEAD_KINDS``) with the given hyper-parameters."""
    return head_class(kind)(**params)


class HeadFileError(DogbenchError, ValueError):
    """A saved head that cannot be read, or that belongs to another backbone than the one it is loaded for."""


# what a head's features come from: the backbone, its preprocessing, how images became features, which features
IDENTITY_KEYS = ("timm_tag", "weights_sha256", "preprocess", "features", "feature_key")


def head_identity(
    *, timm_tag: str, weights_sha256: str, preprocess: Mapping[str, Any], features: Mapping[str, Any],
    feature_key: str | None = None,
) -> dict:
    """What a head belongs to: the backbone (tag, weights), its preprocessing, the feature settings (precision,
    decoder, reduced decoding, box crop, compile) and, when known, the key of the features it was trained on."""
    identity = {"timm_tag": timm_tag, "weights_sha256": weights_sha256, "preprocess": dict(preprocess),
                "features": dict(features)}
    if feature_key is not None:
        identity["feature_key"] = feature_key
    return identity


class HeadIdentityError(DogbenchError, ValueError):
    """A head trained for another backbone, weights, preprocessing or features than the one it is loaded for."""


def check_identity(saved: Mapping[str, Any], expected: Mapping[str, Any], path: Path) -> None:
    """Refuse a head whose recorded identity differs from ``expected`` on any of its keys, naming both."""
    differ = [k for k in IDENTITY_KEYS if k in expected and saved.get(k) != expected[k]]
    if differ:
        def show(d: Mapping[str, Any]) -> str:
            return ", ".join(f"{k}={d.get(k)!r}" for k in differ)

        raise HeadIdentityError(
            f"The head in {path} belongs to another backbone: it was trained on {show(saved)}, but this run's "
            f"backbone has {show(expected)}. Re-run `dogbench evaluate` on the run folder to refit it"
        )


def read_head_meta(path: Path) -> dict[str, Any]:
    """``head.json`` of the head saved in directory ``path`` (no tensors read); HeadFileError names the file."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise HeadFileError(f"{meta_path} is missing") from None
    except (OSError, ValueError) as err:
        raise HeadFileError(f"{meta_path} is not readable JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise HeadFileError(f"{meta_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    return meta


def load_head(
    path: Path, *, device: str = "cpu", expect_identity: Mapping[str, Any] | None = None
) -> Head:
    """Load the head saved in directory ``path``, of whichever kind, onto ``device`` (the CPU unless asked).

    With ``expect_identity`` (``head_identity`` of the backbone it is loaded for), a head saved for another
    backbone, weights, features or preprocessing is refused with both identities named. Every problem with the
    files is a HeadFileError that names the file.
    """
    path = Path(path)
    meta = read_head_meta(path)
    if expect_identity is not None:
        check_identity(meta.get("identity") or {}, expect_identity, path)
    tensors_path = path / TENSORS_FILE
    try:
        blob = tensors_path.read_bytes()
    except OSError as err:
        raise HeadFileError(f"{tensors_path} is not readable ({err.strerror or err})") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise HeadFileError(f"{tensors_path} does not match {path / META_FILE} (sha256 differs)")
    try:
        params = {k: v for k, v in dict(meta["params"]).items() if k != "device"}  # old files saved theirs
        head = make_head(meta["kind"], device=device, **params)
        head._restore(meta, safetensors.torch.load(blob))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise HeadFileError(f"{path / META_FILE} does not describe {tensors_path} ({type(err).__name__}: {err})") \
            from None
    head.class_names_ = tuple(meta["class_names"]) if meta.get("class_names") else None
    head.identity_ = meta.get("identity")
    head.temperature_ = meta.get("temperature")  # None: not calibrated
    return head
