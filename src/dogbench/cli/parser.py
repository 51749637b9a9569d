"""``dogbench``'s argument parser: every command, flag and help text (argparse only: nothing heavy is imported)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dogbench import __version__

EPILOG = """examples:
  dogbench run --data ~/data/stanford-dogs                    # ViT-S/16 vs ResNet50 (hub weights)
  dogbench run --config configs/shared-dev.toml --out runs/shared-dev
  dogbench run --data my_images --backbone cnn=resnet50 --backbone vit=vit_b16 --trials 20
  dogbench run --backbone vit=vit_small_patch14_dinov2@w.safetensors,img_size=224 --set 'tune.heads=["linear"]'
  dogbench predict runs/shared-dev dog.jpg photos/ --top-k 3 --format json
  dogbench evaluate runs/shared-dev                           # its config.json is the source of truth
  dogbench export runs/shared-dev --out exports/best --format timm,onnx,space   # the best model, out of dogbench
  dogbench screen --data my_images --zoo standard --budget 30m --out runs/screen   # rank many, run the best 3
"""


def _add_common(p: argparse.ArgumentParser, *, run_dir: str = "out") -> None:
    """The flags of the commands that build a config; ``run_dir``: "out" (--out, made if missing) or "positional"
    (an existing RUN_DIR, whose config.json is the source of truth)."""
    if run_dir == "positional":
        p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that `dogbench tune` or `run` wrote")
    p.add_argument("--config", type=Path, help="TOML config file (every key: docs/reference/config.md)")
    p.add_argument("--data", help="dataset folder: Stanford Dogs (official or Kaggle layout, or the .tar "
                   "archives) or class-per-folder images; a labels file (.csv/.tsv path,label[,split]; .txt); a "
                   "Hugging Face datasets folder, parquet file(s) or hf://owner/name; or a name: pets, flowers102, "
                   "cifar10, cifar100, fgvc-aircraft, stanford-cars, cub200 (in the data cache, downloaded if "
                   "torchvision can); default: the Stanford Dogs cache, downloaded if missing")
    p.add_argument("--backbone", action="append", default=[], metavar="LABEL=SPEC",
                   help="LABEL=MODEL[@WEIGHTS][,key=value...]; MODEL an alias or timm tag; WEIGHTS hub (default), "
                   "random or a file; repeatable (default: vit=vit_s16, resnet=resnet50)")
    p.add_argument("--trials", type=int, help="Optuna trials per backbone (tune.trials)")
    p.add_argument("--storage", help="Optuna storage URL shared by tuning workers, e.g. "
                   "postgresql://user:password@host:5432/db (tune.storage; default SQLite in the run folder)")
    p.add_argument("--study", help="study name shared by workers (tune.study; one study per backbone: NAME-LABEL)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (features.device)")
    p.add_argument("--precision", help="auto, fp32, bf16, fp16 (features.precision)")
    if run_dir == "out":
        p.add_argument("--out", help="run folder (default runs/<timestamp>); an existing one keeps its config.json")
        p.add_argument("--force", action="store_true", help="replace an existing run folder's config.json with the "
                       "given config (stages whose inputs changed are computed again)")
    p.add_argument("--cache-dir", help="feature cache folder (default $DOGBENCH_CACHE/features)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, help="stop at the first unreadable image "
                   "(data.strict; default: skip it with a warning)")
    p.add_argument("--crop-to-box", action=argparse.BooleanOptionalAction,
                   help="crop Stanford Dogs images to their annotated box (data.crop_to_box)")
    p.add_argument("--classes", help="a subset of the classes for quick trials: the first N, or names a,b,c "
                   "(data.classes)")
    p.add_argument("--box-ablation", action=argparse.BooleanOptionalAction, help="every backbone twice, box-cropped "
                   "and whole images, as comparable rows of one run (data.box_ablation; needs Annotation/)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction,
                   help="download Stanford Dogs when it is not found (data.download; default on)")
    p.add_argument("--data-url", help="mirror URL for the Stanford Dogs archives")
    p.add_argument("--seeds", type=int, help="repeat split, tuning and evaluation with N seeds (evaluate.seeds)")
    p.add_argument("--shots", help="data efficiency: images per class, e.g. 1,2,5,10,20,all (shots.shots)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set tune.timeout_s=60 or --set backbones.vit.img_size=224 "
                   "(applied after --config and --backbone; repeatable)")
    p.add_argument("--track", type=_trackers, metavar="TRACKERS", help="where curves and figures go besides the "
                   "run folder: tensorboard (RUN/tensorboard/, the default), mlflow (track.mlflow_uri), both "
                   "comma-separated, or none (track.to)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _trackers(text: str) -> str | list[str]:
    """``--track none`` -> no tracker; anything else goes to track.to's own check."""
    return [] if text.strip() == "none" else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dogbench", description="Does a Vision Transformer beat a ResNet50 on your fine-grained images?",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dogbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "run": "the main job: extract (cached), tune heads, evaluate, compare",
        "extract": "extract features into the cache (nothing else)",
        "tune": "extract (cached) and tune heads on train/val; writes <out>/<label>/tuning.json",
        "finetune": "fine-tune every backbone with --methods (default: lora,partial,full,lp-ft) beside the frozen "
                    "protocol's tuned head, tuned on validation, scored on test once; one results.json and report",
    }
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        if name in ("run", "finetune"):
            p.add_argument("--methods", help="rows of the ladder, comma-separated: frozen,lora,partial,full,lp-ft "
                           "(finetune.methods; run's default: frozen)")
            p.add_argument("--epochs", type=int, help="fine-tuning epochs (finetune.epochs)")
    _add_evaluate_bench(sub)
    _add_screen(sub)
    _add_report(sub)
    _add_explain(sub)
    _add_predict(sub)
    _add_serve(sub)
    _add_export(sub)
    _add_models(sub)
    return parser


def _add_evaluate_bench(sub: Any) -> None:
    """``evaluate`` (a run folder's tuned heads, scored once) and ``bench`` (speed)."""
    help_text = "refit the tuned heads of RUN_DIR on train+val, score test once, compare (its config.json rules)"
    _add_common(sub.add_parser("evaluate", help=help_text, description=help_text), run_dir="positional")
    help_text = ("time decode alone, the model alone, end-to-end extraction and the hand-written recipe, against "
                 "the device's matmul peak; writes bench.csv (timm's columns) to --out")
    bench = sub.add_parser("bench", help=help_text, description=help_text)
    _add_common(bench)
    bench.add_argument("--images", type=int, help="images per pass (bench.images)")
    bench.add_argument("--repeats", type=int, help="rounds; figures are medians over them (bench.repeats)")
    bench.add_argument("--batch-size", type=int, help="images per forward pass (features.batch_size)")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="also time the model under torch.compile (bench.compare_compile)")
    bench.add_argument("--train", action=argparse.BooleanOptionalAction, help="time fine-tuning instead: the "
                       "training step alone, end to end, and the hand-written recipe (bench.train)")
    bench.add_argument("--recipe", action=argparse.BooleanOptionalAction,
                       help="time the ImageFolder + DataLoader recipe too (bench.recipe; default on)")


def _add_screen(sub: Any) -> None:
    """``screen``: many backbones ranked on the training images within a budget, the finalists run in full."""
    help_text = ("rank many backbones on your training images by successive halving (cross-validated probes on "
                 "growing subsamples, LogME beside them), then give the finalists a full run (test scored once); "
                 "writes screen.json, a leaderboard and the finalists' run folder to --out")
    screen = sub.add_parser("screen", help=help_text, description=help_text)
    _add_common(screen)
    screen.add_argument("--zoo", help="a shipped zoo (standard, small) or a .toml file of [models.NAME] tables "
                        "(tag, family, pretraining, leaky); added to any --backbone given")
    screen.add_argument("--budget", help="what the screen may spend: a time such as 45s, 30m or 1.5h, or images "
                        "such as 20000img (default: no limit, the finalists probed on the whole training split)")
    screen.add_argument("--finalists", type=int, default=3, help="candidates that get the full run (default 3)")


def _add_report(sub: Any) -> None:
    """``report``: one or more run folders -> report.html and report.md."""
    help_text = ("write report.html (self-contained) and report.md from one or more run folders; several folders "
                 "(frozen and fine-tuned, other datasets) combine into one comparison")
    report = sub.add_parser("report", help=help_text, description=help_text)
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders that `dogbench run` wrote")
    report.add_argument("--out", type=Path, help="folder for the report (default: the run folder; with several "
                        "runs, runs/report-<timestamp>)")
    report.add_argument("--examples", type=int, help="test images in the predictions grid (report.examples)")
    report.add_argument("--explain", type=int, help="of those, images explained with attention rollout / Grad-CAM "
                        "when the run folder has none yet (report.explain; 0: never load a model)")
    report.add_argument("--seed", type=int, help="which test images the grid shows (report.seed)")
    report.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_explain(sub: Any) -> None:
    """``explain``: attention rollout / Grad-CAM overlays of photos."""
    help_text = "write attention-rollout (ViT) / Grad-CAM (CNN) overlays of photos for every model of a run"
    explain = sub.add_parser("explain", help=help_text, description=help_text)
    explain.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                         help="a run folder: its config names the backbones, its tuned heads give the breeds")
    explain.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="photos to explain")
    explain.add_argument("--out", type=Path, help="folder for the overlays (default: explanations/<name of RUN_DIR> "
                         "in the current folder; the run folder itself is never written)")
    explain.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")


def _add_predict(sub: Any) -> None:
    """``predict``: top-k breeds of photos with every model of a run."""
    help_text = "classify photos (files and folders) with every model of a run: top-k breeds as a table, JSON or CSV"
    predict = sub.add_parser("predict", help=help_text, description=help_text)
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that `dogbench run` wrote")
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and folders (walked)")
    predict.add_argument("--top-k", type=int, default=5, help="breeds per model (default 5)")
    predict.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output (default table)")
    predict.add_argument("--out", type=Path, help="write the output to this file instead of standard output")
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")
    predict.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's features "
                         "setting: 64 on CPU)")
    predict.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                         help="stop at the first missing or unreadable file, exit 2 (default: report it on its own "
                         "line and predict the rest; exit 2 only when nothing could be predicted)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_serve(sub: Any) -> None:
    """``serve``: the Gradio demo."""
    help_text = "a web page (Gradio) where every model of a run answers uploaded photos and shows where it looked"
    serve = sub.add_parser("serve", help=help_text, description=help_text + "; binds 127.0.0.1 unless --host says "
                           "otherwise, and never opens a public share link")
    serve.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that `dogbench run` wrote, or an "
                       "export folder (`dogbench export`: its one model, served by its Space app)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                       "only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)")
    serve.add_argument("--max-megapixels", type=float, default=50.0,
                       help="largest image in megapixels, refused before decoding (default 50)")
    serve.add_argument("--concurrency", type=int, default=2, help="requests worked on at once; the rest queue "
                       "(default 2)")
    serve.add_argument("--examples", type=int, default=8, help="test photos of the run offered as examples "
                       "(default 8)")


def _add_export(sub: Any) -> None:
    """``export``: one model of a run in timm's own format, ONNX and a Hugging Face Space, with a model card."""
    help_text = ("write one model of a finished run (LoRA merged, head and calibration folded in) as timm's own "
                 "format, ONNX or a Hugging Face Space, with a model card; each format checked against predict")
    export = sub.add_parser("export", help=help_text, description=help_text)
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that `dogbench run` wrote")
    export.add_argument("--out", type=Path, required=True, help="the export folder (new or empty); written whole "
                        "or not at all")
    export.add_argument("--model", help="the row to export, e.g. cnn or vit/lora (default: the best by validation "
                        "top-1, said so)")
    export.add_argument("--format", default="timm,onnx", help="comma-separated: timm, onnx, space (default "
                        "timm,onnx)")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the installed torch's exporter default)")
    export.add_argument("--photos", nargs="+", type=Path, default=(), metavar="PATH", help="photos (files or "
                        "folders) the exported formats are checked on against predict, the first 16 of them "
                        "(default: 16 of the run's own test images)")


def _add_models(sub: Any) -> None:
    """``models``: architectures from timm, beside the ViT paper's Table 1."""
    help_text = ("print the architecture of timm models (layers, hidden size, MLP size, heads, parameters), built on "
                 "the meta device: the ViT variants table by default, beside the ViT paper's Table 1")
    models = sub.add_parser("models", help=help_text, description=help_text)
    models.add_argument("names", nargs="*", metavar="MODEL",
                        help="aliases or timm tags (default: ViT-S/B/L/H, ResNet50)")
    models.add_argument("--json", action="store_true", help="machine-readable output")
