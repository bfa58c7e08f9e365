"""A new user's first real run: the seams between data, training, resume, finetune.py and the teacher."""
import argparse
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import finetune
from conftest import ROOT, SMOKE, python, run_forked

FAST = SMOKE + ["--fake_size", "32"]  # 4 steps of batch 8 per epoch


def class_folders(root, counts, size=32, seed=0):
    """root/<class>/<i>.png for each class -> count of counts, random pixels."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def ns(**kw):
    base = dict(data="fake", fake_size=60, input_size=224, batch_size=8, crop_min=0.2, world_size=1, rank=0, seed=0,
                num_workers=0, device="cpu")
    return argparse.Namespace(**dict(base, **kw))


# ---- 1. val labels take train's class indices -----------------------------------------------------
def test_val_split_takes_train_class_indices(tmp_path):
    class_folders(tmp_path / "train", {"ant": 1, "bee": 1, "cat": 1})
    class_folders(tmp_path / "val", {"bee": 2, "cat": 1})  # on its own, ImageFolder would label bee 0 and cat 1
    args = ns(data=str(tmp_path))
    train = common.build_dataset(args, None)
    val = finetune.with_classes(common.build_dataset(args, None, split="val"), train.classes, args)
    assert [(os.path.basename(os.path.dirname(p)), t) for p, t in val.samples] == [("bee", 1), ("bee", 1), ("cat", 2)]
    assert val.targets == [1, 1, 2] and val[2][1] == 2 and val.classes == ["ant", "bee", "cat"]
    class_folders(tmp_path / "val", {"dog": 1})
    with pytest.raises(common.UserError, match="dog"):
        finetune.with_classes(common.build_dataset(args, None, split="val"), train.classes, args)


# ---- 2. training runs whole batches only -----------------------------------------------------------
def test_training_loader_yields_the_announced_whole_batches():
    args = ns()  # 60 images, batch 8: 7 whole batches, 4 images left over
    ds = common.build_dataset(args, common.pretrain_transform(args))
    loader = common.build_loader(ds, args)
    sizes = [len(images) for images, _ in loader]
    assert sizes == [8] * 7 and loader.sampler.steps == 7 and len(loader) == 7
    loader.sampler.set_epoch(0, start_step=5)
    assert [len(images) for images, _ in loader] == [8, 8]


# ---- 3., 7., 8.: finetune.py: probes on odd batch counts, only its own flags, export without data ----
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seams_ft")
    class_folders(tmp / "data" / "train", {"a": 5, "b": 4})  # 9 images: one batch of 8 and one image left over
    class_folders(tmp / "data" / "val", {"a": 5, "b": 4}, seed=1)  # evaluated in batches of 8 and 1
    runs = run_forked({"pre": ["milan.py"] + FAST + ["--output_dir", tmp / "pre"]})
    assert runs["pre"][0] == 0, runs["pre"][2][-2000:]
    return tmp


def test_finetune_seams(pretrained, tmp_path):
    ckpt, data = pretrained / "pre" / "checkpoint-last.pth", pretrained / "data"
    ft = ["finetune.py", "--finetune", ckpt, "--data", data, "--epochs", "1", "--batch_size", "8", "--num_workers", "0"]
    runs = run_forked({
        "linprobe": ft + ["--mode", "linprobe", "--output_dir", tmp_path / "lp"],
        "attnprobe": ft + ["--mode", "attnprobe", "--output_dir", tmp_path / "ap"],
        "probe_batch_1": ft + ["--mode", "linprobe", "--batch_size", "1", "--output_dir", tmp_path / "b1"],
        "eval": ["finetune.py", "--finetune", tmp_path / "lp" / "checkpoint-last.pth", "--data", data, "--eval",
                 "--batch_size", "8", "--num_workers", "0"],
        "teacher_flag": ft + ["--teacher", "tiny", "--output_dir", tmp_path / "t"],
        "model_mismatch": ft + ["--model", "vit_small_patch16", "--output_dir", tmp_path / "m"],
        "help": ["finetune.py", "--help"],
        "export_no_data": ["finetune.py", "--finetune", ckpt, "--export_timm", tmp_path / "timm.pth"]})
    for name, folder in (("linprobe", "lp"), ("attnprobe", "ap")):  # a training batch of 1 image would crash BatchNorm
        code, out, err = runs[name]
        assert code == 0 and "Traceback" not in err, err[-3000:]
        assert "1 steps of 8" in out  # the leftover image is dropped
        assert json.loads((tmp_path / folder / "log.txt").read_text())["epoch"] == 0
    code, _, err = runs["probe_batch_1"]
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --batch_size 1"), err[-2000:]
    code, out, err = runs["eval"]  # 9 val images in batches of 8 and 1: eval-mode BatchNorm
    assert code == 0 and "on 9 images" in out and "effective batch" not in out, err[-2000:]
    code, _, err = runs["teacher_flag"]  # a pre-training flag: only --probe_patches semantic has a teacher
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --teacher") and "semantic" in err, err[-2000:]
    code, _, err = runs["model_mismatch"]
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --model vit_small_patch16"), err[-2000:]
    assert "vit_nano_patch16" in err
    code, out, _ = runs["help"]
    assert code == 0
    for flag in ("--mask_ratio", "--visualize", "pre-training epochs"):
        assert flag not in out, flag
    assert re.search(r"--teacher TEACHER\s+--probe_patches semantic's", out)  # a teacher for that alone
    code, out, err = runs["export_no_data"]
    assert code == 0 and "wrote" in out, err[-2000:]
    assert "cls_token" in torch.load(tmp_path / "timm.pth", weights_only=True)


# ---- 4., 5., 14.: relaunch, --resume auto for pictures, compact start, no stray output dir --------
def test_relaunch_refused_resume_auto_for_pictures_and_a_compact_start(tmp_path):
    out, pic = tmp_path / "out", tmp_path / "pic"
    runs = run_forked({
        "first": ["milan.py"] + FAST + ["--output_dir", out],
        "again": ["milan.py"] + FAST + ["--output_dir", out],
        "draw_auto": ["milan.py"] + FAST + ["--output_dir", out, "--visualize", 2, "--resume", "auto"],
        "draw_path": ["milan.py"] + FAST + ["--output_dir", pic, "--visualize", 2, "--resume", out / "checkpoint-last.pth"],
        "bad_data": ["milan.py"] + FAST + ["--data", tmp_path / "nope", "--output_dir", tmp_path / "never"]})
    code, stdout, err = runs["first"]
    assert code == 0, err[-2000:]
    lines = stdout.splitlines()
    assert not any(x.lstrip().startswith(("{", '"')) for x in lines) and len(lines) <= 3, stdout  # no JSON dump
    assert "effective batch 16" in stdout and "4 steps of 8" in stdout
    saved, log = (out / "checkpoint-last.pth").read_bytes(), (out / "log.txt").read_text()
    code, _, err = runs["again"]
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: --output_dir") and "--resume auto" in last, err[-2000:]
    assert (out / "checkpoint-last.pth").read_bytes() == saved and (out / "log.txt").read_text() == log
    for name in ("draw_auto", "draw_path"):
        code, stdout, err = runs[name]
        assert code == 0 and "effective batch" not in stdout, err[-2000:]
    # --resume auto drew the trained model: the same picture as naming the checkpoint
    assert (out / "visualize.png").read_bytes() == (pic / "visualize.png").read_bytes()
    assert runs["bad_data"][0] == 2 and not (tmp_path / "never").exists()


# ---- 6.: mid-epoch checkpoints by wall clock ----------------------------------------------------------
def test_mid_epoch_checkpoint_is_due_by_minutes(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: clock[0])
    args = ns(save_every_minutes=30, save_every_steps=0, log_every=20, accum_iter=2, output_dir="x", amp="none")
    ckpt = common.Checkpointer(args, "milan", None, None)
    assert ckpt.due(40) == (False, False)  # (save, stop): 0 minutes since the start
    clock[0] += 31 * 60
    assert ckpt.due(38) == (False, False)  # update 19: not a --log_every boundary, the clock is not read
    assert ckpt.due(40) == (True, False)  # update 20
    assert common.get_parser("x").parse_args([]).save_every_minutes == 30  # on by default for real runs


def test_time_based_checkpoint_is_written_mid_epoch(tmp_path):
    flags = FAST + ["--save_every_minutes", "1e-9", "--log_every", "1", "--accum_iter", "1", "--output_dir", tmp_path]
    runs = run_forked({"killed": (["tests/preempt.py", "milan.py"] + flags, {"PREEMPT_AT_STEP": "2"})})
    assert runs["killed"][0] == -9, runs["killed"][2][-2000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2)


# ---- 9., 10.: the teacher's weights line, and no minute of hub retries offline ------------------------
def test_teacher_file_gets_our_line_not_open_clips_random_warning(tmp_path, capfd):
    import open_clip
    visual = open_clip.create_model("ViT-S-32").visual
    torch.save(visual.state_dict(), tmp_path / "s32.pth")
    capfd.readouterr()
    teacher = common.Teacher("ViT-S-32", str(tmp_path / "s32.pth"), grid=7)
    out, err = capfd.readouterr()
    assert "initialized randomly" not in out + err and "No pretrained" not in out + err
    assert f"teacher ViT-S-32: weights loaded from {tmp_path / 's32.pth'}" in out
    assert torch.equal(teacher.net.conv1.weight, visual.conv1.weight)


def test_openai_weights_fail_fast_when_the_hub_is_unreachable(monkeypatch, capfd):
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # loopback, nothing listens: refused at once
    t0 = time.time()
    with pytest.raises(common.UserError, match="--teacher_weights /path/to/ViT-B-16.pt"):
        common.Teacher("ViT-B-16", "openai")
    assert time.time() - t0 < 20 and hub.HF_HUB_OFFLINE is True
    out, err = capfd.readouterr()
    assert "Retrying" not in err and "ERROR" not in err, err[-2000:]


# ---- 11.: Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_with_where_and_how_to_resume(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(python("milan.py", *FAST, "--epochs", "100", "--output_dir", tmp_path),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "log.txt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # after epoch 0: a checkpoint exists
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at epoch ") and "--resume auto" in last and "checkpoint-last.pth" in last, last


# ---- 12.: a warmup longer than the run is announced ----------------------------------------------------
def test_warmup_longer_than_the_run_is_warned(capsys):
    args = ns(model="vit_nano_patch16", accum_iter=1, blr=1e-3, lr=1e-3, min_lr=0.0, epochs=2, warmup_epochs=40,
              output_dir="x")
    common.announce(args, "milan", range(64), 8)
    err = capsys.readouterr().err
    assert "warning: --warmup_epochs 40" in err and "5%" in err  # lr_at(2) = 2/40 of the peak
    args.warmup_epochs = 0.2
    common.announce(args, "milan", range(64), 8)
    assert capsys.readouterr().err == ""


# ---- 15.: pictures take the classes in turn --------------------------------------------------------------
def test_pictures_take_the_classes_in_turn():
    ds = argparse.Namespace(targets=[0, 0, 0, 1, 1, 2])
    assert common.spread_over_classes(ds, 4) == [0, 3, 5, 1]
    assert common.spread_over_classes(ds, 10) == [0, 3, 5, 1, 4, 2]


# ---- 16.: the repository stands alone --------------------------------------------------------------------
def test_code_cites_papers_not_our_notes():
    notes = ("DESIGN" + ".md", "METHODS" + ".md")  # the team's notes, not part of the repository
    for folder in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert not any(note in text for note in notes), name
