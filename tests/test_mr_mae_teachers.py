"""MR-MAE Table 4 "CLIP/DINO (Joint)": one run mimics two teachers at once (--teacher A,B --teacher_weights WA,WB):
one mimic head per teacher, L_M the mean of the two Eq. 2 terms, focused mimicking from the first teacher's [CLS]
attention; the single-teacher path keeps its head and its loss; a smoke run trains, resumes, draws and fine-tunes."""
import json
from argparse import Namespace

import pytest
import torch

import common
import finetune
import mr_mae
from conftest import SMOKE, images

N = 196
JOINT = ["--teacher", "tiny,tiny", "--teacher_weights", "none,none"]


def build(extra=(), seed=0):
    torch.manual_seed(seed)
    args = mr_mae.get_args(["--data", "fake", "--model", "vit_nano_patch16", "--teacher", "tiny", "--teacher_weights",
                            "none", *extra])
    args.device = "cpu"
    return (*mr_mae.build_model(args), args)


def eq2_by_loops(pred, target):
    """MR-MAE Eq. 2 by explicit loops: (1/l_v) sum_j ||pred_j - target_j||^2 per image, then the batch mean."""
    per_image = []
    for b in range(pred.shape[0]):
        total = sum(float(((pred[b, j] - target[b, j]).detach() ** 2).sum()) for j in range(pred.shape[1]))  # by patch
        per_image.append(total / pred.shape[1])
    return sum(per_image) / len(per_image)


def test_two_teachers_two_heads_each_of_its_teachers_width():
    model, teacher, args = build(JOINT)
    assert args.teacher == "tiny,tiny" and len(teacher.towers) == 2 and teacher.grid == 14
    a, b = (dict(t.named_parameters()) for t in teacher.towers)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # two towers, not one twice
    assert not hasattr(model, "mimic_head") and len(model.mimic_heads) == 2
    assert [h.out_features for h in model.mimic_heads] == [t.dim for t in teacher.towers] == [32, 32]
    assert all(h.in_features == 64 for h in model.mimic_heads)
    single, _, _ = build()
    assert isinstance(single.mimic_head, torch.nn.Linear) and not hasattr(single, "mimic_heads")  # keys as before


def test_joint_loss_is_half_l_r_plus_half_the_mean_of_both_teachers_eq2():
    model, teacher, args = build(JOINT + ["--focus", "topk"])
    model.eval()
    x = images(2)
    with torch.no_grad():
        out = mr_mae.forward_step(model, teacher, x, args)
        mask = out["mask"]
        # focused mimicking follows the first teacher's [CLS] attention (topk: its 49 largest), not the second's
        attn = [t(x, cls_attn=True)["cls_attn"] for t in teacher.towers]
        for b in range(2):
            visible = set((~mask[b]).nonzero().flatten().tolist())
            assert visible == set(attn[0][b].topk(49).indices.tolist()) != set(attn[1][b].topk(49).indices.tolist())
        ids_keep, ids_mask = common.ids_from_mask(mask, 49)
        latent = model.forward_encoder(x, ids_keep)  # E_v [B, 1+49, D]
        pred = model.forward_decoder(latent, ids_keep, ids_mask)
        feats = [t(x)["tokens"][:, 1:] for t in teacher.towers]  # each teacher on its own: [B, N, C_t]
    vis = [[j for j in range(N) if not mask[b, j]] for b in range(2)]  # raster order, found by hand
    hid = [[j for j in range(N) if mask[b, j]] for b in range(2)]
    rows = lambda t, sets: torch.stack([t[b, sets[b]] for b in range(2)])
    l_m = []
    for head, f in zip(model.mimic_heads, feats):  # L_t(E_v) = E_v W_t^T + b_t, written out
        le = torch.einsum("bnd,cd->bnc", latent[:, 1:], head.weight) + head.bias
        l_m.append(eq2_by_loops(le, rows(f, vis)))
    l_r = eq2_by_loops(rows(pred, hid), rows(common.pixel_targets(x), hid))  # Eq. 1 has Eq. 2's form
    assert out["loss"].item() == pytest.approx(0.5 * l_r + 0.5 * (l_m[0] + l_m[1]) / 2, rel=1e-5)
    assert abs(l_m[0] - l_m[1]) > 1e-3 * l_m[0]  # the two terms differ: the mean is not one term twice


def test_two_copies_of_one_teacher_give_the_single_teacher_loss():
    """Mean, not sum: the joint arm with both towers and both heads equal to one run's teacher and head computes that
    run's loss exactly."""
    single, t1, args1 = build(seed=0)
    joint, t2, args2 = build(JOINT, seed=0)
    for tower in t2.towers:
        tower.load_state_dict(t1.state_dict())
    sd = {k: v for k, v in single.state_dict().items() if not k.startswith("mimic_head.")}
    for i in range(2):
        sd.update({f"mimic_heads.{i}.weight": single.mimic_head.weight, f"mimic_heads.{i}.bias": single.mimic_head.bias})
    joint.load_state_dict(sd)
    x = images(2)
    torch.manual_seed(3)
    a = mr_mae.forward_step(single.eval(), t1, x, args1, per_patch=True)
    torch.manual_seed(3)
    b = mr_mae.forward_step(joint.eval(), t2, x, args2, per_patch=True)
    assert torch.equal(a["mask"], b["mask"])
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(b["patch_loss"], a["patch_loss"], rtol=1e-5, atol=1e-6)


def test_gradients_reach_both_heads_and_the_encoder_never_the_teachers():
    model, teacher, args = build(JOINT)
    out = mr_mae.forward_step(model, teacher, images(2), args, per_patch=True)
    out["loss"].backward()
    for name in ["mimic_heads.0.weight", "mimic_heads.1.weight", "mimic_heads.1.bias", "encoder.blocks.0.attn.qkv.weight",
                 "decoder_pred.weight"]:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    mask, pl = out["mask"], out["patch_loss"]
    assert torch.all(pl > 0) and pl[~mask].mean().item() == pytest.approx(1.0, rel=1e-5)  # L_M's map over its mean


@pytest.mark.parametrize("flags,says", [
    (["--teacher", "tiny,tiny", "--teacher_weights", "none"], "--teacher_weights"),
    (["--teacher", "tiny", "--teacher_weights", "none,none"], "--teacher_weights"),
    (JOINT + ["--high_level", "reconstruct"], "--high_level reconstruct")])
def test_mismatched_teacher_flags_give_one_clear_line(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(mr_mae.get_args, ["--data", "fake", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_smoke_run_trains_resumes_draws_and_fine_tunes(tmp_path, capsys):
    run, flags = tmp_path / "run", SMOKE + JOINT + ["--fake_size", "8"]
    mr_mae.main(flags + ["--output_dir", str(run)])
    start = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mr_mae: "))
    assert "teachers tiny, tiny (none, none)" in start and "Table 4 Joint" in start, start
    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["args"]["teacher"], ckpt["args"]["teacher_weights"]) == ("tiny,tiny", "none,none")
    assert [ckpt["model"][f"mimic_heads.{i}.weight"].shape for i in range(2)] == [(32, 64), (32, 64)]
    mr_mae.main(flags + ["--epochs", "2", "--output_dir", str(run), "--resume", "auto"])
    assert "resumed from" in capsys.readouterr().out
    resumed = torch.load(run / "checkpoint-last.pth", weights_only=True)
    head = "mimic_heads.1.weight"  # trained on in the second epoch
    assert resumed["epoch"] == 2 and not torch.equal(resumed["model"][head], ckpt["model"][head])
    assert [json.loads(x)["epoch"] for x in (run / "log.txt").read_text().splitlines()] == [0, 1]
    mr_mae.main(flags + ["--output_dir", str(run), "--resume", "auto", "--visualize", "2"])
    assert (run / "visualize.png").stat().st_size > 0 and "mean of the teachers' terms" in capsys.readouterr().out
    finetune.main(["--data", "fake", "--fake_size", "8", "--finetune", str(run / "checkpoint-last.pth"), "--epochs", "1",
                   "--batch_size", "8", "--num_workers", "0", "--output_dir", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    # the nano ViT's 30 tensors (2 + 2 + 2 x 12 + 2); ignored: the two heads' 4 + the decoder's 32 (3 + 2 x 12 + 2 + 2 + 1)
    assert "loaded 30 encoder tensors from a mr_mae file; ignored 36 other keys" in out, out
    ft = torch.load(tmp_path / "ft" / "checkpoint-last.pth", weights_only=True)
    assert not any("mimic" in k for k in ft["model"]) and ft["args"]["mode"] == "finetune"
