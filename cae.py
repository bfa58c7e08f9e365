"""CAE: Context Autoencoder for Self-Supervised Representation Learning.
Xiaokang Chen, Mingyu Ding, Xiaodi Wang, Ying Xin, Shentong Mo, Yunhao Wang, Shumin Han, Ping Luo, Gang Zeng,
Jingdong Wang, 2022 (IJCV 2023). arXiv:2202.03026.

Implemented: random block-wise masking of 98 of the 196 patches (Sec. 2.2), the encoder F on the visible
patches, the latent contextual regressor H (cross-attention, visible latents never updated, Sec. 2.1), the
alignment target sg[F(masked patches)] (Sec. 2.1), the decoder G (self-attention over the masked predictions
only) to the DALL-E tokens of the masked patches (Sec. 2.2), and the loss l_y + lambda * l_z with lambda = 2
(Eq. 1), trained with the App. A recipe. The DALL-E dVAE encoder (OpenAI) is defined below, so no extra
package is needed. --target pixel predicts per-patch normalised pixels with MSE instead (the pixel-colour
CAE of Sec. 3.1), so CAE also trains with no tokenizer at all. --target clip predicts a frozen teacher's
(CLIP's) patch features at the masked patches, scored by the cosine distance: CAE v2's baseline (arXiv:2211.09799
Table 1 No. 1, "CAE's target replaced by CLIP latent"). Cosine, because that is how CAE v2 scores CLIP latents
(its Eq. 2 and the released code's only loss for them), so that No. 1 and No. 2 differ in the loss's place, not its
type; the alignment loss l_z stays as in CAE.

Computed in common.py: BEiT's block-wise masking (common.BlockMaskGenerator); the normalised pixels of Sec. 3.1
(common.pixel_targets); the encoder F (common.ViT, on the visible patches); --target clip's teacher features
(common.Teacher).

Deviations from the released code (github.com/Atten4Vis/CAE @a7fd162), one line each:
- the alignment target runs the encoder itself under no_grad; the released code keeps a weight-aliased copy (same numbers).
- encoder and decoder attention have a key bias (softmax-invariant: same function); the released code has q/v biases only.
- sin-cos positions put the column in the first half of the channels (MAE); the released code puts the row first.
- the regressor and decoder use the encoder's head count; the released code uses 12 heads at every size.
- cls_token and mask_token get no weight decay; the released code decays them.
- ViT-L regresses at width 1024 as the paper's setting reads; the released script (missing line break) runs it at 768.
- --target pixel is the paper's Sec. 3.1 analysis; the released code has no pixel target.
- --target clip (CAE v2's No. 1) has no released code: the released CLIP path is CAE v2's (no decoder, no l_z).

DALL-E weights: download OpenAI's encoder https://cdn.openai.com/dall-e/encoder.pkl (a pickled module of the
`dall_e` package) and pass --dalle_weights /path/to/encoder.pkl; it loads without installing `dall_e`.

Paper ViT-B/16 run (App. A: batch 2048 = 256 x 8 GPUs, lr 1.5e-3 = blr 1.875e-4 x 2048 / 256, 300 epochs):
  torchrun --nproc_per_node=8 cae.py --data /imagenet --dalle_weights /path/to/encoder.pkl
(800 / 1600 epochs: --epochs 800 --warmup_epochs 20 / --epochs 1600 --warmup_epochs 40; ViT-L: --model vit_large_patch16.)
Smoke run, no downloads (a narrow random tokenizer; --target pixel: none at all): python cae.py --data fake
  --model vit_nano_patch16 --teacher tiny --teacher_weights none --epochs 1 --warmup_epochs 0 --batch_size 32
  --output_dir OUT
"""
import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from contextlib import nullcontext

import common  # first: a Ctrl-C or SIGTERM during the slow imports is then one line (common.py's top)
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2.functional import pil_to_tensor


# ---- Arguments: App. A recipe as defaults ------------------------------------------------------------------
def get_args(argv=None):
    p = common.get_parser("CAE pre-training (arXiv:2202.03026). Defaults: the App. A recipe (ViT-B/16, 300 epochs, "
                          "block masking of 98 of 196 patches, DALL-E targets, lambda = 2) for 8 GPUs: batch 256 per "
                          "GPU x accum 1 x 8 = 2048; with fewer GPUs raise --accum_iter.", helps={
        "--teacher": "--target clip: the teacher (open_clip ViT name, dino_vitb16, or tiny; default ViT-B-16); "
                     "otherwise CAE has no teacher network and only 'tiny' is taken, the smoke runs' flag: a narrow "
                     "random tokenizer",
        "--teacher_weights": "--target clip: 'openai' (default, downloads), a local file, or 'none' (random); "
                             "otherwise only 'none' is taken, the smoke runs' flag: --dalle_weights none"})
    # CAE App. A: AdamW, batch 2048, lr 1.5e-3 (blr 1.875e-4 x 2048 / 256), wd 0.05, 300 epochs with 10 of
    # warmup, cosine, drop path 0.1, mask ratio 50%. From BEiT / the released scripts (the paper says "almost
    # the same as BEiT"): betas (0.9, 0.999), min lr 1e-5, grad clip 3.0, crop scale (0.08, 1) + flip.
    p.set_defaults(batch_size=256, accum_iter=1, blr=1.875e-4, betas=(0.9, 0.999), weight_decay=0.05, epochs=300,
                   warmup_epochs=10, min_lr=1e-5, clip_grad=3.0, crop_min=0.08, drop_path=0.1, mask_ratio=0.5,
                   teacher=None, teacher_weights=None)
    p.add_argument("--target", choices=["dalle", "pixel", "clip"], default="dalle",
                   help="Sec. 2.2 DALL-E tokens (cross-entropy), Sec. 3.1 normalised pixels (MSE, no tokenizer), or "
                   "the teacher's patch features (cosine distance; CAE v2 Table 1 No. 1)")
    p.add_argument("--dalle_weights", help="OpenAI's DALL-E encoder.pkl (https://cdn.openai.com/dall-e/encoder.pkl), "
                   "or 'none' (random tokenizer: tests and smoke runs); default: none with --teacher_weights none, "
                   "else required by --target dalle")
    p.add_argument("--dalle_n_hid", type=common.COUNT, help="width of a random tokenizer (--dalle_weights none); default: "
                   "OpenAI's 256, or 16 with --teacher tiny (smoke runs); a weights file sets its own")
    p.add_argument("--align_weight", type=common.NONNEG, default=2.0, help="lambda of Eq. 1 (2 in the paper, against "
                   "DALL-E's cross-entropy; --target clip's cosine loss starts ~9x smaller: benchmarks/README.md, CAE)")
    p.add_argument("--layer_scale", type=common.NONNEG, help="encoder layer scale init, 0: no LayerScale; default: 0.1, "
                   "1e-5 for ViT-L/H (released scripts; the paper follows BEiT)")
    p.add_argument("--regressor_depth", type=common.COUNT, default=4, help="cross-attention blocks of H (Sec. 4.1)")
    p.add_argument("--decoder_depth", type=common.SIZE, default=4, help="self-attention blocks of G (Sec. 4.1)")
    args = p.parse_args(argv)
    if args.target == "clip":  # a teacher network, with the other method files' flags and defaults
        args.teacher, args.teacher_weights = args.teacher or "ViT-B-16", args.teacher_weights or "openai"
        if args.dalle_weights not in (None, "none"):
            raise common.UserError(f"--dalle_weights {args.dalle_weights}: --target clip uses no DALL-E tokenizer; "
                                   f"drop --dalle_weights or pass --target dalle")
    # the DALL-E tokenizer is CAE's teacher: the README's shared smoke flags (--teacher tiny --teacher_weights none)
    # give a narrow random tokenizer, so the smoke command is the same for every method file; other values are refused
    elif args.teacher not in (None, "tiny") or args.teacher_weights not in (None, "none"):
        raise common.UserError(f"--teacher {args.teacher} --teacher_weights {args.teacher_weights}: cae.py has no teacher "
                               f"network with --target {args.target}; its targets are DALL-E tokens (--dalle_weights "
                               f"/path/to/encoder.pkl), pixels (--target pixel) or a teacher's features (--target clip); "
                               f"only the smoke flags --teacher tiny --teacher_weights none are taken")
    if args.dalle_weights is None and args.teacher_weights == "none":
        args.dalle_weights = "none"
    if args.dalle_n_hid is None:
        args.dalle_n_hid = 16 if args.teacher == "tiny" else 256
    if args.layer_scale is None:
        args.layer_scale = 1e-5 if args.model in ("vit_large_patch16", "vit_huge_patch14") else 0.1
    return args


# ---- Sampler: random block-wise masking, two views of one crop (Sec. 2.2) ----------------------------------
def block_masking(args):
    """CAE Sec. 2.2: BEiT's random block-wise masking, 98 of the 196 patches (mask ratio 0.5). Rectangles of
    at least 16 patches are added until the count is exact (common.BlockMaskGenerator). Runs in the
    DataLoader workers; returns the callable -> bool [N], True = masked."""
    grid = args.input_size // common.VIT_CONFIGS[args.model][0]
    return common.BlockMaskGenerator(grid, grid * grid - common.num_visible(grid * grid, args.mask_ratio))


class TwoViews:
    """The data pipeline of the DALL-E target (BEiT's, as released): one flip and one random crop of the image, seen
    twice: at 224 px (bicubic) by the encoder, at 112 px (LANCZOS) by the tokenizer, whose stride 8 gives one token
    per 16 px patch. Made in a DataLoader worker: image -> (view, token_view, mask), both views uint8 [3, size, size]
    (common.to_device normalises the encoder's on the device, map_pixels maps the tokenizer's). Uses common.decode and
    common.resize."""
    def __init__(self, args, mask_fn):
        self.size, self.scale, self.mask_fn = args.input_size, (args.crop_min, 1.0), mask_fn
        self.token_size = args.input_size // common.VIT_CONFIGS[args.model][0] * 8  # 112 for 224 / 16

    def __call__(self, img):
        flip = bool(torch.rand(1) < 0.5)  # one flip and one crop for both views, the flip drawn first (as released)
        box = RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))  # (top, left, h, w)
        img, box, s = common.decode(img, box, self.size)  # a large JPEG at 1/2 .. 1/8 scale, the crop >= 224 px
        img = img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img
        view = pil_to_tensor(common.resize(img, box, s, self.size, Image.BICUBIC))  # [3, 224, 224] uint8
        token_view = pil_to_tensor(common.resize(img, box, s, self.token_size, Image.LANCZOS))  # [3, 112, 112] uint8
        return view, token_view, self.mask_fn()


def map_pixels(token_view):
    """DALL-E's map_pixels, the tokenizer's input: uint8 [B, 3, 112, 112] -> 0.8 x + 0.1, x = pixels / 255 in [0, 1]."""
    return 0.8 * token_view.float() / 255 + 0.1


# ---- Model: DALL-E tokenizer, encoder F, latent contextual regressor H, decoder G (Sec. 2.1, 2.2) ----------
# The targets of Sec. 2.2: OpenAI's DALL-E dVAE encoder, defined here so that no extra package is needed
class DalleConv2d(nn.Module):
    """dall_e.utils.Conv2d: weights named w, b; 'same' padding; fp16 on CUDA except the output conv (as OpenAI's)."""
    def __init__(self, n_in, n_out, kw, use_float16=True):
        super().__init__()
        self.kw, self.use_float16 = kw, use_float16
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        half = self.use_float16 and x.is_cuda
        x, w, b = (x.half(), self.w.half(), self.b.half()) if half else (x.float(), self.w, self.b)
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)


class DalleBlock(nn.Module):
    """dall_e.encoder.EncoderBlock: id_path(x) + res_path(x) / n_layers^2, res_path = 4 x (ReLU, conv 3-3-3-1)."""
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        hid, self.post_gain = n_out // 4, 1 / n_layers ** 2
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        convs = [(n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, n_out, 1)]
        self.res_path = nn.Sequential(OrderedDict(
            kv for k, c in enumerate(convs, 1) for kv in ((f"relu_{k}", nn.ReLU()), (f"conv_{k}", DalleConv2d(*c)))))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """OpenAI's DALL-E dVAE encoder (dall_e.encoder.Encoder, 53.8 M parameters at n_hid 256), same parameter
    names: a 7x7 conv, four groups of two blocks of widths n_hid x (1, 2, 4, 8) with a max-pool after the first
    three, then ReLU and a 1x1 conv to the vocab_size logits. Stride 8: a 112 px view gives 14 x 14 tokens.
    Frozen: always eval, no gradients."""
    def __init__(self, n_hid=256, vocab_size=8192, blocks_per_group=2):
        super().__init__()
        self.vocab_size, n_layers = vocab_size, 4 * blocks_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]  # input of group 1, outputs of groups 1-4
        groups = [("input", DalleConv2d(3, n_hid, 7))]
        for g in range(4):  # block_1 changes the width, block_2 keeps it
            layers = [(f"block_{i + 1}", DalleBlock(widths[g + (i > 0)], widths[g + 1], n_layers))
                      for i in range(blocks_per_group)]
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers + [("pool", nn.MaxPool2d(2))] * (g < 3)))))
        output_conv = DalleConv2d(8 * n_hid, vocab_size, 1, use_float16=False)
        groups.append(("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=output_conv))))
        self.blocks = nn.Sequential(OrderedDict(groups))
        self.requires_grad_(False).eval()

    def train(self, mode=True):  # a tokenizer stays in eval mode
        return super().train(False)

    def forward(self, x):  # [B, 3, 112, 112] mapped pixels -> logits [B, vocab, 14, 14]
        return self.blocks(x)

    @torch.no_grad()
    def tokenize(self, x):
        """CAE Sec. 2.2 / BEiT get_codebook_indices: the token of each patch = argmax of the logits -> [B, N] ids."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 (fp16 convs on CUDA), never the student's bf16
            return self(x).argmax(1).flatten(1)  # [B, 14 * 14], raster order


class _Stub(nn.Module):
    """Stands in for dall_e's classes while unpickling; only the state dict of the tree is kept."""


class _DalleUnpickler(pickle.Unpickler):
    """Reads OpenAI's encoder.pkl without the dall_e package: dall_e.* classes become _Stub; besides torch's
    tensor, module and dtype classes nothing else may be named by the file (no arbitrary code)."""
    def find_class(self, module, name):
        if module.split(".")[0] == "dall_e":
            return _Stub
        ok = (module == "collections" and name == "OrderedDict") or module.startswith("torch.nn.modules.") \
            or (module in ("builtins", "__builtin__") and name in ("set", "frozenset")) \
            or (module == "torch._utils" and name.startswith("_rebuild")) \
            or (module == "torch" and (name in ("device", "Size") or isinstance(getattr(torch, name, None), torch.dtype)))
        if not ok:
            raise pickle.UnpicklingError(f"unexpected {module}.{name}")
        return super().find_class(module, name)


def load_dalle_encoder(path):
    """--dalle_weights: OpenAI's encoder.pkl (a pickled dall_e.encoder.Encoder, zip or legacy torch format) or a
    state dict with its keys -> a frozen DalleEncoder. A missing or other file is one clear error."""
    hint = "pass OpenAI's DALL-E encoder.pkl (https://cdn.openai.com/dall-e/encoder.pkl), none, or --target pixel"
    if not path or not os.path.isfile(path):
        raise common.UserError(f"--dalle_weights {path}: no such file; {hint}")
    unpickling = types.ModuleType("dalle_pickle")
    unpickling.Unpickler, unpickling.load = _DalleUnpickler, lambda f, **kw: _DalleUnpickler(f, **kw).load()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=unpickling)
        sd = obj.state_dict() if isinstance(obj, nn.Module) else obj.get("state_dict", obj.get("model", obj))
        sd = {k: t.float() for k, t in sd.items()}
        enc = DalleEncoder(sd["blocks.input.w"].shape[0], sd["blocks.output.conv.w"].shape[0])
        enc.load_state_dict(sd, strict=True)
    except Exception as e:
        raise common.UserError(f"--dalle_weights {path}: not a DALL-E dVAE encoder file ({type(e).__name__}); "
                               f"{hint}") from None
    return enc.requires_grad_(False).eval()


def build_tokenizer(args):
    """--target dalle: the frozen dVAE encoder (the 'teacher' of CAE); --target clip: the frozen teacher network
    (common.Teacher, on the encoder's view); --target pixel: None."""
    if args.target == "pixel":
        return None
    if args.target == "clip":
        grid = args.input_size // common.VIT_CONFIGS[args.model][0]
        return common.Teacher(args.teacher, args.teacher_weights, grid).to(args.device)
    if args.dalle_weights is None:
        raise common.UserError("--target dalle needs --dalle_weights /path/to/encoder.pkl (OpenAI's DALL-E encoder, "
                               "https://cdn.openai.com/dall-e/encoder.pkl), or none (random), or use --target pixel")
    if args.dalle_weights == "none":
        if common.RUN["rank"] == 0 and args.teacher == "tiny":  # the smoke flags: the narrow random tokenizer
            print("DALL-E tokenizer: random weights (--dalle_weights none), the smoke runs' narrow one", file=sys.stderr)
        elif common.RUN["rank"] == 0:
            print("WARNING: DALL-E tokenizer has RANDOM weights (--dalle_weights none): fine for tests and smoke runs, "
                  "meaningless for pre-training", file=sys.stderr)
        return DalleEncoder(args.dalle_n_hid).to(args.device)
    return load_dalle_encoder(args.dalle_weights).to(args.device)


# The encoder F, the latent contextual regressor H and the decoder G (Sec. 2.1)
class CrossAttention(nn.Module):
    """Multi-head attention with queries from one set and keys/values from another:
    q [B, M, C], k and v [B, L, C] -> [B, M, C]; softmax(q W_q (k W_k)^T / sqrt(d_h)) v W_v per head, then W_o.
    No key bias: it would add the same number to every key's score of a query, which the softmax ignores."""
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
    """One cross-attention block of H (CAE Sec. 2.1, as released):
    X <- X + g1 * CA(q = LN_q(X + P_m), k = LN_k([Z_v; X] + [P_v; P_m]), v = LN_v([Z_v; X])), X <- LN2(X),
    X <- X + g2 * MLP(X). Positions enter the queries and keys only; Z_v is read, never written. Uses common.LayerScale,
    common.Mlp, common.drop_path."""
    def __init__(self, dim, num_heads, drop_path=0.0, layer_scale=0.1, mlp_ratio=4.0):
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn, self.norm2 = CrossAttention(dim, num_heads), nn.LayerNorm(dim, eps=1e-6)
        self.mlp, self.drop_path = common.Mlp(dim, int(dim * mlp_ratio)), drop_path
        self.ls1 = common.LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.ls2 = common.LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x, z_v, pos_m, pos_v):  # x [B, M, D] queries, z_v [B, n, D]; pos_m, pos_v their positions
        kv, pos_kv = torch.cat([z_v, x], 1), torch.cat([pos_v, pos_m], 1)  # [B, n+M, D]: visible, then masked
        attn = self.attn(self.norm_q(x + pos_m), self.norm_k(kv + pos_kv), self.norm_v(kv))
        x = self.norm2(x + common.drop_path(self.ls1(attn), self.drop_path, self.training))
        return x + common.drop_path(self.ls2(self.mlp(x)), self.drop_path, self.training)


class LatentContextualRegressor(nn.Module):
    """CAE Sec. 2.1: H predicts Z_m [B, M, D] from Z_v [B, n, D]. Queries start as one learned mask token shared by
    all masked patches; each block lets them attend to [Z_v; queries] with fixed sin-cos positions in q and k;
    a final LN closes it. Uses common.sincos_pos_embed and common.gather."""
    def __init__(self, dim, depth, num_heads, grid, drop_path=0.0, layer_scale=0.1):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(common.sincos_pos_embed(dim, grid)[None], requires_grad=False)  # [1, 1+N, D]
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(RegressorBlock(dim, num_heads, dpr[i], layer_scale) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # CAE's closing LN: Z_m is aligned after it (Sec. 2.1, as released)
        for m in self.modules():  # xavier linears, as the released code
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # released: truncated at +-1 std

    def positions(self, ids):  # ids [B, L] patch indices -> [B, L, D] (row 0 of pos_embed is CLS)
        return common.gather(self.pos_embed.expand(len(ids), -1, -1), ids + 1)

    def forward(self, z_v, ids_keep, ids_mask):
        pos_v, pos_m = self.positions(ids_keep), self.positions(ids_mask)  # P_v [B, n, D], P_m [B, M, D]
        x = self.mask_token.expand(len(z_v), ids_mask.shape[1], -1)  # Q_m [B, M, D]
        for blk in self.blocks:
            x = blk(x, z_v, pos_m, pos_v)
        return self.norm(x)


class CAE(nn.Module):
    """CAE Fig. 2: encoder, regressor H, alignment, decoder G (common.Block) and the target heads."""
    def __init__(self, encoder, num_targets, regressor_depth=4, decoder_depth=4, drop_path=0.1, align_weight=2.0,
                 target="dalle"):
        super().__init__()
        self.encoder, self.align_weight, self.target = encoder, align_weight, target
        D, heads = encoder.embed_dim, encoder.blocks[0].attn.num_heads
        self.regressor = LatentContextualRegressor(D, regressor_depth, heads, encoder.grid, drop_path, 0.1)
        dpr = torch.linspace(0, drop_path, decoder_depth).tolist()
        self.decoder_blocks = nn.ModuleList(common.Block(D, heads, 4.0, dpr[i], 0.1) for i in range(decoder_depth))
        self.decoder_norm, self.decoder_pred = nn.LayerNorm(D, eps=1e-6), nn.Linear(D, num_targets)
        for m in [*self.decoder_blocks.modules(), self.decoder_pred]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        # CAE Sec. 4.1 trains "almost the same as BEiT"; the released code initialises the patch projection and the CLS
        # token as truncated normals of std 0.02 cut at +-0.02 and the projection bias at 0 (common.ViT's MAE init:
        # xavier, torch's default bias); xavier linears and the 0.1 layer scales already agree
        nn.init.trunc_normal_(encoder.patch_embed.proj.weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(encoder.patch_embed.proj.bias)
        nn.init.trunc_normal_(encoder.cls_token, std=0.02, a=-0.02, b=0.02)

    def forward_encoder(self, images, ids_keep):
        """Sec. 2.1: F sees CLS + the visible patches only -> [B, 1+n, D]."""
        return self.encoder(images, ids_keep)

    def forward_regressor(self, z_v, ids_keep, ids_mask):
        """Sec. 2.1: Z_v [B, n, D] (CLS dropped) -> predicted Z_m [B, M, D]."""
        return self.regressor(z_v, ids_keep, ids_mask)

    @torch.no_grad()
    def alignment_target(self, images, ids_mask):
        """Sec. 2.1: Zbar_m = F(masked patches), the same encoder and weights, under stop-gradient (Eq. 1's sg[.]).
        In training mode drop path is active here too, as released. -> [B, M, D]"""
        return self.encoder(images, ids_mask)[:, 1:]

    def forward_decoder(self, z_m, ids_mask):
        """Sec. 2.1: G sees the masked predictions + their positions only (self-attention), -> Y_m [B, M, K]."""
        x = z_m + self.regressor.positions(ids_mask)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, images, ids_keep, ids_mask, target):
        """target of the masked patches: token ids [B, M] (dalle), normalised pixels [B, M, 768] (pixel) or the
        teacher's features [B, M, C] (clip)."""
        z_m = self.forward_regressor(self.forward_encoder(images, ids_keep)[:, 1:], ids_keep, ids_mask)
        zbar_m = self.alignment_target(images, ids_mask)
        pred = self.forward_decoder(z_m, ids_mask)
        loss = cae_loss(pred, target, z_m, zbar_m, self.target, self.align_weight)
        return loss, {"pred": pred, "z_m": z_m, "zbar_m": zbar_m}


# ---- Loss: Eq. 1 (Sec. 2.2) --------------------------------------------------------------------------------
def decoding_loss(pred, target, kind="dalle", per_patch=False):
    """CAE Sec. 2.2: l_y(Y_m, Ybar_m), mean over the B * M masked patches of: the cross-entropy against the tokens
    (dalle: target long [B, M], pred [B, M, 8192]), the MSE against normalised pixels (pixel: [B, M, 768], Sec. 3.1),
    or the cosine distance 1 - cos(y, ybar) to the teacher's features (clip: [B, M, C]; CAE v2 Eq. 2's distance)."""
    if kind == "dalle":
        loss = F.cross_entropy(pred.float().flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    elif kind == "pixel":
        loss = (pred.float() - target).pow(2).mean(-1)  # [B, M]
    else:
        loss = 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [B, M]
    return loss if per_patch else loss.mean()


def alignment_loss(z_m, zbar_m, per_patch=False):
    """CAE Sec. 2.2: l_z(Z_m, sg[Zbar_m]) = MSE, mean over the B * M * D elements."""
    loss = (z_m.float() - zbar_m.detach().float()).pow(2).mean(-1)  # [B, M]
    return loss if per_patch else loss.mean()


def cae_loss(pred, target, z_m, zbar_m, kind="dalle", align_weight=2.0, per_patch=False):
    """CAE Eq. 1: l_y(Y_m, Ybar_m) + lambda * l_z(Z_m, sg[Zbar_m]), lambda = 2; l_y of the --target kind. per_patch:
    the [B, M] terms, whose mean is the loss."""
    return decoding_loss(pred, target, kind, per_patch) + align_weight * alignment_loss(z_m, zbar_m, per_patch)


# ---- Training: forward_step, train_one_epoch, main ---------------------------------------------------------
def build_transform(args):
    """Block masks made in the DataLoader workers: -> (view, mask), or (view, token_view, mask) for DALL-E."""
    if args.target in ("pixel", "clip"):  # clip: the teacher sees the encoder's view, as in the other method files
        return common.pretrain_transform(args, mask_fn=block_masking(args))  # crop + flip (Sec. 4.1)
    return TwoViews(args, block_masking(args))


def build_model(args):
    """-> (model, tokenizer): the trained student (F, H, G) and the frozen DALL-E encoder (the teacher for clip, None
    for pixels)."""
    tokenizer = build_tokenizer(args)
    encoder = common.build_vit(args.model, args.input_size, drop_path=args.drop_path, init_values=args.layer_scale)
    if args.target == "pixel":
        num_targets = encoder.patch_size ** 2 * 3  # p*p*3 normalised pixels
    else:
        num_targets = tokenizer.vocab_size if args.target == "dalle" else tokenizer.dim  # 8192 tokens, or C features
    model = CAE(encoder, num_targets, args.regressor_depth, args.decoder_depth, args.drop_path, args.align_weight,
                args.target)
    return model.to(args.device), tokenizer


def forward_step(model, teacher, batch, args, per_patch=False):
    """One training forward on a batch (on the device): (images, mask) or (images, token_images, mask). Returns
    the loss, the mask [B, N] (True = hidden), no CLS attention and, only when asked (per_patch: pictures,
    benchmarks), the per-patch loss [B, N] (0 on visible patches)."""
    images, *token_images, mask = batch
    N = mask.shape[1]
    ids_keep, ids_mask = common.ids_from_mask(mask, common.num_visible(N, args.mask_ratio))  # [B, 98], [B, 98]
    if args.target == "dalle":  # Ybar_m: the DALL-E token of each masked patch
        target = teacher.tokenize(map_pixels(token_images[0])).gather(1, ids_mask)  # [B, M]
    elif args.target == "clip":  # CAE v2 Table 1 No. 1: the teacher's feature of each masked patch (intact image)
        target = common.gather(teacher(images)["tokens"][:, 1:], ids_mask)  # [B, M, C]
    else:  # Sec. 3.1: normalised pixels of the masked patches
        pixels = common.pixel_targets(images, common.VIT_CONFIGS[args.model][0])  # [B, N, 768], Sec. 3.1
        target = common.gather(pixels, ids_mask)  # [B, M, 768]
    loss, out = model(images, ids_keep, ids_mask, target)
    patch_loss = None
    if per_patch:  # the terms of Eq. 1 per masked patch (the 8,192-way cross-entropy of every token again: not in training)
        terms = cae_loss(out["pred"].detach(), target, out["z_m"].detach(), out["zbar_m"], args.target, args.align_weight,
                         per_patch=True)
        patch_loss = torch.zeros(mask.shape, device=mask.device).scatter(1, ids_mask, terms.float())  # [B, N]
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
        return common.visualize(args, dataset, model, teacher, forward_step, "cae")
    loader = common.build_loader(dataset, args)
    optimizer = common.build_optimizer(model, args)
    ckpt = common.Checkpointer(args, "cae", model, optimizer)  # exact resume: model, optimizer, RNGs, position
    start_epoch, start_step = ckpt.resume()  # --resume (auto: OUTPUT_DIR's last); another run's folder is refused
    targets = {"dalle": f"targets: DALL-E tokens ({args.dalle_weights})", "pixel": "targets: normalised pixels",
               "clip": f"targets: teacher {args.teacher} ({args.teacher_weights}) features, cosine distance"}[args.target]
    common.announce(args, "cae", dataset, loader.sampler.steps, start_epoch, targets)
    if teacher is not None and args.target == "clip":
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
