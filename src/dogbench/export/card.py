"""The model card (README.md of an export): Hugging Face's metadata header, then the run's own figures.

Modelled on timm's ``generate_readme`` (tags, library_name, datasets; details, usage, comparison), with what a
benchmark adds: the test interval, calibration before and after, the comparison the model won, the recipe and
the ImageNet-overlap caveat. Every figure is read from the run's ``results.json``; nothing is measured here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from dogbench.export.space import gradio_version
from dogbench.export.spec import Format, ParityCheck
from dogbench.names import ModelName, model_name
from dogbench.results import ModelResult, RunResults, verdict


@dataclass(frozen=True)
class CardFacts:
    """What the card says beyond results.json: which model, why, what was written and how it was checked."""

    label: str
    why: str
    run: str  # the run folder's name
    formats: tuple[Format, ...]
    opset: int | None
    checks: tuple[ParityCheck, ...]
    version: str  # dogbench's


def config_digest(results: RunResults) -> str:
    """sha256 of the run's resolved config (canonical JSON): names the experiment that made the model."""
    return hashlib.sha256(json.dumps(results.config, sort_keys=True).encode()).hexdigest()


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _header(m: ModelResult, name: ModelName, dataset: str, facts: CardFacts) -> str:
    datasets = [dataset.lower(), *(d.lower() for d in name.pretraining.split(", ") if d)]
    tags = ["image-classification", "timm", "dogbench", "fine-grained", m.method]
    lines = ["---", "tags:", *(f"- {t}" for t in dict.fromkeys(tags)), "pipeline_tag: image-classification",
             "library_name: timm", "license: other", "datasets:", *(f"- {d}" for d in dict.fromkeys(datasets)),
             "metrics:", "- accuracy", "- f1"]
    if Format.SPACE in facts.formats:  # what a Hugging Face Space reads; a model repository ignores it
        lines += [f"title: {json.dumps(name.short)}", "sdk: gradio", f"sdk_version: {gradio_version()}",
                  "app_file: app.py"]
    return "\n".join([*lines, "---"])


def _figures(m: ModelResult, n_test: int) -> list[str]:
    test = m.test
    lo, hi = test["top1_ci95"]
    rows = [f"| top-1 accuracy | {_pct(test['top1'])} (95% bootstrap interval {_pct(lo)} to {_pct(hi)}) |",
            f"| top-5 accuracy | {_pct(test['top5'])} |", f"| macro-F1 | {test['macro_f1']:.4f} |"]
    cal = m.calibration
    if cal.get("test"):
        before, after = cal["test"]["before"]["ece"], cal["test"]["after"]["ece"]
        rows.append(f"| calibration error (ECE, {cal.get('bins', 15)} bins) | {before:.4f} before, {after:.4f} after "
                    f"temperature scaling (T = {cal.get('temperature', 1.0):.4g}, fitted on validation) |")
    if m.tta:
        rows.append(f"| test-time augmentation | {m.tta['views']} ({m.tta['n_views']} views, averaged: the figures "
                    f"above); single view, as this exported model runs: top-1 {_pct(m.tta['single_view']['top1'])} |")
    return [f"## Results on the held-out test split ({n_test} images)", "", "| metric | value |", "|---|---|",
            *rows]


def _comparisons(results: RunResults, label: str) -> list[str]:
    """The paired comparisons this model won (else every one it is in), each as the report's sentence."""
    mine = [c for c in results.comparisons if label in (c["a"], c["b"])]
    won = [c for c in mine if (c["delta_top1"] > 0) == (c["a"] == label) and c["delta_top1"] != 0]
    if not mine:
        return []
    title = "## The comparison it won" if won else "## Comparisons (it won none)"
    return [title, "", *(f"- {verdict(c, results.names())}" for c in (won or mine))]


def _recipe(m: ModelResult, results: RunResults) -> list[str]:
    data = results.dataset
    split = (f"the validation split ({data.n_val} images, held out of the {data.n_train + data.n_val} training "
             f"images; split by {data.split_source})")
    lines = ["## Training recipe", ""]
    if m.method == "frozen":
        head = m.head
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in head.get("params", {}).items() if k != "head")
        lines += [f"- method: frozen backbone, {head.get('kind')} head on its cached features ({params})",
                  f"- fitted for {head.get('epochs') or head.get('iterations')} "
                  f"{'epochs' if head.get('epochs') else 'L-BFGS iterations'}",
                  f"- tuned: the head's kind and hyper-parameters by Optuna, {head.get('n_trials', '?')} trials "
                  f"({head.get('n_pruned', 0)} pruned), scored on {split}"]
    else:
        p = m.training.get("params", {})
        lora = f" (LoRA rank {p.get('lora_rank')}, merged into the weights)" if m.method == "lora" else ""
        lines += [f"- method: {m.method} fine-tuning of the backbone with a linear classifier{lora}",
                  f"- {m.training.get('epochs_run', p.get('epochs'))} epochs (best: {m.training.get('best_epoch')}), "
                  f"lr {p.get('lr')}, batch {p.get('batch_size')}, weight decay {p.get('weight_decay')}, "
                  f"label smoothing {p.get('label_smoothing')}",
                  f"- tuned: {len(m.training.get('trials') or []) or 'no'} recipe trials, early stopping and the "
                  f"best epoch chosen on {split}"]
    lines += ["- calibrated: one temperature fitted on the validation split; the test split was scored once, at "
              f"the end ({data.n_test} images of {data.n_classes} classes)"]
    return lines


def _caveat(m: ModelResult, name: ModelName) -> list[str]:
    if not m.leaky:
        return []
    return ["## Caveat: the test photos may have been seen in pretraining", "",
            f"The backbone was pretrained on {name.pretraining_detail or name.pretraining}, which holds ImageNet's "
            "photos, and the test photos may be among them (Stanford Dogs is a subset of ImageNet): some test "
            "photos (or near-copies) were likely in the pretraining data, so the test figures above may be "
            "optimistic for new photos."]


def _usage(facts: CardFacts, preprocess: dict[str, Any]) -> list[str]:
    lines = ["## How to use it", ""]
    if Format.TIMM in facts.formats or Format.SPACE in facts.formats:
        lines += ["With timm (the temperature is in the classifier: the softmax is the calibrated probability):", "",
                  "```python", "import timm",
                  'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True).eval()  # or "hf-hub:USER/REPO"',
                  "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
                  "probabilities = model(transform(image).unsqueeze(0)).softmax(-1)  # image: an RGB PIL image",
                  "```", "", "The class names are `label_names` in config.json.", ""]
    if Format.ONNX in facts.formats:
        size = preprocess["input_size"]
        args = (f"input_size={tuple(size)}, interpolation={preprocess['interpolation']!r}, "
                f"crop_pct={preprocess['crop_pct']}, crop_mode={preprocess['crop_mode']!r}")
        lines += [f"With onnxruntime (`model.onnx`, opset {facts.opset}): resized and centre-cropped uint8 pixels "
                  "(batch, 3, height, width) in, calibrated probabilities out; the normalisation is in the graph:",
                  "", "```python", "import onnxruntime, timm", "from PIL import Image",
                  f"resize_crop = timm.data.create_transform({args}, use_prefetcher=True)  # uint8 out",
                  'pixels = resize_crop(Image.open("dog.jpg").convert("RGB")).unsqueeze(0).numpy()',
                  'session = onnxruntime.InferenceSession("model.onnx")',
                  'probabilities = session.run(["probabilities"], {"pixels": pixels})[0]', "```", ""]
    if Format.SPACE in facts.formats:
        lines += ["`python app.py` starts the Gradio demo of this folder (a Hugging Face Space as it is).", ""]
    lines += ["To publish: `hf upload USER/REPO THIS_FOLDER` (huggingface_hub's own CLI, after `hf auth login`; "
              "dogbench holds no credentials)."]
    return lines


def _provenance(results: RunResults, facts: CardFacts, m: ModelResult) -> list[str]:
    env = results.environment
    lines = ["## Provenance", "",
             f"- exported by dogbench {facts.version} from run `{facts.run}` (model `{facts.label}`, {facts.why}); "
             f"the run was made by dogbench {env.get('dogbench', '?')} with timm {env.get('timm', '?')} and torch "
             f"{env.get('torch', '?')} on {results.created}",
             f"- config digest (sha256 of the run's resolved config): `{config_digest(results)}`",
             f"- weights sha256 of the backbone: `{m.weights_sha256}`"]
    lines += [f"- checked at export against dogbench's predict path: {c.describe()}" for c in facts.checks]
    return lines


def model_card(results: RunResults, facts: CardFacts) -> str:
    """README.md of an export of ``facts.label`` from the run whose ``results.json`` is ``results``."""
    m = results.models[facts.label]
    name = model_name(asdict(m))
    data = results.dataset
    how = (f"a tuned {m.head.get('kind')} head on its frozen features" if m.method == "frozen" else
           f"{m.method}-fine-tuned with a linear classifier")
    what = (f"{name.full}; {how}, classifying the {data.n_classes} classes of "
            f"{data.name}. {m.params / 1e6:.1f}M parameters in the backbone, {m.gflops:.2f} GFLOPs per "
            f"{m.preprocess['input_size'][-1]}-pixel image.")
    use = (f"Intended use: telling apart the {data.n_classes} classes of {data.name} in photos like its own, for "
           "research, teaching and demos. Every photo gets one of these classes, whatever it shows; the "
           "probabilities are calibrated on the validation split, not on photos from elsewhere.")
    parts = [_header(m, name, data.name, facts), f"# {name.short} for {data.name} (dogbench `{facts.label}`)", "",
             what, "", use, "", *_figures(m, data.n_test), "", *_comparisons(results, facts.label), "",
             *_recipe(m, results), "", *_caveat(m, name), "", *_usage(facts, m.preprocess), "",
             *_provenance(results, facts, m)]
    text = "\n".join(parts)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"

