"""finetune.py pieces: layer-wise lr decay, LARS, the frozen probes, the attentive probe's cross-attention."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import common
import finetune
from conftest import images


def nano(drop_path=0.0):
    return common.build_vit("vit_nano_patch16", 224, drop_path=drop_path)


def train_args(mode, tmp_path, **kw):
    args = finetune.get_args(["--data", "fake", "--finetune", "unused.pth", "--mode", mode])
    args.device, args.rank, args.world_size, args.amp, args.nb_classes = "cpu", 0, 1, "none", 10
    args.lr, args.warmup_epochs, args.output_dir, args.log_every = 0.1, 0, str(tmp_path), 1
    vars(args).update(kw)
    return args


# ---- Layer-wise lr decay (BEiT; CAE App. A) -------------------------------------------------------
def expected_layer(name, depth=2):
    """Independent of finetune.layer_id: embeddings 0, encoder.blocks.i -> i+1, everything else depth+1."""
    m = re.match(r"encoder\.blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if re.match(r"encoder\.(patch_embed\.|cls_token$|pos_embed$)", name):
        return 0
    return depth + 1


@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_layer_decay_scales_of_a_two_block_model(decay):
    model = finetune.Classifier(nano(), "finetune", 10)
    groups = finetune.param_groups_lrd(model, 0.05, decay)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.append(name)
            assert g["lr_scale"] == pytest.approx(decay ** (3 - expected_layer(name))), name
            no_decay = p.ndim == 1 or name in ("encoder.cls_token", "encoder.pos_embed")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert sorted(seen) == sorted(names.values())  # every parameter once, pos_embed included (learnable)
    assert "encoder.pos_embed" in seen and not any(n.startswith("encoder.norm.") for n in seen)  # fc_norm replaces it
    scales = {expected_layer(n): g["lr_scale"] for g in groups for n in (names[id(p)] for p in g["params"])}
    assert scales[0] == pytest.approx(decay ** 3) and scales[3] == 1.0  # head at the full lr
    opt = torch.optim.AdamW(groups, lr=1.0)
    common.set_lr(opt, 2e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(sorted({2e-3 * decay ** k for k in range(4)}))


# ---- LARS (MAE's linear probe optimiser) ----------------------------------------------------------
def test_lars_steps_equal_hand_computed_updates():
    w0, b0 = [[1.0, -2.0], [0.5, 3.0]], [0.5, -1.0]
    w, b = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
    zero = torch.nn.Parameter(torch.zeros(2, 2))  # ||p|| = 0: trust ratio 1
    lr, wd, m, eta = 0.5, 0.1, 0.9, 0.001
    opt = finetune.LARS([w, b, zero], lr=lr, weight_decay=wd, momentum=m, trust_coefficient=eta)
    grads = [([[0.2, 0.1], [-0.3, 0.4]], [1.0, 2.0]), ([[0.0, -0.5], [0.1, 0.2]], [-1.0, 0.5])]
    mu_w, mu_b = [[0.0] * 2 for _ in range(2)], [0.0, 0.0]
    W, B = [row[:] for row in w0], b0[:]
    for step, (gw, gb) in enumerate(grads):
        w.grad, b.grad, zero.grad = torch.tensor(gw), torch.tensor(gb), torch.tensor(gw) if step == 0 else None
        opt.step()
        if step == 0:  # zero matrix: u = g + wd 0, trust ratio 1, mu = u
            assert torch.allclose(zero, -lr * torch.tensor(gw), atol=1e-7)
        # by hand: u = g + wd W, scaled by eta ||W|| / ||u|| for the matrix; the bias takes u = g, no decay
        u = [[gw[i][j] + wd * W[i][j] for j in range(2)] for i in range(2)]
        norm_w = math.sqrt(sum(x * x for row in W for x in row))
        norm_u = math.sqrt(sum(x * x for row in u for x in row))
        for i in range(2):
            for j in range(2):
                mu_w[i][j] = m * mu_w[i][j] + eta * norm_w / norm_u * u[i][j]
                W[i][j] -= lr * mu_w[i][j]
            mu_b[i] = m * mu_b[i] + gb[i]
            B[i] -= lr * mu_b[i]
        assert torch.allclose(w, torch.tensor(W), atol=1e-7) and torch.allclose(b, torch.tensor(B), atol=1e-7)


# ---- Probes: frozen encoder, heads ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["linprobe", "attnprobe"])
def test_probe_step_trains_the_head_only(mode, tmp_path):
    model = finetune.Classifier(nano(drop_path=0.5), mode, 10)
    args = train_args(mode, tmp_path)
    opt = finetune.build_optimizer(model, args)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    enc0 = {k: t.clone() for k, t in model.encoder.state_dict().items()}
    head0 = {k: t.clone() for k, t in model.head.state_dict().items()}
    args.batch_size, args.seed, args.num_workers, args.save_every_steps = 4, 0, 0, 0
    data = torch.utils.data.TensorDataset(images(4), torch.tensor([0, 1, 2, 3]))
    loader = common.build_loader(data, args)  # one batch of 4
    ckpt = common.Checkpointer(args, "finetune", model, opt)
    finetune.train_one_epoch(model, model.head, loader, opt, ckpt.scaler, None, 0, args, ckpt)
    assert all(torch.equal(t, enc0[k]) for k, t in model.encoder.state_dict().items())
    assert all(p.grad is None for p in model.encoder.parameters())
    assert not torch.equal(model.head[-1].weight, head0[f"{len(model.head) - 1}.weight"])
    assert model.training and not model.encoder.training  # frozen encoder stays in eval: no drop path
    with torch.no_grad():
        x = images(2)
        assert torch.equal(model.encoder(x), model.encoder(x))


def test_linprobe_reads_the_normed_cls_token_through_batchnorm_without_affine():
    model = finetune.Classifier(nano(), "linprobe", 10).eval()
    bn, fc = model.head
    assert bn.weight is None and bn.bias is None  # affine=False
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
        x = images(2)
        cls = model.encoder(x)[:, 0]  # after the final norm
        expected = (cls - bn.running_mean) / torch.sqrt(bn.running_var + 1e-6) @ fc.weight.T + fc.bias
        assert torch.allclose(model(x), expected, atol=1e-5)


def hand_attentive_pool(pool, x):
    """CAE App. A by hand: q from the learned token, k/v from the patches, per-head softmax(q.k/sqrt(d)) v, W_o."""
    B, N, D = x.shape
    H, d = pool.num_heads, D // pool.num_heads
    q = pool.q(F.layer_norm(pool.query[0, 0], (D,), pool.norm_q.weight, pool.norm_q.bias, 1e-6))  # [D]
    kv = pool.kv(F.layer_norm(x, (D,), pool.norm_kv.weight, pool.norm_kv.bias, 1e-6))  # [B, N, 2D]
    k, v = kv[..., :D], kv[..., D:]
    out = torch.zeros(B, D)
    for b in range(B):
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            scores = torch.stack([q[sl] @ k[b, j, sl] / math.sqrt(d) for j in range(N)])
            out[b, sl] = (scores.softmax(0)[:, None] * v[b, :, sl]).sum(0)
    return out @ pool.proj.weight.T + pool.proj.bias  # nothing added: no skip, no MLP


def test_attentive_probe_is_one_cross_attention_over_the_patch_tokens():
    model = finetune.Classifier(nano(), "attnprobe", 10).eval()
    pool, bn, fc = model.head
    assert bn.weight is None  # BatchNorm without affine
    with torch.no_grad():
        pool.query.normal_()
        x = images(2)
        patches = model.encoder(x)[:, 1:]  # the encoder's CLS token is not a key
        feat = hand_attentive_pool(pool, patches)
        expected = (feat - bn.running_mean) / torch.sqrt(bn.running_var + 1e-6) @ fc.weight.T + fc.bias
        assert torch.allclose(model(x), expected, atol=1e-4)


def test_attentive_pool_has_no_skip_connection():
    # values and output bias zero: attention output is exactly 0, whatever the query; "query + attn" would give the query
    pool = finetune.AttentivePool(64, 2)
    with torch.no_grad():
        pool.query.normal_(), pool.kv.weight[64:].zero_(), pool.kv.bias[64:].zero_(), pool.proj.bias.zero_()
        out = pool(torch.randn(3, 196, 64))
    assert out.shape == (3, 64) and torch.equal(out, torch.zeros(3, 64))


def test_finetune_head_pools_patch_tokens_without_the_final_norm():
    enc = nano()
    model = finetune.Classifier(enc, "finetune", 10).eval()
    with torch.no_grad():
        x = images(2)
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]  # run the blocks by hand, no final norm
        tokens = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), tokens], 1)
        for blk in enc.blocks:
            tokens = blk(tokens)
        pooled = F.layer_norm(tokens[:, 1:].mean(1), (64,), model.fc_norm.weight, model.fc_norm.bias, 1e-6)
        assert torch.allclose(model(x), pooled @ model.head.weight.T + model.head.bias, atol=1e-5)
    assert model.head.weight.std() < 1e-4  # MAE's trunc-normal(2e-5) head init


def test_mixup_cutmix_soft_targets_and_recipe_defaults():
    args = finetune.get_args(["--data", "fake", "--finetune", "unused.pth"])
    args.nb_classes = 10
    assert (args.blr, args.layer_decay, args.drop_path, args.epochs, args.warmup_epochs) == (5e-4, 0.65, 0.1, 100, 5)
    mix = finetune.build_mixup(args)
    x, y = mix(images(4), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4)) and (y > 0).sum(1).max() <= 2
    lin = finetune.get_args(["--data", "fake", "--finetune", "unused.pth", "--mode", "linprobe", "--epochs", "3"])
    assert finetune.build_mixup(lin) is None and (lin.blr, lin.weight_decay, lin.epochs) == (0.1, 0.0, 3)


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_linear_probe_reads_the_cls_token_or_the_mean_patch_token(pool):
    """--pool cls: the head sees the CLS token after the final norm (MAE); --pool avg: the mean of the N patch tokens."""
    model = finetune.Classifier(nano(), "linprobe", 10, pool).eval()
    x = images(3)
    with torch.no_grad():
        tokens = model.encoder(x)  # [3, 1+196, 64]
        feature = tokens[:, 0] if pool == "cls" else tokens[:, 1:].sum(1) / 196
        torch.testing.assert_close(model(x), model.head(feature))
        other = tokens[:, 1:].sum(1) / 196 if pool == "cls" else tokens[:, 0]
        assert not torch.allclose(model(x), model.head(other))
