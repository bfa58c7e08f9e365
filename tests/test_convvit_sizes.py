"""MR-MAE Table 6: ConvViT-S, -B, -L, -H (MCMAE's sizes) as --arch values, at shape level on the meta device (no
weights allocated): widths, depths, heads and MLP ratios, parameter counts derived by hand, token shapes through the
stages, and finetune.py's path (rebuild from a checkpoint's args, layer-decay ids, the --export_timm refusal)."""
from argparse import Namespace

import pytest
import torch

import common
import finetune
import mr_mae

SIZES = {  # name: (stage widths, stage depths, heads, MLP ratios): MCMAE / ConvMAE-v2 S, B, L, H (mr_mae.py cites them)
    "convvit_small": ((128, 256, 384), (2, 2, 11), 6, (4, 4, 4)),
    "convvit_base": ((256, 384, 768), (2, 2, 11), 12, (4, 4, 4)),
    "convvit_large": ((384, 768, 1024), (2, 2, 23), 16, (8, 8, 4)),
    "convvit_huge": ((768, 1024, 1280), (2, 2, 31), 16, (8, 8, 4))}


def count_by_hand(dims, depths, ratios):
    """Trainable parameters of the encoder, term by term (weights + biases; LayerNorms 2C)."""
    (c1, c2, d), n = dims, 0
    embed = lambda cin, c, s: cin * c * s * s + c + 2 * c  # conv kernel = stride = s, then LN
    cblock = lambda c, r: 2 * c + 2 * (c * c + c) + (25 * c + c) + 2 * c + (c * int(c * r) + int(c * r)) + (int(c * r) * c + c)
    block = lambda c, r: 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + 2 * c + (c * int(c * r) + int(c * r)) + (int(c * r) * c + c)
    n += embed(3, c1, 4) + depths[0] * cblock(c1, ratios[0])
    n += embed(c1, c2, 2) + depths[1] * cblock(c2, ratios[1])
    n += embed(c2, d, 2) + (d * d + d) + d  # patch_embed3, patch_embed4 (Linear), [CLS]
    return n + depths[2] * block(d, ratios[2]) + 2 * d  # blocks, final norm (the sin-cos positions are fixed)


def meta_encoder(arch, drop_path=0.0):
    with torch.device("meta"):
        return mr_mae.build_encoder(Namespace(arch=arch, model=arch, input_size=224, drop_path=drop_path))


def test_the_size_table_is_the_papers():
    assert {k: v for k, v in mr_mae.CONVVIT_CONFIGS.items() if k != "convvit_nano"} == SIZES


def test_hand_count_matches_a_real_nano_encoder():  # the counting rule itself, on weights that exist
    enc = mr_mae.build_encoder(Namespace(arch="convvit_nano", model="convvit_nano", input_size=224, drop_path=0.0))
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == count_by_hand((16, 32, 64), (2, 2, 2), (4, 4, 4))


@pytest.mark.parametrize("arch", SIZES)
def test_each_size_has_its_widths_depths_heads_and_parameter_count(arch):
    dims, depths, heads, ratios = SIZES[arch]
    enc = meta_encoder(arch)
    assert [len(enc.stage1), len(enc.stage2), len(enc.blocks)] == list(depths)
    assert (enc.patch_embed1.proj.out_channels, enc.patch_embed2.proj.out_channels, enc.embed_dim) == dims
    assert enc.blocks[0].attn.num_heads == heads and enc.blocks[0].mlp.fc1.out_features == ratios[2] * dims[2]
    assert enc.stage1[0].mlp.fc1.out_channels == ratios[0] * dims[0] and enc.stage2[0].mlp.fc1.out_channels == ratios[1] * dims[1]
    n = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert n == count_by_hand(dims, depths, ratios)
    if arch == "convvit_base":  # MR-MAE Table 4 / MCMAE: 88 M, which counts MCMAE's stage-1/2 side-output convs
        side = (dims[0] * dims[2] * 16 + dims[2]) + (dims[1] * dims[2] * 4 + dims[2])  # 4x4 and 2x2 convs (left out here)
        assert int((n + side) / 1e6) == 88, (n, side)


@pytest.mark.parametrize("arch", SIZES)
def test_tokens_through_the_stages(arch):
    (c1, c2, d), _, _, _ = SIZES[arch]
    enc, shapes = meta_encoder(arch), []
    for m in (enc.patch_embed1, enc.stage1[-1], enc.patch_embed2, enc.stage2[-1], enc.patch_embed4, enc.blocks[-1]):
        m.register_forward_hook(lambda mod, a, out: shapes.append(tuple(out.shape)))
    with torch.device("meta"):
        out = enc(torch.zeros(2, 3, 224, 224), torch.arange(49).expand(2, -1))  # 49 visible of 196
        full = enc(torch.zeros(2, 3, 224, 224))  # fine-tuning: all 196
    assert shapes[:6] == [(2, c1, 56, 56), (2, c1, 56, 56), (2, c2, 28, 28), (2, c2, 28, 28), (2, 196, d), (2, 50, d)]
    assert out.shape == (2, 50, d) and full.shape == (2, 197, d)


@pytest.mark.parametrize("arch", SIZES)
def test_pretraining_args_pick_the_size_and_the_maes_decoder(arch):
    args = mr_mae.get_args(["--data", "fake", "--arch", arch])
    assert args.model == arch and (args.decoder_dim, args.decoder_depth, args.decoder_heads) == (512, 8, 16)


@pytest.mark.parametrize("arch", SIZES)
def test_finetune_rebuilds_each_size_from_the_checkpoint_args_with_layer_decay(arch):
    dims, depths, heads, _ = SIZES[arch]
    enc = meta_encoder(arch)
    src = {"args": {"arch": arch, "model": arch, "input_size": 224, "drop_path": 0.0}, "method": "mr_mae",
           "encoder": enc.state_dict(), "state": {"encoder." + k: t for k, t in enc.state_dict().items()}}
    args = Namespace(arch=arch, model=arch, finetune="ckpt.pth", input_size=224, drop_path=0.1, mode="finetune",
                     nb_classes=10, pool="cls", rank=0)
    with torch.device("meta"):
        model = finetune.build_model(args, src)
        logits = model(torch.zeros(2, 3, 224, 224))
    assert type(model.encoder).__name__ == "ConvViT" and model.encoder.embed_dim == dims[2] and logits.shape == (2, 10)
    assert model.encoder.blocks[-1].drop_path == pytest.approx(0.1)  # --drop_path reaches the rebuilt encoder
    L = depths[2]
    ids = {n: finetune.layer_id(n, L) for n, _ in model.named_parameters()}
    assert ids["encoder.patch_embed1.proj.weight"] == ids["encoder.stage2.1.attn.weight"] == 0  # conv stages: layer 0
    assert ids["encoder.patch_embed4.weight"] == 0 and ids["encoder.blocks.0.attn.qkv.weight"] == 1
    assert ids[f"encoder.blocks.{L - 1}.mlp.fc2.weight"] == L and ids["head.weight"] == L + 1
    groups = finetune.param_groups_lrd(model, 0.05, 0.65)
    scale = [g["lr_scale"] for g in groups if any(p is model.encoder.stage1[0].conv1.weight for p in g["params"])]
    assert scale == [pytest.approx(0.65 ** (L + 1))]  # the conv stages decay most
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", SIZES)
def test_export_timm_refuses_each_size_in_one_line(arch, monkeypatch, capsys, tmp_path):
    src = {"args": {"arch": arch, "model": arch, "input_size": 224}, "method": "mr_mae", "encoder": {}, "state": {}}
    monkeypatch.setattr(finetune, "read_pretrained", lambda path, flag="--finetune": src)
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, ["--data", "fake", "--finetune", "ckpt.pth", "--export_timm", str(tmp_path / "t.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --export_timm") and arch in err[0]
    assert not (tmp_path / "t.pth").exists()
