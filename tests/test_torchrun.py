"""torchrun with 2 gloo ranks on the CPU. `extract`: the ranks share the chunks of one cache entry and the features
are the bits one process computes (at the same torch threads per process: a different thread count changes float
rounding, about 1e-7, in one process as well). DDP fine-tuning: killed mid-epoch and launched again, it ends
bitwise equal to an uninterrupted two-rank run. `finetune` end to end: the pipeline runs once, on rank 0."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dogbench.cli import main

TINY = ["--backbone", "cnn=test_resnet@random,input_size=32", "--backbone", "vit=test_vit@random,img_size=32"]


def _extract(data: Path, cache: Path, *, ranks: int) -> subprocess.CompletedProcess:
    args = ["extract", "--data", str(data), *TINY, "--cache-dir", str(cache), "--set", "features.chunk_size=8",
            "--set", "features.batch_size=4", "--quiet"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--standalone", "-m", "dogbench"] if ranks > 1 else [sys.executable, "-m", "dogbench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_extract_the_bits_of_one_process(tmp_path: Path) -> None:
    from conftest import make_class_folder_layout

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=12, n_test=6)
    one = _extract(data, tmp_path / "one", ranks=1)
    two = _extract(data, tmp_path / "two", ranks=2)
    entries = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_dir())
    assert len(entries) == 2 and entries == sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir())
    for key in entries:
        a = np.load(tmp_path / "one" / key / "features.npy")
        b = np.load(tmp_path / "two" / key / "features.npy")
        assert a.shape == (54, a.shape[1]) and np.array_equal(a, b), key
        assert not (tmp_path / "two" / key / "chunks").exists()  # joined by rank 0
    # 54 images in 7 chunks of 8: rank 0 computed chunks 0, 2, 4, 6 (30 images) and printed the summary
    assert two.stdout.count("computed 30 images") == 2 and "computed 54 images" in one.stdout


def test_single_process_commands_are_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["models", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert "`dogbench models` runs as one process; under torchrun: evaluate, extract, finetune, run, tune" in err


# ---------------------------------------------------------------------------------------------- DDP fine-tuning

DDP_SCRIPT = textwrap.dedent("""
    import os, pickle, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    from test_training import POLICY, TINY, params_for, train_files
    from dogbench import distributed
    from dogbench.training import build_trainable, load_for_training, train
    data_file, out, kill_rank, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    data = pickle.loads(data_file.read_bytes())
    ranks = distributed.init(torch.device("cpu"))
    params = params_for("full", "vit", epochs=1, drop_path=0.2, color_jitter=0.4)
    backbone = load_for_training(TINY["vit"], params)
    t = build_trainable(backbone, data.n_classes, params)
    killed = out.parent / f"{{out.name}}.killed"  # once: a restarted rank must not die again
    def on_step(step):
        if ranks.rank == kill_rank and step == kill_at and not killed.exists():
            killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    outcome = train(t, backbone, data, params, train_files(out), policy=POLICY, checkpoint_every=2, progress=False,
                    on_step=on_step)
    # one file per rank (the ranks' stdout lines interleave)
    line = " ".join(["resumed" if outcome.resumed else "fresh", str(outcome.epochs_run), str(outcome.ranks)])
    (out.parent / f"{{out.name}}.rank{{ranks.rank}}").write_text(line)
    torch.distributed.destroy_process_group()
""")


def _outcomes(out: Path) -> list[str]:
    return [(out.parent / f"{out.name}.rank{r}").read_text() for r in range(2)]


def _equal_training(a_dir: Path, b_dir: Path) -> None:
    import safetensors.torch
    import torch

    from dogbench.rundir import TRAIN_STATE_FILE as STATE_FILE

    a = torch.load(a_dir / STATE_FILE, weights_only=True)
    b = torch.load(b_dir / STATE_FILE, weights_only=True)
    assert a["done"] and b["done"] and a["step"] == b["step"] == 6 and a["ranks"] == b["ranks"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["best"] == b["best"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    best_a = safetensors.torch.load_file(a_dir / f"best-epoch{a['best']['epoch']}.safetensors")
    best_b = safetensors.torch.load_file(b_dir / f"best-epoch{b['best']['epoch']}.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory):
    """(launch(out, kill_rank, kill_at), the uninterrupted two-rank run's folder)."""
    import pickle

    from test_training import make_data

    root = tmp_path_factory.mktemp("ddp")
    data_file = root / "data.pkl"
    data_file.write_bytes(pickle.dumps(make_data(root / "images", per_class=16)))  # 24 training images
    script = root / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))

    def launch(out: Path, kill_rank: int = -1, kill_at: int = -1, max_restarts: int = 0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(max_restarts), str(script), str(data_file), str(out), str(kill_rank),
               str(kill_at)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    whole = launch(root / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert _outcomes(root / "whole") == ["fresh 1 2", "fresh 1 2"]
    return launch, root / "whole"


def test_ddp_killed_mid_epoch_then_relaunched_equals_the_uninterrupted_two_rank_run(ddp, tmp_path: Path) -> None:
    import torch

    from dogbench.rundir import TRAIN_STATE_FILE as STATE_FILE

    launch, whole = ddp
    # 24 images, global batch 4 (2 per rank): 6 steps in the epoch; rank 0 (the writer) killed at step 3, one
    # step after the mid-epoch checkpoint of step 2
    killed = launch(tmp_path / "run", kill_rank=0, kill_at=3)
    assert killed.returncode != 0
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert (state["epoch"], state["position"], state["step"], state["done"], state["ranks"]) == (0, 2, 2, False, 2)
    resumed = launch(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _outcomes(tmp_path / "run") == ["resumed 1 2", "resumed 1 2"]
    _equal_training(whole, tmp_path / "run")


def test_an_elastic_restart_across_two_nodes_resumes_and_equals_the_uninterrupted_run(ddp, tmp_path: Path) -> None:
    """Two torchrun agents (two "nodes" of one rank each, c10d rendezvous on 127.0.0.1) under --max-restarts 1;
    rank 1 dies at step 5, both nodes restart and the group resumes. (On gloo the other rank fails too when its
    peer dies, so both agents count the restart; under NCCL a healthy node may restart for the membership change
    without counting, which is why the group keys its starts by a counter in the store, not by
    TORCHELASTIC_RESTART_COUNT. That case is not reproduced here.)"""
    import socket

    _, whole = ddp
    script, data_file = whole.parent / "train_ddp.py", whole.parent / "data.pkl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dogbench-test",
         "--max-restarts", "1", str(script), str(data_file), str(out), "1", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for _ in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    assert (tmp_path / "run.killed").exists()
    assert _outcomes(out) == ["resumed 1 2", "resumed 1 2"]
    _equal_training(whole, out)


def test_an_elastic_restart_resumes_and_equals_the_uninterrupted_two_rank_run(ddp, tmp_path: Path) -> None:
    """torchrun --max-restarts 1: rank 1 dies at step 5 (after the step-4 checkpoint); the agent restarts both ranks,
    which rejoin a fresh group (each attempt's keys under its own prefix) and resume from the checkpoint."""
    launch, whole = ddp
    restarted = launch(tmp_path / "run", kill_rank=1, kill_at=5, max_restarts=1)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert _outcomes(tmp_path / "run") == ["resumed 1 2", "resumed 1 2"]
    _equal_training(whole, tmp_path / "run")



def test_torchrun_finetune_runs_the_pipeline_once_and_trains_on_both_ranks(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m dogbench finetune`: extraction shared, heads and evaluation on rank 0 (one
    summary, one results.json), training in DDP with the global batch stated, and `predict` serves the model."""
    import json

    from conftest import make_class_folder_layout
    from test_finetune import FAST

    data = make_class_folder_layout(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=8, n_test=4)
    args = ["finetune", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--cache-dir",
            str(tmp_path / "cache"), "--methods", "full", *FAST]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dogbench", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results: ") == 1  # rank 0 alone ran the single-process stages and printed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["models"]) == ["cnn", "vit", "cnn/full", "vit/full"]
    for label in ("cnn/full", "vit/full"):
        t = results["models"][label]["training"]
        assert (t["ranks"], t["global_batch"], t["rank_batch"]) == (2, 4, 2), label
        assert t["train_images"] > 0 and results["models"][label]["test"]["top1"] >= 0
    photo = next(p for p in (data / "test").rglob("*") if p.is_file())
    assert main(["predict", str(tmp_path / "run"), str(photo), "--format", "json"]) == 0
