"""Backbone zoos for ``dogbench screen``: the curated ones shipped in ``zoos.toml``, or a user's file of the same
shape; each candidate with its timm tag, family, pretraining data and ``leaky`` flag."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dogbench.errors import DogbenchError

SHIPPED = Path(__file__).with_name("zoos.toml")


class ZooError(DogbenchError, ValueError):
    """An unknown zoo or model, or a zoo file that does not hold what a zoo needs."""


class Family(StrEnum):
    """The architecture families the shipped zoos cover."""

    VIT = "vit"
    DEIT = "deit"
    DINOV2 = "dinov2"
    CLIP = "clip"
    EVA = "eva"
    CONVNEXT = "convnext"
    RESNET = "resnet"
    EFFICIENTNET = "efficientnet"
    MOBILENET = "mobilenet"
    SWIN = "swin"


@dataclass(frozen=True)
class Candidate:
    """One backbone a screen may rank."""

    name: str  # the zoo's short name, the label of its rows
    tag: str  # timm's model.tag
    family: Family
    pretraining: str  # its pretraining data, in words
    leaky: bool  # pretrained on ImageNet-family data (which holds Stanford Dogs' photos)


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """``" (closest: a, b)"`` for the nearest of ``choices``, or every choice when none is near."""
    near = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else f" (valid: {', '.join(sorted(choices))})"


def _candidate(name: str, entry: Any, source: str) -> Candidate:
    keys = ("tag", "family", "pretraining", "leaky")
    if not isinstance(entry, dict) or set(entry) != set(keys):
        raise ZooError(f"{source}: [models.{name}] must have exactly the keys {', '.join(keys)}")
    if entry["family"] not in Family.__members__.values():
        raise ZooError(f"{source}: [models.{name}] family '{entry['family']}' is not one of "
                       f"{', '.join(f.value for f in Family)}")
    if not isinstance(entry["leaky"], bool) or not all(isinstance(entry[k], str) for k in keys[:3]):
        raise ZooError(f"{source}: [models.{name}]: tag, family and pretraining are strings, leaky true or false")
    return Candidate(name, entry["tag"], Family(entry["family"]), entry["pretraining"], entry["leaky"])


def read_zoos(path: Path = SHIPPED) -> tuple[dict[str, Candidate], dict[str, tuple[str, ...]]]:
    """Every model of a zoo file by name, and its named zoos (none in a user's file: all its models are one)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ZooError(f"cannot read the zoo file {path}: {err}") from None
    tables, named = data.get("models", {}), data.get("zoos", {})
    if not isinstance(tables, dict) or not tables:
        raise ZooError(f"{path} has no [models.NAME] table: a zoo lists its models there")
    if not isinstance(named, dict) or not all(isinstance(m, list) and all(isinstance(x, str) for x in m)
                                              for m in named.values()):
        raise ZooError(f"{path}: [zoos] maps each zoo's name to a list of model names, e.g. small = [\"a\", \"b\"]")
    models = {name: _candidate(name, entry, str(path)) for name, entry in tables.items()}
    zoos = {name: tuple(members) for name, members in named.items()}
    for zoo, members in zoos.items():
        for member in members:
            if member not in models:
                raise ZooError(f"{path}: zoo '{zoo}' names '{member}', which has no [models.{member}]"
                               + closest(member, list(models)))
    return models, zoos


def load_zoo(name_or_file: str) -> tuple[Candidate, ...]:
    """The candidates of a shipped zoo by name, or of every model in a zoo file (a path ending in .toml)."""
    if name_or_file.endswith(".toml"):
        path = Path(name_or_file)
        if not path.is_file():
            raise ZooError(f"the zoo file {path} does not exist")
        return tuple(read_zoos(path)[0].values())
    models, zoos = read_zoos()
    if name_or_file not in zoos:
        raise ZooError(f"unknown zoo '{name_or_file}'" + closest(name_or_file, list(zoos))
                       + "; or give a .toml file of [models.NAME] tables")
    return tuple(models[m] for m in zoos[name_or_file])
