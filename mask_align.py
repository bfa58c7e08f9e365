"""MaskAlign: Stare at What You See: Masked Image Modeling without Reconstruction.
Hongwei Xue, Peng Gao, Hongyang Li, Yu Qiao, Hao Sun, Houqiang Li, Jiebo Luo, CVPR 2023. arXiv:2211.08887.

Implemented: a ViT student on CLS + the visible patches only (Sec. 3.1), attentive masking from the teacher's
class-token attention (Sec. 3.2), Dynamic Alignment of every student block to the teacher's last K levels
(Sec. 3.3, Eq. 1), LayerNorm-normalised multi-level targets (Eq. 2) and the smooth-L1 loss (Eq. 3), with no
decoder and no reconstruction of masked patches, trained with the Sec. 4.1 recipe.

Computed in common.py: the teacher's levels y_j of Eq. 2 and its CLS attention (common.Teacher, hidden=True,
cls_attn=True); the student's levels x_i (common.ViT, return_hidden=True); uniform masking (common.random_masking).

Deviations from the released code (github.com/OpenDriveLab/maskalign @4cb577f), one line each:
- Eq. 1 as written, an adaptor per student block then the mix; released: mixes raw blocks, then a head per teacher level.
- the matrix is S x K, init 0.01 + 1 where relative depths match; released: S x S, I + 0.01, IndexError when S != T.
- the loss is Eq. 3 (1/2 d^2, |d| - 1/2) averaged over the K levels; the released code computes exactly 2x Eq. 3.
- --no-align_cls drops CLS from the loss (Tables 3-5); released: CLS always aligned (Table 6 row 1, our default).
- --align layerwise pairs blocks by relative depth at any depths; released 'simple' pairs block i with level i (S = T only).
- the teacher is open_clip's CLIP, outside DDP and checkpoints; released: HF CLIPVisionModel inside DDP, saved every epoch.
- the student's final LN (never reached by a gradient) is frozen at init; released: trainable, DDP find_unused_parameters.
- cls_token gets no weight decay (common.param_groups); the released code decays it.
- ids_keep is sorted ascending; released: sampling order (same result: positions are added before the gather).
- --target_norm bn is per-channel BatchNorm statistics (Table 6: "BatchNorm" without affine); released 'bn': one scalar.
Kept as released, where the paper is silent: CLS attention of the last teacher block, head mean, drawn without
replacement; levels are block outputs 1..S and 1..T (no embedding level); LN eps 1e-5, no affine; xavier adaptors.

Paper ViT-B/16 run (Sec. 4.1: batch 128 x accum 1 x 8 GPUs = 1024, lr = 1.5e-4 x 1024 / 256 = 6e-4; the
defaults assume 8 GPUs: with fewer, raise --accum_iter to keep the batch of 1024):
  torchrun --nproc_per_node=8 mask_align.py --data /imagenet --teacher_weights /path/to/ViT-B-16.pt
(ViT-L/16: --model vit_large_patch16, drop path 0.2 by default; Table 5's CLIP-L196 teacher: --teacher ViT-L-14.)
Smoke run, no downloads: python mask_align.py --data fake --model vit_nano_patch16 --teacher tiny
  --teacher_weights none --epochs 1 --warmup_epochs 0 --batch_size 32 --output_dir OUT
"""
import argparse
from contextlib import nullcontext

import common  # first: a Ctrl-C or SIGTERM during the slow imports is then one line (common.py's top)
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


# ---- Arguments: Sec. 4.1 recipe as defaults ----------------------------------------------------------------
def get_args(argv=None):
    p = common.get_parser("MaskAlign pre-training (arXiv:2211.08887). Defaults: the Sec. 4.1 recipe (ViT-B/16, "
                          "CLIP-B/16 teacher, mask ratio 0.7 of Table 4, top-5 Dynamic Alignment of Table 3) for "
                          "8 GPUs: batch 128 per GPU x accum 1 x 8 = 1024; with fewer GPUs raise --accum_iter.", helps={
        "--drop_path": "stochastic depth of the last block (default: 0.1; 0.2 for vit_large_patch16, Sec. 4.1 + "
                       "released README)",
        "--mask_ratio": "fraction of patches hidden from the student, in [0, 1): Table 4 (0 = the student sees all "
                        "196 patches, Table 4's first row)"}, ratios="[0, 1)")
    # MaskAlign Sec. 4.1: AdamW (0.9, 0.95), base lr 1.5e-4, wd 0.05, batch 1024 (released README: 128 per GPU x 8),
    # cosine with 10% warmup (20 of 200 epochs, README), min lr 1e-5 (README), drop path 0.1 (0.2 for ViT-L, README),
    # RandomResizedCrop + flip (MAE's crop scale (0.2, 1)); Table 4: mask ratio 0.7; CLIP ViT-B/16 teacher.
    p.set_defaults(batch_size=128, accum_iter=1, blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, epochs=200,
                   warmup_epochs=20, min_lr=1e-5, crop_min=0.2, mask_ratio=0.7, teacher="ViT-B-16", drop_path=None)
    p.add_argument("--mask_type", choices=["attention", "random"], default="attention",
                   help="Sec. 3.2 attentive masking, or MAE's uniform random masking (Table 4, last row)")
    p.add_argument("--align", choices=["dynamic", "layerwise"], default="dynamic",
                   help="Sec. 3.3 Dynamic Alignment (Eq. 1), or Layer-wise: each target level from the student "
                        "block at the same relative depth, no matrix (Table 3)")
    p.add_argument("--top_k", type=common.COUNT, help="align with the teacher's last K levels, at most its depth; default: "
                   "5 (Table 3), or the teacher's depth if smaller (tiny: 2)")
    p.add_argument("--align_cls", action=argparse.BooleanOptionalAction, default=True,
                   help="put the CLS token in the loss (Table 6 best row); --no-align_cls is Tables 3-5's setting")
    p.add_argument("--adaptor", choices=["linear", "mlp"], default="linear", help="Table 6: a Linear adaptor per "
                   "student block, or a 2-layer MLP of hidden width D (GELU, as the released 'mlp' head)")
    p.add_argument("--target_norm", choices=["ln", "bn", "none"], default="ln", help="Table 6 / Eq. 2: normalise "
                   "each target level by LayerNorm per token, BatchNorm per channel (both without affine), or not")
    args = p.parse_args(argv)
    if args.drop_path is None:  # Sec. 4.1: 0.1; released README: 0.2 for ViT-L
        args.drop_path = 0.2 if args.model == "vit_large_patch16" else 0.1
    return args


# ---- Sampler: attentive masking (Sec. 3.2) -----------------------------------------------------------------
def attentive_masking(cls_attn, n_keep):
    """MaskAlign Sec. 3.2: feed the tokens covering important regions to the student "with high probabilities".
    As released: n_keep draws without replacement, p(i) ~ the teacher's last-block CLS attention on patch i
    (head mean, not renormalised; multinomial normalises), not top-k. cls_attn [B, N] -> mask [B, N].
    n_keep = N (mask ratio 0, Table 4's first row): every patch is kept, nothing is drawn."""
    if n_keep == cls_attn.shape[1]:
        return torch.zeros(cls_attn.shape, dtype=torch.bool, device=cls_attn.device)
    ids_keep = torch.multinomial(cls_attn.float(), n_keep, replacement=False)  # [B, n_keep]
    return common.mask_from_ids(ids_keep, cls_attn.shape[1])


# ---- Model: student ViT + Dynamic Alignment (Sec. 3.1, 3.3, Eq. 1) -----------------------------------------
def paired_blocks(student_depth, teacher_depth, num_levels):
    """The student block at the same relative depth as each aligned teacher level (our rule; the paper gives
    none): teacher block t of T (1-based, t = T-K+1 .. T) pairs with student block s = ceil(t S / T), the
    shallowest block with s/S >= t/T. S = T gives s = t; the last level always pairs with the last block.
    Returns the 0-based student block of each of the K levels."""
    T, S = teacher_depth, student_depth
    return [-(-t * S // T) - 1 for t in range(T - num_levels + 1, T + 1)]


class MaskAlign(nn.Module):
    """Student encoder (a common.ViT, attribute `encoder`) and the Dynamic Alignment module. No decoder: the
    loss is on the student's own CLS + visible tokens. The DA module is dropped after pre-training (Sec. 3.3)."""
    def __init__(self, encoder, teacher_depth, teacher_width, top_k=5, align="dynamic", adaptor="linear"):
        super().__init__()
        self.encoder, self.align, S, D = encoder, align, len(encoder.blocks), encoder.embed_dim
        self.num_levels = K = min(top_k, teacher_depth)  # Table 3: top K = 5 levels of the teacher
        self.pairs = paired_blocks(S, teacher_depth, K)  # student block of each target level
        # Eq. 1: one adaptor A_i = Linear(D -> W) per student block; layerwise: one per aligned (block, level) pair;
        # Table 6's MLP adaptor: Linear(D -> D), GELU, Linear(D -> W): hidden width D (Table 6 text), GELU as released
        make = (lambda: nn.Linear(D, teacher_width)) if adaptor == "linear" else \
            (lambda: nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, teacher_width)))
        self.adaptors = nn.ModuleList(make() for _ in range(S if align == "dynamic" else K))
        for m in self.adaptors.modules():  # MAE init, as the released heads
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        if align == "dynamic":  # Eq. 1's S x T matrix w, minus the T - K columns no loss reads; no weight decay
            w = torch.full((S, K), 0.01)  # our init (the paper gives none): near Layer-wise, every block reachable
            w[self.pairs, torch.arange(K)] += 1.0
            self.align_matrix = nn.Parameter(w)
        # The levels are taken before the final LN, so it gets no gradient: freeze it at its init (LN = identity
        # affine) so that DDP needs no find_unused_parameters and fine-tuning finds the released values.
        self.encoder.norm.requires_grad_(False)

    def forward_encoder(self, images, ids_keep):
        """Sec. 3.1: the student sees CLS + the visible patches only. Returns the S levels x_1 .. x_S: the
        residual stream after each block (no final norm), each [B, 1+n, D]."""
        return self.encoder(images, ids_keep, return_hidden=True)[1]

    def dynamic_alignment(self, levels):
        """MaskAlign Eq. 1: yhat_j = sum_i w_ij A_i(x_i), i over the S student blocks, j over the K aligned
        teacher levels. levels: S x [B, 1+n, D] -> yhat [K, B, 1+n, W]. Layerwise: yhat_j = A_j(x_pair(j))."""
        if self.align == "layerwise":
            return torch.stack([a(levels[i]) for a, i in zip(self.adaptors, self.pairs)])  # [K, B, 1+n, W]
        adapted = torch.stack([a(x) for a, x in zip(self.adaptors, levels)])  # A_i(x_i): [S, B, 1+n, W]
        return torch.einsum("sk,sbnw->kbnw", self.align_matrix, adapted)  # [K, B, 1+n, W]

    def forward(self, images, ids_keep, target, align_cls=True):
        pred = self.dynamic_alignment(self.forward_encoder(images, ids_keep))
        return mask_align_loss(pred, target, align_cls), pred


# ---- Loss: Eq. 2 and Eq. 3 (Sec. 3.3) ----------------------------------------------------------------------
def alignment_targets(hidden, ids_keep, num_levels, norm="ln"):
    """MaskAlign Eq. 2: ytilde_j = Normalize(y_j) for the teacher's last K levels (block outputs of the intact
    image: no ln_post, no proj), Normalize = LayerNorm per token without scale and bias (Table 6; eps 1e-5 as
    released), at the student's CLS + visible positions. Per-token LN commutes with taking positions, so the
    positions are taken first. Table 6's other rows: norm "bn" = BatchNorm without affine (per channel, over
    the batch and all 1+N tokens of the intact image, eps 1e-5), "none" = the raw levels.
    hidden: T x [B, 1+N, W], ids_keep [B, n] -> [K, B, 1+n, W] float32."""
    levels = hidden[-num_levels:]
    if norm == "bn":  # batch statistics per channel: taken before the positions, over [B, 1+N] (Table 6)
        levels = [F.batch_norm(h.float().flatten(0, 1), None, None, training=True).view(h.shape) for h in levels]
    ids = torch.cat([ids_keep.new_zeros(len(ids_keep), 1), ids_keep + 1], 1)  # [B, 1+n]: CLS row + visible rows
    y = torch.stack([common.gather(h, ids) for h in levels]).float()  # [K, B, 1+n, W]
    return F.layer_norm(y, y.shape[-1:], eps=1e-5) if norm == "ln" else y  # Eq. 2, no affine


def mask_align_loss(pred, target, align_cls=True, per_patch=False):
    """MaskAlign Eq. 3: L = 1/2 (yhat - ytilde)^2 where |yhat - ytilde| <= 1, |yhat - ytilde| - 1/2 elsewhere
    (smooth L1, beta 1), averaged over the W channels and the tokens, then over the K levels (all levels have
    the same shape, so one mean). pred, target [K, B, 1+n, W], CLS at position 0; align_cls=False leaves it out.
    per_patch: the [B, 1+n] terms of each token (mean over K and W), CLS in column 0."""
    d = F.smooth_l1_loss(pred.float(), target.float(), beta=1.0, reduction="none")  # [K, B, 1+n, W]
    if per_patch:
        return d.mean((0, 3))
    return (d if align_cls else d[:, :, 1:]).mean()


# ---- Training: forward_step, train_one_epoch, main ---------------------------------------------------------
def build_transform(args):
    return common.pretrain_transform(args)  # RandomResizedCrop + flip (Sec. 4.1)


def build_model(args):
    """-> (model, teacher): the trained student (encoder + DA module) and the frozen teacher."""
    encoder = common.build_vit(args.model, args.input_size, drop_path=args.drop_path)
    teacher = common.Teacher(args.teacher, args.teacher_weights, encoder.grid).to(args.device)
    if (args.top_k or 0) > teacher.depth:
        raise common.UserError(f"--top_k {args.top_k}: --teacher {args.teacher} has {teacher.depth} levels (blocks) to "
                               f"align with; pass at most {teacher.depth}")
    args.top_k = args.top_k or min(5, teacher.depth)  # Table 3: K = 5 (the tiny teacher has 2); saved as used
    model = MaskAlign(encoder, teacher.depth, teacher.width, args.top_k, args.align, args.adaptor)
    return model.to(args.device), teacher


def forward_step(model, teacher, batch, args, per_patch=False):
    """One training forward on a batch of images (on the device). Returns the loss, the mask [B, N] (True = hidden),
    the teacher's CLS attention and, only when asked (per_patch: pictures, benchmarks), the per-patch loss [B, N]
    (0 on masked patches: they are not in the loss)."""
    images, N = batch, teacher.grid ** 2
    n_keep = common.num_visible(N, args.mask_ratio, allow_zero=True)  # floor(196 x 0.3) = 58 at r = 0.7; 196 at r = 0
    # one teacher pass on the intact image, no autograd: the K target levels (Eq. 2) and the CLS attention
    out = teacher(images, tokens=False, hidden=True, cls_attn=args.mask_type == "attention")
    if args.mask_type == "attention":
        mask = attentive_masking(out["cls_attn"], n_keep)
    else:
        mask = common.random_masking(len(images), N, n_keep, images.device)
    ids_keep, _ = common.ids_from_mask(mask, n_keep)  # [B, 58], ascending
    K = args.top_k or min(5, teacher.depth)  # (unset: build_model's K, for a caller that did not build through it)
    target = alignment_targets(out["hidden"], ids_keep, K, args.target_norm)  # [K, B, 59, W]
    loss, pred = model(images, ids_keep, target, args.align_cls)
    patch_loss = None
    if per_patch:
        terms = mask_align_loss(pred.detach(), target, per_patch=True)[:, 1:]  # [B, 58], the visible patches
        patch_loss = terms.new_zeros(mask.shape).scatter_(1, ids_keep, terms)  # [B, N]
    return {"loss": loss, "mask": mask, "patch_loss": patch_loss, "cls_attn": out.get("cls_attn")}


def train_one_epoch(model, teacher, loader, optimizer, scaler, epoch, args, ckpt):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    meter = common.Meter(loader, epoch, args, ckpt)  # a resumed epoch goes on from its checkpoint
    for step, (images, _) in meter:  # step counts from the resume point
        if step % args.accum_iter == 0:  # per-iteration schedule (MAE)
            lr = common.lr_at(epoch + step / meter.steps, args)
            common.set_lr(optimizer, lr)
        images = common.to_device(images, args.device)  # uint8 -> normalised float, on the device
        update = (step + 1) % args.accum_iter == 0
        with model.no_sync() if args.world_size > 1 and not update else nullcontext():
            with common.autocast(args):
                loss = forward_step(model, teacher, images, args)["loss"]
            scaler.scale(loss / args.accum_iter).backward()
        meter.update(step, loss, lr, len(images))
        if update:
            common.optimizer_step(model, optimizer, scaler, args)  # clip to --clip_grad, step, zero grads
            ckpt.step_done(epoch, step + 1, meter)  # mid-epoch checkpoint when due (minutes or steps)
    return meter.stats(epoch, lr)


def main(argv=None):
    args = get_args(argv)
    common.setup(args, allow_zero_mask=True)  # Table 4: ratio 0 is a valid MaskAlign run
    dataset = common.build_dataset(args, build_transform(args))
    model, teacher = build_model(args)
    if args.visualize:
        return common.visualize(args, dataset, model, teacher, forward_step, "mask_align")
    loader = common.build_loader(dataset, args)
    optimizer = common.build_optimizer(model, args, no_decay=("align_matrix",))  # released: no decay on w
    ckpt = common.Checkpointer(args, "mask_align", model, optimizer)  # exact resume: model, optimizer, RNGs, position
    start_epoch, start_step = ckpt.resume()  # --resume (auto: OUTPUT_DIR's last); another run's folder is refused
    common.announce(args, "mask_align", dataset, loader.sampler.steps, start_epoch,
                    f"teacher {args.teacher} ({args.teacher_weights}), its last {args.top_k} levels (--top_k)")
    teacher.prepare(args)  # frozen, outside DDP; on a GPU in the autocast dtype
    student = DDP(model) if args.world_size > 1 else model  # the trained student only
    student = torch.compile(student) if args.compile else student
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        stats = train_one_epoch(student, teacher, loader, optimizer, ckpt.scaler, epoch, args, ckpt)
        ckpt.epoch_done(epoch)  # checkpoint-last.pth; checkpoint-<epoch>.pth every --save_freq epochs
        common.log_epoch(args, stats)  # a JSON line in OUTPUT_DIR/log.txt


if __name__ == "__main__":
    common.cli(main)
