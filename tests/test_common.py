"""common.py: ViT, position embedding, masking, teacher, optimiser groups, schedule, checkpoints."""
import argparse
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from conftest import images

N = 196  # 224 px / 16 px patches: 14 x 14


def nano(**kw):
    return common.build_vit("vit_nano_patch16", 224, **kw).eval()


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------
def test_vit_shapes():
    vit, x = nano(), images()
    assert vit(x).shape == (2, 1 + N, 64)
    ids = torch.arange(49).expand(2, -1) * 4  # every 4th patch
    out, hidden = vit(x, ids, return_hidden=True)
    assert out.shape == (2, 1 + 49, 64)
    assert len(hidden) == 2 and all(h.shape == (2, 50, 64) for h in hidden)
    # hidden is the residual stream before the final norm: the last one normalised gives the output
    torch.testing.assert_close(vit.norm(hidden[-1]), out)


def test_vit_subset_equals_hand_picked_patches():
    vit, x = nano(), images()
    keep = [[3, 17, 40, 100, 195], [0, 1, 2, 150, 151]]
    out = vit(x, torch.tensor(keep))
    for b in range(2):  # by hand: cut the 16x16 patches out of the image, embed them one by one
        toks = [vit.cls_token[0, 0] + vit.pos_embed[0, 0]]
        for i in keep[b]:
            r, c = divmod(i, 14)
            patch = x[b, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16]
            w = vit.patch_embed.proj
            toks.append((w.weight * patch).sum((1, 2, 3)) + w.bias + vit.pos_embed[0, 1 + i])
        t = torch.stack(toks)[None]
        for blk in vit.blocks:
            t = blk(t)
        torch.testing.assert_close(out[b], vit.norm(t)[0], atol=1e-5, rtol=1e-5)


def test_vit_subset_never_sees_hidden_pixels():
    vit, x = nano(), images(1)
    ids = torch.tensor([[0, 5, 20, 77]])
    y = x.clone()
    y[:, :, 16:32, 16:32] += 5.0  # patch 15 (row 1, col 1): not kept
    torch.testing.assert_close(vit(x, ids), vit(y, ids))
    y[:, :, 0:16, 80:96] += 5.0  # patch 5: kept
    assert not torch.allclose(vit(x, ids), vit(y, ids))


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_vit_state_dict_loads_into_timm_and_back(init_values):
    from timm.models.vision_transformer import VisionTransformer
    vit = nano(init_values=init_values)
    for p in vit.parameters():  # non-trivial values everywhere, layer scale included
        p.data.add_(0.01 * torch.randn_like(p))
    ref = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                            init_values=init_values).eval()
    ref.load_state_dict(vit.state_dict(), strict=True)
    x = images()
    torch.testing.assert_close(vit(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    again = nano(init_values=init_values)
    again.load_state_dict(ref.state_dict(), strict=True)
    torch.testing.assert_close(again(x), vit(x))


def test_sincos_pos_embed_against_the_formula():
    D, G = 16, 14
    pe = common.sincos_pos_embed(D, G)
    assert pe.shape == (1 + G * G, D) and torch.all(pe[0] == 0)
    for i in range(G):  # row
        for j in range(G):  # column
            want = []
            for p in (j, i):  # first half: column, second half: row
                w = [1.0 / 10000 ** (k / (D / 4)) for k in range(D // 4)]
                want += [math.sin(p * wk) for wk in w] + [math.cos(p * wk) for wk in w]
            torch.testing.assert_close(pe[1 + i * G + j], torch.tensor(want, dtype=torch.float32))
    vit = nano()
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed[0], common.sincos_pos_embed(64, 14))


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------
# floor(196 (1 - r)) worked out by hand: 49, 58.8 -> 58, 98, 78.4 -> 78, 166.6 -> 166, 147
@pytest.mark.parametrize("ratio,visible", [(0.75, 49), (0.7, 58), (0.5, 98), (0.6, 78), (0.15, 166), (0.25, 147)])
def test_random_masking_keeps_floor_n_visible(ratio, visible):
    n = common.num_visible(N, ratio)
    assert n == visible
    mask = common.random_masking(64, N, n)
    assert mask.dtype == torch.bool and torch.all((~mask).sum(1) == visible)
    ids_keep, ids_mask = common.ids_from_mask(mask, n)
    assert torch.all(ids_keep[:, 1:] > ids_keep[:, :-1]) and torch.all(ids_mask[:, 1:] > ids_mask[:, :-1])
    assert torch.all(~mask.gather(1, ids_keep)) and torch.all(mask.gather(1, ids_mask))
    assert not torch.equal(mask[0], mask[1])  # a new draw per sample


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, 0.999])
def test_mask_ratio_outside_range_is_refused(ratio):
    with pytest.raises(common.UserError, match="--mask_ratio"):
        common.num_visible(N, ratio)


def reachable_blocks(area_lo, area_hi, grid=14):
    """Every (h, w) that area in [area_lo, area_hi] and aspect in [0.3, 1/0.3] can round to."""
    out = set()
    for a in np.linspace(area_lo, area_hi, 600):
        for la in np.linspace(math.log(0.3), -math.log(0.3), 300):
            h, w = round(math.sqrt(a * math.exp(la))), round(math.sqrt(a / math.exp(la)))
            if 0 < h < grid and 0 < w < grid:
                out.add((h, w))
    return out


def test_block_masking_exact_count_and_block_limits():
    random.seed(0)
    gen = common.BlockMaskGenerator(grid=14, num_masked=98, min_patches=16, min_aspect=0.3)
    first_ok, any_ok = reachable_blocks(16, 98), reachable_blocks(1, 98)
    masks = []
    for _ in range(200):
        m = gen()
        assert m.shape == (N,) and m.dtype == torch.bool and int(m.sum()) == 98  # exactly 98, every time
        union = np.zeros((14, 14), bool)
        for top, left, h, w in gen.blocks:
            assert 0 <= top <= 14 - h and 0 <= left <= 14 - w
            assert (h, w) in any_ok
            union[top:top + h, left:left + w] = True
        assert (gen.blocks[0][2], gen.blocks[0][3]) in first_ok  # the first block has area >= 16
        assert np.array_equal(union.flatten(), m.numpy())  # the mask is exactly the union of the blocks
        masks.append(m)
    assert len({tuple(m.tolist()) for m in masks}) > 190  # and they differ


def test_block_masks_are_made_in_dataloader_workers():
    args = argparse.Namespace(data="fake", fake_size=16, input_size=224, batch_size=4, crop_min=0.2, world_size=1,
                              rank=0, seed=0, num_workers=2, device="cpu")
    gen = common.BlockMaskGenerator(num_masked=98)
    ds = common.build_dataset(args, common.pretrain_transform(args, mask_fn=gen))
    (imgs, masks), _ = next(iter(common.build_loader(ds, args)))
    assert imgs.shape == (4, 3, 224, 224) and masks.shape == (4, N) and torch.all(masks.sum(1) == 98)
    assert not hasattr(gen, "blocks")  # the main process never drew a mask: the workers did
    assert len({tuple(m.tolist()) for m in masks}) == 4


# ---------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------
def clip_normalise(raw):
    mean, std = torch.tensor(common.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(common.CLIP_STD).view(1, 3, 1, 1)
    return (raw - mean) / std


def imagenet_normalise(raw):
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    return (raw - mean) / std


def test_teacher_outputs_match_open_clip(tiny_teacher):
    raw = torch.rand(2, 3, 224, 224)  # pixels in [0, 1]
    out = tiny_teacher(imagenet_normalise(raw), tokens=True, hidden=True, cls_attn=True)
    assert out["tokens"].shape == (2, 1 + N, 32) and tiny_teacher.dim == 32
    assert len(out["hidden"]) == 2 and all(h.shape == (2, 1 + N, 64) for h in out["hidden"])
    assert out["cls_attn"].shape == (2, N)
    v = tiny_teacher.net  # open_clip's own code paths, fed CLIP-normalised pixels
    d = v.forward_intermediates(clip_normalise(raw), indices=None, output_fmt="NLC", output_extra_tokens=True,
                                intermediates_only=True)
    for mine, patches, cls in zip(out["hidden"], d["image_intermediates"], d["image_intermediates_prefix"]):
        torch.testing.assert_close(mine, torch.cat([cls, patches], 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["tokens"][:, 0], v(clip_normalise(raw)), atol=1e-5, rtol=1e-5)  # pooled = CLS


def test_teacher_cls_attn_equals_recomputation_from_q_and_k(tiny_teacher):
    x = images()
    seen = {}
    last = tiny_teacher.net.transformer.resblocks[-1]
    hook = last.ln_1.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))
    got = tiny_teacher(x, tokens=False, cls_attn=True)["cls_attn"]
    hook.remove()
    y = seen["y"]  # the last block's ln_1(x) [B, 197, 64]
    W, b, H = last.attn.in_proj_weight, last.attn.in_proj_bias, 2
    q, k = (y @ W[:64].T + b[:64]), (y @ W[64:128].T + b[64:128])
    probs = []
    for h in range(H):  # per head: softmax over all 197 keys of the CLS query
        qh, kh = q[:, 0, 32 * h:32 * h + 32], k[:, :, 32 * h:32 * h + 32]
        probs.append(torch.softmax(torch.einsum("bd,bnd->bn", qh, kh) / math.sqrt(32), -1))
    want = torch.stack(probs).mean(0)[:, 1:]  # head mean, CLS->CLS dropped
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.all(got.sum(1) < 1) and torch.all(got > 0)


def test_teacher_is_frozen(tiny_teacher):
    assert not any(p.requires_grad for p in tiny_teacher.parameters())
    tiny_teacher.train()
    assert not tiny_teacher.training and not any(m.training for m in tiny_teacher.modules())
    x = images().requires_grad_(True)
    out = tiny_teacher(x, hidden=True, cls_attn=True)
    assert out["tokens"].grad_fn is None and out["cls_attn"].grad_fn is None


def test_teacher_grid_follows_the_student():
    t = common.Teacher("tiny", "none", grid=16)  # e.g. a ViT-H/14 student at 224 px: 16 x 16 patches
    out = t(images(1), cls_attn=True)  # 224 px resized to 16 * 16 = 256 px inside
    assert out["tokens"].shape == (1, 1 + 256, 32) and out["cls_attn"].shape == (1, 256)
    assert t.pos.shape == (1, 257, 64)
    torch.testing.assert_close(common.resize_pos(t.net.positional_embedding, 14), t.net.positional_embedding)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated; OpenAI's files are traced
def test_teacher_weights_from_files(tmp_path, tiny_teacher):
    x = images()
    want = tiny_teacher(x)["tokens"]
    sd = {f"visual.{k}": v for k, v in tiny_teacher.net.state_dict().items()}  # a full-CLIP state dict
    sd["logit_scale"] = torch.tensor(1.0)
    torch.save(sd, tmp_path / "clip.pt")
    torch.testing.assert_close(common.Teacher("tiny", str(tmp_path / "clip.pt"))(x)["tokens"], want)

    class Wrapper(torch.nn.Module):  # OpenAI releases TorchScript archives holding `visual.*`
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, x):
            return self.visual(x)
    traced = torch.jit.trace(Wrapper(tiny_teacher.net), clip_normalise(torch.rand(1, 3, 224, 224)))
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    assert common.is_torchscript(str(tmp_path / "ViT-tiny.pt"))
    torch.testing.assert_close(common.Teacher("tiny", str(tmp_path / "ViT-tiny.pt"))(x)["tokens"], want)


def test_teacher_weight_errors_are_one_clear_line(tmp_path):
    with pytest.raises(common.UserError, match="--teacher_weights .*no such file"):
        common.Teacher("tiny", str(tmp_path / "missing.pt"))
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(common.UserError, match="does not fit --teacher tiny"):
        common.Teacher("tiny", str(tmp_path / "other.pt"))
    with pytest.raises(common.UserError, match="--teacher nonsense"):
        common.Teacher("nonsense", "none")
    with pytest.raises(common.UserError, match="--teacher RN50: only CLIP ViTs with a class token"):
        common.Teacher("RN50", "none")  # an open_clip model, but not a ViT
    with pytest.raises(common.UserError, match="dino_vitbase16_pretrain.pth"):
        common.Teacher("dino_vitb16", "openai")


def test_dino_teacher_loads_dino_file_like_timm(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    ref = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "dino_vitbase16_pretrain.pth")  # DINO's file is a bare timm-style dict
    t = common.Teacher("dino_vitb16", str(tmp_path / "dino_vitbase16_pretrain.pth"))
    x = images(1)
    out = t(x, hidden=True, cls_attn=True)
    assert t.dim == t.width == 768 and t.depth == 12
    torch.testing.assert_close(out["tokens"], ref.forward_features(x), atol=1e-4, rtol=1e-4)  # same normalisation
    last = ref.blocks[-1]
    y = last.norm1(out["hidden"][-2])
    q, k, _ = last.attn.qkv(y).view(1, 1 + N, 3, 12, 64).permute(2, 0, 3, 1, 4)
    want = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) / 8.0, -1).mean(1)[:, 0, 1:]
    torch.testing.assert_close(out["cls_attn"], want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Optimiser, schedule, checkpoints
# ---------------------------------------------------------------------------------------------
def test_param_groups_skip_decay_on_bias_norm_tokens():
    vit = nano(init_values=0.1)
    vit.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 64))
    decay, skip = common.param_groups(vit, 0.05)
    names = {id(p): n for n, p in vit.named_parameters()}
    skipped = {names[id(p)] for p in skip["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias",
            "blocks.0.ls1.gamma"} <= skipped
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight"} <= decayed
    assert "pos_embed" not in skipped | decayed  # frozen: not optimised at all
    assert decay["weight_decay"] == 0.05 and skip["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    a = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=10, epochs=110)
    assert common.lr_at(0, a) == 0.0 and common.lr_at(5, a) == pytest.approx(0.5)
    assert common.lr_at(10, a) == pytest.approx(1.0)
    assert common.lr_at(60, a) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert common.lr_at(110, a) == pytest.approx(0.1)


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    path = str(tmp_path / "c.pth")
    common.save_checkpoint(path, model={"w": torch.ones(2)}, epoch=3, args={"model": "x"}, method="milan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]  # no temp file left behind
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["method"] == "milan"
    with pytest.raises(common.UserError, match="checkpoint of milan, not cae"):
        common.load_checkpoint(path, "cae")
