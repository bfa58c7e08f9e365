"""MILAN: Masked Image Pretraining on Language Assisted Representation.
Zejiang Hou, Fei Sun, Yen-Kuang Chen, Yuan Xie, Sun-Yuan Kung, 2022. arXiv:2208.06049.

Implemented: a MAE encoder on the visible patches (Sec. 2.1), CLIP image features of the intact
image as the reconstruction target (Sec. 2.2), the prompting decoder (Sec. 2.3, Eq. 2), semantic
aware sampling from the CLIP class-token attention (Sec. 2.4, Eq. 3), and the loss over all
patches (Eq. 1), trained with the App. A.1 recipe. Table 5's arms: --target pixel (MAE's per-patch
normalised pixels), --decoder mae (MAE's decoder at the prompting decoder's width and depth), --mask_type
random (MAE's uniform masking); all three together are MAE (#1).
Which patches each arm's loss covers (the paper does not say for #3-#6): CLIP targets keep Eq. 1, all N
patches, with either decoder (Sec. 2.2); pixel targets keep MAE's loss, the mean squared error of the masked
patches only, with either decoder: the prompting decoder reads the visible patches straight out of the
prompts Z, which MAE's loss never scores.

Computed in common.py: the targets t_j and the class-token attention s_class of Eq. 3 (common.Teacher, one pass,
cls_attn=True); MAE's uniform masking for --mask_type random (common.random_masking); the normalised pixels of
--target pixel (common.pixel_targets).

Deviations from the released code (github.com/zejiangh/MILAN @7dcfe0f), one line each:
- the teacher gets CLIP-normalised pixels; the released code feeds ImageNet-normalised pixels to CLIP.
- the loss averages over the N patches as Eq. 1 writes; the released code also puts the CLS token in the mean.
- cls_token and mask_token get no weight decay; the released code decays them (timm add_weight_decay).
- targets are ln_post(all tokens) @ proj, as the released code intends (its pretraining path builds the wrong CLIP head).
- the teacher stays outside DDP and one-process runs work; the released code wraps CLIP in DDP and needs it.
- --decoder mae and --target pixel are MAE's models_mae.py at MILAN's decoder size; the released code has neither.
Kept as released, though the paper is loose: Eq. 2 writes cat(Z, X W_k); the prompts Z are projected by the
same W_k, W_v as the mask tokens (a per-head concatenation of unprojected Z would not type-check).

Paper ViT-B/16 run (App. A.1: batch 256 x accum 2 x 8 GPUs = 4096, lr = 1.5e-4 x 4096 / 256 = 2.4e-3):
  torchrun --nproc_per_node=8 milan.py --data /imagenet --teacher_weights /path/to/ViT-B-16.pt
(ViT-L/16: --model vit_large_patch16 --teacher ViT-L-14 --batch_size 128 --accum_iter 4.)
Smoke run, no downloads: python milan.py --data fake --model vit_nano_patch16 --teacher tiny
  --teacher_weights none --epochs 1 --warmup_epochs 0 --batch_size 32 --output_dir OUT
"""
from contextlib import nullcontext

import common  # first: a Ctrl-C or SIGTERM during the slow imports is then one line (common.py's top)
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


# ---- Arguments: App. A.1 recipe as defaults ----------------------------------------------------------------
def get_args(argv=None):
    p = common.get_parser("MILAN pre-training (arXiv:2208.06049). Defaults: the App. A.1 recipe (ViT-B/16, CLIP-B/16 "
                          "teacher, 400 epochs, mask ratio 0.75) for 8 GPUs: batch 256 per GPU x accum 2 x 8 = 4096; "
                          "with fewer GPUs raise --accum_iter.")
    # MILAN App. A.1: AdamW (0.9, 0.95), batch 4096 (256 per GPU x accum 2 x 8 GPUs), base lr 1.5e-4,
    # wd 0.05, 400 epochs with 40 of linear warmup then cosine to 0, RandomResizedCrop + flip only,
    # mask ratio 0.75, CLIP ViT-B/16 teacher (ViT-L/14 for ViT-L). Crop scale (0.2, 1) is MAE's.
    p.set_defaults(batch_size=256, accum_iter=2, blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, epochs=400,
                   warmup_epochs=40, min_lr=0.0, crop_min=0.2, mask_ratio=0.75, teacher="ViT-B-16")
    p.add_argument("--mask_type", choices=["attention", "random"], default="attention",
                   help="Sec. 2.4 semantic aware sampling, or MAE's uniform sampling (Table 5 ablation)")
    p.add_argument("--target", choices=["clip", "pixel"], default="clip", help="Sec. 2.2 the teacher's features of all "
                   "patches (Eq. 1), or MAE's per-patch normalised pixels, MSE on the masked patches (Table 5 #1, #3-#5)")
    p.add_argument("--decoder", choices=["prompting", "mae"], default="prompting", help="Sec. 2.3 prompting decoder, or "
                   "MAE's decoder (self-attention over visible latents and mask tokens, same width and depth; Table 5 "
                   "#1, #2, #4, #6)")
    p.add_argument("--decoder_dim", type=common.COUNT, help="decoder width; default: 512 (released code; the paper gives "
                   "no decoder size), 64 for the test size vit_nano_patch16")
    p.add_argument("--decoder_depth", type=common.COUNT, help="decoder blocks; default: 8 (released code), 2 for "
                   "vit_nano_patch16")
    p.add_argument("--decoder_heads", type=common.COUNT, help="decoder heads; default: 16 (released code), 2 for "
                   "vit_nano_patch16")
    args = p.parse_args(argv)
    sizes = (64, 2, 2) if args.model == "vit_nano_patch16" else (512, 8, 16)  # width, depth, heads
    args.decoder_dim, args.decoder_depth, args.decoder_heads = (
        given or default for given, default in zip((args.decoder_dim, args.decoder_depth, args.decoder_heads), sizes))
    common.check_width(args.decoder_dim, args.decoder_heads, f"--decoder_dim {args.decoder_dim}, --decoder_heads "
                       f"{args.decoder_heads}")
    return args


# ---- Sampler: semantic aware sampling (Sec. 2.4, Eq. 3) ----------------------------------------------------
def semantic_aware_sampling(cls_attn, n_keep):
    """MILAN Sec. 2.4: the visible patches are n_keep draws without replacement from the
    Multinomial whose probabilities are the CLIP class-token attention s_class (Eq. 3), so
    semantically important patches stay visible more often. cls_attn [B, N] -> mask [B, N].
    The CLS->CLS entry s_class(0) is not a candidate (released code; the paper's index set
    {s_class(0) .. s_class(N)} is loose about it); weights are not renormalised (multinomial does)."""
    ids_keep = torch.multinomial(cls_attn, n_keep, replacement=False)  # [B, n_keep], p ~ s_class(i)
    return common.mask_from_ids(ids_keep, cls_attn.shape[1])


# ---- Model: MAE encoder + prompting decoder (Sec. 2.1, 2.3, Eq. 2), or MAE's decoder (Table 5) -------------
class PromptingAttention(nn.Module):
    """MILAN Eq. 2: MHA(X, Z) = sum_h softmax(X W_q^h (cat(Z, X) W_k^h)^T / sqrt(d_h)) cat(Z, X) W_v^h W_o^h.
    Queries come from the mask tokens X only; the fixed prompts Z join the keys and values."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, z):  # x [B, M, C] mask-token features, z [B, P, C] prompts
        B, M, C = x.shape
        q = self.q(x).view(B, M, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, H, M, d_h]
        k, v = self.kv(torch.cat([z, x], 1)).view(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, M, d_h]; softmax over the P + M keys
        return self.proj(out.transpose(1, 2).reshape(B, M, C))  # concat heads, then W_o


class PromptingBlock(nn.Module):
    """MILAN Fig. 1(c): X <- X + MHA(LN1(X), Z), X <- X + FFN(LN2(X)). Only X is updated; Z is
    neither written nor re-normalised (as released). Uses common.Mlp."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), PromptingAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), common.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, z):
        x = x + self.attn(self.norm1(x), z)
        return x + self.mlp(self.norm2(x))


class MILAN(nn.Module):
    """Encoder + decoder ('prompting': Sec. 2.3; 'mae': MAE's, Table 5) + loss ('clip': Eq. 1; 'pixel': MAE's). Uses
    common.Block (MAE's decoder), common.sincos_pos_embed and common.gather."""
    def __init__(self, encoder, target_dim, decoder_dim=512, decoder_depth=8, decoder_heads=16, decoder="prompting",
                 target="clip"):
        super().__init__()
        self.encoder, self.decoder, self.target = encoder, decoder, target
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed(decoder_dim, encoder.grid)[None], requires_grad=False)
        block = PromptingBlock if decoder == "prompting" else common.Block  # MAE: pre-norm self-attention blocks
        self.decoder_blocks = nn.ModuleList(block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):  # MAE init
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images, ids_keep):
        """Sec. 2.1: the encoder g_xi sees CLS + the visible patches only -> [B, 1+n, D]."""
        return self.encoder(images, ids_keep)

    def forward_decoder(self, latent, ids_keep, ids_mask):
        """The decoder of --decoder: [B, 1+n, D] encoder output -> predictions for all N patches [B, N, C]."""
        if self.decoder == "mae":
            return self.forward_mae_decoder(latent, ids_keep, ids_mask)
        return self.forward_prompting_decoder(latent, ids_keep, ids_mask)

    def forward_prompting_decoder(self, latent, ids_keep, ids_mask):
        """Sec. 2.3: prompts Z = decoder_embed(encoder output) + pos (CLS + visible), queries X =
        mask token + pos (masked). Returns p_j for all N patches in raster order [B, N, C]: visible
        ones read out of Z, masked ones out of X after the prompting blocks."""
        B = latent.shape[0]
        pos = self.decoder_pos_embed.expand(B, -1, -1)  # [B, 1+N, Dd]
        ids_prompt = torch.cat([ids_keep.new_zeros(B, 1), ids_keep + 1], 1)  # CLS + visible rows of pos
        z = self.decoder_embed(latent) + common.gather(pos, ids_prompt)  # Z [B, 1+n, Dd]
        x = self.mask_token + common.gather(pos, ids_mask + 1)  # X [B, M, Dd]
        for blk in self.decoder_blocks:
            x = blk(x, z)  # Z is read in every layer and never updated
        feats = torch.cat([z[:, 1:], x], 1)  # [B, N, Dd], patches in (ids_keep, ids_mask) order
        ids_restore = torch.argsort(torch.cat([ids_keep, ids_mask], 1), 1)  # [B, N]
        feats = common.gather(feats, ids_restore)  # [B, N, Dd], raster order
        return self.decoder_pred(self.decoder_norm(feats))  # [B, N, C]

    def forward_mae_decoder(self, latent, ids_keep, ids_mask):
        """Table 5's MAE decoder (MAE's models_mae.py): embed CLS + the visible latents, append one mask token per
        masked patch, restore raster order, add positions, self-attention blocks over all 1+N tokens (the visible ones
        are updated too), norm, predict; CLS dropped -> [B, N, C]."""
        x = self.decoder_embed(latent)  # [B, 1+n, Dd]
        B, M = x.shape[0], ids_mask.shape[1]
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, M, -1)], 1)  # [B, N, Dd] in (ids_keep, ids_mask) order
        ids_restore = torch.argsort(torch.cat([ids_keep, ids_mask], 1), 1)  # [B, N]
        x = torch.cat([x[:, :1], common.gather(x_, ids_restore)], 1) + self.decoder_pos_embed  # [B, 1+N, Dd], raster
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, C]

    def forward(self, images, ids_keep, ids_mask, target):
        """target [B, N, C]: the teacher's t_j (--target clip) or the normalised pixels (pixel) of all N patches."""
        pred = self.forward_decoder(self.forward_encoder(images, ids_keep), ids_keep, ids_mask)
        if self.target == "pixel":  # MAE's loss: the masked patches only
            return pixel_loss(common.gather(pred, ids_mask), common.gather(target, ids_mask)), pred
        return milan_loss(pred, target), pred


# ---- Loss: Eq. 1 (Sec. 2.2) --------------------------------------------------------------------------------
def milan_loss(pred, target, per_patch=False):
    """MILAN Eq. 1: L = (1/N) sum_j ||p_j/||p_j|| - t_j/||t_j|| ||^2 over all N patches, masked and
    visible (Sec. 2.2), averaged over the batch. pred, target [B, N, C]. per_patch: the [B, N] terms."""
    p_bar, t_bar = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)  # l2 per token
    dist = (p_bar - t_bar).pow(2).sum(-1)  # [B, N], sum over C
    return dist if per_patch else dist.mean()  # mean over N patches and B images


def pixel_loss(pred_m, target_m, per_patch=False):
    """--target pixel, MAE's loss (models_mae.py forward_loss, norm_pix_loss): the mean squared error over each masked
    patch's p*p*3 normalised pixels, averaged over the masked patches and the batch. pred_m, target_m [B, M, p*p*3]."""
    err = (pred_m.float() - target_m.float()).pow(2).mean(-1)  # [B, M]
    return err if per_patch else err.mean()


# ---- Training: forward_step, train_one_epoch, main ---------------------------------------------------------
def build_transform(args):
    return common.pretrain_transform(args)  # RandomResizedCrop + flip (App. A.1)


def build_model(args):
    """-> (model, teacher): the trained student (encoder + decoder) and the frozen CLIP teacher; no teacher when nothing
    needs it (--target pixel --mask_type random: MAE, Table 5 #1)."""
    encoder = common.build_vit(args.model, args.input_size, drop_path=args.drop_path)
    teacher = common.Teacher(args.teacher, args.teacher_weights, encoder.grid).to(args.device) \
        if args.target == "clip" or args.mask_type == "attention" else None
    target_dim = teacher.dim if args.target == "clip" else encoder.patch_size ** 2 * 3  # C, or p*p*3 pixels
    model = MILAN(encoder, target_dim, args.decoder_dim, args.decoder_depth, args.decoder_heads, args.decoder, args.target)
    return model.to(args.device), teacher


def describe(args):
    """The run's arms, for its start line."""
    target = f"teacher {args.teacher} ({args.teacher_weights}) features, Eq. 1 on all patches" if args.target == "clip" \
        else "normalised pixels, MSE on the masked patches" + (f" (teacher {args.teacher} ({args.teacher_weights}) for "
                                                                "the sampling)" if args.mask_type == "attention" else "")
    decoder = "prompting decoder" if args.decoder == "prompting" else "MAE's decoder"
    return f"targets: {target}; {decoder}; {'semantic aware' if args.mask_type == 'attention' else 'random'} masking"


def forward_step(model, teacher, batch, args, per_patch=False):
    """One training forward on a batch of images (on the device). Returns the loss, the mask [B, N] (True = hidden),
    the teacher's CLS attention and, only when asked (per_patch: pictures, benchmarks), the per-patch loss [B, N]."""
    images, patch = batch, common.VIT_CONFIGS[args.model][0]
    N = (images.shape[-1] // patch) ** 2
    n_keep = common.num_visible(N, args.mask_ratio)  # 49 of 196 at r = 0.75
    # one teacher pass on the intact image: targets t_j (Sec. 2.2) and s_class (Eq. 3), what the run needs of them
    clip, attention = args.target == "clip", args.mask_type == "attention"
    out = teacher(images, tokens=clip, cls_attn=attention) if clip or attention else {}
    if attention:
        mask = semantic_aware_sampling(out["cls_attn"], n_keep)
    else:
        mask = common.random_masking(len(images), N, n_keep, images.device)
    ids_keep, ids_mask = common.ids_from_mask(mask, n_keep)  # [B, 49], [B, 147]
    target = out["tokens"][:, 1:] if clip else common.pixel_targets(images, patch)  # of the N patches: t_j, or pixels
    loss, pred = model(images, ids_keep, ids_mask, target)
    patch_loss = None
    if per_patch and clip:  # [B, N], Fig. 5 style
        patch_loss = milan_loss(pred.detach(), target, per_patch=True)
    elif per_patch:  # pixels: 0 on the visible patches, which MAE's loss does not score
        terms = pixel_loss(common.gather(pred.detach(), ids_mask), common.gather(target, ids_mask), per_patch=True)
        patch_loss = torch.zeros(mask.shape, device=images.device).scatter(1, ids_mask, terms)  # [B, N]
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
    common.setup(args)  # checks, torchrun's process group, device, seeds, lr from --blr
    dataset = common.build_dataset(args, build_transform(args))
    model, teacher = build_model(args)
    if args.visualize:
        return common.visualize(args, dataset, model, teacher, forward_step, "milan")
    loader = common.build_loader(dataset, args)
    optimizer = common.build_optimizer(model, args)
    ckpt = common.Checkpointer(args, "milan", model, optimizer)  # exact resume: model, optimizer, RNGs, position
    start_epoch, start_step = ckpt.resume()  # --resume (auto: OUTPUT_DIR's last); another run's folder is refused
    common.announce(args, "milan", dataset, loader.sampler.steps, start_epoch, describe(args))
    if teacher is not None:
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
