"""Not silently wrong: unreadable files counted once, whatever the batch; a checkpoint rebuilds the network it trained
(CAE v2's ViT-T heads); 16-bit images decode to their 8-bit values; an epoch too short for --accum_iter is refused;
a resume names the flags that differ and refuses those that change what is trained; sizes that cannot work are
refused at the start."""
import argparse
import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import SMOKE, run_forked
from test_nothing_lost import error_line, tiny_pngs


def test_unreadable_files_are_counted_once_whatever_the_batch(tmp_path):
    """403 files, 3 unreadable in a row (a/100-102 in ImageFolder's order; 0.74%). A bad file's stand-in is the next
    index, itself bad here: each attempt was counted, so one bad file counted up to 3 times and batch 7 stopped the run
    ("6 of 399 (over 1%)") where batch 50 went through. Now: both train, unreadable_images 3, each file named once."""
    tiny_pngs(tmp_path / "data", 201, ("a",))
    tiny_pngs(tmp_path / "data", 202, ("b",), seed=1)
    for i in (100, 101, 102):
        (tmp_path / "data" / "a" / f"{i:03d}.png").write_bytes(b"not an image")
    runs = run_forked({b: ["milan.py"] + SMOKE + ["--data", tmp_path / "data", "--input_size", "32", "--batch_size", b,
                                                  "--log_every", "1", "--output_dir", tmp_path / f"out{b}"]
                       for b in ("7", "50")})
    for b, (code, _, err) in runs.items():
        assert code == 0, (b, err[-2000:])
        assert json.loads((tmp_path / f"out{b}" / "log.txt").read_text())["unreadable_images"] == 3, b
        assert [err.count(f"a/{i}.png") for i in (100, 101, 102)] == [1, 1, 1], (b, err[-2000:])


def test_16_bit_greyscale_images_decode_to_their_8_bit_values(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16) holding 257 x an 8-bit image (the usual 8 -> 16 bit expansion) must decode
    to that 8-bit image, in the pre-training view (also through CAE v2's jitter path), finetune.py's train and val
    transforms; PIL's convert("RGB") clipped it to 255 (a 0..65535 ramp came out at a mean of 254.5)."""
    import torch
    import common
    import finetune
    grey = np.random.default_rng(0).integers(0, 256, (64, 48), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    ft = [finetune.build_transform(argparse.Namespace(input_size=32, crop_min=0.5, mode=m, reprob=0), train=t)
          for m, t in (("linprobe", True), ("finetune", True), ("linprobe", False))]
    for transform in [common.View(32, 0.5), common.View(32, 0.5, first=lambda im: im), *ft]:
        views = []
        for name in ("8.png", "16.png"):
            torch.manual_seed(0)
            views.append(transform(Image.open(tmp_path / name)))
        assert torch.equal(*views), transform
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    rgb, _, _ = common.decode(Image.open(tmp_path / "ramp.png"), (0, 0, 256, 256), 256)
    assert abs(np.asarray(rgb).mean() - 65535 / 2 / 257) < 0.5  # 127.5, not 254.5


def test_a_cae_v2_vit_tiny_checkpoint_is_rebuilt_with_its_12_heads(tmp_path):
    """CAE v2 trains ViT-T with 12 heads (Sec. 3.1), where VIT_CONFIGS' ViT-T has 3. Shapes do not depend on the head
    count, so a checkpoint whose args did not carry it loaded into 3 heads in finetune.py (fine-tune, probes, --eval) and
    its export printed num_heads=3: another network. finetune.py's encoder, from the pre-training checkpoint and from a
    probe's own checkpoint, must compute what a 12-head ViT-T with the pre-trained weights computes."""
    import torch
    import common
    import finetune
    tiny = ["--model", "vit_tiny_patch16", "--input_size", "32", "--num_workers", "0"]
    pre, probe = tmp_path / "pre" / "checkpoint-last.pth", tmp_path / "probe" / "checkpoint-last.pth"
    runs = run_forked({
        "pre": ["cae_v2.py"] + SMOKE + tiny + ["--fake_size", "8", "--output_dir", tmp_path / "pre"],
        "export": ["finetune.py", "--finetune", pre, "--export_timm", tmp_path / "timm.pth"],
        "probe": ["finetune.py", "--data", "fake", "--fake_size", "16", "--batch_size", "8", "--epochs", "1", "--finetune",
                  pre, "--mode", "linprobe", "--input_size", "32", "--num_workers", "0", "--output_dir", tmp_path / "probe"]})
    assert all(code == 0 for code, _, _ in runs.values()), {k: v[2][-1500:] for k, v in runs.items()}
    assert "num_heads=12," in runs["export"][1], runs["export"][1]
    x = torch.randn(2, 3, 32, 32)
    reference = common.build_vit("vit_tiny_patch16", 32, init_values=0.1, num_heads=12).eval()
    reference.load_state_dict({k[len("encoder."):]: t for k, t in torch.load(pre, weights_only=True)["model"].items()
                               if k.startswith("encoder.")})
    for path in (pre, probe):
        src = finetune.read_pretrained(str(path))
        ns = argparse.Namespace(arch="vit", model="vit_tiny_patch16", input_size=32, drop_path=0.0, finetune=path, rank=1)
        encoder = finetune.new_encoder(ns, src)
        finetune.load_encoder(encoder, src, ns)
        with torch.no_grad():
            torch.testing.assert_close(encoder.eval()(x), reference(x), msg=str(path))


def test_an_epoch_shorter_than_accum_iter_is_refused_and_a_dropped_remainder_is_said(tmp_path):
    """4 steps an epoch (32 images, batch 8): --accum_iter 8 never updated the weights (3 epochs, exit 0, an empty
    optimizer state): refused before anything is written. --accum_iter 3: the 4th step of every epoch is dropped (as in
    MAE): said at the start."""
    from test_operations import FAST
    runs = run_forked({"8": ["milan.py"] + FAST + ["--accum_iter", "8", "--epochs", "3", "--output_dir", tmp_path / "a"],
                       "3": ["milan.py"] + FAST + ["--accum_iter", "3", "--output_dir", tmp_path / "b"]})
    line = error_line(runs["8"])
    assert "--accum_iter 8" in line and "4 steps" in line, line
    assert not (tmp_path / "a").exists()
    code, _, err = runs["3"]
    assert code == 0, err[-2000:]
    said = [x for x in err.splitlines() if "--accum_iter 3" in x]
    assert len(said) == 1 and "4 steps" in said[0] and "the last 1 " in said[0], err[-2000:]


def test_a_resume_names_every_changed_flag_and_refuses_those_that_change_training(tmp_path):
    """A finished 1-epoch MILAN run, resumed for a 2nd epoch: with --mask_type, --mask_ratio or --fake_size changed (its
    sampler, its ratio, its data; shapes do not change, so the weights loaded and it went on: neither the old run nor a
    new one) it is refused with one line naming the flag and its old value, and nothing is written; with
    --resume_changes it goes on, its start naming every changed flag; run mechanics (--epochs, --num_workers,
    --log_every) change freely."""
    from test_nothing_lost import snapshot
    from test_operations import FAST
    out = tmp_path / "run"
    first = run_forked({"first": ["milan.py"] + FAST + ["--output_dir", out]})["first"]
    assert first[0] == 0, first[2][-2000:]
    before = snapshot(out)
    on = ["milan.py"] + FAST + ["--output_dir", out, "--resume", "auto", "--epochs", "2"]
    runs = run_forked({"mask_type": on + ["--mask_type", "random"], "mask_ratio": on + ["--mask_ratio", "0.5"],
                       "fake_size": on + ["--fake_size", "40"]})
    for flag, old, new in (("mask_type", "attention", "random"), ("mask_ratio", "0.75", "0.5"), ("fake_size", "32", "40")):
        refused, _, also = error_line(runs[flag]).partition("also changed")
        assert f"--{flag} {old} (now {new})" in refused and "--resume_changes" in refused, refused
        assert "--epochs" not in refused and "--epochs 1 (now 2)" in also, also  # named, not refused
    assert snapshot(out) == before
    runs = run_forked({"meant": on + ["--mask_type", "random", "--resume_changes", "--num_workers", "1",
                                      "--log_every", "2"]})
    code, stdout, err = runs["meant"]
    assert code == 0, err[-2000:]
    said = [x for x in stdout.splitlines() if x.startswith("resumed from")]
    assert len(said) == 1 and all(f in said[0] for f in ("--mask_type attention (now random)", "--epochs 1 (now 2)",
                                                         "--num_workers 0 (now 1)", "--log_every 20 (now 2)")), stdout
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_settings_that_cannot_train_are_refused_at_the_start(tmp_path):
    """No loss at all (MR-MAE --loss_weights 0 0: it trained a loss of 0.0 and exited 0, where CAE v2 refuses its own
    no-loss flags), a NaN mask ratio, widths that do not split into their heads or into the 4 parts of the 2-D sin-cos
    positions (tracebacks at the first step or the build), and a 'Val' folder beside class folders (taken as a class:
    the guard only knew 'val'): one error line each, and no folder made."""
    tiny_pngs(tmp_path / "data", 4)
    tiny_pngs(tmp_path / "data" / "Val", 4)
    out = ["--output_dir", tmp_path / "out"]
    runs = run_forked({
        "no loss": ["mr_mae.py"] + SMOKE + out + ["--loss_weights", "0", "0"],
        "nan": ["milan.py"] + SMOKE + out + ["--mask_ratio", "nan"],
        "milan heads": ["milan.py"] + SMOKE + out + ["--decoder_heads", "3"],
        "mr_mae width": ["mr_mae.py"] + SMOKE + out + ["--decoder_dim", "10"],
        "cae_v2 width": ["cae_v2.py"] + SMOKE + out + ["--regressor_dim", "7"],
        "Val": ["milan.py"] + SMOKE + out + ["--data", tmp_path / "data"]})
    words = {"no loss": ["--loss_weights 0 0", "no loss"], "nan": ["--mask_ratio", "nan"],
             "milan heads": ["--decoder_dim 64", "--decoder_heads 3", "multiple of 12"],
             "mr_mae width": ["--decoder_dim 10", "multiple of 4"], "cae_v2 width": ["--regressor_dim 7", "multiple of 4"],
             "Val": ["'Val'", "class"]}
    for case, run in runs.items():
        line = error_line(run)
        assert all(w in line for w in words[case]), (case, line)
    assert not (tmp_path / "out").exists()
    import common
    for ratio in (float("nan"), float("inf")):
        with pytest.raises(common.UserError, match="--mask_ratio"):
            common.num_visible(196, ratio)


@pytest.fixture(scope="module")
def linprobe_run(tmp_path_factory):
    """finetune.py --mode linprobe on a random nano ViT (a timm-format file) for 1 epoch, then resumed for a 2nd,
    in this process, with evaluate() giving top-1 50% after epoch 0 and 20% after epoch 1: -> (folder, stdout of
    the resumed run)."""
    import torch
    import common
    import finetune
    tmp = tmp_path_factory.mktemp("linprobe")
    torch.save(common.build_vit("vit_nano_patch16").state_dict(), tmp / "random.pth")
    flags = ["--data", "fake", "--fake_size", "16", "--batch_size", "8", "--num_workers", "0", "--input_size", "32",
             "--finetune", str(tmp / "random.pth"), "--mode", "linprobe", "--output_dir", str(tmp / "lp")]
    real, scores = finetune.evaluate, iter([50.0, 20.0])
    stats = lambda *a: dict(real(*a), acc1=next(scores))  # noqa: E731
    finetune.evaluate = stats
    try:
        finetune.main(flags + ["--epochs", "1"])
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            finetune.main(flags + ["--epochs", "2", "--resume", "auto"])
    finally:
        finetune.evaluate = real
    return tmp / "lp", printed.getvalue()


def test_finetune_best_top1_remembers_the_epochs_before_a_resume(linprobe_run):
    folder, printed = linprobe_run
    assert [json.loads(x)["acc1"] for x in (folder / "log.txt").read_text().splitlines()] == [50.0, 20.0]
    line = [x for x in printed.splitlines() if x.startswith("epoch 1:")][0]
    assert line.endswith("(best top-1 50.00%)"), line  # it said 20.00%: epoch 0 was forgotten


def test_eval_with_another_mode_or_pool_than_the_checkpoints_is_refused(linprobe_run, capsys):
    """--eval --mode attnprobe on a linprobe checkpoint evaluated it as a linear probe, and --eval --pool avg on a CLS
    one read the CLS token; --eval alone takes its mode and pooling."""
    import common
    import finetune
    folder, _ = linprobe_run
    base = ["--data", "fake", "--num_workers", "0", "--input_size", "32", "--finetune", str(folder / "checkpoint-last.pth"),
            "--eval"]
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, base + ["--mode", "attnprobe"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --mode attnprobe") and "linprobe" in err, err
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, base + ["--pool", "avg"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --pool avg") and "--pool cls checkpoint" in err, err
    assert common.cli(finetune.main, base) is None and "eval " in capsys.readouterr().out
