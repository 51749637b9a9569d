"""Tracking (issue 31): a tiny `dogbench finetune` SIGKILLed mid-epoch and resumed leaves TensorBoard events with
every epoch's validation top-1 once, equal to results.json, the head search's trials (HParams) and the final
figures; the same run in an embedded MLflow store (params, finals, curves once, report.html); an unreachable
MLflow server is one warning and the same results; a real `mlflow server` (.ci/run starts one) reads back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

from dogbench.cli import main
from dogbench.track import TrackingWarning

CNN = ["--backbone", "cnn=test_resnet@random,input_size=32"]
FAST = ["--trials", "2", "--set", "tune.max_epochs=10", "--set", "evaluate.n_bootstrap=200", "--quiet",
        "--set", "report.explain=0", "--set", "report.examples=2"]
KILL_AT = 6  # optimizer steps: 4 an epoch (19 training images, batch 4), so mid-epoch 2

KILLING = textwrap.dedent("""
    import os, signal, sys
    from dogbench.cli import main
    from dogbench.training import loop
    kill_at = int(sys.argv[1])  # the optimizer step after which this process is SIGKILLed
    step = loop.Stepper.optimizer_step
    def killing_step(self, n):
        step(self, n)
        if n + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    loop.Stepper.optimizer_step = killing_step
    sys.exit(main(sys.argv[2:]))
""")


def _finetune_args(base: Path) -> list[str]:
    return ["finetune", "--data", str(base / "data"), "--out", str(base / "run"), *CNN, "--cache-dir",
            str(base / "cache"), "--methods", "full", "--epochs", "3", "--set", "finetune.batch_size=4",
            "--track", "tensorboard,mlflow", *FAST]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[int]]:
    """The run folder, its results and the exit codes of the killed and the resumed command."""
    from conftest import make_class_folder_layout

    base = tmp_path_factory.mktemp("track")
    make_class_folder_layout(base / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    script = base / "killing.py"
    script.write_text(KILLING)
    killed = subprocess.run([sys.executable, str(script), str(KILL_AT), *_finetune_args(base)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = main(_finetune_args(base))  # the same command again, in this process
    return base, json.loads((base / "run" / "results.json").read_text()), [killed.returncode, resumed]


def _events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _training_folder(run: Path) -> Path:
    (folder,) = (run / "tensorboard" / "cnn" / "full").iterdir()
    return folder


def test_a_killed_and_resumed_finetune_logs_every_epoch_once_equal_to_results(tracked) -> None:
    base, results, codes = tracked
    assert codes == [-signal.SIGKILL, 0]  # killed mid-epoch 2, then the same command finished it
    folder = _training_folder(base / "run")
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # the killed process had logged epoch 1
    history = results["models"]["cnn/full"]["training"]["history"]
    acc = _events(folder)
    top1 = acc.Scalars("val/top1")
    assert [e.step for e in top1] == [h["epoch"] for h in history] == [1, 2, 3]
    assert [e.value for e in top1] == pytest.approx([h["val_top1"] for h in history], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([h["train_loss"] for h in history], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([h["lr"] for h in history], rel=1e-6)


def test_tensorboard_shows_the_head_search_trials_and_the_final_figures(tracked) -> None:
    base, results, _ = tracked
    board = base / "run" / "tensorboard"
    studies = [d for d in board.iterdir() if d.is_dir() and any(d.glob("trial-*"))]
    assert studies, sorted(p.name for p in board.iterdir())
    trials = sorted(studies[0].glob("trial-*"))
    objective = _events(studies[0]).Scalars("search/objective")
    assert [e.step for e in objective] == [int(t.name.split("-")[1]) for t in trials]
    assert "_hparams_/session_start_info" in _events(trials[0]).PluginTagToContent("hparams")
    finals = _events(board / "results")
    (text,) = finals.Tensors("test/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    for label, row in results["models"].items():
        assert f"| {label} | {row['test']['top1']:.4f} [{row['test']['top1_ci95'][0]:.4f}," in table
    images = finals.Tags()["images"]
    assert {"confusion/cnn", "reliability/cnn", "confusion/cnn/full", "reliability/cnn/full"} <= set(images)


def _mlflow_runs(uri: str, run_dir: Path) -> dict[str, Any]:
    """The MLflow runs of ``run_dir`` by series ("" = the parent)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("dogbench")
    found = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`dogbench.run_dir` = '{run_dir.resolve()}'")
    runs = {r.data.tags["dogbench.series"]: r for r in found}
    assert len(runs) == len(found)  # one MLflow run per series, also after the resume
    return {"client": client, **runs}


def _check_mlflow(uri: str, run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Params, finals equal to results.json, tags and report.html, in the MLflow runs of ``run_dir``."""
    runs = _mlflow_runs(uri, run_dir)
    client, parent = runs["client"], runs[""]
    assert parent.data.params["tune.trials"] == "2" and parent.data.params["evaluate.n_bootstrap"] == "200"
    assert {"report.html", "results.json", "summary.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags["dogbench.version"] and len(parent.data.tags["dogbench.config_digest"]) == 16
    for label, row in results["models"].items():
        child = runs[label]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["model.backbone"] == row["backbone"]
        assert child.data.params["model.weights_sha256"] == str(row["weights_sha256"])
        assert child.data.tags["leaky"] == str(bool(row["leaky"])).lower()
        metrics = child.data.metrics
        assert metrics["test_top1"] == pytest.approx(row["test"]["top1"])
        assert [metrics["test_top1_ci95_lo"], metrics["test_top1_ci95_hi"]] == pytest.approx(row["test"]["top1_ci95"])
        assert metrics["val_top1"] == pytest.approx(row["val"]["top1"])
        assert metrics["test_ece_after"] == pytest.approx(row["calibration"]["test"]["after"]["ece"])
    return runs


def test_the_embedded_mlflow_store_holds_the_run_its_rows_and_each_epoch_once(tracked) -> None:
    base, results, _ = tracked
    runs = _check_mlflow(f"sqlite:///{base / 'mlflow.db'}", base / "run", results)
    history = results["models"]["cnn/full"]["training"]["history"]
    training = next(s for s in runs if isinstance(s, str) and s.startswith("cnn/full/"))
    for series in (training, "cnn/full"):  # as it trained (killed, resumed), and the chosen training at the end
        logged = runs["client"].get_metric_history(runs[series].info.run_id, "epoch_val_top1")
        assert sorted(m.step for m in logged) == [1, 2, 3]
        assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(
            [h["val_top1"] for h in history])


def test_an_unreachable_mlflow_server_is_one_warning_and_the_same_results(
    tracked, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from conftest import free_port

    base, results, _ = tracked
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["run", "--data", str(base / "data"), "--out", str(tmp_path / "run"), *CNN, "--cache-dir",
            str(base / "cache"), "--track", "mlflow", "--set", f"track.mlflow_uri={url}", *FAST,
            "--set", "report.enabled=false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    tracking = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking) == 1 and url in tracking[0], tracking
    assert f"not logged to MLflow ({url}): 2 trials, final figures" in capsys.readouterr().err
    again = json.loads((tmp_path / "run" / "results.json").read_text())["models"]["cnn"]
    for part in ("val", "test", "head", "calibration"):
        assert again[part] == results["models"]["cnn"][part], part


def test_a_real_mlflow_server_reads_back_a_tiny_run(tracked, tmp_path: Path) -> None:
    from conftest import service_url

    url = service_url("DOGBENCH_TEST_MLFLOW", "MLflow", "http://127.0.0.1:PORT")
    base, _, _ = tracked
    run = tmp_path / "run"
    args = ["run", "--data", str(base / "data"), "--out", str(run), *CNN, "--cache-dir", str(base / "cache"),
            "--track", "mlflow", "--set", f"track.mlflow_uri={url}", *FAST]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        assert main(args) == 0
    _check_mlflow(url, run, json.loads((run / "results.json").read_text()))


def test_an_unknown_tracker_names_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--track", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "wandb" in err and "tensorboard, mlflow" in err and "Traceback" not in err
