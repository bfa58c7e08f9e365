"""CAE v2: Context Autoencoder with CLIP Latent Alignment.
Xinyu Zhang, Jiahui Chen, Junkun Yuan, Qiang Chen, Jian Wang, Xiaodi Wang, Shumin Han, Xiaokang Chen, Jimin Pi,
Kun Yao, Junyu Han, Errui Ding, Jingdong Wang, 2022 (TMLR 2023). arXiv:2211.09799.

Implemented: random block-wise masking with a mask ratio that grows with the model size (Sec. 2.3, 3.2), the
encoder F on the visible patches, CAE's latent contextual regressor H (CAE v2 reuses it, Sec. 2.2; this file
holds its own copy, so it runs with only common.py beside it) with no final LN and no decoder, one FC -> LN
head shared by the encoder (visible) and regressor (masked) outputs (App. B.1), CLIP latents of the intact
image as the targets of both (Sec. 2.3), and the loss l_v + l_z of Eq. 2 (cosine distance, two separate
means), trained with the Table 8 recipe. Ablation switches: Tables 1-5 (README); --loss mse / smooth_l1 swap
the distance of both l_v and l_z (Table 3, Sec. 3.2). These two, unlike the cosine, see the target's scale: they
compare the head's output with the CLIP latent normalised per token (LayerNorm without affine, as MaskAlign's Eq. 2
normalises its targets), the scale the head's own LN gives; smooth-l1 with beta 1, one standard deviation of a
normalised target channel (PyTorch's default, MaskAlign's Eq. 3). The paper names neither choice.

Computed in common.py: block-wise masking (common.BlockMaskGenerator), uniform masking for --mask_type random
(common.random_masking); the CLIP latents Zbar of Sec. 2.3 (common.Teacher).

Deviations from the released code (github.com/Atten4Vis/CAE @a7fd162, --model_type caev2), one line each:
- the head is FC then LN as App. B.1 writes; the released code applies LN then FC.
- the loss is Eq. 2: a mean over the visible and a mean over the masked patches; the released code takes one
  mean of (1 - cos) over CLS + visible + masked tokens.
- CLIP sees the student's view re-normalised to CLIP statistics (common.Teacher), in fp32 / bf16; the released code
  builds the same crop a second time and runs CLIP in fp16.
- ViT-S has 6 heads (the paper: standard configs, only ViT-T changes); the released code registers 12.
- the regressor uses the encoder's head count; the released code uses 12 heads at every size.
- cls_token and mask_token get no weight decay; the released code decays them.
- sin-cos positions put the column in the first half of the channels (MAE); the released code puts the row first.
- ViT-L (mask ratio 0.6, regressor 4 x 1024, drop path 0.2, CLIP-L/14 at 196 px) follows the paper; no released script.
- AdamW betas (0.9, 0.98) as Table 8 writes; the released scripts pass no --opt_betas, so they run (0.9, 0.999).
- --loss mse / smooth_l1 (Table 3) have no released code; the released loss is the cosine only.
Kept as released, where the paper is silent: colour jitter on the whole image before the crop and flip (its contrast
blends towards the whole image's mean); patch projection, CLS and mask tokens drawn from a normal of std 0.02 cut at
+-0.02, projection bias 0, xavier linears.

Paper ViT-B/16 run (Table 8: batch 2048 = 256 x 8 GPUs, lr 1.5e-3 = blr 1.875e-4 x 2048 / 256, 300 epochs; the
defaults assume 8 GPUs: with fewer, raise --accum_iter to keep 2048):
  torchrun --nproc_per_node=8 cae_v2.py --data /imagenet --teacher_weights /path/to/ViT-B-16.pt
(ViT-T / ViT-S: --model vit_tiny_patch16 / vit_small_patch16; ViT-L: --model vit_large_patch16 --teacher ViT-L-14
--teacher_weights /path/to/ViT-L-14.pt.)
Smoke run, no downloads: python cae_v2.py --data fake --model vit_nano_patch16 --teacher tiny
  --teacher_weights none --epochs 1 --warmup_epochs 0 --batch_size 32 --output_dir OUT
"""
import argparse
from collections import OrderedDict
from contextlib import nullcontext

import common  # first: a Ctrl-C or SIGTERM during the slow imports is then one line (common.py's top)
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2


# ---- Arguments: Table 8 recipe as defaults -----------------------------------------------------------------
# CAE v2 by model size: mask ratio (Sec. 3.2, Table 8), regressor depth and width (App. B.1), drop path (Table 8).
# Other sizes (the nano test size, ViT-H): ratio 0.5, one regressor block at the encoder width (our choice).
SIZES = {"vit_tiny_patch16": (0.15, 1, 96, 0.1), "vit_small_patch16": (0.25, 1, 384, 0.1),
         "vit_base_patch16": (0.5, 4, 768, 0.1), "vit_large_patch16": (0.6, 4, 1024, 0.2)}


def get_args(argv=None):
    p = common.get_parser("CAE v2 pre-training (arXiv:2211.09799). Defaults: the Table 8 recipe (ViT-B/16, CLIP-B/16 "
                          "targets, 300 epochs; mask ratio, drop path and regressor by model size, Sec. 3.2, App. B.1) "
                          "for 8 GPUs: batch 256 per GPU x accum 1 x 8 = 2048; with fewer GPUs raise --accum_iter.", helps={
        "--mask_ratio": "fraction of patches hidden from the encoder, in (0, 1); default by model size: 0.15/0.25/0.5/"
                        "0.6 for vit_tiny/small/base/large_patch16 (Sec. 3.2, Table 8), 0.5 otherwise",
        "--drop_path": "stochastic depth of the last block; default by model size: 0.1/0.1/0.1/0.2 for T/S/B/L "
                       "(Table 8), 0.1 otherwise"})
    # CAE v2 Table 8: AdamW (0.9, 0.98), batch 2048, peak lr 1.5e-3 (blr 1.875e-4 x 2048 / 256), min lr 1e-5,
    # cosine, 300 epochs with 10 of warmup, grad clip 3.0, wd 0.05, crop scale (0.4, 1) + flip, colour jitter 0.4.
    # Mask ratio, drop path and the regressor follow the model size (SIZES) unless given.
    p.set_defaults(batch_size=256, accum_iter=1, blr=1.875e-4, betas=(0.9, 0.98), weight_decay=0.05, epochs=300,
                   warmup_epochs=10, min_lr=1e-5, clip_grad=3.0, crop_min=0.4, drop_path=None, mask_ratio=None,
                   teacher="ViT-B-16")
    p.add_argument("--color_jitter", type=common.NONNEG, default=0.4, help="brightness/contrast/saturation jitter of the whole "
                   "image before the crop (Table 8; order as released)")
    p.add_argument("--mask_type", choices=["block", "random"], default="block", help="Sec. 2.3 random block-wise "
                   "masking, or MAE's uniform random masking of as many patches (Table 5)")
    p.add_argument("--visible_align", action=argparse.BooleanOptionalAction, default=True, help="Eq. 2's visible "
                   "latent alignment l_v; --no-visible_align trains with l_z alone (Table 1 No. 2, Table 2)")
    p.add_argument("--loss", choices=["cosine", "mse", "smooth_l1"], default="cosine", help="the distance of both l_v "
                   "and l_z: Eq. 2's cosine distance, or MSE / smooth-l1 (beta 1) to the per-token normalised latent "
                   "(Table 3)")
    p.add_argument("--layer_scale", type=common.NONNEG, default=0.1, help="encoder layer scale init, 0: no LayerScale "
                   "(released scripts: 0.1, all sizes)")
    p.add_argument("--regressor_depth", type=common.SIZE, help="blocks of H; default: 1/1/4/4 for T/S/B/L (App. B.1), 1 "
                   "otherwise; 0: no regressor, l_v alone (Table 4's 0 layers = Table 2's l_v-only row, Sec. 3.2)")
    p.add_argument("--regressor_dim", type=common.COUNT, help="width of H; default: 96/384/768/1024 for T/S/B/L (App. B.1), "
                   "the encoder width otherwise; FC + LN maps the encoder output to it when they differ")
    args = p.parse_args(argv)
    ratio, depth, dim, dpr = SIZES.get(args.model, (0.5, 1, common.VIT_CONFIGS.get(args.model, (0, 0))[1], 0.1))
    args.mask_ratio = ratio if args.mask_ratio is None else args.mask_ratio
    args.drop_path = dpr if args.drop_path is None else args.drop_path
    args.regressor_depth = depth if args.regressor_depth is None else args.regressor_depth
    args.regressor_dim = args.regressor_dim or dim
    # Sec. 3.1: ViT-T with 12 heads (VIT_CONFIGS: 3); in args, so the checkpoints tell finetune.py and the export
    args.num_heads = 12 if args.model == "vit_tiny_patch16" else common.VIT_CONFIGS.get(args.model, (0, 0, 0, None))[3]
    if args.regressor_depth and args.num_heads:  # the regressor has the encoder's heads
        common.check_width(args.regressor_dim, args.num_heads, f"--regressor_dim {args.regressor_dim} with the "
                           f"encoder's {args.num_heads} heads")
    if args.regressor_depth == 0 and not args.visible_align:
        raise common.UserError("--regressor_depth 0 --no-visible_align leaves no loss; drop one of the two")
    return args


# ---- Sampler: random block-wise masking, ratio by model size (Sec. 2.3, 3.2) -------------------------------
def block_masking(args):
    """CAE v2 Sec. 2.3: BEiT's random block-wise masking with a ratio that grows with the model size:
    15/25/50/60% for T/S/B/L -> 30/49/98/118 of the 196 patches (the encoder keeps floor(N (1 - r))).
    Runs in the DataLoader workers; returns the callable -> bool [N], True = masked. --mask_type random: MAE's
    uniform masking of the same count (Table 5)."""
    grid = args.input_size // common.VIT_CONFIGS[args.model][0]
    n_keep = common.num_visible(grid * grid, args.mask_ratio)
    if args.mask_type == "random":
        return lambda: common.random_masking(1, grid * grid, n_keep)[0]
    return common.BlockMaskGenerator(grid, grid * grid - n_keep)


# ---- Model: encoder F, latent contextual regressor H, shared head (Sec. 2.2, App. B.1) ---------------------
# H is CAE's latent contextual regressor (CAE arXiv:2202.03026 Sec. 2.1), which CAE v2 Sec. 2.2 reuses minus its
# final LN. It mirrors cae.py's classes line for line (same parameter names, so weights move between them); this
# file keeps its own copy so that cae_v2.py runs with only common.py beside it.
class CrossAttention(nn.Module):
    """Multi-head attention, queries from one set, keys/values from another: q [B, M, R], k and v [B, L, R] ->
    [B, M, R]; softmax(q W_q (k W_k)^T / sqrt(d_h)) v W_v per head, then W_o. No key bias (softmax-invariant)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q, k, v):
        B, M, C = q.shape
        heads = lambda t: t.view(B, -1, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, H, L, d_h]
        out = F.scaled_dot_product_attention(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)))  # [B, H, M, d_h]
        return self.proj(out.transpose(1, 2).reshape(B, M, C))


class RegressorBlock(nn.Module):
    """One block of H (CAE Sec. 2.1, CAE v2 Sec. 2.2): X <- X + g1 * CA(q = LN_q(X + P_m), k = LN_k([Z_v; X] +
    [P_v; P_m]), v = LN_v([Z_v; X])), X <- LN2(X), X <- X + g2 * MLP(X). Positions in q and k only; Z_v is read
    in every block, never written. Uses common.LayerScale, common.Mlp, common.drop_path."""
    def __init__(self, dim, num_heads, drop_path=0.0, layer_scale=0.1, mlp_ratio=4.0):
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn, self.norm2 = CrossAttention(dim, num_heads), nn.LayerNorm(dim, eps=1e-6)
        self.mlp, self.drop_path = common.Mlp(dim, int(dim * mlp_ratio)), drop_path
        self.ls1, self.ls2 = common.LayerScale(dim, layer_scale), common.LayerScale(dim, layer_scale)

    def forward(self, x, z_v, pos_m, pos_v):  # x [B, M, R] queries, z_v [B, n, R]; pos_m, pos_v their positions
        kv, pos_kv = torch.cat([z_v, x], 1), torch.cat([pos_v, pos_m], 1)  # [B, n+M, R]: visible, then masked
        attn = self.attn(self.norm_q(x + pos_m), self.norm_k(kv + pos_kv), self.norm_v(kv))
        x = self.norm2(x + common.drop_path(self.ls1(attn), self.drop_path, self.training))
        return x + common.drop_path(self.ls2(self.mlp(x)), self.drop_path, self.training)


class LatentContextualRegressor(nn.Module):
    """CAE v2 Sec. 2.2: H predicts Z_m [B, M, R] from Z_v [B, n, R]; the queries start as one learned mask token
    shared by all masked patches. No final LN (the shared head's LN follows, App. B.1; as released). Uses
    common.sincos_pos_embed and common.gather."""
    def __init__(self, dim, depth, num_heads, grid, drop_path=0.0, layer_scale=0.1):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(common.sincos_pos_embed(dim, grid)[None], requires_grad=False)  # [1, 1+N, R]
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(RegressorBlock(dim, num_heads, dpr[i], layer_scale) for i in range(depth))
        for m in self.modules():  # xavier linears, as released
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # released: truncated at +-1 std

    def positions(self, ids):  # ids [B, L] patch indices -> [B, L, R] (row 0 of pos_embed is CLS)
        return common.gather(self.pos_embed.expand(len(ids), -1, -1), ids + 1)

    def forward(self, z_v, ids_keep, ids_mask):
        pos_v, pos_m = self.positions(ids_keep), self.positions(ids_mask)  # P_v [B, n, R], P_m [B, M, R]
        x = self.mask_token.expand(len(z_v), ids_mask.shape[1], -1)  # Q_m [B, M, R]
        for blk in self.blocks:
            x = blk(x, z_v, pos_m, pos_v)
        return x


class CAEv2(nn.Module):
    def __init__(self, encoder, target_dim, regressor_dim=None, regressor_depth=4, drop_path=0.1, visible_align=True,
                 loss="cosine"):
        super().__init__()
        self.encoder, self.visible_align, self.loss = encoder, visible_align, loss
        D, heads, R = encoder.embed_dim, encoder.blocks[0].attn.num_heads, regressor_dim or encoder.embed_dim
        # encoder width -> regressor width (ViT-T: 192 -> 96), FC + LN as released; nothing when they agree
        self.encoder_to_regressor = nn.Sequential(nn.Linear(D, R), nn.LayerNorm(R, eps=1e-6)) if R != D else nn.Identity()
        # depth 0: no regressor at all, l_v alone (Table 4's 0 layers; Sec. 3.2)
        self.regressor = LatentContextualRegressor(R, regressor_depth, heads, encoder.grid, drop_path, 0.1) \
            if regressor_depth else None
        # App. B.1: FC then LN to the CLIP dim (512 for CLIP-B/16), ONE module for both branches
        self.head = nn.Sequential(OrderedDict(fc=nn.Linear(R, target_dim), norm=nn.LayerNorm(target_dim, eps=1e-6)))
        for m in [*self.encoder_to_regressor.modules(), self.head.fc]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        # as released (CAE's init, "as BEiT"): patch projection and CLS token from a normal of std 0.02 cut at
        # +-0.02, projection bias 0 (common.ViT's MAE init: xavier, torch's default bias)
        nn.init.trunc_normal_(encoder.patch_embed.proj.weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(encoder.patch_embed.proj.bias)
        nn.init.trunc_normal_(encoder.cls_token, std=0.02, a=-0.02, b=0.02)

    def forward_encoder(self, images, ids_keep):
        """Sec. 2.2: F sees CLS + the visible patches only; CLS dropped, mapped to the regressor width -> Z_v [B, n, R]."""
        return self.encoder_to_regressor(self.encoder(images, ids_keep)[:, 1:])

    def forward_regressor(self, z_v, ids_keep, ids_mask):
        """Sec. 2.2: H predicts Z_m [B, M, R] from Z_v (CAE's cross-attention blocks, no final LN)."""
        return self.regressor(z_v, ids_keep, ids_mask)

    def forward(self, images, ids_keep, ids_mask, target_v, target_m):
        """target_v [B, n, C], target_m [B, M, C]: CLIP latents Zbar_v, Zbar_m of the visible and masked patches.
        With no regressor (depth 0) pred_m is None."""
        z_v = self.forward_encoder(images, ids_keep)
        pred_v = self.head(z_v)  # the same FC -> LN for both branches (App. B.1)
        pred_m = self.head(self.forward_regressor(z_v, ids_keep, ids_mask)) if self.regressor is not None else None
        loss = cae_v2_loss(pred_v, target_v, pred_m, target_m, visible=self.visible_align, distance=self.loss)
        return loss, {"pred_v": pred_v, "pred_m": pred_m}


# ---- Loss: Eq. 2 (Sec. 2.3) --------------------------------------------------------------------------------
def latent_distance(pred, target, distance="cosine"):
    """d(z, zbar) per token, [B, L, C] x 2 -> [B, L]: cosine, 1 - cos(z, zbar) (Eq. 2); Table 3's mse, the mean over
    the C channels of (z - LN(zbar))^2, and smooth_l1, of smooth-l1 with beta 1 on the same pair, with LN(zbar) the
    latent normalised per token (no affine parameters)."""
    if distance == "cosine":
        return 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)
    target = F.layer_norm(target.float(), target.shape[-1:], eps=1e-6)  # zero mean, unit variance per token
    if distance == "mse":
        return (pred.float() - target).pow(2).mean(-1)
    return F.smooth_l1_loss(pred.float(), target, beta=1.0, reduction="none").mean(-1)


def cae_v2_loss(pred_v, target_v, pred_m, target_m, per_patch=False, visible=True, distance="cosine"):
    """CAE v2 Eq. 2: l = (1/|v|) sum_i (1 - cos(z_v^i, zbar_v^i)) + (1/|m|) sum_i (1 - cos(z_m^i, zbar_m^i)),
    visible latent alignment l_v plus masked latent alignment l_z, each its own mean (and over the batch).
    Table 2's rows: visible=False drops l_v; pred_m None (no regressor) drops l_z. Table 3: another distance for
    both terms (latent_distance). per_patch: the [B, n] and [B, M] terms instead (0 for a dropped term)."""
    l_v = latent_distance(pred_v, target_v, distance) * visible
    l_z = latent_distance(pred_m, target_m, distance) if pred_m is not None else target_m.new_zeros(target_m.shape[:2])
    return (l_v, l_z) if per_patch else (l_v.mean() if visible else 0) + (l_z.mean() if pred_m is not None else 0)


# ---- Training: forward_step, train_one_epoch, main ---------------------------------------------------------
def build_transform(args):
    """Block masks made in the DataLoader workers: -> (view, mask). Colour jitter, crop + flip (Table 8); the jitter
    runs on the whole image first, as released (its contrast blends towards the whole image's mean, not the crop's)."""
    j = args.color_jitter
    jitter = v2.ColorJitter(j, j, j) if j else None  # brightness, contrast, saturation; no hue
    return common.pretrain_transform(args, mask_fn=block_masking(args), first=jitter)


def build_model(args):
    """-> (model, teacher): the trained student (F, H, head) and the frozen CLIP teacher."""
    encoder = common.build_vit(args.model, args.input_size, drop_path=args.drop_path, init_values=args.layer_scale,
                               num_heads=args.num_heads)  # 12 for ViT-T (Sec. 3.1)
    teacher = common.Teacher(args.teacher, args.teacher_weights, encoder.grid).to(args.device)
    model = CAEv2(encoder, teacher.dim, args.regressor_dim, args.regressor_depth, args.drop_path, args.visible_align,
                  args.loss)
    return model.to(args.device), teacher


def forward_step(model, teacher, batch, args, per_patch=False):
    """One training forward on a batch (images, mask) on the device. Returns the loss, the mask [B, N] (True =
    hidden), no CLS attention and, only when asked (per_patch: pictures, benchmarks), the per-patch terms 1 - cos
    [B, N] (visible and masked)."""
    images, mask = batch
    N = mask.shape[1]
    ids_keep, ids_mask = common.ids_from_mask(mask, common.num_visible(N, args.mask_ratio))  # [B, n], [B, M]
    target = teacher(images, tokens=True)["tokens"][:, 1:]  # Sec. 2.3: CLIP latents of the intact image [B, N, C]
    target_v, target_m = common.gather(target, ids_keep), common.gather(target, ids_mask)  # Zbar_v, Zbar_m
    loss, out = model(images, ids_keep, ids_mask, target_v, target_m)
    patch_loss = None
    if per_patch:
        pred_m = out["pred_m"].detach() if out["pred_m"] is not None else None
        l_v, l_z = cae_v2_loss(out["pred_v"].detach(), target_v, pred_m, target_m, True, args.visible_align, args.loss)
        patch_loss = torch.zeros(mask.shape, device=mask.device).scatter(1, ids_keep, l_v).scatter(1, ids_mask, l_z)
    return {"loss": loss, "mask": mask, "patch_loss": patch_loss, "cls_attn": None}


def train_one_epoch(model, teacher, loader, optimizer, scaler, epoch, args, ckpt):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    meter = common.Meter(loader, epoch, args, ckpt)  # a resumed epoch goes on from its checkpoint
    for step, (batch, _) in meter:  # step counts from the resume point
        if step % args.accum_iter == 0:  # per-iteration schedule (BEiT)
            lr = common.lr_at(epoch + step / meter.steps, args)
            common.set_lr(optimizer, lr)
        batch = common.to_device(batch, args.device)  # uint8 view -> normalised float, on the device
        update = (step + 1) % args.accum_iter == 0
        with model.no_sync() if args.world_size > 1 and not update else nullcontext():
            with common.autocast(args):
                loss = forward_step(model, teacher, batch, args)["loss"]
            scaler.scale(loss / args.accum_iter).backward()
        meter.update(step, loss, lr, len(batch[0]))
        if update:
            common.optimizer_step(model, optimizer, scaler, args)  # clip to --clip_grad, step, zero grads
            ckpt.step_done(epoch, step + 1, meter)  # mid-epoch checkpoint when due (minutes or steps)
    return meter.stats(epoch, lr)


def main(argv=None):
    args = get_args(argv)
    common.setup(args)  # checks, torchrun's process group, device, seeds, lr from --blr
    dataset = common.build_dataset(args, build_transform(args))
    model, teacher = build_model(args)
    if args.visualize:
        return common.visualize(args, dataset, model, teacher, forward_step, "cae_v2")
    loader = common.build_loader(dataset, args)
    optimizer = common.build_optimizer(model, args)
    ckpt = common.Checkpointer(args, "cae_v2", model, optimizer)  # exact resume: model, optimizer, RNGs, position
    start_epoch, start_step = ckpt.resume()  # --resume (auto: OUTPUT_DIR's last); another run's folder is refused
    targets = f"teacher {args.teacher} ({args.teacher_weights}), {args.loss} distance " + \
        ("(l_v + l_z)" if args.visible_align and args.regressor_depth else "(l_v alone)" if args.visible_align else
         "(l_z alone)")
    common.announce(args, "cae_v2", dataset, loader.sampler.steps, start_epoch, targets)
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
