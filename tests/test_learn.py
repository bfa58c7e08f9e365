"""benchmarks/learn.py: its synthetic dataset, the teacher-training forward (which must be the forward common.Teacher
runs on the saved file), the R^2 diagnostics, its work folder and picture, and a reduced run end to end: a student
distilled with MaskAlign must beat the random student under the same linear probe, and CAE's Fig. 4 mechanism
(the encoder-to-decoder reconstruction with the regressor skipped) must hold with the alignment loss and fail
without it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, python

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learn  # noqa: E402

# CAE Fig. 4 at the reduced run's size (2 epochs of batch 16 per arm), seeds 0-4 on the 2-core machine, run as this
# module's fixture runs it: recon MSE with lambda 2 0.596 / 0.470 / 0.469 / 0.504 / 0.482, with lambda 0 1.045 / 1.040 /
# 1.064 / 1.083 / 1.012: margins 0.449 / 0.569 / 0.595 / 0.580 / 0.530 (masked patches: 0.424 / 0.548 / 0.573 / 0.554 /
# 0.506). An earlier measurement (before a Fig. 4 run passed its seed once) had a smallest margin of 0.349. Asked: half
# the smaller of the two
FIG4_MARGIN = 0.17


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


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """One reduced benchmarks/learn.py run for the tests below (about 100 s on 2 cores): 4 classes x 100 train / 40
    val images, the tiny teacher trained 400 steps, a vit_nano student pre-trained by mask_align.py through its
    command line for 400 steps (16 epochs of batch 16), finetune.py's linear probe (8 epochs) of it and of the random
    student; and --cae_fig4 with one seed at 2 epochs (50 steps) per arm."""
    tmp = tmp_path_factory.mktemp("learn")
    torch_threads = torch.get_num_threads()
    try:
        learn.PYTHON = python()  # each script as `python SCRIPT ...`, through the tests' fork server
        rows = learn.main(["--out", str(tmp / "run"), "--seed", "0", "--classes", "4", "--train_per_class", "100",
                           "--val_per_class", "40", "--teacher_steps", "400", "--teacher_log", "400", "--epochs", "16",
                           "--batch_size", "16", "--probe_epochs", "8", "--probe_batch", "64", "--methods", "mask_align",
                           "--cae_fig4", "--fig4_seeds", "1", "--fig4_epochs", "2",
                           "--json", str(tmp / "out.json"), "--plot", str(tmp / "out.png")])
    finally:
        torch.set_num_threads(torch_threads)
        learn.PYTHON = [sys.executable]
    return rows, tmp


def test_reduced_run_distilled_student_beats_random_student(reduced):
    """Two checks on the reduced run:
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
    rows, tmp = reduced
    top1 = {r["method"]: r["probe_top1"] for r in rows if r["method"] != "cae_fig4"}
    assert top1["mask_align"] - top1["random_init"] >= 5.0, top1
    r2 = {r["method"]: r["teacher_r2"] for r in rows if r["method"] != "cae_fig4"}
    assert r2["mask_align"] - r2["random_init"] >= 0.12, r2
    records = json.load(open(tmp / "out.json"))  # the keys, one record per row, then one per Fig. 4 run
    assert [r["method"] for r in records] == ["pixels", "teacher", "random_init", "mask_align", "cae_fig4", "cae_fig4"]
    for r in records[:4]:
        assert {"method", "probe_top1", "finetune_top1", "pretrain_s", "probe_s", "final_pretrain_loss",
                "teacher_r2"} <= set(r), r
        assert r["finetune_top1"] is None  # the column is off unless --finetune_epochs
    from PIL import Image
    assert Image.open(tmp / "out.png").size == (1040, 470)


def test_cae_fig4_alignment_puts_predictions_in_the_encoders_space(reduced):
    """CAE Sec. 3 / Fig. 4 at CI size: cae.py --target pixel trained 50 steps with --align_weight 2 and with 0, then
    every val patch through the encoder and straight into the decoder (regressor skipped). Measured on the 2-core
    machine with these flags, seeds 0-4: FIG4_MARGIN's comment (lambda 0 error minus lambda 2 error). A decoder that cannot read the encoder's tokens (no alignment) fails it, as does a
    reconstruction that, say, went through the regressor (both arms then solve the same pretext task)."""
    rows, tmp = reduced
    fig4 = {r["align_weight"]: r for r in rows if r["method"] == "cae_fig4"}
    assert set(fig4) == {0, 2} and all(r["seed"] == 0 for r in fig4.values())
    for r in fig4.values():
        assert {"recon_mse", "recon_mse_masked", "pretext_mse"} <= set(r), r
    assert fig4[0]["recon_mse"] - fig4[2]["recon_mse"] >= FIG4_MARGIN, fig4
    assert fig4[0]["recon_mse_masked"] - fig4[2]["recon_mse_masked"] >= FIG4_MARGIN, fig4
    from PIL import Image  # the picture: beside --plot and in the work folder, 4 rows of one image per class
    sheet = Image.open(tmp / "out_cae_fig4.png")
    assert sheet.size == (190 + 4 * (112 + 4), 26 + 4 * (112 + 4))
    assert open(tmp / "out_cae_fig4.png", "rb").read() == open(tmp / "run" / "cae_fig4.png", "rb").read()


def test_cae_reconstruct_skips_the_regressor():
    """learn.cae_reconstruct is Fig. 4's path: decoder(encoder(all patches)) at every patch's own position; recomputed
    here from the CAE module's parts, and it must not depend on the regressor's trained weights."""
    import cae
    args = cae.get_args(["--data", "x", "--model", "vit_nano_patch16", "--input_size", "112", "--target", "pixel"])
    args.device = "cpu"
    torch.manual_seed(0)
    model = cae.build_model(args)[0].eval()
    x = torch.randn(2, 3, 112, 112)
    out = learn.cae_reconstruct(model, x)
    with torch.no_grad():
        z = model.encoder.patch_embed(x) + model.encoder.pos_embed[:, 1:]
        z = torch.cat([(model.encoder.cls_token + model.encoder.pos_embed[:, :1]).expand(2, -1, -1), z], 1)
        for blk in model.encoder.blocks:
            z = blk(z)
        y = model.encoder.norm(z)[:, 1:] + model.regressor.positions(torch.arange(49).expand(2, 49))
        for blk in model.decoder_blocks:
            y = blk(y)
        torch.testing.assert_close(out, model.decoder_pred(model.decoder_norm(y)), atol=1e-5, rtol=1e-5)
        for name, p in model.regressor.named_parameters():  # (its fixed sin-cos table gives the decoder its positions)
            if name != "pos_embed":
                p.add_(1.0)
    torch.testing.assert_close(learn.cae_reconstruct(model, x), out)


def test_out_folder_learn_py_did_not_make_is_refused(tmp_path):
    """--out used to be emptied whatever it held: a non-empty folder without learn.py's marker, or a file, is now one
    error line (exit 2, through common.cli) and stays as it was; learn.py's own folder is emptied and marked again."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    p = subprocess.run(python(os.path.join(ROOT, "benchmarks", "learn.py"), "--out", mine),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: --out") and "did not write" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(learn.UserError, match="is a file"):
        learn.prepare_out(str(tmp_path / "afile"))
    own = learn.prepare_out(str(tmp_path / "own"))
    open(os.path.join(own, "old_run.txt"), "w").close()
    learn.own(own, os.path.join(own, "old_run.txt"))  # as learn.py records what it writes
    assert sorted(os.listdir(learn.prepare_out(own))) == [learn.MARKER]
    assert learn.prepare_out(str(tmp_path / "empty_dir_ok")).endswith("empty_dir_ok")


def test_a_folder_learn_py_made_is_emptied_of_its_own_files_only(tmp_path):
    """learn.py emptied a folder it had made before, whatever else was in it: a user's notes beside its runs, or results
    inside a run's folder, were deleted. It removes only the files it recorded writing (its marker lists them); any
    other file makes it refuse, naming it, with nothing removed."""
    out = learn.prepare_out(str(tmp_path / "work"))
    for name in ("teacher.pth", "milan/log.txt", "milan/checkpoint-last.pth", "data/train/a/00000.jpg"):
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        open(os.path.join(out, name), "w").write("learn.py's")
    learn.own(out, os.path.join(out, "teacher.pth"), os.path.join(out, "milan"), os.path.join(out, "data"))
    mine = {"notes.txt": "my notes", os.path.join("milan", "results.md"): "my results"}
    for name, text in mine.items():
        open(os.path.join(out, name), "w").write(text)
    for name in list(mine):
        before = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
        with pytest.raises(learn.UserError, match=os.path.basename(name)):
            learn.prepare_out(out)
        assert sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs) == before
        assert open(os.path.join(out, name)).read() == mine[name]
        os.remove(os.path.join(out, name))
    assert sorted(os.listdir(learn.prepare_out(out))) == [learn.MARKER]  # now only its own: emptied


def test_json_and_plot_never_overwrite_a_file(tmp_path, monkeypatch):
    """--json and --plot (and the Fig. 4 picture written beside --plot) were overwritten at the end of the run: an
    existing one is refused at the start, before --out is touched, as is a missing folder for them."""
    monkeypatch.setattr(learn, "make_dataset", lambda *a: pytest.fail("the run started"))
    (tmp_path / "old.json").write_text("my results")
    (tmp_path / "old.png").write_text("my picture")
    (tmp_path / "p_cae_fig4.png").write_text("my Fig. 4")
    for flags, words in [(["--json", tmp_path / "old.json"], "--json"), (["--plot", tmp_path / "old.png"], "--plot"),
                         (["--plot", tmp_path / "p.png", "--cae_fig4"], "p_cae_fig4.png"),
                         (["--json", tmp_path / "nowhere" / "x.json"], "does not exist")]:
        with pytest.raises(learn.UserError, match=words):
            learn.main(["--out", str(tmp_path / "work")] + [str(f) for f in flags])
        assert not (tmp_path / "work").exists()
    assert [(tmp_path / f).read_text() for f in ("old.json", "old.png", "p_cae_fig4.png")] == \
        ["my results", "my picture", "my Fig. 4"]


def test_help_shows_defaults_and_the_control_row(capsys):
    """--help gives each flag's default; mae_pixel, the pixel-target control, is a default row: MAE through
    mr_mae.py (L_R alone, uniform masking, no fusion), under the same recipe rule as every row (MR-MAE's peak lr
    6e-4, its warmup fraction 80/400)."""
    with pytest.raises(SystemExit):
        learn.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ["(default: learn_out)", "(default: 16)", "(default: 2400)", "(default: 0.002)"]:
        assert default in text, default
    assert "mae_pixel" in learn.get_args([]).methods
    flags = [str(f) for f in learn.pretrain_flags("mae_pixel", learn.get_args([]))]
    assert learn.METHODS["mae_pixel"][0] == "mr_mae"
    assert flags == ["--epochs", "16", "--warmup_epochs", "3.2", "--batch_size", "32", "--lr", "0.0006",
                     "--loss_weights", "1", "0", "--focus", "none", "--fusion_layers", "2"]


def test_plot_words_keep_their_spaces(tmp_path, monkeypatch):
    """learn.png's titles go through common.draw_text (PIL's default font wrote "vsstep")."""
    drawn = []
    real = learn.common.draw_text
    monkeypatch.setattr(learn.common, "draw_text", lambda d, xy, text, fill="black": (drawn.append(text), real(d, xy, text, fill)))
    rows = [dict(method="milan", probe_top1=30.0)]
    learn.plot(rows, {"milan": [1.0, 0.5]}, 10, str(tmp_path / "p.png"))
    assert "pre-training loss (epoch mean) vs step" in drawn and "linear probe top-1 (%) on val" in drawn


def test_cae_fig4_reuses_the_cae_row_instead_of_training_it_again(tmp_path, monkeypatch):
    """The cae row (cae.py --target pixel, its default --align_weight 2, --seed) is the lambda = 2 run of the first
    Fig. 4 seed when the lengths match: that run is not trained twice; any other length trains it."""
    trained = []
    monkeypatch.setattr(learn, "pretrain", lambda row, run_dir, *a, **kw: (trained.append(os.path.basename(run_dir)),
                                                                         (1.0, [{"train_loss": 0.5}]))[1])
    monkeypatch.setattr(learn, "cae_fig4_errors", lambda *a: dict(recon_mse=0.0, recon_mse_masked=0.0, pretext_mse=0.0))
    monkeypatch.setattr(learn, "fig4_picture", lambda *a: None)
    assert learn.get_args([]).methods.count("cae") == 1
    args = learn.get_args(["--out", str(tmp_path), "--fig4_seeds", "2", "--seed", "3", "--epochs", "5"])
    records = learn.cae_fig4(args, "data", lambda s: None, {}, cae_row=(7.0, [{"train_loss": 0.25}]))
    assert trained == ["cae_fig4_align0_seed3", "cae_fig4_align2_seed4", "cae_fig4_align0_seed4"]
    assert records[0]["align_weight"] == 2 and records[0]["seed"] == 3 and records[0]["pretrain_s"] == 7.0
    trained.clear()
    args = learn.get_args(["--out", str(tmp_path), "--fig4_seeds", "1", "--epochs", "5", "--fig4_epochs", "2"])
    learn.cae_fig4(args, "data", lambda s: None, {}, cae_row=(7.0, [{"train_loss": 0.25}]))
    assert trained == ["cae_fig4_align2_seed0", "cae_fig4_align0_seed0"]
