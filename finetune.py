"""Fine-tuning, linear probing and attentive probing of a pre-trained encoder, and export to timm.

How all five papers evaluate their encoders on ImageNet-1K (MILAN App. A.1, CAE Sec. 4.2 / App. A,
CAE v2 Tables 9-10, MR-MAE Sec. 4.1, MaskAlign Sec. 4.1 / App. A); they all follow MAE (He et al. 2022)
or BEiT (Bao et al. 2022):
- --mode finetune: end to end, AdamW with layer-wise lr decay (BEiT), drop path, RandAugment m9,
  mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, global average pooling of the patch
  tokens + LayerNorm (fc_norm) + Linear head.
- --mode linprobe: frozen encoder, CLS token after the final norm (--pool avg: mean patch token), BatchNorm without affine
  + Linear, LARS.
- --mode attnprobe: frozen encoder, one cross-attention unit whose query is a learned extra class token
  over the patch tokens (no MLP, no skip connection), BatchNorm without affine + Linear, SGD (CAE App. A).
cae.py / cae_v2.py encoders get BEiT's relative position bias in finetune and attnprobe, as released (--rel_pos_bias).
- --probe_patches semantic: a probe's frozen encoder sees the top 50% of the patches by the --teacher's class-token
  attention (MILAN Table 7 #6). --eval --ensemble: the mean of two models' softmax outputs (MR-MAE Table 4 "Sep.").
Top-1 / top-5 on the validation split every epoch; --eval alone evaluates; --export_timm writes timm keys.
--finetune takes a checkpoint of milan.py, cae.py, cae_v2.py, mr_mae.py or mask_align.py (its
model.encoder), a finetune.py checkpoint (encoder and head), or a timm-format ViT state dict.

Deviations from the released code (facebookresearch/mae main_finetune.py / main_linprobe.py, which MILAN and
MaskAlign reuse; Atten4Vis/CAE tools/run_attentive.py), one line each:
- RandAugment is torchvision's v2.RandAugment(2, 9), an approximation of timm's rand-m9-mstd0.5-inc1.
- mixup/cutmix are torchvision's v2 MixUp/CutMix, chosen 50/50 per batch; sample i mixes with i-1.
- the attentive probe attends over the patch tokens only (CAE App. A: "the patch representations"); the
  released code also passes the encoder's CLS token; its released call crashes (TypeError) as well.
- the attentive probe's BatchNorm uses running statistics at evaluation; CAE's released code uses batch ones.
- fc_norm starts fresh (MAE); CAE's run_class_finetuning initialises it from the encoder's final norm.
- semantic aware probing keeps 50% of the patches (MILAN Sec. 3.2); MILAN's released models_probe.py keeps 70%.

Paper ViT-B runs (per-paper flags in README), e.g. MILAN App. A.1 fine-tuning, batch 128 x 8 GPUs = 1024,
lr = 1e-4 x 1024 / 256 = 4e-4:
  torchrun --nproc_per_node=8 finetune.py --data /imagenet --finetune out/milan/checkpoint-399.pth --blr 1e-4 --min_lr 0
Linear probe (MILAN: batch 2048 x 8 = 16384, lr = 0.05 x 16384 / 256 = 3.2):
  torchrun --nproc_per_node=8 finetune.py --mode linprobe --data /imagenet --finetune CKPT --blr 0.05 --epochs 100
Smoke run: python finetune.py --data fake --finetune OUT/checkpoint-last.pth --epochs 1 --warmup_epochs 0 --batch_size 8
  --output_dir FT
"""
import argparse
import math
import os
from contextlib import nullcontext

import common  # first: a Ctrl-C or SIGTERM during the slow imports is then one line (common.py's top)
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2


# ---- Arguments: MAE's ViT-B protocols as defaults (each paper's flags in README) -----------------
RECIPES = {  # per --mode, for every flag left unset; batch_size is per process (8 GPUs in the papers)
    # MAE's released ViT-B fine-tuning (FINETUNE.md; MILAN, MR-MAE, MaskAlign follow MAE): batch 1024, blr 5e-4,
    # layer decay 0.65, 100 epochs, 5 warmup, wd 0.05, drop path 0.1, AdamW (0.9, 0.999), cosine to 1e-6
    "finetune": dict(batch_size=128, blr=5e-4, epochs=100, warmup_epochs=5, weight_decay=0.05, min_lr=1e-6, drop_path=0.1),
    # MAE's linear probe (FINETUNE.md) = CAE App. A = CAE v2 Table 9: LARS, batch 16384, blr 0.1 (lr 6.4), 90 epochs,
    # 10 warmup, wd 0
    "linprobe": dict(batch_size=2048, blr=0.1, epochs=90, warmup_epochs=10, weight_decay=0.0, min_lr=0.0, drop_path=0.0),
    # CAE App. A attentive probing: SGD momentum 0.9, batch 8192, lr 0.4 (blr 0.0125), 90 epochs, 10 warmup, wd 0
    "attnprobe": dict(batch_size=1024, blr=0.0125, epochs=90, warmup_epochs=10, weight_decay=0.0, min_lr=0.0,
                      drop_path=0.0)}


def get_args(argv=None):
    p = common.get_parser("Fine-tuning, linear probing, attentive probing, timm export of a pre-trained encoder",
                          pretrain=False, helps={
        "--data": "ImageNet-style root: DIR/train/<class>/<image> and DIR/val/<class>/<image> (val scored every epoch), "
                  "or 'fake' (generated images); required to train or --eval",
        "--betas": "AdamW betas (--mode finetune; the probes' LARS and SGD have none)",
        "--weight_decay": "weight decay: AdamW's (finetune), LARS's (linprobe) or SGD's (attnprobe); unset: the mode's",
        "--drop_path": "stochastic depth of the last block; unset: the mode's (" + ", ".join(
            f"{m} {r['drop_path']:g}" for m, r in RECIPES.items()) + ")"})
    p.set_defaults(**{k: None for k in RECIPES["finetune"]}, betas=(0.9, 0.999), crop_min=0.08)  # MAE / timm crop (0.08, 1)
    a = p.add_argument
    a("--mode", choices=list(RECIPES), help="end to end (MAE/BEiT), linear probe (MAE), or attentive probe (CAE Sec. "
      "4.2); default: finetune, or with --eval that of the --finetune checkpoint; the recipe flags left unset take the "
      "mode's: " +
      "; ".join(f"{m}: " + " ".join(f"{k}={v:g}" for k, v in r.items()) for m, r in RECIPES.items()))
    a("--finetune", required=True, metavar="CKPT", help="a checkpoint of milan.py, cae.py, cae_v2.py, mr_mae.py or "
      "mask_align.py (its encoder is loaded), a finetune.py checkpoint (encoder and head), or a timm ViT state dict")
    a("--eval", action="store_true", help="only report top-1/top-5 on the val split for --finetune (or --resume)")
    a("--pool", choices=["cls", "avg"], help="linprobe: the CLS token after the final norm (MAE's protocol), or the "
      "mean of the patch tokens after it (global pooling, as BEiT's linear probe); default: the --finetune checkpoint's, "
      "else cls")
    a("--probe_patches", choices=["all", "semantic"], help="probes: every patch, or the top 50%% by the --teacher's "
      "class-token attention (MILAN Table 7 #6; unset --mode: linprobe); default: the --finetune checkpoint's, else all")
    a("--teacher", default=argparse.SUPPRESS, help="--probe_patches semantic's (default: the checkpoint's, else ViT-B-16)")
    a("--teacher_weights", default=argparse.SUPPRESS, help="its weights (default: the checkpoint's, else openai)")
    a("--ensemble", metavar="CKPT2", help="evaluate the mean softmax of --finetune's and this finetune.py model (MR-MAE "
      "Table 4 Sep.; implies --eval)")
    a("--nb_classes", type=common.COUNT, help="classes of the head (default: those of the training data; --data fake has 10)")
    a("--layer_decay", type=common.Range(float, "(0, 1]"), default=0.65, help="finetune: lr scale decay^(L+1-layer) (BEiT; MAE/MILAN/CAE ViT-B "
      "0.65, CAE v2 0.75, MR-MAE and MaskAlign 0.6)")
    a("--smoothing", type=common.FRACTION, default=0.1, help="finetune: label smoothing")
    a("--mixup", type=common.NONNEG, default=0.8, help="finetune: mixup alpha (0: off)")
    a("--cutmix", type=common.NONNEG, default=1.0, help="finetune: cutmix alpha (0: off)")
    a("--reprob", type=common.Range(float, "[0, 1]"), default=0.25, help="finetune: random erasing probability (MAE, CAE)")
    a("--rel_pos_bias", action=argparse.BooleanOptionalAction, help="BEiT's relative position bias in every block, "
      "zero at start; default: on for cae.py / cae_v2.py files in finetune and attnprobe modes (as released), else off")
    a("--export_timm", metavar="OUT.pth", help="write the --finetune encoder with timm's keys to OUT.pth and exit")
    args = p.parse_args(argv)
    args.eval = args.eval or args.ensemble is not None  # an ensemble of trained models is only evaluated
    args.mode = args.mode or (None if args.eval else "linprobe" if args.probe_patches == "semantic" else "finetune")
    for k, v in RECIPES[args.mode or "finetune"].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    return args


# ---- Model: probes and heads ----------------------------------------------------------------------
class AttentivePool(nn.Module):
    """CAE Sec. 4.2 / App. A attentive probing: one cross-attention unit. The query is a learned extra
    class token (not the encoder's), keys and values are the patch tokens. "There is no MLP or skip
    connection": out = W_o concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h, nothing added. LayerNorms on the
    query and on the tokens before the projections as in CAE's released AttentiveBlock. x [B, N, D] -> [B, D]."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)  # our choice; the paper gives no init
        self.norm_q, self.norm_kv = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q = self.q(self.norm_q(self.query)).view(1, self.num_heads, 1, D // self.num_heads).expand(B, -1, -1, -1)
        k, v = self.kv(self.norm_kv(x)).view(B, N, 2, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, d_h]: softmax over the N patches
        return self.proj(out.reshape(B, D))  # concat heads, W_o; no "+ query" (no skip), no MLP


class RelPosAttention(nn.Module):
    """A block's attention (its qkv, proj) + BEiT's relative position bias (CAE App. A follows BEiT; released: on):
    softmax(q k^T / sqrt(d) + B) v, B[h, q, k] = table[index[q, k], h]; the table starts at zero (pre-training)."""
    qkv_heads = common.Attention.qkv_heads
    def __init__(self, attn, grid):
        super().__init__()
        self.num_heads, self.qkv, self.proj, n = attn.num_heads, attn.qkv, attn.proj, (2 * grid - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n + 3, attn.num_heads))
        y, x = (c.flatten() for c in torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))  # [N] each
        index = torch.empty(1 + grid * grid, 1 + grid * grid, dtype=torch.long)  # [1+N, 1+N]: query row, key column
        index[1:, 1:] = (y[:, None] - y[None] + grid - 1) * (2 * grid - 1) + x[:, None] - x[None] + grid - 1  # dy, dx
        index[0, 1:], index[1:, 0], index[0, 0] = n, n + 1, n + 2  # CLS -> patch, patch -> CLS, CLS -> CLS
        self.register_buffer("relative_position_index", index, persistent=False)  # rebuilt, not saved (as timm)
    def forward(self, x):
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # [H, 1+N, 1+N]
        out = F.scaled_dot_product_attention(*self.qkv_heads(x), attn_mask=bias.to(x.dtype))  # [B, H, 1+N, C/H]
        return self.proj(out.transpose(1, 2).flatten(2))  # [B, 1+N, C]


class Classifier(nn.Module):
    """encoder + what reads its tokens [B, 1+N, D]. finetune (MAE/BEiT global pooling): mean of the patch
    tokens, fc_norm, head; the encoder's final norm is dropped as in MAE (timm names: a finetune-mode
    checkpoint is timm's global_pool='avg' classifier). linprobe: CLS token after the final norm,
    head = BatchNorm(affine=False) + Linear. attnprobe: patch tokens, head = AttentivePool + BN + Linear.
    In the probes the encoder is frozen: no gradients, always in eval mode."""
    def __init__(self, encoder, kind, nb_classes, pool="cls"):
        super().__init__()
        self.encoder, self.kind, self.pool, D = encoder, kind, pool, encoder.embed_dim
        if kind == "finetune":
            encoder.norm = nn.Identity()  # MAE: global pooling replaces the final norm by fc_norm after the mean
            encoder.pos_embed.requires_grad_(True)  # MAE: the sin-cos position embedding becomes learnable
            self.fc_norm, self.head = nn.LayerNorm(D, eps=1e-6), nn.Linear(D, nb_classes)
            linear, std = self.head, 2e-5  # MAE main_finetune
        else:
            encoder.requires_grad_(False)
            pool = [AttentivePool(D, encoder.blocks[-1].attn.num_heads)] if kind == "attnprobe" else []
            self.head = nn.Sequential(*pool, nn.BatchNorm1d(D, affine=False, eps=1e-6), nn.Linear(D, nb_classes))
            linear, std = self.head[-1], 0.01  # MAE linear probe; CAE N(0, 0.01)
        nn.init.trunc_normal_(linear.weight, std=std), nn.init.zeros_(linear.bias)

    def train(self, mode=True):
        super().train(mode)
        if self.kind != "finetune":
            self.encoder.eval()  # frozen encoder: no drop path
        return self

    def select(self, tokens):
        """What the head reads from the encoder output [B, 1+N, D]."""
        if self.kind == "finetune":
            return self.fc_norm(tokens[:, 1:].mean(1))  # [B, D], mean over the N patch tokens
        if self.kind == "linprobe":  # CLS [B, D], or (--pool avg) the mean of the N patch tokens [B, D]
            return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(1)
        return tokens[:, 1:]  # attnprobe: patches [B, N, D]

    def forward(self, images, ids_keep=None):
        with nullcontext() if self.kind == "finetune" else torch.no_grad():
            tokens = self.encoder(images, ids_keep)  # [B, 1+N, D]; ids_keep [B, n]: those patches only, [B, 1+n, D]
        return self.head(self.select(tokens))  # [B, classes]


def semantic_ids(teacher, images):
    """MILAN Table 7 #6: the ids [B, N/2] (ascending) of "the top 50% important image patches"; None: every patch."""
    attn = teacher(images, tokens=False, cls_attn=True)["cls_attn"] if teacher else None  # [B, N], MILAN Eq. 3
    return None if attn is None else attn.topk(attn.shape[1] // 2, 1).indices.sort(1).values  # [B, N/2]: 98 of 196


# ---- Loading a pre-trained encoder ----------------------------------------------------------------
def read_pretrained(path, flag="--finetune"):
    """A --finetune file -> dict(encoder: timm-named state dict, state: the whole state dict, args: the
    writer's args (empty for timm files), method). Refuses, in one line, a file without a ViT encoder."""
    if not os.path.isfile(path):
        raise common.UserError(f"{flag} {path}: no such file; pass a checkpoint-*.pth of a method file or a timm ViT")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise common.UserError(f"{flag} {path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    meta = obj if isinstance(obj, dict) else {}
    sd = meta.get("model", meta.get("state_dict", obj))
    sd = {k.removeprefix("module."): t for k, t in sd.items() if torch.is_tensor(t)} if isinstance(sd, dict) else {}
    if any(k.startswith("encoder.") for k in sd):  # ours: model.encoder of every method file
        enc = {k[len("encoder."):]: t for k, t in sd.items() if k.startswith("encoder.")}
    else:  # timm / MAE / DINO format: the backbone at the top level, classifier keys dropped
        enc = {k: t for k, t in sd.items() if not k.startswith(("head.", "fc_norm."))}
    if "cls_token" not in enc or not any(k.startswith("blocks.0.") for k in enc):
        raise common.UserError(f"{flag} {path}: holds no ViT encoder (no encoder.* or timm cls_token/blocks keys); "
                               f"pass a checkpoint of milan.py, cae.py, cae_v2.py, mr_mae.py, mask_align.py or timm")
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    return dict(encoder=enc, state=sd, args=args, method=meta.get("method") if args else None)  # None: timm


def infer_model(enc, flag_value):
    """The VIT_CONFIGS name of a timm-format encoder, from its patch size, width and depth."""
    patch, dim = enc["patch_embed.proj.weight"].shape[-1], enc["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("blocks."))
    for name, (p, w, d, _) in common.VIT_CONFIGS.items():
        if (p, w, d) == (patch, dim, depth):
            return name
    raise common.UserError(f"--finetune {flag_value}: a ViT of patch {patch}, width {dim}, depth {depth} is none of "
                           f"{', '.join(common.VIT_CONFIGS)}")


def new_encoder(args, src):
    """The encoder's architecture rebuilt from the file: mr_mae's ConvViT when its args say so, else common.ViT
    with layer scale when the file has ls1.gamma (CAE, CAE v2) and the head count of its args (CAE v2's ViT-T: 12),
    at --input_size, with --drop_path, relative position bias when args.rel_pos_bias (else: if the file has it);
    args.layer_scale: the pre-training's (for the timm hint; the gammas are loaded)."""
    if args.arch != "vit":
        try:
            import mr_mae
        except ImportError:
            raise common.UserError(f"--finetune {args.finetune}: a --arch {args.arch} encoder needs mr_mae.py") from None
        return mr_mae.build_encoder(argparse.Namespace(**dict(src["args"], drop_path=args.drop_path,
                                                               input_size=args.input_size)))
    args.layer_scale = src["args"].get("layer_scale", 0.1) if "blocks.0.ls1.gamma" in src["encoder"] else None
    heads = src["args"].get("num_heads") or common.VIT_CONFIGS[args.model][3]  # (timm files: the name's)
    encoder = common.build_vit(args.model, args.input_size, drop_path=args.drop_path, init_values=args.layer_scale,
                               num_heads=heads)
    own = "blocks.0.attn.relative_position_bias_table" in src["encoder"]  # (a caller without the flag: the file's)
    for blk in encoder.blocks if getattr(args, "rel_pos_bias", own) else []:
        blk.attn = RelPosAttention(blk.attn, encoder.grid)  # same qkv / proj, plus the table
    return encoder


def rel_pos_bias(args, src):
    """--rel_pos_bias resolved: a file with tables (a finetune.py checkpoint) keeps them; else the flag; else on for
    cae / cae_v2 files in finetune and attnprobe, as released (run_linear.py is run with --disable_rel_pos_bias)."""
    own = "blocks.0.attn.relative_position_bias_table" in src["encoder"]
    on = own if src["method"] == "finetune" or own else args.rel_pos_bias if args.rel_pos_bias is not None else \
        src["method"] in ("cae", "cae_v2") and args.mode in ("finetune", "attnprobe")
    if args.rel_pos_bias not in (None, on) or on and args.arch != "vit":  # a finetune.py model's own; a conv encoder
        what = f"of --arch {args.arch}, which takes no" if args.arch != "vit" else "with" if own else "without"
        raise common.UserError(f"--{'' if args.rel_pos_bias else 'no-'}rel_pos_bias: {args.finetune} holds a model "
                               f"{what} relative position bias; leave the flag out")
    return on


def load_encoder(encoder, src, args):
    """Copy the file's encoder tensors into encoder (position embedding resized to --input_size); decoder,
    teacher and head keys are ignored. Every encoder parameter must be found."""
    enc = dict(src["encoder"])
    if "pos_embed" in enc and enc["pos_embed"].shape != encoder.pos_embed.shape:
        enc["pos_embed"] = common.resize_pos(enc["pos_embed"][0], encoder.grid)[None]  # [1, 1+N, D]
    own = encoder.state_dict()
    enc.update(fresh := {k: t for k, t in own.items() if k.endswith("relative_position_bias_table") and k not in enc})
    missing = [k for k in own if k not in enc]
    if missing:
        raise common.UserError(f"--finetune {args.finetune}: lacks encoder weights {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''}; pass a pre-training checkpoint")
    try:
        encoder.load_state_dict({k: enc[k] for k in own})
    except RuntimeError as e:
        raise common.UserError(f"--finetune {args.finetune} does not fit --model {args.model} "
                               f"({str(e).splitlines()[-1].strip()[:150]})") from None
    loaded, zero = len(own) - len(fresh), f"; {len(fresh)} relative position bias tables start at zero" if fresh else ""
    if args.rank == 0:
        print(f"--finetune {args.finetune}: loaded {loaded} encoder tensors from a {src['method'] or 'timm-format'} "
              f"file; ignored {len(src['state']) - loaded} other keys (decoder, teacher, head){zero}")


def build_model(args, src):
    """The classifier on the CPU: a finetune.py checkpoint whole, or the pre-trained encoder + a new head."""
    encoder = new_encoder(args, src)
    if src["method"] == "finetune":  # encoder and trained head, as written by this script
        model = Classifier(encoder, src["args"]["mode"], src["args"]["nb_classes"], src["args"].get("pool", "cls"))
        try:
            model.load_state_dict(src["state"])
        except RuntimeError as e:
            raise common.UserError(f"--finetune {args.finetune}: does not fit its own args "
                                   f"({str(e).splitlines()[-1].strip()[:150]})") from None
        return model
    load_encoder(encoder, src, args)
    return Classifier(encoder, args.mode, args.nb_classes, args.pool)


def semantic_teacher(args, src, given, encoder):
    """--probe_patches semantic's frozen teacher on the device (outside DDP and the checkpoint), else None. The flags: as
    given, else a finetune.py checkpoint's (--teacher_weights: where its weights are now), else the defaults."""
    own = {"probe_patches": "all", **src["args"]} if src["method"] == "finetune" else {}
    for k, default in (("probe_patches", "all"), ("teacher", "ViT-B-16"), ("teacher_weights", "openai")):
        if k != "teacher_weights" and given.get(k) and own.get(k, given[k]) != given[k]:  # its head was trained on them
            raise common.UserError(f"--{k} {given[k]}: --finetune {args.finetune} was trained with --{k} {own[k]}")
        setattr(args, k, given.get(k) or own.get(k, default))
    semantic = args.probe_patches == "semantic"
    if semantic and args.mode == "finetune" or not semantic and {"teacher", "teacher_weights"} & set(given):
        raise common.UserError("--probe_patches semantic feeds a frozen encoder; pass --mode linprobe or attnprobe" if
                               semantic else "--teacher: only --probe_patches semantic uses a teacher; leave it out")
    if not semantic:
        del args.teacher, args.teacher_weights  # none announced, none in the checkpoint
    return common.Teacher(args.teacher, args.teacher_weights, encoder.grid).to(args.device).prepare(args) if semantic \
        else None


def ensemble_member(args):
    """MR-MAE Table 4 "CLIP/DINO (Sep.)": --ensemble's finetune.py model (its own encoder, head, probe patches) ->
    (model, teacher) on the device; refused unless trained on --finetune's classes."""
    src, path = read_pretrained(args.ensemble, "--ensemble"), args.ensemble
    own = dict(src["args"], finetune=path, arch=src["args"].get("arch", "vit"))
    if src["method"] != "finetune" or (own["nb_classes"], own.get("classes")) != (args.nb_classes, args.classes):
        raise common.UserError(f"--ensemble {path}: is no finetune.py checkpoint (a trained head) of the {args.nb_classes} "
                               f"classes of --finetune {args.finetune}; pass one")
    margs = argparse.Namespace(**dict(vars(args), **{k: own[k] for k in ("finetune", "arch", "model", "mode")}))
    model = build_model(margs, src).to(args.device)
    return model, semantic_teacher(margs, src, {}, model.encoder)


def export_timm(args, src):
    """Write the encoder with timm's keys: loads into timm.create_model('vit_base_patch16_224', num_classes=0)
    (init_values=... for layer-scale encoders; with relative position bias timm's Beit). A finetune-mode checkpoint
    also brings fc_norm and head: global_pool='avg' classifier. Probe heads have no timm counterpart: left out."""
    if args.arch != "vit":
        raise common.UserError(f"--export_timm: {args.finetune} holds an mr_mae --arch {args.arch} encoder (conv stages), "
                               f"which timm's VisionTransformer cannot hold; fine-tune it with finetune.py instead")
    args.rank, args.mode = 0, None  # (a pre-training file: the encoder as trained, no table unless --rel_pos_bias)
    args.rel_pos_bias = rel_pos_bias(args, src)
    if src["method"] == "finetune":  # trained classifier: its head too when timm has one like it
        model = build_model(args, src)
        model = model if model.kind == "finetune" else model.encoder
    else:
        model = new_encoder(args, src)
        load_encoder(model, src, args)
    sd = {k.removeprefix("encoder."): t.contiguous() for k, t in model.state_dict().items()}
    if args.rel_pos_bias:  # Beit's names: gamma_1/2; q_bias, v_bias and no key bias: q . b_k is one constant added to
        sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): t for k, t in sd.items()}
        for k in [k for k in sd if k.endswith("qkv.bias")]:  # all of a query's logits, which the softmax takes out
            sd[k[:-8] + "q_bias"], _, sd[k[:-8] + "v_bias"] = (t.clone() for t in sd.pop(k).chunk(3))  # -8: qkv.bias
    out, folder = args.export_timm, os.path.dirname(os.path.abspath(args.export_timm))
    problem = "is a folder; pass a file name in it" if os.path.isdir(out) else "exists; pass a new file name (an " \
        "export never overwrites a file)" if os.path.exists(out) else None if os.path.isdir(folder) else \
        f"its folder {folder} does not exist"
    if problem:
        raise common.UserError(f"--export_timm {out}: {problem}")
    try:
        common.save_checkpoint(out, **sd)
    except (OSError, RuntimeError) as e:  # torch.save reports a file it cannot open as a RuntimeError
        raise common.UserError(f"--export_timm {out}: cannot be written ({type(e).__name__}); pass a writable path") from None
    (p, dim, depth, _), heads = common.VIT_CONFIGS[args.model], args.num_heads
    kw = f"num_classes={sd['head.weight'].shape[0]}, global_pool='avg'" if "head.weight" in sd else "num_classes=0"
    kw += f", init_values={args.layer_scale:g}" if {"blocks.0.ls1.gamma", "blocks.0.gamma_1"} & set(sd) else ""
    net, kw = ("beit.Beit", kw + ", use_rel_pos_bias=True" + ("" if "head.weight" in sd else ", global_pool=''")) \
        if args.rel_pos_bias else ("vision_transformer.VisionTransformer", kw)  # (Beit's default 'avg': no final norm)
    print(f"wrote {len(sd)} tensors to {args.export_timm}; load with timm.models.{net}("
          f"img_size={args.input_size}, patch_size={p}, embed_dim={dim}, depth={depth}, num_heads={heads}, {kw})"
          f".load_state_dict(torch.load('{args.export_timm}'))")


# ---- Optimisers: layer-wise lr decay (finetune), LARS (linprobe), SGD (attnprobe) ------------------
def layer_id(name, depth):
    """BEiT's layer ids (CAE App. A, MAE lr_decay): 0 for patch_embed, cls_token, pos_embed (and MR-MAE's conv
    stages), i+1 for encoder.blocks.i (its relative position bias too), depth+1 for the rest (fc_norm, head)."""
    if not name.startswith("encoder.") or name.startswith("encoder.norm."):
        return depth + 1
    parts = name.split(".")
    return int(parts[2]) + 1 if parts[1] == "blocks" else 0


def param_groups_lrd(model, weight_decay, layer_decay):
    """AdamW groups with lr_scale = layer_decay^(L+1-layer_id) (common.set_lr applies it); no weight decay on
    1-d tensors (biases, norms, layer scale), cls_token and pos_embed; relative position bias: decayed, as released."""
    depth, groups = len(model.encoder.blocks), {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            i, plain = layer_id(name, depth), p.ndim <= 1 or name.split(".")[-1] in ("cls_token", "pos_embed")
            group = groups.setdefault((i, plain), {"params": [], "weight_decay": 0.0 if plain else weight_decay,
                                                   "lr_scale": layer_decay ** (depth + 1 - i)})
            group["params"].append(p)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's linear probe uses it: for a weight matrix (ndim > 1) the update
    u = g + wd p is scaled by the trust ratio eta ||p|| / ||u|| (1 if a norm is 0); 1-d tensors (biases)
    take u = g. Then heavy-ball momentum: mu = m mu + u, p = p - lr mu."""
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if p.ndim > 1:
                    u = u.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = p.norm(), u.norm()
                    trust = torch.where((p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm, 1.0)
                    u = u * trust
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(u)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(model, args):
    if model.kind == "finetune":  # BEiT / MAE: AdamW with layer-wise lr decay
        return torch.optim.AdamW(param_groups_lrd(model, args.weight_decay, args.layer_decay), lr=args.lr,
                                 betas=tuple(args.betas), fused=args.device.startswith("cuda"))
    params = list(model.head.parameters())  # the probes train the head only
    if model.kind == "linprobe":  # CAE App. A, MILAN App. A.1, CAE v2 Table 9: LARS, momentum 0.9
        return LARS(params, lr=args.lr, weight_decay=args.weight_decay)
    # CAE App. A: SGD momentum 0.9; Nesterov as CAE's released run_attentive (the paper does not say)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)


# ---- Training ---------------------------------------------------------------------------------------
def build_transform(args, train=True):
    """Probes: RandomResizedCrop (bicubic) + flip, as pre-training (common.View: uint8, normalised on the device).
    Val: 8-bit RGB (common.to_rgb), resize to input/0.875 (256 for 224), centre crop (MAE, BEiT), uint8 too. Finetune:
    8-bit RGB, crop + flip, RandAugment m9 (2 ops, mean-pixel fill), normalisation and random erasing in the worker
    (float: the erased pixels are N(0, 1) in normalised units)."""
    bicubic = InterpolationMode.BICUBIC
    if not train:
        return v2.Compose([v2.Lambda(common.to_rgb), v2.Resize(int(args.input_size / 0.875), interpolation=bicubic),
                           v2.CenterCrop(args.input_size), v2.PILToTensor()])
    if args.mode != "finetune":  # probes: no other augmentation (CAE App. A, MILAN App. A.1)
        return common.View(args.input_size, args.crop_min)
    crop = [v2.RandomResizedCrop(args.input_size, scale=(args.crop_min, 1.0), interpolation=bicubic),
            v2.RandomHorizontalFlip()]
    fill = [round(255 * m) for m in common.IMAGENET_MEAN]
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
    erase = [v2.RandomErasing(args.reprob, value="random")] if args.reprob > 0 else []  # N(0, 1) pixels, timm 'pixel'
    return v2.Compose([v2.Lambda(common.to_rgb)] + crop + [v2.RandAugment(2, 9, interpolation=bicubic, fill=fill)] + tail + erase)


def build_mixup(args):
    """Batch-level mixup (alpha 0.8) or cutmix (alpha 1.0), one of the two per batch -> soft targets [B, K]."""
    ops = ([v2.MixUp(alpha=args.mixup, num_classes=args.nb_classes)] if args.mixup > 0 else []) + \
          ([v2.CutMix(alpha=args.cutmix, num_classes=args.nb_classes)] if args.cutmix > 0 else [])
    return v2.RandomChoice(ops) if ops and args.mode == "finetune" else None


def forward_logits(model, trained, images, teacher=None):
    """trained is what DDP wraps: the whole classifier when fine-tuning, the head only when probing."""
    if model.kind == "finetune":
        return trained(images)
    with torch.no_grad():
        tokens = model.encoder(images, semantic_ids(teacher, images))  # frozen encoder: no graph, [B, 1+N, D] (or 1+N/2)
    return trained(model.select(tokens))


def train_one_epoch(model, trained, loader, optimizer, scaler, mix, epoch, args, ckpt, teacher=None):
    model.train()  # the probes keep their encoder in eval mode
    optimizer.zero_grad(set_to_none=True)
    meter = common.Meter(loader, epoch, args, ckpt)  # a resumed epoch goes on from its checkpoint
    smoothing = args.smoothing if model.kind == "finetune" else 0.0
    for step, (images, labels) in meter:  # step counts from the resume point
        if step % args.accum_iter == 0:  # per-iteration warmup + cosine (MAE)
            lr = common.lr_at(epoch + step / meter.steps, args)
            common.set_lr(optimizer, lr)
        images, labels = common.to_device(images, args.device), labels.to(args.device, non_blocking=True)
        if mix is not None:
            images, labels = mix(images, labels)  # labels -> soft targets [B, K]
        update = (step + 1) % args.accum_iter == 0
        with trained.no_sync() if args.world_size > 1 and not update else nullcontext():
            with common.autocast(args):
                logits = forward_logits(model, trained, images, teacher)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)  # soft-target CE with smoothing
            scaler.scale(loss / args.accum_iter).backward()
        meter.update(step, loss, lr, len(images))
        if update:
            common.optimizer_step(trained, optimizer, scaler, args)  # clip to --clip_grad, step, zero grads
            ckpt.step_done(epoch, step + 1, meter)  # mid-epoch checkpoint when due (minutes or steps)
    return meter.stats(epoch, lr)


@torch.no_grad()
def evaluate(model, loader, args, teacher=None, others=()):
    """Top-1 / top-5 (only above 5 classes: else 100% by construction) accuracy (%) and cross-entropy on the val split,
    summed over all processes. others: (model, teacher) pairs to ensemble with it (MR-MAE Table 4 "Sep."): the mean of
    the models' softmax outputs is scored."""
    models = [(m.eval(), t) for m, t in [(model, teacher), *others]]
    total = torch.zeros(5, device=args.device)  # loss sum, top-1 hits, top-5 hits, images scored, unreadable
    for images, labels in loader:
        common.stop_if_asked()  # --eval: a SIGTERM or Ctrl-C (during training one waits for the epoch's checkpoint)
        images, labels = common.to_device(images, args.device), labels.to(args.device, non_blocking=True)
        read = labels >= 0  # an unreadable image comes as a stand-in labelled -1: not scored
        with common.autocast(args):
            logp = torch.stack([m(images, semantic_ids(t, images)).float()[read].log_softmax(1) for m, t in models])
        logp = logp.logsumexp(0) - math.log(len(models))  # [M, b, K] -> [b, K]: log of the mean softmax (M = 1: its own)
        labels = labels[read]
        hits = logp.topk(min(5, logp.shape[1]), 1).indices == labels[:, None]  # [b, 5]
        total += torch.stack([F.nll_loss(logp, labels, reduction="sum"), hits[:, 0].sum().float(),
                              hits.any(1).sum().float(), read.sum().float(), (~read).sum().float()])
    if dist.is_initialized():
        dist.all_reduce(total)
    loss, top1, top5, n, unreadable = total.tolist()
    if n == 0:
        raise common.UserError(f"--data {args.data}: no val image could be read")
    return {"val_loss": loss / n, "acc1": 100 * top1 / n, **({"acc5": 100 * top5 / n} if args.nb_classes > 5 else {}),
            "val_images": int(n), "val_unreadable": int(unreadable)}


def with_classes(ds, classes, args, whose="train's"):
    """The val split with train's class indices (a val folder with fewer classes, or another order, gets train's
    labels); a class that train lacks is refused. classes None: --data fake, or nothing to match. whose: the classes'
    source, for the message (--eval: the checkpoint's)."""
    if classes is None or not hasattr(ds, "samples"):
        return ds
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in ds.classes if c not in index]
    if unknown:
        raise common.UserError(f"--data {args.data}: val has class folder(s) {', '.join(unknown[:3])} that are not "
                               f"among {whose} {len(classes)} classes; every val class must be one of them")
    ds.samples = ds.imgs = [(path, index[ds.classes[t]]) for path, t in ds.samples]
    ds.targets, ds.classes, ds.class_to_idx = [t for _, t in ds.samples], list(classes), index
    return ds


def scored(stats):
    top5, unreadable = f" top-5 {stats['acc5']:.2f}%" if "acc5" in stats else "", f" ({stats['val_unreadable']} " \
        "unreadable, not scored)" if stats["val_unreadable"] else ""
    return f"top-1 {stats['acc1']:.2f}%{top5} loss {stats['val_loss']:.4f} on {stats['val_images']} images{unreadable}"


def num_classes(dataset):
    return getattr(dataset, "num_classes", None) or len(dataset.classes)  # FakeImages / ImageFolder


def class_names(args, src, train):
    """The class names the labels index: train's folders; for --eval, those the checkpoint was trained on (else
    DIR/train's, if there is one). None for --data fake."""
    if train is not None:
        return getattr(train, "classes", None)
    if src["args"].get("classes"):
        return src["args"]["classes"]
    root = os.path.join(args.data, "train")
    return datasets.folder.find_classes(root)[0] if args.data != "fake" and os.path.isdir(root) else None


def main(argv=None):
    args = get_args(argv)
    src = read_pretrained(args.finetune)
    args.arch = src["args"].get("arch", "vit")
    own = src["args"].get("model") if args.arch != "vit" else \
        src["args"].get("model") or infer_model(src["encoder"], args.finetune)
    if getattr(args, "model", own) != own:
        raise common.UserError(f"--model {args.model}: --finetune {args.finetune} holds a {own} encoder; pass "
                               f"--model {own} or leave --model out")
    args.model = own
    if args.arch == "vit":  # the file's head count (CAE v2's ViT-T has 12), kept in this run's checkpoints too
        args.num_heads = src["args"].get("num_heads") or common.VIT_CONFIGS[own][3]
    if args.export_timm:
        return export_timm(args, src)
    if src["method"] == "finetune":  # a finetune.py checkpoint brings its head: its mode, pooling and classes
        for k, own in (("mode", src["args"]["mode"]), ("pool", src["args"].get("pool", "cls"))):
            if getattr(args, k) not in (None, own):  # (None: not given; --mode: --eval without it)
                raise common.UserError(f"--{k} {getattr(args, k)}: --finetune {args.finetune} is a --{k} {own} "
                                       f"checkpoint; pass --{k} {own} to train it further (--eval alone takes its {k})")
            setattr(args, k, own)
        args.nb_classes = src["args"]["nb_classes"]
    args.mode, args.pool = args.mode or "finetune", args.pool or "cls"
    args.rel_pos_bias = rel_pos_bias(args, src)  # kept in this run's checkpoints' args
    if args.eval and src["method"] != "finetune" and not args.resume:
        why = "is a timm-format file with a classifier head, but without the mode and classes that --eval needs; " \
            "evaluate the finetune.py checkpoint it was exported from" if "head.weight" in src["state"] else \
            f"holds no trained head (a {src['method'] or 'timm-format'} encoder); train one first (--mode linprobe, " \
            f"attnprobe or finetune), then --eval its checkpoint"
        raise common.UserError(f"--eval: {args.finetune} {why}")
    common.setup(args)
    if args.mode != "finetune" and not args.eval and args.batch_size < 2:
        raise common.UserError(f"--batch_size {args.batch_size}: --mode {args.mode} trains a BatchNorm, which needs "
                               f"at least 2 images per batch")
    train = None if args.eval else common.build_dataset(args, build_transform(args))
    args.classes = class_names(args, src, train)  # val labels take train's indices; saved with the checkpoint
    whose = "the checkpoint's" if train is None and src["args"].get("classes") else "train's"  # (--eval: its own)
    val = with_classes(common.build_dataset(args, build_transform(args, train=False), split="val"), args.classes, args,
                       whose)
    data_classes = num_classes(train or val)
    if data_classes < 2:  # one class: every image is right, a metric that cannot fail
        raise common.UserError(f"--data {args.data}: 1 class ({', '.join(args.classes)}); a classifier needs 2 or more")
    args.nb_classes = args.nb_classes or data_classes
    if data_classes > args.nb_classes:
        raise common.UserError(f"--nb_classes {args.nb_classes}: the data has {data_classes} classes; pass at least that")
    model = build_model(args, src).to(args.device)
    teacher = semantic_teacher(args, src, dict(vars(args)), model.encoder)  # MILAN Table 7 #6
    optimizer = build_optimizer(model, args)
    ckpt = common.Checkpointer(args, "finetune", model, optimizer)
    start_epoch, start_step = ckpt.resume(fresh_ok=args.eval)  # --resume (auto: OUTPUT_DIR's); another run is refused
    val_loader = common.build_loader(val, args, train=False)
    if args.eval:
        stats = evaluate(model, val_loader, args, teacher, [ensemble_member(args)] if args.ensemble else [])
        if args.rank == 0:  # MR-MAE Table 4 (Sep.): the ensemble's
            print(f"eval {args.resume or args.finetune}{' + ' + args.ensemble if args.ensemble else ''}: {scored(stats)}")
        return stats
    loader = common.build_loader(train, args)
    common.announce(args, f"finetune.py --mode {args.mode}", train, loader.sampler.steps, start_epoch)
    trained = model if model.kind == "finetune" else model.head  # DDP around the trained modules only
    trained = DDP(trained) if args.world_size > 1 else trained
    trained = torch.compile(trained) if args.compile else trained
    mix, best = build_mixup(args), ckpt.extra.get("best_acc1", 0.0)  # (over the epochs before a resume too)
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        stats = train_one_epoch(model, trained, loader, optimizer, ckpt.scaler, mix, epoch, args, ckpt, teacher)
        stats.update(evaluate(model, val_loader, args, teacher))
        best = ckpt.extra["best_acc1"] = max(best, stats["acc1"])
        ckpt.epoch_done(epoch)
        common.log_epoch(args, stats)
        if args.rank == 0:
            print(f"epoch {epoch}: {scored(stats)} (best top-1 {best:.2f}%)")


if __name__ == "__main__":
    common.cli(main)
