"""A run's model as one timm model: the backbone with its head folded into timm's own classifier.

A linear-family head (logistic, linear, a fine-tuned model's classifier) computes ``softmax((W ((x - mean) /
scale) + b) / T)``; timm's classifier computes ``softmax(W' x + b')``, so ``W' = W / scale / T`` and ``b' = (b -
W (mean / scale)) / T`` hold it exactly (calibration by temperature is softmax(log p / T) = softmax(z / T)).
Classes the head never saw get zero weights and a bias of ``ABSENT``: probability 0, as ``full_proba`` gives.

An MLP head (``Linear -> GELU -> Linear``, one hidden layer) becomes the classifier of timm families whose
``head_hidden_size`` builds exactly that after the features (``NormMlpClassifierHead``: ConvNeXt and kin); the
standardisation folds into its first layer and the temperature into its last. Elsewhere timm cannot express it
and ``MLPNotExpressible`` says so (the ONNX format holds any head).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from dogbench.backbones import Backbone
from dogbench.export.spec import CONFIG_FILE, DOGBENCH_KEY, WEIGHTS_FILE, ExportError
from dogbench.heads import Activation, Head, MLPHead

ABSENT = -1e4  # logit of a class the head never saw: exp(-1e4 - max) is 0 in float32
ACTIVATIONS: dict[Activation, type[nn.Module]] = {Activation.GELU: nn.GELU, Activation.RELU: nn.ReLU}


class MLPNotExpressible(ExportError):
    """timm's classifier for this family cannot hold this MLP head."""


def _as_linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _linears(head: Head) -> list[nn.Linear]:
    module = head.module_
    return [module] if isinstance(module, nn.Linear) else [m for m in module if isinstance(m, nn.Linear)]


def folded_layers(head: Head, n_classes: int, temperature: float | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each linear layer of ``head`` in float64, with its standardisation folded into the first,
    its temperature into the last, and the last widened to all ``n_classes`` classes of the run."""
    layers = [(lin.weight.detach().double().cpu().numpy(), lin.bias.detach().double().cpu().numpy())
              for lin in _linears(head)]
    mean, scale = head.mean_.astype(np.float64), head.scale_.astype(np.float64)
    w, b = layers[0]
    w = w / scale[None, :]
    layers[0] = (w, b - w @ mean)
    w, b = layers[-1]
    t = temperature or 1.0
    full_w = np.zeros((n_classes, w.shape[1]))
    full_b = np.full(n_classes, ABSENT)
    seen = np.asarray(head.classes_).astype(int)
    full_w[seen], full_b[seen] = w / t, b / t
    layers[-1] = (full_w, full_b)
    return layers


def _mlp_args(head: MLPHead, tag: str, kwargs: Mapping[str, Any], n_classes: int) -> dict[str, Any]:
    """``{"head_hidden_size": H}`` when timm builds exactly this MLP as the family's classifier; else refused."""
    why = ""
    if head.n_layers != 1 or head.activation != "gelu":
        why = f"it has {head.n_layers} hidden layer(s) with {head.activation}; timm's MLP classifier has one, GELU"
    else:
        try:
            with torch.device("meta"):
                probe = timm.create_model(tag, pretrained=False, num_classes=n_classes,
                                          head_hidden_size=head.hidden_size, **kwargs)
            pre = getattr(probe.get_submodule("head"), "pre_logits", None)
            act = getattr(pre, "act", None)
            if not (isinstance(getattr(pre, "fc", None), nn.Linear) and type(act).__name__ == "GELU"):
                why = f"timm's {tag} takes head_hidden_size but its classifier is not Linear -> GELU -> Linear"
        except (TypeError, AttributeError) as err:
            why = f"timm's {tag} has no MLP classifier (head_hidden_size: {type(err).__name__})"
    if why:
        raise MLPNotExpressible(
            f"The MLP head cannot become timm's classifier: {why}. Export this model with --format onnx (the ONNX "
            "file holds any head), or tune a logistic or linear head for the timm format")
    return {"head_hidden_size": head.hidden_size}


def _classifiers(model: nn.Module, n_layers: int) -> list[nn.Linear]:
    """The timm model's classifier layers that the head's layers go into, in order."""
    last = model.get_classifier()
    if n_layers == 1:
        return [last]
    return [model.get_submodule("head").pre_logits.fc, last]


def classifier_model(backbone: Backbone, head: Head, n_classes: int, temperature: float | None) -> nn.Module:
    """A new timm model (eval, float32, CPU): ``backbone``'s weights (a fine-tuned one's are LoRA-merged already)
    and ``head`` folded into its classifier for ``n_classes`` classes; ``model_args`` records what rebuilds it."""
    extra = _mlp_args(head, backbone.tag, backbone.model_kwargs, n_classes) if isinstance(head, MLPHead) else {}
    with torch.random.fork_rng(devices=[]):  # the classifier's random init is overwritten: leave the RNG alone
        model = timm.create_model(backbone.tag, pretrained=False, num_classes=n_classes, **backbone.model_kwargs,
                                  **extra)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    loaded = model.load_state_dict(state, strict=False)
    layers = folded_layers(head, n_classes, temperature)
    targets = _classifiers(model, len(layers))
    names = {name for name, m in model.named_modules() if any(m is t for t in targets)}
    missing = [k for k in loaded.missing_keys if k.rsplit(".", 1)[0] not in names]
    if loaded.unexpected_keys or missing:
        raise ExportError(f"The backbone's weights do not fit timm's {backbone.tag} with a classifier: missing "
                          f"{missing[:4]}, unexpected {loaded.unexpected_keys[:4]}")
    with torch.no_grad():
        for target, (w, b) in zip(targets, layers, strict=True):
            if tuple(target.weight.shape) != w.shape:
                raise ExportError(f"timm's classifier layer is {tuple(target.weight.shape)}, the head's {w.shape}")
            target.weight.copy_(torch.from_numpy(w))
            target.bias.copy_(torch.from_numpy(b))
    return model.float().eval().requires_grad_(False)


def save_timm(model: nn.Module, folder: Path, *, classes: tuple[str, ...], preprocess: Mapping[str, Any],
              record: Mapping[str, Any]) -> None:
    """timm's ``save_for_hf``: ``config.json`` (architecture, num_classes, label_names, the run's preprocessing,
    ``model_args``, and ``record`` under "dogbench") and ``model.safetensors``."""
    from timm.models import save_for_hf

    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()}
    # the factory recorded model_args (img_size, head_hidden_size, ...): save_for_hf writes them
    save_for_hf(model, str(folder), model_config={"label_names": list(classes), DOGBENCH_KEY: dict(record)},
                safe_serialization=True, data_config=data_config)


def read_record(folder: Path) -> dict[str, Any]:
    """The "dogbench" record of an export folder's config.json; ExportError when it is not one."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{folder} is not a dogbench export: {path} is not readable ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get(DOGBENCH_KEY), dict):
        raise ExportError(f"{folder} is not a dogbench export: {path} has no {DOGBENCH_KEY!r} record")
    if not (Path(folder) / WEIGHTS_FILE).is_file():
        raise ExportError(f"{folder} is not a timm export: {WEIGHTS_FILE} is missing (exported --format onnx only?)")
    return config


def folded_head(head: Head, n_classes: int, temperature: float | None) -> nn.Sequential:
    """The head as plain layers on raw features, standardisation and temperature folded in: logits whose softmax
    is the calibrated probability over all ``n_classes`` (any head kind; dropout is a no-op at inference)."""
    layers = [_as_linear(w.astype(np.float32), b.astype(np.float32))
              for w, b in folded_layers(head, n_classes, temperature)]
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        modules.append(layer)
        if i < len(layers) - 1:
            modules.append(ACTIVATIONS[Activation(head.activation)]())
    return nn.Sequential(*modules).eval().requires_grad_(False)
