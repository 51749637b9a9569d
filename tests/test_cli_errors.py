"""What a newcomer meets first: argument errors and ``--help`` answered before any heavy library is imported, in
dogbench's own words, with advice that fits the command (``python -m dogbench`` in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dogbench.cli.checks import Bound
from dogbench.cli.text import format_predictions, plural
from dogbench.config import resolve
from dogbench.inference import ImagePrediction
from dogbench.rundir import RunDir

HEAVY = ("torch", "timm", "optuna", "sklearn", "gradio", "matplotlib")
# ``python -m dogbench ARGS`` as runpy runs it, then, whatever it exits with, which heavy modules were imported
PROBE = f"""
import runpy, sys
sys.argv = ["dogbench", *sys.argv[1:]]
try:
    runpy.run_module("dogbench", run_name="__main__", alter_sys=True)
finally:
    print("heavy:", ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
"""


def _dogbench(*args: str | Path, cwd: Path) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr without the probe's line, heavy modules imported) of ``python -m dogbench``."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    err, _, heavy = proc.stderr.rstrip("\n").rpartition("heavy: ")
    return proc.returncode, proc.stdout, err, [m for m in heavy.strip().split(",") if m]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run folder (its config only: no error case gets as far as its models), a folder that is not a run, a
    text file named .jpg, a real (tiny) photo."""
    from PIL import Image

    base = tmp_path_factory.mktemp("errors")
    RunDir(base / "run").write_config(resolve({}, backbone_specs=["cnn=test_resnet@random"]))
    (base / "photos").mkdir()
    (base / "photos" / "notadog.jpg").write_text("hello, I am a shopping list\n")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(base / "photos" / "dog.jpg")
    return {"base": base, "run": base / "run", "photos": base / "photos", "text": base / "photos" / "notadog.jpg",
            "photo": base / "photos" / "dog.jpg", "missing": base / "missing.jpg"}


CASES = {  # id: (argv with {placeholders}, what stderr must say)
    "missing photo": (["predict", "{run}", "{missing}"], "{missing} does not exist"),
    "top-k 0": (["predict", "{run}", "{photo}", "--top-k", "0"], "top_k must be at least 1, got 0 (--top-k)"),
    "batch size": (["predict", "{run}", "{photo}", "--batch-size", "-3"], "batch_size must be at least 1"),
    "not a run": (["predict", "{photos}", "{photo}"], "{photos} is not a run folder (it has no config.json)"),
    "no such run": (["predict", "{base}/nowhere", "{photo}"], "Run folder {base}/nowhere does not exist"),
    "bad device": (["predict", "{run}", "{photo}", "--device", "gpu"], "--device 'gpu' is not a device. Valid:"),
    "bad format": (["predict", "{run}", "{photo}", "--format", "xml"], "invalid choice: 'xml'"),
    "not an int": (["predict", "{run}", "{photo}", "--top-k", "three"], "invalid int value: 'three'"),
    "text as jpg": (["predict", "{run}", "{text}"], "{text} is a text file, not an image, despite its .jpg name"),
    "strict": (["predict", "{run}", "{photo}", "{missing}", "--strict"],
               "{missing} does not exist (--strict stops at the first missing or unreadable file)"),
    "out is a folder": (["predict", "{run}", "{photo}", "--out", "{photos}"], "--out {photos} is a folder"),
    "explain missing": (["explain", "{run}", "{missing}"], "{missing} does not exist"),
    "explain text": (["explain", "{run}", "{text}"], "{text} is a text file, not an image"),
    "explain not a run": (["explain", "{photos}", "{photo}"], "give `dogbench explain` the folder a run wrote"),
    "serve not a run": (["serve", "{photos}"], "give `dogbench serve` the folder a run wrote"),
    "serve port": (["serve", "{run}", "--port", "70000"], "port must be 0..65535, got 70000 (--port)"),
    "serve megapixels": (["serve", "{run}", "--max-megapixels", "0"], "max_megapixels must be positive, got 0.0"),
    "evaluate not a run": (["evaluate", "{photos}"], "give `dogbench evaluate` the folder a run wrote"),
    "export not a run": (["export", "{photos}", "--out", "{base}/x"], "give `dogbench export` the folder a run wrote"),
    "export format": (["export", "{run}", "--out", "{base}/x", "--format", "onxx"],
                      "Unknown export format 'onxx'. Did you mean 'onnx'? Known: timm, onnx, space"),
    "export out": (["export", "{run}", "--out", "{photos}"], "--out {photos} exists and is not an empty folder"),
    "export opset": (["export", "{run}", "--out", "{base}/x", "--opset", "0"], "opset must be at least 14, got 0"),
    "export photos": (["export", "{run}", "--out", "{base}/x", "--photos", "{missing}"], "{missing} does not exist"),
    "screen zoo": (["screen", "--zoo", "standrd"], "unknown zoo 'standrd' (closest: standard)"),
    "screen budget": (["screen", "--zoo", "small", "--budget", "30 minutes"],
                      "--budget '30 minutes' is not a budget: give a time such as 45s, 30m or 1.5h"),
    "screen one": (["screen", "--backbone", "a=resnet50"], "a screen ranks two or more backbones"),
    "screen finalists": (["screen", "--zoo", "small", "--finalists", "0"], "finalists must be at least 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_argument_errors_come_before_any_heavy_import(case: str, places: dict[str, Path]) -> None:
    argv, needle = CASES[case]
    code, out, err, heavy = _dogbench(*(a.format(**places) for a in argv), cwd=places["base"])
    assert code == 2, (code, err)
    assert needle.format(**places) in err, err
    assert "Traceback" not in err and out == ""
    assert heavy == [], f"imported before the error was printed: {heavy}"


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"], ["explain", "--help"], ["export", "--help"],
                                  ["--version"]])
def test_help_imports_nothing_heavy(argv: list[str], places: dict[str, Path]) -> None:
    code, out, _, heavy = _dogbench(*argv, cwd=places["base"])
    assert code == 0 and out.startswith(("usage: dogbench", "dogbench "))
    assert heavy == []


def test_advice_for_a_folder_that_is_no_run_says_how_to_make_one(places: dict[str, Path]) -> None:
    code, _, err, _ = _dogbench("predict", places["photos"], places["photo"], cwd=places["base"])
    assert code == 2
    assert "dogbench run --config FILE --out RUN" in err and "--force" not in err


def test_nothing_predicted_lists_every_file_and_exits_2(places: dict[str, Path]) -> None:
    code, out, err, heavy = _dogbench("predict", places["run"], places["missing"], places["text"],
                                      cwd=places["base"])
    assert code == 2 and out == "" and heavy == []
    assert err.splitlines() == [
        "dogbench: error: nothing could be predicted: none of the 2 files given could be read",
        f"  {places['missing']} does not exist",
        f"  {places['text']} is a text file, not an image, despite its .jpg name"]


def test_explain_help_says_where_it_writes(places: dict[str, Path]) -> None:
    _, out, _, _ = _dogbench("explain", "--help", cwd=places["base"])
    assert "explanations/<name of RUN_DIR> in the current folder" in " ".join(out.split())


def test_counts_take_their_plural() -> None:
    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]


def test_a_row_that_was_not_predicted_names_its_file_once() -> None:
    rows = [ImagePrediction("photos/a.jpg", error="photos/a.jpg is a text file, not an image, despite its .jpg name"),
            ImagePrediction("photos/b.jpg", {"cnn": (("chow", 0.75), ("pug", 0.25))})]
    table = format_predictions(rows, fmt="table", run="run", top_k=2, temperatures={"cnn": None}).splitlines()
    assert table[1].split(None, 2) == ["photos/a.jpg", "-", "is a text file, not an image, despite its .jpg name"]
    assert table[2].split(None, 2) == ["photos/b.jpg", "cnn", "chow 75.0%, pug 25.0%"]


def test_bounds_word_what_they_accept() -> None:
    assert Bound("--top-k", 1).violation(0) == "top_k must be at least 1, got 0 (--top-k)"
    assert Bound("--top-k", 1).violation(1) is None and Bound("--top-k", 1).violation(None) is None
    assert Bound("--port", 0, 65535).violation(65536) == "port must be 0..65535, got 65536 (--port)"
    assert Bound("--max-upload-mb", positive=True).violation(0.0) == "max_upload_mb must be positive, got 0.0 " \
                                                                      "(--max-upload-mb)"
