"""The pre-training data path, --decode cpu against --decode device: images/s of the loader (with the main
process's share: for the device path, decoding the batch's JPEGs and cropping them on --device) and the CPU
seconds per image its workers spend (the cores a GPU needs to be fed), on JPEGs like ImageNet's (500 x 375,
quality 90; or --data DIR).

  python benchmarks/loader.py --workers 2 --images 512 --json loader.json            # this CPU
  python benchmarks/loader.py --device cuda --workers 12 --images 4096 --json loader.json
  python benchmarks/loader.py --device cuda --workers 12 --end_to_end 128 --json e2e.json  # + milan.py end to end

Worker CPU time: the workers are separate processes, started for each pass and joined at its end, so
getrusage(RUSAGE_CHILDREN) after the pass holds exactly their user + system seconds (start-up included).
--json: one record per path: path (cpu or device), device, images_per_s, cpu_s_per_image (worker side),
workers, and main_cpu_s_per_image, method. --end_to_end B also runs `torchrun --nproc_per_node=1 milan.py` for
two epochs of batch B on the folder with each path and adds e2e_images_per_s (the training bar's img/s at the
end of the second epoch; the step rate to compare with is bench.py's --batch_size B).
"""
import argparse
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402


def jpeg_folder(root, n, classes=10):
    """n JPEGs of 500 x 375 at quality 90 with ImageNet-like file sizes (smooth structure plus noise: ~90 KB),
    written by all cores."""
    from multiprocessing import Pool
    with Pool(os.cpu_count()) as pool:
        pool.starmap(write_jpegs, [(root, range(s, n, 64), classes) for s in range(min(64, n))])
    return root


def write_jpegs(root, indices, classes):
    for i in indices:
        rng = np.random.default_rng(i)
        d = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        low = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
        x = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), dtype=np.float32)
        x += rng.normal(0, 16, x.shape)
        Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f"{i}.jpg"), quality=90)


def cpu_seconds(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def measure(path, data, opts):
    module = importlib.import_module(opts.method)
    args = module.get_args(["--data", data, "--model", "vit_nano_patch16", "--batch_size", str(opts.batch_size),
                            "--num_workers", str(opts.workers)])
    args.rank, args.world_size, args.device, args.decode = 0, 1, opts.device, path
    loader = common.build_loader(common.build_dataset(args, module.build_transform(args)), args)
    loader = torch.utils.data.DataLoader(loader.dataset, opts.batch_size, sampler=loader.sampler, num_workers=opts.workers,
                                         collate_fn=common.collate, pin_memory=opts.device.startswith("cuda"))
    rec = None
    for epoch in range(opts.epochs):  # the last pass counts (the first warms the page cache)
        loader.sampler.set_epoch(epoch)
        workers, main, t0, n = cpu_seconds(resource.RUSAGE_CHILDREN), cpu_seconds(resource.RUSAGE_SELF), time.perf_counter(), 0
        for batch, _ in loader:
            batch = common.to_device(batch, opts.device)
            n += len(batch[0] if isinstance(batch, tuple) else batch)
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0  # the iterator has ended: its workers are joined
        worker_s, main_s = cpu_seconds(resource.RUSAGE_CHILDREN) - workers, cpu_seconds(resource.RUSAGE_SELF) - main
        rec = dict(path=path, device=device_name(opts.device), images_per_s=n / seconds,
                   cpu_s_per_image=worker_s / n if opts.workers else main_s / n, workers=opts.workers,
                   main_cpu_s_per_image=main_s / n, method=opts.method, images=n)
    return rec


def end_to_end(path, data, opts):
    """milan.py as a user runs it, two epochs; the training bar's last img/s (second epoch: workers warm)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "milan.py"), "--data", data, "--batch_size", str(opts.end_to_end), "--num_workers",
           str(opts.workers), "--decode", path, "--epochs", "2", "--warmup_epochs", "1", "--teacher_weights", "none",
           "--accum_iter", "1", "--log_every", "5", "--output_dir", tempfile.mkdtemp()] + opts.train_flags
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    rates = re.findall(r"epoch 1:.*?img_s=([0-9.]+)", proc.stderr)
    if proc.returncode or not rates:
        print(f"end to end ({path}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(rates[-1])


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an ImageFolder root; default: --images generated JPEGs in a temp folder")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="passes over the data; the last one is reported")
    p.add_argument("--paths", nargs="+", default=["cpu", "device"], choices=["cpu", "device"])
    p.add_argument("--method", default="milan", help="whose build_transform (milan, cae, cae_v2, mr_mae, mask_align)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--end_to_end", type=int, metavar="B", help="also torchrun milan.py with batch B (GPU)")
    p.add_argument("--train_flags", nargs=argparse.REMAINDER, default=[], help="more flags for milan.py (last)")
    p.add_argument("--json", help="write the records (a JSON list) here")
    opts = p.parse_args()
    tmp = None if opts.data else tempfile.TemporaryDirectory()
    data = opts.data or jpeg_folder(tmp.name, opts.images)
    records = []
    for path in opts.paths:
        rec = measure(path, data, opts)
        if opts.end_to_end:
            rec["e2e_images_per_s"], rec["e2e_batch_size"] = end_to_end(path, data, opts), opts.end_to_end
        records.append(rec)
        print(f"{path:6s} on {rec['device']}: {rec['images_per_s']:8.1f} img/s, worker CPU {1e3 * rec['cpu_s_per_image']:6.2f} "
              f"ms/img ({opts.workers} workers), main process {1e3 * rec['main_cpu_s_per_image']:6.2f} ms/img"
              + (f", milan.py end to end {rec['e2e_images_per_s']} img/s" if opts.end_to_end else ""), flush=True)
    if len(records) == 2:
        print(f"worker CPU per image, device / cpu: {records[1]['cpu_s_per_image'] / records[0]['cpu_s_per_image']:.3f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
