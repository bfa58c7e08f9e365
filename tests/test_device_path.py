"""--decode device (issue 13): the workers read file bytes and draw each image's crop, flip and jitter; the device
decodes and applies them. Same draws as the CPU path, pixels within a stated tolerance, odd files still load,
exact resume, every script trains with it; the frozen teacher in the autocast dtype; cheap --data fake."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data._utils.pin_memory import pin_memory

import cae
import cae_v2
import common
import milan
from conftest import SMOKE, run_forked
from test_operations import assert_same_state

# Tolerances, in the units of each view (ImageNet-normalised: 1/255 of the pixel range is about 0.017), per image:
# mean |device - cpu| and its 99.9th percentile. The CPU path's PIL rounds to uint8 between its resize passes and
# after each jitter op; the device path computes in float. Uniform noise (--data fake) has the most overshoot to clip.
TOL = {"view": (0.01, 0.05), "noise view": (0.01, 0.2), "jittered view": (0.04, 0.1), "token view": (0.005, 0.05)}


def picture(shift=0):
    """375 x 500 ramps and 60 px squares: a wrong crop box or flip is seen at once; not flip-symmetric."""
    y, x = np.mgrid[0:375, 0:500]
    return Image.fromarray(np.roll(np.stack([x * 255 // 500, y * 255 // 375, 255 * ((x // 60 + y // 60) % 2)], -1)
                                   .astype(np.uint8), 37 * shift, 1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 RGB JPEGs, a PNG, a CMYK JPEG and a greyscale JPEG (those three are decoded in the worker)."""
    root = tmp_path_factory.mktemp("jpegs")
    d = root / "train" / "a"
    d.mkdir(parents=True)
    for i in range(6):
        picture(i).save(d / f"{i}.jpg", quality=90)
    picture(7).save(d / "png.png")
    picture(8).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    picture(9).convert("L").save(d / "grey.jpg", quality=90)
    return root


def loaded(module, data, decode, *flags):
    args = module.get_args(["--data", str(data), "--model", "vit_nano_patch16", "--num_workers", "0", *flags])
    args.rank, args.world_size, args.device, args.decode = 0, 1, "cpu", decode
    ds = common.build_dataset(args, module.build_transform(args))
    args.batch_size = min(len(ds), 9)
    batch, _ = next(iter(common.build_loader(ds, args)))
    batch = common.to_device(batch, "cpu")
    return ds, batch if isinstance(batch, tuple) else (batch,)


CASES = {  # name -> (module, flags, the kind of each output)
    "milan": (milan, [], ["view"]),
    "fake": (milan, ["--fake_size", "9"], ["noise view"]),
    "cae_v2 (jitter first)": (cae_v2, [], ["jittered view", "mask"]),
    "cae (tokenizer view)": (cae, [], ["view", "token view", "mask"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_device_path_gives_the_cpu_paths_views_within_tolerance(case, folder):
    """For the same (seed, epoch, index): the same block masks and, image by image, views within TOL of the CPU
    path's (a different crop box or flip would be off by ~0.5, far above TOL)."""
    module, flags, kinds = CASES[case]
    data = "fake" if case == "fake" else folder
    (_, cpu), (_, dev) = loaded(module, data, "cpu", *flags), loaded(module, data, "device", *flags)
    assert len(cpu) == len(dev) == len(kinds)
    for kind, a, b in zip(kinds, cpu, dev):
        assert a.shape == b.shape and a.dtype == b.dtype, kind
        if kind == "mask":
            assert torch.equal(a, b)
            continue
        diff = (a - b).abs().flatten(1)
        mean, q999 = TOL[kind]
        assert diff.mean(1).max() < mean and diff.quantile(0.999, dim=1).max() < q999, (kind, diff.mean(1))
        assert (a - b.flip(-1)).abs().mean() > 0.2  # the tolerance is far below a flip's difference


def test_device_path_draws_exactly_the_cpu_paths_boxes_and_flips(folder):
    """RandomResizedCrop's boxes and the flips the CPU path's own ops draw (recorded) equal what the device path's
    workers send, for every image of two epochs, PNG, CMYK and greyscale files included."""
    args = milan.get_args(["--data", str(folder)])
    args.decode = "cpu"
    cpu = common.build_dataset(args, milan.build_transform(args))
    crop, flip = cpu.transform.transforms[:2]
    drawn = []
    crop.make_params = lambda flat, f=crop.make_params: drawn.append(f(flat)) or drawn[-1]
    flip.transform = lambda x, p, f=flip.transform: drawn.append("flipped") or f(x, p)
    args.decode = "device"
    dev = common.build_dataset(args, milan.build_transform(args))
    flips = 0
    for key in [(e, i) for e in (0, 1) for i in range(len(cpu))]:
        drawn.clear()
        common.Samples(cpu, seed=0)[key]
        enc, _ = common.Samples(dev, seed=0)[key]
        assert drawn[0] == enc.params[0] and ("flipped" in drawn) == enc.params[1], key
        flips += enc.params[1]
        assert pin_memory([enc])[0] is enc  # the DataLoader's pinning (CUDA) leaves it as it is, not byte by byte
        assert isinstance(enc.data, bytearray) == (cpu.samples[key[1]][0].endswith(("0.jpg", "1.jpg", "2.jpg", "3.jpg",
                                                                                  "4.jpg", "5.jpg")))
    assert 0 < flips < 2 * len(cpu)


def test_truncated_jpeg_is_skipped_and_counted_on_the_device_path(folder, tmp_path):
    """A JPEG cut short (no end marker) is decoded in the worker, as on the CPU path: it fails there, is counted, and
    the next image is used, as on the CPU path."""
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    picture().save(d / "0.jpg", quality=90)
    (d / "1.jpg").write_bytes((d / "0.jpg").read_bytes()[:3000])
    args = milan.get_args(["--data", str(tmp_path)])
    out = {}
    for decode in ("cpu", "device"):
        args.decode = decode
        s = common.Samples(common.build_dataset(args, milan.build_transform(args)), seed=0)
        x = s[(0, 1)][0]
        out[decode] = common.to_device([x], "cpu")[0] if decode == "device" else x, int(s.failed)
    assert out["cpu"][1] == out["device"][1] == 1
    assert (out["cpu"][0] - out["device"][0]).abs().mean() < TOL["view"][0]  # image 0 in its place, same draws


def test_fake_images_are_cheap_deterministic_and_distinct():
    args = milan.get_args(["--data", "fake", "--fake_size", "4"])
    args.decode = "cpu"
    train, val = (common.build_dataset(args, np.asarray, split) for split in ("train", "val"))
    a, b = train[1][0], train[1][0]
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, train[2][0]) and not np.array_equal(a, val[1][0])
    assert 70 < a.std() < 78 and train.num_classes == 10  # uniform noise on 0..255: std 73.9
    import time
    from torchvision.datasets import FakeData  # what --data fake used before: a float tensor made into a PIL image
    old = FakeData(20, (3, 224, 224), 10, transform=np.asarray)

    def cost(ds):  # the best of 3 rounds of 20 images
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            [ds[i % len(ds)] for i in range(20)]
            best = min(best, time.perf_counter() - t0)
        return best
    assert cost(train) < cost(old) / 2  # measured: 0.2 vs 1.6 ms per image


def test_teacher_in_bf16_matches_fp32_within_tolerance(tiny_teacher):
    """Teacher.prepare on CUDA with --amp bf16 casts its weights once; its tokens and CLS attention then stay within
    tolerance of the fp32 teacher: tokens cosine > 0.99 and relative error < 5%, CLS attention within 2e-3 (here the
    cast is done on the CPU, under CPU bf16 autocast)."""
    import argparse
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    low = copy.deepcopy(tiny_teacher).prepare(argparse.Namespace(amp="bf16", device="cuda:0", compile=False))
    assert low.net.conv1.weight.dtype == low.pos.dtype == torch.bfloat16 and low.a.dtype == torch.float32
    assert tiny_teacher.net.conv1.weight.dtype == torch.float32  # a copy: the original is untouched
    ref = tiny_teacher(x, cls_attn=True, hidden=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low(x, cls_attn=True, hidden=True)
    t, r = out["tokens"].float(), ref["tokens"]
    assert torch.nn.functional.cosine_similarity(t, r, dim=-1).min() > 0.99
    assert (t - r).norm() / r.norm() < 0.05
    assert (out["cls_attn"].float() - ref["cls_attn"]).abs().max() < 2e-3
    assert (out["hidden"][-1].float() - ref["hidden"][-1]).norm() / ref["hidden"][-1].norm() < 0.05
    cpu = copy.deepcopy(tiny_teacher).prepare(argparse.Namespace(amp="bf16", device="cpu", compile=False))
    assert cpu.net.conv1.weight.dtype == torch.float32  # on CPU nothing changes


# ---- As a user runs it: every script on a JPEG folder with --decode device ------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_runs")
    data = tmp / "data"
    for i in range(32):  # 30 small JPEGs, a PNG and a CMYK JPEG
        d = data / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = picture(i).resize((80, 60))
        img.save(d / f"{i}.png") if i == 30 else (img.convert("CMYK") if i == 31 else img).save(d / f"{i}.jpg")
    for i in range(8):  # finetune.py's val split: resize + centre crop on the device
        d = data / "val" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (picture(i).convert("L") if i == 7 else picture(i)).resize((90, 60)).save(d / f"{i}.jpg")
    flags = SMOKE + ["--data", data, "--decode", "device"]
    resume = flags + ["--epochs", "2", "--save_every_steps", "2", "--accum_iter", "2"]
    cases = {
        "whole": ["milan.py"] + resume + ["--output_dir", tmp / "whole"],
        "killed": (["tests/preempt.py", "milan.py"] + resume + ["--output_dir", tmp / "cut", "--num_workers", "1"],
                   {"PREEMPT_AT_STEP": "2"}),
        "resumed": ["milan.py"] + resume + ["--output_dir", tmp / "cut", "--num_workers", "1", "--resume", "auto"]}
    for s in ("cae.py", "cae_v2.py", "mr_mae.py", "mask_align.py"):
        cases[s] = [s] + flags + ["--output_dir", tmp / s]
    cases["finetune.py"] = ["finetune.py", "--data", data, "--decode", "device", "--finetune",
                            tmp / "whole" / "checkpoint-last.pth", "--mode", "linprobe", "--epochs", "1",
                            "--batch_size", "8", "--num_workers", "0", "--output_dir", tmp / "ft"]
    return tmp, run_forked(cases)


def test_killed_run_resumes_bit_identical_with_decode_device(runs):
    tmp, out = runs
    assert out["whole"][0] == 0, out["whole"][2][-3000:]
    assert out["killed"][0] == -9 and out["resumed"][0] == 0, out["resumed"][2][-3000:]
    a, b = (torch.load(tmp / d / "checkpoint-last.pth", weights_only=True) for d in ("whole", "cut"))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert_same_state(a["model"], b["model"])
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(s_a, s_b)


@pytest.mark.parametrize("script", ["cae.py", "cae_v2.py", "mr_mae.py", "mask_align.py", "finetune.py"])
def test_every_script_trains_with_decode_device(script, runs):
    """One epoch on 32 files (a PNG and a CMYK JPEG among them): none unreadable, a finite loss; finetune.py: its
    linear probe and the evaluation on the val split (a greyscale JPEG among them)."""
    tmp, out = runs
    code, _, err = out[script]
    assert code == 0, err[-3000:]
    log = json.loads((tmp / ("ft" if script == "finetune.py" else script) / "log.txt").read_text().splitlines()[-1])
    assert log["unreadable_images"] == 0 and np.isfinite(log["train_loss"])
    assert script != "finetune.py" or 0 <= log["acc1"] <= 100 and np.isfinite(log["val_loss"])
