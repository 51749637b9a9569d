"""The commands over a finished run (report, explain, serve) and ``models``; ``dispatch`` routes every command."""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from pathlib import Path

from dogbench.errors import DogbenchError


def dispatch(args: argparse.Namespace) -> int:
    """Run the command ``args`` names (its arguments already checked); heavy imports happen here and below."""
    from dogbench.cli.jobs import RANKED, run_job
    from dogbench.cli.predict import predict

    if args.command == "predict":
        return predict(args)  # refuses torchrun itself, once the photos are screened
    if args.command not in RANKED:
        refuse_torchrun(args.command)
    if args.command == "models":
        from dogbench.architecture import models_command

        print(models_command(args.names, as_json=args.json))
        return 0
    commands = {"report": _report, "explain": _explain, "serve": _serve, "export": _export}
    return commands[args.command](args) if args.command in commands else run_job(args)


def refuse_torchrun(command: str) -> None:
    """A command that runs as one process, refused under torchrun."""
    from dogbench import distributed
    from dogbench.cli.jobs import RANKED

    if distributed.launched():
        raise DogbenchError(f"`dogbench {command}` runs as one process; under torchrun: {', '.join(sorted(RANKED))}")


def explain_out(run_dir: Path) -> Path:
    """``explain``'s default folder: explanations/<the run folder's name> in the current folder, never the run."""
    return Path("explanations") / run_dir.resolve().name


def _report(args: argparse.Namespace) -> int:
    from dogbench.config import ConfigError, ReportConfig
    from dogbench.pipeline import report_stage
    from dogbench.rundir import RunDir

    # one run folder: its own [report] settings are the defaults
    one = RunDir(args.runs[0]) if len(args.runs) == 1 else None
    d = one.read_config().report if one is not None and one.exists() else ReportConfig()
    examples = d.examples if args.examples is None else args.examples
    explain = d.explain if args.explain is None else args.explain
    if examples < 0 or explain < 0:
        raise ConfigError(f"--examples and --explain must be >= 0, got {examples} and {explain}")
    cfg = dataclasses.replace(d, examples=examples, explain=min(explain, examples),
                              seed=d.seed if args.seed is None else args.seed)
    out = args.out or (args.runs[0] if len(args.runs) == 1 else Path("runs") / time.strftime("report-%Y%m%d-%H%M%S"))
    with RunDir(out).lock():  # the report's files (and a run's explanations) are written into the folder
        files = report_stage(args.runs, out, cfg, progress=not args.quiet)
    print("\n".join(files.verdicts))
    print(f"report: {files.html}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from dogbench.explain import explain_run
    from dogbench.inference import load_run

    out = args.out or explain_out(args.run_dir)
    records = explain_run(load_run(args.run_dir, device=args.device, require_heads=False), args.images, out)
    for r in records:
        print(f"{r['image']} {r['label']} ({r['method']}): {out / r['png']}; "
              f"top-3 {', '.join(f'{n} {p:.0%}' for n, p in r['top3']) or '(no tuned head)'}")
    for figure in dict.fromkeys(r["figure"] for r in records):
        print(f"side by side: {out / figure}")
    print(f"explanations: {out.resolve()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dogbench.export import ExportConfig, export_run, parse_formats

    config = ExportConfig(formats=parse_formats(args.format), opset=args.opset, photos=tuple(args.photos))
    print(export_run(args.run_dir, args.out, config, model=args.model).summary())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dogbench.device import resolve_device
    from dogbench.export.spec import is_export

    if is_export(args.run_dir):
        from dogbench.cli.parser import build_parser
        from dogbench.export import serve_export

        defaults = build_parser().parse_args(["serve", str(args.run_dir)])
        ignored = [f"--{k.replace('_', '-')}" for k in ("device", "max_upload_mb", "max_megapixels", "concurrency",
                                                       "examples") if getattr(args, k) != getattr(defaults, k)]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} do not apply to an export folder: its Space app serves one model "
                          "on the CPU with Gradio's own upload handling", stacklevel=1)
        serve_export(args.run_dir, host=args.host, port=args.port)
        return 0
    from dogbench.serve import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, device=args.device, max_upload_mb=args.max_upload_mb,
                         max_megapixels=args.max_megapixels, concurrency=args.concurrency, examples=args.examples)
    resolve_device(config.device)  # checked against this machine before any model is loaded
    warnings.simplefilter("ignore", ResourceWarning)  # the web server's event loops, not the user's business
    serve(args.run_dir, config)
    return 0
