"""``--format space``: ``app.py`` (a standalone Gradio app over the timm export) and ``requirements.txt``; and
``serve_export``, which runs that app over any export folder (``dogbench serve EXPORT_DIR``)."""

from __future__ import annotations

import os
import shutil
import socket
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


def serve_export(folder: Path, *, host: str, port: int) -> None:
    """Run the Space's app over the export in ``folder`` at http://host:port (blocks until interrupted): the app
    an export with ``--format space`` carries, else the one it would carry."""
    folder = Path(folder).resolve()
    if port == 0:  # any free port, as for a run folder
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    app = folder / APP_FILE if (folder / APP_FILE).is_file() else APP_SOURCE
    os.environ["GRADIO_SERVER_NAME"], os.environ["GRADIO_SERVER_PORT"] = host, str(port)
    print(f"dogbench serve: the export {folder} at http://{host}:{port} (its Space app: one model, no overlays)",
          flush=True)
    code = compile(app.read_text(), str(folder / APP_FILE), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(folder / APP_FILE)})  # noqa: S102 - the app dogbench wrote
