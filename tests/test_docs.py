"""The documentation stays true: the generated references match the code, a changed flag or default fails until
they are regenerated, no heading names an issue, README stays one screen, and every runnable tutorial command
parses with today's CLI (scripts/run_tutorials.py runs them for real in CI)."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from browser import script
from dogbench.cli.parser import build_parser
from dogbench.config.sections import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
ISSUE_HEADING = re.compile(r"^#+ .*(\b[Ii]ssues? *#?\d|#\d)")


@dataclass(frozen=True)
class LongerFinetune(FinetuneConfig):
    """A FinetuneConfig whose default changed without the docs following."""

    epochs: int = 11  # training epochs of each fine-tuning method (early stopping may end sooner)


def test_generated_references_match_the_code():
    ref = script("docs_reference")
    for name, text in ref.pages().items():
        page = ref.PAGES[name]
        assert page.read_text() == text, f"{page.relative_to(ROOT)} is stale: run .venv/bin/python " \
                                         "scripts/docs_reference.py"


def test_a_changed_default_or_flag_fails_until_regenerated(monkeypatch, capsys):
    ref = script("docs_reference")
    monkeypatch.setitem(ref.SECTIONS, "finetune", LongerFinetune)
    assert ref.main(["--check"]) == 1
    assert "docs/reference/config.md" in capsys.readouterr().err
    monkeypatch.undo()

    ref = script("docs_reference")

    def parser_with_new_help():
        parser = build_parser()
        run = ref.subcommands(parser)["run"]
        next(a for a in run._actions if "--trials" in a.option_strings).help = "a changed help text"
        return parser

    monkeypatch.setattr(ref, "build_parser", parser_with_new_help)
    assert ref.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/reference/cli.md" in err and "config.md" not in err


def test_every_config_key_has_a_meaning():
    ref = script("docs_reference")
    page = ref.config_page()
    for section in ref.SECTIONS.values():
        for key in section.__dataclass_fields__:
            assert re.search(rf"^\| `\w+\.{key}` \| .+ \| .+ \| \S.+ \|$", page, re.M), key


def markdown_headings(path: Path) -> list[str]:
    headings, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.append(line)
    return headings


def test_no_page_title_or_heading_names_an_issue():
    pages = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
    offenders = [f"{p.relative_to(ROOT)}: {h}" for p in pages for h in markdown_headings(p) if ISSUE_HEADING.match(h)]
    assert not offenders, offenders
    assert ISSUE_HEADING.match("## Issue 11: fine-tuning") and ISSUE_HEADING.match("### The fix (#29)")


def test_readme_is_one_screen_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for command in ("bash scripts/run.sh", "bash scripts/test.sh"):
        assert f"```bash\n{command}\n```" in text


def commands(block: str) -> list[list[str]]:
    """The dogbench invocations of a shell block (continuation lines joined, variables left as placeholders)."""
    joined = block.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        words = shlex.split(line.split(" #")[0].split(" &")[0]) if line.strip() else []
        if "dogbench" in words and words[0] in ("dogbench", "torchrun"):
            found.append(words[words.index("dogbench") + 1:])
    return found


def test_runnable_tutorial_commands_parse_with_todays_cli(monkeypatch):
    tutorials = script("run_tutorials")
    parser, parsed = build_parser(), 0
    monkeypatch.setattr(os, "environ", {})
    for name in tutorials.PAGES:
        blocks = tutorials.runnable_blocks((tutorials.TUTORIALS / name).read_text())
        assert blocks, f"{name} has no runnable block"
        for block in blocks:
            for argv in commands(block):
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{name}: `dogbench {' '.join(argv)}` no longer parses")
                parsed += 1
    assert parsed >= 8


def test_a_runnable_mark_must_stand_above_a_shell_fence():
    tutorials = script("run_tutorials")
    assert tutorials.runnable_blocks("<!-- runnable -->\n```bash\necho 1\n```\n\n```bash\necho 2\n```") == ["echo 1"]
    with pytest.raises(ValueError, match="must stand right above"):
        tutorials.runnable_blocks("<!-- runnable -->\n\n```bash\necho 1\n```")
