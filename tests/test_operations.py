"""Operations: exact resume after SIGKILL, bad input (each as its own process), unreadable images,
pictures (--visualize)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, SMOKE, run_forked, run_script

FAST = SMOKE + ["--fake_size", "32"]  # 4 steps of batch 8 per epoch
FT_SMOKE = ["--data", "fake", "--epochs", "1", "--batch_size", "8", "--num_workers", "0"]


# ---- Exact resume ---------------------------------------------------------------------------------
def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("script", ["milan.py", "mask_align.py"])
def test_killed_run_resumes_to_identical_parameters(script, tmp_path):
    """Uninterrupted 2 epochs vs. the same run SIGKILLed right after its mid-epoch checkpoint at step 2 of
    epoch 0, then `--resume auto`: every parameter and optimizer moment ends bit-identical. The two runs
    also load images differently (0 vs. 1 DataLoader worker): augmentation is seeded per image."""
    flags = FAST + ["--epochs", "2", "--save_every_steps", "2", "--accum_iter", "2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    runs = run_forked({  # in this order, each its own process
        "whole": [script] + flags + ["--output_dir", whole],
        "killed": (["tests/preempt.py", script] + flags + ["--output_dir", cut, "--num_workers", "1"],
                   {"PREEMPT_AT_STEP": "2"}),
        "resumed": [script] + flags + ["--output_dir", cut, "--num_workers", "1", "--resume", "auto"]})
    code, out, err = runs["whole"]
    assert code == 0, err[-3000:]
    assert runs["killed"][0] == -9, runs["killed"][2][-3000:]  # SIGKILL
    mid = torch.load(cut / "checkpoint-last.pth.at-kill", weights_only=True)  # what the resumed run started from
    assert (mid["epoch"], mid["step"]) == (0, 2)
    code, out, err = runs["resumed"]
    assert code == 0, err[-3000:]
    assert "epoch 0, step 2" in out
    a, b = (torch.load(d / "checkpoint-last.pth", weights_only=True) for d in (whole, cut))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert not torch.equal(a["model"]["encoder.cls_token"], mid["model"]["encoder.cls_token"])  # it trained on
    assert_same_state(a["model"], b["model"])
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(s_a, s_b)
    assert [json.loads(x)["epoch"] for x in (cut / "log.txt").read_text().splitlines()] == [0, 1]
    # the resumed epoch's log line is the whole epoch's: its loss sum and steps before the kill come from the checkpoint
    assert (whole / "log.txt").read_text() == (cut / "log.txt").read_text()


def test_killed_torchrun_resumes_with_identical_ranks(tmp_path):
    """2 processes, SIGKILLed after the mid-epoch checkpoint, resumed: both ranks end with the same
    parameters, equal to the checkpoint rank 0 wrote."""
    flags = FAST + ["--epochs", "2", "--save_every_steps", "2", "--accum_iter", "1", "--batch_size", "4",
                    "--output_dir", tmp_path]
    proc = run_script("tests/preempt.py", ["milan.py"] + flags, nproc=2, env={"PREEMPT_AT_STEP": "2"})
    assert proc.returncode != 0
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["step"] == 2
    proc = run_script("tests/preempt.py", ["milan.py"] + flags + ["--resume", tmp_path / "checkpoint-last.pth"],
                      nproc=2, env={"PARAMS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    assert_same_state(r0, r1)
    assert_same_state(r0, torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model"])


def test_sampler_is_distributed_samplers_order_and_starts_mid_epoch():
    """SeededSampler: each rank's share is DistributedSampler's (drop_last) cut to whole batches, and start_step
    skips whole batches without touching the others; eval takes every image once, in order, no padding."""
    from torch.utils.data import DistributedSampler
    for rank in (0, 1):
        args = argparse.Namespace(seed=3, rank=rank, world_size=2, batch_size=4)
        ref = DistributedSampler(range(37), 2, rank, shuffle=True, seed=3, drop_last=True)
        ref.set_epoch(5)
        s = common.SeededSampler(37, args)
        s.set_epoch(5)
        assert [i for _, i in s] == list(ref)[:16] and s.steps == 18 // 4  # 2 images of the 18 left over
        s.set_epoch(5, start_step=2)
        assert [i for _, i in s] == list(ref)[8:16] and len(s) == 8 and {e for e, _ in s} == {5}
    ev = common.SeededSampler(5, argparse.Namespace(seed=0, rank=1, world_size=2, batch_size=2), train=False)
    assert [i for _, i in ev] == [1, 3] and ev.steps == 1
    ev0 = common.SeededSampler(5, argparse.Namespace(seed=0, rank=0, world_size=2, batch_size=2), train=False)
    assert [i for _, i in ev0] == [0, 2, 4] and ev0.steps == 2  # the shares differ by one: no image scored twice


def test_augmentation_depends_on_the_image_not_on_the_loader():
    """The same (epoch, index) gives the same crop and block mask in the main process and in a worker,
    and the main process's RNG is left as it was."""
    args = argparse.Namespace(data="fake", fake_size=8, input_size=224, batch_size=2, crop_min=0.2, world_size=1,
                              rank=0, seed=0, num_workers=0, device="cpu")
    ds = common.build_dataset(args, common.pretrain_transform(args, mask_fn=common.BlockMaskGenerator()))
    first = next(iter(common.build_loader(ds, args)))
    state = torch.get_rng_state()
    again = next(iter(common.build_loader(ds, args)))
    assert torch.equal(state, torch.get_rng_state())
    args.num_workers = 2
    worker = next(iter(common.build_loader(ds, args)))
    for x in (again, worker):
        assert torch.equal(first[0][0], x[0][0]) and torch.equal(first[0][1], x[0][1])
    other = common.Samples(ds, seed=0)[(1, 0)]  # epoch 1 of image 0: another crop
    assert not torch.equal(common.Samples(ds, seed=0)[(0, 0)][0][0], other[0][0])


# ---- Unreadable images ----------------------------------------------------------------------------
def image_folder(root, good, bad):
    rng = np.random.default_rng(0)
    for i in range(good + bad):
        d = root / "train" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        if i < good:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        else:
            (d / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


# ---- Bad input: one clear line, non-zero exit, no traceback, a good checkpoint untouched ----------
BAD = {  # case -> (script, flags after the smoke flags, the flag the message must name)
    "data_missing": ("milan.py", ["--data", "{tmp}/nope"], "--data"),
    "data_empty": ("milan.py", ["--data", "{tmp}/empty"], "--data"),
    "data_unreadable": ("milan.py", ["--data", "{tmp}/corrupt", "--batch_size", "4"], "--data"),
    "teacher_unknown": ("milan.py", ["--teacher", "ViT-Q-99"], "--teacher"),
    "weights_missing": ("milan.py", ["--teacher_weights", "{tmp}/ViT-B-16.pt"], "--teacher_weights"),
    "weights_other_arch": ("milan.py", ["--teacher_weights", "{tmp}/dino.pth"], "--teacher_weights"),
    "resume_missing": ("milan.py", ["--resume", "{tmp}/nope.pth"], "--resume"),
    "resume_other_method": ("milan.py", ["--resume", "{tmp}/cae.pth"], "--resume"),
    "resume_other_model": ("milan.py", ["--resume", "{tmp}/small.pth"], "--resume"),
    "ratio_zero": ("milan.py", ["--mask_ratio", "0"], "--mask_ratio"),
    "ratio_big": ("milan.py", ["--mask_ratio", "1.5"], "--mask_ratio"),
    "ratio_no_visible": ("milan.py", ["--mask_ratio", "0.999"], "--mask_ratio"),
    "size_not_divisible": ("milan.py", ["--input_size", "200"], "--input_size"),
    "batch_too_big": ("milan.py", ["--fake_size", "4"], "--batch_size"),
    "output_not_writable": ("milan.py", ["--output_dir", "{tmp}/a_file/out"], "--output_dir"),
    "visualize_other_model": ("milan.py", ["--visualize", "2", "--resume", "{tmp}/small.pth"], "--resume"),
    "loss_not_finite": ("milan.py", ["--lr", "1e30", "--fake_size", "32", "--accum_iter", "1"], "--lr"),
    "finetune_no_encoder": ("finetune.py", ["--finetune", "{tmp}/cae.pth"], "--finetune"),
    # the same checks guard every method file
    "cae_data_empty": ("cae.py", ["--data", "{tmp}/empty"], "--data"),
    "cae_v2_ratio_no_visible": ("cae_v2.py", ["--mask_ratio", "0.999"], "--mask_ratio"),
    "mr_mae_resume_other_method": ("mr_mae.py", ["--resume", "{tmp}/cae.pth"], "--resume"),
    "mask_align_weights_other_arch": ("mask_align.py", ["--teacher_weights", "{tmp}/dino.pth"], "--teacher_weights"),
    "finetune_output_not_writable": ("finetune.py", ["--finetune", "{tmp}/small.pth", "--output_dir", "{tmp}/a_file/x"],
                                     "--output_dir"),
}


TRAINS = {"data_unreadable", "loss_not_finite"}  # cases that train before they stop


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "a_file").write_text("not a folder")
    image_folder(tmp / "corrupt", good=30, bad=2)  # 2 of 32 (6%) cannot be read
    from timm.models.vision_transformer import VisionTransformer  # a ViT-B state dict is not a tiny CLIP tower
    torch.save(VisionTransformer(embed_dim=64, depth=1, num_heads=2).state_dict(), tmp / "dino.pth")
    common.save_checkpoint(str(tmp / "cae.pth"), model={}, optimizer={}, epoch=1, step=0, args={}, method="cae")
    small = common.build_vit("vit_tiny_patch16").state_dict()
    common.save_checkpoint(str(tmp / "small.pth"), model={f"encoder.{k}": v for k, v in small.items()}, optimizer={},
                           epoch=1, step=0, args={"model": "vit_tiny_patch16"}, method="milan")
    cases = {}
    for case, (script, flags, _) in BAD.items():
        out = tmp / case
        out.mkdir()
        if case not in TRAINS:  # (a run can only train into a folder that holds no other run)
            (out / "checkpoint-last.pth").write_bytes(b"a good checkpoint")
        flags = [f.replace("{tmp}", str(tmp)) for f in flags]
        smoke = FT_SMOKE if script == "finetune.py" else SMOKE  # finetune.py takes no teacher or model flags
        cases[case] = [script] + smoke + ["--output_dir", out] + flags  # later flags win
    return tmp, run_forked(cases)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_clear_line(case, bad_runs):
    tmp, runs = bad_runs
    code, _, err = runs[case]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert BAD[case][2] in lines[0] and lines[0] == err.strip().splitlines()[-1], err[-2000:]
    if case in TRAINS:  # stopped before anything was written
        assert not (tmp / case / "checkpoint-last.pth").exists()
    else:
        assert (tmp / case / "checkpoint-last.pth").read_bytes() == b"a good checkpoint"


def test_unreadable_images_below_one_percent_are_skipped_and_counted(tmp_path):
    image_folder(tmp_path / "data", good=120, bad=1)  # 1 of 121 < 1%
    proc = run_script("milan.py", SMOKE + ["--data", tmp_path / "data", "--output_dir", tmp_path / "out"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped unreadable image" in proc.stderr and "120.jpg" in proc.stderr
    stats = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert stats["unreadable_images"] == 1  # 120 images in 15 whole batches of 8: the bad one is always drawn


# ---- Pictures -------------------------------------------------------------------------------------
def test_visualize_draws_image_visible_patches_attention_and_loss(tmp_path):
    """common.visualize with a stand-in method whose mask, attention and loss are known."""
    args = argparse.Namespace(data="fake", fake_size=4, input_size=224, batch_size=8, crop_min=0.2, world_size=1,
                              rank=0, seed=0, num_workers=0, device="cpu", amp="none", resume="", visualize=2,
                              output_dir=str(tmp_path))
    ds = common.build_dataset(args, common.pretrain_transform(args))
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, :14] = True  # the first row of patches hidden
    loss = torch.zeros(2, 196)
    loss[:, 14:] = torch.arange(182.0)  # 0 on the first row: not in the loss

    def step(model, teacher, batch, args, per_patch=False):
        assert per_patch  # the picture asks for the per-patch loss
        return {"loss": torch.zeros(()), "mask": mask, "patch_loss": loss, "cls_attn": torch.arange(196.0).expand(2, -1)}
    common.visualize(args, ds, torch.nn.Linear(1, 1), None, step, "milan")
    sheet = np.asarray(Image.open(tmp_path / "visualize.png")).astype(int)
    top, scale, cap = common.VIS_TITLE, common.VIS_SCALE, common.VIS_CAPTION
    assert sheet.shape == (top + 2 * (cap + 228) + scale, 4 * 228, 3)
    for c in range(4):  # a title over each column: dark text on white
        assert sheet[:top, c * 228:c * 228 + 100].min() < 100
    assert sheet[top:top + cap, :120].min() < 100  # the row's caption: its class and file
    rows = sheet[top + cap:top + cap + 224]
    image, visible = rows[:, :224], rows[:, 228:452]
    assert np.abs(visible[16:] - image[16:]).max() == 0  # visible rows unchanged
    assert np.abs(visible[:16] - np.round(image[:16] * 0.25)).max() <= 1  # the hidden row dimmed to 25%
    attn, patch_loss = rows[:, 456:680], rows[:, 684:908]
    assert attn[0, 0].sum() < attn[100, 100].sum() < attn[223, 223].sum()  # brighter with higher attention
    assert (patch_loss[:16] == 127).all()  # grey: not in the loss
    assert patch_loss[20, 0].sum() < patch_loss[223, 223].sum()
    bar = sheet[top + 2 * (cap + 228) + 4, 2:162]  # the colour scale: black (low) .. white (high)
    assert bar[0].sum() < 10 and bar[-1].min() > 240 and np.all(np.diff(bar.sum(1)) >= 0)


def test_visualize_from_a_checkpoint(tmp_path):
    runs = run_forked({"train": ["milan.py"] + FAST + ["--output_dir", tmp_path],
                       "draw": ["milan.py"] + FAST + ["--output_dir", tmp_path, "--visualize", 3, "--resume",
                                                      tmp_path / "checkpoint-last.pth"]})
    assert runs["train"][0] == 0, runs["train"][2][-2000:]
    code, out, err = runs["draw"]
    assert code == 0 and "wrote" in out, err[-2000:]
    size = (4 * 228, common.VIS_TITLE + 3 * (common.VIS_CAPTION + 228) + common.VIS_SCALE)  # MILAN: 4 columns, 3 rows
    assert Image.open(tmp_path / "visualize.png").size == size


@pytest.mark.parametrize("script,columns", [("cae.py", 3), ("cae_v2.py", 3), ("mr_mae.py", 4), ("mask_align.py", 4)])
def test_visualize_on_every_method_file(script, columns, visualize_runs):
    """Columns: image, visible patches, the teacher's CLS attention where the method samples by it, loss (MR-MAE: and a
    line under the colour scale on which patches hold L_R and which L_M)."""
    tmp, runs = visualize_runs
    code, out, err = runs[script]
    assert code == 0 and "wrote" in out, err[-2000:]
    rows, note = 2 * (common.VIS_CAPTION + 228), 12 * (script == "mr_mae.py")
    assert Image.open(tmp / script / "visualize.png").size == (columns * 228, common.VIS_TITLE + rows + common.VIS_SCALE
                                                               + note)


@pytest.fixture(scope="module")
def visualize_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pictures")
    return tmp, run_forked({s: [s] + SMOKE + ["--output_dir", tmp / s, "--visualize", 2]
                            for s in ("cae.py", "cae_v2.py", "mr_mae.py", "mask_align.py")})
