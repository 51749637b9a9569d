"""``--format space``: ``app.py`` (a standalone Gradio app over the timm export) and ``requirements.txt``."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import timm

APP_FILE = "app.py"
REQUIREMENTS_FILE = "requirements.txt"
APP_SOURCE = Path(__file__).with_name("space_app.py")  # the app itself, checked like any module here
GRADIO_MIN = "6.0"


def gradio_version() -> str:
    """The installed Gradio's version (the Space's ``sdk_version``), else the oldest the app is written for."""
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        return GRADIO_MIN


def write_space(folder: Path) -> None:
    """``app.py`` and ``requirements.txt`` beside the timm export in ``folder``."""
    shutil.copyfile(APP_SOURCE, folder / APP_FILE)
    (folder / REQUIREMENTS_FILE).write_text(
        f"timm>={timm.__version__}\ntorch\ngradio>={GRADIO_MIN},<7\nsafetensors\npillow\n")
