"""Images/s of the pre-training data pipeline (common.build_loader: JPEG decode, RandomResizedCrop, flip,
block masks in the workers), to compare with a method's training images/s from bench.py: the loader
must deliver more than the step consumes.

  python benchmarks/loader.py --workers 0 1 2 --images 512 [--data DIR]

Without --data it writes --images JPEGs of ImageNet's typical size (500 x 375) to a temp folder first.
Each setting runs two epochs; the second shows what persistent workers save (no restart per epoch).
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402


def jpeg_folder(root, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, "train", f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        x = np.clip(rng.normal(128, 40, (375, 500, 3)).cumsum(1) / np.arange(1, 501)[None, :, None] * 1.0, 0, 255)
        Image.fromarray(x.astype(np.uint8)).save(os.path.join(d, f"{i}.jpg"), quality=90)
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--block_masks", action="store_true", help="also make CAE's block masks in the workers")
    opts = p.parse_args()
    tmp = None if opts.data else tempfile.TemporaryDirectory()
    data = opts.data or jpeg_folder(tmp.name, opts.images)
    for persistent in (True, False):
        for workers in opts.workers:
            if workers == 0 and not persistent:
                continue
            args = argparse.Namespace(data=data, input_size=224, crop_min=0.2, batch_size=opts.batch_size, seed=0,
                                      rank=0, world_size=1, num_workers=workers, device="cpu")
            transform = common.pretrain_transform(args)
            if opts.block_masks:
                transform = common.WithMask(transform, common.BlockMaskGenerator())
            loader = common.build_loader(common.build_dataset(args, transform), args)  # persistent if workers > 0
            if not persistent:
                loader = torch.utils.data.DataLoader(loader.dataset, opts.batch_size, sampler=loader.sampler,
                                                     num_workers=workers, persistent_workers=False)
            rates = []
            for epoch in range(2):
                loader.sampler.set_epoch(epoch)
                t0, n = time.perf_counter(), 0
                for batch, _ in loader:
                    n += len(batch[0] if isinstance(batch, list) else batch)
                rates.append(n / (time.perf_counter() - t0))
            print(f"workers {workers} persistent {str(loader.persistent_workers):5s}: epoch 1 {rates[0]:7.1f} img/s, "
                  f"epoch 2 {rates[1]:7.1f} img/s ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
