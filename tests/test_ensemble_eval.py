"""finetune.py --eval --ensemble, MR-MAE Table 4 "CLIP/DINO (Sep.)": two fine-tuned models, their softmax outputs
averaged; top-1 / top-5 and the cross-entropy of the ensemble."""
import math

import pytest
import torch

import common
import finetune

FAKE = ["--data", "fake", "--fake_size", "32", "--batch_size", "8", "--num_workers", "0"]  # 64 val images (a fixed set), 10 classes


def save(path, mode, scale, nb_classes=10, **extra):
    """A finetune.py checkpoint of a random nano encoder with a random head; scale: the size of its logits."""
    torch.manual_seed(len(str(path)) + int(10 * scale))
    model = finetune.Classifier(common.build_vit("vit_nano_patch16", 224), mode, nb_classes)
    with torch.no_grad():
        linear = model.head if mode == "finetune" else model.head[-1]
        linear.weight.normal_(0, scale), linear.bias.normal_(0, scale)
    common.save_checkpoint(str(path), model=model.state_dict(), method="finetune", args=dict(
        model="vit_nano_patch16", input_size=224, mode=mode, nb_classes=nb_classes, **extra))
    return model.eval()


def val_batches():
    args = finetune.get_args(FAKE + ["--finetune", "unused.pth"])
    ds = common.build_dataset(args, finetune.build_transform(args, train=False), split="val")
    for i in range(len(ds)):
        x, y = ds[i]
        yield common.to_device(x[None], "cpu"), y  # the val view, ImageNet-normalised as the loop does it


def hand_stats(prob_lists, labels):
    """top-1, top-5 (%) and mean -log p(label) of per-image probability lists, by sorting."""
    top1 = top5 = loss = 0.0
    for p, y in zip(prob_lists, labels):
        order = sorted(range(len(p)), key=lambda k: -p[k])
        top1, top5, loss = top1 + (order[0] == y), top5 + (y in order[:5]), loss - math.log(p[y])
    n = len(labels)
    return {"acc1": 100 * top1 / n, "acc5": 100 * top5 / n, "val_loss": loss / n}


def test_ensemble_is_the_mean_of_the_two_models_softmax_outputs(tmp_path, capsys):
    a = save(tmp_path / "a.pth", "finetune", 0.05)
    b = save(tmp_path / "b.pth", "linprobe", 0.4)  # logits of another scale: the mean of logits would rank otherwise
    probs_a, probs_b, labels = [], [], []
    with torch.no_grad():
        for x, y in val_batches():
            probs_a.append(a(x)[0].softmax(0).tolist()), probs_b.append(b(x)[0].softmax(0).tolist()), labels.append(y)
    mean = [[(pa + pb) / 2 for pa, pb in zip(ra, rb)] for ra, rb in zip(probs_a, probs_b)]  # per image, per class
    result = finetune.main(FAKE + ["--finetune", str(tmp_path / "a.pth"), "--ensemble", str(tmp_path / "b.pth"),
                                   "--output_dir", str(tmp_path / "eval")])  # (--ensemble: --eval implied)
    want = hand_stats(mean, labels)
    assert result["val_images"] == 64 and {k: result[k] for k in want} == pytest.approx(want, abs=1e-4)
    for alone in (hand_stats(probs_a, labels), hand_stats(probs_b, labels)):  # neither model alone gives it
        assert alone["val_loss"] != pytest.approx(want["val_loss"], abs=1e-3)
    logit_mean = [[(x + y) / 2 for x, y in zip(ra, rb)] for ra, rb in zip(
        [[math.log(p) for p in r] for r in probs_a], [[math.log(p) for p in r] for r in probs_b])]
    z = [sum(math.exp(v) for v in r) for r in logit_mean]  # the other reading, softmax of the mean log-probability
    other = hand_stats([[math.exp(v) / s for v in r] for r, s in zip(logit_mean, z)], labels)
    assert result["val_loss"] != pytest.approx(other["val_loss"], abs=1e-3)  # the test tells the two apart
    assert f"a.pth + {tmp_path / 'b.pth'}: top-1 {want['acc1']:.2f}% top-5 {want['acc5']:.2f}%" in capsys.readouterr().out


def test_a_semantic_probe_member_ranks_its_patches_with_its_own_teacher(tmp_path):
    a = save(tmp_path / "a.pth", "finetune", 0.05)
    teacher = common.Teacher("tiny", "none", grid=14)
    torch.save(teacher.net.state_dict(), tmp_path / "tiny.pth")  # the member's teacher, as its checkpoint names it
    b = save(tmp_path / "b.pth", "linprobe", 0.4, probe_patches="semantic", teacher="tiny",
             teacher_weights=str(tmp_path / "tiny.pth"))
    probs, labels = [], []
    with torch.no_grad():
        for x, y in val_batches():
            keep = teacher(x, tokens=False, cls_attn=True)["cls_attn"].topk(98, 1).indices.sort(1).values  # [1, 98]
            probs.append([(pa + pb) / 2 for pa, pb in zip(a(x)[0].softmax(0).tolist(), b(x, keep)[0].softmax(0).tolist())])
            labels.append(y)
    result = finetune.main(FAKE + ["--finetune", str(tmp_path / "a.pth"), "--eval", "--ensemble",
                                   str(tmp_path / "b.pth"), "--output_dir", str(tmp_path / "eval")])
    want = hand_stats(probs, labels)
    assert {k: result[k] for k in want} == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("case", ["other_classes", "other_names", "no_head"])
def test_an_ensemble_that_cannot_be_scored_is_refused_in_one_line(case, tmp_path, capsys):
    save(tmp_path / "a.pth", "linprobe", 1.0)
    if case == "no_head":  # a pre-training checkpoint: an encoder without a classifier
        common.save_checkpoint(str(tmp_path / "b.pth"), model={"encoder." + k: t for k, t in common.build_vit(
            "vit_nano_patch16", 224).state_dict().items()}, method="milan", args=dict(model="vit_nano_patch16"))
    else:  # 12 classes, or 10 of other names than --finetune's (fake data: none)
        save(tmp_path / "b.pth", "linprobe", 1.0, nb_classes=12 if case == "other_classes" else 10,
             classes=None if case == "other_classes" else [f"n{i:08d}" for i in range(10)])
    argv = FAKE + ["--finetune", str(tmp_path / "a.pth"), "--ensemble", str(tmp_path / "b.pth"), "--eval",
                   "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --ensemble"), err
