"""The papers' headline ablation arms as a user runs them: each trains on the smoke flags, says what it is in its
start line, is saved in the checkpoint's args, draws its pictures, and its encoder passes through finetune.py and
--export_timm; every ablation command the README lists parses."""
import importlib
import json
import math
import os
import re
import shlex

import pytest
import torch

import common
import finetune
from conftest import ROOT, SMOKE

ARMS = {  # id: (method file, flags, what its start line must say)
    "milan mae decoder, pixels, random (Table 5 #1)": (
        "milan", ["--decoder", "mae", "--target", "pixel", "--mask_type", "random"],
        "targets: normalised pixels, MSE on the masked patches; MAE's decoder; random masking"),
    "milan mae decoder, clip (Table 5 #2)": (
        "milan", ["--decoder", "mae", "--mask_type", "random"],
        "Eq. 1 on all patches; MAE's decoder; random masking"),
    "milan prompting decoder, pixels (Table 5 #5)": (
        "milan", ["--target", "pixel"], "(teacher tiny (none) for the sampling); prompting decoder; semantic aware"),
    "cae clip target (CAE v2 Table 1 No. 1)": (
        "cae", ["--target", "clip"], "targets: teacher tiny (none) features, cosine distance"),
    "cae_v2 mse (Table 3)": ("cae_v2", ["--loss", "mse"], "mse distance (l_v + l_z)"),
    "cae_v2 smooth_l1 (Table 3)": ("cae_v2", ["--loss", "smooth_l1"], "smooth_l1 distance (l_v + l_z)"),
    "mr_mae reconstruct both (Table 3 row 5)": (
        "mr_mae", ["--high_level", "reconstruct"], "reconstructed at the masked patches by the decoder"),
}
ARM_FLAG = {"milan": ("target", "decoder", "mask_type"), "cae": ("target",), "cae_v2": ("loss",), "mr_mae": ("high_level",)}


@pytest.mark.parametrize("arm", ARMS)
def test_arm_trains_announces_itself_and_passes_through_finetune_and_the_export(arm, tmp_path, capsys):
    method, flags, says = ARMS[arm]
    module = importlib.import_module(method)
    module.main(SMOKE + ["--fake_size", "16", *flags, "--output_dir", str(tmp_path / "run")])
    start = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"{method}: "))
    assert says in start, start
    ckpt = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    given = dict(zip(flags[::2], flags[1::2]))
    for name in ARM_FLAG[method]:  # the arm is in the checkpoint's args, where finetune.py and a resume read it
        assert ckpt["args"][name] == given.get(f"--{name}", ckpt["args"][name]), name
    assert all(ckpt["args"][k[2:]] == v for k, v in given.items())
    assert math.isfinite(json.loads((tmp_path / "run" / "log.txt").read_text())["train_loss"])
    # its pictures: the run's model, the arm's forward_step with per-patch losses
    module.main(SMOKE + ["--fake_size", "16", *flags, "--output_dir", str(tmp_path / "run"), "--resume", "auto",
                         "--visualize", "2"])
    assert (tmp_path / "run" / "visualize.png").stat().st_size > 0
    # finetune.py loads its encoder (every tensor), the export writes it with timm's keys
    finetune.main(["--data", "fake", "--finetune", str(tmp_path / "run" / "checkpoint-last.pth"), "--export_timm",
                   str(tmp_path / "timm.pth")])
    timm_sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    encoder = {k[len("encoder."):]: t for k, t in ckpt["model"].items() if k.startswith("encoder.")}
    assert set(timm_sd) == set(encoder) and all(torch.equal(timm_sd[k], t) for k, t in encoder.items())


# ---- The README's "Paper ablations": every command there parses -------------------------------------------------
PAPERS = {"MILAN": "milan", "CAE": "cae", "CAE v2": "cae_v2", "MR-MAE": "mr_mae", "MaskAlign": "mask_align"}


def readme_ablation_commands():
    """(script, argv) for every `...` span of the README's "Paper ablations" bullets: a span that starts with a script
    name runs that script, a span of flags runs the bullet's paper's file."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Paper ablations")[1].split("\n## ")[0]
    out = []
    for bullet in re.split(r"\n- ", section)[1:]:
        paper = re.match(r"\*\*([^*]+)\*\*", bullet).group(1)
        for span in re.findall(r"`([^`]+)`", bullet):
            words = shlex.split(span)
            script = words[0][:-3] if words[0].endswith(".py") else PAPERS[paper]
            out.append((paper, script, words[1:] if words[0].endswith(".py") else words))
    return out


def test_readme_ablation_commands_parse():
    commands = readme_ablation_commands()
    assert len(commands) > 40 and {p for p, _, _ in commands} == set(PAPERS)  # every paper, every row
    for paper, script, argv in commands:
        module = importlib.import_module(script)
        required = ["--finetune", "CKPT"] if script == "finetune" else []
        args = module.get_args(["--data", "fake", *required, *argv])  # a wrong flag or value: argparse's error, exit 2
        if script != "finetune":
            args.device = "cpu"
            common.num_visible(196, args.mask_ratio, allow_zero=script == "mask_align")  # the ratio is a valid one
