"""milan.py as a user runs it: smoke run, resume at an epoch end, torchrun with 2 processes."""
import json
import os

import pytest
import torch

from conftest import SMOKE, run_script


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The README's smoke command, once for this module (256 fake images, batch 8: 32 steps)."""
    out = tmp_path_factory.mktemp("milan_smoke")
    proc = run_script("milan.py", SMOKE + ["--output_dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_smoke_run_writes_checkpoint_and_log(smoke_run):
    out, _ = smoke_run
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)  # loads without pickled objects
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "step", "rng", "progress", "args", "method"}
    assert ckpt["method"] == "milan" and isinstance(ckpt["args"], dict)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)  # epoch 0 done: continue at epoch 1, step 0
    assert any(k.startswith("encoder.blocks.") for k in ckpt["model"]) and "decoder_pred.weight" in ckpt["model"]
    assert not any("teacher" in k for k in ckpt["model"])  # the frozen teacher is not saved
    assert (out / "checkpoint-0.pth").exists()  # the last epoch is always kept
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1
    stats = json.loads(lines[0])
    assert stats["epoch"] == 0 and 0.0 < stats["train_loss"] < 4.0  # Eq. 1 lies in [0, 4]


def test_resume_continues_at_the_saved_epoch_with_the_saved_optimizer(smoke_run, tmp_path):
    out, _ = smoke_run
    before = torch.load(out / "checkpoint-last.pth", weights_only=True)
    steps_before = before["optimizer"]["state"][0]["step"].item()  # 256 / 8 / accum 2 = 16 updates
    assert steps_before == 16
    proc = run_script("milan.py", SMOKE + ["--epochs", "2", "--resume", out / "checkpoint-last.pth",
                                           "--output_dir", tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "epoch 1, step 0" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1]  # epoch 0 is not run again
    after = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (after["epoch"], after["step"]) == (2, 0)
    assert after["optimizer"]["state"][0]["step"].item() == 32  # Adam's moments carried over, not restarted


def test_torchrun_two_processes(tmp_path):
    proc = run_script("milan.py", SMOKE + ["--fake_size", "64", "--output_dir", tmp_path], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("teacher tiny: random weights") == 1  # rank 0 says so, not every rank
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2
    assert ckpt["optimizer"]["state"][0]["step"].item() == 2  # 64 images / 2 ranks / batch 8 / accum 2
    assert json.loads((tmp_path / "log.txt").read_text())["epoch"] == 0
