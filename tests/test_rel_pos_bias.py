"""finetune.py's relative position bias (BEiT's scheme, as CAE's released fine-tuning and attentive probing use it):
the index, the block with a zero and a non-zero table, the lr / weight-decay groups, which files and modes get it,
a cae.py checkpoint fine-tuned and evaluated with it, and the export to timm's Beit."""
import argparse
import copy
import math
import re

import pytest
import torch

import common
import finetune
from conftest import SMOKE, images

TINY = ["--data", "fake", "--fake_size", "16", "--batch_size", "8", "--num_workers", "0", "--epochs", "1"]


def index_by_loops(G):
    """BEiT's index written out: query token q, key token k; patches at (row, col) in raster order; the (2G-1)^2
    patch-patch offsets first, then CLS->patch, patch->CLS, CLS->CLS."""
    n = (2 * G - 1) ** 2
    idx = [[0] * (1 + G * G) for _ in range(1 + G * G)]
    for q in range(1 + G * G):
        for k in range(1 + G * G):
            if q == 0 and k == 0:
                idx[q][k] = n + 2
            elif q == 0:
                idx[q][k] = n
            elif k == 0:
                idx[q][k] = n + 1
            else:
                (yq, xq), (yk, xk) = divmod(q - 1, G), divmod(k - 1, G)
                idx[q][k] = (yq - yk + G - 1) * (2 * G - 1) + (xq - xk + G - 1)
    return idx


@pytest.mark.parametrize("G", [2, 3])
def test_relative_position_index_recomputed_by_loops(G):
    index = finetune.RelPosAttention(common.Attention(64, 2), G).relative_position_index
    assert index.shape == (1 + G * G, 1 + G * G) and index.tolist() == index_by_loops(G)
    assert index.max().item() == (2 * G - 1) ** 2 + 2  # every row of the [(2G-1)^2 + 3, H] table reachable
    assert sorted(set(index.flatten().tolist())) == list(range((2 * G - 1) ** 2 + 3))


def attn_pair(seed=0):
    torch.manual_seed(seed)
    blk = common.build_vit("vit_nano_patch16", 224).blocks[0].eval()
    with torch.no_grad():
        blk.attn.qkv.bias.normal_()  # the key bias too
    biased = copy.deepcopy(blk)
    biased.attn = finetune.RelPosAttention(biased.attn, 14)
    return blk, biased


def test_a_zero_table_gives_the_block_without_bias():
    blk, biased = attn_pair()
    table = biased.attn.relative_position_bias_table
    assert table.shape == (27 * 27 + 3, 2) and torch.equal(table, torch.zeros_like(table))  # zero at start
    assert biased.attn.qkv is not blk.attn.qkv and torch.equal(biased.attn.qkv.weight, blk.attn.qkv.weight)
    x = torch.randn(2, 197, 64, dtype=torch.float64)  # float64: another SDPA kernel's rounding stays far below 1e-12
    with torch.no_grad():
        torch.testing.assert_close(biased.double()(x), blk.double()(x), atol=1e-12, rtol=0)


def test_a_table_adds_exactly_its_entries_to_the_attention_logits():
    """The module's output against softmax(q k^T / sqrt(d) + B) v computed by hand, B[h, q, k] = table[index[q][k], h]
    with the index from loops: an asymmetric random table, so a transposed or shifted lookup fails."""
    _, biased = attn_pair()
    attn = biased.attn
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 2.0)
        x = torch.randn(1, 197, 64)
        table, idx = attn.relative_position_bias_table, index_by_loops(14)
        B = torch.tensor([[[table[idx[q][k], h].item() for k in range(197)] for q in range(197)] for h in range(2)])
        q, k, v = attn.qkv(x)[0].view(197, 3, 2, 32).permute(1, 2, 0, 3)  # each [H, 197, 32]
        logits = q @ k.transpose(1, 2) / math.sqrt(32) + B  # [H, 197, 197]
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(197, 64) @ attn.proj.weight.T + attn.proj.bias
        torch.testing.assert_close(attn(x)[0], out, atol=1e-5, rtol=0)
        no_bias = ((logits - B).softmax(-1) @ v).transpose(0, 1).reshape(197, 64) @ attn.proj.weight.T + attn.proj.bias
        assert (attn(x)[0] - no_bias).abs().max() > 1e-2  # the table did change the output


def save_pretrained(path, method, seed=0):
    """A method file's checkpoint with a random nano encoder (layer scale 0.1, as cae.py / cae_v2.py)."""
    torch.manual_seed(seed)
    encoder = common.build_vit("vit_nano_patch16", 224, init_values=0.1)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # layer scale, qkv bias (key part too), pos_embed off their init
    model = {"encoder." + k: t for k, t in encoder.state_dict().items()}
    common.save_checkpoint(str(path), model=model, args={"model": "vit_nano_patch16", "input_size": 224}, method=method)
    return path


def built(path, *flags):
    """What finetune.main builds for --finetune path and flags (no training): (args, model)."""
    args = finetune.get_args(["--data", "fake", "--finetune", str(path), *flags])
    src = finetune.read_pretrained(args.finetune)
    args.arch, args.rank, args.nb_classes, args.model = "vit", 0, 10, "vit_nano_patch16"
    args.mode = args.mode or src["args"].get("mode") or "finetune"
    args.rel_pos_bias = finetune.rel_pos_bias(args, src)
    return args, finetune.build_model(args, src)


@pytest.mark.parametrize("method", ["cae", "cae_v2", "milan"])
@pytest.mark.parametrize("mode", ["finetune", "attnprobe", "linprobe"])
def test_cae_files_get_the_bias_in_finetune_and_attnprobe_and_a_flag_turns_it_off(method, mode, tmp_path, capsys):
    path = save_pretrained(tmp_path / "ckpt.pth", method)
    expected = method in ("cae", "cae_v2") and mode != "linprobe"  # released: run_linear.py --disable_rel_pos_bias
    args, model = built(path, "--mode", mode)
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert args.rel_pos_bias == expected and len(tables) == (2 if expected else 0)
    assert all(p.requires_grad == (mode == "finetune") for p in tables)  # a probe's stays zero, as run_attentive.py's
    n_file = len(torch.load(path, weights_only=True)["model"])  # every encoder tensor of the file was loaded
    out = capsys.readouterr().out
    tail = "; 2 relative position bias tables start at zero\n" if expected else "\n"
    assert f"loaded {n_file} encoder tensors" in out, out  # (the zero tables are not counted as loaded, nor ignored)
    assert out.endswith("ignored 0 other keys (decoder, teacher, head)" + tail), out
    for flag, on in (("--no-rel_pos_bias", False), ("--rel_pos_bias", True)):  # the flag wins either way
        args, model = built(path, "--mode", mode, flag)
        assert args.rel_pos_bias == on and any("relative_position_bias_table" in k for k in model.state_dict()) == on


def test_the_table_is_in_its_blocks_lr_group_and_decayed_as_released(tmp_path):
    """Layer-wise lr decay (BEiT): blocks.i's table at decay^(L - i); weight decay as CAE's released
    run_class_finetuning.py (no --disable_weight_decay_on_rel_pos_bias in its scripts; no_weight_decay() is only
    pos_embed and cls_token)."""
    args, model = built(save_pretrained(tmp_path / "ckpt.pth", "cae"), "--mode", "finetune")
    groups = finetune.param_groups_lrd(model, 0.05, 0.65)
    seen = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = g
    for i in range(2):
        g = seen[id(model.encoder.blocks[i].attn.relative_position_bias_table)]
        assert g["lr_scale"] == pytest.approx(0.65 ** (2 - i)) and g["weight_decay"] == 0.05


def test_a_conv_encoder_is_refused_the_bias():
    src = {"encoder": {}, "method": "mr_mae", "args": {"arch": "convvit_nano"}}
    args = argparse.Namespace(rel_pos_bias=True, arch="convvit_nano", finetune="mr.pth", mode="finetune")
    why = "--rel_pos_bias: mr.pth holds a model of --arch convvit_nano, which takes no relative position bias; leave"
    with pytest.raises(common.UserError, match=why):
        finetune.rel_pos_bias(args, src)
    args.rel_pos_bias = None
    assert finetune.rel_pos_bias(args, src) is False


# ---- A cae.py checkpoint fine-tuned, evaluated, and refused a flag against its own ---------------------------------
@pytest.fixture(scope="module")
def cae_finetuned(tmp_path_factory):
    import cae
    out = tmp_path_factory.mktemp("cae")
    cae.main(SMOKE + ["--fake_size", "16", "--target", "pixel", "--output_dir", str(out)])
    ft = tmp_path_factory.mktemp("ft")
    finetune.main(TINY + ["--finetune", str(out / "checkpoint-last.pth"), "--warmup_epochs", "0",
                          "--output_dir", str(ft)])
    return out / "checkpoint-last.pth", ft


def test_a_cae_checkpoint_fine_tunes_with_the_bias_and_eval_rebuilds_it(cae_finetuned, tmp_path, capsys):
    pre, ft = cae_finetuned
    ckpt = torch.load(ft / "checkpoint-last.pth", weights_only=True)
    assert ckpt["args"]["rel_pos_bias"] is True and ckpt["args"]["mode"] == "finetune"
    tables = [ckpt["model"][f"encoder.blocks.{i}.attn.relative_position_bias_table"] for i in range(2)]
    assert all(t.shape == (27 * 27 + 3, 2) and t.abs().max() > 0 for t in tables)  # started at zero, trained
    assert not any("relative_position_index" in k for k in ckpt["model"])  # rebuilt, not stored (as timm)
    logged = [line for line in (ft / "log.txt").read_text().splitlines()]
    stats = __import__("json").loads(logged[-1])
    result = finetune.main(TINY + ["--finetune", str(ft / "checkpoint-last.pth"), "--eval", "--output_dir",
                                   str(tmp_path / "eval")])
    assert {k: result[k] for k in ("acc1", "acc5", "val_loss")} == pytest.approx(
        {k: stats[k] for k in ("acc1", "acc5", "val_loss")}, abs=1e-6)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, TINY + ["--finetune", str(ft / "checkpoint-last.pth"), "--eval", "--no-rel_pos_bias",
                                          "--output_dir", str(tmp_path / "eval2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--no-rel_pos_bias" in err, err


# ---- Export to timm's Beit -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["finetune", "attnprobe"])
def test_export_of_a_model_with_the_bias_loads_into_timms_beit_with_the_same_outputs(mode, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    args, model = built(save_pretrained(tmp_path / "ckpt.pth", "cae"), "--mode", mode)
    model.eval()
    assert model.encoder.blocks[0].attn.qkv.bias[64:128].abs().min() > 0  # a key bias, which Beit has not, is dropped
    with torch.no_grad():
        for blk in model.encoder.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1.0)  # a trained-looking table
        for p in model.head.parameters():
            p.normal_()
    common.save_checkpoint(str(tmp_path / "ft.pth"), model=model.state_dict(), method="finetune",
                           args={"model": "vit_nano_patch16", "input_size": 224, "mode": mode, "nb_classes": 10,
                                 "rel_pos_bias": True})
    capsys.readouterr()
    finetune.main(["--data", "fake", "--finetune", str(tmp_path / "ft.pth"), "--export_timm", str(tmp_path / "t.pth")])
    printed = capsys.readouterr().out
    load = re.search(r"load with (timm\.models\.beit\.Beit\(.*\)\.load_state_dict\(torch\.load\('.*'\)\))", printed)
    net = eval(load.group(1).split(".load_state_dict")[0], {"timm": timm})  # the printed constructor, as a user runs it
    assert net.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True), strict=True).missing_keys == []
    x = images(2)
    with torch.no_grad():
        ours = model(x) if mode == "finetune" else model.encoder(x)  # the probe's head has no timm counterpart
        theirs = net.eval()(x) if mode == "finetune" else net.eval().forward_features(x)
    print(f"export --mode {mode}: max |timm Beit - ours| = {(theirs - ours).abs().max().item():.2e}")
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    if mode == "finetune":
        return  # (its encoder has no final norm: a classifier, not an encoder to load alone)
    # a caller that does not resolve the flag (benchmarks/learn.py) gets the file's tables too, not a model without them
    ns = argparse.Namespace(arch="vit", model="vit_nano_patch16", input_size=224, drop_path=0.0, finetune="f", rank=1)
    src = finetune.read_pretrained(str(tmp_path / "ft.pth"))
    encoder = finetune.new_encoder(ns, src)
    finetune.load_encoder(encoder, src, ns)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(x), model.encoder(x))
