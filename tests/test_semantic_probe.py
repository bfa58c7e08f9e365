"""finetune.py --probe_patches semantic, MILAN Table 7 #6 (semantic aware probing): the frozen encoder of the probe sees
only the top 50% of the patches by the teacher's class-token attention, in training and at evaluation."""
import json
import math

import pytest
import torch

import common
import finetune
from conftest import images, run_script

N, KEEP = 196, 98  # 14 x 14 patches at 224 px / 16 px; MILAN: "the top 50% important image patches"


def hand_top_half(teacher, x):
    """MILAN Eq. 3 recomputed from the last block's q and k (per head, by loops), then the 98 largest by sorting: ids
    ascending, one list per image."""
    seen, last = {}, teacher.net.transformer.resblocks[-1]
    hook = last.ln_1.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))
    teacher(x, tokens=False)
    hook.remove()
    y, W, b = seen["y"], last.attn.in_proj_weight, last.attn.in_proj_bias  # y: ln_1 of the last block's input
    H, D = last.attn.num_heads, y.shape[-1]
    d, out = D // H, []
    for i in range(len(x)):
        score = [0.0] * N
        for h in range(H):
            q = y[i, 0] @ W[h * d:(h + 1) * d].T + b[h * d:(h + 1) * d]  # the CLS query of head h
            logits = [float(q @ (y[i, j] @ W[D + h * d:D + (h + 1) * d].T + b[D + h * d:D + (h + 1) * d])) / math.sqrt(d)
                      for j in range(1 + N)]  # over CLS + N keys
            z = sum(math.exp(v - max(logits)) for v in logits)
            for j in range(N):  # CLS -> CLS left out; mean over the heads
                score[j] += math.exp(logits[1 + j] - max(logits)) / z / H
        out.append(sorted(sorted(range(N), key=lambda j: -score[j])[:KEEP]))
    return out


def test_kept_ids_are_the_top_half_by_the_teachers_class_token_attention(tiny_teacher):
    x = images(2)
    with torch.no_grad():
        ids = finetune.semantic_ids(tiny_teacher, x)
        want = hand_top_half(tiny_teacher, x)
    assert ids.shape == (2, KEEP) and ids.tolist() == want
    assert finetune.semantic_ids(None, x) is None  # --probe_patches all: every patch


@pytest.mark.parametrize("path", ["train", "eval"])
@pytest.mark.parametrize("mode, pool", [("linprobe", "cls"), ("linprobe", "avg"), ("attnprobe", "cls")])
def test_the_frozen_encoder_sees_only_the_kept_patches(path, mode, pool, tiny_teacher, tmp_path):
    encoder = common.build_vit("vit_nano_patch16", 224)
    model = finetune.Classifier(encoder, mode, 10, pool)
    x, labels = images(4), torch.tensor([0, 1, 2, 3])
    seen = []
    encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    heads = []
    model.head.register_forward_pre_hook(lambda m, a: heads.append(a[0].detach().clone()))
    args = finetune.get_args(["--data", "fake", "--finetune", "unused.pth", "--mode", mode])
    args.device, args.rank, args.world_size, args.amp, args.nb_classes = "cpu", 0, 1, "none", 10
    args.lr, args.warmup_epochs, args.output_dir, args.log_every, args.batch_size = 0.1, 0, str(tmp_path), 1, 4
    args.seed, args.num_workers, args.save_every_steps = 0, 0, 0
    loader = common.build_loader(torch.utils.data.TensorDataset(x, labels), args, train=False)  # in order
    if path == "train":
        opt = finetune.build_optimizer(model, args)
        ckpt = common.Checkpointer(args, "finetune", model, opt)
        finetune.train_one_epoch(model, model.head, loader, opt, ckpt.scaler, None, 0, args, ckpt, tiny_teacher)
    else:
        finetune.evaluate(model, loader, args, tiny_teacher)
    assert len(seen) == 1
    with torch.no_grad():
        keep = torch.tensor(hand_top_half(tiny_teacher, x))  # [4, 98]
        patches = encoder.patch_embed(x) + encoder.pos_embed[:, 1:]  # [4, 196, 64]
        want = torch.stack([patches[i, keep[i]] for i in range(4)])  # [4, 98, 64]: the kept patches with their positions
    assert seen[0].shape == (4, 1 + KEEP, 64)
    torch.testing.assert_close(seen[0][:, 1:], want)
    tokens = encoder.eval()(x, keep)  # what the head read: from these 98 tokens only
    want = {"cls": tokens[:, 0], "avg": tokens[:, 1:].mean(1)}[pool] if mode == "linprobe" else tokens[:, 1:]
    torch.testing.assert_close(heads[0], want.detach())


@pytest.fixture(scope="module")
def milan_ckpt(tmp_path_factory):
    """A pre-training checkpoint as milan.py writes it (model.encoder; a random nano encoder here)."""
    path = tmp_path_factory.mktemp("milan") / "checkpoint-last.pth"
    encoder = common.build_vit("vit_nano_patch16", 224)
    common.save_checkpoint(str(path), model={"encoder." + k: t for k, t in encoder.state_dict().items()},
                           args={"model": "vit_nano_patch16", "input_size": 224}, method="milan")
    return path


TINY = ["--data", "fake", "--fake_size", "16", "--batch_size", "8", "--num_workers", "0", "--epochs", "1"]


def test_a_semantic_probe_trains_saves_and_eval_repeats_it_with_the_teacher(milan_ckpt, tmp_path, capsys, monkeypatch):
    out, weights = tmp_path / "probe", tmp_path / "tiny.pth"  # a fixed tiny tower: --eval rebuilds the same teacher
    torch.save(common.Teacher("tiny", "none").net.state_dict(), weights)
    p = run_script("finetune.py", TINY + ["--probe_patches", "semantic", "--teacher", "tiny", "--teacher_weights",
                                          weights, "--finetune", milan_ckpt, "--output_dir", out])  # (--mode linprobe)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"teacher tiny: weights loaded from {weights}" in p.stdout and "teacher tiny (" in p.stdout  # (announce)
    stats = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert f"top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}%" in p.stdout
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)["args"]
    assert (saved["mode"], saved["probe_patches"], saved["teacher"]) == ("linprobe", "semantic", "tiny")
    assert saved["teacher_weights"] == str(weights)
    calls = []  # --eval alone: the checkpoint's teacher ranks every val batch's patches
    rank = finetune.semantic_ids
    monkeypatch.setattr(finetune, "semantic_ids", lambda t, x: calls.append(t) or rank(t, x))
    result = finetune.main(TINY + ["--finetune", str(out / "checkpoint-last.pth"), "--eval", "--output_dir",
                                   str(tmp_path / "eval")])
    assert {k: result[k] for k in ("acc1", "acc5", "val_loss")} == pytest.approx(
        {k: stats[k] for k in ("acc1", "acc5", "val_loss")}, abs=1e-6)
    assert len(calls) == 8 and {t.name for t in calls} == {"tiny"}  # 64 val images: 8 batches of 8
    assert f"teacher tiny: weights loaded from {weights}" in capsys.readouterr().out
    finetune.main(TINY + ["--finetune", str(out / "checkpoint-last.pth"), "--eval", "--teacher_weights", "none",
                          "--output_dir", str(tmp_path / "eval2")])  # weights elsewhere (here: none) for the same teacher
    assert "teacher tiny: random weights" in capsys.readouterr().err  # said as the method files say it


@pytest.mark.parametrize("case", ["finetune_mode", "teacher_without_semantic", "eval_other_teacher", "eval_no_weights"])
def test_what_semantic_probing_cannot_honour_is_refused_in_one_line(case, milan_ckpt, tmp_path, capsys):
    saved = tmp_path / "ft.pth"  # a semantic linprobe checkpoint, as finetune.py writes it
    model = finetune.Classifier(common.build_vit("vit_nano_patch16", 224), "linprobe", 10)
    common.save_checkpoint(str(saved), model=model.state_dict(), method="finetune", args=dict(
        model="vit_nano_patch16", input_size=224, mode="linprobe", nb_classes=10, probe_patches="semantic",
        teacher="tiny", teacher_weights=str(tmp_path / "gone.pth")))
    argv, flag = {
        "finetune_mode": (["--finetune", milan_ckpt, "--mode", "finetune", "--probe_patches", "semantic"],
                          "--probe_patches"),
        "teacher_without_semantic": (["--finetune", milan_ckpt, "--mode", "linprobe", "--teacher", "tiny"], "--teacher"),
        "eval_other_teacher": (["--finetune", saved, "--eval", "--teacher", "ViT-B-16"], "--teacher"),
        "eval_no_weights": (["--finetune", saved, "--eval"], "--teacher_weights")}[case]
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, TINY + [str(a) for a in argv] + ["--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {flag}"), err
