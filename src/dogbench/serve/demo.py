"""The demo without a web server: a run's models, loaded once, answering photos.

``Demo`` screens an upload from its header (``data.uploads``), then sends it through every model's own inference
path (``Predictor.pixels`` -> ``proba_of_batch``, the run's test-time views too: what ``dogbench predict`` does, so
both give the same breeds and calibrated probabilities) and explains it from the same pixels
(``explain.explain_pixels``: attention rollout for ViTs, Grad-CAM for CNNs). Every answer says how long each model
took and whether the models agree; for one of the run's own test photos (an example) it also says the true breed
and which models got it. A refused or unreadable upload is an answer with ``error`` set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dogbench.data import ImageError, load_image
from dogbench.data.uploads import UploadError, UploadLimits, screen_upload
from dogbench.errors import DogbenchError
from dogbench.explain import explain_pixels, overlay
from dogbench.inference import LoadedRun, load_run, top_classes
from dogbench.names import ModelName, model_name
from dogbench.predictor import Predictor
from dogbench.rundir import REPORT_HTML

__all__ = ["Answer", "Demo", "Example", "ModelAnswer", "ServeConfig", "ServeError"]

PIL_MAX_MEGAPIXELS = 2 * Image.MAX_IMAGE_PIXELS / 1e6 // 1  # Pillow's DecompressionBombError threshold
SHOWN_SIDE = 1024  # the photo shown back on the page is at most this many pixels on its long side


class ServeError(DogbenchError):
    """The demo cannot start: a missing extra, a bad option, a run folder without models."""


@dataclass(frozen=True)
class ServeConfig:
    """How ``dogbench serve`` runs; the flags of the same names set it."""

    host: str = "127.0.0.1"  # loopback only; "0.0.0.0" to be reachable from other machines (a Space)
    port: int = 7860  # 0: any free port
    device: str = "cpu"
    max_upload_mb: float = 20.0  # Gradio refuses bigger uploads before they are stored; checked again here
    max_megapixels: float = 50.0  # refused from the header, before decoding (a 48 MP phone photo passes)
    concurrency: int = 2  # requests worked on at once (each model still runs one at a time); the rest queue
    queue_size: int = 64  # requests waiting beyond that are turned away with "queue full"
    top_k: int = 5
    examples: int = 8  # test photos of the run offered as examples, right and wrong ones

    def __post_init__(self) -> None:
        problems = [f"{name} must be positive, got {getattr(self, name)}" for name in
                    ("max_upload_mb", "max_megapixels", "concurrency", "queue_size", "top_k")
                    if not getattr(self, name) > 0]
        if self.max_megapixels > PIL_MAX_MEGAPIXELS:
            problems.append(f"max_megapixels must be at most {PIL_MAX_MEGAPIXELS:g} (Pillow refuses larger images "
                            f"itself), got {self.max_megapixels:g}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be 0..65535, got {self.port}")
        if self.examples < 0:
            problems.append(f"examples must be 0 or more, got {self.examples}")
        if problems:
            raise ServeError("; ".join(problems))

    @property
    def limits(self) -> UploadLimits:
        return UploadLimits(max_bytes=int(self.max_upload_mb * 1024 * 1024),
                            max_pixels=int(self.max_megapixels * 1_000_000))


@dataclass(frozen=True)
class ModelAnswer:
    """One model's answer to one photo."""

    label: str  # "cnn", "vit/lora", ...
    timm_tag: str
    top: tuple[tuple[str, float], ...]  # (breed, calibrated probability), most probable first: predict's numbers
    latency_ms: float  # decode + resize + forward + head, this request
    explain_ms: float | None = None  # the explanation's extra time; None when not asked for
    method: str | None = None  # "attention rollout" or "grad-cam"
    overlay: Image.Image | None = None  # the explanation over the model's input

    @property
    def breed(self) -> str:
        return self.top[0][0]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _all(n: int) -> str:
    return "both models" if n == 2 else f"all {n} models"


@dataclass(frozen=True)
class Answer:
    """Every model's answer to one upload, or why there is none; ``truth``: the true breed of an example."""

    name: str
    models: tuple[ModelAnswer, ...] = ()
    notes: tuple[str, ...] = ()  # animated, 16-bit, CMYK, transparency: what was done about it
    error: str | None = None
    truth: str | None = None  # set when the photo is one of the run's test photos (an example)
    photo: Image.Image | None = None  # the photo as the models read it (first frame, RGB), for the page to show

    @property
    def agreement(self) -> str:
        """ "Both models agree: pug.", "All 4 models agree: pug.", "The models disagree: cnn says pug; vit ..." """
        if self.error or not self.models:
            return ""
        says: dict[str, list[str]] = {}
        for m in self.models:
            says.setdefault(m.breed, []).append(m.label)
        if len(self.models) == 1:
            return f"One model: {self.models[0].breed}."
        if len(says) == 1:
            return f"{_all(len(self.models)).capitalize()} agree: {self.models[0].breed}."
        return "The models disagree: " + "; ".join(f"{_join(labels)} {'say' if len(labels) > 1 else 'says'} "
                                                   f"{breed}" for breed, labels in says.items()) + "."

    @property
    def verdict(self) -> str:
        """For an example: the true breed and which models got it ("... both models got it wrong."); else ""."""
        if self.truth is None or self.error or not self.models:
            return ""
        right = [m.label for m in self.models if m.breed == self.truth]
        wrong = [m.label for m in self.models if m.breed != self.truth]
        if not wrong or not right:
            who = "the model" if len(self.models) == 1 else _all(len(self.models))
            return f"The true breed is {self.truth}: {who} got it {'right' if right else 'wrong'}."
        return f"The true breed is {self.truth}: {_join(right)} got it right, {_join(wrong)} got it wrong."

    def to_dict(self) -> dict[str, Any]:
        """The API's answer: {image, error, notes, agreement, models: {label: {model, top, latency_ms}}}."""
        return {
            "image": self.name, "error": self.error, "notes": list(self.notes), "agreement": self.agreement,
            "models": {m.label: {"model": m.timm_tag, "top": [{"breed": b, "p": p} for b, p in m.top],
                                 "latency_ms": round(m.latency_ms, 2)} for m in self.models},
        }


@dataclass(frozen=True)
class Example:
    """One of the run's test photos, offered on the page with its true breed."""

    path: Path
    truth: str  # the true breed's display name


@dataclass
class Demo:
    """A run's models, loaded once, answering photos; the page's words (names, verdicts, caveats) and examples."""

    run: LoadedRun
    config: ServeConfig = field(default_factory=ServeConfig)
    verdicts: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    examples: tuple[Example, ...] = ()
    report: Path | None = None  # the run's report.html, linked from the page when it exists
    upload_root: Path | None = None  # where Gradio stores uploads (set by build_app): the only files answered
    names: dict[str, ModelName] = field(default_factory=dict)  # per label, from results.json

    def __post_init__(self) -> None:
        # hooks make a model single-user; off the CPU the models take turns altogether (exact fp32 sets
        # process-wide TF32 flags around each forward pass)
        shared = threading.Lock()
        self._locks = {label: shared if model.device.type != "cpu" else threading.Lock()
                       for label, model in self.run.models.items()}
        self._examples = {e.path.resolve(): e for e in self.examples}

    @classmethod
    def from_run_dir(cls, path: str | Path, config: ServeConfig | None = None) -> Demo:
        """Load every model of the run folder (frozen and fine-tuned) and read its names, verdicts, test photos."""
        from dogbench.report import headline, load_runs, select_examples

        config = config or ServeConfig()
        run = load_run(path, device=config.device)
        folders = load_runs([run.path])
        verdicts, caveats = headline(folders)
        models = list(folders[0].models.values())
        examples = []
        for sid in select_examples(models, n=config.examples, seed=0):
            first = models[0]
            row = int((first.sample_ids == sid).nonzero()[0][0])
            image = Path(str(first.paths[row]))
            if image.is_file():
                examples.append(Example(image, run.classes[int(first.y_true[row])]))
        report = run.path / REPORT_HTML
        names = {m.label: model_name(m.result) for m in models}
        return cls(run, config, tuple(verdicts), tuple(caveats), tuple(examples),
                   report if report.is_file() else None, names=names)

    def name_of(self, label: str) -> ModelName:
        """Who the model ``label`` is (from results.json; from its timm tag alone for a run without that entry)."""
        if label in self.names:
            return self.names[label]
        return model_name({"label": label, "backbone": self.run.models[label].backbone.tag})

    def example_at(self, path: str | Path) -> Example | None:
        """The example stored at ``path``, if it is one."""
        return self._examples.get(Path(path).resolve())

    def answer(self, path: str | Path, *, name: str | None = None, explain: bool = True) -> Answer:
        """Screen ``path`` (an upload; ``name``: how the user knows it) and answer it with every model;
        ``explain``: the page's answer, with each model's overlay and the photo as decoded."""
        path = Path(path)
        name = name or path.name
        try:
            screened = screen_upload(path, self.config.limits, name=name)
        except UploadError as err:
            return Answer(name, error=str(err))
        answers = []
        try:
            for model in self.run.models.values():
                answers.append(self._one(model, path, explain=explain))
            photo = _shown(load_image(path, min_side=SHOWN_SIDE)) if explain else None
        except ImageError as err:  # the header was fine, the pixels are not (truncated, corrupt data)
            reason = str(err).replace(f"cannot read image {path}: ", "").replace(str(path), name)
            return Answer(name, error=f"'{name}' could not be decoded ({reason}): upload the photo again, "
                                      "or another one", notes=screened.notes)
        example = self.example_at(path)
        return Answer(name, tuple(answers), screened.notes, truth=example.truth if example else None, photo=photo)

    def _one(self, model: Predictor, path: Path, *, explain: bool) -> ModelAnswer:
        with self._locks[model.label]:
            start = time.perf_counter()
            x, _, errors = next(iter(model.pixels([path], workers=0)))
            if errors[0]:
                raise ImageError(errors[0])
            feats = model.features(x)
            top = top_classes(model.proba_of_batch(x, features=feats)[0], self.run.classes, self.config.top_k)
            latency = (time.perf_counter() - start) * 1000
            if not explain:
                return ModelAnswer(model.label, model.backbone.tag, top, latency)
            start = time.perf_counter()
            ex = explain_pixels(model, x, features=feats)
            picture = overlay(ex.image, ex.heatmap)
            return ModelAnswer(model.label, model.backbone.tag, top, latency, (time.perf_counter() - start) * 1000,
                               ex.method, picture)

    def answer_payload(self, payload: Mapping[str, Any] | str | None, *, explain: bool = True) -> Answer | None:
        """An answer to what Gradio hands over without preprocessing: its file record ({path, orig_name, url});
        None for nothing (the file was cleared). Only files Gradio stored from an upload (under ``upload_root``)
        and the run's own examples are read: a request naming any other path of this machine (a hand-made API
        call) gets an error, not the file."""
        if payload is None:
            return None
        record = {"path": payload} if isinstance(payload, str) else payload
        name = str(record.get("orig_name") or "the image")
        if not record.get("path"):
            return Answer(name, error="Nothing was uploaded: drop a photo, paste one or take one with the webcam")
        path = Path(str(record["path"]))
        if not self._readable(path):
            return Answer(name, error=f"'{name}' is not a file uploaded to this demo: send the photo itself "
                                      "(gradio_client: handle_file(path))")
        return self.answer(path, name=name, explain=explain)

    def _readable(self, path: Path) -> bool:
        resolved = path.resolve()
        if resolved in self._examples:
            return True
        return self.upload_root is not None and resolved.is_relative_to(self.upload_root.resolve())


def _shown(image: Image.Image) -> Image.Image:
    """``image`` no larger than the page shows it."""
    image.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
    return image
