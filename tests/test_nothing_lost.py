"""Nothing lost, nothing silently wrong: no script writes into another run's folder or over an existing file, SIGTERM
saves where training stands, a resumed epoch logs the whole epoch, layout mistakes and out-of-domain numbers are one
error line, evaluation scores each image once, the unreadable-image limit does not depend on batch or order."""
import argparse
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import common
import milan
from conftest import ROOT, SMOKE, python, run_forked
from test_operations import FAST, FT_SMOKE, assert_same_state


def error_line(run):
    """The one `error:` line of a refused run (exit 2, no traceback), else an assertion error with its stderr."""
    code, _, err = run
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err[-2000:]
    return lines[0]


def snapshot(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def tiny_pngs(root, per_class, classes=("a", "b"), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")


# ---- Another run's folder and existing files are never written ------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A: a finished one-epoch MILAN run; B: a finished one-epoch CAE v2 run."""
    tmp = tmp_path_factory.mktemp("two_runs")
    runs = run_forked({"A": ["milan.py"] + FAST + ["--output_dir", tmp / "A"],
                       "B": ["cae_v2.py"] + FAST + ["--output_dir", tmp / "B"]})
    assert runs["A"][0] == 0 and runs["B"][0] == 0, runs["A"][2][-2000:] + runs["B"][2][-2000:]
    return tmp


def test_no_script_writes_into_a_folder_that_holds_another_run(two_runs):
    tmp = two_runs
    A, B = tmp / "A", tmp / "B"
    before = snapshot(A)
    runs = run_forked({
        "mask_align into A": ["mask_align.py"] + FAST + ["--output_dir", A],
        "finetune into A": ["finetune.py"] + FT_SMOKE + ["--finetune", A / "checkpoint-last.pth", "--output_dir", A],
        "B's checkpoint into A": ["cae_v2.py"] + FAST + ["--resume", B / "checkpoint-0.pth", "--output_dir", A],
        "A's older checkpoint into A": ["milan.py"] + FAST + ["--resume", A / "checkpoint-0.pth", "--output_dir", A],
        "A again, no --resume": ["milan.py"] + FAST + ["--output_dir", A]})
    for name, run in runs.items():
        assert "--output_dir" in error_line(run) and "holds a" in error_line(run), name
    assert snapshot(A) == before  # not a byte changed, no stray file
    runs = run_forked({  # what stays allowed: a run's own checkpoint-last, and any checkpoint into a fresh folder
        "A, --resume auto, finished": ["milan.py"] + FAST + ["--output_dir", A, "--resume", "auto"],
        "B's checkpoint into C": ["cae_v2.py"] + FAST + ["--resume", B / "checkpoint-0.pth", "--output_dir",
                                                         tmp / "C", "--epochs", "2"],
        "A on": ["milan.py"] + FAST + ["--output_dir", A, "--resume", "auto", "--epochs", "2"]})
    code, out, err = runs["A, --resume auto, finished"]
    assert code == 0 and "nothing to train" in out and "--epochs" in out, err[-2000:]
    assert "effective batch" not in out  # no summary of a run that does not happen
    assert runs["B's checkpoint into C"][0] == 0 and runs["A on"][0] == 0, runs["A on"][2][-2000:]
    assert [json.loads(x)["epoch"] for x in (A / "log.txt").read_text().splitlines()] == [0, 1]


def test_a_live_run_holds_its_folder_against_a_second_run(tmp_path):
    """Two runs at once on one --output_dir both ran (the folder was read at start-up only): log.txt held both runs'
    epochs, the checkpoints were the second's. A live run (here under torchrun, rank 0 holding the folder, each rank
    with a DataLoader worker) keeps it: a second run started meanwhile is refused in one line naming the live one's
    pid, and writes nothing; the first then finishes as if alone."""
    out, held = tmp_path / "out", tmp_path / "held"
    flags = ["milan.py"] + FAST + ["--batch_size", "4", "--num_workers", "1", "--output_dir", out]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HOLD_AT_UPDATE="1", HOLD_FILE=str(held))
    first = subprocess.Popen(python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                                    *python("tests/preempt.py", *flags)), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not held.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert held.exists(), first.communicate()[1][-3000:]
        before = snapshot(out)
        second = run_forked({"second": flags})["second"]
        line = error_line(second)
        assert "--output_dir" in line and "in use by a live run" in line and f"pid {held.read_text()} " in line, line
        assert snapshot(out) == before
    finally:
        (tmp_path / "held.go").touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0]


def test_a_run_started_from_the_users_code_frees_its_folder_when_it_ends(tmp_path):
    """main() called from a script or a notebook (the process lives on): once the run has ended its --output_dir is not
    held, so a relaunch from a terminal is not refused as 'in use by a live run' (it was until the process ended); a
    second run in the same process holds its own folder (it held none: the first run's lock stood for it)."""
    first, second, flags = tmp_path / "A", tmp_path / "B", SMOKE + ["--fake_size", "16", "--warmup_epochs", "0"]
    milan.main(flags + ["--output_dir", str(first)])
    code, _, err = run_forked({"relaunch": ["milan.py"] + flags + ["--epochs", "2", "--output_dir", first,
                                                                  "--resume", "auto"]})["relaunch"]
    assert code == 0 and "in use" not in err, err[-3000:]
    milan.main(flags + ["--output_dir", str(second)])
    assert (second / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_a_killed_runs_lock_never_blocks_its_relaunch(tmp_path):
    """SIGKILL to a run's main process only (its 2 DataLoader workers live on for a while, and share its open files):
    the relaunch at once with --resume auto is not refused; a dead run holds nothing."""
    out, held = tmp_path / "out", tmp_path / "held"
    flags = ["milan.py"] + FAST + ["--num_workers", "2", "--output_dir", out]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HOLD_AT_UPDATE="1", HOLD_FILE=str(held))
    killed = subprocess.Popen(python("tests/preempt.py", *flags), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not held.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert held.exists(), killed.communicate()[1][-3000:]
    os.kill(int(held.read_text()), signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    code, _, err = run_forked({"relaunch": flags + ["--resume", "auto"]})["relaunch"]
    assert code == 0 and "in use" not in err, err[-3000:]


def test_export_never_overwrites_and_a_bad_path_is_one_line(two_runs):
    tmp = two_runs
    A = tmp / "A"
    before = snapshot(A)
    export = lambda out: ["finetune.py", "--finetune", A / "checkpoint-last.pth", "--export_timm", out]
    runs = run_forked({"a checkpoint": export(A / "checkpoint-0.pth"), "a folder": export(A),
                       "a missing folder": export(tmp / "missing" / "x.pth"), "not writable": export("/proc/x.pth"),
                       "fine": export(tmp / "encoder.pth")})
    for name in ("a checkpoint", "a folder", "a missing folder", "not writable"):
        assert "--export_timm" in error_line(runs[name]), name
    assert snapshot(A) == before and not (tmp / "missing").exists()
    assert runs["fine"][0] == 0 and (tmp / "encoder.pth").is_file()
    assert [f for f in os.listdir(tmp) if ".tmp" in f] == []


def test_eval_of_a_pretraining_checkpoint_is_refused(two_runs):
    """A pre-training checkpoint has no trained head: --eval would score a random one."""
    run = run_forked({"eval": ["finetune.py"] + FT_SMOKE + ["--finetune", two_runs / "A" / "checkpoint-last.pth",
                                                            "--eval"]})["eval"]
    assert "--eval" in error_line(run) and "head" in error_line(run)


# ---- SIGTERM saves; a resumed epoch logs the whole epoch -------------------------------------------------
def test_sigterm_saves_a_mid_epoch_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path):
    """SIGTERM after update 1 of epoch 0 (step 2 of 4, accum 2): the run finishes the update, writes checkpoint-last
    (epoch 0, step 2), prints where to continue and exits 143; resumed, it ends bit-identical to an uninterrupted run,
    and log.txt's train_loss of the interrupted epoch is the whole epoch's mean, as the uninterrupted run logs it."""
    flags = FAST + ["--epochs", "2", "--accum_iter", "2", "--num_workers", "1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    runs = run_forked({"whole": ["milan.py"] + flags + ["--output_dir", whole],
                       "stopped": (["tests/preempt.py", "milan.py"] + flags + ["--output_dir", cut],
                                   {"SIGNAL_AT_UPDATE": "1"}),
                       "resumed": ["milan.py"] + flags + ["--output_dir", cut, "--resume", "auto"]})
    code, _, err = runs["stopped"]
    assert code == 143 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at epoch 0, step 2") and "--resume auto" in last and "(epoch 0, step 2)" in last
    assert runs["resumed"][0] == 0, runs["resumed"][2][-3000:]
    a, b = (torch.load(d / "checkpoint-last.pth", weights_only=True) for d in (whole, cut))
    assert_same_state(a["model"], b["model"])
    logs = [[json.loads(x) for x in (d / "log.txt").read_text().splitlines()] for d in (whole, cut)]
    assert logs[0] == logs[1]  # train_loss of epoch 0 over all its 4 steps, not over the 2 after the resume


def test_sigterm_to_the_whole_process_group_with_workers(tmp_path):
    """As a scheduler sends it: the DataLoader workers get SIGTERM too, ignore it, and the run still saves and stops
    with its one line. A second signal (a user who presses Ctrl-C twice) stops at once."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SIGNAL_AT_UPDATE="2", SIGNAL_GROUP="1")
    proc = subprocess.run(python("tests/preempt.py", "milan.py", *FAST, "--accum_iter", "1", "--num_workers", "2",
                                 "--output_dir", tmp_path), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240, start_new_session=True)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM at epoch 0, step 2")
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["step"] == 2


def test_a_second_sigterm_still_saves_a_second_ctrl_c_stops_at_once(tmp_path):
    """Under torchrun a scheduler's SIGTERM reaches each rank twice (its own, and torchrun's forward of the one torchrun
    got): the run still finishes the update, saves and exits 143 (a second SIGTERM stopped it at once, without a
    checkpoint: a preempted job lost all since its last save). Ctrl-C twice still stops at once, as the README says."""
    flags = FAST + ["--accum_iter", "1"]
    runs = run_forked({sig: (["tests/preempt.py", "milan.py"] + flags + ["--output_dir", tmp_path / sig],
                             {"SIGNAL_AT_UPDATE": "2", "SIGNAL_COUNT": "2", "SIGNAL": sig}) for sig in ("SIGTERM", "SIGINT")})
    code, _, err = runs["SIGTERM"]
    assert code == 143 and err.strip().splitlines()[-1].startswith("stopped by SIGTERM at epoch 0, step 2"), err[-2000:]
    assert torch.load(tmp_path / "SIGTERM" / "checkpoint-last.pth", weights_only=True)["step"] == 2
    code, _, err = runs["SIGINT"]
    assert code == 130 and "no checkpoint was written" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "SIGINT" / "checkpoint-last.pth").exists()


# ---- The unreadable-image limit -------------------------------------------------------------------------------
def test_unreadable_limit_does_not_depend_on_batch_log_interval_or_order():
    """Simulated epochs of 1,000 images in random orders, at batch sizes 4 to 64, checked every update: with 8 bad
    files (0.8%) the check never stops a run, within the epoch or at its end; with 30 (3%) it always stops by the end,
    and within the epoch in most orders; exactly at the README's rule at the end (over 1% of the epoch's images)."""
    rng = np.random.default_rng(0)
    for bad, stops in ((8, False), (30, True)):
        early = 0
        for trial in range(400):
            batch = [4, 8, 16, 32, 64][trial % 5]
            seen = np.arange(batch, 1001, batch)
            failed = np.cumsum(rng.permutation(1000) < bad)[seen - 1]
            early += any(common.too_many_unreadable(f, s - f) for f, s in zip(failed, seen))  # s - f trained on
            assert common.too_many_unreadable(bad, 1000 - bad, final=True) == stops
        assert (early == 0) if not stops else early > 200, (bad, early)
    assert common.too_many_unreadable(11, 989, final=True) and not common.too_many_unreadable(10, 990, final=True)


def test_a_folder_under_one_percent_unreadable_trains_even_with_a_bad_first_batch(tmp_path):
    """252 files, 2 unreadable (0.8%), one of them in the first batch, checked every step: the epoch trains through
    and logs both (the old running check stopped at step 0)."""
    data = tmp_path / "data" / "train"
    tiny_pngs(data, 126)
    files = sorted(data.rglob("*.png"), key=lambda p: (p.parent.name, p.name))  # ImageFolder's order
    order = torch.randperm(252, generator=torch.Generator().manual_seed(0)).tolist()  # SeededSampler's epoch 0
    for i in (order[0], order[100]):  # the very first image, and one later
        files[i].write_bytes(b"not an image")
    run = run_forked({"train": ["milan.py"] + SMOKE + ["--data", tmp_path / "data", "--input_size", "112",
                                                       "--log_every", "1", "--output_dir", tmp_path / "out"]})["train"]
    assert run[0] == 0, run[2][-2000:]
    assert json.loads((tmp_path / "out" / "log.txt").read_text())["unreadable_images"] == 2


# ---- Layouts, messages that name the cause, numbers outside their domain ----------------------------------
@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, two_runs):
    tmp = tmp_path_factory.mktemp("mistakes")
    tiny_pngs(tmp / "val_only" / "val", 4)
    tiny_pngs(tmp / "flat", 4), tiny_pngs(tmp / "flat" / "val", 4)
    tiny_pngs(tmp / "one_empty" / "train", 4, ("a", "b", "c")), (tmp / "one_empty" / "train" / "d").mkdir()
    (tmp / "a_file").write_text("not a folder")
    A = two_runs / "A"
    cases = {
        "val only": ["milan.py"] + SMOKE + ["--data", tmp / "val_only"],
        "flat + val (pre-training)": ["milan.py"] + SMOKE + ["--data", tmp / "flat"],
        "flat + val (finetune)": ["finetune.py"] + FT_SMOKE + ["--data", tmp / "flat", "--finetune", A / "checkpoint-last.pth"],
        "one empty class": ["milan.py"] + SMOKE + ["--data", tmp / "one_empty"],
        "output_dir a file": ["milan.py"] + SMOKE + ["--output_dir", tmp / "a_file"],
        "data a file": ["milan.py"] + SMOKE + ["--data", tmp / "a_file"],
        "other decoder depth": ["milan.py"] + FAST + ["--resume", A / "checkpoint-last.pth", "--decoder_depth", "1",
                                                      "--epochs", "2", "--output_dir", tmp / "never_made"],
        "cae with a CLIP teacher": ["cae.py"] + SMOKE + ["--teacher", "ViT-L-14", "--teacher_weights", "/does/not/exist.pt"],
        "visualize auto, no checkpoint": ["milan.py"] + SMOKE + ["--visualize", "2", "--resume", "auto", "--output_dir",
                                                                  tmp / "empty_run"],
    }
    bad_numbers = {  # flag -> a value outside its domain
        "--lr": "-1", "--blr": "-0.001", "--min_lr": "-0.00001", "--warmup_epochs": "-1", "--weight_decay": "-0.05",
        "--save_every_minutes": "-5", "--epochs": "0", "--num_workers": "-1", "--log_every": "0", "--save_freq": "0",
        "--drop_path": "1.5", "--crop_min": "1.5", "--visualize": "-1", "--batch_size": "0", "--betas": "0.9 1.5",
        "--clip_grad": "-1", "--seed": "-3", "--input_size": "0", "--accum_iter": "0", "--fake_size": "0"}
    for flag, value in bad_numbers.items():
        cases[flag] = ["milan.py"] + SMOKE + [flag, *value.split()]
    cases["--epochs -1 --warmup_epochs 0"] = ["milan.py"] + SMOKE + ["--epochs", "-1", "--warmup_epochs", "0"]
    for script, flag, value in [("milan.py", "--decoder_depth", "0"), ("cae.py", "--align_weight", "-2"),
                                ("cae_v2.py", "--regressor_dim", "0"), ("mr_mae.py", "--loss_weights", "-1 1"),
                                ("mask_align.py", "--top_k", "0"), ("finetune.py", "--layer_decay", "1.5"),
                                ("finetune.py", "--smoothing", "1"), ("finetune.py", "--nb_classes", "0")]:
        smoke = FT_SMOKE + ["--finetune", A / "checkpoint-last.pth"] if script == "finetune.py" else SMOKE
        cases[f"{script} {flag}"] = [script] + smoke + [flag, *value.split()]
    return tmp, bad_numbers, run_forked({k: v + (["--output_dir", tmp / "out"] if "--output_dir" not in v else [])
                                         for k, v in cases.items()})


@pytest.mark.parametrize("case,words", [
    ("val only", ["'val' folder but no 'train' folder"]), ("flat + val (pre-training)", ["no 'train' folder"]),
    ("flat + val (finetune)", ["no 'train' folder"]), ("one empty class", ["d", "hold no image"]),
    ("output_dir a file", ["--output_dir", "is a file"]), ("data a file", ["--data", "is a file"]),
    ("other decoder depth", ["--decoder_depth 2 (now 1)"]), ("cae with a CLIP teacher", ["--teacher", "--dalle_weights"]),
    ("visualize auto, no checkpoint", ["--resume auto", "no checkpoint-last.pth"])])
def test_a_mistake_gets_one_line_that_names_its_cause(case, words, mistakes):
    tmp, _, runs = mistakes
    line = error_line(runs[case])
    assert all(w in line for w in words), line
    assert not (tmp / "never_made").exists() and not (tmp / "empty_run").exists()  # a refused run makes no folder


def test_every_number_outside_its_domain_is_refused_at_parse_time(mistakes):
    _, bad_numbers, runs = mistakes
    cases = {**{flag: flag for flag in bad_numbers}, "--epochs -1 --warmup_epochs 0": "--epochs"}
    cases.update({f"{s} {f}": f for s, f in [("milan.py", "--decoder_depth"), ("cae.py", "--align_weight"),
                                             ("cae_v2.py", "--regressor_dim"), ("mr_mae.py", "--loss_weights"),
                                             ("mask_align.py", "--top_k"), ("finetune.py", "--layer_decay"),
                                             ("finetune.py", "--smoothing"), ("finetune.py", "--nb_classes")]})
    for case, flag in cases.items():
        line = error_line(runs[case])
        assert f"argument {flag}" in line and "outside" in line, (case, line)
        assert "random weights" not in runs[case][2]  # refused before anything was built (the teacher says so)


def test_lr_below_min_lr_is_warned(capsys):
    """mask_align at batch 16 on one process: lr = 1.5e-4 x 16 / 256 = 9.4e-6 < its --min_lr 1e-5: the cosine rises."""
    args = argparse.Namespace(rank=0, model="vit_nano_patch16", teacher="tiny", teacher_weights="none", data="fake",
                              batch_size=16, accum_iter=1, world_size=1, epochs=10, warmup_epochs=1, blr=1.5e-4,
                              lr=1.5e-4 * 16 / 256, min_lr=1e-5, output_dir="x")
    common.announce(args, "mask_align", range(64), 4)
    assert "below --min_lr" in capsys.readouterr().err


def test_mr_mae_conv_stages_are_announced_and_saved_by_their_name(tmp_path):
    run = run_forked({"conv": ["mr_mae.py"] + FAST + ["--arch", "convvit_nano", "--output_dir", tmp_path]})["conv"]
    assert run[0] == 0 and run[1].startswith("mr_mae: convvit_nano,"), run[2][-2000:]
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["args"]["model"] == "convvit_nano"


# ---- Evaluation counts each image once ------------------------------------------------------------------------
def test_evaluation_scores_each_val_image_once_under_torchrun(two_runs, tmp_path):
    """39 val images, one unreadable, two processes: 38 scored (not 40: no padding, no stand-in), the same top-1 as
    one process."""
    data = tmp_path / "data"
    tiny_pngs(data / "train", 8)
    tiny_pngs(data / "val", 20, seed=1)
    (data / "val" / "b" / "019.png").unlink()
    (data / "val" / "b" / "018.png").write_bytes(b"not an image")
    ft = ["finetune.py", "--data", data, "--input_size", "112", "--num_workers", "0", "--batch_size", "8"]
    runs = run_forked({"probe": ft + ["--finetune", two_runs / "A" / "checkpoint-last.pth", "--mode", "linprobe",
                                      "--epochs", "1", "--output_dir", tmp_path / "ft"],
                       "eval": ft + ["--finetune", tmp_path / "ft" / "checkpoint-last.pth", "--eval"]})
    assert runs["probe"][0] == 0, runs["probe"][2][-2000:]
    one = runs["eval"][1].strip().splitlines()[-1]
    assert one.endswith("on 38 images (1 unreadable, not scored)"), one
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                                 *python(*ft, "--finetune", tmp_path / "ft" / "checkpoint-last.pth", "--eval")),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [x for x in proc.stdout.splitlines() if x.startswith("eval ")][-1]
    accuracy = lambda line: (line.split("% top-5")[0], line.split(" on ")[-1])
    assert accuracy(two) == accuracy(one)  # the same images scored once each, the same top-1 and top-5


# ---- Pictures -------------------------------------------------------------------------------------------------
def test_visualize_names_each_row_and_passes_over_an_unreadable_image(tmp_path):
    data = tmp_path / "data" / "train"
    tiny_pngs(data, 3)
    (data / "a" / "000.png").write_bytes(b"not an image")  # the first pick of class a
    run = run_forked({"draw": ["milan.py"] + SMOKE + ["--data", tmp_path / "data", "--visualize", "3",
                                                      "--output_dir", tmp_path / "out"]})["draw"]
    code, out, err = run
    assert code == 0 and "000.png" in err and "unreadable" in err, err[-2000:]
    assert "untrained model" in err
    assert "(b: 000.png, a: 001.png, b: 001.png)" in out, out  # three different readable images, classes in turn


def test_visualize_never_overwrites_a_picture(tmp_path):
    """--visualize wrote OUTPUT_DIR/visualize.png over an earlier one: it now writes beside it and names the file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "visualize.png").write_bytes(b"an earlier picture")
    code, stdout, err = run_forked({"draw": ["milan.py"] + SMOKE + ["--visualize", "2", "--output_dir", out]})["draw"]
    assert code == 0, err[-2000:]
    assert (out / "visualize.png").read_bytes() == b"an earlier picture"
    assert Image.open(out / "visualize-1.png").size[0] > 0 and f"wrote {out / 'visualize-1.png'}" in stdout, stdout


def test_words_in_pictures_keep_their_spaces():
    """PIL's default font draws a space as narrow as the gap between letters ("CLSattention"): draw_text keeps a
    gap between words wider than any gap inside a word."""
    def gaps(draw_fn):
        im = Image.new("L", (300, 20), 255)
        draw_fn(ImageDraw.Draw(im))
        ink = (np.asarray(im) < 128).any(0)
        cols = np.flatnonzero(ink)
        runs, n = [], 0
        for c in range(cols[0], cols[-1] + 1):
            n = 0 if ink[c] else n + 1
            runs.append(n)
        return max(runs)
    widest_in_word = gaps(lambda d: d.text((2, 2), "CLSattention", fill=0))
    assert gaps(lambda d: common.draw_text(d, (2, 2), "CLS attention", fill=0)) > widest_in_word + 1


def test_help_says_what_each_flag_does():
    helps = {s: subprocess.run(python(s, "--help"), cwd=ROOT, capture_output=True, text=True).stdout
             for s in ("cae.py", "finetune.py")}
    assert "(default: no clipping) (default: 3.0)" not in " ".join(helps["cae.py"].split())
    ft = " ".join(helps["finetune.py"].split())
    assert "AdamW betas (--mode finetune" in ft and "AdamW weight decay" not in ft
    readme = open(os.path.join(ROOT, "README.md")).read()
    example = next(line for line in readme.splitlines() if "--export_timm" in line and "finetune.py" in line)
    assert "pip install timm" in readme[readme.index(example):readme.index(example) + 400]  # not in requirements.txt
