"""``dogbench serve RUN_DIR``: a Gradio page over a finished run's models, loaded once, answering uploaded photos.

``Demo`` is the part without a web server: it screens an upload from its header (``data.uploads``), then sends it
through every model's own inference path (``Predictor.pixels`` -> ``features`` -> ``proba_of_features``, exactly what
``dogbench predict`` does, so both give the same breeds and probabilities) and explains it from the same pixels
(``explain.explain_pixels``: attention rollout for ViTs, Grad-CAM for CNNs). Every answer says how long each
model took and whether the models agree; a refused or unreadable upload is an answer with ``error`` set.

``build_app`` lays it out with Gradio; ``serve`` launches it. Limits hold before decoding: Gradio's
``max_file_size`` refuses large uploads at the door, ``screen_upload`` re-checks the bytes and refuses more pixels
than ``max_megapixels`` from the header; requests wait in Gradio's queue (``concurrency`` at a time, ``queue_size``
waiting); each model runs one request at a time (explanations hook into its modules). It binds 127.0.0.1 unless
``host`` says otherwise and never asks Gradio for a public share link.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dogbench.data import ImageError
from dogbench.data.uploads import UploadError, UploadLimits, screen_upload
from dogbench.errors import DogbenchError
from dogbench.explain import explain_pixels, overlay
from dogbench.inference import LoadedRun, load_run, top_classes
from dogbench.predictor import Predictor
from dogbench.rundir import REPORT_HTML

__all__ = ["Answer", "Demo", "ModelAnswer", "ServeConfig", "ServeError", "build_app", "serve"]

LOG = logging.getLogger("dogbench.serve")
EXAMPLE_TITLE = "Test photos of this run (right and wrong answers)"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PIL_MAX_MEGAPIXELS = 2 * Image.MAX_IMAGE_PIXELS / 1e6 // 1  # Pillow's DecompressionBombError threshold


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


@dataclass(frozen=True)
class Answer:
    """Every model's answer to one upload, or why there is none."""

    name: str
    models: tuple[ModelAnswer, ...] = ()
    notes: tuple[str, ...] = ()  # animated, 16-bit, CMYK, transparency: what was done about it
    error: str | None = None

    @property
    def agreement(self) -> str:
        if self.error or not self.models:
            return ""
        says: dict[str, list[str]] = {}
        for m in self.models:
            says.setdefault(m.top[0][0], []).append(m.label)
        if len(says) == 1:
            breed = next(iter(says))
            return f"All {len(self.models)} models agree: {breed}." if len(self.models) > 1 else \
                f"One model: {breed}."
        return "The models disagree: " + "; ".join(f"{', '.join(labels)} {'say' if len(labels) > 1 else 'says'} "
                                                   f"{breed}" for breed, labels in says.items()) + "."

    def to_dict(self) -> dict[str, Any]:
        """The API's answer: {image, error, notes, agreement, models: {label: {model, top, latency_ms}}}."""
        return {
            "image": self.name, "error": self.error, "notes": list(self.notes), "agreement": self.agreement,
            "models": {m.label: {"model": m.timm_tag, "top": [{"breed": b, "p": p} for b, p in m.top],
                                 "latency_ms": round(m.latency_ms, 2)} for m in self.models},
        }


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str  # the true breed and which models got it right


@dataclass
class Demo:
    """A run's models, loaded once, answering photos; the page's words (verdicts, caveats) and examples."""

    run: LoadedRun
    config: ServeConfig = field(default_factory=ServeConfig)
    verdicts: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    examples: tuple[Example, ...] = ()
    report: Path | None = None  # the run's report.html, linked from the page when it exists
    upload_root: Path | None = None  # where Gradio stores uploads (set by build_app): the only files answered

    def __post_init__(self) -> None:
        # hooks make a model single-user; off the CPU the models take turns altogether (exact fp32 sets
        # process-wide TF32 flags around each forward pass)
        shared = threading.Lock()
        self._locks = {label: shared if model.device.type != "cpu" else threading.Lock()
                       for label, model in self.run.models.items()}

    @classmethod
    def from_run_dir(cls, path: str | Path, config: ServeConfig | None = None) -> Demo:
        """Load every model of the run folder (frozen and fine-tuned) and read its verdicts and test photos."""
        from dogbench.report import headline, load_runs, select_examples

        config = config or ServeConfig()
        run = load_run(path, device=config.device)
        folders = load_runs([run.path])
        verdicts, caveats = headline(folders)
        models = list(folders[0].models.values())
        examples = []
        for sid in select_examples(models, n=config.examples, seed=0):
            rows = {m.label: int(i) for m in models for i in (m.sample_ids == sid).nonzero()[0][:1]}
            first = models[0]
            row = rows[first.label]
            truth = run.classes[int(first.y_true[row])]
            marks = ", ".join(f"{m.label} {'right' if m.correct[rows[m.label]] else 'wrong'}" for m in models
                              if m.label in rows)
            image = Path(str(first.paths[row]))
            if image.is_file():
                examples.append(Example(image, f"{truth} ({marks})"))
        report = run.path / REPORT_HTML
        return cls(run, config, tuple(verdicts), tuple(caveats), tuple(examples),
                   report if report.is_file() else None)

    def answer(self, path: str | Path, *, name: str | None = None, explain: bool = True) -> Answer:
        """Screen ``path`` (an upload; ``name``: how the user knows it) and answer it with every model."""
        path = Path(path)
        name = name or path.name
        try:
            screened = screen_upload(path, self.config.limits, name=name)
        except UploadError as err:
            return Answer(name, error=str(err))
        answers = []
        for label, model in self.run.models.items():
            try:
                answers.append(self._one(model, path, explain=explain))
            except ImageError as err:  # the header was fine, the pixels are not (truncated, corrupt data)
                reason = str(err).replace(f"cannot read image {path}: ", "").replace(str(path), name)
                return Answer(name, error=f"'{name}' could not be decoded ({reason}): upload the photo again, "
                                          "or another one", notes=screened.notes)
            LOG.debug("%s answered %s", label, name)
        return Answer(name, tuple(answers), screened.notes)

    def _one(self, model: Predictor, path: Path, *, explain: bool) -> ModelAnswer:
        with self._locks[model.label]:
            start = time.perf_counter()
            x, _, errors = next(iter(model.pixels([path], workers=0)))
            if errors[0]:
                raise ImageError(errors[0])
            feats = model.features(x)
            top = top_classes(model.proba_of_features(feats)[0], self.run.classes, self.config.top_k)
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
        None for nothing (the image was cleared). Only files Gradio stored from an upload (under
        ``upload_root``) and the run's own examples are read: a request naming any other path of this machine
        (a hand-made API call) gets an error, not the file."""
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
        if any(resolved == e.path.resolve() for e in self.examples):
            return True
        return self.upload_root is not None and resolved.is_relative_to(self.upload_root.resolve())


# ---------------------------------------------------------------- the page


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise ServeError("dogbench serve needs Gradio: pip install 'dogbench[demo]'") from None
    return gr


def _header(demo: Demo) -> str:
    run = demo.run
    lines = [f"# Which dog is it? {len(run.models)} models of run `{run.path.name}` answer",
             f"Drop, paste or photograph a dog; each model gives its top {demo.config.top_k} of the run's "
             f"{len(run.classes)} breeds, and shows where it looked (attention rollout for ViTs, Grad-CAM for CNNs).",
             ""]
    lines += [f"**Verdict.** {v}" for v in demo.verdicts]
    lines += [f"**Caveat.** {c}" for c in demo.caveats]
    if demo.report is not None:
        lines.append(f"[The run's full report]({_file_url(demo.report)}) (test accuracy with intervals, paired "
                     "tests, confusions, explanations).")
    return "\n\n".join(lines)


def _file_url(path: Path) -> str:
    from urllib.parse import quote

    return f"/gradio_api/file={quote(str(path.resolve()))}"


def _md(text: str) -> str:
    """``text`` (an uploader's file name) shown literally in Markdown: no links or formatting of theirs."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~-])", r"\\\1", text)


def _title(model: Predictor) -> str:
    method = model.label.split("/", 1)[1] if "/" in model.label else "frozen + tuned head"
    return f"### {model.label}\n`{model.backbone.tag}` ({'ViT' if model.backbone.is_vit else 'CNN'}, {method})"


def build_app(demo: Demo) -> Any:
    """The Gradio Blocks of the page: the photo, the examples, and per model its top-k, overlay and latency.
    Endpoints: ``/explain`` (what the page calls: every output) and ``/classify`` (JSON, no overlays)."""
    gr = _gradio()
    models = list(demo.run.models.values())
    from gradio.utils import get_upload_folder

    demo.upload_root = Path(get_upload_folder())
    # uploads and overlays older than 10 minutes are deleted every 10 minutes: strangers' photos are not kept
    with gr.Blocks(title=f"dogbench: {demo.run.path.name}", analytics_enabled=False,
                   delete_cache=(600, 600)) as app:
        gr.Markdown(_header(demo), elem_id="header")
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.Image(label="Your photo", sources=["upload", "clipboard", "webcam"], type="filepath",
                                 height=340, elem_id="photo")
                if demo.examples:
                    gr.Examples([[str(e.path)] for e in demo.examples], inputs=[photo], label=EXAMPLE_TITLE,
                                example_labels=[e.caption for e in demo.examples], examples_per_page=12)
            with gr.Column(scale=2):
                status = gr.Markdown("Waiting for a photo.", elem_id="status")
                agreement = gr.Markdown("", elem_id="agreement")
        outputs = [status, agreement]
        per_row = 3 if len(models) > 4 else max(len(models), 1)
        for start in range(0, len(models), per_row):
            with gr.Row():
                for k, model in enumerate(models[start:start + per_row], start=start):
                    with gr.Column():
                        gr.Markdown(_title(model), elem_id=f"title-{k}")
                        outputs.append(gr.Label(num_top_classes=demo.config.top_k, label="top breeds",
                                                elem_id=f"top-{k}"))
                        outputs.append(gr.Image(label="where it looked", type="pil", format="png", height=300,
                                                interactive=False, elem_id=f"overlay-{k}"))
                        outputs.append(gr.Markdown("", elem_id=f"latency-{k}"))

        def on_photo(payload: Any) -> list[Any]:
            answer = _safe(lambda: demo.answer_payload(payload), payload)
            return _page_values(answer, models)

        photo.change(on_photo, inputs=photo, outputs=outputs, preprocess=False, api_name="explain",
                     concurrency_id="models", show_progress="minimal")

        def classify(image: gr.FileData, top_k: int = demo.config.top_k) -> dict:
            """Every model's top-k breeds of one photo (no overlays): {image, error, notes, agreement, models}."""
            answer = _safe(lambda: demo.answer_payload(image, explain=False), image)
            doc = answer.to_dict() if answer else {"image": None, "error": "no image given", "models": {}}
            for entry in doc["models"].values():
                entry["top"] = entry["top"][: max(1, int(top_k))]
            return doc

        # Gradio types the endpoint from real annotations (this module's are strings: __future__.annotations)
        classify.__annotations__ = {"image": gr.FileData, "top_k": int, "return": dict}
        gr.api(classify, api_name="classify", concurrency_id="models")
    return app


def _safe(compute: Any, payload: Any) -> Answer | None:
    """``compute()``; anything unexpected becomes an answer that says so (and the server log gets the traceback)."""
    try:
        return compute()
    except Exception as err:  # noqa: BLE001 - the page shows a sentence, never a stack trace
        name = payload.get("orig_name") if isinstance(payload, Mapping) else None
        LOG.exception("answering %s failed", name or payload)
        return Answer(name or "the image", error=f"Something went wrong on the server while answering "
                      f"'{name or 'the image'}' ({type(err).__name__}); it has been logged. Try another photo.")


def _page_values(answer: Answer | None, models: list[Predictor]) -> list[Any]:
    if answer is None:
        return ["Waiting for a photo.", ""] + [None, None, ""] * len(models)
    if answer.error:
        return [f"**Could not answer.** {_md(answer.error)}", ""] + [None, None, ""] * len(models)
    status = f"Answered **{_md(answer.name)}**." + "".join(f"\n\n*Note:* {_md(n)}" for n in answer.notes)
    by_label = {m.label: m for m in answer.models}
    values: list[Any] = [status, f"**{answer.agreement}**"]
    for model in models:
        m = by_label[model.label]
        values += [{breed: p for breed, p in m.top}, m.overlay,
                   f"{m.method}; {m.latency_ms:.0f} ms to classify, {m.explain_ms or 0:.0f} ms to explain "
                   f"({model.device.type})"]
    return values


def _free_port(host: str) -> int:
    """A port the OS says is free on ``host`` (for ``port=0``: Gradio itself would report port 0)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(run_dir: str | Path, config: ServeConfig | None = None, *, block: bool = True) -> Any:
    """Load the run and launch the page at http://{host}:{port}; ``block``: until interrupted. Returns the
    Gradio app (its ``local_url`` says where it listens; ``close()`` stops it)."""
    gr = _gradio()
    config = config or ServeConfig()
    demo = Demo.from_run_dir(run_dir, config)
    app = build_app(demo)
    app.queue(default_concurrency_limit=config.concurrency, max_size=config.queue_size)
    allowed = [str(e.path) for e in demo.examples] + ([str(demo.report.resolve())] if demo.report else [])
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.launch(
        server_name=config.host, server_port=config.port or _free_port(config.host), share=False, inbrowser=False,
        ssr_mode=False,
        max_file_size=int(config.max_upload_mb * 1024 * 1024), allowed_paths=allowed, show_error=False,
        prevent_thread_lock=True, quiet=True, theme=theme,  # no web fonts: the page works offline
    )
    where = ("this machine only; --host 0.0.0.0 to be reachable from others" if config.host in LOOPBACK
             else f"listening on {config.host}: reachable from other machines")
    print(f"dogbench serve: {len(demo.run.models)} models of {demo.run.path} at {app.local_url} ({where}); "
          "no public share link", flush=True)
    if block:
        app.block_thread()  # until Ctrl-C
    return app
