"""cae.py: block masking and the two views, regressor (Sec. 2.1), alignment target, loss (Eq. 1), DALL-E tokenizer."""
import math
import os
import random
import sys
import types
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cae
import common
from conftest import images
from regressor_formula import randomise

N = 196


def small_model(num_targets=8192, seed=0):
    torch.manual_seed(seed)
    enc = common.build_vit("vit_nano_patch16", 224, init_values=0.1)
    return cae.CAE(enc, num_targets, regressor_depth=2, decoder_depth=2, drop_path=0.0)


def split(batch=2, seed=0):
    """Block-wise masks of 98 patches -> ids_keep, ids_mask [B, 98] each."""
    random.seed(seed)
    gen = common.BlockMaskGenerator(14, 98)
    return common.ids_from_mask(torch.stack([gen() for _ in range(batch)]), 98)


def args_for(*flags):
    args = cae.get_args(["--data", "fake", "--model", "vit_nano_patch16", *flags])
    args.device = "cpu"
    return args


# ---------------------------------------------------------------------------------------------
# Masking and the data pipeline (Sec. 2.2)
# ---------------------------------------------------------------------------------------------
def test_recipe_defaults_follow_appendix_a():
    a = cae.get_args(["--data", "fake"])
    assert a.blr * 2048 / 256 == pytest.approx(1.5e-3) and tuple(a.betas) == (0.9, 0.999)
    assert (a.epochs, a.warmup_epochs, a.min_lr, a.clip_grad, a.weight_decay) == (300, 10, 1e-5, 3.0, 0.05)
    assert (a.crop_min, a.drop_path, a.align_weight, a.layer_scale, a.target) == (0.08, 0.1, 2.0, 0.1, "dalle")
    assert a.batch_size * 8 == 2048  # 8 GPUs
    assert cae.get_args(["--data", "fake", "--model", "vit_large_patch16"]).layer_scale == 1e-5


def test_data_pipeline_yields_two_views_of_one_crop_and_98_block_masked_patches():
    y, x = np.mgrid[0:300, 0:400]  # ramps and large squares: comparable across resolutions, not flip-symmetric
    img = Image.fromarray(np.stack([x * 255 // 400, y * 255 // 300, 255 * ((x // 80 + y // 80) % 2)], -1).astype(np.uint8))
    torch.manual_seed(1), random.seed(1)
    view, token_view, mask = cae.build_transform(args_for())(img)
    assert view.shape == (3, 224, 224) and token_view.shape == (3, 112, 112)
    assert view.dtype == token_view.dtype == torch.uint8  # made in the workers; converted on the device
    assert mask.dtype == torch.bool and mask.shape == (N,) and int(mask.sum()) == 98
    # DALL-E map_pixels 0.8 x + 0.1: black and white squares land on 0.1 and 0.9
    token_view = cae.map_pixels(token_view[None])[0]
    assert token_view.min().item() == pytest.approx(0.1) and token_view.max().item() == pytest.approx(0.9)
    view = common.to_device(view[None], "cpu")[0]  # ImageNet-normalised, as the loop gets it
    pixels = view * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    same = F.avg_pool2d(pixels[None], 2)[0]  # the encoder's view at 112 px
    assert ((token_view - 0.1) / 0.8 - same).abs().mean() < 0.02  # the same crop and flip
    assert ((token_view - 0.1) / 0.8 - same.flip(-1)).abs().mean() > 0.05  # (a wrong flip would be seen)
    view2, mask2 = cae.build_transform(args_for("--target", "pixel"))(img)
    assert view2.shape == (3, 224, 224) and int(mask2.sum()) == 98


def test_masks_come_from_the_loader_workers():
    args = args_for("--fake_size", "8", "--batch_size", "4", "--num_workers", "1")
    args.rank, args.world_size = 0, 1
    loader = common.build_loader(common.build_dataset(args, cae.build_transform(args)), args)
    (view, token_view, mask), _ = next(iter(loader))
    assert view.shape == (4, 3, 224, 224) and token_view.shape == (4, 3, 112, 112)
    assert mask.shape == (4, N) and torch.all(mask.sum(1) == 98)
    assert len({tuple(m.tolist()) for m in mask}) == 4  # a new block mask per image


# ---------------------------------------------------------------------------------------------
# Latent contextual regressor (Sec. 2.1)
# ---------------------------------------------------------------------------------------------
def randomised_block(dim=32, heads=4):
    return randomise(cae.RegressorBlock(dim, heads, layer_scale=0.1))


def test_positions_enter_queries_and_keys_but_not_values():
    blk = randomised_block()
    x, z_v, pos_m, pos_v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    other_pos_v = pos_v + torch.randn_like(pos_v)
    with torch.no_grad():
        assert not torch.allclose(blk(x, z_v, pos_m, pos_v), blk(x, z_v, pos_m, other_pos_v), atol=1e-4)  # keys see P_v
        blk.attn.q.weight.zero_(), blk.attn.q.bias.zero_()  # q = 0: uniform attention, output = mean of the values
        torch.testing.assert_close(blk(x, z_v, pos_m, pos_v), blk(x, z_v, pos_m, other_pos_v))  # values carry no P_v


def test_regressor_never_updates_the_visible_latents_yet_reads_them():
    model = small_model().eval()
    ids_keep, ids_mask = split()
    z_v = model.forward_encoder(images(), ids_keep)[:, 1:].detach()
    before, seen = z_v.clone(), []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone())) for b in model.regressor.blocks]
    z_m = model.forward_regressor(z_v, ids_keep, ids_mask)
    [h.remove() for h in hooks]
    assert z_m.shape == (2, 98, 64) and torch.equal(z_v, before)
    assert len(seen) == 2 and all(torch.equal(s, before) for s in seen)  # every layer reads the same Z_v
    z_v2 = z_v.clone()
    z_v2[0, 5] += torch.randn(64)  # one visible latent of image 0 (not a constant shift: LN_k, LN_v remove those)
    z_m2 = model.forward_regressor(z_v2, ids_keep, ids_mask)
    assert not torch.allclose(z_m[0], z_m2[0], atol=1e-4) and torch.equal(z_m[1], z_m2[1])


# ---------------------------------------------------------------------------------------------
# Alignment target and loss (Sec. 2.1, Eq. 1)
# ---------------------------------------------------------------------------------------------
def encoder_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None}


def test_alignment_target_is_the_encoder_on_the_masked_patches_and_carries_no_gradient():
    model = small_model().eval()  # drop path off, so that the passes are comparable
    x, (ids_keep, ids_mask) = images(), split()
    predict = lambda: model.forward_regressor(model.forward_encoder(x, ids_keep)[:, 1:], ids_keep, ids_mask)
    zbar = model.alignment_target(x, ids_mask)
    assert not zbar.requires_grad and zbar.shape == (2, 98, 64)
    torch.testing.assert_close(zbar, model.encoder(x, ids_mask)[:, 1:].detach())  # same weights, masked patches
    g_model = encoder_grads(model, cae.alignment_loss(predict(), zbar))
    with torch.no_grad():
        constant = model.encoder(x, ids_mask)[:, 1:].clone()
    g_ref = encoder_grads(model, ((predict() - constant) ** 2).mean())  # gradient through Z_m only
    g_live = encoder_grads(model, ((predict() - model.encoder(x, ids_mask)[:, 1:]) ** 2).mean())  # no sg[.]
    assert g_model.keys() == g_ref.keys() and "blocks.0.attn.qkv.weight" in g_model
    for n in g_ref:
        torch.testing.assert_close(g_model[n], g_ref[n])
    assert not torch.allclose(g_live["blocks.0.attn.qkv.weight"], g_ref["blocks.0.attn.qkv.weight"])  # test can fail


def test_cae_loss_equals_cross_entropy_plus_two_mse():
    g = torch.Generator().manual_seed(0)
    pred, labels = torch.randn(2, 98, 8192, generator=g), torch.randint(0, 8192, (2, 98), generator=g)
    z_m, zbar = torch.randn(2, 98, 16, generator=g), torch.randn(2, 98, 16, generator=g)
    ce = mse = 0.0
    for b in range(2):
        for j in range(98):
            logits = pred[b, j].double()
            ce += float(logits.max() + torch.log(torch.exp(logits - logits.max()).sum()) - logits[labels[b, j]])
            mse += float(((z_m[b, j] - zbar[b, j]).double() ** 2).sum())
    expected = ce / 196 + 2 * mse / (196 * 16)
    assert cae.cae_loss(pred, labels, z_m, zbar, "dalle").item() == pytest.approx(expected, rel=1e-5)
    assert cae.cae_loss(pred, labels, z_m, zbar, "dalle", 0.5).item() == pytest.approx(ce / 196 + 0.5 * mse / 3136, rel=1e-5)
    per_patch = cae.cae_loss(pred, labels, z_m, zbar, "dalle", per_patch=True)
    assert per_patch.shape == (2, 98) and per_patch.mean().item() == pytest.approx(expected, rel=1e-5)
    pix = torch.randn(2, 98, 768, generator=g)
    expected_pix = float(((pred[..., :768] - pix) ** 2).mean()) + 2 * mse / 3136
    assert cae.cae_loss(pred[..., :768], pix, z_m, zbar, "pixel").item() == pytest.approx(expected_pix, rel=1e-5)
    feats, cos = torch.randn(2, 98, 32, generator=g), 0.0  # --target clip: 1 - cos(y_j, ybar_j), mean over patches
    for b in range(2):
        for j in range(98):
            y, t = pred[b, j, :32].double(), feats[b, j].double()
            cos += float(1 - (y @ t) / (y.norm() * t.norm()))
    expected_clip = cos / 196 + 2 * mse / 3136
    assert cae.cae_loss(pred[..., :32], feats, z_m, zbar, "clip").item() == pytest.approx(expected_clip, rel=1e-5)
    assert cae.cae_loss(3 * feats, feats, z_m, zbar, "clip", 0.0).item() == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_model_loss_is_eq1_of_its_own_parts():
    model = small_model().eval()
    x, (ids_keep, ids_mask) = images(), split()
    labels = torch.randint(0, 8192, ids_mask.shape)
    loss, out = model(x, ids_keep, ids_mask, labels)
    zbar = model.encoder(x, ids_mask)[:, 1:]
    z_m = model.forward_regressor(model.encoder(x, ids_keep)[:, 1:], ids_keep, ids_mask)
    logits = model.forward_decoder(z_m, ids_mask)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + 2 * F.mse_loss(z_m, zbar)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["pred"].shape == (2, 98, 8192)


def test_pixel_targets_are_per_patch_normalised_pixels():
    x = images(2)
    t = common.pixel_targets(x, 16)
    assert t.shape == (2, N, 768)
    for b, r, c in [(0, 0, 0), (1, 3, 11), (0, 13, 13)]:
        patch = x[b, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16].permute(1, 2, 0).flatten()  # (row, col, channel)
        mean, var = patch.mean(), ((patch - patch.mean()) ** 2).sum() / (768 - 1)
        torch.testing.assert_close(t[b, 14 * r + c], (patch - mean) / torch.sqrt(var + 1e-6), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# DALL-E tokenizer (Sec. 2.2): OpenAI's architecture and file format
# ---------------------------------------------------------------------------------------------
def test_dalle_encoder_has_openai_size_and_gives_one_token_per_patch():
    with torch.device("meta"):  # no memory, no time
        assert sum(p.numel() for p in cae.DalleEncoder().parameters()) == 53_786_240  # dall_e.Encoder() (53.8 M)
    torch.manual_seed(0)
    enc = cae.DalleEncoder(n_hid=64)
    assert not any(p.requires_grad for p in enc.parameters())
    x = 0.8 * torch.rand(2, 3, 112, 112) + 0.1
    ids, logits = enc.tokenize(x), enc(x)
    assert logits.shape == (2, 8192, 14, 14) and ids.shape == (2, N) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 8192 and len(ids.unique()) > 5
    for b, r, c in [(0, 0, 0), (1, 2, 9), (0, 13, 4)]:
        assert ids[b, 14 * r + c] == logits[b, :, r, c].argmax()  # raster order


# A stand-in for OpenAI's `dall_e` package, written the way its encoder.py / utils.py build the module tree
# (attrs fields as plain attributes, parameters w/b); the classes claim to live in dall_e.utils / dall_e.encoder,
# so a pickle of this tree names the same classes as OpenAI's encoder.pkl.
class Conv2d(nn.Module):
    __module__ = "dall_e.utils"

    def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16, self.device, self.requires_grad = \
            n_in, n_out, kw, use_float16, device, requires_grad
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / (n_in * kw ** 2) ** 0.5))
        self.b = nn.Parameter(0.1 * torch.randn(n_out))  # non-zero, so that biases are checked too

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    __module__ = "dall_e.encoder"

    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid, self.post_gain = n_out // 4, 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(self.n_hid, n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    __module__ = "dall_e.encoder"
    group_count = 4

    def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        n_layers = self.group_count * n_blk_per_group

        def group(n_in, n_out, pool=True):  # block_1 changes the width; a max-pool closes groups 1-3
            blocks = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                      for i in range(n_blk_per_group)]
            return nn.Sequential(OrderedDict(blocks + ([("pool", nn.MaxPool2d(kernel_size=2))] if pool else [])))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(input_channels, n_hid, 7)),
            ("group_1", group(n_hid, n_hid)), ("group_2", group(n_hid, 2 * n_hid)),
            ("group_3", group(2 * n_hid, 4 * n_hid)), ("group_4", group(4 * n_hid, 8 * n_hid, pool=False)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                  ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))])))]))

    def forward(self, x):
        return self.blocks(x)


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """OpenAI-format encoder.pkl files (torch's zip and legacy formats) of a narrow (n_hid 64) encoder."""
    out = tmp_path_factory.mktemp("dalle")
    fake = {"dall_e": types.ModuleType("dall_e"), "dall_e.utils": types.ModuleType("dall_e.utils"),
            "dall_e.encoder": types.ModuleType("dall_e.encoder")}
    fake["dall_e.utils"].Conv2d = Conv2d
    fake["dall_e.encoder"].EncoderBlock, fake["dall_e.encoder"].Encoder = EncoderBlock, Encoder
    with pytest.MonkeyPatch.context() as mp:  # importable only while pickling
        for name, mod in fake.items():
            mp.setitem(sys.modules, name, mod)
        torch.manual_seed(0)
        original = Encoder(n_hid=64).requires_grad_(False)
        with warnings.catch_warnings():  # torch cannot read the source of classes made up in a test
            warnings.simplefilter("ignore", UserWarning)
            torch.save(original, out / "encoder.pkl")
            torch.save(original, out / "encoder_legacy.pkl", _use_new_zipfile_serialization=False)
    return original, out


@pytest.mark.parametrize("name", ["encoder.pkl", "encoder_legacy.pkl"])
def test_openai_format_file_loads_and_gives_the_same_logits(openai_files, name):
    original, out = openai_files
    path = out / name
    raw = zipfile.ZipFile(path).read("encoder/data.pkl") if zipfile.is_zipfile(path) else path.read_bytes()
    assert b"dall_e.encoder" in raw and b"dall_e.utils" in raw  # the classes OpenAI's file names
    assert not any(m.split(".")[0] == "dall_e" for m in sys.modules)  # loads without the dall_e package
    enc = cae.load_dalle_encoder(str(path))
    assert isinstance(enc, cae.DalleEncoder) and not any(p.requires_grad for p in enc.parameters())
    x = 0.8 * torch.rand(1, 3, 112, 112) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(enc(x), original(x))


def test_missing_or_wrong_dalle_weights_give_one_clear_error(tmp_path):
    class Evil:  # a pickle that would run code: must be refused, not executed
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "pwned"),)
    torch.save({"blocks.input.w": Evil()}, tmp_path / "evil.pkl")
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "clip.pt")
    for path in [tmp_path / "nope.pkl", tmp_path / "evil.pkl", tmp_path / "clip.pt"]:
        with pytest.raises(common.UserError, match="--dalle_weights"):
            cae.load_dalle_encoder(str(path))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(common.UserError, match="--dalle_weights"):
        cae.build_tokenizer(args_for())  # --target dalle without weights


# ---------------------------------------------------------------------------------------------
# Training step: gradients and a few optimisation steps
# ---------------------------------------------------------------------------------------------
def fixed_batch(target, seed=0):
    teacher = ["--teacher", "tiny", "--teacher_weights", "none"] if target == "clip" else []
    args = args_for("--target", target, "--dalle_weights", "none", "--dalle_n_hid", "16", *teacher)
    model, tokenizer = cae.build_model(args)
    for blk in model.encoder.blocks:  # drop path off for a deterministic loss curve
        blk.drop_path = 0.0
    x, (ids_keep, ids_mask) = images(4, seed=seed), split(4, seed)
    batch = (x, torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8), common.mask_from_ids(ids_keep, N))
    return model, tokenizer, (batch if target == "dalle" else (batch[0], batch[2])), args


@pytest.mark.parametrize("target", ["dalle", "pixel", "clip"])
def test_gradients_reach_the_student_never_the_tokenizer(target):
    model, tokenizer, batch, args = fixed_batch(target)
    out = cae.forward_step(model, tokenizer, batch, args, per_patch=True)
    out["loss"].backward()
    for name in ["encoder.patch_embed.proj.weight", "encoder.blocks.1.ls1.gamma", "encoder.cls_token",
                 "regressor.mask_token", "regressor.blocks.3.attn.k.weight", "decoder_blocks.3.attn.qkv.weight",
                 "decoder_pred.weight"]:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    if tokenizer is not None:
        assert all(p.grad is None and not p.requires_grad for p in tokenizer.parameters())
    assert model.decoder_pred.out_features == {"dalle": 8192, "pixel": 768, "clip": 32}[target]  # tiny teacher: C = 32
    mask, patch_loss = out["mask"], out["patch_loss"]
    assert torch.all(patch_loss[~mask] == 0) and torch.all(patch_loss[mask] > 0)
    assert patch_loss[mask].mean().item() == pytest.approx(out["loss"].item(), rel=1e-5)  # Eq. 1 per patch


@pytest.mark.parametrize("target", ["dalle", "pixel", "clip"])
def test_steps_on_one_batch_lower_the_loss(target):
    model, tokenizer, batch, args = fixed_batch(target)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = cae.forward_step(model, tokenizer, batch, args)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in zip(losses[::4], losses[4::4])), losses


def test_clip_target_takes_the_teacher_flags_of_the_other_method_files():
    a = cae.get_args(["--data", "fake", "--target", "clip"])
    assert (a.teacher, a.teacher_weights) == ("ViT-B-16", "openai")  # as milan.py, cae_v2.py, ...
    assert cae.get_args(["--data", "fake", "--target", "clip", "--teacher", "ViT-L-14"]).teacher == "ViT-L-14"
    with pytest.raises(common.UserError, match="--target clip uses no DALL-E"):
        cae.get_args(["--data", "fake", "--target", "clip", "--dalle_weights", "encoder.pkl"])
    with pytest.raises(common.UserError, match="no teacher network with --target pixel"):
        cae.get_args(["--data", "fake", "--target", "pixel", "--teacher", "ViT-B-16"])
