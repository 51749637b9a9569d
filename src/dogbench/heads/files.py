"""A head on disk: ``head.json`` + ``head.safetensors`` (no pickle), with the identity of the backbone it belongs to.

The JSON, written last, records the tensors' sha256 so a torn pair is detected; a head saved for another backbone,
weights, preprocessing or features is refused on load with both identities named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from dogbench.atomic import atomic_write_bytes, atomic_write_text
from dogbench.errors import DogbenchError

if TYPE_CHECKING:
    from dogbench.heads.estimators import Head

META_FILE = "head.json"
TENSORS_FILE = "head.safetensors"
FORMAT_VERSION = 1

# what a head's features come from: the backbone, its preprocessing, how images became features, which features
IDENTITY_KEYS = ("timm_tag", "weights_sha256", "preprocess", "features", "feature_key")


class HeadFileError(DogbenchError, ValueError):
    """A saved head that cannot be read, or that belongs to another backbone than the one it is loaded for."""


class HeadIdentityError(DogbenchError, ValueError):
    """A head trained for another backbone, weights, preprocessing or features than the one it is loaded for."""


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


def write_head_files(path: Path, meta: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path/head.safetensors``, then ``meta`` with the format version and the tensors' sha256
    to ``path/head.json``, each replaced atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save(tensors)
    meta = {"format_version": FORMAT_VERSION, **meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(meta, indent=2)  # fails before writing anything if classes are not JSON-able
    atomic_write_bytes(path / TENSORS_FILE, blob)
    atomic_write_text(path / META_FILE, text)


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


def _read_tensors_blob(path: Path, meta: Mapping[str, Any]) -> bytes:
    """The bytes of ``path/head.safetensors``, checked against the sha256 that ``head.json`` records."""
    tensors_path = path / TENSORS_FILE
    try:
        blob = tensors_path.read_bytes()
    except OSError as err:
        raise HeadFileError(f"{tensors_path} is not readable ({err.strerror or err})") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise HeadFileError(f"{tensors_path} does not match {path / META_FILE} (sha256 differs)")
    return blob


def load_head(
    path: Path, *, device: str = "cpu", expect_identity: Mapping[str, Any] | None = None
) -> Head:
    """Load the head saved in directory ``path``, of whichever kind, onto ``device`` (the CPU unless asked).

    With ``expect_identity`` (``head_identity`` of the backbone), a head saved for another is refused
    (HeadIdentityError); every problem with the files is a HeadFileError that names the file.
    """
    from dogbench.heads.estimators import make_head  # estimators imports this module to save: import on use

    path = Path(path)
    meta = read_head_meta(path)
    if expect_identity is not None:
        check_identity(meta.get("identity") or {}, expect_identity, path)
    blob = _read_tensors_blob(path, meta)
    try:
        params = {k: v for k, v in dict(meta["params"]).items() if k != "device"}  # old files saved theirs
        head = make_head(meta["kind"], device=device, **params)
        head.restore(meta, safetensors.torch.load(blob))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise HeadFileError(f"{path / META_FILE} does not describe {path / TENSORS_FILE} "
                            f"({type(err).__name__}: {err})") from None
    head.class_names_ = tuple(meta["class_names"]) if meta.get("class_names") else None
    head.identity_ = meta.get("identity")
    head.temperature_ = meta.get("temperature")  # None: not calibrated
    return head
