"""Run every shell block tagged runnable in docs/tutorials, offline against local data and weights (CI does).

    .venv/bin/python scripts/run_tutorials.py --shared ../shared            # all pages, in the site's order
    .venv/bin/python scripts/run_tutorials.py --shared ../shared --list     # the blocks it would run

A block is runnable when the line before its opening fence is ``<!-- runnable -->`` (invisible on the site and on
GitHub). The pages run in the order of ``PAGES`` in one scratch folder, so a later page may use the runs of an
earlier one; each page's blocks run in one ``bash -euo pipefail`` with the variables the tutorials ask the reader
to set (``DATA``, ``PHOTO``, ``CNN``, ``CNN2``, ``VIT``) pointing at ``--shared``'s data and weights, and a cache of
its own. Exit 0 when every block ran, else 1 with the failing page's output.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
PAGES = ("own-photos.md", "finetune-export.md", "demo.md", "cluster.md", "screen.md")
MARK = "<!-- runnable -->"
FENCE = re.compile(r"^```(bash|sh|shell)\s*$")


def runnable_blocks(text: str) -> list[str]:
    """The shell blocks of a Markdown page whose opening fence follows a ``<!-- runnable -->`` line."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == MARK:
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1].strip()):
                raise ValueError(f"line {i + 1}: {MARK} must stand right above a ```bash fence")
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            blocks.append("\n".join(lines[i + 2:end]))
            i = end
        i += 1
    return blocks


def tutorial_env(shared: Path, work: Path) -> dict[str, str]:
    """The variables the tutorials ask the reader to set, pointed at ``shared``, and an offline, private cache."""
    weights, data = shared / "weights", shared / "data" / "stanford-dogs-dev"
    photo = sorted((data / "Images").glob("*/*.jpg"))[0]
    venv_bin = Path(sys.executable).parent
    return {
        **os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "DATA": str(data), "PHOTO": str(photo),
        "CNN": f"tf_efficientnet_lite0@{weights / 'tf_efficientnet_lite0.in1k.safetensors'}",
        "CNN2": f"tf_efficientnet_lite2@{weights / 'tf_efficientnet_lite2.in1k.safetensors'}",
        "VIT": f"vit_small_patch14_dinov2@{weights / 'vit_small_patch14_dinov2.imgfocus.fp16.safetensors'},"
               "img_size=224",
        "DOGBENCH_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
    }


def run_page(page: Path, env: dict[str, str], work: Path, timeout_s: float) -> tuple[int, float, str]:
    """Run one page's blocks in order in ``work``: (exit code, seconds, output)."""
    script = "\n".join(f"echo {shlex.quote('$ block ' + str(k + 1))}\n{block}"
                       for k, block in enumerate(runnable_blocks(page.read_text())))
    start = time.monotonic()
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)
        code, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        code, output = 124, f"{e.stdout or ''}\ntimed out after {timeout_s:.0f} s"
    return code, time.monotonic() - start, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, required=True, help="the folder with data/ and weights/")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per page")
    parser.add_argument("--list", action="store_true", help="print the runnable blocks and stop")
    args = parser.parse_args(argv)
    if args.list:
        for name in PAGES:
            for block in runnable_blocks((TUTORIALS / name).read_text()):
                print(f"--- {name}\n{block}")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="dogbench-tutorials-"))
    work.mkdir(parents=True, exist_ok=True)
    env, failed = tutorial_env(args.shared.resolve(), work), 0
    print(f"{'page':<22} {'blocks':>6} {'seconds':>8}  result   (in {work})")
    for name in PAGES:
        page = TUTORIALS / name
        code, seconds, output = run_page(page, env, work, args.timeout)
        print(f"{name:<22} {len(runnable_blocks(page.read_text())):>6} {seconds:>8.0f}  "
              f"{'ok' if code == 0 else f'exit {code}'}", flush=True)
        if code != 0:
            failed += 1
            print(output[-6000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
