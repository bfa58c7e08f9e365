"""MR-MAE: Mimic before Reconstruct: Enhancing Masked Autoencoders with Feature Mimicking.
Peng Gao, Renrui Zhang, Rongyao Fang, Ziyi Lin, Hongyang Li, Hongsheng Li, Yu Qiao, 2023. arXiv:2303.05475.

Implemented: a MAE encoder on the 25% visible patches (Sec. 3.1) with a MAE decoder that reconstructs the
pixels of the 75% masked patches (L_R, Eq. 1); a linear mimic head on the encoder's visible tokens against
CLIP or DINO features of the same patches (L_M, Eq. 2); loss 0.5 L_R + 0.5 L_M (Sec. 4.1); the three tricks
of Sec. 3.3: focused mimicking (visible patches chosen from the teacher's [CLS] attention), multi-layer
fusion (visible tokens of several encoder blocks added before the mimic head and the decoder) and masked
convolution stages (MCMAE's ConvViT encoder, `--arch convvit_base`; Table 6's other sizes `--arch convvit_small`,
`convvit_large`, `convvit_huge`); trained with the Sec. 4.1 recipe.
Table 3 row 5, the design the title argues against ("semantic conflicts", Fig. 1b): --high_level reconstruct
removes the mimic head and has the decoder reconstruct the teacher features of the masked patches too, through a
second prediction head on its output, scored as Eq. 1 scores pixels (L_R on features; weights 0.5 / 0.5).
Table 4's "CLIP/DINO (Joint)": --teacher ViT-B-16,dino_vitb16 --teacher_weights WA,WB mimics both teachers in one run.

Computed in common.py: the normalised pixels I of Eq. 1 (common.pixel_targets); the teacher features F of Eq. 2 and
its [CLS] attention (common.Teacher); MAE's uniform masking for --focus none (common.random_masking).

Deviations from the released code: none possible. The authors never released MR-MAE code (github.com/
Alpha-VL/ConvMAE holds MCMAE v1 only); the paper is the only reference. Where it is silent, ours, one line each:
- focused mimicking draws the visible patches without replacement with probability proportional to the
  teacher's [CLS] attention (last block, head mean), as MILAN and MaskAlign do; `--focus topk` takes the most
  salient ones literally, `--focus none` is MAE's uniform masking. The same patches feed decoder and mimic head.
- multi-layer fusion sums blocks ceil(d/3), ceil(2d/3), d (4, 8, 12 for ViT-B; 4, 8, 11 for ConvViT-B), CLS
  included, then the encoder's final LayerNorm; the last block must be among them (`--fusion_layers`).
- the mimic head is one Linear(D -> C) on the fused, normed visible tokens; the [CLS] token is not mimicked.
- Table 3 row 5's feature head is one Linear(decoder width -> C) beside the pixel head, on the same decoder output.
- targets are the teacher's output tokens (CLIP: ln_post then proj, 512-d for B/16; DINO: final norm, 768-d),
  not normalised further.
- Table 4 Joint (the paper names no rule): one Linear mimic head per teacher (D -> that teacher's C) on the same E_v;
  L_M = the mean of the teachers' Eq. 2 terms (MAE-style mean; the total stays 0.5 L_R + 0.5 L_M); focused mimicking
  from the first teacher's [CLS] attention; --high_level reconstruct takes one teacher.
- Eq. 1 and Eq. 2 are taken as written: squared error summed over a patch's values, mean over patches, mean
  over the batch (MAE's released loss also averages over a patch's p*p*3 values: p*p*3 times smaller).
- pixel targets are per-patch normalised (MAE's norm_pix_loss: (x - mean) / sqrt(var + 1e-6), unbiased var).
- ConvViT-B follows MCMAE's released code (widths 256/384/768, depths 2/2/11; conv patch merging + LN + GELU,
  5x5 depthwise conv between 1x1 convs, mask before every depthwise conv, fixed sin-cos positions at 14x14)
  with a [CLS] token added at the transformer stage (ConvMAE-v2 has one, per the authors' issue #19);
  MCMAE's stage-1/2 side outputs added to the last block are left out. LayerNorm eps 1e-6 everywhere.
- ConvViT-S/L/H (Table 6; MCMAE's code holds only B): the ConvMAE-v2 sizes, cited at CONVVIT_CONFIGS; all at patch 16.
- the MAE decoder keeps the [CLS] token and uses fixed sin-cos positions (as MAE's released code).
- Sec. 4.1's "maximum learning rate 1.5e-4" is read as MAE's base lr (peak 6e-4 at batch 1024); the literal
  reading is --lr 1.5e-4. min lr 0, betas (0.9, 0.95), crop scale (0.2, 1) + flip: MAE's (the paper names none).

Paper run (Sec. 4.1: batch 1024 = 128 per GPU x accum 1 x 8 GPUs; lr = 1.5e-4 x 1024 / 256 = 6e-4):
  torchrun --nproc_per_node=8 mr_mae.py --data /imagenet --teacher_weights /path/to/ViT-B-16.pt
(add --arch convvit_base for the masked convolution stages of the 85.8% headline, Tables 3 and 5;
DINO teacher: --teacher dino_vitb16 --teacher_weights /path/to/dino_vitbase16_pretrain.pth.)
Smoke run, no downloads: python mr_mae.py --data fake --model vit_nano_patch16 --teacher tiny
  --teacher_weights none --epochs 1 --warmup_epochs 0 --batch_size 32 --output_dir OUT
  (add --arch convvit_nano for the conv stages)
"""
import argparse
import math
import os
from collections import OrderedDict
from contextlib import nullcontext

import common  # first: a Ctrl-C or SIGTERM during the slow imports is then one line (common.py's top)
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


# ---- Arguments: Sec. 4.1 recipe as defaults ----------------------------------------------------------------
def get_args(argv=None):
    p = common.get_parser("MR-MAE pre-training (arXiv:2303.05475). Defaults: the Sec. 4.1 recipe (ViT-B/16, CLIP-B/16 "
                          "teacher, 400 epochs, 25% visible, loss 0.5 L_R + 0.5 L_M) for 8 GPUs: batch 128 per GPU x "
                          "accum 1 x 8 = 1024; with fewer GPUs raise --accum_iter.")
    # MR-MAE Sec. 4.1: AdamW, batch 1024 (128 per GPU x accum 1 x 8 GPUs), max lr 1.5e-4 read as MAE's base lr,
    # wd 0.05, 400 epochs with 80 of warmup then cosine, 25% visible, 8 decoder blocks, CLIP ViT-B/16 teacher.
    # Betas (0.9, 0.95), min lr 0 and crop scale (0.2, 1) are MAE's (the paper follows "the practices in MAE").
    p.set_defaults(batch_size=128, accum_iter=1, blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, epochs=400,
                   warmup_epochs=80, min_lr=0.0, crop_min=0.2, mask_ratio=0.75, teacher="ViT-B-16")
    p.add_argument("--arch", choices=["vit", *CONVVIT_CONFIGS], default="vit", help="vit: plain ViT of --model; "
                   "convvit_*: masked convolution stages + transformer (Sec. 3.3, MCMAE; --model is then ignored); "
                   "small, large, huge: Table 6")
    p.add_argument("--focus", choices=["attention", "topk", "none"], default="attention",
                   help="Sec. 3.3 focused mimicking: visible patches drawn in proportion to the teacher's [CLS] "
                   "attention, the most salient ones (topk), or uniform as in MAE (none; Table 3 ablation)")
    p.add_argument("--fusion_layers", type=common.COUNT, nargs="+", help="Sec. 3.3 multi-layer fusion: 1-based encoder "
                   "blocks whose outputs are summed; default: ceil(d/3) ceil(2d/3) d (4 8 12 for ViT-B); pass only d "
                   "for no fusion")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="reconstruct per-patch normalised pixels (MAE's target; Sec. 4.1 follows MAE)")
    p.add_argument("--decoder_dim", type=common.COUNT, help="MAE decoder width; default: 512 (MAE), 64 for the test sizes")
    p.add_argument("--decoder_depth", type=common.COUNT, help="decoder blocks; default: 8 (Sec. 4.1), 2 for the test sizes")
    p.add_argument("--decoder_heads", type=common.COUNT, help="decoder heads; default: 16 (MAE), 2 for the test sizes")
    p.add_argument("--loss_weights", type=common.NONNEG, nargs=2, default=(0.5, 0.5), metavar=("W_R", "W_M"), help="weights "
                   "of L_R and L_M (Sec. 4.1); Table 3: 1 0 = MAE's L_R alone, 0 1 = L_M alone")
    p.add_argument("--high_level", choices=["mimic", "reconstruct"], default="mimic", help="Table 3's 'High Level' "
                   "column: L_M, the encoder's visible tokens mimic the teacher (Eq. 2), or L_R, the decoder reconstructs "
                   "the teacher features of the masked patches beside the pixels (row 5; weighted by W_M)")
    args = p.parse_args(argv)
    if args.arch != "vit":  # the encoder's name, as announced and saved in the checkpoints' args
        args.model = args.arch
    nano = args.model == "vit_nano_patch16" if args.arch == "vit" else args.arch == "convvit_nano"
    sizes = (64, 2, 2) if nano else (512, 8, 16)  # width, depth, heads
    args.decoder_dim, args.decoder_depth, args.decoder_heads = (
        given or default for given, default in zip((args.decoder_dim, args.decoder_depth, args.decoder_heads), sizes))
    common.check_width(args.decoder_dim, args.decoder_heads, f"--decoder_dim {args.decoder_dim}, --decoder_heads "
                       f"{args.decoder_heads}")
    names, weights = args.teacher.split(","), args.teacher_weights.split(",")  # Table 4 Joint: A,B and WA,WB
    if len(weights) != len(names) and (len(names) > 1 or not os.path.isfile(args.teacher_weights)):  # (a file: any name)
        raise common.UserError(f"--teacher {args.teacher} --teacher_weights {args.teacher_weights}: give one weight "
                               f"per teacher, in order (--teacher ViT-B-16,dino_vitb16 --teacher_weights A.pt,B.pth)")
    if len(names) > 1 and args.high_level == "reconstruct":
        raise common.UserError(f"--high_level reconstruct --teacher {args.teacher}: Table 3 row 5 takes one teacher; "
                               f"pass one")
    if not any(args.loss_weights):
        raise common.UserError("--loss_weights 0 0 leaves no loss to train; give L_R or L_M a weight (Table 3: 1 0, 0 1)")
    return args


# ---- Sampler: focused mimicking (Sec. 3.3) -----------------------------------------------------------------
def focused_sampling(cls_attn, n_keep, focus="attention"):
    """MR-MAE Sec. 3.3 "Focused Mimicking": the visible patches, which the encoder sees and the mimic
    loss supervises, are chosen from the teacher's [CLS] attention instead of uniformly.
    attention: n_keep draws without replacement, P(i) proportional to cls_attn[i] (salient patches are
    visible more often, the rest still gets seen; as MILAN and MaskAlign); topk: the n_keep most salient
    patches; none: uniform (MAE). cls_attn [B, N] -> mask [B, N], True = hidden from the encoder."""
    B, N = cls_attn.shape
    if focus == "none":
        return common.random_masking(B, N, n_keep, cls_attn.device)
    if focus == "attention":
        ids_keep = torch.multinomial(cls_attn, n_keep, replacement=False)  # [B, n_keep]
    else:
        ids_keep = cls_attn.topk(n_keep, dim=1).indices  # [B, n_keep], largest attention first
    return common.mask_from_ids(ids_keep, N)


# ---- Model: masked convolution stages (ConvViT, Sec. 3.3), multi-layer fusion, mimic head, MAE decoder -----
CONVVIT_CONFIGS = {  # name: (stage widths, stage depths, transformer heads, stage MLP ratios); nano is a test size.
    # MR-MAE Table 6 defers to MCMAE (ConvMAE-v2 S/B/L/H). Base: Alpha-VL/ConvMAE models_convvit.py, the only size its
    # code holds; S, L, H: the ConvMAE-v2 widths, depths and heads as public derivatives of that code build them to load
    # the released v2 checkpoints, conv-stage MLP ratio 8 for L and H (Alpha-VL/ConvMAE issue #32: those checkpoints'
    # MLP ratios differ from the MCMAE paper's table).
    "convvit_nano": ((16, 32, 64), (2, 2, 2), 2, (4, 4, 4)),
    "convvit_small": ((128, 256, 384), (2, 2, 11), 6, (4, 4, 4)),
    "convvit_base": ((256, 384, 768), (2, 2, 11), 12, (4, 4, 4)),
    "convvit_large": ((384, 768, 1024), (2, 2, 23), 16, (8, 8, 4)),
    "convvit_huge": ((768, 1024, 1280), (2, 2, 31), 16, (8, 8, 4))}


def channel_norm(norm, x):
    """LayerNorm over the channels of each position of [B, C, H, W] (never over space: that would leak)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def upsample_mask(visible, factor):
    """[B, 1, G, G] -> [B, 1, G*f, G*f]: each patch's visibility copied onto its f x f block (MCMAE's
    multi-scale block-wise masking: the 14x14 mask as 4x4 blocks at 56x56, 2x2 blocks at 28x28)."""
    return visible.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


class ConvEmbed(nn.Module):
    """Patch merging: Conv(kernel = stride = s), then per-position LayerNorm and GELU (MCMAE). Kernel = stride,
    so each output position reads one s x s block, which lies inside a single 16 x 16 patch."""
    def __init__(self, dim_in, dim, stride):
        super().__init__()
        self.proj, self.norm, self.act = nn.Conv2d(dim_in, dim, stride, stride), nn.LayerNorm(dim, eps=1e-6), nn.GELU()

    def forward(self, x):  # [B, C_in, H, W] -> [B, C, H/s, W/s]
        return self.act(channel_norm(self.norm, self.proj(x)))


class CBlock(nn.Module):
    """MCMAE's masked convolution block, [B, C, H, W] -> same:
    x <- x + conv2(dwconv5x5(m * conv1(LN(x)))),  x <- x + MLP(LN(x)), with m = 1 on visible positions and
    0 on masked ones. The depthwise conv is the only op that mixes positions, and it reads zeros at
    every masked position, so nothing from a masked patch reaches a visible one. LN, 1x1 convs and the
    MLP act per position. Uses common.drop_path."""
    def __init__(self, dim, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.conv1, self.conv2 = nn.LayerNorm(dim, eps=1e-6), nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # 5x5 depthwise conv (MCMAE's name)
        hidden = int(dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Conv2d(dim, hidden, 1), act=nn.GELU(), fc2=nn.Conv2d(hidden, dim, 1)))
        self.drop_path = drop_path

    def forward(self, x, visible=None):  # visible [B, 1, H, W] or None (all patches visible)
        y = self.conv1(channel_norm(self.norm1, x))
        y = y if visible is None else y * visible.to(y.dtype)  # masked convolution: masked positions read as 0
        x = x + common.drop_path(self.conv2(self.attn(y)), self.drop_path, self.training)
        return x + common.drop_path(self.mlp(channel_norm(self.norm2, x)), self.drop_path, self.training)


class ConvViT(nn.Module):
    """MCMAE's hybrid encoder with the interface of common.ViT. Stage 1: stride-4 conv to a 4G x 4G map
    (56x56 at 224 px), CBlocks; stage 2: stride-2 conv to 2G x 2G (28x28), CBlocks; stage 3: stride-2 conv
    to the G x G patch grid (14x14), Linear, fixed sin-cos positions, then [CLS] + the visible tokens
    only through transformer blocks and the final norm. Stages 1-2 run densely with the mask multiplied
    in. forward(x, ids_keep [B, n] or None, return_hidden) -> [B, 1+n, D] (and per-block outputs). Uses common.Block,
    common.sincos_pos_embed, common.gather and common.mask_from_ids."""
    def __init__(self, img_size=224, dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12, mlp_ratios=(4, 4, 4),
                 drop_path=0.0):
        super().__init__()
        self.patch_size, self.embed_dim, self.grid = 16, dims[2], img_size // 16
        self.num_patches = self.grid ** 2
        n = sum(depths)
        dpr = [drop_path * i / max(n - 1, 1) for i in range(n)]  # stochastic depth grows over all n blocks
        self.patch_embed1 = ConvEmbed(3, dims[0], 4)
        self.stage1 = nn.ModuleList(CBlock(dims[0], mlp_ratios[0], dpr[i]) for i in range(depths[0]))
        self.patch_embed2 = ConvEmbed(dims[0], dims[1], 2)
        self.stage2 = nn.ModuleList(CBlock(dims[1], mlp_ratios[1], dpr[depths[0] + i]) for i in range(depths[1]))
        self.patch_embed3, self.patch_embed4 = ConvEmbed(dims[1], dims[2], 2), nn.Linear(dims[2], dims[2])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[2]))
        self.pos_embed = nn.Parameter(common.sincos_pos_embed(dims[2], self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(common.Block(dims[2], num_heads, mlp_ratios[2], dpr[depths[0] + depths[1] + i])
                                    for i in range(depths[2]))
        self.norm = nn.LayerNorm(dims[2], eps=1e-6)
        for m in self.modules():  # MAE init for the linears, N(0, 0.02) CLS
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x, ids_keep=None, return_hidden=False):
        B, G = len(x), self.grid
        vis4 = vis2 = None  # no mask (fine-tuning): every position visible
        if ids_keep is not None:
            visible = (~common.mask_from_ids(ids_keep, self.num_patches)).float().view(B, 1, G, G)  # 1 = visible
            vis4, vis2 = upsample_mask(visible, 4), upsample_mask(visible, 2)  # [B, 1, 4G, 4G], [B, 1, 2G, 2G]
        x = self.patch_embed1(x)  # [B, C1, 4G, 4G]
        for blk in self.stage1:
            x = blk(x, vis4)
        x = self.patch_embed2(x)  # [B, C2, 2G, 2G]
        for blk in self.stage2:
            x = blk(x, vis2)
        x = self.patch_embed4(self.patch_embed3(x).flatten(2).transpose(1, 2)) + self.pos_embed[:, 1:]  # [B, N, D]
        if ids_keep is not None:
            x = common.gather(x, ids_keep)  # [B, n, D], visible tokens only
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], 1)  # [B, 1+n, D]
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            if return_hidden:
                hidden.append(x)
        return (self.norm(x), hidden) if return_hidden else self.norm(x)


def build_encoder(args):
    """The student encoder from args (arch, model, input_size, drop_path): common.ViT for --arch vit, ConvViT
    otherwise. finetune.py rebuilds a checkpoint's encoder (keys model.encoder.*) with Namespace(**ckpt['args'])."""
    arch = getattr(args, "arch", "vit")
    if arch == "vit":
        return common.build_vit(args.model, args.input_size, drop_path=args.drop_path)
    if arch not in CONVVIT_CONFIGS:
        raise common.UserError(f"--arch {arch}: unknown; choose vit or one of {', '.join(CONVVIT_CONFIGS)}")
    if args.input_size % 16:
        raise common.UserError(f"--input_size {args.input_size}: --arch {arch} needs a multiple of 16")
    dims, depths, heads, mlp_ratios = CONVVIT_CONFIGS[arch]
    return ConvViT(args.input_size, dims, depths, heads, mlp_ratios, drop_path=args.drop_path)


# MR-MAE = encoder + multi-layer fusion + mimic head + MAE decoder (Sec. 3.2-3.3)
def default_fusion_layers(depth):
    """Blocks ceil(d/3), ceil(2d/3), d (1-based, duplicates dropped): [4, 8, 12] for ViT-B (ours)."""
    return sorted({math.ceil(depth / 3), math.ceil(2 * depth / 3), depth})


class JointTeacher(nn.Module):
    """Table 4 "CLIP/DINO (Joint)": the frozen teachers of one run (each a common.Teacher at the student's grid), called
    as one. tokens: theirs side by side [B, 1+N, C_1 + C_2] (self.dims: each teacher's C); cls_attn: the first's."""
    def __init__(self, names, weights, grid):
        super().__init__()
        self.towers = nn.ModuleList(common.Teacher(n, w, grid) for n, w in zip(names, weights))
        self.grid, self.dims = grid, [t.dim for t in self.towers]
        self.dim = sum(self.dims)  # C_1 + C_2

    def train(self, mode=True):  # teachers stay in eval mode
        return super().train(False)

    def prepare(self, args):
        for tower in self.towers:
            tower.prepare(args)
        return self

    def forward(self, images, tokens=True, cls_attn=False):
        outs = [t(images, tokens=True, cls_attn=cls_attn and i == 0) for i, t in enumerate(self.towers)]
        return {"tokens": torch.cat([o["tokens"] for o in outs], -1), **{k: v for k, v in outs[0].items() if k != "tokens"}}


class MRMAE(nn.Module):
    """MR-MAE Fig. 2: encoder on the visible patches -> E_v (fused blocks, final LN); E_v -> mimic head L
    (visible mimic, L_M) and E_v -> MAE decoder (masked reconstruct, L_R). high_level 'reconstruct' (Table 3 row 5,
    Fig. 1b): no mimic head; a feature head on the decoder output reconstructs the teacher's masked features.
    target_dim: the teacher's C, or a list of them (Table 4 Joint: one mimic head per teacher). Uses common.Block,
    common.sincos_pos_embed and common.gather."""
    def __init__(self, encoder, target_dim, fusion_layers, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                 loss_weights=(0.5, 0.5), high_level="mimic"):
        super().__init__()
        self.encoder, self.fusion_layers, D = encoder, list(fusion_layers), encoder.embed_dim
        self.loss_weights = tuple(loss_weights)  # (w_R, w_M): Sec. 4.1's 0.5 and 0.5; Table 3 rows 1 and 6 zero one
        self.high_level = high_level
        self.target_dims = list(target_dim) if isinstance(target_dim, (list, tuple)) else None  # None: one teacher
        if high_level == "mimic" and self.target_dims:  # Table 4 Joint: L_t of each teacher t, on the same E_v
            self.mimic_heads = nn.ModuleList(nn.Linear(D, c) for c in self.target_dims)
        elif high_level == "mimic":
            self.mimic_head = nn.Linear(D, target_dim)  # L in Eq. 2
        else:  # row 5: the teacher features of the masked patches from the decoder's output
            self.decoder_feature_pred = nn.Linear(decoder_dim, target_dim)
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed(decoder_dim, encoder.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(common.Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, encoder.patch_size ** 2 * 3)  # one p x p x 3 patch per token
        heads = [self.decoder_feature_pred] if high_level != "mimic" else \
            list(self.mimic_heads) if self.target_dims else [self.mimic_head]
        for m in [*heads, self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):  # MAE init
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images, ids_keep):
        """Sec. 3.1 + 3.3 multi-layer fusion: the encoder sees [CLS] + the visible patches; E_v = final
        LN(sum of the outputs of the fusion blocks) -> [B, 1+n, D]."""
        _, hidden = self.encoder(images, ids_keep, return_hidden=True)  # depth x [B, 1+n, D], no norm
        fused = sum(hidden[layer - 1] for layer in self.fusion_layers)  # element-wise addition
        return self.encoder.norm(fused)

    def forward_mimic(self, latent):
        """Sec. 3.2: the mimic head on the visible tokens, L(E_v): [B, 1+n, D] -> [B, n, C] ([CLS] dropped);
        Table 4 Joint: each teacher's head, side by side [B, n, C_1 + C_2]."""
        if self.target_dims:
            return torch.cat([head(latent[:, 1:]) for head in self.mimic_heads], -1)
        return self.mimic_head(latent[:, 1:])

    def forward_decoder(self, latent, ids_keep, ids_mask, features=False):
        """Sec. 3.1 (MAE): embed [CLS] + E_v, add one learned mask token per masked patch, restore raster
        order, add positions, decoder blocks, norm, predict p*p*3 pixels per patch -> D [B, N, p*p*3];
        features (Table 3 row 5): also the feature head's [B, N, C] from the same normed decoder output."""
        x = self.decoder_embed(latent)  # [B, 1+n, Dd]
        B, M = x.shape[0], ids_mask.shape[1]
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, M, -1)], 1)  # [B, N, Dd] in (ids_keep, ids_mask) order
        ids_restore = torch.argsort(torch.cat([ids_keep, ids_mask], 1), 1)  # [B, N]
        x_ = common.gather(x_, ids_restore)  # [B, N, Dd], raster order
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed  # [B, 1+N, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)  # [B, 1+N, Dd]; the predictions drop [CLS]
        return (self.decoder_pred(x)[:, 1:], self.decoder_feature_pred(x)[:, 1:]) if features else self.decoder_pred(x)[:, 1:]

    def forward(self, images, ids_keep, ids_mask, pixels, tokens):
        """pixels [B, N, p*p*3] (target I), tokens [B, N, C] (teacher features F of all patches).
        Returns the loss w_R L_R + w_M L_M (0.5, 0.5), the pixel predictions [B, N, p*p*3] and the high-level
        predictions: L(E_v) [B, n, C] of the visible patches (mimic), or the decoder's [B, M, C] of the masked ones."""
        latent = self.forward_encoder(images, ids_keep)  # E_v, fed to both branches (Sec. 3.3)
        w_r, w_m = self.loss_weights  # MR-MAE Sec. 4.1: 0.5 and 0.5 (a zero weight keeps its branch in the graph)
        if self.high_level == "reconstruct":  # Table 3 row 5: L_R on pixels and on features, both at the masked patches
            pred, feats = self.forward_decoder(latent, ids_keep, ids_mask, features=True)
            high = common.gather(feats, ids_mask)  # [B, M, C]
            loss_h = reconstruction_loss(high, common.gather(tokens, ids_mask))  # Eq. 1's form, on F_m
        else:
            pred, high = self.forward_decoder(latent, ids_keep, ids_mask), self.forward_mimic(latent)
            loss_h = joint_mimic_loss(high, common.gather(tokens, ids_keep), self.target_dims)  # visible patches only
        loss_r = reconstruction_loss(common.gather(pred, ids_mask), common.gather(pixels, ids_mask))  # masked patches only
        return w_r * loss_r + w_m * loss_h, pred, high


# ---- Loss: Eq. 1 and Eq. 2 (Sec. 3.1, 3.2) -----------------------------------------------------------------
def reconstruction_loss(d_m, i_m, per_patch=False):
    """MR-MAE Eq. 1: L_R = (1/l_m) ||D_m - I_m||_2^2, the squared error summed over each masked patch's
    p*p*3 values, averaged over the l_m masked patches, then over the batch. d_m, i_m [B, l_m, p*p*3].
    per_patch: the [B, l_m] terms ||D_j - I_j||^2."""
    err = (d_m.float() - i_m.float()).pow(2).sum(-1)  # [B, l_m]
    return err if per_patch else err.mean()


def mimic_loss(le_v, f_v, per_patch=False):
    """MR-MAE Eq. 2: L_M = (1/l_v) ||L(E_v) - F_v||_2^2, the squared error summed over the C feature
    values of each visible patch, averaged over the l_v visible patches, then over the batch.
    le_v, f_v [B, l_v, C]. per_patch: the [B, l_v] terms ||L(E_j) - F_j||^2."""
    err = (le_v.float() - f_v.float()).pow(2).sum(-1)  # [B, l_v]
    return err if per_patch else err.mean()


def joint_mimic_loss(le_v, f_v, dims=None, per_patch=False):
    """Table 4 "CLIP/DINO (Joint)": L_M = (1/T) sum_t (1/l_v) ||L_t(E_v) - F_v^t||^2, the mean over the T teachers of
    Eq. 2 on each teacher's slice of the last axis (dims: their C_t; None: one teacher, Eq. 2 itself)."""
    if not dims:
        return mimic_loss(le_v, f_v, per_patch)
    terms = [mimic_loss(a, b, per_patch) for a, b in zip(le_v.split(dims, -1), f_v.split(dims, -1))]
    return sum(terms) / len(terms)


# ---- Training: forward_step, train_one_epoch, main ---------------------------------------------------------
def build_transform(args):
    return common.pretrain_transform(args)  # RandomResizedCrop + flip (MAE)


def build_model(args):
    """-> (model, teacher): the trained student (encoder, mimic head, MAE decoder) and the frozen teacher.
    Resolves args.fusion_layers (so that checkpoints record the blocks used)."""
    encoder = build_encoder(args)
    depth = len(encoder.blocks)
    layers = sorted(set(args.fusion_layers or default_fusion_layers(depth)))
    if layers[0] < 1 or layers[-1] != depth:
        raise common.UserError(f"--fusion_layers {' '.join(map(str, layers))}: give block numbers from 1 to {depth} "
                               f"that include the last block {depth}")
    args.fusion_layers = layers
    names = args.teacher.split(",")  # Table 4 Joint: two teachers, one weight each
    teacher = common.Teacher(args.teacher, args.teacher_weights, encoder.grid) if len(names) == 1 else \
        JointTeacher(names, args.teacher_weights.split(","), encoder.grid)
    teacher, dims = teacher.to(args.device), getattr(teacher, "dims", None) or teacher.dim  # C, or [C_1, C_2]
    model = MRMAE(encoder, dims, layers, args.decoder_dim, args.decoder_depth, args.decoder_heads, args.loss_weights,
                  args.high_level)
    return model.to(args.device), teacher


def forward_step(model, teacher, batch, args, per_patch=False):
    """One training forward on a batch of images (on the device). Returns the loss, the mask [B, N] (True = hidden),
    the teacher's [CLS] attention and, only when asked (per_patch: pictures, benchmarks), the per-patch loss [B, N]:
    ||D_j - I_j||^2 on masked patches and ||L(E_j) - F_j||^2 on visible ones, each divided by its own mean over the
    batch (pixels and features have different units: on one scale the picture would only show the mask), and then
    patch_loss_note, which says so on the picture; row 5 (--high_level reconstruct): the two reconstruction terms of
    each masked patch, each so divided, summed."""
    images, N = batch, teacher.grid ** 2
    n_keep = common.num_visible(N, args.mask_ratio)  # 49 of 196 at r = 0.75
    # one teacher pass on the intact image: mimic targets F (Sec. 3.2) and [CLS] attention (Sec. 3.3)
    out = teacher(images, tokens=True, cls_attn=args.focus != "none")
    attn = out["cls_attn"] if args.focus != "none" else images.new_ones(len(images), N)
    mask = focused_sampling(attn, n_keep, args.focus)
    ids_keep, ids_mask = common.ids_from_mask(mask, n_keep)  # [B, 49], [B, 147]
    patch = images.shape[-1] // teacher.grid  # the student's patch size: the teacher's grid is the student's
    pixels, tokens = common.pixel_targets(images, patch, args.norm_pix_loss), out["tokens"][:, 1:]  # I, F of all patches
    loss, pred, high = model(images, ids_keep, ids_mask, pixels, tokens)
    patch_loss = None
    if per_patch:
        l_r = reconstruction_loss(common.gather(pred.detach(), ids_mask), common.gather(pixels, ids_mask), True)  # [B, 147]
        patch_loss = torch.zeros(mask.shape, device=images.device)  # [B, N]
        if args.high_level == "reconstruct":  # both terms on the masked patches
            l_f = reconstruction_loss(high.detach(), common.gather(tokens, ids_mask), True)  # [B, 147]
            patch_loss.scatter_(1, ids_mask, l_r / l_r.mean() + l_f / l_f.mean())
            note = "loss map: L_R of the pixels + L_R of the features on the masked patches, each / its mean"
        else:
            l_m = joint_mimic_loss(high.detach(), common.gather(tokens, ids_keep), getattr(teacher, "dims", None), True)
            patch_loss.scatter_(1, ids_mask, l_r / l_r.mean()).scatter_(1, ids_keep, l_m / l_m.mean())  # l_m [B, 49]
            note = "loss map: L_R on the masked patches, L_M on the visible ones, each / its mean" + \
                (" (L_M: the mean of the teachers' terms)" if hasattr(teacher, "dims") else "")
    notes = {"patch_loss_note": note} if per_patch else {}
    return {"loss": loss, "mask": mask, "patch_loss": patch_loss, "cls_attn": out.get("cls_attn"), **notes}


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
        return common.visualize(args, dataset, model, teacher, forward_step, "mr_mae")
    loader = common.build_loader(dataset, args)
    optimizer = common.build_optimizer(model, args)
    ckpt = common.Checkpointer(args, "mr_mae", model, optimizer)  # exact resume: model, optimizer, RNGs, position
    start_epoch, start_step = ckpt.resume()  # --resume (auto: OUTPUT_DIR's last); another run's folder is refused
    high = "mimicked at the visible patches (L_M)" if args.high_level == "mimic" else \
        "reconstructed at the masked patches by the decoder (Table 3 row 5)"
    joint = "," in args.teacher  # Table 4 Joint: both teachers named in the start line
    high += ", one head per teacher, L_M their mean (Table 4 Joint)" if joint else ""
    who = f"teacher{'s' * joint} {args.teacher.replace(',', ', ')} ({args.teacher_weights.replace(',', ', ')})"
    targets = f"pixels (L_R) and {who} features {high}, weights " \
        f"{args.loss_weights[0]:g} / {args.loss_weights[1]:g}; {args.focus} focus"
    common.announce(args, "mr_mae", dataset, loader.sampler.steps, start_epoch, targets)
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
