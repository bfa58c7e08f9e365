"""finetune.py as a user runs it: loading each method's checkpoint, the three modes on --data fake, --eval,
resume, export to timm, and the one-line errors."""
import importlib
import json
import os
import re
import subprocess

import pytest
import torch

import common
import finetune
from conftest import ROOT, SMOKE, python

METHODS = ["milan", "cae", "cae_v2", "mr_mae", "mask_align"]
TINY = ["--data", "fake", "--fake_size", "16", "--batch_size", "8", "--num_workers", "0", "--epochs", "1"]


def pretrain(method, out, *extra):
    """One epoch of <method>.py with the smoke flags on 16 fake images, in this process; -> checkpoint path."""
    module = importlib.import_module(method)
    module.main(SMOKE + ["--fake_size", "16", "--output_dir", str(out), *extra])
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="session")
def milan_ckpt(tmp_path_factory):
    return pretrain("milan", tmp_path_factory.mktemp("milan"))


def run(argv):
    """finetune.main in this process; returns what it returns (the stats of --eval)."""
    return finetune.main([str(a) for a in argv])


def probe_args(path, mode="linprobe"):
    args = finetune.get_args(["--data", "fake", "--finetune", str(path), "--mode", mode])
    src = finetune.read_pretrained(args.finetune)
    args.arch, args.rank, args.nb_classes = src["args"].get("arch", "vit"), 0, 10
    args.model = src["args"].get("model") or finetune.infer_model(src["encoder"], args.finetune)
    return args, src


# ---- Loading the encoder of every method's checkpoint ---------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_loads_each_methods_encoder_and_ignores_the_rest(method, tmp_path, capsys):
    path = pretrain(method, tmp_path, *(["--target", "pixel"] if method == "cae" else []))  # CAE: no tokenizer, faster
    ckpt = torch.load(path, weights_only=True)
    enc_keys = {k[len("encoder."):] for k in ckpt["model"] if k.startswith("encoder.")}
    args, src = probe_args(path)  # linprobe keeps the encoder's final norm, so every tensor is compared
    model = finetune.build_model(args, src)
    own = model.encoder.state_dict()
    assert set(own) == enc_keys  # no missing encoder key, nothing else loaded into the encoder
    for k, t in own.items():
        assert torch.equal(t, ckpt["model"]["encoder." + k]), k
    others = len(ckpt["model"]) - len(enc_keys)
    assert others > 0  # decoder / regressor / heads existed and were ignored
    out = capsys.readouterr().out
    assert f"loaded {len(enc_keys)} encoder tensors from a {method} file; ignored {others} other keys" in out
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 224, 224)).shape == (2, 10)


def test_mr_mae_convvit_encoder_loads_and_is_not_exported(tmp_path, capsys):
    path = pretrain("mr_mae", tmp_path, "--arch", "convvit_nano")
    ckpt = torch.load(path, weights_only=True)
    args, src = probe_args(path)
    model = finetune.build_model(args, src)
    assert type(model.encoder).__name__ == "ConvViT"
    for k, t in model.encoder.state_dict().items():
        assert torch.equal(t, ckpt["model"]["encoder." + k]), k
    capsys.readouterr()  # drop what pre-training printed
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, ["--data", "fake", "--finetune", str(path), "--export_timm", str(tmp_path / "t.pth")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --export_timm") and len(err.strip().splitlines()) == 1


def test_timm_format_file_loads_and_drops_its_head(milan_ckpt, tmp_path, capsys):
    ckpt = torch.load(milan_ckpt, weights_only=True)
    timm_sd = {k[len("encoder."):]: t for k, t in ckpt["model"].items() if k.startswith("encoder.")}
    timm_sd.update({"head.weight": torch.randn(1000, 64), "head.bias": torch.zeros(1000)})
    torch.save({"state_dict": timm_sd}, tmp_path / "vit.pth")
    args, src = probe_args(tmp_path / "vit.pth")
    assert args.model == "vit_nano_patch16"  # inferred from patch 16, width 64, depth 2
    model = finetune.build_model(args, src)
    assert all(torch.equal(t, timm_sd[k]) for k, t in model.encoder.state_dict().items())
    assert model.head[-1].weight.shape == (10, 64)  # timm's 1000-way head was not taken
    assert "from a timm-format file; ignored 2 other keys" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "text", "random_tensors", "no_encoder_dict"])
def test_unrelated_file_gives_one_clear_line(case, tmp_path, capsys):
    path = tmp_path / "file.pth"
    if case == "text":
        path.write_text("not weights\n")
    elif case == "random_tensors":
        torch.save({"a": torch.randn(3, 4), "b": torch.randn(5)}, path)
    elif case == "no_encoder_dict":
        torch.save({"model": {"decoder.weight": torch.randn(3)}, "args": {}, "method": "milan"}, path)
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, TINY + ["--finetune", str(path), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: --finetune {path}")


# ---- The three modes as a user runs them ----------------------------------------------------------
@pytest.fixture(scope="module")
def runs(milan_ckpt, tmp_path_factory):
    """finetune.py --mode M for one epoch on --data fake, the three modes as concurrent subprocesses."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs, outs = {}, {}
    for mode in finetune.RECIPES:
        outs[mode] = tmp_path_factory.mktemp(mode)
        cmd = python("finetune.py", *TINY, "--finetune", milan_ckpt, "--mode", mode, "--output_dir", outs[mode])
        procs[mode] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        procs[mode] = stdout
    return outs, procs


@pytest.mark.parametrize("mode", list(finetune.RECIPES))
def test_mode_logs_top1_top5_writes_checkpoint_and_eval_repeats_it(mode, runs, capsys):
    outs, stdouts = runs
    out = outs[mode]
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["epoch"] == 0
    stats = lines[0]
    assert 0.0 <= stats["acc1"] <= stats["acc5"] <= 100.0 and stats["val_loss"] > 0
    # --data fake's 64 val images: accuracies are multiples of 1/64
    assert stats["val_images"] == 64 and all(abs(stats[k] * 0.64 - round(stats[k] * 0.64)) < 1e-6 for k in ("acc1", "acc5"))
    assert f"top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}%" in stdouts[mode]
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["method"] == "finetune" and ckpt["args"]["mode"] == mode and ckpt["args"]["nb_classes"] == 10
    assert ("fc_norm.weight" in ckpt["model"]) == (mode == "finetune")
    # --eval on the written checkpoint (no --mode given: the checkpoint's own) gives the logged numbers
    result = run(TINY + ["--finetune", out / "checkpoint-last.pth", "--eval", "--output_dir", out / "eval"])
    assert {k: result[k] for k in ("acc1", "acc5", "val_loss")} == pytest.approx(
        {k: stats[k] for k in ("acc1", "acc5", "val_loss")}, abs=1e-6)
    printed = capsys.readouterr().out
    assert re.search(rf"eval .*: top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}%", printed)


def test_linprobe_resume_continues_with_the_lars_momentum(runs, milan_ckpt, tmp_path):
    outs, _ = runs
    before = torch.load(outs["linprobe"] / "checkpoint-last.pth", weights_only=True)
    assert set(before["optimizer"]["state"][0]) == {"mu"}  # LARS's momentum buffer was saved
    run(TINY + ["--finetune", milan_ckpt, "--mode", "linprobe", "--epochs", 2, "--resume",
                outs["linprobe"] / "checkpoint-last.pth", "--output_dir", tmp_path])
    lines = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1]  # epoch 0 was not run again
    after = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert not torch.equal(after["optimizer"]["state"][0]["mu"], before["optimizer"]["state"][0]["mu"])
    enc = [k for k in before["model"] if k.startswith("encoder.")]
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in enc)  # still frozen


# ---- Export to timm -------------------------------------------------------------------------------
def save_pretrained(path, layer_scale):
    encoder = common.build_vit("vit_nano_patch16", 224, init_values=0.1 if layer_scale else None)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # layer scale and pos_embed away from their init values
    model = {"encoder." + k: t for k, t in encoder.state_dict().items()}
    model["decoder_pred.weight"] = torch.randn(8, 8)
    common.save_checkpoint(str(path), model=model, args={"model": "vit_nano_patch16", "input_size": 224},
                           method="cae" if layer_scale else "milan")
    return encoder.eval()


@pytest.mark.parametrize("layer_scale", [False, True])
def test_export_loads_into_timm_and_gives_our_features(layer_scale, tmp_path):
    timm = pytest.importorskip("timm")
    ours = save_pretrained(tmp_path / "ckpt.pth", layer_scale)
    run(["--data", "fake", "--finetune", tmp_path / "ckpt.pth", "--export_timm", tmp_path / "timm.pth"])
    sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0,
        init_values=0.1 if layer_scale else None).eval()
    net.load_state_dict(sd)  # strict: same names, same shapes (pos_embed [1, 197, 64], ls1.gamma)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), ours(x), atol=1e-5, rtol=0)
    # and back: the exported file is a timm-format --finetune file
    args, src = probe_args(tmp_path / "timm.pth")
    assert src["method"] is None and all(torch.equal(t, sd[k]) for k, t in finetune.build_model(args, src)
                                         .encoder.state_dict().items())


def test_export_of_a_finetuned_model_is_timms_global_pool_classifier(tmp_path):
    timm = pytest.importorskip("timm")
    save_pretrained(tmp_path / "ckpt.pth", False)
    args, src = probe_args(tmp_path / "ckpt.pth", "finetune")
    model = finetune.build_model(args, src).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a trained-looking head
    common.save_checkpoint(str(tmp_path / "ft.pth"), model=model.state_dict(), method="finetune",
                           args={"model": "vit_nano_patch16", "input_size": 224, "mode": "finetune", "nb_classes": 10})
    run(["--data", "fake", "--finetune", tmp_path / "ft.pth", "--export_timm", tmp_path / "timm.pth"])
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10, global_pool="avg").eval()
    net.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=0)
