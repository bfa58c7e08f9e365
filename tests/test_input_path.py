"""The input path: PIL decode and the crop/flip/jitter in the DataLoader workers, uint8 views (and masks) out, the
conversion and normalisation on the device (common.to_device). Same draws and pixels as the float pipeline it
replaced, large JPEGs decoded at reduced scale within a stated error, odd files, exact resume from a JPEG folder,
every script on it; no torchvision image decoder anywhere; the frozen teacher in the autocast dtype; cheap --data fake."""
import copy
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

import cae
import cae_v2
import common
import finetune
import milan
from conftest import ROOT, SMOKE, run_forked
from test_operations import assert_same_state

NORM = (common.IMAGENET_MEAN, common.IMAGENET_STD)
FLOAT = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*NORM)]  # the old workers' float tail
BICUBIC = InterpolationMode.BICUBIC


def picture(shift=0, size=(500, 375)):
    """Ramps and 60 px squares: a wrong crop box or flip is seen at once; not flip-symmetric."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.roll(np.stack([x * 255 // w, y * 255 // h, 255 * ((x // 60 + y // 60) % 2)], -1)
                                   .astype(np.uint8), 37 * shift, 1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 RGB JPEGs of 500 x 375 (too small for a reduced-scale decode at 224), a PNG with alpha, a CMYK, a greyscale
    and a progressive JPEG; val: 3 JPEGs, one greyscale."""
    root = tmp_path_factory.mktemp("jpegs")
    d, val = root / "train" / "a", root / "val" / "a"
    d.mkdir(parents=True), val.mkdir(parents=True)
    for i in range(6):
        picture(i).save(d / f"{i}.jpg", quality=90)
    picture(7).convert("RGBA").save(d / "alpha.png")
    picture(8).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    picture(9).convert("L").save(d / "grey.jpg", quality=90)
    picture(10).save(d / "progressive.jpg", quality=90, progressive=True)
    for i in range(3):
        (picture(i).convert("L") if i == 2 else picture(i)).save(val / f"{i}.jpg", quality=90)
    return root


def rgb(img):
    return img.convert("RGB")  # torchvision's default ImageFolder loader: PIL, fully decoded, RGB


class OldTwoViews:
    """CAE's float pipeline as it was: flip, one crop resized to 224 (bicubic) and 112 (LANCZOS), normalised and
    mapped 0.8 x + 0.1 in the worker."""
    def __init__(self, mask_fn):
        self.mask_fn = mask_fn

    def __call__(self, img):
        img = rgb(img)
        img = TF.horizontal_flip(img) if torch.rand(1) < 0.5 else img
        i, j, h, w = RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        unit = lambda size, mode: TF.to_dtype(TF.to_image(TF.resized_crop(img, i, j, h, w, [size, size], mode)),
                                              torch.float32, scale=True)
        return TF.normalize(unit(224, BICUBIC), *NORM), 0.8 * unit(112, InterpolationMode.LANCZOS) + 0.1, self.mask_fn()


def old_views(case, args):
    """The float transform each case used before the uint8 path (ImageNet-normalised in the worker)."""
    crop = [v2.RandomResizedCrop(args.input_size, scale=(args.crop_min, 1.0), interpolation=BICUBIC),
            v2.RandomHorizontalFlip()]
    if case == "cae (two views)":
        return OldTwoViews(cae.block_masking(args))
    if case == "finetune val":
        return v2.Compose([v2.Lambda(rgb), v2.Resize(256, interpolation=BICUBIC), v2.CenterCrop(224)] + FLOAT)
    jitter = [v2.ColorJitter(0.4, 0.4, 0.4)] if case == "cae_v2 (jitter first)" else []
    t = v2.Compose([v2.Lambda(rgb)] + jitter + crop + FLOAT)
    if case == "cae_v2 (jitter first)":
        mask_fn = cae_v2.block_masking(args)
        return lambda img: (t(img), mask_fn())
    return t


CASES = {  # name -> (module, flags, split)
    "milan": (milan, [], "train"), "fake": (milan, ["--fake_size", "6"], "train"),
    "cae_v2 (jitter first)": (cae_v2, [], "train"), "cae (two views)": (cae, [], "train"),
    "finetune linprobe": (finetune, ["--finetune", "x", "--mode", "linprobe"], "train"),
    "finetune val": (finetune, ["--finetune", "x"], "val")}


@pytest.mark.parametrize("case", list(CASES))
def test_uint8_views_normalised_on_the_device_equal_the_old_float_views(case, folder):
    """For the same (seed, epoch, index) keys, through the real loader: the workers' views are uint8 (a quarter of
    float32's bytes in shared and pinned memory), and to_device gives the old pipeline's float views to float rounding
    (a different box or flip would be off by ~0.5), the same block masks; CAE's tokenizer view mapped by map_pixels
    equals the old 0.8 x + 0.1 view."""
    module, flags, split = CASES[case]
    data = "fake" if case == "fake" else str(folder)
    args = module.get_args(["--data", data, "--model", "vit_nano_patch16", "--num_workers", "1", *flags])
    args.rank, args.world_size, args.device, args.mode = 0, 1, "cpu", getattr(args, "mode", None)
    transform = module.build_transform(args, train=split == "train") if module is finetune else module.build_transform(args)
    ds = common.build_dataset(args, transform, split)
    args.batch_size = len(ds) // 2
    loader = common.build_loader(ds, args, train=split == "train")
    raw, _ = next(iter(loader))
    raw = raw if isinstance(raw, list) else [raw]
    assert raw[0].dtype == torch.uint8 and raw[0].shape[1:] == (3, 224, 224)
    new = common.to_device(raw if len(raw) > 1 else raw[0], "cpu")
    new = list(new) if isinstance(new, tuple) else [new]
    old_ds = common.build_dataset(args, old_views(case, args), split)
    keys = list(loader.sampler)[:args.batch_size]  # the same (epoch, index) keys, the same per-image seeds
    old = [torch.stack(x) for x in zip(*[(o if isinstance(o, tuple) else (o,)) for o in
                                         (common.Samples(old_ds, 0)[k][0] for k in keys)])]
    if case == "cae (two views)":
        assert raw[1].dtype == torch.uint8
        new[1] = cae.map_pixels(new[1])
    assert len(new) == len(old)
    for a, b in zip(new, old):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)  # the masks
            continue
        assert a.dtype == torch.float32 and (a - b).abs().max() < 1e-5, case
        assert (a - b.flip(-1)).abs().mean() > 0.1  # the tolerance is far below a flip's difference


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_the_crop_keeps_its_size(tmp_path):
    """decode(): the largest s in 1, 2, 4, 8 with the crop >= 224 px a side after decoding at 1/s (s <= min(h, w) /
    224), the image decoded at ceil(W / s) x ceil(H / s) (libjpeg's DCT scaling), the box scaled by 1/s; PNG at full
    scale. The view from it is within 2.5 levels (of 255) of the full decode's, mean over the view."""
    path = tmp_path / "big.jpg"
    picture(0, (1601, 1203)).save(path, quality=90)
    picture(0, (1601, 1203)).save(tmp_path / "big.png")
    for (h, w), s in {(1000, 1200): 4, (448, 1500): 2, (447, 1500): 1, (1203, 1601): 4, (900, 900): 4}.items():
        img, box, scale = common.decode(Image.open(path), (0, 0, h, w), 224)
        assert scale == s and img.size == (-(-1601 // s), -(-1203 // s)) and box == (0, 0, w / s, h / s)
        assert min(box[2] - box[0], box[3] - box[1]) >= 224
    img, box, scale = common.decode(Image.open(tmp_path / "big.png"), (0, 0, 1000, 1200), 224)
    assert scale == 1 and img.size == (1601, 1203)
    assert common.decode(Image.open(path), (0, 0, 2000, 2000), 100)[2] == 8  # 8 at most
    box = (100, 50, 1000, 1300)  # top, left, h, w
    full = np.asarray(Image.open(path).convert("RGB").crop((50, 100, 1350, 1100)).resize((224, 224), Image.BICUBIC))
    reduced = np.asarray(common.resize(*common.decode(Image.open(path), box, 224), 224))
    err = np.abs(full.astype(float) - reduced)
    assert 0 < err.mean() < 2.5, err.mean()


def test_no_torchvision_image_decoder_and_no_deprecation_warning(folder, tmp_path):
    """No torchvision image decoder in the project (deprecated since torchvision 0.29; its CUDA decoder can write into
    memory still in use on GPUs with a hardware JPEG engine), and a training run on JPEGs warns of nothing deprecated."""
    words = ("torchvision" + ".io", "decode" + "_jpeg")
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "benchmarks", "*")) + \
        glob.glob(os.path.join(ROOT, "tests", "*.py"))
    assert [f for f in files if os.path.isfile(f) and any(w in open(f, errors="ignore").read() for w in words)] == []
    proc = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "milan.py", *SMOKE, "--data", str(folder),
                           "--accum_iter", "1", "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)  # (10 images: 1 step of 8 an epoch)
    assert proc.returncode == 0 and "DeprecationWarning" not in proc.stderr, proc.stderr[-2000:]


def test_fake_images_are_cheap_deterministic_and_distinct():
    args = milan.get_args(["--data", "fake", "--fake_size", "4"])
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


# ---- As a user runs it: every script on a JPEG folder -------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jpeg_runs")
    data = tmp / "data"
    for i in range(32):  # 29 small JPEGs, a large one (decoded at reduced scale), a PNG and a CMYK JPEG
        d = data / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = picture(i, (1200, 1000)) if i == 29 else picture(i).resize((80, 60))
        img.save(d / f"{i}.png") if i == 30 else (img.convert("CMYK") if i == 31 else img).save(d / f"{i}.jpg")
    for i in range(8):  # finetune.py's val split: resize + centre crop
        d = data / "val" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (picture(i).convert("L") if i == 7 else picture(i)).resize((90, 60)).save(d / f"{i}.jpg")
    flags = SMOKE + ["--data", data, "--input_size", "112"]
    resume = flags + ["--epochs", "2", "--save_every_steps", "2", "--accum_iter", "2"]
    cases = {
        "whole": ["milan.py"] + resume + ["--output_dir", tmp / "whole"],
        "killed": (["tests/preempt.py", "milan.py"] + resume + ["--output_dir", tmp / "cut", "--num_workers", "1"],
                   {"PREEMPT_AT_STEP": "2"}),
        "resumed": ["milan.py"] + resume + ["--output_dir", tmp / "cut", "--num_workers", "1", "--resume", "auto"]}
    for s in ("cae.py", "cae_v2.py", "mr_mae.py", "mask_align.py"):
        cases[s] = [s] + flags + ["--output_dir", tmp / s]
    cases["finetune.py"] = ["finetune.py", "--data", data, "--input_size", "112", "--finetune",
                            tmp / "whole" / "checkpoint-last.pth", "--mode", "linprobe", "--epochs", "1",
                            "--batch_size", "8", "--num_workers", "0", "--output_dir", tmp / "ft"]
    return tmp, run_forked(cases)


def test_killed_run_resumes_bit_identical_on_a_jpeg_folder(runs):
    """SIGKILL after the mid-epoch checkpoint, resumed with a worker where the whole run had none: bit-identical."""
    tmp, out = runs
    assert out["whole"][0] == 0, out["whole"][2][-3000:]
    assert out["killed"][0] == -9 and out["resumed"][0] == 0, out["resumed"][2][-3000:]
    a, b = (torch.load(tmp / d / "checkpoint-last.pth", weights_only=True) for d in ("whole", "cut"))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert_same_state(a["model"], b["model"])
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(s_a, s_b)


@pytest.mark.parametrize("script", ["cae.py", "cae_v2.py", "mr_mae.py", "mask_align.py", "finetune.py"])
def test_every_script_trains_on_a_jpeg_folder(script, runs):
    """One epoch on 32 files (a large JPEG, a PNG and a CMYK JPEG among them): none unreadable, a finite loss;
    finetune.py: its linear probe and the evaluation on the val split (a greyscale JPEG among them)."""
    tmp, out = runs
    code, _, err = out[script]
    assert code == 0, err[-3000:]
    log = json.loads((tmp / ("ft" if script == "finetune.py" else script) / "log.txt").read_text().splitlines()[-1])
    assert log["unreadable_images"] == 0 and np.isfinite(log["train_loss"])
    assert script != "finetune.py" or 0 <= log["acc1"] <= 100 and np.isfinite(log["val_loss"])


# ---- No work in the training step that training does not use --------------------------------------------
def test_per_patch_loss_only_when_asked(tiny_teacher, monkeypatch):
    """forward_step computes the per-patch loss (CAE: its 8,192-way cross-entropy a second time) only for pictures and
    benchmarks: without per_patch it is None and CAE's decoding loss runs once; with it, [B, N], its mean over the
    masked patches the loss."""
    args = cae.get_args(["--data", "fake", "--model", "vit_nano_patch16", "--dalle_weights", "none", "--dalle_n_hid",
                         "8", "--teacher", "tiny"])
    args.device = "cpu"
    model, tokenizer = cae.build_model(args)
    mask = torch.stack([cae.block_masking(args)() for _ in range(2)])
    batch = (torch.randn(2, 3, 224, 224), torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8), mask)
    calls = []
    monkeypatch.setattr(cae, "decoding_loss", lambda *a, f=cae.decoding_loss, **k: calls.append(1) or f(*a, **k))
    model.eval()
    out = cae.forward_step(model, tokenizer, batch, args)
    assert out["patch_loss"] is None and len(calls) == 1
    out2 = cae.forward_step(model, tokenizer, batch, args, per_patch=True)
    assert len(calls) == 3 and out2["patch_loss"].shape == (2, 196)
    assert torch.allclose(out2["patch_loss"][mask].mean(), out2["loss"], rtol=1e-5)
