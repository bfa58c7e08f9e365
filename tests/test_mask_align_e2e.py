"""mask_align.py as a user runs it: smoke run, Table 3/4/6 switches, torchrun with 2 processes, bad input."""
import json
import math

import pytest
import torch

import common
import mask_align
from conftest import SMOKE, run_script


def wd_zero_shapes(ckpt):
    """Shapes of the optimizer states in the no-weight-decay group, and in the decay group."""
    opt = ckpt["optimizer"]
    shapes = lambda g: [tuple(opt["state"][i]["exp_avg"].shape) for i in g["params"] if i in opt["state"]]
    decay, skip = sorted(opt["param_groups"], key=lambda g: -g["weight_decay"])
    assert decay["weight_decay"] == 0.05 and skip["weight_decay"] == 0.0
    return shapes(skip), shapes(decay)


def test_smoke_run_writes_checkpoint_and_log(tmp_path):
    proc = run_script("mask_align.py", SMOKE + ["--fake_size", "64", "--output_dir", tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)  # no pickled objects
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "step", "rng", "progress", "args", "method"}
    assert ckpt["method"] == "mask_align" and (ckpt["epoch"], ckpt["step"]) == (1, 0) and (tmp_path / "checkpoint-0.pth").exists()
    a = ckpt["args"]
    assert (a["mask_ratio"], a["top_k"], a["align"], a["align_cls"], a["drop_path"]) == (0.7, 2, "dynamic", True, 0.1)
    sd = ckpt["model"]
    assert not any("teacher" in k or "net." in k for k in sd)  # the frozen teacher is not saved
    assert {"adaptors.0.weight", "adaptors.1.weight", "encoder.blocks.1.mlp.fc2.weight"} <= set(sd)
    w = sd["align_matrix"]  # nano student (2 blocks) x tiny teacher (K = min(5, 2) = 2 levels)
    init = torch.tensor([[1.01, 0.01], [0.01, 1.01]])
    assert w.shape == (2, 2) and not torch.equal(w, init) and torch.allclose(w, init, atol=1e-3)  # trained, tiny lr
    assert torch.equal(sd["encoder.norm.weight"], torch.ones(64))  # frozen final LN
    skip, decay = wd_zero_shapes(ckpt)
    assert (2, 2) in skip and (2, 2) not in decay and (64, 64) in decay  # matrix: no weight decay; adaptors: decay
    assert ckpt["optimizer"]["state"][0]["step"].item() == 8  # 64 fake images / batch 8
    lines = (tmp_path / "log.txt").read_text().splitlines()
    stats = json.loads(lines[0])
    assert len(lines) == 1 and stats["epoch"] == 0 and math.isfinite(stats["train_loss"]) and stats["train_loss"] > 0


def test_layerwise_random_masking_without_cls(tmp_path):
    flags = ["--align", "layerwise", "--mask_type", "random", "--no-align_cls", "--fake_size", "16"]
    mask_align.main(SMOKE + flags + ["--output_dir", str(tmp_path)])  # in-process: no interpreter start-up
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    a = ckpt["args"]
    assert (a["align"], a["mask_type"], a["align_cls"]) == ("layerwise", "random", False)
    assert "align_matrix" not in ckpt["model"] and "adaptors.1.weight" in ckpt["model"]
    assert ckpt["optimizer"]["state"][0]["step"].item() == 2


def test_torchrun_two_processes(tmp_path):
    proc = run_script("mask_align.py", SMOKE + ["--fake_size", "64", "--output_dir", tmp_path], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["method"] == "mask_align"
    assert ckpt["optimizer"]["state"][0]["step"].item() == 4  # 64 images / 2 ranks / batch 8: DDP ran 4 updates
    assert json.loads((tmp_path / "log.txt").read_text())["epoch"] == 0


def test_bad_top_k_gives_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(mask_align.main, SMOKE + ["--top_k", "0", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "--top_k" in lines[0], err


def test_mask_ratio_0_trains_on_the_smoke_flags(tmp_path, capsys):
    """Table 4's first row runs: the student sees all 196 patches; the four methods that need hidden patches
    still refuse ratio 0 with one line."""
    mask_align.main(SMOKE + ["--mask_ratio", "0", "--fake_size", "16", "--output_dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["args"]["mask_ratio"] == 0.0 and ckpt["optimizer"]["state"][0]["step"].item() == 2
    assert math.isfinite(json.loads((tmp_path / "log.txt").read_text())["train_loss"])
    import milan
    with pytest.raises(SystemExit) as e:
        common.cli(milan.main, SMOKE + ["--mask_ratio", "0", "--output_dir", str(tmp_path / "milan")])
    assert e.value.code == 2 and "--mask_ratio: 0 is outside (0, 1)" in capsys.readouterr().err  # milan's own range
