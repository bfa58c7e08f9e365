"""Each method's forward_step pairs every target with its own patch of its own image.

forward_step draws (or receives) the mask, runs the teacher (or tokenizer, or patchify) and hands the targets to
the model. A slip there (targets of another patch, or of another image) keeps every shape and every loss formula
intact, so the loss-equation tests cannot see it. Here the loss forward_step returns must equal the model's loss
on targets that the test gathers patch by patch, in Python loops, from the teacher's output for patch j of image b
(token 1 + j: token 0 is CLS). Checked: each test fails when forward_step's targets are reversed in patch order
(the mutation the README's learn run could only half see: 'See it learn')."""
import random
from argparse import Namespace

import pytest
import torch

import cae
import cae_v2
import common
import mask_align
import milan
import mr_mae
from conftest import images

N, B = 196, 2


def at(rows, ids):
    """rows [B, L, ...], ids [B, n] -> [B, n, ...]: row ids[b][i] of image b, one by one."""
    return torch.stack([torch.stack([rows[b][j] for j in ids[b].tolist()]) for b in range(len(ids))])


def block_mask(num_masked, seed=0):
    random.seed(seed)
    gen = common.BlockMaskGenerator(14, num_masked)
    return torch.stack([gen() for _ in range(B)])  # [B, N], True = hidden


def test_milan_targets_are_the_teachers_token_of_each_patch(tiny_teacher):
    torch.manual_seed(0)
    model = milan.MILAN(common.build_vit("vit_nano_patch16", 224), tiny_teacher.dim, decoder_dim=32, decoder_depth=2,
                        decoder_heads=2).eval()
    args = milan.get_args(["--data", "fake", "--model", "vit_nano_patch16"])
    x = images(B)
    with torch.no_grad():
        out = milan.forward_step(model, tiny_teacher, x, args)
        ids_keep, ids_mask = common.ids_from_mask(out["mask"], 49)
        tokens = tiny_teacher(x)["tokens"]  # [B, 1 + N, C]
        target = at(tokens[:, 1:], torch.arange(N).expand(B, N))  # t_j for j = 0 .. N-1 (Eq. 1: all patches)
        expected, _ = model(x, ids_keep, ids_mask, target)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def patch_pixels(x, norm=True):
    """Each patch's own 16 x 16 x 3 pixels in (row, col, channel) order, normalised by their mean and std: [B, N, 768]."""
    rows = [[x[b, :, 16 * (j // 14):16 * (j // 14) + 16, 16 * (j % 14):16 * (j % 14) + 16].permute(1, 2, 0).flatten()
             for j in range(N)] for b in range(len(x))]
    return torch.stack([torch.stack([(p - p.mean()) / (p.var() + 1e-6) ** 0.5 if norm else p for p in r]) for r in rows])


def test_milan_pixel_targets_are_the_pixels_of_each_patch(tiny_teacher):
    torch.manual_seed(0)
    model = milan.MILAN(common.build_vit("vit_nano_patch16", 224), 768, 32, 2, 2, "mae", "pixel").eval()
    args = milan.get_args(["--data", "fake", "--model", "vit_nano_patch16", "--target", "pixel", "--decoder", "mae"])
    x = images(B)
    with torch.no_grad():
        out = milan.forward_step(model, tiny_teacher, x, args)
        ids_keep, ids_mask = common.ids_from_mask(out["mask"], 49)
        expected, _ = model(x, ids_keep, ids_mask, patch_pixels(x))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("target", ["dalle", "pixel"])
def test_cae_targets_are_the_token_or_pixels_of_each_masked_patch(target):
    args = cae.get_args(["--data", "fake", "--model", "vit_nano_patch16", "--target", target, "--dalle_weights", "none",
                         "--dalle_n_hid", "16"])
    args.device = "cpu"
    torch.manual_seed(0)
    model, tokenizer = cae.build_model(args)
    model.eval()
    x, mask = images(B), block_mask(98)
    token_view = torch.randint(0, 256, (B, 3, 112, 112), dtype=torch.uint8)  # as the loader gives it
    batch = (x, token_view, mask) if target == "dalle" else (x, mask)
    with torch.no_grad():
        out = cae.forward_step(model, tokenizer, batch, args)
        ids_keep, ids_mask = common.ids_from_mask(mask, 98)
        if target == "dalle":  # the tokenizer's token of each masked patch
            per_patch = tokenizer.tokenize(0.8 * token_view.float() / 255 + 0.1)  # [B, N], DALL-E's map_pixels
        else:  # each masked patch's own 16 x 16 x 3 pixels, normalised by their mean and std
            per_patch = torch.stack([torch.stack([
                (p - p.mean()) / (p.var() + 1e-6) ** 0.5 for p in
                (x[b, :, 16 * (j // 14):16 * (j // 14) + 16, 16 * (j % 14):16 * (j % 14) + 16].permute(1, 2, 0).flatten()
                 for j in range(N))]) for b in range(B)])  # [B, N, 768], (row, col, channel) order
        expected, _ = model(x, ids_keep, ids_mask, at(per_patch, ids_mask))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_cae_clip_targets_are_the_teachers_token_of_each_masked_patch():
    args = cae.get_args(["--data", "fake", "--model", "vit_nano_patch16", "--target", "clip", "--teacher", "tiny",
                         "--teacher_weights", "none"])
    args.device = "cpu"
    torch.manual_seed(0)
    model, teacher = cae.build_model(args)
    model.eval()
    x, mask = images(B), block_mask(98)
    with torch.no_grad():
        out = cae.forward_step(model, teacher, (x, mask), args)
        ids_keep, ids_mask = common.ids_from_mask(mask, 98)
        expected, _ = model(x, ids_keep, ids_mask, at(teacher(x)["tokens"][:, 1:], ids_mask))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_cae_v2_targets_are_the_teachers_token_of_each_visible_and_masked_patch(tiny_teacher):
    torch.manual_seed(0)
    model = cae_v2.CAEv2(common.build_vit("vit_nano_patch16", 224, init_values=0.1), tiny_teacher.dim, None, 1, 0.0).eval()
    args = cae_v2.get_args(["--data", "fake", "--model", "vit_nano_patch16"])
    x, mask = images(B), block_mask(30)  # vit_nano keeps cae_v2's ViT-T ratio: 30 of 196 masked
    n_keep = common.num_visible(N, args.mask_ratio)
    with torch.no_grad():
        out = cae_v2.forward_step(model, tiny_teacher, (x, mask), args)
        ids_keep, ids_mask = common.ids_from_mask(mask, n_keep)
        tokens = tiny_teacher(x)["tokens"][:, 1:]  # [B, N, C]
        expected, _ = model(x, ids_keep, ids_mask, at(tokens, ids_keep), at(tokens, ids_mask))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mr_mae_targets_are_the_pixels_and_teachers_token_of_each_patch(tiny_teacher):
    torch.manual_seed(0)
    enc = mr_mae.build_encoder(Namespace(arch="vit", model="vit_nano_patch16", input_size=224, drop_path=0.0))
    model = mr_mae.MRMAE(enc, tiny_teacher.dim, mr_mae.default_fusion_layers(len(enc.blocks)), decoder_dim=32,
                         decoder_depth=2, decoder_heads=2).eval()
    args = Namespace(mask_ratio=0.75, focus="attention", norm_pix_loss=False)  # raw pixels: I_j is patch j itself
    x = images(B)
    with torch.no_grad():
        out = mr_mae.forward_step(model, tiny_teacher, x, args)
        ids_keep, ids_mask = common.ids_from_mask(out["mask"], 49)
        pixels = torch.stack([torch.stack([
            x[b, :, 16 * (j // 14):16 * (j // 14) + 16, 16 * (j % 14):16 * (j % 14) + 16].permute(1, 2, 0).flatten()
            for j in range(N)]) for b in range(B)])  # [B, N, 768]
        tokens = at(tiny_teacher(x)["tokens"][:, 1:], torch.arange(N).expand(B, N))  # F_j
        expected = model(x, ids_keep, ids_mask, pixels, tokens)[0]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mask_align_targets_are_the_teachers_features_of_each_visible_patch(tiny_teacher):
    torch.manual_seed(0)
    model = mask_align.MaskAlign(common.build_vit("vit_nano_patch16", 224), tiny_teacher.depth, tiny_teacher.width,
                                 5, "dynamic").eval()
    args = mask_align.get_args(["--data", "fake", "--model", "vit_nano_patch16"])
    x = images(B)
    n_keep = common.num_visible(N, args.mask_ratio)
    with torch.no_grad():
        out = mask_align.forward_step(model, tiny_teacher, x, args)
        ids_keep, _ = common.ids_from_mask(out["mask"], n_keep)
        hidden = tiny_teacher(x, tokens=False, hidden=True)["hidden"]
        K = min(5, tiny_teacher.depth)  # --top_k unset: Table 3's K = 5, at most the teacher's depth
        every = mask_align.alignment_targets(hidden, torch.arange(N).expand(B, N), K, args.target_norm)  # [K, B, 1+N, W]
        target = torch.stack([torch.cat([every[k][:, :1], at(every[k][:, 1:], ids_keep)], 1) for k in range(K)])
        expected, _ = model(x, ids_keep, target, args.align_cls)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
