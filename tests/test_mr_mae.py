"""mr_mae.py: focused mimicking (Sec. 3.3), multi-layer fusion, masked convolution stages, Eq. 1, Eq. 2, training."""
import math
from argparse import Namespace

import pytest
import torch

import common
import mr_mae
from conftest import images

N = 196


def small_model(arch="vit", target_dim=32, fusion=None, seed=0, high_level="mimic"):
    torch.manual_seed(seed)
    enc = mr_mae.build_encoder(Namespace(arch=arch, model="vit_nano_patch16", input_size=224, drop_path=0.0))
    layers = fusion or mr_mae.default_fusion_layers(len(enc.blocks))
    return mr_mae.MRMAE(enc, target_dim, layers, decoder_dim=32, decoder_depth=2, decoder_heads=2, high_level=high_level)


def split(batch=2, n_keep=49, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = common.mask_from_ids(torch.rand(batch, N, generator=g).argsort(1)[:, :n_keep], N)
    return mask, *common.ids_from_mask(mask, n_keep)


def hidden_patches(x, mask, b, scale=5.0, seed=1):
    """A copy of x with every hidden patch of image b replaced by other (large) pixels."""
    x2, g = x.clone(), torch.Generator().manual_seed(seed)
    for j in mask[b].nonzero().flatten().tolist():
        r, c = divmod(j, 14)
        x2[b, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = scale * torch.randn(3, 16, 16, generator=g)
    return x2


# ---------------------------------------------------------------------------------------------
# Focused mimicking (Sec. 3.3)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("focus", ["attention", "topk", "none"])
def test_every_focus_mode_keeps_49_distinct_patches(focus):
    attn = torch.rand(64, N).softmax(-1)
    mask = mr_mae.focused_sampling(attn, 49, focus)
    assert mask.shape == (64, N) and mask.dtype == torch.bool and torch.all((~mask).sum(1) == 49)


def test_topk_keeps_the_49_largest():
    attn = torch.rand(8, N)
    mask = mr_mae.focused_sampling(attn, 49, "topk")
    for b in range(8):
        largest = sorted(range(N), key=lambda i: -attn[b, i].item())[:49]
        assert set((~mask[b]).nonzero().flatten().tolist()) == set(largest)


def test_attention_single_draw_is_proportional():
    s = torch.arange(1, N + 1, dtype=torch.float) ** 2
    s = s / s.sum() * 0.9  # like cls_attn: sums to < 1 (CLS->CLS removed), not renormalised
    freq = (~mr_mae.focused_sampling(s.expand(40000, -1).contiguous(), 1, "attention")).float().mean(0)
    expected = s / s.sum()
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(expected.max() / 40000))


def test_salient_patches_stay_visible_except_with_focus_none():
    attn = torch.full((2000, N), 1e-6)
    attn[:, :20] = 0.04  # 20 salient patches hold ~80% of the attention
    freq = {f: (~mr_mae.focused_sampling(attn, 49, f)).float().mean(0) for f in ("attention", "topk", "none")}
    assert torch.all(freq["topk"][:20] == 1.0)
    assert freq["attention"][:20].min() > 0.99  # drawn first almost surely
    assert abs(freq["none"][:20].mean() - 0.25) < 0.02 and abs(freq["none"][20:].mean() - 0.25) < 0.02


# ---------------------------------------------------------------------------------------------
# Multi-layer fusion (Sec. 3.3)
# ---------------------------------------------------------------------------------------------
def test_default_fusion_layers():
    assert mr_mae.default_fusion_layers(12) == [4, 8, 12]  # ViT-B
    assert mr_mae.default_fusion_layers(11) == [4, 8, 11]  # ConvViT-B's transformer
    assert mr_mae.default_fusion_layers(24) == [8, 16, 24]
    assert mr_mae.default_fusion_layers(2) == [1, 2] and mr_mae.default_fusion_layers(1) == [1]


@pytest.mark.parametrize("arch,layers", [("vit", [2, 4, 6]), ("convvit_nano", [1, 2])])
def test_fusion_is_the_final_norm_of_the_summed_blocks(arch, layers):
    torch.manual_seed(0)
    enc = common.ViT(224, 16, 32, 6, 2) if arch == "vit" else small_model(arch).encoder
    model = mr_mae.MRMAE(enc, 16, layers, 32, 1, 2).eval()
    torch.nn.init.normal_(enc.norm.weight), torch.nn.init.normal_(enc.norm.bias)  # a non-trivial affine LN
    x, (_, ids_keep, _) = images(), split()
    _, hidden = enc(x, ids_keep, return_hidden=True)
    s = sum(hidden[i - 1] for i in layers)  # element-wise addition of the named blocks (1-based)
    mu, var = s.mean(-1, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
    expected = (s - mu) / torch.sqrt(var + 1e-6) * enc.norm.weight + enc.norm.bias
    fused = model.forward_encoder(x, ids_keep)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fused, enc(x, ids_keep), atol=1e-3)  # not just the last block


# ---------------------------------------------------------------------------------------------
# Masked convolution stages (Sec. 3.3, MCMAE)
# ---------------------------------------------------------------------------------------------
def test_upsample_mask_copies_each_patch_onto_its_block():
    vis = (torch.rand(2, 1, 14, 14) > 0.5).float()
    for f in (4, 2):
        up = mr_mae.upsample_mask(vis, f).tolist()
        v = vis.tolist()
        assert len(up[0][0]) == 14 * f
        assert all(up[b][0][r][c] == v[b][0][r // f][c // f] for b in range(2) for r in range(14 * f)
                   for c in range(14 * f))


def test_masked_patches_do_not_leak_into_visible_tokens(monkeypatch):
    enc = small_model("convvit_nano").encoder.eval()
    x, (mask, ids_keep, _) = images(), split()
    x2 = hidden_patches(hidden_patches(x, mask, 0), mask, 1)  # every hidden patch of both images changed
    with torch.no_grad():
        out, hid = enc(x, ids_keep, return_hidden=True)
        out2, hid2 = enc(x2, ids_keep, return_hidden=True)
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=0)  # [CLS] and all 49 visible tokens
    for h, h2 in zip(hid, hid2):
        torch.testing.assert_close(h, h2, atol=1e-6, rtol=0)
    # without the mask multiplication the 5x5 depthwise convs carry hidden pixels into visible tokens
    monkeypatch.setattr(mr_mae, "upsample_mask", lambda v, f: torch.ones_like(v).repeat_interleave(f, 2)
                        .repeat_interleave(f, 3))
    with torch.no_grad():
        leak = (enc(x, ids_keep) - enc(x2, ids_keep)).abs().amax(-1)  # [B, 1+n]
    assert (leak[:, 1:] > 1e-3).float().mean() > 0.5  # most visible tokens have a hidden neighbour


def test_convvit_interface_and_stage_shapes():
    enc = small_model("convvit_nano").encoder.eval()
    assert (enc.grid, enc.num_patches, enc.embed_dim, enc.patch_size, len(enc.blocks)) == (14, 196, 64, 16, 2)
    shapes = []
    for m in (enc.stage1[0], enc.stage2[0]):
        m.register_forward_hook(lambda mod, a, out: shapes.append(tuple(out.shape)))
    x, (_, ids_keep, _) = images(), split()
    with torch.no_grad():
        full = enc(x)  # fine-tuning path: no mask, all tokens
        out, hidden = enc(x, ids_keep, return_hidden=True)
        all_kept = enc(x, torch.arange(N).expand(2, -1))
    assert shapes[:2] == [(2, 16, 56, 56), (2, 32, 28, 28)]
    assert full.shape == (2, 1 + N, 64) and out.shape == (2, 50, 64) and len(hidden) == 2
    torch.testing.assert_close(all_kept, full)  # an all-visible mask changes nothing


def test_convvit_base_has_the_mcmae_geometry():
    with torch.device("meta"):  # shapes only, no memory or init time
        enc = mr_mae.build_encoder(Namespace(arch="convvit_base", model="x", input_size=224, drop_path=0.1))
        shapes = []
        for m in (enc.patch_embed1, enc.stage1[1], enc.patch_embed2, enc.stage2[1]):
            m.register_forward_hook(lambda mod, a, out: shapes.append(tuple(out.shape[1:])))
        out = enc(torch.zeros(1, 3, 224, 224), torch.arange(49)[None])
    assert shapes == [(256, 56, 56), (256, 56, 56), (384, 28, 28), (384, 28, 28)]
    assert out.shape == (1, 50, 768) and len(enc.blocks) == 11 and enc.blocks[0].attn.num_heads == 12
    assert enc.stage1[0].attn.kernel_size == (5, 5) and enc.stage1[0].attn.groups == 256  # 5x5 depthwise


# ---------------------------------------------------------------------------------------------
# Losses (Eq. 1, Eq. 2) and their patch sets
# ---------------------------------------------------------------------------------------------
def test_pixel_targets_are_normalised_patches_in_raster_order():
    x = images(2)
    for norm in (True, False):
        t = common.pixel_targets(x, 16, norm)
        assert t.shape == (2, N, 768)
        for b, j in [(0, 0), (0, 13), (1, 14), (1, 100), (0, 195)]:
            r, c = divmod(j, 14)
            patch = x[b, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16].permute(1, 2, 0).reshape(-1)  # (row, col, ch)
            if norm:
                patch = (patch - patch.mean()) / math.sqrt(patch.var().item() + 1e-6)
            torch.testing.assert_close(t[b, j], patch, atol=1e-5, rtol=1e-5)


def loops_eq(pred, target):
    """(1/l) sum_j ||pred_j - target_j||_2^2 per image, then the batch mean, by explicit loops."""
    per_image = []
    for b in range(pred.shape[0]):
        total = 0.0
        for j in range(pred.shape[1]):
            total += sum((float(p) - float(t)) ** 2 for p, t in zip(pred[b, j].tolist(), target[b, j].tolist()))
        per_image.append(total / pred.shape[1])
    return sum(per_image) / len(per_image)


def test_reconstruction_loss_equals_eq1():
    d, i = torch.randn(2, 147, 48), torch.randn(2, 147, 48)
    assert mr_mae.reconstruction_loss(d, i).item() == pytest.approx(loops_eq(d, i), rel=1e-5)


def test_mimic_loss_equals_eq2():
    le, f = torch.randn(3, 49, 32), torch.randn(3, 49, 32)
    assert mr_mae.mimic_loss(le, f).item() == pytest.approx(loops_eq(le, f), rel=1e-5)
    assert mr_mae.mimic_loss(f, f).item() == 0.0


def test_model_loss_is_half_eq1_on_masked_plus_half_eq2_on_visible():
    model = small_model().eval()
    x, (mask, ids_keep, ids_mask) = images(), split()
    pixels, tokens = common.pixel_targets(x), torch.randn(2, N, 32)
    with torch.no_grad():
        loss, pred, mimic = model(x, ids_keep, ids_mask, pixels, tokens)
    masked = [[j for j in range(N) if mask[b, j]] for b in range(2)]  # hidden patches, found by hand
    visible = [[j for j in range(N) if not mask[b, j]] for b in range(2)]
    rows = lambda t, sets: torch.stack([t[b, sets[b]] for b in range(2)])  # [B, l, C]
    l_r = loops_eq(rows(pred, masked), rows(pixels, masked))
    l_m = loops_eq(mimic, rows(tokens, visible))  # mimic rows are the visible patches in raster order
    assert loss.item() == pytest.approx(0.5 * l_r + 0.5 * l_m, rel=1e-5)
    # Table 3 rows 1 and 6 (--loss_weights 1 0: MAE's L_R alone; 0 1: L_M alone)
    for w_r, w_m in [(1.0, 0.0), (0.0, 1.0)]:
        model.loss_weights = (w_r, w_m)
        with torch.no_grad():
            assert model(x, ids_keep, ids_mask, pixels, tokens)[0].item() == pytest.approx(w_r * l_r + w_m * l_m, rel=1e-5)
    args = mr_mae.get_args(["--data", "fake", "--model", "vit_nano_patch16", "--teacher", "tiny", "--teacher_weights",
                            "none", "--loss_weights", "1", "0"])
    args.device = "cpu"
    assert mr_mae.get_args(["--data", "fake"]).loss_weights == (0.5, 0.5)
    assert mr_mae.build_model(args)[0].loss_weights == (1.0, 0.0)


def test_reconstruction_ignores_visible_patches_and_mimic_ignores_masked_ones():
    model = small_model().eval()
    x, (mask, ids_keep, ids_mask) = images(), split()
    pixels, tokens = common.pixel_targets(x), torch.randn(2, N, 32)
    vis, hid = ~mask[..., None], mask[..., None]
    with torch.no_grad():
        loss = lambda p, t: model(x, ids_keep, ids_mask, p, t)[0].item()
        base = loss(pixels, tokens)
        assert loss(pixels + 10 * vis, tokens) == base  # pixel targets of visible patches: no effect on L_R
        assert loss(pixels, tokens + 10 * hid) == base  # teacher features of masked patches: no effect on L_M
        assert loss(pixels + 10 * hid, tokens) > base + 1  # the other sets do move the loss
        assert loss(pixels, tokens + 10 * vis) > base + 1


def test_table3_row5_reconstructs_pixels_and_features_of_the_masked_patches_with_the_decoder():
    model = small_model(high_level="reconstruct").eval()
    assert not hasattr(model, "mimic_head") and model.decoder_feature_pred.in_features == 32  # no mimic at the encoder
    x, (mask, ids_keep, ids_mask) = images(), split()
    pixels, tokens = common.pixel_targets(x), torch.randn(2, N, 32)
    with torch.no_grad():
        loss, pred, feats = model(x, ids_keep, ids_mask, pixels, tokens)
        latent = model.forward_encoder(x, ids_keep)  # the decoder's normed output, rebuilt: one head per target
        x_dec = model.decoder_embed(latent)
        rows = [torch.cat([x_dec[b, :1], torch.stack([x_dec[b, 1 + ids_keep[b].tolist().index(j)] if not mask[b, j]
                                                      else model.mask_token[0, 0] for j in range(N)])]) for b in range(2)]
        h = torch.stack(rows) + model.decoder_pos_embed
        for blk in model.decoder_blocks:
            h = blk(h)
        h = model.decoder_norm(h)[:, 1:]  # [B, N, Dd]
    masked = [[j for j in range(N) if mask[b, j]] for b in range(2)]
    at = lambda t: torch.stack([t[b, masked[b]] for b in range(2)])  # [B, 147, ...], raster order
    torch.testing.assert_close(pred, model.decoder_pred(h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, at(model.decoder_feature_pred(h)), atol=1e-5, rtol=1e-5)
    expected = 0.5 * loops_eq(at(pred), at(pixels)) + 0.5 * loops_eq(feats, at(tokens))  # Eq. 1's form on both targets
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # the visible patches' features are no target any more; the masked ones' are
        assert model(x, ids_keep, ids_mask, pixels, tokens + 10 * ~mask[..., None])[0].item() == pytest.approx(loss.item())
        assert model(x, ids_keep, ids_mask, pixels, tokens + 10 * mask[..., None])[0].item() > loss.item() + 1


def test_table3_row5_trains_the_encoder_through_the_decoder_only(tiny_teacher):
    model = small_model(high_level="reconstruct")
    args = Namespace(mask_ratio=0.75, focus="attention", norm_pix_loss=True, high_level="reconstruct")
    out = mr_mae.forward_step(model, tiny_teacher, images(), args, per_patch=True)
    out["loss"].backward()
    for name in ["encoder.blocks.0.attn.qkv.weight", "decoder_feature_pred.weight", "decoder_pred.weight", "mask_token"]:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    mask, pl = out["mask"], out["patch_loss"]
    assert torch.all(pl[~mask] == 0) and torch.all(pl[mask] > 0)  # both terms sit on the masked patches
    assert pl[mask].mean().item() == pytest.approx(2.0, rel=1e-5)  # each term over its own mean: 1 + 1
    x = images()  # one fixed batch, one fixed mask: both reconstruction terms go down
    ids_keep, ids_mask = common.ids_from_mask(mask, 49)
    pixels, tokens = common.pixel_targets(x), tiny_teacher(x)["tokens"][:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, l_f = [], []
    for _ in range(10):
        loss, _, feats = model(x, ids_keep, ids_mask, pixels, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        l_f.append(mr_mae.reconstruction_loss(feats, common.gather(tokens, ids_mask)).item())
    l_r = [2 * a - b for a, b in zip(losses, l_f)]  # loss = 0.5 L_R(pixels) + 0.5 L_R(features)
    assert l_f[-1] < 0.75 * l_f[0] and l_r[-1] < 0.97 * l_r[0], (l_f, l_r)  # measured ~0.59x, ~0.92x


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
ARGS = Namespace(mask_ratio=0.75, focus="attention", norm_pix_loss=True, high_level="mimic")


@pytest.mark.parametrize("arch,names", [
    ("vit", ["encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.cls_token"]),
    ("convvit_nano", ["encoder.patch_embed1.proj.weight", "encoder.stage1.0.attn.weight", "encoder.stage2.1.conv1.weight",
                      "encoder.patch_embed4.weight", "encoder.blocks.0.attn.qkv.weight"])])
def test_gradients_reach_the_student_never_the_teacher(arch, names, tiny_teacher):
    model = small_model(arch)
    out = mr_mae.forward_step(model, tiny_teacher, images(), ARGS, per_patch=True)
    out["loss"].backward()
    for name in names + ["encoder.norm.weight", "mimic_head.weight", "decoder_embed.weight", "mask_token",
                         "decoder_blocks.1.attn.qkv.weight", "decoder_pred.weight"]:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in tiny_teacher.parameters())
    mask, pl = out["mask"], out["patch_loss"]
    assert torch.all((~mask).sum(1) == 49) and out["cls_attn"].shape == (2, N)
    assert torch.all(pl > 0)  # every patch is in one of the two losses
    # each term on its own scale (L_R's pixels and L_M's features have different units): its mean over the batch is 1
    assert pl[mask].mean().item() == pytest.approx(1.0, rel=1e-5) and pl[~mask].mean().item() == pytest.approx(1.0, rel=1e-5)
    ids_keep, ids_mask = common.ids_from_mask(mask, 49)
    target = tiny_teacher(images(), tokens=True)["tokens"][:, 1:]
    with torch.no_grad():
        _, pred, mimic = model(images(), ids_keep, ids_mask, common.pixel_targets(images()), target)
    l_m = (mimic - target.gather(1, ids_keep[..., None].expand(-1, -1, target.shape[-1]))).pow(2).sum(-1)  # [B, 49]
    assert torch.allclose(pl.gather(1, ids_keep), l_m / l_m.mean(), rtol=1e-4)  # ||L(E_j) - F_j||^2 / its mean


def test_steps_on_one_batch_lower_the_loss(tiny_teacher):
    model = small_model()
    x = images(2)
    out = tiny_teacher(x, cls_attn=True)
    mask = mr_mae.focused_sampling(out["cls_attn"], 49)
    ids_keep, ids_mask = common.ids_from_mask(mask, 49)
    pixels, tokens = common.pixel_targets(x), out["tokens"][:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, l_m = [], []
    for _ in range(10):
        loss, _, mimic = model(x, ids_keep, ids_mask, pixels, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        l_m.append(mr_mae.mimic_loss(mimic, common.gather(tokens, ids_keep)).item())
    l_r = [2 * a - b for a, b in zip(losses, l_m)]  # loss = 0.5 L_R + 0.5 L_M
    assert losses[-1] < 0.9 * losses[0], losses  # measured ~0.85x
    assert l_m[-1] < 0.3 * l_m[0] and l_r[-1] < 0.97 * l_r[0], (l_m, l_r)  # both terms go down (~0.05x, ~0.93x)
    assert all(b < a for a, b in zip(losses[::3], losses[3::3])), losses
