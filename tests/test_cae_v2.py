"""cae_v2.py: mask ratio by size (Sec. 3.2), encoder + CAE regressor + shared head (App. B.1), loss (Eq. 2)."""
import random

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import v2

import cae_v2
import common
from conftest import SMOKE, images

N = 196


def args_for(model="vit_nano_patch16", *flags):
    args = cae_v2.get_args(["--data", "fake", "--model", model, "--teacher", "tiny", "--teacher_weights", "none", *flags])
    args.device = "cpu"
    return args


def small_model(target_dim=32, regressor_dim=None, seed=0):
    torch.manual_seed(seed)
    enc = common.build_vit("vit_nano_patch16", 224, init_values=0.1)
    return cae_v2.CAEv2(enc, target_dim, regressor_dim, regressor_depth=2, drop_path=0.0)


def split(batch=2, num_masked=98, seed=0):
    random.seed(seed)
    gen = common.BlockMaskGenerator(14, num_masked)
    return common.ids_from_mask(torch.stack([gen() for _ in range(batch)]), N - num_masked)


# ---------------------------------------------------------------------------------------------
# Recipe, model sizes and masking (Sec. 3.1, 3.2, App. B.1, Table 8)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,ratio,masked,depth,width,dpr", [
    ("vit_tiny_patch16", 0.15, 30, 1, 96, 0.1), ("vit_small_patch16", 0.25, 49, 1, 384, 0.1),
    ("vit_base_patch16", 0.5, 98, 4, 768, 0.1), ("vit_large_patch16", 0.6, 118, 4, 1024, 0.2),
    ("vit_nano_patch16", 0.5, 98, 1, 64, 0.1)])
def test_mask_count_regressor_and_drop_path_follow_the_model_size(model, ratio, masked, depth, width, dpr):
    args = args_for(model)
    assert (args.mask_ratio, args.regressor_depth, args.regressor_dim, args.drop_path) == (ratio, depth, width, dpr)
    assert masked == N - int(N * (1 - ratio) + 1e-6)  # the encoder keeps floor(N (1 - r)) patches
    gen = cae_v2.block_masking(args)
    assert all(int(gen().sum()) == masked for _ in range(20))  # exact count, every draw
    assert int(cae_v2.block_masking(args_for(model, "--mask_ratio", "0.4"))().sum()) == N - int(N * 0.6 + 1e-6)


def test_recipe_defaults_follow_table_8():
    a = args_for("vit_base_patch16")
    assert a.blr * 2048 / 256 == pytest.approx(1.5e-3) and tuple(a.betas) == (0.9, 0.98)
    assert (a.epochs, a.warmup_epochs, a.min_lr, a.clip_grad, a.weight_decay) == (300, 10, 1e-5, 3.0, 0.05)
    assert (a.crop_min, a.color_jitter, a.layer_scale) == (0.4, 0.4, 0.1) and a.batch_size * 8 == 2048
    t = cae_v2.build_transform(a)
    jitter = t.first  # on the whole image, before the crop
    assert (t.size, t.scale) == (224, (0.4, 1.0))
    assert type(jitter).__name__ == "ColorJitter" and jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.6, 1.4)
    assert jitter.contrast == (0.6, 1.4) and jitter.hue is None


def test_vit_tiny_has_12_heads_and_a_narrow_regressor_behind_fc_ln(tiny_teacher):
    model, _ = cae_v2.build_model(args_for("vit_tiny_patch16"))
    assert model.encoder.embed_dim == 192 and model.encoder.blocks[0].attn.num_heads == 12  # Sec. 3.1
    proj = model.encoder_to_regressor
    assert [type(m) for m in proj] == [nn.Linear, nn.LayerNorm] and proj[0].weight.shape == (96, 192)
    assert len(model.regressor.blocks) == 1 and model.regressor.blocks[0].attn.num_heads == 12
    assert not hasattr(model.regressor, "norm")  # no final LN in CAE v2's regressor
    assert model.encoder.blocks[-1].drop_path == pytest.approx(0.1) and model.encoder.blocks[0].ls1.gamma[0] == 0.1
    assert isinstance(small_model().encoder_to_regressor, nn.Identity)  # same width: no projection


# ---------------------------------------------------------------------------------------------
# Shared head (App. B.1) and loss (Eq. 2)
# ---------------------------------------------------------------------------------------------
def test_one_fc_ln_head_serves_both_branches():
    model = small_model(target_dim=48, regressor_dim=32).eval()  # three different widths: 64, 32, 48
    assert isinstance(model.encoder_to_regressor[0], nn.Linear)  # 64 -> 32 first
    head = model.head
    assert [type(m) for m in head] == [nn.Linear, nn.LayerNorm]  # FC, then LN (App. B.1 order)
    assert sum(isinstance(m, nn.LayerNorm) and m.normalized_shape == (48,) for m in model.modules()) == 1  # one head
    calls = []
    hook = head.register_forward_hook(lambda m, a, out: calls.append((a[0].detach(), out.detach())))
    x, (ids_keep, ids_mask) = images(), split()
    tv, tm = torch.randn(2, 98, 48), torch.randn(2, 98, 48)
    _, out = model(x, ids_keep, ids_mask, tv, tm)
    hook.remove()
    assert len(calls) == 2  # one module, called once on the visible and once on the masked latents
    z_v = model.forward_encoder(x, ids_keep)
    torch.testing.assert_close(calls[0][0], z_v)
    torch.testing.assert_close(calls[1][0], model.forward_regressor(z_v, ids_keep, ids_mask))
    fc, ln = head.fc, head.norm
    for (inp, _), pred in zip(calls, (out["pred_v"], out["pred_m"])):
        y = inp @ fc.weight.T + fc.bias
        y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-6)
        torch.testing.assert_close(pred, y * ln.weight + ln.bias, atol=1e-5, rtol=1e-5)


def test_loss_equals_eq2_with_two_separate_means():
    g = torch.Generator().manual_seed(0)
    zv, tv = torch.randn(2, 166, 16, generator=g), torch.randn(2, 166, 16, generator=g)  # ViT-T: |v| = 166
    zm, tm = torch.randn(2, 30, 16, generator=g), torch.randn(2, 30, 16, generator=g)  # |m| = 30
    tm[:, :10] = 3 * zm[:, :10]  # some aligned pairs, so the two terms differ clearly
    cos = lambda u, v: float((u * v).sum() / (u.norm() * v.norm()))
    l_v = sum(1 - cos(zv[b, i], tv[b, i]) for b in range(2) for i in range(166)) / (2 * 166)
    l_z = sum(1 - cos(zm[b, i], tm[b, i]) for b in range(2) for i in range(30)) / (2 * 30)
    assert cae_v2.cae_v2_loss(zv, tv, zm, tm).item() == pytest.approx(l_v + l_z, rel=1e-5)
    one_mean = (l_v * 166 + l_z * 30) / 196  # what a single mean over all tokens would give
    assert abs((l_v + l_z) - one_mean) > 0.5
    assert cae_v2.cae_v2_loss(3 * tv, tv, -tm, tm).item() == pytest.approx(2.0, rel=1e-5)  # 0 + 2


@pytest.mark.parametrize("distance", ["mse", "smooth_l1"])
def test_table3_distances_switch_both_terms_against_the_normalised_latent(distance):
    g = torch.Generator().manual_seed(0)
    zv, tv = torch.randn(2, 166, 16, generator=g), 3 * torch.randn(2, 166, 16, generator=g) + 1  # off scale on purpose
    zm, tm = torch.randn(2, 30, 16, generator=g), 3 * torch.randn(2, 30, 16, generator=g) + 1

    def d(z, t):  # per token: t standardised over its channels (biased variance, eps 1e-6), then per-channel terms
        t = (t - t.mean()) / torch.sqrt(((t - t.mean()) ** 2).mean() + 1e-6)
        e = (z - t).abs()
        terms = e ** 2 if distance == "mse" else torch.where(e < 1, 0.5 * e ** 2, e - 0.5)  # smooth-l1, beta 1
        return float(terms.mean())
    l_v = sum(d(zv[b, i], tv[b, i]) for b in range(2) for i in range(166)) / (2 * 166)
    l_z = sum(d(zm[b, i], tm[b, i]) for b in range(2) for i in range(30)) / (2 * 30)
    assert cae_v2.cae_v2_loss(zv, tv, zm, tm, distance=distance).item() == pytest.approx(l_v + l_z, rel=1e-5)
    norm = lambda t: torch.nn.functional.layer_norm(t, (16,), eps=1e-6)
    assert cae_v2.cae_v2_loss(norm(tv), tv, norm(tm), tm, distance=distance).item() == pytest.approx(0.0, abs=1e-6)
    assert cae_v2.cae_v2_loss(norm(tv), tv, zm, tm, distance=distance, visible=False).item() == pytest.approx(l_z, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Training step: gradients and a few optimisation steps
# ---------------------------------------------------------------------------------------------
def fixed_batch(tiny_teacher, seed=0, distance="cosine"):
    args = args_for("vit_nano_patch16", "--loss", distance)
    torch.manual_seed(seed)
    model = cae_v2.CAEv2(common.build_vit("vit_nano_patch16", 224, init_values=0.1), tiny_teacher.dim, None, 1, 0.0,
                         loss=distance)
    ids_keep, _ = split(4, seed=seed)
    return model, (images(4, seed=seed), common.mask_from_ids(ids_keep, N)), args


def test_gradients_reach_the_student_never_the_teacher(tiny_teacher):
    model, batch, args = fixed_batch(tiny_teacher)
    out = cae_v2.forward_step(model, tiny_teacher, batch, args, per_patch=True)
    out["loss"].backward()
    for name in ["encoder.patch_embed.proj.weight", "encoder.blocks.1.ls2.gamma", "encoder.cls_token",
                 "regressor.mask_token", "regressor.blocks.0.attn.q.weight", "head.fc.weight", "head.norm.weight"]:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in tiny_teacher.parameters())
    patch_loss, mask = out["patch_loss"], out["mask"]
    assert patch_loss.shape == (4, N) and torch.all(patch_loss >= 0) and torch.all(patch_loss <= 2)
    assert (patch_loss[~mask].mean() + patch_loss[mask].mean()).item() == pytest.approx(out["loss"].item(), rel=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "mse", "smooth_l1"])
def test_steps_on_one_batch_lower_the_loss(tiny_teacher, distance):
    model, batch, args = fixed_batch(tiny_teacher, distance=distance)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = cae_v2.forward_step(model, tiny_teacher, batch, args)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses[::4], losses[4::4])), losses


# ---------------------------------------------------------------------------------------------
# Released-code details the paper leaves open: colour jitter before the crop
# ---------------------------------------------------------------------------------------------
def test_colour_jitter_sees_the_whole_image_before_the_crop():
    """The released pipeline jitters the whole image, then flips and crops: its contrast blends towards the whole
    image's mean. A 2:1 image with crop scale (1, 1) is always cropped to its central 4:3 part (the widest aspect
    RandomResizedCrop allows), so two images equal inside that part and different outside it give the same view
    when the jitter comes after the crop, and different views when it comes first."""
    a = args_for("vit_nano_patch16", "--crop_min", "1.0")
    inside = Image.new("RGB", (200, 150), (60, 120, 90))
    inside.paste((150, 40, 200), (100, 0, 200, 150))  # two colours inside the crop
    pair = []
    for outside in [(0, 0, 0), (255, 255, 255)]:  # columns 0..49 and 250..299 are cut away by the crop
        img = Image.new("RGB", (300, 150), outside)
        img.paste(inside, (50, 0))
        pair.append(img)
    normalised = lambda t: lambda img: common.to_device(t(img)[0][None], "cpu")[0]  # the uint8 view, as the loop gets it
    pipelines = {"ours": normalised(cae_v2.build_transform(a)),
                 "no jitter": normalised(cae_v2.build_transform(args_for("vit_nano_patch16", "--crop_min", "1.0",
                                                                         "--color_jitter", "0"))),
                 "jitter after crop": v2.Compose([  # the order before this fix: crop, flip, then jitter
                     v2.RandomResizedCrop(224, scale=(1.0, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                     v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])}
    views = {}
    for name, t in pipelines.items():
        views[name] = []
        for img in pair:
            torch.manual_seed(3)  # the same jitter factors and flip for both images
            views[name].append(t(img))
    torch.testing.assert_close(*views["no jitter"])  # the cut-away columns do not reach the view...
    torch.testing.assert_close(*views["jitter after crop"])  # ...nor the jitter applied to the crop
    assert (views["ours"][0] - views["ours"][1]).abs().mean() > 0.005  # jitter first: they do (contrast's mean)
    assert a.color_jitter == 0.4


# ---------------------------------------------------------------------------------------------
# Ablation switches: Table 5 (random masking), Table 2 / Table 1 No. 2 (l_z alone), Table 4 (0 layers: l_v alone)
# ---------------------------------------------------------------------------------------------
def test_random_masking_hides_as_many_patches_in_no_blocks():
    gen = cae_v2.block_masking(args_for("vit_base_patch16", "--mask_type", "random"))
    masks = torch.stack([gen() for _ in range(50)])
    assert masks.dtype == torch.bool and torch.all(masks.sum(1) == 98)
    # block masks come in rectangles of >= 16 patches; uniform ones leave most masked patches with a visible
    # 4-neighbour: on average 98 * (1 - 0.5^4)-ish of them, far above what block masks give
    def exposed(m):
        g = m.view(14, 14)
        vis = ~g
        nb = torch.zeros_like(g)
        nb[1:] |= vis[:-1]; nb[:-1] |= vis[1:]; nb[:, 1:] |= vis[:, :-1]; nb[:, :-1] |= vis[:, 1:]
        return int((g & nb).sum())
    blocks = cae_v2.block_masking(args_for("vit_base_patch16"))
    assert sum(map(exposed, masks)) / 50 > 80 > 60 > sum(exposed(blocks()) for _ in range(50)) / 50


def test_no_visible_align_trains_on_l_z_alone(tiny_teacher):
    model, batch, args = fixed_batch(tiny_teacher)
    model.visible_align = args.visible_align = False
    images_, mask = batch
    ids_keep, ids_mask = common.ids_from_mask(mask, 98)
    tokens = tiny_teacher(images_, tokens=True)["tokens"][:, 1:]
    take = lambda ids: tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))
    loss, out = model(images_, ids_keep, ids_mask, take(ids_keep), take(ids_mask))
    cos = torch.nn.functional.cosine_similarity(out["pred_m"], take(ids_mask), dim=-1)
    assert loss.item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)  # l_z only
    step = cae_v2.forward_step(model, tiny_teacher, batch, args, per_patch=True)
    assert torch.all(step["patch_loss"][~mask] == 0) and torch.all(step["patch_loss"][mask] > 0)


def test_zero_regressor_layers_train_on_l_v_alone(tiny_teacher, tmp_path):
    args = args_for("vit_nano_patch16", "--regressor_depth", "0")
    model, _ = cae_v2.build_model(args)
    assert model.regressor is None  # Table 4's 0 layers: no regressor parameters at all (DDP needs none unused)
    images_, (ids_keep, ids_mask) = images(2), split()
    tokens = tiny_teacher(images_, tokens=True)["tokens"][:, 1:]
    take = lambda ids: tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))
    loss, out = model(images_, ids_keep, ids_mask, take(ids_keep), take(ids_mask))
    cos = torch.nn.functional.cosine_similarity(out["pred_v"], take(ids_keep), dim=-1)
    assert out["pred_m"] is None and loss.item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(common.UserError, match="no loss"):
        args_for("vit_nano_patch16", "--regressor_depth", "0", "--no-visible_align")
    cae_v2.main(SMOKE + ["--regressor_depth", "0", "--mask_type", "random", "--fake_size", "16", "--output_dir",
                         str(tmp_path)])  # trains end to end
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert not any(k.startswith("regressor.") for k in ckpt["model"]) and ckpt["optimizer"]["state"][0]["step"] == 2
