"""Not confusing: the README's smoke run looks right in every method file; a mistake is one line that names its fix
(also under torchrun, and in finetune.py, learn.py, bench.py and loader.py); pictures say what they show."""
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import common
from conftest import ROOT, SMOKE, run_forked, run_script
from test_nothing_lost import error_line, tiny_pngs
from test_operations import FAST

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learn  # noqa: E402


def test_the_readme_smoke_run_warns_of_nothing_in_any_method_file(tmp_path):
    """The README's smoke command warned in every method file (--warmup_epochs 40 not shorter than --epochs 1; CAE,
    CAE v2 and MaskAlign also an lr below --min_lr at batch 8): a first run must look right. The command as the README
    has it for milan.py, and with its flags (on 64 images) for the other four; and its log line counts steps and images
    (the resumed-epoch check needs them)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    command = shlex.split(next(x for x in readme.splitlines() if x.startswith("python milan.py --data fake")))
    flags = [str(tmp_path / "milan") if a == "OUT" else a for a in command[2:]]
    cases = {"milan.py": [command[1]] + flags}
    for script in ("cae.py", "cae_v2.py", "mr_mae.py", "mask_align.py"):
        cases[script] = [script] + [str(tmp_path / script) if a == "OUT" else a for a in command[2:]] + ["--fake_size", "64"]
    for script, (code, out, err) in run_forked(cases).items():
        assert code == 0 and "warning" not in (out + err).lower(), (script, err[-2000:])
    log = json.loads((tmp_path / "milan" / "log.txt").read_text())
    batch = int(command[command.index("--batch_size") + 1])
    assert (log["steps"], log["images"]) == (256 // batch, 256 // batch * batch), log


def test_a_mistake_is_one_line_that_names_its_fix(tmp_path):
    tiny_pngs(tmp_path / "unreadable", 2)
    for f in (tmp_path / "unreadable").rglob("*.png"):
        f.write_bytes(b"not an image")
    runs = run_forked({
        "16 px": ["milan.py"] + SMOKE + ["--input_size", "16", "--output_dir", tmp_path / "out"],
        "negative": ["milan.py"] + SMOKE + ["--blr", "-1e-4", "--output_dir", tmp_path / "out"],
        "negative, = form": ["milan.py"] + SMOKE + ["--blr=-1e-4", "--output_dir", tmp_path / "out"],
        "nothing to draw": ["milan.py"] + SMOKE + ["--data", tmp_path / "unreadable", "--visualize", "2",
                                                   "--output_dir", tmp_path / "out"],
        "bench": ["benchmarks/bench.py", "--steps", "0"], "loader": ["benchmarks/loader.py", "--images", "0"],
        "bench help": ["benchmarks/bench.py", "--help"], "loader help": ["benchmarks/loader.py", "--help"],
        "finetune help": ["finetune.py", "--help"]})
    line = error_line(runs["16 px"])  # it said "leave 1 to 0 of the 1 patches visible"
    assert "--input_size" in line and "1 patch" in line and "0 of" not in line, line
    assert "--blr=-1e-4" in error_line(runs["negative"])  # it said only "expected one argument"
    assert "argument --blr: -1e-4 is outside (0, inf)" in error_line(runs["negative, = form"])
    assert "--data" in error_line(runs["nothing to draw"]) and "Traceback" not in runs["nothing to draw"][2]
    assert "--steps: 0 is outside" in error_line(runs["bench"]) and "--images: 0 is outside" in error_line(runs["loader"])
    for name, defaults in (("bench help", ["(default: 8)", "(default: 5)"]), ("loader help", ["(default: 768)"])):
        assert all(d in " ".join(runs[name][1].split()) for d in defaults), runs[name][1]
    ft = " ".join(runs["finetune help"][1].split()).split("options:")[1]  # (after the usage lines)
    data = ft[ft.index("--data DATA"):ft.index("--fake_size")]
    assert "DIR/val/<class>" in data and "DIR/<class>" not in data, data  # it offered a layout it refuses
    workers = ft[ft.index("--num_workers"):ft.index("--amp")]
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert "minus one" in workers and "at most 10" in workers and "cores per process, minus one, at most 10" in readme


def test_under_torchrun_an_error_is_one_line(tmp_path):
    """Every rank printed the error line (8 copies on a node of 8): now each node's local rank 0 does (one line in each
    node's log; tests/test_multinode.py has two nodes), at parse time and after the process group."""
    for flags in (["--blr", "-1e-4"], FAST + ["--accum_iter", "8", "--output_dir", tmp_path]):
        proc = run_script("milan.py", SMOKE + flags if flags[0] == "--blr" else flags, nproc=2, timeout=120)
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]


def test_finetune_eval_says_whose_classes_and_why_a_timm_head_is_not_evaluated(tmp_path, capsys):
    """--eval on val classes the checkpoint was not trained on said "train" (there is no train split in --eval); a timm
    export that holds a trained head was refused as holding "no trained head"."""
    import finetune
    tiny_pngs(tmp_path / "data" / "train", 4)
    tiny_pngs(tmp_path / "data" / "val", 2, ("a", "b", "c"))
    torch.save(common.build_vit("vit_nano_patch16").state_dict(), tmp_path / "random.pth")
    base = ["--data", str(tmp_path / "data"), "--batch_size", "4", "--num_workers", "0", "--input_size", "32"]
    with pytest.raises(SystemExit):  # train's classes are a, b: val's c is refused, naming train
        common.cli(finetune.main, base + ["--finetune", str(tmp_path / "random.pth"), "--mode", "linprobe", "--epochs",
                                          "1", "--output_dir", str(tmp_path / "lp")])
    assert "not among train's 2 classes" in capsys.readouterr().err
    (tmp_path / "data" / "train" / "c").mkdir()  # now train has c: a probe trained on a, b, c
    tiny_pngs(tmp_path / "data" / "train", 4, ("c",))
    common.cli(finetune.main, base + ["--finetune", str(tmp_path / "random.pth"), "--mode", "linprobe", "--epochs", "1",
                                      "--output_dir", str(tmp_path / "lp")])
    tiny_pngs(tmp_path / "data" / "val", 2, ("d",))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # --eval: the classes are the checkpoint's
        common.cli(finetune.main, base + ["--finetune", str(tmp_path / "lp" / "checkpoint-last.pth"), "--eval"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "d" in err and "not among the checkpoint's 3 classes" in err and "train" not in err, err
    head = dict(common.build_vit("vit_nano_patch16").state_dict(), **{"head.weight": torch.zeros(3, 64),
                                                                       "head.bias": torch.zeros(3)})
    torch.save(head, tmp_path / "timm_with_head.pth")
    with pytest.raises(SystemExit) as e:
        common.cli(finetune.main, base + ["--finetune", str(tmp_path / "timm_with_head.pth"), "--eval"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "classifier head" in err and "no trained head" not in err, err


def test_learn_names_its_own_flag_when_the_data_is_too_small(tmp_path, monkeypatch):
    """learn.py with 20 train images: the probe's batch of 128 failed minutes in, naming finetune.py's --batch_size;
    a pre-training batch of 16 leaves MILAN (accum_iter 2) one step. Both refused at the start, by learn.py's flag."""
    monkeypatch.setattr(learn, "make_dataset", lambda *a: pytest.fail("the run started"))
    small = ["--out", str(tmp_path / "w"), "--classes", "2", "--train_per_class", "10"]
    with pytest.raises(learn.UserError, match="--probe_batch 128"):
        learn.main(small)
    with pytest.raises(learn.UserError, match="--batch_size 16"):
        learn.main(small + ["--probe_batch", "8", "--batch_size", "16"])
    assert not (tmp_path / "w").exists()


def test_pictures_draw_names_in_ascii_and_say_what_mr_maes_map_holds(tmp_path):
    """PIL's default font has ASCII glyphs only: "café" was drawn "caf" + a box. Accents are dropped, other characters
    written \\uXXXX. MR-MAE's loss map holds L_R on masked and L_M on visible patches: the picture and its line say so."""
    def drawn(text):
        im = Image.new("L", (200, 16), 255)
        common.draw_text(ImageDraw.Draw(im), (2, 2), text, fill=0)
        return np.asarray(im)
    assert np.array_equal(drawn("café crème"), drawn("cafe creme"))
    assert np.array_equal(drawn("猫"), drawn("\\u732b"))
    runs = run_forked({m: [m] + SMOKE + ["--visualize", "2", "--output_dir", tmp_path / m]
                       for m in ("mr_mae.py", "milan.py")})
    assert all(code == 0 for code, _, _ in runs.values()), {k: v[2][-1500:] for k, v in runs.items()}
    said = runs["mr_mae.py"][1]
    assert re.search(r"L_R on the masked patches, L_M on the visible ones", said), said
    assert "L_R" not in runs["milan.py"][1]
    sizes = {m: Image.open(tmp_path / m / "visualize.png").size for m in runs}
    assert sizes["mr_mae.py"][1] == sizes["milan.py"][1] + 12  # a line more, for the note
