"""The Gradio page over a ``Demo``: ``build_app`` lays it out, ``serve`` launches it.

On a 1280 x 900 screen the answers sit beside the photo: the upload, the photo as the models read it and the run's
test photos (thumbnails labelled with their true breed) on the left; per model its name, top-k, where it looked
and its latency on the right. Any file is accepted at Gradio's door and screened by dogbench
(``data.uploads.screen_upload``), so a PDF gets dogbench's sentence, not a browser pop-up, and a refused file
leaves no picture behind.

Limits hold before decoding: Gradio's ``max_file_size`` refuses large uploads at the door, ``screen_upload``
re-checks the bytes and refuses more pixels than ``max_megapixels`` from the header; requests wait in Gradio's
queue (``concurrency`` at a time, ``queue_size`` waiting); each model runs one request at a time (explanations
hook into its modules). It binds 127.0.0.1 unless ``host`` says otherwise and never asks Gradio for a public
share link.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dogbench.predictor import Predictor
from dogbench.serve.demo import Answer, Demo, ModelAnswer, ServeConfig, ServeError

__all__ = ["WAITING", "build_app", "page_values", "serve"]

LOG = logging.getLogger("dogbench.serve")
EXAMPLE_TITLE = "**Test photos of this run**, labelled with their true breed: click one"
WAITING = "Waiting for a photo: drop one on the left, paste one, or click a test photo."
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PER_MODEL = 4  # page values per model: title, top-k, overlay, details
# the examples: captions (their true breeds) that wrap instead of ending in "...", a grid as tall as its rows
# (Gradio's is at least 450 px), and no lasting mark on the last one clicked (it stays marked after other uploads)
CSS = ("#examples .caption-label { white-space: normal; max-width: 96%; padding: 2px 4px; font-size: 12px; "
       "line-height: 1.2; } #examples .fixed-height { min-height: 0; } "
       "#examples .thumbnail-item.selected { --ring-color: transparent; border-color: var(--border-color-primary); }")


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise ServeError("dogbench serve needs Gradio: pip install 'dogbench[demo]'") from None
    return gr


def _md(text: str) -> str:
    """``text`` (an uploader's file name) shown literally in Markdown: no links or formatting of theirs."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~-])", r"\\\1", text)


def _file_url(path: Path) -> str:
    from urllib.parse import quote

    return f"/gradio_api/file={quote(str(path.resolve()))}"


def _header(demo: Demo) -> str:
    """The title, who the models are (named where the page names them first) and the run's verdict."""
    run = demo.run
    who = "; ".join(f"**{label}** is {demo.name_of(label).short}" for label in run.models)
    lines = [f"# Which dog is it? Ask the {len(run.models)} models of run `{run.path.name}`",
             f"{who}. Each gives its top {demo.config.top_k} of the run's {len(run.classes)} breeds and shows "
             "where it looked (attention rollout for ViTs, Grad-CAM for CNNs). The run's caveats and its full "
             "report are below the demo."]
    lines += [f"**Verdict.** {v}" for v in demo.verdicts]
    return "\n\n".join(lines)


def _about(demo: Demo) -> str:
    """The run's caveats, each model in full, and the link to the full report."""
    lines = [f"**Caveat.** {c}" for c in demo.caveats]
    lines += [f"*{_md(demo.name_of(label).full)}.*" for label in demo.run.models]
    if demo.report is not None:
        lines.append(f"[The run's full report]({_file_url(demo.report)}) (test accuracy with intervals, paired "
                     "tests, confusions, explanations).")
    return "\n\n".join(lines)


def _title(demo: Demo, model: Predictor, answer: Answer | None = None) -> str:
    """``**cnn** — EfficientNet-Lite0 (ImageNet-1k)``, then for an example whether this model got it."""
    title = f"**{model.label}** — {demo.name_of(model.label).short}"
    mine = next((m for m in answer.models if m.label == model.label), None) if answer else None
    if answer is None or answer.truth is None or mine is None:
        return title
    if mine.breed == answer.truth:
        return f"{title}<br>✓ **right**: {answer.truth}"
    ranks = [b for b, _ in mine.top]
    where = f"#{ranks.index(answer.truth) + 1} in its top {len(ranks)}" if answer.truth in ranks else \
        f"not in its top {len(ranks)}"
    return f"{title}<br>✗ **wrong**: the true breed, {answer.truth}, is {where}"


def _details(model: Predictor, m: ModelAnswer) -> str:
    how = model.label.split("/", 1)[1] + " fine-tuned" if "/" in model.label else "frozen backbone + tuned head"
    return (f"{m.method}; {m.latency_ms:.0f} ms to classify, {m.explain_ms or 0:.0f} ms to explain "
            f"({model.device.type}); timm `{m.timm_tag}`, {how}.")


def page_values(answer: Answer | None, demo: Demo) -> list[Any]:
    """What the page shows for ``answer`` (None: nothing asked yet): the photo as the models read it (None for a
    refusal: no broken picture), status, agreement, per model its title, top-k {breed: probability}, overlay and
    details, then per model whether its panel shows (only for an answer)."""
    gr = _gradio()
    models = list(demo.run.models.values())
    answered = answer is not None and answer.error is None
    panels = [gr.update(visible=answered) for _ in models]
    if answer is None or answer.error:
        status = WAITING if answer is None else f"**Could not answer.** {_md(answer.error or '')}"
        return [None, status, ""] + [v for model in models for v in (_title(demo, model), None, None, "")] + panels
    status = f"Answered **{_md(answer.name)}**" + (", a test photo of this run." if answer.truth else ".")
    status += "".join(f"\n\n*Note:* {_md(n)}" for n in answer.notes)
    agreement = f"**{answer.agreement}**" + (f" {answer.verdict}" if answer.verdict else "")
    by_label = {m.label: m for m in answer.models}
    values: list[Any] = [answer.photo, status, agreement]
    for model in models:
        m = by_label[model.label]
        values += [_title(demo, model, answer), {breed: p for breed, p in m.top}, m.overlay, _details(model, m)]
    return values + panels


def _safe(compute: Callable[[], Answer | None], payload: Any) -> Answer | None:
    """``compute()``; anything unexpected becomes an answer that says so (and the server log gets the traceback)."""
    try:
        return compute()
    except Exception as err:  # noqa: BLE001 - the page shows a sentence, never a stack trace
        name = payload.get("orig_name") if isinstance(payload, Mapping) else None
        LOG.exception("answering %s failed", name or payload)
        return Answer(name or "the image", error=f"Something went wrong on the server while answering "
                      f"'{name or 'the image'}' ({type(err).__name__}); it has been logged. Try another photo.")


@dataclass(frozen=True)
class _Page:
    upload: Any  # gr.File: any file, screened by dogbench
    photo: Any  # gr.Image: the photo as the models read it; also takes a pasted or webcam photo
    gallery: Any | None  # gr.Gallery of the examples
    answers: list[Any]  # status, agreement, then PER_MODEL per model
    panels: list[Any]  # per model, the column of its answer: shown only while there is one


def _layout(gr: Any, demo: Demo) -> _Page:
    gr.Markdown(_header(demo), elem_id="header")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            upload = gr.File(label="Your photo: drop any image file here, or click to choose one", type="filepath",
                             file_count="single", height=150, elem_id="upload")
            photo = gr.Image(label="The photo as the models read it (or paste one, or use the webcam)",
                             sources=["clipboard", "webcam"], type="filepath", format="jpeg", height=280,
                             elem_id="photo")
            gallery = None
            if demo.examples:
                gr.Markdown(EXAMPLE_TITLE, elem_id="examples-title")
                gallery = gr.Gallery([(str(e.path), e.truth) for e in demo.examples], show_label=False, columns=4,
                                     allow_preview=False, object_fit="cover", interactive=False, buttons=[],
                                     elem_id="examples")
        with gr.Column(scale=3, min_width=480):
            answers = [gr.Markdown(WAITING, elem_id="status"), gr.Markdown("", elem_id="agreement")]
            panels = []
            models = list(demo.run.models.values())
            for start in range(0, len(models), 2):
                with gr.Row(equal_height=False):
                    for k, model in enumerate(models[start:start + 2], start=start):
                        with gr.Column(min_width=220, visible=False, elem_id=f"model-{k}") as panel:
                            panels.append(panel)
                            answers += _model_panel(gr, demo, model, k)
    gr.Markdown(_about(demo), elem_id="about")
    return _Page(upload, photo, gallery, answers, panels)


def _model_panel(gr: Any, demo: Demo, model: Predictor, k: int) -> list[Any]:
    """The ``k``-th model's answer: its title, top-k, where it looked and its details."""
    return [gr.Markdown(_title(demo, model), elem_id=f"title-{k}"),
            gr.Label(num_top_classes=demo.config.top_k, show_label=False, elem_id=f"top-{k}"),
            gr.Image(label="where it looked", type="pil", format="jpeg", height=220, interactive=False,
                     buttons=["fullscreen"], elem_id=f"overlay-{k}"),
            gr.Markdown("", elem_id=f"details-{k}")]


def build_app(demo: Demo) -> Any:
    """The Gradio Blocks of the page. Endpoints: ``/explain`` (a file -> everything the page shows) and
    ``/classify`` (a file -> JSON, no overlays)."""
    gr = _gradio()
    from gradio.utils import get_upload_folder

    demo.upload_root = Path(get_upload_folder())
    # uploads and overlays older than 10 minutes are deleted every 10 minutes: strangers' photos are not kept
    with gr.Blocks(title=f"dogbench: {demo.run.path.name}", analytics_enabled=False,
                   delete_cache=(600, 600)) as app:
        page = _layout(gr, demo)
        _wire(gr, demo, page)
    return app


def _wire(gr: Any, demo: Demo, page: _Page) -> None:
    """The page's events: an upload, a pasted or webcam photo (or the photo cleared), an example clicked; and
    ``/classify``."""
    outputs = [page.upload, page.photo, *page.answers, *page.panels]
    common = dict(outputs=outputs, concurrency_id="models", show_progress_on=page.answers[0])

    def shown(answer: Answer | None) -> list[Any]:
        """An empty upload box, ready for the next file (the status names the one answered), then the answer."""
        return [None, *page_values(answer, demo)]

    def on_upload(payload: Any) -> list[Any]:
        return shown(_safe(lambda: demo.answer_payload(payload), payload))

    def on_example(selected: Any) -> list[Any]:
        example = demo.examples[int(selected.index)]
        return shown(_safe(lambda: demo.answer(example.path), {"orig_name": example.path.name}))

    page.upload.upload(on_upload, inputs=page.upload, preprocess=False, api_name="explain", **common)
    page.photo.input(on_upload, inputs=page.photo, preprocess=False, api_visibility="private", **common)
    if page.gallery is not None:
        on_example.__annotations__ = {"selected": gr.SelectData, "return": list}  # Gradio passes the click
        page.gallery.select(on_example, api_visibility="private", **common)

    def classify(image: Any, top_k: int = demo.config.top_k) -> dict:
        """Every model's top-k breeds of one photo (no overlays): {image, error, notes, agreement, models}."""
        answer = _safe(lambda: demo.answer_payload(image, explain=False), image)
        doc = answer.to_dict() if answer else {"image": None, "error": "no image given", "models": {}}
        for entry in doc["models"].values():
            entry["top"] = entry["top"][: max(1, int(top_k))]
        return doc

    # Gradio types the endpoint from real annotations (this module's are strings: __future__.annotations)
    classify.__annotations__ = {"image": gr.FileData, "top_k": int, "return": dict}
    gr.api(classify, api_name="classify", concurrency_id="models")


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
    # Gradio's queue re-summarises its traffic with pandas after every request, for a /monitoring dashboard this
    # page does not offer (enable_monitoring=False below), and under pandas 3 that summary warns in four lines
    # per request: with the dashboard off, the summary is never recomputed
    app._queue.ANAYLTICS_CACHE_FREQUENCY = sys.maxsize
    allowed = [str(e.path) for e in demo.examples] + ([str(demo.report.resolve())] if demo.report else [])
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.launch(
        server_name=config.host, server_port=config.port or _free_port(config.host), share=False, inbrowser=False,
        ssr_mode=False, enable_monitoring=False,
        max_file_size=int(config.max_upload_mb * 1024 * 1024), allowed_paths=allowed, show_error=False,
        prevent_thread_lock=True, quiet=True, theme=theme, css=CSS,  # no web fonts: the page works offline
    )
    where = ("this machine only; --host 0.0.0.0 to be reachable from others" if config.host in LOOPBACK
             else f"listening on {config.host}: reachable from other machines")
    print(f"dogbench serve: {len(demo.run.models)} models of {demo.run.path} at {app.local_url} ({where}); "
          "no public share link", flush=True)
    if block:
        app.block_thread()  # until Ctrl-C
    return app
