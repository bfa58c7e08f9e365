"""milan.py: semantic aware sampling (Eq. 3), prompting decoder (Eq. 2), loss (Eq. 1), training."""
import math

import numpy as np
import pytest
import torch

import common
import milan
from conftest import images

N = 196


def small_model(target_dim=32, seed=0):
    torch.manual_seed(seed)
    enc = common.build_vit("vit_nano_patch16", 224)
    return milan.MILAN(enc, target_dim, decoder_dim=32, decoder_depth=2, decoder_heads=2)


def split(batch=2, n_keep=49, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = common.mask_from_ids(torch.rand(batch, N, generator=g).argsort(1)[:, :n_keep], N)
    return common.ids_from_mask(mask, n_keep)


# ---------------------------------------------------------------------------------------------
# Semantic aware sampling (Sec. 2.4)
# ---------------------------------------------------------------------------------------------
def test_sampler_keeps_49_distinct_patches():
    attn = torch.rand(256, N).softmax(-1)
    mask = milan.semantic_aware_sampling(attn, 49)
    assert mask.shape == (256, N) and torch.all((~mask).sum(1) == 49)  # 49 distinct: no index repeats


def test_sampler_single_draw_is_proportional_to_attention():
    # One draw from Multinomial(s_class): P(i) = s(i) / sum s exactly.
    s = torch.arange(1, N + 1, dtype=torch.float) ** 2
    s = s / s.sum() * 0.9  # like cls_attn: sums to < 1 (CLS->CLS removed), not renormalised
    mask = milan.semantic_aware_sampling(s.expand(40000, -1).contiguous(), 1)
    freq = (~mask).float().mean(0)
    expected = s / s.sum()
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(expected.max() / 40000))


def test_sampler_matches_sequential_draws_without_replacement():
    # 49 draws without replacement: compare inclusion frequencies with an independent sequential sampler
    w = np.ones(N)
    w[:20] = 8.0  # 20 salient patches
    rng, runs, ref = np.random.default_rng(0), 3000, np.zeros(N)
    for _ in range(runs):
        left = w.copy()
        for _ in range(49):
            i = rng.choice(N, p=left / left.sum())
            ref[i] += 1
            left[i] = 0.0
    ref /= runs
    mask = milan.semantic_aware_sampling(torch.tensor(w, dtype=torch.float).expand(runs, -1).contiguous(), 49)
    freq = (~mask).float().mean(0).numpy()
    assert abs(freq[:20].mean() - ref[:20].mean()) < 0.02 and abs(freq[20:].mean() - ref[20:].mean()) < 0.01
    assert freq[:20].mean() > 2.5 * freq[20:].mean()  # salient patches stay visible far more often


# ---------------------------------------------------------------------------------------------
# Prompting decoder (Sec. 2.3, Eq. 2)
# ---------------------------------------------------------------------------------------------
def test_prompting_attention_equals_eq2_per_head():
    attn = milan.PromptingAttention(32, 4)
    x, z = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    Wq, bq = attn.q.weight.T, attn.q.bias
    Wk, Wv = attn.kv.weight[:32].T, attn.kv.weight[32:].T
    bk, bv = attn.kv.bias[:32], attn.kv.bias[32:]
    zx = torch.cat([z, x], 1)  # cat(Z, X) along the sequence
    out = 0
    for h in range(4):  # sum over heads of softmax(X W_q^h (cat W_k^h)^T / sqrt(d_h)) cat W_v^h W_o^h
        sl = slice(8 * h, 8 * h + 8)
        q, k, v = x @ Wq[:, sl] + bq[sl], zx @ Wk[:, sl] + bk[sl], zx @ Wv[:, sl] + bv[sl]
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1)
        out = out + (a @ v) @ attn.proj.weight.T[sl]
    torch.testing.assert_close(attn(x, z), out + attn.proj.bias, atol=1e-5, rtol=1e-5)


def test_prompts_are_never_updated_and_visible_outputs_skip_the_blocks():
    model = small_model().eval()
    ids_keep, ids_mask = split()
    latent = model.forward_encoder(images(), ids_keep)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone())) for b in model.decoder_blocks]
    pred = model.forward_decoder(latent, ids_keep, ids_mask)
    [h.remove() for h in hooks]
    pos = model.decoder_pos_embed[0]
    z_expected = model.decoder_embed(latent) + torch.stack([pos[torch.cat([torch.zeros(1, dtype=torch.long),
                                                                             ids_keep[b] + 1])] for b in range(2)])
    assert len(seen) == 2
    for z in seen:  # every layer reads the same prompts Z = decoder_embed(encoder output) + pos
        torch.testing.assert_close(z, z_expected)
    vis = model.decoder_pred(model.decoder_norm(z_expected[:, 1:]))  # Z read out directly
    for b in range(2):
        torch.testing.assert_close(pred[b, ids_keep[b]], vis[b])


def test_masked_outputs_do_not_depend_on_query_order():
    model = small_model().eval()
    ids_keep, ids_mask = split()
    latent = model.forward_encoder(images(), ids_keep)
    pred = model.forward_decoder(latent, ids_keep, ids_mask)
    perm = torch.randperm(ids_mask.shape[1])
    pred2 = model.forward_decoder(latent, ids_keep, ids_mask[:, perm])
    torch.testing.assert_close(pred, pred2, atol=1e-5, rtol=1e-5)  # raster order either way


def test_masked_outputs_use_the_prompts():
    model = small_model().eval()
    ids_keep, ids_mask = split()
    latent = model.forward_encoder(images(), ids_keep)
    pred = model.forward_decoder(latent, ids_keep, ids_mask)
    latent2 = latent.clone()
    latent2[:, 3] += 1.0  # change one visible latent
    pred2 = model.forward_decoder(latent2, ids_keep, ids_mask)
    assert not torch.allclose(pred[0, ids_mask[0]], pred2[0, ids_mask[0]])


# ---------------------------------------------------------------------------------------------
# Loss (Eq. 1)
# ---------------------------------------------------------------------------------------------
def test_loss_equals_eq1():
    p, t = torch.randn(3, N, 16), torch.randn(3, N, 16)
    per_image = []
    for b in range(3):
        total = 0.0
        for j in range(N):  # (1/N) sum_j || p_j/||p_j|| - t_j/||t_j|| ||_2^2
            d = p[b, j] / p[b, j].norm() - t[b, j] / t[b, j].norm()
            total += float((d * d).sum())
        per_image.append(total / N)
    assert milan.milan_loss(p, t).item() == pytest.approx(np.mean(per_image), rel=1e-5)
    assert milan.milan_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    assert milan.milan_loss(-t, t).item() == pytest.approx(4.0, rel=1e-5)


def test_gradients_reach_encoder_and_decoder_never_the_teacher(tiny_teacher):
    model = small_model()
    x = images()
    out = tiny_teacher(x, cls_attn=True)
    mask = milan.semantic_aware_sampling(out["cls_attn"], 49)
    ids_keep, ids_mask = common.ids_from_mask(mask, 49)
    loss, pred = model(x, ids_keep, ids_mask, out["tokens"][:, 1:])
    loss.backward()
    for name in ["encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.cls_token",
                 "decoder_embed.weight", "mask_token", "decoder_blocks.1.attn.kv.weight", "decoder_pred.weight"]:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in tiny_teacher.parameters())


def test_twenty_steps_on_one_batch_lower_the_loss(tiny_teacher):
    model = small_model()
    x = images(4)
    out = tiny_teacher(x, cls_attn=True)
    ids_keep, ids_mask = common.ids_from_mask(milan.semantic_aware_sampling(out["cls_attn"], 49), 49)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = model(x, ids_keep, ids_mask, out["tokens"][:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses  # random-teacher targets: measured ~0.64x here
    assert all(b < a for a, b in zip(losses[::5], losses[5::5])), losses  # and it keeps going down


# ---------------------------------------------------------------------------------------------
# Table 5's arms: MAE's decoder (--decoder mae), pixel targets with MAE's loss (--target pixel)
# ---------------------------------------------------------------------------------------------
def test_mae_decoder_equals_maes_forward_decoder_rebuilt_patch_by_patch():
    torch.manual_seed(0)
    model = milan.MILAN(common.build_vit("vit_nano_patch16", 224), 32, 32, 2, 2, decoder="mae").eval()
    assert all(isinstance(b, common.Block) for b in model.decoder_blocks)  # self-attention, not prompting blocks
    ids_keep, ids_mask = split()
    latent = model.forward_encoder(images(), ids_keep)  # [B, 1+49, D]
    pred = model.forward_decoder(latent, ids_keep, ids_mask)
    pos = model.decoder_pos_embed[0]  # [1+N, Dd]
    for b in range(2):  # MAE: [CLS; patch j's embedded latent if visible, else the mask token] + pos, in raster order
        where = {j: i for i, j in enumerate(ids_keep[b].tolist())}
        rows = [model.decoder_embed(latent[b, 0])] + [model.decoder_embed(latent[b, 1 + where[j]]) if j in where
                                                       else model.mask_token[0, 0] for j in range(N)]
        x = (torch.stack(rows) + pos)[None]  # [1, 1+N, Dd]
        for blk in model.decoder_blocks:
            x = blk(x)  # every token attends to every token; the visible ones are updated too
        expected = model.decoder_pred(model.decoder_norm(x))[0, 1:]  # CLS dropped -> [N, C]
        torch.testing.assert_close(pred[b], expected, atol=1e-5, rtol=1e-5)


def test_mae_decoder_updates_visible_patches_where_the_prompting_decoder_reads_them_out_of_z():
    torch.manual_seed(0)
    model = milan.MILAN(common.build_vit("vit_nano_patch16", 224), 32, 32, 2, 2, decoder="mae").eval()
    ids_keep, ids_mask = split()
    latent = model.forward_encoder(images(), ids_keep)
    pred = model.forward_decoder(latent, ids_keep, ids_mask)
    with torch.no_grad():
        model.decoder_blocks[1].mlp.fc2.bias += 0.5  # the blocks change every output, visible ones included
    pred2 = model.forward_decoder(latent, ids_keep, ids_mask)
    assert not torch.allclose(pred[0, ids_keep[0]], pred2[0, ids_keep[0]])


def test_pixel_loss_is_maes_mse_over_the_masked_patches_only():
    torch.manual_seed(0)
    model = milan.MILAN(common.build_vit("vit_nano_patch16", 224), 768, 32, 2, 2, target="pixel").eval()
    ids_keep, ids_mask = split()
    x, target = images(), torch.randn(2, N, 768)
    with torch.no_grad():
        loss, pred = model(x, ids_keep, ids_mask, target)
    per_image = []
    for b in range(2):  # MAE's forward_loss: mean over a patch's p*p*3 values, then over the masked patches
        errs = [float(((pred[b, j] - target[b, j]) ** 2).mean()) for j in ids_mask[b].tolist()]
        per_image.append(sum(errs) / len(errs))
    assert loss.item() == pytest.approx(np.mean(per_image), rel=1e-5)
    target2 = target.clone()
    target2[0, ids_keep[0]] += 5.0  # the visible patches are not scored
    with torch.no_grad():
        assert model(x, ids_keep, ids_mask, target2)[0].item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("decoder", ["prompting", "mae"])
def test_each_arm_learns_on_one_batch(decoder, tiny_teacher):
    torch.manual_seed(0)
    model = milan.MILAN(common.build_vit("vit_nano_patch16", 224), 768, 32, 2, 2, decoder, "pixel")
    ramp = torch.linspace(-1, 1, 16).repeat(14)  # every patch holds the same horizontal ramp: a learnable target
    x = ramp.expand(4, 3, 224, 224) + 0.1 * images(4)
    ids_keep, ids_mask = split(4)
    target = common.pixel_targets(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, _ = model(x, ids_keep, ids_mask, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # measured: 1.06 -> 0.24 (both decoders)


def test_mae_run_builds_no_teacher_and_samples_uniformly():
    args = milan.get_args(["--data", "fake", "--model", "vit_nano_patch16", "--target", "pixel", "--decoder", "mae",
                           "--mask_type", "random", "--teacher_weights", "/nonexistent.pt"])  # never read
    args.device = "cpu"
    model, teacher = milan.build_model(args)
    assert teacher is None and model.decoder_pred.out_features == 768 and model.decoder == "mae"
    out = milan.forward_step(model, None, images(2), args, per_patch=True)
    assert torch.all((~out["mask"]).sum(1) == 49) and out["cls_attn"] is None
    assert torch.all(out["patch_loss"][~out["mask"]] == 0) and torch.all(out["patch_loss"][out["mask"]] > 0)
