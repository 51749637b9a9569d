"""The heads behind scikit-learn's estimator contract: ``__init__`` stores hyper-parameters, ``fit`` checks them.

``LogisticHead`` (L-BFGS to convergence), ``LinearHead`` (the same model by mini-batch AdamW) and ``MLPHead``
(``(Linear -> activation -> Dropout) x n_layers -> Linear``), built by kind with ``make_head``.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from dogbench.config import Balance, HeadKind, Precision, TuneMetric
from dogbench.device import accelerator_indices, train_precision
from dogbench.heads.files import load_head, write_head_files
from dogbench.heads.fit import (
    PREDICT_CHUNK,
    FastDropout,
    FeatureData,
    FitResult,
    OnEpoch,
    lbfgs,
    standardise,
    train_adamw,
)

# the precisions an AdamW head trains in; auto: bf16 autocast where bf16 matmuls are fast, else fp32
TRAIN_PRECISIONS: tuple[Precision, ...] = (Precision.AUTO, Precision.FP32, Precision.BF16)


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


def _classifier_layer(in_features: int, n_classes: int) -> nn.Linear:
    """Final layer, initialised small (N(0, 0.01^2), zero bias) so training starts near uniform."""
    layer = nn.Linear(in_features, n_classes)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Shared fit / predict / save logic; subclasses define ``__init__``, ``_build_module`` and ``_train_module``."""

    _kind: ClassVar[HeadKind]

    standardize: bool
    seed: int
    device: str
    balance: str
    val_metric: str

    def _build_module(self, n_features: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def _train_module(self, module: nn.Module, data: FeatureData, on_epoch: OnEpoch | None) -> FitResult:
        raise NotImplementedError

    def _param_problems(self) -> list[str]:
        return []

    def _check_params(self) -> None:
        problems = self._param_problems()
        if problems:
            raise ValueError(f"Invalid {type(self).__name__} parameters: " + "; ".join(problems))
        _parse_choice(Balance, self.balance, "balance")
        _parse_choice(TuneMetric, self.val_metric, "val_metric")

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
        on_epoch: OnEpoch | None = None,
    ) -> Self:
        """Train on (X, y); with ``eval_set``, the AdamW heads stop early on its ``val_metric`` (top-1 by default)
        and keep the best epoch, and ``on_epoch(epoch, score)`` runs after each epoch (the logistic head: once,
        after the solve); whatever it raises (e.g. ``optuna.TrialPruned``) propagates. ``balance``: none, weights
        (class-weighted loss) or sampler (class-balanced epochs; the logistic head weighs its full batch)."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32, order="C")
        if eval_set is not None:
            eval_set = (validate_data(self, eval_set[0], reset=False, dtype=np.float32, order="C"), eval_set[1])
        data = FeatureData.from_arrays(X, y, eval_set=eval_set, standardize=self.standardize, device=self.device)
        return self._fit_data(data, on_epoch=on_epoch)

    def fit_prepared(
        self, data: FeatureData, *, on_epoch: OnEpoch | None = None, init: Mapping[str, torch.Tensor] | None = None,
    ) -> Self:
        """``fit`` on ``FeatureData`` built with this head's ``standardize``, to the bit; ``init`` (a
        ``module_.state_dict()`` of this kind fitted on the same data) starts training from those weights."""
        self._check_params()
        if data.standardize != self.standardize:
            raise ValueError(
                f"FeatureData was built with standardize={data.standardize}, this head has {self.standardize}"
            )
        self.n_features_in_ = data.n_features
        if hasattr(self, "feature_names_in_"):  # left by an earlier fit on a DataFrame
            del self.feature_names_in_
        return self._fit_data(data.to(self.device), on_epoch=on_epoch, init=init)

    def _fit_data(
        self, data: FeatureData, *, on_epoch: OnEpoch | None, init: Mapping[str, torch.Tensor] | None = None,
    ) -> Self:
        device = torch.device(self.device)
        # Init and dropout draw from torch's global RNG: seed it locally, leave the caller's state alone.
        with torch.random.fork_rng(devices=accelerator_indices(device), device_type=device.type):
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
        """(n, n_classes) float64 class probabilities, columns in ``classes_`` order; the forward pass runs in
        float64 so a row's output does not depend on its batch."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        model = copy.deepcopy(self.module_).to(torch.float64).eval()
        Xs = standardise(X, self.mean_, self.scale_, self.device)
        proba = np.empty((X.shape[0], len(self.classes_)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, X.shape[0], PREDICT_CHUNK):
                logits = model(Xs[start : start + PREDICT_CHUNK].to(torch.float64))
                proba[start : start + PREDICT_CHUNK] = torch.softmax(logits, dim=1).cpu().numpy()
        return proba

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most probable label per row (ties go to the earlier class), in the original label type."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    def save(
        self, path: Path, *, identity: Mapping[str, Any] | None = None, class_names: Sequence[str] | None = None,
        temperature: float | None = None,
    ) -> None:
        """Write ``path/head.safetensors`` and ``path/head.json``: weights, standardisation, params, classes, and
        what ``load_head`` returns with them: the backbone's ``identity``, ``class_names``, the calibration
        ``temperature``. The training device is not saved: a head loads on the CPU unless asked otherwise."""
        check_is_fitted(self)
        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
        tensors["mean"] = torch.from_numpy(self.mean_)
        tensors["scale"] = torch.from_numpy(self.scale_)
        meta = {
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
        }
        write_head_files(path, meta, tensors)

    @classmethod
    def load(cls, path: Path, *, device: str = "cpu") -> Self:
        """Load a head saved by ``save``; it must be of this class (``load_head`` takes any kind)."""
        head = load_head(path, device=device)
        if not isinstance(head, cls):
            raise TypeError(f"{path} holds a {type(head).__name__}, not a {cls.__name__}; use load_head()")
        return head

    def restore(self, meta: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Set the learned state from a saved ``head.json`` and its tensors (``load_head`` builds the head first)."""
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


class _EpochHead(_TorchHead):
    """A head trained by mini-batch AdamW for up to ``max_epochs``, stopping early on validation top-1."""

    lr: float
    weight_decay: float
    label_smoothing: float
    max_epochs: int
    patience: int
    batch_size: int
    precision: Precision | str

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

    def _train_module(self, module: nn.Module, data: FeatureData, on_epoch: OnEpoch | None) -> FitResult:
        return train_adamw(
            module, data.X, data.y, val=data.val, lr=self.lr, weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing, batch_size=self.batch_size, max_epochs=self.max_epochs,
            patience=self.patience, seed=self.seed, on_epoch=on_epoch, bf16=self._bf16(data.X.device),
            balance=Balance(self.balance), metric=TuneMetric(self.val_metric),
        )

    def _bf16(self, device: torch.device) -> bool:
        precision = Precision(self.precision)
        resolved = train_precision(device) if precision is Precision.AUTO else precision
        return resolved is Precision.BF16


class LogisticHead(_TorchHead):
    """Multinomial L2 logistic regression, scikit-learn's ``LogisticRegression(C=C)`` objective (plus optional
    label smoothing), solved to convergence by full-batch L-BFGS: deterministic, so ``seed`` is only for a uniform
    interface. ``best_epoch_`` is the L-BFGS iterations, ``best_val_top1_`` the solution's top-1 on ``eval_set``."""

    _kind = HeadKind.LOGISTIC

    def __init__(
        self,
        *,
        C: float = 1.0,
        label_smoothing: float = 0.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        standardize: bool = True,
        balance: Balance | str = "none",
        val_metric: TuneMetric | str = "top1",
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.C = C
        self.label_smoothing = label_smoothing
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.balance = balance
        self.val_metric = val_metric
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

    def _train_module(self, module: nn.Module, data: FeatureData, on_epoch: OnEpoch | None) -> FitResult:
        return lbfgs(
            module, data.X, data.y, val=data.val, C=self.C, label_smoothing=self.label_smoothing,
            max_iter=self.max_iter, tol=self.tol, on_epoch=on_epoch, balance=Balance(self.balance),
            metric=TuneMetric(self.val_metric),
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
        precision: Precision | str = "auto",
        standardize: bool = True,
        balance: Balance | str = "none",
        val_metric: TuneMetric | str = "top1",
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
        self.balance = balance
        self.val_metric = val_metric
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
        activation: Activation | str = "gelu",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        max_epochs: int = 100,
        patience: int = 10,
        batch_size: int = 256,
        precision: Precision | str = "auto",
        standardize: bool = True,
        balance: Balance | str = "none",
        val_metric: TuneMetric | str = "top1",
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
        self.balance = balance
        self.val_metric = val_metric
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
            layers += [nn.Linear(width, self.hidden_size), act(), FastDropout(self.dropout)]
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
