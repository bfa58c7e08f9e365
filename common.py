"""common.py: what is identical for the five method files. First what the papers describe (ViT, the frozen Teacher with
MILAN Eq. 3's class-token attention, masking, pixel targets), then, behind one divider, the machinery. Whatever an
ablation could change (sampler, decoder, loss, recipe) lives in the method file. Conventions: mask bool [B, N], True =
hidden from the encoder; ids_keep sorted ascending; tokens [CLS, patch_1 .. patch_N] in raster order."""
import argparse, atexit, collections, fcntl, json, logging, math, multiprocessing, os, random, signal, socket, sys, time
import textwrap, threading, traceback, unicodedata, warnings, zipfile
from contextlib import nullcontext

def early_signal(signum, frame):  # `python milan.py` imports this file first: a Ctrl-C or SIGTERM during the slow
    print(f"\n{'interrupted' if signum == signal.SIGINT else 'stopped by SIGTERM'}; no checkpoint was written, so a "
          "relaunch starts from the beginning", file=sys.stderr)  # imports below is cli's line, not a traceback
    os._exit(128 + signum)  # (nothing is open yet)
EARLY = {s: signal.signal(s, early_signal) for s in (signal.SIGINT, signal.SIGTERM) if hasattr(sys.modules.get(
    "__main__"), "__file__") and threading.current_thread() is threading.main_thread() and signal.getsignal(s) in (
    signal.default_int_handler, signal.SIG_DFL)}  # a script's (not a notebook's) default handlers, until the imports end
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm
for sig, handler in EARLY.items():
    signal.signal(sig, handler)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

class UserError(Exception):
    """A wrong flag, path or file: one line on stderr, exit 2, no traceback. local: met by this rank alone (its images,
    its loss), which reports it; otherwise every rank meets it and each node's local rank 0 reports it."""
    def __init__(self, message, local=False):
        super().__init__(message)
        self.local = local

# ---- ViT with timm's parameter names (patch_embed.proj, cls_token, pos_embed, blocks.i.*, norm) --------------
def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sin-cos position embedding, [1+grid*grid, dim], CLS row all zeros. Channels [0, dim/2) encode
    the column, [dim/2, dim) the row; each half is [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/4)), k < dim/4."""
    assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # [G, G] each
    angle = lambda p: p.flatten().double()[:, None] * omega[None]  # [G*G, dim/4]
    emb = torch.cat([angle(cols).sin(), angle(cols).cos(), angle(rows).sin(), angle(rows).cos()], 1)
    return torch.cat([torch.zeros(1, dim), emb.float()])  # [1+G*G, dim], raster order

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
    def qkv_heads(self, x):  # [B, N, C] -> q, k, v each [B, H, N, C/H]
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    def forward(self, x):
        out = F.scaled_dot_product_attention(*self.qkv_heads(x))  # [B, H, N, C/H]
        return self.proj(out.transpose(1, 2).flatten(2))  # [B, N, C]

class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))
    def forward(self, x):
        return x * self.gamma

def Mlp(dim, hidden):  # timm's Mlp, its parameter names
    return nn.Sequential(collections.OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

def drop_path(x, p, training):
    """Stochastic depth: zero a sample's residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    return x * x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p) / (1 - p)

class Block(nn.Module):
    """Pre-norm block: x + DropPath(LS1(Attn(LN1(x)))), then x + DropPath(LS2(MLP(LN2(x))))."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, init_values=None, eps=1e-6):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path
    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
    def forward(self, x):  # [B, 3, H, W] -> [B, N, D], raster order
        return self.proj(x).flatten(2).transpose(1, 2)

VIT_CONFIGS = {  # name: (patch, width, depth, heads); nano: the tests' size
    "vit_nano_patch16": (16, 64, 2, 2), "vit_tiny_patch16": (16, 192, 12, 3),
    "vit_small_patch16": (16, 384, 12, 6), "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16), "vit_huge_patch14": (14, 1280, 32, 16)}

class ViT(nn.Module):
    """The MAE encoder: forward(x, ids_keep [B, n]) embeds all patches, keeps CLS + ids_keep, runs the blocks and the
    final norm -> [B, 1+n, D]; return_hidden: also each block's output (residual stream, no final norm)."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path=0.0, init_values=None, eps=1e-6, learned_pos=False):
        super().__init__()
        self.patch_size, self.embed_dim, self.grid, self.num_patches = patch_size, embed_dim, img_size // patch_size, \
            (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid)[None], requires_grad=learned_pos)
        dpr = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dpr[i], init_values, eps) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        for m in self.modules():  # MAE init: xavier linears and patch projection, N(0, 0.02) CLS
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(embed_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)
    def forward(self, x, ids_keep=None, return_hidden=False):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # [B, N, D]
        if ids_keep is not None:
            x = gather(x, ids_keep)  # [B, n, D]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)  # [B, 1+n, D]
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            if return_hidden:  # keep block outputs only when asked (memory)
                hidden.append(x)
        return (self.norm(x), hidden) if return_hidden else self.norm(x)

def build_vit(name, img_size=224, **kw):
    patch, dim, depth, heads = VIT_CONFIGS[name]
    return ViT(img_size, patch, dim, depth, kw.pop("num_heads", heads), **kw)

# ---- Frozen teacher: an open_clip CLIP ViT, DINO ViT-B/16, or 'tiny' (random, for tests) ---------------------
def tiny_clip_tower():
    """--teacher tiny: an open_clip CLIP vision tower of 2 blocks, width 64, 2 heads, output 32, QuickGELU."""
    import open_clip
    return open_clip.transformer.VisionTransformer(224, 16, 64, 2, 2, 4.0, output_dim=32,
                                                   act_layer=open_clip.transformer.QuickGELU)

def resize_pos(pos, grid):
    """[1+G0*G0, W] -> [1+grid*grid, W]: bicubic on the 2-D patch grid, CLS row kept."""
    g0 = math.isqrt(pos.shape[0] - 1)
    if g0 == grid:
        return pos
    patch = F.interpolate(pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic")
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)])  # [1+grid^2, W]

class Teacher(nn.Module):
    """Frozen teacher: never in DDP, always eval, no autograd (a constant target, in all five papers). Takes the
    student's ImageNet-normalised view, re-normalises it to its own statistics and resizes it to give the student's
    patch grid. Returns what was asked for: tokens [B, 1+N, C] (CLIP: ln_post(all tokens) @ proj; DINO: final norm),
    hidden (per block [B, 1+N, W], the residual stream after it), cls_attn [B, N] (MILAN Eq. 3)."""
    def __init__(self, name="ViT-B-16", weights="openai", grid=14):
        super().__init__()
        self.name, self.grid, self.kind = name, grid, "dino" if name == "dino_vitb16" else "clip"
        self.net = load_teacher(name, weights)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.kind == "dino" else (CLIP_MEAN, CLIP_STD)
        pos = self.net.pos_embed[0] if self.kind == "dino" else self.net.positional_embedding
        self.patch = 16 if self.kind == "dino" else self.net.patch_size[0]
        self.register_buffer("pos", resize_pos(pos.detach().float(), grid)[None], persistent=False)  # [1, 1+N, W]
        mean_in, std_in, mean, std = map(torch.tensor, (IMAGENET_MEAN, IMAGENET_STD, mean, std))
        self.register_buffer("a", (std_in / std).view(1, 3, 1, 1), persistent=False)  # ImageNet-normalised x ->
        self.register_buffer("b", ((mean_in - mean) / std).view(1, 3, 1, 1), persistent=False)  # its own: x a + b
        self.depth, self.width = len(self.blocks()), self.pos.shape[-1]
        self.dim = self.width if self.kind == "dino" else self.net.proj.shape[1]  # C
        self.requires_grad_(False).eval()
    def train(self, mode=True):  # a teacher stays in eval mode
        return super().train(False)
    def prepare(self, args):
        """On CUDA with --amp bf16/fp16 the weights in that dtype, cast once (no fp32 master copy needed); --compile."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        if dtype and args.device.startswith("cuda"):
            self.net.to(dtype)
            self.pos = self.pos.to(dtype)
        if args.compile:
            self.compile()
        return self
    def blocks(self):
        return self.net.blocks if self.kind == "dino" else self.net.transformer.resblocks
    def last_block_with_cls_attn(self, blk, x, out):
        """The last block, with out['cls_attn'] [B, N] from its own attention probabilities (one pass)."""
        if self.kind == "dino":  # SDPA returns no weights: the CLS row of softmax(q k^T / sqrt(d)) explicitly
            q, k, v = blk.attn.qkv_heads(blk.norm1(x))  # [B, H, 1+N, dh]
            a = (q[:, :, :1].float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            out["cls_attn"] = a.mean(1)[:, 0, 1:]  # [B, N], not renormalised
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, 1+N, W]
            x = x + blk.ls1(blk.attn.proj(y))
            return x + blk.ls2(blk.mlp(blk.norm2(x)))
        y = blk.ln_1(x)  # open_clip ResidualAttentionBlock, with the head-mean weights of its attention
        y, a = blk.attn(y, y, y, need_weights=True)  # a [B, 1+N, 1+N], averaged over heads
        out["cls_attn"] = a[:, 0, 1:].float()
        x = x + blk.ls_1(y)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    @torch.no_grad()  # not inference_mode: the targets enter the losses' autograd graphs as constants
    def forward(self, images, tokens=True, hidden=False, cls_attn=False):
        x, size = (images * self.a + self.b).to(self.pos.dtype), self.grid * self.patch  # fp32 maths, then its dtype
        if x.shape[-2:] != (size, size):  # e.g. CLIP ViT-L/14 sees 196 px for a 14x14 grid
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        if self.kind == "dino":
            x, cls = self.net.patch_embed(x), self.net.cls_token  # [B, N, W], [1, 1, W]
        else:
            x, cls = self.net.conv1(x).flatten(2).transpose(1, 2), self.net.class_embedding.view(1, 1, -1)
        x = torch.cat([cls.expand(len(x), -1, -1).to(x.dtype), x], 1) + self.pos.to(x.dtype)  # [B, 1+N, W]
        x = x if self.kind == "dino" else self.net.ln_pre(x)
        out, levels, blocks = {}, [], self.blocks()
        for i, blk in enumerate(blocks):
            if cls_attn and i == len(blocks) - 1:  # MILAN Eq. 3: s_class = softmax(q_class K^T / sqrt(d)), the CLS
                # query over all 1+N keys of the last block, averaged over heads; CLS->CLS dropped (MILAN's released code)
                x = self.last_block_with_cls_attn(blk, x, out)  # the block's output, computed once
            else:
                x = blk(x)
            if hidden:  # keep the per-block outputs only when asked: ~3 GB for ViT-L/14 at batch 256
                levels.append(x)
        if hidden:
            out["hidden"] = levels
        if tokens:
            out["tokens"] = self.net.norm(x) if self.kind == "dino" else self.net.ln_post(x) @ self.net.proj
        return out

# ---- Masking: bool mask [B, N], True = hidden from the encoder; pixel targets ---------------------------------
def num_visible(num_patches, mask_ratio, allow_zero=False):
    """floor(N (1 - r)), the patches the encoder sees (49 of 196 at r = 0.75); allow_zero: r = 0 is valid (MaskAlign)."""
    low, most = (0 <= mask_ratio, num_patches) if allow_zero else (0 < mask_ratio, num_patches - 1)
    if most < 1:
        raise UserError(f"--input_size: {num_patches} patch leaves none to mask; pass a larger --input_size")
    n = int(num_patches * (1 - mask_ratio) + 1e-6) if low and mask_ratio < 1 else 0  # + 1e-6: 196 * 0.25 is 49, not 48
    if not 0 < n <= most:  # (NaN fails both comparisons: n = 0)
        raise UserError(f"--mask_ratio {mask_ratio} must be in {'[' if allow_zero else '('}0, 1) and leave 1 to "
                        f"{most} of the {num_patches} patches visible")
    return n

def check_width(width, heads, what):
    """A transformer's width must split into its heads and into the 4 parts of the 2-D sin-cos position embedding."""
    if width % heads or width % 4:
        raise UserError(f"{what}: the width must be a multiple of 4 (2-D sin-cos positions) and of the heads; pass a "
                        f"multiple of {math.lcm(heads, 4)}")

def gather(x, ids):
    """The tokens of x [B, N, C] at ids [B, L] (e.g. ids_keep, ids_mask) -> [B, L, C]."""
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))

def mask_from_ids(ids_keep, num_patches):
    """ids_keep [B, n] -> bool mask [B, N], True where a patch is not kept."""
    mask = torch.ones(len(ids_keep), num_patches, dtype=torch.bool, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, False)

def ids_from_mask(mask, n_keep):
    """bool mask [B, N] with n_keep False per row -> ids_keep [B, n_keep], ids_mask [B, N-n_keep], ascending."""
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first, each part in raster order
    return order[:, :n_keep], order[:, n_keep:]

def random_masking(batch, num_patches, n_keep, device=None):
    """MAE's uniform masking: every sample keeps a uniformly random set of n_keep patches."""
    return mask_from_ids(torch.rand(batch, num_patches, device=device).argsort(1)[:, :n_keep], num_patches)

class BlockMaskGenerator:
    """Block-wise masking (BEiT; CAE Sec. 2.2): exactly num_masked patches of a grid x grid raster: rectangles of area
    U(min_patches, remaining), log-uniform aspect in [min_aspect, 1/min_aspect], added until the count is exact (CAE:
    no early stop). Made in DataLoader workers (Python's `random`). -> bool [grid*grid]; self.blocks: the rectangles."""
    def __init__(self, grid=14, num_masked=98, min_patches=16, min_aspect=0.3):
        self.grid, self.num_masked, self.min_patches = grid, num_masked, min_patches
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    def _add_block(self, mask, max_patches):
        for _ in range(10):
            area = random.uniform(self.min_patches, max_patches)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < h < self.grid and 0 < w < self.grid:
                top, left = random.randint(0, self.grid - h), random.randint(0, self.grid - w)
                delta = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < delta <= max_patches:
                    mask[top:top + h, left:left + w] = True
                    self.blocks.append((top, left, h, w))
                    return delta
        return 0
    def __call__(self):
        mask, count, self.blocks = np.zeros((self.grid, self.grid), dtype=bool), 0, []
        while count < self.num_masked:
            count += self._add_block(mask, self.num_masked - count)
        return torch.from_numpy(mask.flatten())

def pixel_targets(images, patch=16, norm_pix=True):
    """Pixel targets (CAE Sec. 3.1, MR-MAE Eq. 1): [B, 3, H, W] -> [B, N, p*p*3] in MAE's patchify order; norm_pix:
    each patch normalised by its own mean and (unbiased variance + 1e-6)^0.5 (MAE's norm_pix_loss)."""
    B, C, H, W = images.shape
    x = images.float().reshape(B, C, H // patch, patch, W // patch, patch)  # [B, C, h, p, w, p]
    x = torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // patch) * (W // patch), patch * patch * C)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** 0.5 if norm_pix else x

# ======== The machinery: entry point, teacher weights, data, command line, torchrun, optimiser, checkpoints, pictures ========
RUN = {"rank": 0, "output_dir": None, "at": None, "saved": None, "stop": None, "lock": None}  # where this process is

class Stopped(Exception):
    """SIGTERM or Ctrl-C: the run stops (training: after the update in progress and a checkpoint)."""

def on_signal(signum, frame):  # recorded: raised here, it could be lost (in an at-fork hook, logging); the run acts on
    if RUN["stop"] and signum == signal.SIGINT:  # it where it looks (stop_if_asked, Checkpointer.step_done); Ctrl-C
        raise Stopped("SIGINT")  # twice: now (not SIGTERM twice: under torchrun the scheduler's and torchrun's own)
    RUN["stop"] = signal.Signals(signum).name

def stop_if_asked():  # before the first training step (start-up, --eval): a signal recorded so far stops the run here
    if RUN["stop"] and RUN["at"] is None:
        raise Stopped(RUN["stop"])

def cli(main, argv=None):
    """Every script's entry point: a UserError is one line (exit 2; under torchrun once a node); SIGTERM / Ctrl-C one
    line on how to go on; any other error its traceback, then the process and its workers end at once (exit 1)."""
    signal.signal(signal.SIGTERM, on_signal), signal.signal(signal.SIGINT, on_signal)
    try:
        main(argv)
    except UserError as e:  # raised in a DataLoader worker, it arrives wrapped: keep its own last line
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 or e.local:
            print(f"error: {str(e).strip().splitlines()[-1].removeprefix('common.UserError: ')}", file=sys.stderr)
        sys.exit(2)
    except (Stopped, KeyboardInterrupt) as e:  # where the run stopped, and how to continue it
        name, last = str(e) if isinstance(e, Stopped) else "SIGINT", os.path.join(RUN["output_dir"] or ".", "checkpoint-last.pth")
        saved = " (epoch {}, step {})".format(*RUN["saved"]) if RUN["saved"] else ""
        how = f"relaunch the same command with --resume auto to continue from {last}{saved}" if RUN["output_dir"] \
            and os.path.isfile(last) else "no checkpoint was written, so a relaunch starts from the beginning"
        if RUN["rank"] == 0:
            where = " at epoch {}, step {}; ".format(*RUN["at"]) if RUN["at"] else "; "
            print(f"\n{'interrupted' if name == 'SIGINT' else 'stopped by ' + name}{where}{how}", file=sys.stderr)
        sys.exit(130 if name == "SIGINT" else 143)
    except Exception:
        if argv is not None:  # (a test: raised)
            raise
        signal.signal(signal.SIGTERM, signal.SIG_DFL), signal.signal(signal.SIGINT, signal.SIG_DFL)  # a signal: now
        traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        kill_workers()
        os._exit(1)

# ---- Teacher weights: open_clip names, OpenAI's TorchScript files, DINO, no network ------------------------------
def load_teacher(name, weights):
    """'tiny', an open_clip CLIP ViT (QuickGELU for OpenAI's weights, which give wrong features in a GELU config) or DINO
    ViT-B/16 (a ViT); weights 'openai', a local file or 'none'."""
    if weights == "openai" and name in ("dino_vitb16", "tiny"):
        raise UserError(f"--teacher {name} has no 'openai' weights; pass --teacher_weights PATH (DINO: "
                        f"facebookresearch/dino's dino_vitbase16_pretrain.pth) or none (random)")
    if name == "dino_vitb16":
        net = ViT(224, 16, 768, 12, 12, learned_pos=True)
    else:
        import open_clip  # only CLIP teachers need it
        base = name.removesuffix("-quickgelu")
        if name != "tiny" and base not in open_clip.list_models():
            raise UserError(f"--teacher {name}: unknown; use an open_clip ViT name (ViT-B-16, ViT-L-14, ...), "
                            f"dino_vitb16, or tiny")
        quick = weights == "openai" or name.endswith("-quickgelu") or is_torchscript(weights)
        if weights == "openai":
            go_offline_if_hub_unreachable()
        logging.disable(logging.CRITICAL)  # open_clip's log lines ("initialized randomly": a file follows)
        try:
            net = tiny_clip_tower() if name == "tiny" else open_clip.create_model(
                base, pretrained="openai" if weights == "openai" else None, force_quick_gelu=quick).visual
        except Exception as e:
            raise UserError(f"--teacher_weights openai: could not get OpenAI weights for {name} ({type(e).__name__}: "
                            f"no internet?); download {base}.pt elsewhere (README, 'Teacher weights') and pass "
                            f"--teacher_weights /path/to/{base}.pt") from None
        finally:
            logging.disable(logging.NOTSET)
        if getattr(net, "attn_pool", 1) is not None or not hasattr(net, "class_embedding"):
            raise UserError(f"--teacher {name}: only CLIP ViTs with a class token work here (ViT-B-16, ViT-L-14, ...)")
    if weights not in ("openai", "none"):
        try:
            net.load_state_dict(read_weights(weights), strict=True)
        except RuntimeError as e:
            raise UserError(f"--teacher_weights {weights} does not fit --teacher {name} "
                            f"({str(e).splitlines()[-1].strip()[:150]}); pass the file of that architecture") from None
    if weights == "none" and RUN["rank"] == 0:  # tiny: the tests' and smoke runs' tower, random by design
        print("teacher tiny: random weights (--teacher_weights none), the smoke runs' tower" if name == "tiny" else
              f"WARNING: teacher {name} has RANDOM weights (--teacher_weights none): fine for tests and smoke runs, "
              f"meaningless for pre-training", file=sys.stderr)
    elif RUN["rank"] == 0:
        what = f"{weights} ({'OpenAI TorchScript archive, ' if is_torchscript(weights) else ''}{len(net.state_dict())} " \
            f"tensors{', QuickGELU' if any(type(m).__name__ == 'QuickGELU' for m in net.modules()) else ''})"
        print(f"teacher {name}: weights loaded from " + ("open_clip's 'openai' tag" if weights == "openai" else what))
    return net

def is_torchscript(path):
    return os.path.isfile(path) and zipfile.is_zipfile(path) and any(
        n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())

def read_weights(path, flag="--teacher_weights"):
    """A state dict from a local file (torch.save'd dict, training checkpoint, or OpenAI's TorchScript CLIP .pt)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; pass a local weights file, or 'none' for random weights")
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated, yet OpenAI's files need it
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(path, map_location="cpu").state_dict() if is_torchscript(path) else \
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable PyTorch weights file ({type(e).__name__})") from None
    while isinstance(sd, dict) and any(isinstance(sd.get(k), dict) for k in ("state_dict", "model")):
        sd = sd["state_dict"] if isinstance(sd.get("state_dict"), dict) else sd["model"]
    if not isinstance(sd, dict):
        raise UserError(f"{flag} {path}: holds no state dict")
    for prefix in ("module.", "visual.", "backbone."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
    return {k: t.float() for k, t in sd.items() if torch.is_tensor(t)}

def go_offline_if_hub_unreachable(timeout=3.0):
    """Without network the hub behind open_clip's 'openai' weights retries for a minute: go offline at once instead."""
    from urllib.parse import urlparse
    import huggingface_hub.constants as hub  # an open_clip dependency
    url = urlparse(hub.ENDPOINT)
    try:
        if not hub.is_offline_mode():
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        hub.HF_HUB_OFFLINE = True

# ---- Data: ImageFolder or generated images; uint8 views made in the workers, normalised on the device ----------
def decode(img, box, size):
    """A PIL image opened, not decoded, and the box (top, left, h, w) to resize to size x size -> (RGB image, box as
    (left, top, right, bottom) in its pixels, scale s). A JPEG whose crop is >= 2 x size a side is decoded at 1/2, 1/4
    or 1/8 scale (PIL's Image.draft: libjpeg scales the DCT), the crop keeping >= size pixels a side."""
    top, left, h, w = box
    s = 1
    while s < 8 and min(h, w) >= 2 * s * size:
        s *= 2
    if s == 1 or img.format != "JPEG" or not img.draft("RGB", (img.width // s, img.height // s)):
        s = 1
    img.load()  # decodes
    return to_rgb(img), (left / s, top / s, (left + w) / s, (top + h) / s), s

def to_rgb(img):
    """A decoded PIL Image in 8-bit RGB: RGB as it is (convert would copy it); 16-bit grey (PIL modes I;16*, I: PNG,
    TIFF) scaled to 0..255 first, x / 257 rounded (the inverse of 8 -> 16 bit's 257 x; convert clips it at 255)."""
    if img.mode.startswith("I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")

def resize(img, box, s, size, resample=Image.BICUBIC):
    """decode()'s box, size x size (PIL Image): at full scale crop + resize (torchvision's resized_crop), else from it."""
    if s == 1:
        return img.crop(tuple(int(v) for v in box)).resize((size, size), resample)
    return img.resize((size, size), resample, box=box)

class View:
    """A pre-training view, made in a DataLoader worker: `first` on the whole image (CAE v2's jitter), RandomResizedCrop
    (bicubic, scale (crop_min, 1)) and a flip with p 0.5, drawn from torch's RNG as torchvision's v2 transforms draw
    them -> uint8 [3, size, size], and mask_fn()'s mask [N] if given."""
    def __init__(self, size, crop_min, mask_fn=None, first=None):
        self.size, self.scale, self.mask_fn, self.first = size, (crop_min, 1.0), mask_fn, first
    def __call__(self, img):
        if self.first is not None:  # on the whole image, fully decoded
            img = self.first(to_rgb(img))
        box = RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))  # (top, left, h, w), from the header only
        flip = bool(torch.rand(1) < 0.5)
        view = pil_to_tensor(resize(*decode(img, box, self.size), self.size))  # [3, size, size] uint8
        view = view.flip(-1) if flip else view
        return (view, self.mask_fn()) if self.mask_fn else view

def pretrain_transform(args, mask_fn=None, first=None):
    return View(args.input_size, args.crop_min, mask_fn, first)

def to_device(batch, device):
    """A loader batch on the device (non_blocking); the student's view (the batch or its first element) is uint8 and
    ImageNet-normalised there; the rest (masks, labels, CAE's tokenizer view) is moved as it is."""
    if isinstance(batch, (tuple, list)):
        return (to_device(batch[0], device), *(b.to(device, non_blocking=True) for b in batch[1:]))
    x = batch.to(device, non_blocking=True)
    if x.dtype != torch.uint8:  # finetune.py's RandAugment path normalises in the workers
        return x
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x.float() / 255 - mean) / std  # [B, 3, H, W] float32

class FakeImages(torch.utils.data.Dataset):
    """--data fake: image i is uniform noise seeded by offset + i (the same in every run and worker), 10 classes."""
    num_classes = 10
    def __init__(self, n, size, transform, offset=0):
        self.n, self.size, self.transform, self.offset = n, size, transform, offset
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        rng = np.random.default_rng(self.offset + i)
        img = Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
        return self.transform(img), int(rng.integers(self.num_classes))

def build_dataset(args, transform, split="train"):
    """DIR/<split> (train: DIR itself if it has no train or val folder) as an ImageFolder of opened, not decoded images,
    or FakeImages. Refused: DIR/val without DIR/train, and class folders beside DIR/val (val would be trained on)."""
    if args.data == "fake":  # deterministic random images; 'val': 64 others, the same whatever the batch or --fake_size
        n = args.fake_size if split == "train" else 64
        return FakeImages(n, args.input_size, transform, 0 if split == "train" else 10 ** 6)
    layout = "pass an ImageNet-style folder (DIR/train/<class>/<image>, DIR/val/<class>/<image>) or --data fake"
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: {'is a file, not a folder' if os.path.exists(args.data) else 'no such folder'}"
                        f"; {layout}")
    root = os.path.join(args.data, split)
    if not os.path.isdir(root):
        odd = next((e.name for e in os.scandir(args.data) if e.is_dir() and e.name.lower() in ("train", "val")), None)
        if split != "train" or odd:  # (any case: 'Val' beside class folders was a class)
            raise UserError(f"--data {args.data}: has " + (f"no '{split}' folder" if split != "train" else f"a '{odd}' "
                            f"folder but no 'train' folder, so {odd} would be trained on as a class") + f"; {layout}")
        root = args.data  # DIR/<class>/<image>: pre-training needs no val split
    met, again = {}, []  # each image file once, by (inode, device): one reached again through a link is passed over
    def once(p):  # ImageFolder's is_valid_file (a broken link is kept: Samples names it unreadable)
        key = os.stat(p)[1:3] if os.path.exists(p) else p
        return p.lower().endswith(datasets.folder.IMG_EXTENSIONS) and (met.setdefault(key, p) == p or again.append(p))
    try:  # the header read; the view decodes
        dataset = datasets.ImageFolder(root, transform=transform, loader=Image.open, is_valid_file=once)
    except FileNotFoundError:
        names = datasets.folder.find_classes(root)[0] if any(e.is_dir() for e in os.scandir(root)) else []
        empty = [c for c in names if not any(datasets.folder.has_file_allowed_extension(f, datasets.folder.IMG_EXTENSIONS)
                                             for _, _, files in os.walk(os.path.join(root, c)) for f in files)]
        what = f"class folder(s) {', '.join(empty[:3])} of {root} hold no image file" if names and len(empty) < len(names) \
            else f"no images under {root}; expected {root}/<class>/<image>.jpg"
        raise UserError(f"--data {args.data}: {what}") from None
    loops = [os.path.join(t, d) for t, dirs, _ in (os.walk(root) if again else ()) for d in dirs  # (following no link)
             if (os.path.realpath(t) + os.sep).startswith(os.path.realpath(os.path.join(t, d)) + os.sep)]
    if loops:  # a folder linked inside itself: ImageFolder's walk went round it until the path grew too long
        raise UserError(f"--data {args.data}: {loops[0]} links to a folder that holds it (a loop); remove the link")
    return dataset

class SeededSampler(torch.utils.data.Sampler):
    """Training: DistributedSampler's order (seeded by seed + epoch, split across ranks), whole batches only, able to
    start mid-epoch without loading the skipped images. Evaluation: each image once (rank r: r, r + W, ...). Yields
    (epoch, index) keys: Samples seeds each image by its identity, so a resumed run sees the same pixels and masks."""
    def __init__(self, size, args, train=True):
        self.size, self.train, self.seed, self.rank, self.world = size, train, args.seed, args.rank, args.world_size
        self.per_rank = size // self.world if train else len(range(self.rank, size, self.world))
        self.batch, self.epoch, self.start = args.batch_size, 0, 0
        self.steps = self.per_rank // self.batch if train else math.ceil(self.per_rank / self.batch)  # per epoch
    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step
    def __iter__(self):
        if self.train:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            mine = order[:self.per_rank * self.world][self.rank::self.world][:self.steps * self.batch]
        else:
            mine = torch.arange(self.rank, self.size, self.world)
        yield from ((self.epoch, i) for i in mine[self.start * self.batch:].tolist())
    def __len__(self):
        end = self.steps * self.batch if self.train else self.per_rank
        return end - min(self.start * self.batch, end)

class Samples(torch.utils.data.Dataset):
    """dataset[(epoch, i)] with torch, numpy and python RNGs seeded by (seed, epoch, i). An unreadable file is named and
    flagged in .bad (shared by the workers) once an epoch, however often it is met (as another bad file's stand-in too);
    training takes the next image, evaluation a stand-in labelled -1."""
    def __init__(self, dataset, seed, train=True):
        self.dataset, self.seed, self.train = dataset, seed, train
        self.bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()
    def __getitem__(self, key):
        (epoch, i), n = key, len(self.dataset)
        main = torch.utils.data.get_worker_info() is None  # num_workers 0: keep the training RNGs intact
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if main else None
        s = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1, np.uint64)[0] >> 1)
        torch.default_generator.manual_seed(s), np.random.seed(s % 2 ** 32), random.seed(s)
        try:
            for j in ((i + d) % n for d in range(n)) if self.train else [i]:  # training: the next readable image
                try:
                    return self.dataset[j]
                except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL: unidentified, truncated, broken
                    # file, or over twice Image.MAX_IMAGE_PIXELS (a decompression bomb, not an OSError)
                    if not self.bad[j]:
                        self.bad[j] = True
                        path = getattr(self.dataset, "samples", [[f"#{j}"]] * n)[j][0]
                        print(f"warning: skipped unreadable image {path} ({type(e).__name__})", file=sys.stderr)
            if self.train:
                raise UserError("no image of --data could be read")
            return self.dataset.transform(Image.new("RGB", (64, 64))), -1  # a stand-in of the right shape
        finally:
            if main:
                torch.set_rng_state(saved[0]), np.random.set_state(saved[1]), random.setstate(saved[2])

def kill_workers():  # at exit (registered by build_loader) and on cli's error path: the daemonic children (our
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader workers) killed before multiprocessing's exit handler
    for child in multiprocessing.active_children():  # SIGTERMs them (ignored: ignore_signals) and waits on them forever
        child.kill() if child.daemon else None  # (SIGCHLD: torch's handler would raise for the workers killed here)

def ignore_signals(worker_id):  # DataLoader workers: Ctrl-C and SIGTERM are the main process's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if RUN["lock"] is not None:  # (its lock dies with the main process, not with a worker that outlives it)
        os.close(RUN["lock"])

def build_loader(dataset, args, train=True):
    if dist.is_initialized():  # every rank must split the same list of images, or the ranks' step counts differ
        sizes = [None] * args.world_size
        dist.all_gather_object(sizes, len(dataset))
        odd = next((r for r, n in enumerate(sizes) if n != sizes[0]), None)
        agree(f"--data {args.data}: rank {odd} sees {sizes[odd]} images, rank 0 {sizes[0]}; every node needs the same "
              f"dataset at the same path" if odd is not None else None)
    if train and len(dataset) // args.world_size < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} x {args.world_size} process(es) is larger than the dataset "
                        f"({len(dataset)} images); lower --batch_size")
    steps = len(dataset) // args.world_size // args.batch_size
    if train and steps < getattr(args, "accum_iter", 1):  # (the rest of an epoch's accumulation is dropped: announce)
        raise UserError(f"--accum_iter {args.accum_iter} is more than the {steps} steps of an epoch ({len(dataset)} "
                        f"images, batch {args.batch_size} x {args.world_size} process(es)): the weights would never be "
                        f"updated; lower --accum_iter or --batch_size")
    # its own generator: making an iterator must not draw from the training RNG (exact resume)
    atexit.unregister(kill_workers), atexit.register(kill_workers)  # registered last: run before multiprocessing's
    return DataLoader(Samples(dataset, args.seed, train), args.batch_size, sampler=SeededSampler(len(dataset), args, train),
                      num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"), worker_init_fn=ignore_signals,
                      persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(args.seed))

# ---- Command line, torchrun / DDP, seeds, precision -------------------------------------------------------------
class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a None default: the help says what it resolves to
        return action.help if action.default is None else super()._get_help_string(action)
    def _split_lines(self, text, width):  # a flag or a name (--batch_size, MR-MAE) is never broken at its hyphen
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

class Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        self.argv = sys.argv[1:] if args is None else [str(a) for a in args]
        return super().parse_args(args, namespace)
    def error(self, message):  # one line and exit 2, like every other mistake (no usage block); torchrun: once a node
        flag = message.removeprefix("argument ").split(":")[0].split("/")[0]
        if message.endswith("expected one argument") and flag in self.argv[:-1]:  # argparse took -1e-4 for a flag
            value = self.argv[self.argv.index(flag) + 1]
            message += f" (a value that starts with '-' is written {flag}={value})" if value.startswith("-") else ""
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

class Range:
    """An argparse type: a number in an interval such as Range(float, "[0, 1)"), else one error line at parse time."""
    def __init__(self, cast, interval):
        self.cast, self.interval, self.__name__ = cast, interval, cast.__name__  # argparse: "invalid int value"
        self.low, self.high = (float(v) for v in interval[1:-1].split(","))
    def __call__(self, text):
        v = self.cast(text)
        low = v >= self.low if self.interval[0] == "[" else v > self.low
        if not (low and (v <= self.high if self.interval[-1] == "]" else v < self.high)):
            raise argparse.ArgumentTypeError(f"{text} is outside {self.interval}")
        return v

COUNT, SIZE, NONNEG, POS, FRACTION = (Range(int, "[1, inf)"), Range(int, "[0, inf)"), Range(float, "[0, inf)"),
                                      Range(float, "(0, inf)"), Range(float, "[0, 1)"))

def get_parser(description, pretrain=True, helps=None, ratios="(0, 1)"):
    """The shared flags (MAE's spelling), each with its domain (ratios: --mask_ratio's); helps={flag: the file's help}."""
    p, helps = Parser(description=description, formatter_class=DefaultsHelpFormatter), helps or {}
    a = lambda *names, **kw: p.add_argument(*names, **dict(kw, help=helps.get(names[0], kw.get("help"))))
    a("--data", "--data_path", dest="data", help="ImageFolder root (DIR/train/<class>/<image>, or DIR/<class>/...), "
      "or 'fake' (generated images); required to train")
    a("--fake_size", type=COUNT, default=256, help="number of images of --data fake")
    a("--input_size", type=Range(int, "[1, 1024]"), default=224, help="image side in pixels (1024: 4096 patches)")
    a("--model", **dict(default="vit_base_patch16", help=", ".join(VIT_CONFIGS)) if pretrain else dict(
        default=argparse.SUPPRESS, help="default: the --finetune file's own (" + ", ".join(VIT_CONFIGS) + ")"))
    a("--drop_path", type=FRACTION, default=0.0, help="stochastic depth of the last block")
    if pretrain:
        a("--teacher", default="ViT-B-16", help="open_clip ViT name, dino_vitb16, or tiny (a 2-block CLIP tower)")
        a("--teacher_weights", default="openai", help="'openai' (downloads), a local file, or 'none' (random)")
        a("--mask_ratio", type=Range(float, ratios), default=0.75, help=f"fraction of patches hidden, in {ratios}")
    a("--batch_size", type=COUNT, default=64, help="per process")
    a("--accum_iter", type=COUNT, default=1, help="gradient accumulation steps")
    a("--epochs", type=COUNT, default=400, help="training epochs")
    a("--warmup_epochs", type=NONNEG, default=40, help="linear lr warmup, then cosine")
    a("--blr", type=POS, default=1.5e-4, help="lr = blr * batch_size * accum_iter * world_size / 256")
    a("--lr", type=POS, default=None, help="absolute lr (overrides --blr; default: from --blr)")
    a("--min_lr", type=NONNEG, default=0.0, help="lr at the end of the cosine")
    a("--weight_decay", type=NONNEG, default=0.05, help="AdamW weight decay")
    a("--betas", type=FRACTION, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    a("--clip_grad", type=NONNEG, default=0.0, help="max gradient norm (0: no clipping)")
    a("--crop_min", type=Range(float, "(0, 1]"), default=0.2, help="RandomResizedCrop scale = (crop_min, 1)")
    a("--output_dir", default="./output", help="checkpoints and log.txt")
    a("--resume", default="", help="checkpoint to continue from; 'auto': OUTPUT_DIR/checkpoint-last.pth if any")
    a("--resume_changes", action="store_true", help="go on from --resume although flags that change what is trained "
      "(sampler, ratios, losses, recipe) differ from its checkpoint's; every changed flag is named at the start")
    a("--save_freq", type=COUNT, default=20, help="keep checkpoint-<epoch>.pth every this many epochs")
    a("--save_every_minutes", type=NONNEG, default=30, help="also write checkpoint-last.pth within an epoch when this "
      "many minutes have passed since the last one (checked every --log_every updates; 0: off)")
    a("--save_every_steps", type=SIZE, default=0, help="also write checkpoint-last.pth every this many steps (0: off)")
    if pretrain:
        a("--visualize", type=Range(int, "[0, 32]"), default=0, metavar="N", help="0: off (train); else write "
          "OUTPUT_DIR/visualize.png for N images, a row each (with --resume CKPT or auto: that model), and exit")
    a("--seed", type=Range(int, "[0, 2147483647]"), default=0, help="each process uses seed + rank")
    a("--num_workers", type=SIZE, default=None, help="DataLoader workers per process (default: the node's cores per "
      "process, minus one, at least 1 and at most 10)")
    a("--amp", choices=["bf16", "fp16", "none"], default="bf16", help="autocast on GPU (CPU runs fp32)")
    a("--compile", action="store_true", help="torch.compile the student (slow first steps)")
    a("--log_every", type=COUNT, default=20, help="steps between progress updates (the only syncs)")
    return p

def setup(args, allow_zero_mask=False):
    """Checks the flags together, joins torchrun's process group, seeds, sets the lr (allow_zero_mask: MaskAlign)."""
    if not args.data:
        raise UserError("--data DIR is required: an ImageNet-style folder (DIR/train/<class>/<image>) or 'fake'")
    if args.model not in VIT_CONFIGS and getattr(args, "arch", "vit") == "vit":  # (mr_mae's --arch names its own)
        raise UserError(f"--model {args.model}: unknown; choose one of {', '.join(VIT_CONFIGS)}")
    patch = VIT_CONFIGS.get(args.model, (16,))[0]
    if args.input_size % patch:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {patch} of {args.model}")
    if hasattr(args, "mask_ratio"):  # not finetune.py
        num_visible((args.input_size // patch) ** 2, args.mask_ratio, allow_zero_mask)
    if args.save_every_steps % args.accum_iter:
        raise UserError(f"--save_every_steps {args.save_every_steps} must be a multiple of --accum_iter {args.accum_iter}")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file; pass a checkpoint-*.pth written by this script")
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if RUN["lock"] is not None:  # an earlier run in this process (main() from a script or a notebook): not held now
        os.close(RUN["lock"]), RUN.update(lock=None)
    RUN.update(rank=args.rank, output_dir=args.output_dir, at=None, saved=None)
    cuda, local = torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", 0))
    args.device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if args.world_size > 1:  # launched by torchrun: nccl on GPUs, gloo on CPU
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    if args.num_workers is None:  # size the loaders to the machine: all cores, shared by this node's processes
        args.num_workers = max(1, min(10, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    args.amp = args.amp if cuda else "none"  # bf16 autocast on these CPUs is ~5x slower than fp32
    random.seed(args.seed + args.rank), np.random.seed(args.seed + args.rank), torch.manual_seed(args.seed + args.rank)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    args.lr = args.blr * args.batch_size * args.accum_iter * args.world_size / 256 if args.lr is None else args.lr

def make_output_dir(args):
    """Rank 0 makes --output_dir once a run is about to write into it (never for a run refused earlier)."""
    if args.rank == 0:
        if os.path.isfile(args.output_dir):
            raise UserError(f"--output_dir {args.output_dir}: is a file, not a folder; pass a folder for the run")
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, ".write_test"), "w").close()
            os.remove(os.path.join(args.output_dir, ".write_test"))
        except OSError as e:
            raise UserError(f"--output_dir {args.output_dir}: not writable ({e.strerror})") from None

def hold_output_dir(args, make=True):
    """Rank 0: make --output_dir (make) and hold OUTPUT_DIR/.lock (flock) for the run's life, with its pid, host and
    command in it -> a problem line, or None. The kernel drops the lock when the process ends, however it ends, so a
    dead run never blocks its relaunch. make=False: only look for a live run's lock (nothing is written)."""
    path, fd = os.path.join(args.output_dir, ".lock"), None
    try:
        if make:
            make_output_dir(args)
        if RUN["lock"] is None and (make or os.path.isfile(path)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            RUN["lock"], fd = fd, None
        if make and RUN["lock"] is not None:
            os.ftruncate(RUN["lock"], 0)
            os.pwrite(RUN["lock"], f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M')}: "
                      f"{' '.join(sys.argv)}\n".encode(), 0)
    except UserError as e:
        return str(e)
    except BlockingIOError:  # held: name the run that holds it (its line, written once it has the lock)
        return f"--output_dir {args.output_dir} is in use by a live run ({open(path).read().strip() or 'starting'}); " \
               f"wait for it to end, or pass another --output_dir"
    except OSError as e:  # a filesystem without flock (see README), or a folder that is not ours to write: no lock
        if make:
            print(f"warning: --output_dir {args.output_dir}: cannot be locked ({e.strerror}); a second run there would "
                  f"not be refused", file=sys.stderr)
    finally:
        if fd is not None:
            os.close(fd)

def announce(args, name, dataset, steps, start_epoch=0, targets=None):
    """Rank 0: the run and its lr arithmetic in two lines (every flag is in each checkpoint's 'args'), warnings; for a
    finished run, that nothing is left to train. targets: what the student learns from, if not --teacher (CAE)."""
    if args.rank != 0:
        return
    if start_epoch >= args.epochs:
        return print(f"nothing to train: {args.output_dir} has finished {start_epoch} of --epochs {args.epochs}; pass "
                     f"a larger --epochs to train on")
    teacher = f", {targets}" if targets else f", teacher {args.teacher} ({args.teacher_weights})" \
        if hasattr(args, "teacher") else ""
    print(f"{name}: {args.model}{teacher}; --data {args.data}: {len(dataset)} images, {steps} steps of "
          f"{args.batch_size} per process per epoch; {args.epochs} epochs; --output_dir {args.output_dir}")
    print(f"effective batch {args.batch_size * args.accum_iter * args.world_size} = {args.batch_size} x accum "
          f"{args.accum_iter} x {args.world_size} process(es); base lr {args.blr:.3g}, lr {args.lr:.4g}, warmup "
          f"{args.warmup_epochs:g} epochs, cosine to {args.min_lr:.3g}")
    if args.warmup_epochs >= args.epochs:
        print(f"warning: --warmup_epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: the lr "
              f"peaks at {lr_at(args.epochs, args) / max(args.lr, 1e-30):.0%} of {args.lr:.3g} at the very end; "
              f"pass a shorter --warmup_epochs (the papers use about 10% of the run)", file=sys.stderr)
    if steps % args.accum_iter:
        print(f"warning: the {steps} steps of an epoch are not a multiple of --accum_iter {args.accum_iter}: the last "
              f"{steps % args.accum_iter} of every epoch add to no update (dropped, as in MAE)", file=sys.stderr)
    if args.lr < args.min_lr:
        print(f"warning: the lr {args.lr:.3g} (at this batch) is below --min_lr {args.min_lr:.3g}, so the cosine rises "
              f"to it instead of decaying; pass a lower --min_lr (e.g. lr / 100) or a larger batch", file=sys.stderr)

def autocast(args):
    if args.amp == "none" or not args.device.startswith("cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)

# ---- Optimiser and schedule -------------------------------------------------------------------------------------
def param_groups(model, weight_decay, no_decay=()):
    """AdamW groups: no decay on biases and norms (ndim <= 1), cls/mask tokens, pos-embed and the names in no_decay."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = name.split(".")[-1] in ("cls_token", "mask_token", "pos_embed") + tuple(no_decay)
            (skip if p.ndim <= 1 or plain or name in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]

def build_optimizer(model, args, no_decay=()):
    return torch.optim.AdamW(param_groups(model, args.weight_decay, no_decay), lr=args.lr, betas=tuple(args.betas),
                             fused=args.device.startswith("cuda"))

def optimizer_step(model, optimizer, scaler, args):
    """One update after --accum_iter backward passes: unscale (fp16) and clip to --clip_grad, step, zero grads."""
    if args.clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

def lr_at(epoch, args):
    """Linear warmup to args.lr, then half-cosine to args.min_lr; epoch is fractional (per step)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    t = min((epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8), 1.0)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)

# ---- Checkpoints, exact resume, logging ---------------------------------------------------------------------------
def save_checkpoint(path, **state):
    """Atomic (temp file + rename): a crash mid-write never damages the previous file, nor leaves a temp file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # (a file object: a failed write's OSError, e.g. a full disk, reaches the caller)
            torch.save(state, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_checkpoint(path, method, flag="--resume"):
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{flag} {path}: not a mimlab checkpoint (no 'model' entry)")
    if method and ckpt.get("method") != method:
        raise UserError(f"{flag} {path} is a checkpoint of {ckpt.get('method', 'another program')}, not {method}; resume "
                        f"it with the script that wrote it")
    return ckpt

def load_model(model, ckpt, path, args):
    """The checkpoint's weights into model; a model built with other flags is one line naming the flags that differ."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        differ = flag_changes(ckpt.get("args", {}), args)[1]  # the flags that shape a run (and so its model)
        raise UserError(f"--resume {path} does not fit this model: it was written with " + (", ".join(differ[:4]) or
                        "other model flags") + "; pass the flags it was written with") from None

RUN_MECHANICS = {"output_dir", "resume", "resume_changes", "data", "teacher_weights", "dalle_weights", "finetune", "eval",
                 "export_timm", "epochs", "batch_size", "accum_iter", "world_size", "num_workers", "amp", "compile",
                 "device", "rank", "log_every", "save_freq", "save_every_minutes", "save_every_steps", "visualize"}

def flag_changes(old, args):
    """A resume's flags against its checkpoint's args -> (every difference as '--flag OLD (now NEW)', those that change
    what is trained: every flag but the run mechanics above (paths, length, workers, logging, saving, how the batch
    is split), and the batch per update). Flags the checkpoint lacks (added since) are not compared."""
    new = dict(vars(args), per_update=args.batch_size * args.accum_iter * args.world_size)
    old = dict(old, per_update=old.get("batch_size", 0) * old.get("accum_iter", 1) * old.get("world_size", 1))
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    diff = {k: ("the batch per update " if k == "per_update" else f"--{k} ") + f"{old[k]} (now {v})"
            for k, v in new.items() if k in old and plain(old[k]) != plain(v) and k not in ("resume", "resume_changes")}
    return list(diff.values()), [d for k, d in diff.items() if k not in RUN_MECHANICS]

def rng_state():
    """This process's training RNGs (torch CPU and CUDA, numpy, python), as weights_only types."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate()}

def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))

def agree(problem):
    """Every rank raises the first rank's problem (or none), so that no rank waits in a collective for one that quit."""
    if dist.is_initialized():
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise UserError(problem)

def resume_path(args):
    """--resume ('auto': OUTPUT_DIR/checkpoint-last.pth if any, else ''), as rank 0 sees it, for every rank."""
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    path = (last if os.path.isfile(last) else "") if args.resume == "auto" else args.resume
    if dist.is_initialized():
        choice = [path]
        dist.broadcast_object_list(choice, 0)
        path = choice[0]
        agree(f"--resume: rank {args.rank} cannot read {path}, which rank 0 resumes from; put --output_dir on a "
              f"filesystem that every node mounts at the same path" if path and not os.path.isfile(path) else None)
    return path

def run_of(folder):
    """(files, method): a run's checkpoints and log.txt in folder, and the script that wrote its checkpoint-last.pth."""
    files = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if n == "log.txt" or n.startswith("checkpoint-") and n.endswith(".pth"))
    try:  # memory-mapped: cheap for a big file
        return files, torch.load(os.path.join(folder, "checkpoint-last.pth"), weights_only=True, mmap=True)["method"]
    except Exception:
        return files, None

class Checkpointer:
    """Everything a bit-identical continuation needs, written atomically by rank 0 to OUTPUT_DIR/checkpoint-last.pth at
    every epoch end, within an epoch every --save_every_minutes / --save_every_steps, and when SIGTERM or Ctrl-C stops
    the run: model, optimizer, grad scaler, epoch, steps done, every rank's RNG states and epoch progress, args."""
    def __init__(self, args, method, model, optimizer):
        self.args, self.method, self.model, self.optimizer = args, method, model, optimizer
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")  # loss scaling for fp16 only
        self.last, self.saved_at, self.progress = os.path.join(args.output_dir, "checkpoint-last.pth"), time.time(), None
        self.extra = {}  # what a script keeps across a resume besides the model (finetune.py: its best top-1)
    def resume(self, fresh_ok=False):
        """Restore from --resume (auto: OUTPUT_DIR's checkpoint-last.pth, if any) -> (epoch, step) to go on at. An output
        dir holding another run's files (a checkpoint but the one resumed, a log.txt) is refused: nothing is ever
        overwritten (fresh_ok: this run writes nothing). Then the folder is made."""
        args, path = self.args, resume_path(self.args)
        if path:  # the file's own problems first
            ckpt = load_checkpoint(path, self.method)
            load_model(self.model, ckpt, path, args)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            changes, trained = flag_changes(ckpt.get("args", {}), args) if not fresh_ok else ([], [])
            if trained and not args.resume_changes:  # the same on every rank
                rest = [c for c in changes if c not in trained]
                raise UserError(f"--resume {path}: {', '.join(trained)} change{'s' * (len(trained) == 1)} what is trained "
                                f"(the run would be neither its checkpoint's nor a new one); pass its values, or "
                                f"--resume_changes to go on with them" + (f" (also changed: {', '.join(rest)})" if rest else ""))
        own = bool(path) and os.path.abspath(path) == os.path.abspath(self.last)
        live = hold_output_dir(args, make=False) if not fresh_ok and args.rank == 0 else None  # a live run's, first
        taken, other = run_of(args.output_dir) if not (fresh_ok or own or live) and args.rank == 0 else ([], None)
        hint = f"resume {path} into a fresh --output_dir" if path else "pass --resume auto to continue it, or a fresh " \
            "--output_dir to start a new one" if other == self.method else "pass a fresh --output_dir"
        agree(live or (f"--output_dir {args.output_dir} already holds a{' ' + other if other else ''} run ("
                       f"{', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''}); {hint}: nothing there is overwritten"
                       if taken else None))
        if not fresh_ok:  # made and held by rank 0 (two runs that passed the check at once: the lock takes one)
            agree(hold_output_dir(args) if args.rank == 0 else None)
        if not path:
            return 0, 0
        if ckpt.get("scaler"):  # empty when saved without fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        self.extra = ckpt.get("extra", {})
        epoch, step, old = ckpt["epoch"], ckpt.get("step", 0), ckpt.get("args", {})
        if step and (old.get("world_size"), old.get("batch_size")) != (args.world_size, args.batch_size):
            print(f"warning: {path} was written by {old.get('world_size')} process(es) x batch {old.get('batch_size')}; "
                  f"epoch {epoch} restarts from its first step", file=sys.stderr)  # the sampler position means nothing
            step = 0
        if ckpt.get("rng") and len(ckpt["rng"]) == args.world_size:
            set_rng_state(ckpt["rng"][args.rank])
            self.progress = (ckpt.get("progress") or [None] * args.world_size)[args.rank] if step else None
        if args.rank == 0:
            print(f"resumed from {path}: epoch {epoch}, step {step}" + (f"; changed: {', '.join(changes)}" if changes else ""))
        RUN["saved"] = (epoch, step)
        return epoch, step
    def save(self, epoch, step, keep=False, meter=None):
        """By every rank (RNG states and epoch progress are gathered); rank 0 writes. keep: also checkpoint-<epoch-1>."""
        ranks = [[rng_state(), meter.progress() if meter else None]] * self.args.world_size
        if dist.is_initialized():
            dist.all_gather_object(ranks, ranks[0])
        if self.args.rank == 0:
            state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                         epoch=epoch, step=step, rng=[r for r, _ in ranks], progress=[p for _, p in ranks],
                         args=dict(vars(self.args)), method=self.method)
            state.update({"extra": self.extra} if self.extra else {})
            for path in [os.path.join(self.args.output_dir, f"checkpoint-{epoch - 1}.pth")] * keep + [self.last]:
                try:  # (the kept copy first: whichever write fails, the previous checkpoint-last.pth is whole)
                    save_checkpoint(path, **state)
                except (OSError, RuntimeError) as e:  # a full disk: torch's writer says "unexpected pos", the OSError
                    if not isinstance(err := e if isinstance(e, OSError) else e.__context__, OSError):  # its context
                        raise
                    kept = "the previous checkpoint-last.pth (epoch {}, step {}) is kept".format(*RUN["saved"]) \
                        if RUN["saved"] else "no checkpoint was written yet"
                    raise UserError(f"cannot write {path}: {err.strerror}; {kept}: make room on that device, then "
                                    f"relaunch with --resume auto") from None
        self.saved_at, RUN["saved"] = time.time(), (epoch, step)
    def due(self, step):
        """(save, stop) after `step` steps: --save_every_steps, --save_every_minutes (rank 0's clock) or a signal; with
        several processes compared every --log_every updates, so that all act together."""
        args = self.args
        save = bool(args.save_every_steps) and step % args.save_every_steps == 0
        if (step // args.accum_iter) % args.log_every:
            return save, bool(RUN["stop"]) and not dist.is_initialized()
        late = bool(args.save_every_minutes) and time.time() - self.saved_at >= 60 * args.save_every_minutes
        flags = [(late, bool(RUN["stop"]))] * args.world_size
        if dist.is_initialized():
            dist.all_gather_object(flags, flags[0])
        return save or flags[0][0], any(stop for _, stop in flags)
    def step_done(self, epoch, step, meter):
        """After an update: a mid-epoch checkpoint when due or asked for by a signal (then the run stops); the loss is
        checked first, so a diverged run never overwrites a good checkpoint. The epoch's last update: epoch_done saves."""
        if step >= meter.steps:
            return
        save, stop = self.due(step)
        if save or stop:
            meter.check(float(meter.sum / meter.count), step - 1)
            self.save(epoch, step, meter=meter)
        if stop:
            RUN["at"] = (epoch, step)
            raise Stopped(RUN["stop"] or "a signal to another process")
    def epoch_done(self, epoch):  # the last one frees --output_dir (a process that ran main() may live on)
        self.save(epoch + 1, 0, keep=(epoch + 1) % self.args.save_freq == 0 or epoch + 1 == self.args.epochs)
        if epoch + 1 == self.args.epochs and RUN["lock"] is not None:
            os.close(RUN["lock"]), RUN.update(lock=None)

def log_epoch(args, stats):  # rank 0: one JSON line per epoch in OUTPUT_DIR/log.txt
    if args.rank == 0:
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")

def too_many_unreadable(failed, seen, final=False):
    """Over 1% of the files looked at unreadable (failed distinct bad files, seen images trained on)? At the epoch's end
    (final): over 1% of them. Within it only beyond doubt (above 1% of those looked at by 3 standard deviations of a 1%
    rate, plus 2), whatever the batch size or order."""
    n = seen + failed
    return failed > 0.01 * n + (0 if final else 3 * math.sqrt(0.0099 * n) + 2)

class Meter:
    """The loader from the resume point as (step, batch), a tqdm bar of loss, lr and images/s (rank 0). The loss stays
    on the device (.item() every --log_every steps and at the epoch end, with the unreadable-image check). A resumed
    epoch starts from its checkpoint's loss sum, steps and images."""
    def __init__(self, loader, epoch, args, ckpt=None):
        p = ckpt and ckpt.progress or {"loss_sum": 0.0, "steps": 0, "seen": 0, "unreadable": 0}
        self.sum, self.count, self.seen, self.images = p["loss_sum"], p["steps"], p["seen"], 0
        loader.dataset.bad.zero_()[p["unreadable"] if isinstance(p["unreadable"], list) else []] = True  # per epoch
        if ckpt:
            ckpt.progress = None  # for the resumed epoch only
        self.args, self.t0, self.epoch, self.loader, self.start, self.steps = \
            args, time.time(), epoch, loader, loader.sampler.start, loader.sampler.steps
        self.bar = tqdm(loader, desc=f"epoch {epoch}", disable=args.rank != 0, dynamic_ncols=True, mininterval=1.0,
                        initial=self.start, total=self.steps)
    def __iter__(self):
        try:
            for step, batch in enumerate(self.bar, self.start):
                stop_if_asked()  # (a signal during start-up, or the workers' start: before the first step)
                RUN["at"] = (self.epoch, step)  # for the line SIGTERM or Ctrl-C prints
                yield step, batch
        except BaseException:  # the loop left by an error or a stop: its workers end now (a notebook's kernel lives on)
            it, self.loader._iterator = self.loader._iterator, None  # (persistent workers: torch has no public call)
            getattr(it, "_shutdown_workers", lambda: None)()
            raise
    def update(self, step, loss, lr, images):
        self.sum, self.count = self.sum + loss.detach().float(), self.count + 1
        self.images, self.seen = self.images + images, self.seen + images
        if (step + 1) % self.args.log_every == 0:
            rate = self.images * self.args.world_size / (time.time() - self.t0)
            loss = self.check(float(self.sum / self.count), step)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
    def progress(self):  # this epoch so far, for a mid-epoch checkpoint
        return {"loss_sum": float(self.sum), "steps": self.count, "seen": self.seen,
                "unreadable": self.loader.dataset.bad.nonzero().flatten().tolist()}
    def check(self, loss, step, failed=None, seen=None, final=False):
        """A non-finite loss stops the run, naming the checkpoint to resume from; so do too many unreadable images."""
        if not math.isfinite(loss):
            last = os.path.join(self.args.output_dir, "checkpoint-last.pth")
            hint = f"resume with --resume {last}" if os.path.isfile(last) else "no checkpoint yet"
            raise UserError(f"loss is {loss} at step {step} of this epoch; {hint} and a lower --lr or --amp none",
                            local=not final)
        failed, seen = (int(self.loader.dataset.bad.sum()), self.seen) if failed is None else (failed, seen)  # distinct
        if too_many_unreadable(failed, seen, final):
            raise UserError(f"--data {self.args.data}: {failed} of the {seen + failed} images looked at could not be read "
                            "(over 1%); fix or remove the files named in the warnings above", local=not final)
        return loss
    def stats(self, epoch, lr):
        """The epoch's mean loss over all processes (one all-reduce, with each file's unreadable flags: a file that two
        ranks met counts once), checked before a checkpoint is written."""
        total = torch.cat([torch.tensor([0.0, self.count, self.seen]), self.loader.dataset.bad.float()]).to(self.args.device)
        total[0] = self.sum if torch.is_tensor(self.sum) else torch.tensor(self.sum)
        if dist.is_initialized():
            dist.all_reduce(total)
        failed = int((total[3:] > 0).sum())
        loss = self.check((total[0] / total[1]).item(), self.start + self.count - 1, failed, int(total[2]), True)
        return {"epoch": epoch, "train_loss": loss, "lr": lr, "steps": int(total[1]) // self.args.world_size,
                "images": int(total[2]), "unreadable_images": failed}  # steps per process, images of all

# ---- Pictures: --visualize N ----------------------------------------------------------------------------------------
def heat(values, size):
    """[g, g] values -> a size x size PIL image, black-red-yellow-white over their own min..max (NaN: grey)."""
    v = values.float()
    lo, hi = v.nan_to_num(float("inf")).min(), v.nan_to_num(float("-inf")).max()
    rgb = colormap(((v - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1))  # [g, g, 3]
    rgb[v.isnan()] = 0.5
    return Image.fromarray((rgb * 255).byte().numpy()).resize((size, size), Image.NEAREST)

def colormap(t):  # t in [0, 1] -> RGB in [0, 1] ([..., 3]): black, red, yellow, white
    return torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], -1)

def spread_over_classes(dataset, n):
    """n indices that take each class in turn (the first image of every class, then the second, ...)."""
    targets, count, turn = getattr(dataset, "targets", None) or range(len(dataset)), {}, []
    for t in targets:  # the image's place within its class (--data fake: each image a class of its own)
        turn.append(count.get(t, 0)), count.update({t: count.get(t, 0) + 1})
    return sorted(range(len(targets)), key=lambda i: (turn[i], i))[:n]

def draw_text(draw, xy, text, fill="black"):
    """PIL's default font draws a space as narrow as the gap between two letters: each word is drawn on its own; and it
    has ASCII glyphs only (others are boxes): accents are dropped, other characters drawn as \\uXXXX."""
    x, y = xy
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = text.encode("ascii", "backslashreplace").decode()
    for word in text.split(" "):
        draw.text((x, y), word, fill=fill)
        x += draw.textlength(word) + 5

VIS_TITLE, VIS_CAPTION, VIS_SCALE, VIS_GAP = 16, 14, 34, 4  # --visualize sheet: title row, a row's caption, scale, gap

@torch.no_grad()
def visualize(args, dataset, model, teacher, forward_step, method):
    """OUTPUT_DIR/visualize.png, a row per image (N readable ones, the classes in turn, captioned with class and file):
    the image, the visible patches (hidden ones dimmed), the teacher's CLS attention (where the method uses it), the
    per-patch loss (MILAN Fig. 5); column titles, a colour scale. The model of --resume, if given."""
    path = resume_path(args)
    if args.resume == "auto" and not path:
        raise UserError(f"--resume auto: {args.output_dir} holds no checkpoint-last.pth to draw; pass --resume CKPT, "
                        f"or leave --resume out to draw the untrained model")
    if path:
        load_model(model, load_checkpoint(path, method), path, args)
    elif args.rank == 0:
        print("warning: no --resume: the pictures show the untrained model", file=sys.stderr)
    samples, picked = Samples(dataset, args.seed, train=False), []  # an unreadable image is named and passed over
    for i in spread_over_classes(dataset, len(dataset)):
        if len(picked) < args.visualize and (item := samples[(0, i)])[1] != -1:
            picked.append((i, item[0]))
    if not picked:
        raise UserError(f"--data {args.data}: no image could be read to draw (see the files named above)")
    batch = to_device(torch.utils.data.default_collate([x for _, x in picked]), args.device)
    names = [f"{dataset.classes[dataset.targets[i]]}: {os.path.basename(dataset.samples[i][0])}"
             if hasattr(dataset, "samples") else f"generated image {i}" for i, _ in picked]
    model.eval()
    with autocast(args):
        out = forward_step(model, teacher, batch, args, per_patch=True)
    images = (batch[0] if isinstance(batch, tuple) else batch).float().cpu()
    images = images * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    g, size, attn = int(out["mask"].shape[1] ** 0.5), images.shape[-1], out.get("cls_attn")
    hidden = F.interpolate(out["mask"].cpu().view(-1, 1, g, g).float(), size=(size, size), mode="nearest")  # [B, 1, H, W]
    patch_loss = out["patch_loss"].float().cpu().masked_fill(out["patch_loss"].cpu() == 0, float("nan"))
    titles = ["image", "visible patches"] + (["CLS attention"] if attn is not None else []) + ["per-patch loss"]
    note = out.get("patch_loss_note")  # the method's words on what its loss map holds where (MR-MAE: L_R and L_M)
    to_pil = lambda x: Image.fromarray((x.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
    rows = [[to_pil(images[i]), to_pil(images[i] * (1 - 0.75 * hidden[i]))] +
            ([heat(attn[i].cpu().view(g, g), size)] if attn is not None else []) + [heat(patch_loss[i].view(g, g), size)]
            for i in range(len(images))]
    step, row = size + VIS_GAP, VIS_CAPTION + size + VIS_GAP
    sheet = Image.new("RGB", (len(titles) * step, VIS_TITLE + len(rows) * row + VIS_SCALE + 12 * bool(note)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            sheet.paste(cell, (c * step, VIS_TITLE + r * row + VIS_CAPTION))
    y, width = VIS_TITLE + len(rows) * row, min(size, 160)  # the maps' colour scale, and the grey of "not in the loss"
    sheet.paste(Image.fromarray((colormap(torch.linspace(0, 1, width)) * 255).byte()[None].expand(10, -1, -1).numpy()), (2, y))
    sheet.paste(Image.new("RGB", (10, 10), (127, 127, 127)), (width + 12, y))
    captions = [((c * step + 2, 2), t) for c, t in enumerate(titles)] + [((2, VIS_TITLE + r * row), n) for r, n in enumerate(names)]
    for xy, text in captions + [((2, y + 12), "low"), ((width - 22, y + 12), "high"), ((width + 26, y - 1), "not in the loss"),
                                ((width + 12, y + 12), "maps: each image's min..max"), ((2, y + 24), note or "")]:
        draw_text(draw, xy, text)
    if args.rank == 0:
        make_output_dir(args)
        k = 0
        while os.path.exists(path := os.path.join(args.output_dir, f"visualize{f'-{k}' if k else ''}.png")):
            k += 1  # beside an earlier picture, never over it
        sheet.save(path)
        asked = f", all the readable ones of the {args.visualize} asked" if len(rows) < args.visualize else ""
        print(f"wrote {path}: {len(rows)} images{asked} ({', '.join(names)}), columns " + " | ".join(titles)
              + (f" ({note})" if note else ""))
