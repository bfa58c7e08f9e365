"""See every method learn, on a laptop, in minutes (nanoGPT's Shakespeare run for mimlab).

  python benchmarks/learn.py --json out.json --plot out.png

1. writes a synthetic image dataset as JPEGs in ImageNet layout (OUT/data/{train,val}/<class>/*.jpg), fixed
   by --seed: 10 classes told apart by shape (disc, square, triangle, ring, plus, star, crescent) or texture
   (stripes, checker, dots, drawn inside a disc or a square), each image with its own position, scale,
   rotation, colours and a noisy gradient background, so that mean colour says nothing about the class;
2. trains a teacher on its train split: the `--teacher tiny` CLIP tower (open_clip VisionTransformer, width
   64, 2 blocks), supervised (cross-entropy of a linear head on its CLS output and on its mean patch token), at the student's grid,
   through the same forward common.Teacher runs; saved as OUT/teacher.pth, which the method files load with
   `--teacher tiny --teacher_weights OUT/teacher.pth` (checked: common.Teacher gives the trained features);
3. pre-trains a vit_nano_patch16 student (--input_size 112: 7 x 7 patches) with each method file through
   its own command line (`python milan.py ...`), from that teacher (CAE: `--target pixel`, no teacher), and the
   pixel-target control mae_pixel: MAE, i.e. mr_mae.py with L_R alone (--loss_weights 1 0 --focus none
   --fusion_layers 2), which tells what pixel targets give at this scale apart from anything in cae.py;
4. linear-probes every student with `finetune.py --mode linprobe`, and three references with the same
   probe: the randomly initialised student (through finetune.py too), and, in this process, the teacher's
   features (its tokens, pooled as the students') and raw pixels; with --finetune_epochs N, also fine-tunes the
   random and every pre-trained student end to end (`finetune.py --mode finetune`, N epochs, the same for all);
5. with --cae_fig4, CAE's own check of its mechanism (Sec. 3, Fig. 4): cae.py --target pixel pre-trained with the
   alignment loss (--align_weight 2) and without (0), same recipe and length, over --fig4_seeds seeds; then all
   patches of each val image go through the encoder and straight to the decoder, the latent contextual regressor
   skipped. With the alignment the regressor's outputs lie in the encoder's space, so the decoder can read the
   encoder's tokens and the image comes back; without it, it cannot (the paper: noise).

One recipe rule for all five methods ("the papers' recipes scaled to the run"): every flag keeps the method
file's default (its paper's --blr, --betas, --weight_decay, --mask_ratio, --min_lr, --clip_grad,
--crop_min, drop path, decoder sizes for nano), except the run length and the batch, which are the same for
all: --epochs E, --batch_size B, and --warmup_epochs = E x (the file's warmup_epochs / epochs), i.e. each
paper's warmup fraction (MILAN 40/400, CAE 10/300, CAE v2 10/300, MR-MAE 80/400, MaskAlign 20/200), and the
lr, which stays each paper's peak lr (--lr = the file's blr x its default total batch, batch_size x
accum_iter x 8 GPUs, / 256: MILAN 2.4e-3, CAE and CAE v2 1.5e-3, MR-MAE and MaskAlign 6e-4) rather than
shrinking by the linear scaling rule with our 16-64x smaller batch (--lr_rule linear: a few hundred steps
at lr 4e-5 barely move the weights).

The probe is finetune.py's linear probe (MAE's: frozen encoder, BatchNorm without affine +
Linear, LARS, warmup + cosine; crop + flip, val resize + centre crop), reading the mean patch token (--probe_pool
avg; cls: MAE's CLS token), with its epochs and batch scaled the
same way: --probe_epochs, --probe_batch, warmup 10/90 of the epochs, and --probe_lr in place of
blr x batch / 256: MAE's lr 6.4 is kept, as the papers' peak lrs are for pre-training (measured so far: at a
hundred-odd steps its bias updates, which LARS does not scale, dominate the first epochs; see the README). The teacher and pixel rows run the same head, optimiser, schedule, images (the same seeded
crops) and epochs in this process on their features. Reported: top-1 (%) on the val split after the last
probe epoch (no choice of the best epoch).

Two more columns say what each network's patch tokens hold, on the first 256 val images (linear_r2: the share of
the variance an affine least-squares map explains): colour_r2, from each patch's mean RGB to the network's token (a
random ViT's tokens are mostly the patch's colour, which says nothing about the class here); teacher_r2, from the
student's token to the teacher's token of the same patch: the wiring check. A student whose targets come from another
image cannot predict its teacher (measured: MaskAlign fed the next image's targets, 0.10, as the random student; the
probe alone gave it 15.8%, 3 points above the random student's 12.8%: a network that merely lost its colour code
also probes above random init). Targets from the wrong patch of the right image show only in part (patch order
reversed: 0.42 against 0.66, probe 31.0 against 38.8%); tests/test_wiring.py, which recomputes each method's
forward_step loss from targets gathered patch by patch, fails on that bug.

Writes OUT/ (data, teacher, one folder per run with its log.txt and the script's output; OUT is learn.py's own:
a folder it did not make is refused), --json (one record per row: method, probe_top1, finetune_top1, pretrain_s,
probe_s, final_pretrain_loss, colour_r2, teacher_r2; with --cae_fig4 one record per Fig. 4 run: method
"cae_fig4", align_weight, seed, recon_mse, recon_mse_masked, pretext_mse, pretrain_s, final_pretrain_loss) and
--plot (pre-training loss per method over steps, one point per epoch: log.txt's epoch mean; probe top-1 as bars;
with --cae_fig4 the Fig. 4 picture beside it, <name>_cae_fig4.png).

  python benchmarks/learn.py --cae_fig4 --methods cae --json out.json --plot out.png     # the CAE row, then Fig. 4
"""
import argparse
import importlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import common  # noqa: E402
from common import Range, UserError  # noqa: E402
import finetune  # noqa: E402

METHODS = {  # row -> (method file, flags beyond the shared ones)
    "milan": ("milan", []), "cae": ("cae", ["--target", "pixel"]), "cae_v2": ("cae_v2", []), "mr_mae": ("mr_mae", []),
    "mask_align": ("mask_align", []),
    "mae_pixel": ("mr_mae", ["--loss_weights", "1", "0", "--focus", "none", "--fusion_layers", "2"])}  # the control
MARKER = ".made_by_learn_py"  # in --out: the folder is learn.py's own; it lists the files learn.py wrote there
CLASSES = ["disc", "stripes", "triangle", "checker", "ring", "dots", "square", "plus", "star", "crescent"]  # --classes N: first N


class Help(argparse.RawDescriptionHelpFormatter, common.DefaultsHelpFormatter):
    """This docstring as the description, and every flag's default in --help."""


def get_args(argv=None):
    p = common.Parser(description=__doc__, formatter_class=Help)
    a, COUNT, POS = p.add_argument, common.COUNT, common.POS
    a("--out", default="learn_out", help="work folder (data, teacher, runs); a folder an earlier learn.py run made "
      "(its marker file " + MARKER + ", which lists what it wrote) is emptied of those files first; a folder that "
      "holds any other file is refused")
    a("--json", help="write (a new file) one record per row (method, probe_top1, finetune_top1, pretrain_s, probe_s, "
      "final_pretrain_loss, colour_r2, teacher_r2) and, with --cae_fig4, one per Fig. 4 run")
    a("--plot", help="write (a new file) a PNG: pre-training loss per method over steps, probe top-1 as bars (with --cae_fig4 "
      "also the Fig. 4 picture, beside it as <name>_cae_fig4.png)")
    a("--seed", type=common.SIZE, default=0, help="data, teacher, students and probes")
    a("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="rows to pre-train; mae_pixel is "
      "the pixel-target control: MAE (mr_mae.py --loss_weights 1 0 --focus none --fusion_layers 2: L_R alone, "
      "uniform masking, no fusion)")
    a("--classes", type=Range(int, "[2, 10]"), default=10, help=f"first N of {', '.join(CLASSES)}")
    a("--train_per_class", type=COUNT, default=200, help="train images per class")
    a("--val_per_class", type=COUNT, default=50, help="val images per class")
    a("--image_size", type=COUNT, default=128, help="side of the JPEGs (val: resize to input/0.875, centre crop)")
    a("--input_size", type=COUNT, default=112, help="student and teacher input (7 x 7 patches of 16)")
    a("--teacher_steps", type=COUNT, default=2400, help="teacher training steps")
    a("--teacher_log", type=COUNT, default=100, help="print the teacher's mean loss every this many steps")
    a("--teacher_lr", type=POS, default=2e-3, help="AdamW, wd 0.05, warmup 5%% of the steps, then cosine")
    a("--teacher_batch", type=COUNT, default=64, help="teacher training batch")
    a("--teacher_loss", choices=["cls", "cls+patch"], default="cls+patch", help="cross-entropy on the CLS output, and "
      "(cls+patch) on the mean patch token through the same head, so that the patch tokens the methods regress carry "
      "the class (a CLS-only loss leaves the last block's patch outputs without a gradient)")
    a("--teacher_crop_min", type=common.FRACTION, default=0.5, help="RandomResizedCrop scale (min, 1) + flip")
    a("--epochs", type=COUNT, default=16, help="pre-training epochs, every method (16 x 2000 / 32: 992 steps)")
    a("--batch_size", type=COUNT, default=32, help="pre-training batch, every method")
    a("--lr_rule", choices=["paper", "linear"], default="paper", help="paper: every method trains at its paper's "
      "peak lr, blr x the file's default total batch (batch_size x accum_iter x 8 GPUs) / 256; linear: blr x "
      "--batch_size / 256 (the linear scaling rule, 16-64x smaller here)")
    a("--probe_epochs", type=COUNT, default=8, help="linear probe epochs, every row (warmup 1/9 of them)")
    a("--probe_batch", type=COUNT, default=128, help="linear probe batch, every row")
    a("--probe_lr", type=POS, default=6.4, help="LARS lr (trust coefficient 0.001); 6.4 = MAE's linear probe "
      "(blr 0.1 x batch 16384 / 256), kept as the papers' peak lrs are kept for pre-training")
    a("--probe_crop_min", type=common.FRACTION, default=0.5, help="the probe's RandomResizedCrop scale (min, 1), for every row "
      "(finetune.py --crop_min): MAE's 0.08 often crops the one shape of an image out")
    a("--probe_pool", choices=["cls", "avg"], default="avg", help="what every probe reads (finetune.py --pool): the "
      "CLS token (MAE's protocol), or the mean patch token; measured: the CLS probe hides what MILAN, CAE v2 and MR-MAE "
      "learn, since only MaskAlign trains the CLS token directly (README)")
    a("--finetune_epochs", type=common.SIZE, default=0, help="0: no fine-tuning column; N: also fine-tune the "
      "random student and every pre-trained one with finetune.py --mode finetune for N epochs (its defaults: MAE's "
      "recipe, AdamW, layer decay 0.65, drop path 0.1, RandAugment, mixup / cutmix, label smoothing; the batch and "
      "crop of the probe, warmup 5/100 of the epochs as MAE's, lr --finetune_lr), val top-1 after the last epoch")
    a("--finetune_lr", type=POS, default=2e-3, help="fine-tuning peak lr: MAE's ViT-B recipe (blr 5e-4 x batch 1024 / "
      "256), kept as the papers' peak lrs are kept for pre-training")
    a("--attnprobe_lr", type=POS, default=0.4, help="attentive probe (finetune.py --mode attnprobe, ablate.py's CAE "
      "table) peak lr: CAE App. A's SGD lr 0.4, kept as above; --probe_epochs, warmup 10/90 of them")
    a("--cae_fig4", action="store_true", help="also run CAE Sec. 3 / Fig. 4: cae.py --target pixel pre-trained with "
      "--align_weight 2 and 0 (same recipe and length as the rows) for each of --fig4_seeds; then all patches of the "
      "val images through the encoder and straight to the decoder, the regressor skipped: recon_mse (all "
      "patches, normalised pixels), recon_mse_masked (the patches a block mask hides) and pretext_mse (the "
      "training path on those patches); the picture: OUT/cae_fig4.png and, with --plot, beside it")
    a("--fig4_seeds", type=COUNT, default=3, help="training seeds --seed, --seed + 1, ... of each --cae_fig4 arm")
    a("--fig4_epochs", type=COUNT, help="pre-training epochs of the --cae_fig4 runs (default: --epochs)")
    a("--threads", type=COUNT, default=2, help="torch threads of each run (OMP_NUM_THREADS)")
    return p.parse_args(argv)


# ---- 1. Data: shapes and textures, JPEG, ImageNet layout -------------------------------------------
def _colour(rng, away_from=None):
    """A random RGB colour, at L1 distance > 180 from away_from (so the object always shows)."""
    while True:
        c = rng.integers(0, 256, 3)
        if away_from is None or np.abs(c - np.asarray(away_from)).sum() > 180:
            return tuple(int(v) for v in c)


def _polygon(cx, cy, r, n, rot, inner=None):
    """Regular n-gon (or n-point star with inner radius inner * r) around (cx, cy)."""
    k = 2 if inner else 1
    return [(cx + (r if j % 2 == 0 or not inner else r * inner) * math.cos(rot + 2 * math.pi * j / (n * k)),
             cy + (r if j % 2 == 0 or not inner else r * inner) * math.sin(rot + 2 * math.pi * j / (n * k)))
            for j in range(n * k)]


def draw_image(name, rng, size=128):
    """One image of class `name`: a noisy linear-gradient background of a random colour, and the shape (or a
    disc / square of the texture) in another random colour at a random position, radius and rotation."""
    bg, bg_shift = rng.integers(0, 256, 3), rng.integers(-60, 61, 3)
    fg = _colour(rng, bg)
    fg2 = _colour(rng, fg)
    t = np.linspace(0, 1, size)[None, :, None]
    img = np.broadcast_to(bg * (1 - t) + np.clip(bg + bg_shift, 0, 255) * t, (size, size, 3))  # [H, W, 3]
    img = img.transpose(1, 0, 2) if rng.random() < 0.5 else img  # horizontal or vertical gradient
    im = Image.fromarray(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    r = size * rng.uniform(0.18, 0.36)
    cx, cy, rot = rng.uniform(r, size - r), rng.uniform(r, size - r), rng.uniform(0, 2 * math.pi)
    draw, box = ImageDraw.Draw(im), [cx - r, cy - r, cx + r, cy + r]
    mask = Image.new("L", (size, size), 0)  # for crescent and textures: where the second layer shows
    md = ImageDraw.Draw(mask)
    if name == "disc":
        draw.ellipse(box, fill=fg)
    elif name in ("square", "triangle"):
        draw.polygon(_polygon(cx, cy, r, 4 if name == "square" else 3, rot), fill=fg)
    elif name == "ring":
        draw.ellipse(box, outline=fg, width=max(3, int(r * 0.3)))
    elif name == "plus":
        w = 0.3 * r
        for a in (rot, rot + math.pi / 2):
            dx, dy, px, py = r * math.cos(a), r * math.sin(a), -w * math.sin(a), w * math.cos(a)
            draw.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py), (cx + dx + px, cy + dy + py),
                          (cx - dx + px, cy - dy + py)], fill=fg)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.4), fill=fg)
    elif name == "crescent":  # a disc minus an offset disc
        md.ellipse(box, fill=255)
        ox, oy, r2 = 0.45 * r * math.cos(rot), 0.45 * r * math.sin(rot), 0.85 * r
        md.ellipse([cx + ox - r2, cy + oy - r2, cx + ox + r2, cy + oy + r2], fill=0)
        im.paste(Image.new("RGB", (size, size), fg), (0, 0), mask)
    else:  # textures in two colours, inside a disc or a square (the silhouettes of other classes)
        tex = Image.new("RGB", (size, size), fg2)
        td, period = ImageDraw.Draw(tex), max(6, int(r * rng.uniform(0.35, 0.55)))
        for i in range(-size, 2 * size, period):
            if name == "stripes":
                td.rectangle([i, -size, i + period // 2, 2 * size], fill=fg)
            for j in range(0, size + period, period) if name != "stripes" else ():
                if name == "checker" and (i // period + j // period) % 2 == 0:
                    td.rectangle([i, j, i + period - 1, j + period - 1], fill=fg)
                elif name == "dots":
                    td.ellipse([i - 0.28 * period, j - 0.28 * period, i + 0.28 * period, j + 0.28 * period], fill=fg)
        if name != "dots":
            tex = tex.rotate(math.degrees(rot), resample=Image.BILINEAR, fillcolor=fg2)
        if rng.random() < 0.5:
            md.ellipse([cx - 1.1 * r, cy - 1.1 * r, cx + 1.1 * r, cy + 1.1 * r], fill=255)
        else:
            md.polygon(_polygon(cx, cy, 1.2 * r, 4, rot), fill=255)
        im.paste(tex, (0, 0), mask)
    return im


def make_dataset(root, seed, classes, train_per_class, val_per_class, size=128):
    """root/{train,val}/<class>/<i>.jpg; image i of a class and split is drawn from rng(seed, split, class, i)."""
    for split, (sid, n) in {"train": (0, train_per_class), "val": (1, val_per_class)}.items():
        for c, name in enumerate(CLASSES[:classes]):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, sid, c, i])
                draw_image(name, rng, size).save(os.path.join(root, split, name, f"{i:05d}.jpg"), quality=90)
    return root


# ---- Probe data: finetune.py's linprobe transforms and seeded loader, in this process -------------------
def probe_args(args, data, split_batch=None):
    """The Namespace common's data pipeline needs, as finetune.py --mode linprobe sets it for this run."""
    return argparse.Namespace(data=data, input_size=args.input_size, crop_min=args.probe_crop_min, mode="linprobe", seed=args.seed,
                              batch_size=split_batch or args.probe_batch, world_size=1, rank=0, num_workers=1,
                              device="cpu", fake_size=0)


def loaders(args, data):
    pa = probe_args(args, data)
    train = common.build_dataset(pa, finetune.build_transform(pa, train=True))
    val = common.build_dataset(pa, finetune.build_transform(pa, train=False), split="val")
    return pa, common.build_loader(train, pa), common.build_loader(val, pa, train=False), len(train.classes)


# ---- 2. Teacher: the `tiny` CLIP tower, trained supervised at the student's grid -------------------------
def teacher_tokens(net, images, grid):
    """common.Teacher.forward's path for a CLIP tower, with autograd: ImageNet-normalised images [B, 3, H, W]
    -> tokens [B, 1+N, C] = ln_post(all tokens) @ proj, the 14 x 14 position embedding resized to grid. Written
    out here because Teacher.forward runs without autograd on a frozen, pre-resized copy of that embedding; a test
    checks that both give the same tokens."""
    mean_in, std_in, mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in
                                  (common.IMAGENET_MEAN, common.IMAGENET_STD, common.CLIP_MEAN, common.CLIP_STD))
    x = images * (std_in / std) + (mean_in - mean) / std  # ImageNet -> CLIP normalisation, as the Teacher does
    x = net.conv1(x).flatten(2).transpose(1, 2)  # [B, N, W]
    x = torch.cat([net.class_embedding.view(1, 1, -1).expand(len(x), -1, -1), x], 1)  # [B, 1+N, W]
    x = net.ln_pre(x + common.resize_pos(net.positional_embedding, grid)[None])
    for blk in net.transformer.resblocks:
        x = blk(x)
    return net.ln_post(x) @ net.proj  # [B, 1+N, C]


def load_split(root, size):
    """All images of root/<class>/*.jpg, resized to size x size: uint8 [N, 3, size, size], labels [N]."""
    classes = sorted(os.listdir(root))
    files = [(os.path.join(root, c, f), k) for k, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, c)))]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f, _ in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([k for _, k in files])


def normalise(x):
    """uint8 [B, 3, H, W] -> ImageNet-normalised float, as the method files' transforms give it."""
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def train_teacher(args, data, path, log):
    """Supervised training of the tiny tower + a linear head on its CLS output (and mean patch token: --teacher_loss), on the train images held in memory
    (random resized crop + flip per image, AdamW, warmup + cosine); saves the tower's state dict and checks
    that common.Teacher, loading that file, gives the same features. Returns (seconds, final train loss)."""
    t0, grid, size = time.time(), args.input_size // 16, args.input_size
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    images, labels = load_split(os.path.join(data, "train"), args.image_size)
    net, head = common.tiny_clip_tower(), nn.Linear(32, int(labels.max()) + 1)
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=args.teacher_lr, weight_decay=0.05)
    steps = args.teacher_steps
    sched = argparse.Namespace(lr=args.teacher_lr, min_lr=0.0, warmup_epochs=0.05 * steps, epochs=steps)
    total, n = 0.0, 0
    for step in range(steps):
        idx = torch.randint(len(images), (args.teacher_batch,), generator=g)
        batch = []
        for i in idx.tolist():  # RandomResizedCrop (scale (crop_min, 1), ratio (3/4, 4/3)) + flip
            area = images.shape[-1] ** 2 * (args.teacher_crop_min + (1 - args.teacher_crop_min) * torch.rand(1, generator=g).item())
            ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(1, generator=g).item())
            w = min(images.shape[-1], round(math.sqrt(area * ratio)))
            h = min(images.shape[-1], round(math.sqrt(area / ratio)))
            top = torch.randint(images.shape[-1] - h + 1, (1,), generator=g).item()
            left = torch.randint(images.shape[-1] - w + 1, (1,), generator=g).item()
            crop = images[i:i + 1, :, top:top + h, left:left + w].float()
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            batch.append(crop.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else crop)
        x = normalise(torch.cat(batch).clamp(0, 255))
        common.set_lr(opt, common.lr_at(step, sched))
        tokens = teacher_tokens(net, x, grid)  # [B, 1+N, 32]
        # cls+patch: also the mean patch token through the same head. The patch tokens are what MILAN, CAE v2, MR-MAE
        # and MaskAlign regress, and the last block's patch outputs get no gradient from a CLS-only loss
        loss = F.cross_entropy(head(tokens[:, 0]), labels[idx])
        if args.teacher_loss == "cls+patch":
            loss = loss + F.cross_entropy(head(tokens[:, 1:].mean(1)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, n = total + loss.item(), n + 1
        if (step + 1) % args.teacher_log == 0 or step + 1 == steps:
            log(f"  teacher step {step + 1}/{steps}: train loss {total / n:.4f} ({time.time() - t0:.0f} s)")
            last, total, n = total / n, 0.0, 0
    torch.save(net.state_dict(), path)
    check = common.Teacher("tiny", path, grid=grid)  # the file, loaded as the method files load it
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(check(x)["tokens"], teacher_tokens(net.eval(), x, grid), atol=1e-5), \
            "common.Teacher does not reproduce the trained teacher"
    return time.time() - t0, last


# ---- The linear probe of finetune.py, on features computed here (teacher, pixels) -----------------------
def probe_features(args, data, features, dim):
    """finetune.py --mode linprobe's head (BatchNorm(affine=False, eps 1e-6) + Linear, trunc-normal 0.01 init),
    optimiser (finetune.LARS, wd 0) and per-step warmup + cosine, on features(images) [B, dim] of the same
    seeded crops; returns val top-1 (%) after the last epoch."""
    pa, train, val, classes = loaders(args, data)
    torch.manual_seed(args.seed)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01), nn.init.zeros_(head[1].bias)
    opt = finetune.LARS(head.parameters(), lr=args.probe_lr, weight_decay=0.0)
    sched = argparse.Namespace(lr=args.probe_lr, min_lr=0.0, warmup_epochs=args.probe_epochs / 9, epochs=args.probe_epochs)
    for epoch in range(args.probe_epochs):
        train.sampler.set_epoch(epoch)
        head.train()
        for step, (images, labels) in enumerate(train):
            common.set_lr(opt, common.lr_at(epoch + step / len(train), sched))
            with torch.no_grad():
                f = features(common.to_device(images, "cpu"))  # uint8 -> ImageNet-normalised, as in training
            loss = F.cross_entropy(head(f), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    hits = n = 0
    with torch.no_grad():
        for images, labels in val:
            hits += (head(features(common.to_device(images, "cpu"))).argmax(1) == labels).sum().item()
            n += len(labels)
    return 100.0 * hits / n


def val_patches(tokens_of, args, data, n=256):
    """tokens_of(images)'s patch tokens (CLS dropped) on the first n val images (fixed order and crops): [n * N, D]."""
    out, seen = [], 0
    with torch.no_grad():
        for images, _ in loaders(args, data)[2]:
            images = common.to_device(images, "cpu")  # uint8 -> ImageNet-normalised, as in training
            out.append(tokens_of(images[:n - seen])[:, 1:].flatten(0, 1).float())  # [B * N, D]
            seen += len(images[:n - seen])
            if seen == n:
                break
    return torch.cat(out)


def patch_colour(images):
    """Each patch's mean (ImageNet-normalised) RGB, as a token: [B, 3, H, W] -> [B, 1 + N, 3] (row 0: a dummy CLS)."""
    rgb = F.avg_pool2d(images, 16).flatten(2).transpose(1, 2)  # [B, N, 3]
    return torch.cat([rgb[:, :1], rgb], 1)


def linear_r2(x, t):
    """R^2 of the best affine map from x [M, a] to t [M, b] (least squares): the share of t's variance, summed over
    its channels, that x explains linearly. 1: t is an affine function of x; about 0: unrelated."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1)  # [M, a + 1]: and a bias
    fit = x @ torch.linalg.lstsq(x, t).solution  # [M, b]
    return round(1 - ((t - fit).pow(2).sum() / (t - t.mean(0)).pow(2).sum()).item(), 3)


def student_encoder(path, args):
    """The encoder of a method checkpoint (or of random_init.pth) as finetune.py builds and loads it, in eval mode."""
    src = finetune.read_pretrained(path)
    ns = argparse.Namespace(arch=src["args"].get("arch", "vit"), model="vit_nano_patch16", input_size=args.input_size,
                            drop_path=0.0, finetune=path, rank=1)
    encoder = finetune.new_encoder(ns, src)
    finetune.load_encoder(encoder, src, ns)
    return encoder.eval()


# ---- 3. and 4. The method files and finetune.py, as a user runs them ---------------------------------
PYTHON = [sys.executable]  # how a script is started (the tests start it through their fork server)


def run(cmd, out_dir, log, label, env):
    """Run `python SCRIPT ...` with its output in out_dir/output.txt; print each epoch of its log.txt as it
    appears. Returns (seconds, [epoch records])."""
    os.makedirs(out_dir, exist_ok=True)
    t0, seen, logf = time.time(), 0, os.path.join(out_dir, "log.txt")
    with open(os.path.join(out_dir, "output.txt"), "w") as f:
        proc = subprocess.Popen(PYTHON + cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None or seen < len(_records(logf)):
                for r in _records(logf)[seen:]:
                    seen += 1
                    what = f"train loss {r['train_loss']:.4f}" + (f", val top-1 {r['acc1']:.1f}%" if "acc1" in r else "")
                    log(f"  {label} epoch {r['epoch'] + 1}: {what} ({time.time() - t0:.0f} s)")
                time.sleep(0.5)
        finally:  # interrupted (Ctrl-C): do not leave the script running; what it wrote is learn.py's
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            own(os.path.dirname(os.path.abspath(out_dir)), out_dir)
    if proc.returncode:
        tail = open(os.path.join(out_dir, "output.txt")).read()[-3000:]
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{tail}")
    return time.time() - t0, _records(logf)


def _records(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def recipe_flags(script, args, epochs=None):
    """The one scaled-recipe rule: the file's defaults, our epochs / batch, its paper's warmup fraction and peak lr."""
    d = importlib.import_module(script).get_args(["--data", "x"])
    epochs = epochs or args.epochs
    warmup = epochs * d.warmup_epochs / d.epochs
    total = d.batch_size * d.accum_iter * 8 if args.lr_rule == "paper" else args.batch_size  # the papers: 8 GPUs
    return ["--epochs", epochs, "--warmup_epochs", f"{warmup:.4g}", "--batch_size", args.batch_size,
            "--lr", f"{d.blr * total / 256:.6g}"]


def pretrain_flags(row, args, epochs=None):
    """A row's flags: the recipe rule, then the row's own."""
    script, extra = METHODS[row]
    return recipe_flags(script, args, epochs) + extra


def pretrain_command(script, flags, run_dir, args, data, teacher_path, epochs=None, seed=None):
    """`SCRIPT ...` as a user runs it: data, student and teacher, the recipe rule, then flags (a row's or an arm's).
    cae.py gets --teacher / --teacher_weights only with --target clip: it has no teacher network otherwise (and would
    refuse a weights file)."""
    uses_teacher = script != "cae" or ("--target", "clip") in zip(flags, flags[1:])
    teacher = ["--teacher", "tiny", "--teacher_weights", teacher_path] if uses_teacher else []
    return [str(c) for c in [f"{script}.py", "--data", data, "--model", "vit_nano_patch16", "--input_size",
                             args.input_size, *teacher, "--seed", args.seed if seed is None else seed, "--num_workers",
                             1, "--log_every", 10, *recipe_flags(script, args, epochs), *flags, "--output_dir", run_dir]]


def pretrain(row, run_dir, args, data, teacher_path, log, env, extra=(), epochs=None, seed=None, label=None):
    """`python <method file> ...` of a row, the recipe rule's flags; -> (seconds, log.txt records)."""
    script, label = METHODS[row][0], label or row
    cmd = pretrain_command(script, METHODS[row][1] + [str(e) for e in extra], run_dir, args, data, teacher_path, epochs,
                           seed)
    log(f"{label}: python {' '.join(cmd)}")
    return run(cmd, run_dir, log, label, env)


PROTOCOLS = {  # finetune.py --mode: (its epochs flag here, its lr flag here, warmup fraction of its paper's recipe)
    "linprobe": ("probe_epochs", "probe_lr", 10 / 90),  # MAE's linear probe: 10 of 90 epochs
    "attnprobe": ("probe_epochs", "attnprobe_lr", 10 / 90),  # CAE App. A: 10 of 90 epochs
    "finetune": ("finetune_epochs", "finetune_lr", 5 / 100)}  # MAE / BEiT fine-tuning: 5 of 100 epochs


def evaluate(mode, ckpt, out_dir, args, data, log, label, env, extra=()):
    """finetune.py --mode MODE on a checkpoint, the one laptop recipe of that protocol (the same for every row and arm):
    finetune.py's defaults (its paper recipe: optimiser, layer decay, drop path, augmentation, head), the probe's batch
    and crop scale, the protocol's epochs, its paper's warmup fraction and its paper's peak lr (--probe_lr,
    --attnprobe_lr, --finetune_lr), as the recipe rule keeps the pre-training papers' peak lrs; extra: more flags.
    -> (seconds, val top-1 (%) after the last epoch)."""
    epochs_flag, lr_flag, warmup = PROTOCOLS[mode]
    epochs = getattr(args, epochs_flag)
    cmd = ["finetune.py", "--mode", mode, "--data", data, "--finetune", ckpt, "--input_size", args.input_size,
           "--crop_min", args.probe_crop_min, *(["--pool", args.probe_pool] if mode == "linprobe" else []),
           "--epochs", epochs, "--warmup_epochs", f"{epochs * warmup:.4g}", "--batch_size", args.probe_batch,
           "--lr", getattr(args, lr_flag), "--seed", args.seed, "--num_workers", 1, *extra, "--output_dir", out_dir]
    secs, records = run([str(c) for c in cmd], out_dir, log, label, env)
    return secs, records[-1]["acc1"]


def linprobe(ckpt, out_dir, args, data, log, label, env):
    return evaluate("linprobe", ckpt, out_dir, args, data, log, label, env)


def finetune_top1(ckpt, out_dir, args, data, log, label, env):
    """The fine-tuning column (evaluate's finetune recipe), or None when --finetune_epochs is 0."""
    return evaluate("finetune", ckpt, out_dir, args, data, log, label, env)[1] if args.finetune_epochs else None


# ---- CAE Sec. 3, Fig. 4: are the regressor's predictions in the encoder's representation space? --------------
def load_cae(path):
    """A cae.py --target pixel checkpoint as the CAE module (encoder F, regressor H, decoder G), eval mode, CPU."""
    import cae
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ns = argparse.Namespace(**dict(ckpt["args"], device="cpu"))
    model = cae.build_model(ns)[0]
    model.load_state_dict(ckpt["model"])
    return model.eval(), ns


@torch.no_grad()
def cae_reconstruct(model, images):
    """CAE Sec. 3 (Fig. 4): all patches of the images through the encoder F, the latent contextual regressor
    skipped, the encoded patches straight into the decoder G (at their own positions) -> normalised pixels
    [B, N, 768]. With the alignment loss, G learnt to read F's space (the regressor's outputs are aligned to it)."""
    B, N = len(images), model.encoder.grid ** 2
    ids_all = torch.arange(N).expand(B, N)
    z = model.forward_encoder(images, ids_all)[:, 1:]  # [B, N, D], CLS dropped
    return model.forward_decoder(z, ids_all)


@torch.no_grad()
def cae_fig4_errors(path, args, data, n=256):
    """On the first n val images (finetune.py's val resize + centre crop): recon_mse, the mean squared error of
    cae_reconstruct against the normalised pixels (Sec. 3.1) of all patches; recon_mse_masked, the same on the
    patches that a block mask (CAE Sec. 2.2, drawn from --seed: the same masks for every run) hides; pretext_mse,
    the training path (F on the visible patches, H, G) on those masked patches: the pretext task's error."""
    import cae
    model, ns = load_cae(path)
    masks = cae.block_masking(ns)
    state = random.getstate()
    random.seed(args.seed)
    sums, count = torch.zeros(3, dtype=torch.float64), 0
    for images, _ in loaders(args, data)[2]:
        images = common.to_device(images[:n - count], "cpu")  # uint8 -> ImageNet-normalised, as in training
        mask = torch.stack([masks() for _ in range(len(images))])  # [B, N], True = hidden
        target = common.pixel_targets(images, 16)  # [B, N, 768]
        err = (cae_reconstruct(model, images) - target).pow(2).mean(-1)  # [B, N]
        ids_keep, ids_mask = common.ids_from_mask(mask, common.num_visible(mask.shape[1], ns.mask_ratio))
        pred = model.forward_decoder(model.forward_regressor(model.forward_encoder(images, ids_keep)[:, 1:], ids_keep,
                                                             ids_mask), ids_mask)
        hidden = mask.float()  # each image's mean over all its patches, over its masked ones, and the pretext error
        sums += torch.stack([err.mean(1).sum(), ((err * hidden).sum(1) / hidden.sum(1)).sum(),
                             (pred - common.gather(target, ids_mask)).pow(2).mean((1, 2)).sum()]).double()
        count += len(images)
        if count == n:
            break
    random.setstate(state)
    return dict(zip(["recon_mse", "recon_mse_masked", "pretext_mse"], (round(v, 4) for v in (sums / count).tolist())))


@torch.no_grad()
def fig4_picture(paths, args, data, path, n=10):
    """A Fig. 4-style sheet: one val image per class (columns); rows: the image, its normalised-pixel target (each
    patch standardised, as CAE's pixel target is: mean colour and contrast removed), and the encoder-to-decoder
    reconstruction of the lambda = 2 and lambda = 0 models, drawn in that same normalised space."""
    pa, _, val, classes = loaders(args, data)
    picked, seen = [], set()
    for images, labels in val:
        for x, y in zip(images, labels.tolist()):
            if y not in seen and len(picked) < n:
                seen.add(y), picked.append(x)
    images = common.to_device(torch.stack(picked), "cpu")
    p, g = 16, args.input_size // 16

    def unpatch(t):  # normalised patches [B, N, 768] -> displayable uint8 images [B, H, W, 3] (+-2.5 sd -> 0..255)
        t = t.view(len(t), g, g, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(len(t), g * p, g * p, 3)
        return ((t / 5 + 0.5).clamp(0, 1) * 255).byte()
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    rows = [("image", ((images * std + mean).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1)),
            ("target: normalised pixels", unpatch(common.pixel_targets(images, p)))]
    for label, ckpt in paths:
        rows.append((label, unpatch(cae_reconstruct(load_cae(ckpt)[0], images))))
    S, left, top = args.input_size, 190, 26
    sheet = Image.new("RGB", (left + len(picked) * (S + 4), top + len(rows) * (S + 4)), "white")
    d = ImageDraw.Draw(sheet)
    common.draw_text(d, (6, 6), "CAE Fig. 4 at laptop scale: all patches -> encoder -> decoder (regressor skipped), "
                     "val images")
    for r, (label, ims) in enumerate(rows):
        y = top + r * (S + 4)
        for k, line in enumerate(label.split("\n")):
            common.draw_text(d, (6, y + S // 2 - 8 + 12 * k), line)
        for c, im in enumerate(ims):
            sheet.paste(Image.fromarray(im.numpy()), (left + c * (S + 4), y))
    sheet.save(path)


def cae_fig4(args, data, log, env, cae_row=None):
    """Both arms (--align_weight 2 and 0), --fig4_seeds training seeds each, same recipe and length: one record per
    run, and the picture from the first seed's two models. cae_row: (seconds, log records) of this run's cae row,
    which is the lambda = 2 run of seed --seed when the lengths match (the same command: cae.py's default
    --align_weight is 2), so it is not trained twice."""
    records, paths, out = [], {}, os.path.abspath(args.out)
    for seed in range(args.seed, args.seed + args.fig4_seeds):
        for weight in (2, 0):
            if cae_row and (weight, seed) == (2, args.seed) and (args.fig4_epochs or args.epochs) == args.epochs:
                run_dir, (secs, rec) = os.path.join(out, "cae"), cae_row
                log(f"cae_fig4 lambda 2, seed {seed}: the cae row's run ({run_dir})")
            else:
                run_dir = os.path.join(out, f"cae_fig4_align{weight}_seed{seed}")
                secs, rec = pretrain("cae", run_dir, args, data, None, log, env, ["--align_weight", weight],
                                     args.fig4_epochs, seed, f"cae_fig4 lambda {weight}, seed {seed}")
            ckpt = os.path.join(run_dir, "checkpoint-last.pth")
            paths.setdefault(weight, ckpt)
            records.append(dict(method="cae_fig4", align_weight=weight, seed=seed, pretrain_s=secs,
                                final_pretrain_loss=rec[-1]["train_loss"], **cae_fig4_errors(ckpt, args, data)))
            log("cae_fig4 lambda {align_weight}, seed {seed}: recon MSE {recon_mse:.4f} (masked patches "
                "{recon_mse_masked:.4f}), pretext MSE {pretext_mse:.4f}".format(**records[-1]))
    picture = os.path.join(out, "cae_fig4.png")
    fig4_picture([("with alignment\n(lambda = 2)", paths[2]), ("without alignment\n(lambda = 0)", paths[0])], args, data,
                 picture)
    own(out, picture)
    if args.plot:
        with open(picture, "rb") as f, open(fig4_copy(args.plot), "xb") as copy:  # "x": never over a file
            shutil.copyfileobj(f, copy)
    print("\n| CAE Fig. 4 (seeds) | recon MSE, all patches | recon MSE, masked patches | pretext MSE |\n|---|---|---|---|")
    for weight in (2, 0):
        rs = [r for r in records if r["align_weight"] == weight]
        cell = lambda k: f"{np.mean([r[k] for r in rs]):.4f} (sd {np.std([r[k] for r in rs], ddof=1) if len(rs) > 1 else 0:.4f})"  # noqa: E731
        print(f"| lambda = {weight} ({len(rs)}) | {cell('recon_mse')} | {cell('recon_mse_masked')} | {cell('pretext_mse')} |")
    return records


# ---- The picture ------------------------------------------------------------------------------------
def plot(rows, curves, steps_per_epoch, path):
    """Left: each method's pre-training loss (log.txt epoch means) against optimiser steps, on its own scale.
    Right: probe top-1 of every row as bars."""
    font = ImageFont.load_default()
    colours = {"milan": (31, 119, 180), "cae": (255, 127, 14), "cae_v2": (44, 160, 44), "mr_mae": (214, 39, 40),
               "mask_align": (148, 103, 189), "teacher": (60, 60, 60), "random_init": (150, 150, 150),
               "pixels": (188, 189, 34), "mae_pixel": (140, 86, 75)}
    W, H, pw, ph = 1040, 470, 190, 160
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    common.draw_text(d, (10, 8), "pre-training loss (epoch mean) vs step")  # PIL's font: draw_text keeps the spaces
    for k, (method, losses) in enumerate(curves.items()):
        x0, y0 = 10 + (k % 3) * (pw + 15), 30 + (k // 3) * (ph + 45)
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(180, 180, 180))
        d.text((x0 + 4, y0 + 3), method, fill=colours.get(method, "black"), font=font)
        if losses:
            lo, hi = min(losses), max(losses)
            span = (hi - lo) or 1.0
            pts = [(x0 + 8 + (pw - 16) * (i + 1) / len(losses), y0 + 18 + (ph - 26) * (hi - v) / span)
                   for i, v in enumerate(losses)]
            d.line(pts, fill=colours.get(method, "black"), width=2) if len(pts) > 1 else None
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colours.get(method, "black"))
            common.draw_text(d, (x0 + 4, y0 + ph + 3), f"{hi:.3g} -> {losses[-1]:.3g}, {len(losses) * steps_per_epoch} steps")
    bx, by, bw = 640, 30, 260
    common.draw_text(d, (bx, 8), "linear probe top-1 (%) on val")
    for k, r in enumerate(rows):
        y = by + k * 40
        d.text((bx, y + 8), r["method"], fill="black", font=font)
        x1 = bx + 90
        d.rectangle([x1, y, x1 + bw, y + 26], outline=(220, 220, 220))
        d.rectangle([x1, y, x1 + bw * r["probe_top1"] / 100, y + 26], fill=colours.get(r["method"], "black"))
        d.text((x1 + bw + 6, y + 8), f"{r['probe_top1']:.1f}", fill="black", font=font)
    with open(path, "xb") as f:  # never over a file
        im.save(f, format="PNG")


def files_under(out, path):
    """The files under path (a file or a folder), relative to out."""
    if os.path.isfile(path):
        return [os.path.relpath(path, out)]
    return [os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(path) for f in fs]


def own(out, *paths):
    """Record in out's marker the files under paths as learn.py's: the only ones a later run may remove. A folder with
    no marker is not learn.py's --out (ablate.py's runs call run() too): nothing is recorded."""
    if os.path.isfile(os.path.join(out, MARKER)):
        with open(os.path.join(out, MARKER), "a") as f:
            f.writelines(name + "\n" for p in paths if os.path.exists(p) for name in files_under(out, p))


def prepare_out(path):
    """--out: a folder learn.py made (its marker file) is emptied of the files it recorded writing; a folder that
    holds any other file is refused (nothing removed), as is a non-empty folder it did not make."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {path} is a file; pass a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise UserError(f"--out {path} holds files learn.py did not write (it would empty the folder); pass a new or "
                        f"empty folder")
    if os.path.isdir(out) and os.listdir(out):  # every run starts fresh (the scripts refuse a folder in use)
        mine = set(open(os.path.join(out, MARKER)).read().splitlines())
        files = [f for f in files_under(out, out) if f != MARKER]
        other = sorted(f for f in files if f not in mine)
        if other:
            raise UserError(f"--out {path} holds files learn.py did not write ({', '.join(other[:3])}"
                            f"{' ...' if len(other) > 3 else ''}): it removes only its own; move them, or pass another --out")
        for f in files:
            os.remove(os.path.join(out, f))
        for d in sorted({os.path.dirname(f) for f in files} - {""}, key=len, reverse=True):  # deepest first
            if os.path.isdir(os.path.join(out, d)) and not os.listdir(os.path.join(out, d)):
                os.removedirs(os.path.join(out, d))  # and its parents as they empty (out keeps its marker)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "w").close()
    return out


def fig4_copy(plot_path):
    return os.path.splitext(plot_path)[0] + "_cae_fig4.png"


def check_new(args):
    """--json, --plot and the Fig. 4 picture beside --plot are new files: refused now, before the run, if one exists
    (learn.py never overwrites a file) or its folder does not."""
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--plot", args.cae_fig4 and args.plot and
                                                                       fig4_copy(args.plot))):
        problem = "exists; pass a new file name (learn.py never overwrites a file)" if path and os.path.exists(path) \
            else "its folder does not exist" if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))) else None
        if problem:
            raise UserError(f"{flag} {path}: {problem}")


def check_batches(args):
    """The train split must hold a --probe_batch, and each pre-training row's accum_iter batches of --batch_size (MILAN
    accumulates 2): else a script refuses, naming its own --batch_size or --accum_iter, after minutes of work."""
    train = args.classes * args.train_per_class
    accum = max(importlib.import_module(METHODS[m][0]).get_args(["--data", "x"]).accum_iter for m in args.methods)
    for flag, batch, need in (("--probe_batch", args.probe_batch, 1), ("--batch_size", args.batch_size, accum)):
        if train // batch < need:
            raise UserError(f"{flag} {batch}: the {train} train images (--classes x --train_per_class) hold "
                            f"{train // batch} batch(es) of it, the runs need {need}; lower {flag} or add images")


def main(argv=None):
    args = get_args(argv)
    check_new(args)
    check_batches(args)
    t_start = time.time()
    log = lambda s: print(f"[{time.time() - t_start:6.0f} s] {s}", flush=True)  # noqa: E731
    out = prepare_out(args.out)
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    data = make_dataset(os.path.join(out, "data"), args.seed, args.classes, args.train_per_class,
                        args.val_per_class, args.image_size)
    own(out, data)
    log(f"wrote {args.classes * (args.train_per_class + args.val_per_class)} JPEGs to {data}")
    rows, curves, runs, t0 = [], {}, {}, time.time()
    pixels = probe_features(args, data, lambda x: x.flatten(1), 3 * args.input_size ** 2)
    rows.append(dict(method="pixels", probe_top1=pixels, finetune_top1=None, pretrain_s=0.0, probe_s=time.time() - t0,
                     final_pretrain_loss=None, colour_r2=None, teacher_r2=None))
    log(f"pixels: linear probe top-1 {pixels:.1f}%")
    teacher_path, grid = os.path.join(out, "teacher.pth"), args.input_size // 16
    secs, loss = train_teacher(args, data, teacher_path, log)
    own(out, teacher_path)
    teacher = common.Teacher("tiny", teacher_path, grid=grid)
    t0 = time.time()
    pooled = (lambda t: t[:, 0]) if args.probe_pool == "cls" else (lambda t: t[:, 1:].mean(1))  # as finetune.py --pool
    top1 = probe_features(args, data, lambda x: pooled(teacher(x)["tokens"]), teacher.dim)
    colour, teacher_t = (val_patches(f, args, data) for f in (patch_colour, lambda x: teacher(x)["tokens"]))

    def diagnostics(tokens_of):  # how much of a student's patch tokens is the patch's colour; of the teacher's, it predicts
        t = val_patches(tokens_of, args, data)
        return dict(colour_r2=linear_r2(colour, t), teacher_r2=linear_r2(t, teacher_t))
    rows.append(dict(method="teacher", probe_top1=top1, finetune_top1=None, pretrain_s=secs, probe_s=time.time() - t0,
                     final_pretrain_loss=loss, colour_r2=linear_r2(colour, teacher_t), teacher_r2=None))
    log(f"teacher: trained in {secs:.0f} s, linear probe top-1 {top1:.1f}%, colour R^2 {rows[-1]['colour_r2']:.2f}")
    torch.manual_seed(args.seed)  # the random student, as common.setup seeds before a method builds it
    random_path = os.path.join(out, "random_init.pth")
    torch.save(common.build_vit("vit_nano_patch16", args.input_size).state_dict(), random_path)
    own(out, random_path)
    secs, top1 = linprobe(random_path, os.path.join(out, "probe_random_init"), args, data, log, "random_init probe", env)
    ft = finetune_top1(random_path, os.path.join(out, "finetune_random_init"), args, data, log, "random_init finetune", env)
    rows.append(dict(method="random_init", probe_top1=top1, finetune_top1=ft, pretrain_s=0.0, probe_s=secs,
                     final_pretrain_loss=None, **diagnostics(student_encoder(random_path, args))))
    log(f"random_init: linear probe top-1 {top1:.1f}%, colour R^2 {rows[-1]['colour_r2']:.2f}, teacher R^2 "
        f"{rows[-1]['teacher_r2']:.2f}" + (f", fine-tuned top-1 {ft:.1f}%" if ft is not None else ""))
    for method in args.methods:
        run_dir = os.path.join(out, method)
        secs, records = runs[method] = pretrain(method, run_dir, args, data, teacher_path, log, env)
        curves[method] = [r["train_loss"] for r in records]
        ckpt = os.path.join(run_dir, "checkpoint-last.pth")
        p_secs, top1 = linprobe(ckpt, os.path.join(out, f"probe_{method}"), args, data, log, f"{method} probe", env)
        ft = finetune_top1(ckpt, os.path.join(out, f"finetune_{method}"), args, data, log, f"{method} finetune", env)
        rows.append(dict(method=method, probe_top1=top1, finetune_top1=ft, pretrain_s=secs, probe_s=p_secs,
                         final_pretrain_loss=curves[method][-1], **diagnostics(student_encoder(ckpt, args))))
        log(f"{method}: pre-trained in {secs:.0f} s, final loss {curves[method][-1]:.4f}, linear probe top-1 {top1:.1f}%, "
            f"colour R^2 {rows[-1]['colour_r2']:.2f}, teacher R^2 {rows[-1]['teacher_r2']:.2f}"
            + (f", fine-tuned top-1 {ft:.1f}%" if ft is not None else ""))
    print("\n| method | probe top-1 (%) | fine-tuned top-1 (%) | pre-train s | probe s | final pre-train loss | colour R^2 "
          "| teacher R^2 |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        loss = "" if r["final_pretrain_loss"] is None else f"{r['final_pretrain_loss']:.4f}"
        r2 = " | ".join("" if r[k] is None else f"{r[k]:.2f}" for k in ("colour_r2", "teacher_r2"))
        ft = "" if r["finetune_top1"] is None else f"{r['finetune_top1']:.1f}"
        print(f"| {r['method']} | {r['probe_top1']:.1f} | {ft} | {r['pretrain_s']:.0f} | {r['probe_s']:.0f} | {loss} | {r2} |")
    fig4 = cae_fig4(args, data, log, env, runs.get("cae")) if args.cae_fig4 else []
    print(f"total {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "x") as f:  # never over a file
            json.dump(rows + fig4, f, indent=1)
    if args.plot:
        steps = args.classes * args.train_per_class // args.batch_size
        plot(rows, curves, steps, args.plot)
    own(out, *[p for p in (args.json, args.plot, args.cae_fig4 and args.plot and fig4_copy(args.plot))
               if p and os.path.abspath(p).startswith(out + os.sep)])  # (inside --out: learn.py's too)
    return rows + fig4


if __name__ == "__main__":
    common.cli(main)
