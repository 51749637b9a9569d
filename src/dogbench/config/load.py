"""TOML files, ``section.key=value`` overrides and ``--backbone`` specs -> a validated RunConfig, and back.

Input paths are stored absolute so every command finds them from any working directory; a saved
``config.json`` reads back into the same RunConfig (``saved_to_doc``), and ``config_differences`` names the
keys that would change what a run computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dogbench.config.coerce import check_types, coerce_section, unknown_key
from dogbench.config.constraints import ConfigError, check_section
from dogbench.config.sections import (
    DEFAULT_BACKBONES,
    PREPROCESS_KEYS,
    SECTIONS,
    BackboneConfig,
    RunConfig,
    with_box_ablation,
)


def absolute_path(path: str) -> str:
    """``~`` expanded, made absolute, ``..`` collapsed (symlinks kept: the path stays the one the user gave)."""
    return os.path.abspath(os.path.expanduser(path))


def parse_value(text: str) -> Any:
    """A TOML literal (``5``, ``3e-4``, ``true``, ``[1, 2]``, ``"x"``) or, failing that, the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_backbone_table(label: str, table: Mapping[str, Any]) -> BackboneConfig:
    """``[backbones.<label>]``: ``model`` and ``weights``, preprocessing keys, anything else is a model kwarg."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"[backbones.{label}] must be a table (model = ..., weights = ...), got {table!r}")
    if "model" not in table:
        raise ConfigError(f"[backbones.{label}] needs a 'model' key (a short alias or a timm model tag)")
    kwargs: dict[str, Any] = {}
    pre: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("model", "weights", "seed", "crop_to_box", "description"):
            continue
        if key in PREPROCESS_KEYS:
            pre[key] = tuple(value) if isinstance(value, list) else value
        else:
            kwargs[key] = value
    fixed = {"model": table["model"], "weights": table.get("weights", "hub"), "seed": table.get("seed", 0),
             "crop_to_box": table.get("crop_to_box"), "description": table.get("description")}
    check_types(BackboneConfig, f"backbones.{label}", {**fixed, **pre})
    if fixed["weights"] not in ("hub", "random"):  # stored absolute: report, explain, predict run from anywhere
        fixed["weights"] = absolute_path(fixed["weights"])
    return BackboneConfig(label=label, model_kwargs=kwargs, **fixed, **pre)


def parse_backbone_spec(spec: str) -> BackboneConfig:
    """``LABEL=MODEL[@WEIGHTS][,key=value...]`` e.g. ``vit=vit_small_patch14_dinov2@w.safetensors,img_size=224``."""
    return parse_backbone_table(*backbone_spec_table(spec))


def backbone_spec_table(spec: str) -> tuple[str, dict[str, Any]]:
    """A ``--backbone`` spec as (label, the ``[backbones.<label>]`` table it stands for)."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise ConfigError(
            f"Bad --backbone '{spec}': expected LABEL=MODEL[@WEIGHTS][,key=value...], e.g. vit=vit_s16 or "
            "cnn=tf_efficientnet_lite0@weights.safetensors"
        )
    head, *pairs = rest.split(",")
    model, _, weights = head.partition("@")
    table: dict[str, Any] = {"model": model, "weights": weights or "hub"}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"Bad --backbone option '{pair}' in '{spec}': expected key=value")
        table[key.strip()] = parse_value(value)
    return label.strip(), table


# data.root values that name a dataset (data/named.py), kept as written like hf://owner/name; ./pets is a folder
DATASET_NAMES = ("pets", "flowers102", "cifar10", "cifar100", "fgvc-aircraft", "stanford-cars", "cub200")


def _check_top_level(doc: Mapping[str, Any]) -> None:
    valid_top = [*SECTIONS, "backbones", "out"]
    for key in doc:
        if key not in valid_top:
            raise unknown_key("top level", key, valid_top)
    for key in (*SECTIONS, "backbones"):
        if key in doc and not isinstance(doc[key], Mapping):
            raise ConfigError(f"[{key}] must be a table of settings (key = value lines under [{key}]), got "
                              f"{doc[key]!r}")
    if not isinstance(doc.get("out"), str | None):
        raise ConfigError(f"out must be a folder path (a string), got {doc['out']!r}")


def _absolute_inputs(sections: dict[str, Any]) -> None:
    """Input paths made absolute in place, so every command finds them from any working directory."""
    data, features, tune = sections["data"], sections["features"], sections["tune"]
    if data.root is not None and "://" not in data.root and data.root not in DATASET_NAMES:  # names, not paths
        data = dataclasses.replace(data, root=absolute_path(data.root))
    if data.extra_test:
        data = dataclasses.replace(data, extra_test=tuple(absolute_path(p) for p in data.extra_test))
    if features.cache_dir is not None:
        features = dataclasses.replace(features, cache_dir=absolute_path(features.cache_dir))
    if tune.storage and tune.storage.startswith("sqlite:///") and not tune.storage.startswith("sqlite:////"):
        tune = dataclasses.replace(tune, storage="sqlite:///" + absolute_path(tune.storage.removeprefix("sqlite:///")))
    sections.update(data=data, features=features, tune=tune)


def from_mapping(doc: Mapping[str, Any]) -> RunConfig:
    """A TOML-shaped dict -> RunConfig, keys and types checked (values are checked by ``resolve``)."""
    _check_top_level(doc)
    sections = {name: coerce_section(cls, name, doc.get(name, {})) for name, cls in SECTIONS.items()}
    _absolute_inputs(sections)
    backbones = tuple(parse_backbone_table(label, table) for label, table in doc.get("backbones", {}).items())
    return RunConfig(backbones=backbones, out=doc.get("out"), **sections)


def saved_to_doc(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved ``config.json`` (``RunConfig.to_dict()``) back into the TOML-shaped dict ``resolve`` takes."""
    doc = {name: dict(saved.get(name, {})) for name in SECTIONS}
    doc["backbones"] = {}
    for b in saved.get("backbones", []):
        table = {"model": b["model"], "weights": b["weights"], "seed": b.get("seed", 0), **b.get("model_kwargs", {})}
        table.update({k: b[k] for k in ("crop_to_box", "description") if b.get(k) is not None})
        table.update({k: b[k] for k in PREPROCESS_KEYS if b.get(k) is not None})
        doc["backbones"][b["label"]] = table
    if saved.get("out") is not None:
        doc["out"] = saved["out"]
    return doc


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Read a TOML config file into a plain nested dict (empty when path is None).

    Relative input paths in the file (``data.root``, backbone weight files) are taken relative to the file's
    folder, so a config works from any working directory; ``out`` and ``features.cache_dir`` stay relative to
    the working directory, like the command-line flags.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid TOML: {err}") from None
    return _anchor_paths(doc, path.resolve().parent)


def _anchor_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    def anchored(value: Any) -> Any:
        return str(base / value) if isinstance(value, str) and not Path(value).expanduser().is_absolute() else value

    data = doc.get("data")
    if isinstance(data, dict) and "root" in data and data["root"] not in DATASET_NAMES:
        data["root"] = anchored(data["root"])
    if isinstance(data, dict) and isinstance(data.get("extra_test"), list):
        data["extra_test"] = [anchored(p) for p in data["extra_test"]]
    elif isinstance(data, dict) and isinstance(data.get("extra_test"), str):
        data["extra_test"] = [anchored(data["extra_test"])]
    for table in (doc.get("backbones") or {}).values():
        if isinstance(table, dict) and table.get("weights", "hub") not in ("hub", "random"):
            table["weights"] = anchored(table["weights"])
    return doc


def apply_override(doc: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place."""
    dotted, eq, value = override.partition("=")
    if not eq or not dotted:
        raise ConfigError(f"Bad override '{override}': expected section.key=value, e.g. tune.trials=5")
    *parents, leaf = dotted.strip().split(".")
    if not parents:
        if leaf != "out":
            raise ConfigError(f"Bad override '{override}': expected section.key=value, e.g. tune.trials=5")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Bad override '{override}': '{part}' is not a section")
    node[leaf] = parse_value(value)


def _unique_labels(labels: Sequence[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ConfigError(f"Backbone labels must be unique, got {list(labels)}")


def validate(cfg: RunConfig) -> None:
    """Every section's declared constraints and checks, and unique backbone labels; ConfigError at the first."""
    _unique_labels([b.label for b in cfg.backbones])
    for name in SECTIONS:
        check_section(getattr(cfg, name), name)


def resolve(
    doc: dict[str, Any], *, overrides: Sequence[str] = (), backbone_specs: Sequence[str] = ()
) -> RunConfig:
    """Config file dict + ``key=value`` overrides + ``--backbone`` specs -> a validated RunConfig.

    ``--backbone`` specs replace the file's backbones; with neither, the two reference models are used.
    """
    doc = json.loads(json.dumps(doc))  # deep copy: callers keep their dict
    if backbone_specs:  # replace the file's backbones; overrides of backbones.<label>.key then apply to them
        tables = [backbone_spec_table(s) for s in backbone_specs]
        _unique_labels([label for label, _ in tables])
        doc["backbones"] = dict(tables)
    for override in overrides:
        apply_override(doc, override)
    cfg = from_mapping(doc)
    if not cfg.backbones:
        cfg = dataclasses.replace(
            cfg, backbones=tuple(BackboneConfig(label=label, model=model) for label, model in DEFAULT_BACKBONES)
        )
    cfg = with_box_ablation(cfg)
    validate(cfg)
    return cfg


# Keys that say how a run is executed, not what it computes: they may differ between the commands that work on
# one run folder (docs/guide/configuration.md says why each is here).
EXECUTION_KEYS = (
    "out", "data.strict", "data.download", "data.data_url", "features.device", "features.batch_size",
    "features.num_workers", "features.prefetch", "features.cache_dir", "features.reuse_host_memory", "tune.device",
    "bench", "report", "track",
    "evaluate.seeds", "shots", "data.extra_test",  # analyses that add to the results without changing the rest
    "finetune.methods", "finetune.checkpoint_every",  # rows added method by method; how often state is saved
    "tune.storage", "tune.study", "tune.heartbeat_s", "tune.grace_s",  # where the study lives, how workers watch
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def computed_items(cfg: RunConfig) -> dict[str, Any]:
    """The flattened keys that change what a run computes (``EXECUTION_KEYS`` left out): a config's identity."""
    d = cfg.to_dict()
    d["backbones"] = {b.pop("label"): b for b in d["backbones"]}
    return {k: v for k, v in _flatten(d).items()
            if not any(k == e or k.startswith(e + ".") for e in EXECUTION_KEYS)}


def config_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """The keys that change what a run computes, where ``given`` differs from ``saved``: ``key: saved -> given``."""
    a, b = computed_items(saved), computed_items(given)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]
