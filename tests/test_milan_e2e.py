"""milan.py as a user runs it: smoke run, resume, torchrun with 2 processes, bad input."""
import json
import os

import pytest
import torch

import common
import milan
from conftest import SMOKE, run_script


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """DESIGN.md's smoke command, once for this module (256 fake images, batch 8: 32 steps)."""
    out = tmp_path_factory.mktemp("milan_smoke")
    proc = run_script("milan.py", SMOKE + ["--output_dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_smoke_run_writes_checkpoint_and_log(smoke_run):
    out, _ = smoke_run
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)  # loads without pickled objects
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "step", "args", "method"}
    assert ckpt["method"] == "milan" and ckpt["epoch"] == 0 and isinstance(ckpt["args"], dict)
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
    assert "epoch 0 done" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1]  # epoch 0 is not run again
    after = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert after["epoch"] == 1
    assert after["optimizer"]["state"][0]["step"].item() == 32  # Adam's moments carried over, not restarted


def test_torchrun_two_processes(tmp_path):
    proc = run_script("milan.py", SMOKE + ["--fake_size", "64", "--output_dir", tmp_path], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2
    assert ckpt["optimizer"]["state"][0]["step"].item() == 2  # 64 images / 2 ranks / batch 8 / accum 2
    assert json.loads((tmp_path / "log.txt").read_text())["epoch"] == 0


def bad(tmp_path, capsys, *flags):
    """Run milan.main in-process through common.cli; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        common.cli(milan.main, SMOKE + ["--output_dir", str(tmp_path / "out")] + [str(f) for f in flags])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case,flag", [
    ("data_missing", "--data"), ("data_empty", "--data"), ("weights_missing", "--teacher_weights"),
    ("ratio_zero", "--mask_ratio"), ("ratio_one", "--mask_ratio"), ("ratio_big", "--mask_ratio"),
    ("resume_missing", "--resume"), ("resume_other_method", "--resume"), ("teacher_unknown", "--teacher"),
    ("size_not_divisible", "--input_size"), ("batch_too_big", "--batch_size")])
def test_bad_input_gives_one_clear_line(case, flag, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "cae.pth"
    common.save_checkpoint(str(other), model={}, optimizer={}, epoch=0, args={}, method="cae")
    flags = {"data_missing": ["--data", tmp_path / "nope"], "data_empty": ["--data", tmp_path / "empty"],
             "weights_missing": ["--teacher_weights", tmp_path / "ViT-B-16.pt"],
             "ratio_zero": ["--mask_ratio", 0], "ratio_one": ["--mask_ratio", 1.0], "ratio_big": ["--mask_ratio", 1.5],
             "resume_missing": ["--resume", tmp_path / "nope.pth"], "resume_other_method": ["--resume", other],
             "teacher_unknown": ["--teacher", "ViT-Q-99"], "size_not_divisible": ["--input_size", 200],
             "batch_too_big": ["--fake_size", 4]}[case]
    code, err = bad(tmp_path, capsys, *flags)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and flag in lines[0], err
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_bad_input_as_subprocess_has_no_traceback(tmp_path):
    proc = run_script("milan.py", SMOKE + ["--data", tmp_path / "missing", "--output_dir", tmp_path])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: --data")
