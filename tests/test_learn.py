"""benchmarks/learn.py: its synthetic dataset, the teacher-training forward (which must be the forward common.Teacher
runs on the saved file), the R^2 diagnostics, and a reduced run end to end: a student distilled with MaskAlign
must beat the random student under the same linear probe."""
import json
import os
import sys

import numpy as np
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learn  # noqa: E402


def test_dataset_is_deterministic_and_not_solved_by_mean_colour(tmp_path):
    """Same seed, same bytes; and the per-class mean colours overlap: colour alone does not tell classes apart."""
    a = learn.make_dataset(str(tmp_path / "a"), 3, 10, 4, 1)
    b = learn.make_dataset(str(tmp_path / "b"), 3, 10, 4, 1)
    for split, cls, name in [("train", "ring", "00002.jpg"), ("val", "dots", "00000.jpg")]:
        assert open(os.path.join(a, split, cls, name), "rb").read() == open(os.path.join(b, split, cls, name), "rb").read()
    assert sorted(os.listdir(os.path.join(a, "train"))) == sorted(learn.CLASSES)
    rng = np.random.default_rng(0)  # mean colour of 40 images per class: the class means lie within the spread
    means = np.array([[np.asarray(learn.draw_image(c, rng)).reshape(-1, 3).mean(0) for _ in range(40)]
                      for c in learn.CLASSES])  # [10, 40, 3]
    between = means.mean(1).std(0).mean()  # spread of the class means
    within = means.std(1).mean()  # spread inside a class
    assert between < 0.25 * within, (between, within)



def test_teacher_training_forward_is_common_teacher(tmp_path):
    """learn.py trains the tiny tower through teacher_tokens (with autograd, position embedding resized to the
    student's grid); the method files see it through common.Teacher. Both must give the same tokens for the same
    file, at 112 px (7 x 7) and 224 px (14 x 14), including the ImageNet -> CLIP re-normalisation."""
    import common
    torch.manual_seed(0)
    net = common.tiny_clip_tower()
    with torch.no_grad():  # move off the init so that a wrong permutation cannot cancel out
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), tmp_path / "t.pth")
    for size in (112, 224):
        grid = size // 16
        teacher = common.Teacher("tiny", str(tmp_path / "t.pth"), grid=grid)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ours = learn.teacher_tokens(net.eval(), x, grid)
        assert ours.shape == (2, 1 + grid * grid, 32)
        torch.testing.assert_close(ours, teacher(x)["tokens"], atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # and it is not trivially equal: CLIP-normalised input would differ
            other = learn.teacher_tokens(net, x * 0.5, grid)
        assert not torch.allclose(other, ours, atol=1e-3)



def test_linear_r2_and_patch_colour(tmp_path):
    """learn.linear_r2: 1 when the targets are an affine function of the inputs, about 0 when unrelated; and
    learn.patch_colour gives each patch's mean RGB: for tokens that are an affine map of it, the colour R^2 is 1."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4000, 3, generator=g), torch.randn(3, 8, generator=g)
    assert learn.linear_r2(x, x @ w + 1.0) >= 0.999
    assert learn.linear_r2(x, torch.randn(4000, 8, generator=g)) < 0.01
    assert abs(learn.linear_r2(x, x @ w + torch.randn(4000, 8, generator=g) * (x @ w).std(0))  # half signal, half noise
               - 0.5) < 0.05
    images = torch.randn(2, 3, 64, 64, generator=g)
    rgb = learn.patch_colour(images)  # [2, 1 + 16, 3]
    torch.testing.assert_close(rgb[1, 1 + 4 * 2 + 3], images[1, :, 32:48, 48:64].mean((1, 2)))  # patch row 2, col 3
    data = learn.make_dataset(str(tmp_path / "d"), 0, 4, 8, 16)
    args = learn.get_args(["--input_size", "64", "--probe_batch", "32"])
    colour = learn.val_patches(learn.patch_colour, args, data)  # [64 images x 16 patches, 3]
    assert colour.shape == (64 * 16, 3)
    assert learn.linear_r2(colour, learn.val_patches(lambda x: learn.patch_colour(x) @ w + 1.0, args, data)) >= 0.999


def test_reduced_run_distilled_student_beats_random_student(tmp_path):
    """A reduced benchmarks/learn.py (about 65 s on 2 cores): 4 classes x 100 train / 40 val images, the tiny teacher
    trained 400 steps, a vit_nano student pre-trained by mask_align.py through its command line for 400 steps (16
    epochs of batch 16), and finetune.py's linear probe (8 epochs) of it and of the random student. Two checks:
    - the probe (the issue's): measured with these flags on the 2-core machine, seeds 0-4, MaskAlign 35.0 / 34.4 /
      38.8 / 35.6 / 36.3% against the random student's 23.1 / 25.0 / 23.8 / 23.1 / 22.5% (chance 25%): margins
      +11.9 / +9.4 / +15.0 / +12.5 / +13.8 points (mean 12.5, sd 2.1). Asked: 5 points (8 of the 160 val images),
      over 3 sd below the mean and about half the smallest margin.
    - the wiring (teacher R^2: how well the student's patch tokens predict the teacher's, learn.linear_r2): MaskAlign
      0.445 / 0.426 / 0.511 / 0.529 / 0.609 against the random student's 0.201 / 0.171 / 0.167 / 0.259 / 0.215:
      gaps 0.24 / 0.26 / 0.34 / 0.27 / 0.39 (mean 0.30, sd 0.06). Asked: 0.12, half the smallest gap.
    Why both: at this scale the probe margin alone does not catch a pairing bug. With every image given the next
    image's targets (target.roll(1, dims=1) in mask_align.forward_step), seeds 0 / 1 probed at 38.1 / 43.1%, above
    the correct run, as training that merely removes the random ViT's colour code lifts a 4-class probe; their
    teacher R^2 gaps were -0.10 / +0.02, so this test fails on that bug."""
    torch_threads = torch.get_num_threads()
    try:
        rows = learn.main(["--out", str(tmp_path / "run"), "--seed", "0", "--classes", "4", "--train_per_class", "100",
                           "--val_per_class", "40", "--teacher_steps", "400", "--teacher_log", "400", "--epochs", "16",
                           "--batch_size", "16", "--probe_epochs", "8", "--probe_batch", "64", "--methods", "mask_align",
                           "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "out.png")])
    finally:
        torch.set_num_threads(torch_threads)
    top1 = {r["method"]: r["probe_top1"] for r in rows}
    assert top1["mask_align"] - top1["random_init"] >= 5.0, top1
    r2 = {r["method"]: r["teacher_r2"] for r in rows}
    assert r2["mask_align"] - r2["random_init"] >= 0.12, r2
    records = json.load(open(tmp_path / "out.json"))  # the keys, one record per row
    assert [r["method"] for r in records] == ["pixels", "teacher", "random_init", "mask_align"]
    for r in records:
        assert {"method", "probe_top1", "pretrain_s", "probe_s", "final_pretrain_loss", "teacher_r2"} <= set(r), r
    from PIL import Image
    assert Image.open(tmp_path / "out.png").size == (1040, 470)
