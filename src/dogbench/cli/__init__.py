"""``dogbench``: thin subcommands over the library. ``dogbench run`` is the main job.

``parser`` builds the command line, ``checks`` checks its arguments before anything heavy is imported (a typo, a
missing photo or a folder that is not a run is reported in about a second, exit 2), and ``commands``, ``jobs``
and ``predict`` do the work, importing torch and the rest when they start.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from dogbench.cli.checks import check_arguments
from dogbench.cli.parser import build_parser
from dogbench.errors import DogbenchError

__all__ = ["build_parser", "config_from_args", "format_predictions", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        check_arguments(args)
        from dogbench.cli.commands import dispatch

        return dispatch(args)
    except KeyboardInterrupt:
        print("dogbench: interrupted; cached chunks and finished stages are kept", file=sys.stderr)
        return 130
    except DogbenchError as err:  # a user-facing error: one clear message, no traceback
        print(f"dogbench: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output path that cannot be written, a full disk, a vanished file
        target = err.filename2 or err.filename  # an atomic write's rename names the temp file first
        where = f": {target}" if target else ""
        print(f"dogbench: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


def __getattr__(name: str) -> Any:
    """``config_from_args`` and ``format_predictions``, imported on first use (``import dogbench.cli`` stays light)."""
    if name == "config_from_args":
        from dogbench.cli.jobs import config_from_args

        return config_from_args
    if name == "format_predictions":
        from dogbench.cli.text import format_predictions

        return format_predictions
    raise AttributeError(f"module 'dogbench.cli' has no attribute {name!r}")
