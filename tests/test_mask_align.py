"""mask_align.py: attentive masking (Sec. 3.2), Dynamic Alignment (Eq. 1), targets (Eq. 2), loss (Eq. 3), training."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import mask_align
from conftest import images

N = 196


def student(depth=2, dim=32):
    return common.ViT(224, 16, dim, depth, 2)


def args_for(*flags):
    return mask_align.get_args(["--data", "fake", "--model", "vit_nano_patch16", *flags])


def small_model(tiny_teacher, depth=2, align="dynamic", seed=0):
    torch.manual_seed(seed)
    return mask_align.MaskAlign(student(depth), tiny_teacher.depth, tiny_teacher.width, 5, align)


def expected_matrix(S, K, rows):
    """Init written out: 0.01 everywhere, 1.01 at (student block rows[j], level j)."""
    w = [[0.01] * K for _ in range(S)]
    for j, i in enumerate(rows):
        w[i][j] = 1.01
    return torch.tensor(w)


# ---------------------------------------------------------------------------------------------
# Recipe (Sec. 4.1) and attentive masking (Sec. 3.2)
# ---------------------------------------------------------------------------------------------
def test_defaults_are_the_paper_recipe():
    a = mask_align.get_args(["--data", "fake"])
    assert (a.batch_size, a.accum_iter, a.blr, tuple(a.betas), a.weight_decay) == (128, 1, 1.5e-4, (0.9, 0.95), 0.05)
    assert (a.epochs, a.warmup_epochs, a.min_lr, a.crop_min, a.mask_ratio) == (200, 20, 1e-5, 0.2, 0.7)
    assert (a.drop_path, a.mask_type, a.align, a.top_k, a.align_cls) == (0.1, "attention", "dynamic", None, True)
    a.teacher, a.teacher_weights, a.model, a.device = "tiny", "none", "vit_nano_patch16", "cpu"
    assert mask_align.build_model(a)[0].num_levels == a.top_k == 2  # unset: Table 3's K = 5, or a shallower teacher's depth
    assert a.batch_size * 8 * 1.5e-4 / 256 == pytest.approx(6e-4)  # Sec. 4.1 batch 1024 on 8 GPUs
    assert mask_align.get_args(["--data", "fake", "--model", "vit_large_patch16"]).drop_path == 0.2
    assert mask_align.get_args(["--data", "fake", "--drop_path", "0"]).drop_path == 0.0
    assert mask_align.get_args(["--data", "fake", "--no-align_cls"]).align_cls is False


def test_attentive_masking_keeps_58_mostly_salient_patches():
    attn = torch.full((500, N), 1e-4)
    attn[:, :58] = 1.0  # 58 salient patches hold ~99.7% of the mass
    mask = mask_align.attentive_masking(attn, common.num_visible(N, 0.7))
    assert torch.all((~mask).sum(1) == 58)  # floor(196 x 0.3) = 58 distinct patches
    assert (~mask[:, :58]).float().mean() > 0.97  # drawn in proportion to the attention
    assert (~mask[:, 58:]).any()  # sampled, not top-k: a low-attention patch does get in


@pytest.mark.parametrize("mask_type", ["attention", "random"])
def test_forward_step_shows_58_patches_and_scores_only_them(tiny_teacher, mask_type):
    args = args_for("--mask_type", mask_type)
    model = small_model(tiny_teacher)
    out = mask_align.forward_step(model, tiny_teacher, images(3), args, per_patch=True)
    mask, patch_loss = out["mask"], out["patch_loss"]
    assert mask.shape == (3, N) and torch.all((~mask).sum(1) == 58)
    assert torch.all(patch_loss[mask] == 0) and torch.all(patch_loss[~mask] > 0) and not patch_loss.requires_grad
    assert (out["cls_attn"] is None) == (mask_type == "random")
    assert out["loss"].ndim == 0 and out["loss"].requires_grad


def test_mask_ratio_0_shows_every_patch_and_scores_all_of_them(tiny_teacher):
    """Table 4's first row: ratio 0, the student sees all 196 patches and the loss covers all of them."""
    assert common.num_visible(N, 0.0, allow_zero=True) == N
    with pytest.raises(common.UserError, match=r"\(0, 1\)"):  # the other four methods need hidden patches
        common.num_visible(N, 0.0)
    with pytest.raises(common.UserError, match=r"\[0, 1\)"):
        common.num_visible(N, 1.0, allow_zero=True)
    attn = torch.rand(2, N)
    attn[:, 5] = 0.0  # a zero attention cannot be drawn without replacement: ratio 0 must not draw
    assert not mask_align.attentive_masking(attn, N).any()
    for mask_type in ["attention", "random"]:
        out = mask_align.forward_step(small_model(tiny_teacher), tiny_teacher, images(2),
                                      args_for("--mask_ratio", "0", "--mask_type", mask_type), per_patch=True)
        assert not out["mask"].any() and torch.all(out["patch_loss"] > 0)  # all 196 patches, all in the loss
    model = small_model(tiny_teacher)
    x = images(2)
    hidden = tiny_teacher(x, tokens=False, hidden=True)["hidden"]
    target = mask_align.alignment_targets(hidden, torch.arange(N).expand(2, N), 2)  # [K, B, 197, W]
    pred = model.dynamic_alignment(model.forward_encoder(x, torch.arange(N).expand(2, N)))
    out = mask_align.forward_step(model, tiny_teacher, x, args_for("--mask_ratio", "0"))
    assert out["loss"].item() == pytest.approx(mask_align.mask_align_loss(pred, target).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Dynamic Alignment (Sec. 3.3, Eq. 1)
# ---------------------------------------------------------------------------------------------
def test_dynamic_alignment_equals_eq1_double_loop():
    S, T, K, W = 3, 4, 3, 16
    model = mask_align.MaskAlign(student(S), T, W, top_k=K)
    with torch.no_grad():
        model.align_matrix.copy_(torch.randn(S, K))
    xs = [torch.randn(2, 59, 32) for _ in range(S)]
    got = model.dynamic_alignment(xs)
    assert got.shape == (K, 2, 59, W)
    for j in range(K):  # yhat_j = sum_i w_ij A_i(x_i)
        yhat = torch.zeros(2, 59, W)
        for i in range(S):
            A = model.adaptors[i]
            yhat += model.align_matrix[i, j] * (xs[i] @ A.weight.T + A.bias)
        torch.testing.assert_close(got[j], yhat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S,T,K,rows", [
    (12, 12, 5, [7, 8, 9, 10, 11]),  # equal depths: teacher blocks 8..12 <- student blocks 8..12
    (24, 12, 5, [15, 17, 19, 21, 23]),  # ViT-L student, CLIP-B teacher: block 2t pairs with level t
    (4, 2, 2, [1, 3]),  # deeper student than the 2-block tiny teacher (K clipped to 2)
    (12, 24, 5, [9, 10, 10, 11, 11]),  # shallower student (ViT-B, CLIP-L): ceil(t/2) for t = 20..24
    (1, 2, 2, [0, 0]),  # a single block serves both levels
])
def test_init_pairs_each_level_with_the_block_at_the_same_relative_depth(S, T, K, rows):
    model = mask_align.MaskAlign(common.ViT(224, 16, 8, S, 2), T, 16, top_k=5)
    assert model.num_levels == K and model.pairs == rows
    torch.testing.assert_close(model.align_matrix.detach(), expected_matrix(S, K, rows))
    assert len(model.adaptors) == S  # one adaptor per student block (Eq. 1)
    layerwise = mask_align.MaskAlign(common.ViT(224, 16, 8, S, 2), T, 16, top_k=5, align="layerwise")
    assert layerwise.pairs == rows and len(layerwise.adaptors) == K


def test_layerwise_has_no_matrix_and_reads_one_block_per_level():
    model = mask_align.MaskAlign(student(4), 2, 16, top_k=5, align="layerwise")
    assert not hasattr(model, "align_matrix") and not any("align_matrix" in n for n, _ in model.named_parameters())
    xs = [torch.randn(2, 59, 32) for _ in range(4)]
    got = model.dynamic_alignment(xs)
    for j, i in enumerate([1, 3]):  # level j from student block pair(j) only
        A = model.adaptors[j]
        torch.testing.assert_close(got[j], xs[i] @ A.weight.T + A.bias, atol=1e-5, rtol=1e-5)


def test_student_deeper_than_teacher_trains(tiny_teacher):
    args = args_for()
    model = small_model(tiny_teacher, depth=4)
    torch.testing.assert_close(model.align_matrix.detach(), expected_matrix(4, 2, [1, 3]))
    x = images(2)
    out = mask_align.forward_step(model, tiny_teacher, x, args)
    ids_keep, _ = common.ids_from_mask(out["mask"], 58)
    pred = model.dynamic_alignment(model.forward_encoder(x, ids_keep))
    assert pred.shape == (2, 2, 59, 64)  # K = min(5, 2) levels, CLS + 58 tokens, teacher width
    out["loss"].backward()
    assert model.align_matrix.grad.shape == (4, 2) and torch.all(model.align_matrix.grad != 0)


def test_student_levels_are_block_outputs_without_final_norm():
    model = mask_align.MaskAlign(student(3), 2, 16)
    x, ids_keep = images(1), torch.arange(0, 196, 4)[None, :49]
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(o)) for b in model.encoder.blocks]
    levels = model.forward_encoder(x, ids_keep)
    [h.remove() for h in hooks]
    assert len(levels) == 3 and all(lv.shape == (1, 50, 32) for lv in levels)
    for lv, o in zip(levels, seen):
        torch.testing.assert_close(lv, o)  # the residual stream after each block, no LN
    assert not model.encoder.norm.weight.requires_grad  # never reached by a gradient: frozen


# ---------------------------------------------------------------------------------------------
# Targets (Eq. 2) and loss (Eq. 3)
# ---------------------------------------------------------------------------------------------
def test_targets_are_last_k_levels_layernormed_per_token_at_cls_and_visible():
    T, B, W = 4, 2, 8
    hidden = [3.0 * torch.randn(B, 1 + N, W) + 5.0 for _ in range(T)]
    ids_keep = torch.stack([torch.randperm(N)[:58].sort().values for _ in range(B)])
    got = mask_align.alignment_targets(hidden, ids_keep, 3)
    assert got.shape == (3, B, 59, W)
    for k, level in enumerate([1, 2, 3]):  # the last 3 of 4 teacher blocks
        for b in range(B):
            for pos, tok in enumerate([0] + [int(i) + 1 for i in ids_keep[b]]):  # CLS, then visible patches
                v = hidden[level][b, tok]
                mu = v.sum() / W
                var = ((v - mu) ** 2).sum() / W  # biased variance, no scale or bias
                torch.testing.assert_close(got[k, b, pos], (v - mu) / math.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_table6_target_norms(norm):
    """Table 6: BatchNorm without affine = per channel over the batch and all 1+N tokens of the intact image
    (then the positions are taken); none = the raw levels."""
    T, B, W = 3, 2, 8
    hidden = [3.0 * torch.randn(B, 1 + N, W) + torch.arange(W) for _ in range(T)]  # a different mean per channel
    ids_keep = torch.stack([torch.randperm(N)[:58].sort().values for _ in range(B)])
    got = mask_align.alignment_targets(hidden, ids_keep, 2, norm)
    for k, level in enumerate([1, 2]):
        h = hidden[level]
        for c in range(W):
            vals = h[:, :, c].flatten()  # B (1+N) values of channel c
            mu, var = vals.mean(), ((vals - vals.mean()) ** 2).mean()
            for b in range(B):
                toks = [0] + [int(i) + 1 for i in ids_keep[b]]
                want = h[b, toks, c] if norm == "none" else (h[b, toks, c] - mu) / math.sqrt(var + 1e-5)
                torch.testing.assert_close(got[k, b, :, c], want, atol=1e-5, rtol=1e-5)


def test_table6_mlp_adaptor(tiny_teacher):
    """Table 6: a 2-layer MLP of hidden width D (the student's) per student block instead of a Linear."""
    model = mask_align.MaskAlign(student(2, 32), tiny_teacher.depth, tiny_teacher.width, 5, "dynamic", "mlp")
    for a in model.adaptors:
        assert [type(m).__name__ for m in a] == ["Linear", "GELU", "Linear"]
        assert a[0].weight.shape == (32, 32) and a[2].weight.shape == (tiny_teacher.width, 32)
    x = torch.randn(1, 5, 32)
    levels = [x, 2 * x]
    want = sum(model.align_matrix[i, 0] * model.adaptors[i][2](F.gelu(model.adaptors[i][0](levels[i]))) for i in range(2))
    torch.testing.assert_close(model.dynamic_alignment(levels)[0], want)
    out = mask_align.forward_step(model, tiny_teacher, images(2), args_for("--adaptor", "mlp", "--target_norm", "bn"))
    out["loss"].backward()
    assert model.adaptors[1][0].weight.grad.abs().sum() > 0


def smooth_l1_by_hand(pred, target):
    d = (pred - target).flatten().tolist()
    return [0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5 for x in d]


def test_loss_equals_eq3():
    pred, target = 2.0 * torch.randn(5, 2, 59, 8), torch.randn(5, 2, 59, 8)  # both branches of Eq. 3 occur
    terms = smooth_l1_by_hand(pred, target)
    assert mask_align.mask_align_loss(pred, target).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # mean over elements and tokens of each level, then over the K levels (different per-level values)
    per_level = [sum(smooth_l1_by_hand(pred[k], target[k])) / (2 * 59 * 8) for k in range(5)]
    assert mask_align.mask_align_loss(pred, target).item() == pytest.approx(sum(per_level) / 5, rel=1e-5)
    z = torch.zeros(1, 1, 1, 2)
    assert mask_align.mask_align_loss(torch.tensor([0.5, 3.0]).view(1, 1, 1, 2), z).item() == pytest.approx(
        (0.125 + 2.5) / 2)  # 1/2 0.5^2 and 3 - 1/2: not the released 2x
    per_patch = mask_align.mask_align_loss(pred, target, per_patch=True)
    assert per_patch.shape == (2, 59)
    assert per_patch[1, 7].item() == pytest.approx(sum(smooth_l1_by_hand(pred[:, 1, 7], target[:, 1, 7])) / 40, rel=1e-5)


def test_no_align_cls_leaves_the_cls_token_out():
    pred, target = torch.randn(2, 2, 59, 8), torch.randn(2, 2, 59, 8)
    pred2, target2 = pred.clone(), target.clone()
    pred2[:, :, 0] += 10.0
    target2[:, :, 0] -= 3.0
    off = mask_align.mask_align_loss(pred, target, align_cls=False)
    assert mask_align.mask_align_loss(pred2, target2, align_cls=False).item() == pytest.approx(off.item(), rel=1e-6)
    terms = smooth_l1_by_hand(pred[:, :, 1:], target[:, :, 1:])
    assert off.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert mask_align.mask_align_loss(pred2, target2).item() > mask_align.mask_align_loss(pred, target).item() + 0.05


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def test_gradients_reach_the_student_and_matrix_never_the_teacher(tiny_teacher):
    model = small_model(tiny_teacher)
    out = mask_align.forward_step(model, tiny_teacher, images(2), args_for())
    out["loss"].backward()
    named = dict(model.named_parameters())
    for name in ["encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.0.attn.qkv.weight",
                 "encoder.blocks.1.mlp.fc2.weight", "adaptors.0.weight", "adaptors.1.bias", "align_matrix"]:
        g = named[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert torch.all(model.align_matrix.grad != 0)  # every (block, level) entry is learned
    assert all(p.grad is None and not p.requires_grad for p in tiny_teacher.parameters())
    groups = common.param_groups(model, 0.05, no_decay=("align_matrix",))  # as main() builds the optimizer
    decay, skip = ({id(p) for p in g["params"]} for g in groups)
    assert groups[1]["weight_decay"] == 0.0 and id(model.align_matrix) in skip and id(model.align_matrix) not in decay
    assert id(model.adaptors[0].weight) in decay
    assert id(model.encoder.norm.weight) not in decay | skip  # frozen, not optimised


def test_twenty_steps_on_one_batch_lower_the_loss(tiny_teacher):
    model = small_model(tiny_teacher)
    x = images(4)
    out = tiny_teacher(x, tokens=False, hidden=True, cls_attn=True)
    ids_keep, _ = common.ids_from_mask(mask_align.attentive_masking(out["cls_attn"], 58), 58)
    target = mask_align.alignment_targets(out["hidden"], ids_keep, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss, _ = model(x, ids_keep, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses[::5], losses[5::5])), losses
