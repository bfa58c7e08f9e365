"""The pre-training input path against its anchor, in one run: on the same JPEG files, the MAE reference pipeline
(torchvision ImageFolder; RandomResizedCrop + flip + ToTensor + Normalize in the workers, float32 out) and ours
(PIL decode, a large JPEG decoded at reduced scale, the same crop and flip; uint8 out, normalised on the device),
for MILAN's transform and for CAE's (two views of one crop, 224 px bicubic + 112 px LANCZOS, and a block mask; its
reference is the same in the MAE way: float views made in the workers).

  python benchmarks/loader.py --json loader.json                       # both JPEG sets, both transforms, this CPU
  python benchmarks/loader.py --device cuda --workers 12 --json loader.json

JPEG sets (generated, quality 90, smooth structure plus noise: ImageNet-like file sizes): '500x375', every file
500 x 375; 'long_tail', a mix like ImageNet's: 80% with a 500 px long side (4:3, 3:4, 3:2 or 1:1) and 20% with a
long side drawn from 1000-2500 px. Reported per pipeline: images/s of the loader (the main process takes the
batches and, with --device, moves them there; ours normalises them there), worker CPU ms per image (user + system
of the joined workers: getrusage(RUSAGE_CHILDREN) around a pass, start-up included; the last of --epochs passes
counts, the first warms the page cache), and the projected images/s of 12 cores (12 / worker CPU s per image)
against the H200 step rates of milan.py (2,200 img/s eager at batch 128, 2,950 compiled at batch 256), and on the
long-tailed set the pixel error of the reduced-scale decode (draft_error).
--json: one record per (sizes, transform, pipeline): pipeline (mae_reference or ours), transform (milan or cae),
sizes, images_per_s, cpu_ms_per_image, main_cpu_ms_per_image, workers, projected_12_cores, device, images; and one
long_tail record with draft_share, draft_mean_abs_error_levels, draft_max_abs_error_levels.
"""
import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import datasets, transforms as T  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

import common  # noqa: E402

H200_STEP_RATES = {"eager, batch 128": 2200, "compiled, batch 256": 2950}  # milan.py img/s on one H200 (bf16)


# ---- The JPEG sets ----------------------------------------------------------------------------------
def image_size(i, sizes):
    """The (width, height) of file i of a set."""
    rng = np.random.default_rng([i, 7])
    aspect = [4 / 3, 3 / 4, 3 / 2, 1.0][rng.integers(4)]
    long = 500 if sizes == "500x375" or rng.random() < 0.8 else int(rng.integers(1000, 2501))
    if sizes == "500x375":
        return 500, 375
    return (long, round(long / aspect)) if aspect >= 1 else (round(long * aspect), long)


def write_jpegs(root, indices, sizes, classes=10):
    for i in indices:
        rng = np.random.default_rng(i)
        w, h = image_size(i, sizes)
        d = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        low = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
        x = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        x += rng.normal(0, 16, x.shape).astype(np.float32)
        Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f"{i}.jpg"), quality=90)


def jpeg_folder(root, n, sizes):
    from multiprocessing import Pool
    with Pool(os.cpu_count()) as pool:
        pool.starmap(write_jpegs, [(root, range(s, n, 64), sizes) for s in range(min(64, n))])
    return root


# ---- The two pipelines ----------------------------------------------------------------------------------
class ReferenceTwoViews:
    """CAE's transform the MAE / BEiT way (the released data path): flip, one crop resized twice (224 bicubic, 112
    LANCZOS), ToTensor + Normalize and ToTensor + map_pixels in the worker, and a block mask."""
    def __init__(self, args, mask_fn):
        self.args, self.mask_fn = args, mask_fn

    def __call__(self, img):
        img = TF.hflip(img) if torch.rand(1) < 0.5 else img
        i, j, h, w = T.RandomResizedCrop.get_params(img, (self.args.crop_min, 1.0), (3 / 4, 4 / 3))
        view = TF.resized_crop(img, i, j, h, w, [224, 224], T.InterpolationMode.BICUBIC)
        token = TF.resized_crop(img, i, j, h, w, [112, 112], T.InterpolationMode.LANCZOS)
        view = TF.normalize(TF.to_tensor(view), common.IMAGENET_MEAN, common.IMAGENET_STD)
        return view, 0.8 * TF.to_tensor(token) + 0.1, self.mask_fn()


def reference_dataset(transform, args, data):
    """torchvision's ImageFolder with its default loader (PIL, convert RGB) and the transform in the workers."""
    if transform == "milan":
        t = T.Compose([T.RandomResizedCrop(args.input_size, scale=(args.crop_min, 1.0),
                                           interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    else:
        t = ReferenceTwoViews(args, importlib.import_module("cae").block_masking(args))
    return datasets.ImageFolder(os.path.join(data, "train"), transform=t)


def build(pipeline, transform, data, opts):
    """-> (dataset, sampler) of one pipeline: the reference shuffles with a RandomSampler; ours is the method
    file's own (common.build_dataset + Samples + SeededSampler, per-image seeding included)."""
    module = importlib.import_module(transform)
    args = module.get_args(["--data", data, "--model", "vit_nano_patch16", "--batch_size", str(opts.batch_size),
                            "--num_workers", str(opts.workers)])
    args.rank, args.world_size, args.device = 0, 1, opts.device
    if pipeline == "mae_reference":
        ds = reference_dataset(transform, args, data)
        return ds, torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds), opts.batch_size, drop_last=True)
    loader = common.build_loader(common.build_dataset(args, module.build_transform(args)), args)
    return loader.dataset, torch.utils.data.BatchSampler(loader.sampler, opts.batch_size, drop_last=True)


def cpu_seconds(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def measure(pipeline, transform, sizes, data, opts):
    dataset, batches = build(pipeline, transform, data, opts)
    for epoch in range(opts.epochs):  # a fresh, non-persistent loader per pass: its workers are joined at the end
        if hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=opts.workers,
                                             pin_memory=opts.device.startswith("cuda"))
        workers, main, t0, n = cpu_seconds(resource.RUSAGE_CHILDREN), cpu_seconds(resource.RUSAGE_SELF), time.perf_counter(), 0
        for batch, _ in loader:
            batch = common.to_device(batch, opts.device)  # ours: uint8 view normalised there; reference: moved
            n += len(batch[0] if isinstance(batch, tuple) else batch)
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        del loader
        worker_s, main_s = cpu_seconds(resource.RUSAGE_CHILDREN) - workers, cpu_seconds(resource.RUSAGE_SELF) - main
    cpu_ms = 1e3 * (worker_s if opts.workers else main_s) / n
    return dict(pipeline=pipeline, transform=transform, sizes=sizes, images_per_s=n / seconds, cpu_ms_per_image=cpu_ms,
                main_cpu_ms_per_image=1e3 * main_s / n, workers=opts.workers, projected_12_cores=12e3 / cpu_ms,
                device=device_name(opts.device), images=n)


def draft_error(data, n=200):
    """The pixel error of the reduced-scale decode: for the first n files, one random crop each (the pre-training
    crop, scale (0.2, 1)) resized to 224 px from the drafted decode and from the full decode; mean |difference| in
    uint8 levels over the crops that were drafted, and their share."""
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs)[:n]
    errors = []
    for k, path in enumerate(files):
        torch.manual_seed(k)
        box = T.RandomResizedCrop.get_params(Image.open(path), (0.2, 1.0), (3 / 4, 4 / 3))
        img, drafted, s = common.decode(Image.open(path), box, 224)
        if s > 1:
            full = Image.open(path).convert("RGB")
            a = np.asarray(common.resize(img, drafted, s, 224), dtype=np.float32)
            b = np.asarray(common.resize(full, (box[1], box[0], box[1] + box[3], box[0] + box[2]), 1, 224), dtype=np.float32)
            errors.append(np.abs(a - b).mean())
    return dict(draft_share=len(errors) / len(files), draft_mean_abs_error_levels=float(np.mean(errors)) if errors else 0.0,
                draft_max_abs_error_levels=float(np.max(errors)) if errors else 0.0)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"


class Help(argparse.RawDescriptionHelpFormatter, common.DefaultsHelpFormatter):
    """This docstring as the description, and every flag's default in --help."""


def main(argv=None):
    p = common.Parser(description=__doc__, formatter_class=Help)  # a bad value: one error line (exit 2)
    p.add_argument("--sizes", nargs="+", default=["500x375", "long_tail"], choices=["500x375", "long_tail"],
                   help="JPEG sets (see above)")
    p.add_argument("--transforms", nargs="+", default=["milan", "cae"], choices=["milan", "cae"],
                   help="MILAN's crop + flip, CAE's two views + block mask")
    p.add_argument("--images", type=common.COUNT, default=768, help="JPEGs per set")
    p.add_argument("--batch_size", type=common.COUNT, default=64, help="images per batch")
    p.add_argument("--workers", type=common.SIZE, default=2, help="DataLoader workers")
    p.add_argument("--epochs", type=common.COUNT, default=2, help="passes over the data; the last one is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where batches go")
    p.add_argument("--json", help="write the records (a JSON list) here")
    opts = p.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for sizes in opts.sizes:
            data = jpeg_folder(os.path.join(tmp, sizes), opts.images, sizes)
            for transform in opts.transforms:
                pair = [measure(pipeline, transform, sizes, data, opts) for pipeline in ("mae_reference", "ours")]
                for r in pair:
                    print(f"{sizes:9s} {transform:5s} {r['pipeline']:13s} {r['images_per_s']:7.1f} img/s, worker CPU "
                          f"{r['cpu_ms_per_image']:5.2f} ms/img ({r['workers']} workers), main {r['main_cpu_ms_per_image']:5.2f} "
                          f"ms/img; 12 cores: {r['projected_12_cores']:6.0f} img/s", flush=True)
                print(f"{sizes:9s} {transform:5s} worker CPU per image, ours / reference: "
                      f"{pair[1]['cpu_ms_per_image'] / pair[0]['cpu_ms_per_image']:.2f}", flush=True)
                records += pair
            if sizes == "long_tail":
                err = draft_error(data)
                print(f"long_tail reduced-scale decode: {err['draft_share']:.0%} of the crops, mean |difference| from the full "
                      f"decode {err['draft_mean_abs_error_levels']:.2f} levels of 255 (worst crop "
                      f"{err['draft_max_abs_error_levels']:.2f})", flush=True)
                records.append(dict(pipeline="ours", transform="milan", sizes=sizes, **err))
    print("H200 step rates of milan.py to feed: " + ", ".join(f"{k}: {v} img/s" for k, v in H200_STEP_RATES.items()))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
