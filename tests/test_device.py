"""Device policy: names checked against this machine, with the valid choices in the message."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dogbench.cli import main
from dogbench.device import resolve_device
from dogbench.errors import DogbenchError


def test_a_cuda_index_this_machine_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DogbenchError, match=r"'cuda:7' requested but this machine has 1 CUDA device\(s\). Valid "
                                            r"here: auto, cpu, cuda, cuda:0"):
        resolve_device("cuda:7")


def test_cuda_without_cuda_and_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DogbenchError, match="CUDA is not available here. Valid here: auto, cpu"):
        resolve_device("cuda:7")
    with pytest.raises(DogbenchError, match="Unknown device 'gpu'"):
        resolve_device("gpu")


def test_predict_on_a_missing_device_exits_2_before_loading(tmp_path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from dogbench.config import resolve
    from dogbench.rundir import RunDir

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    RunDir(tmp_path / "run").write_config(resolve({}, backbone_specs=["cnn=test_resnet@random"]))  # no models
    photo = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(photo)
    assert main(["predict", str(tmp_path / "run"), str(photo), "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err
