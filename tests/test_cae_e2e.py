"""cae.py and cae_v2.py as a user runs them: smoke runs (pixel under torchrun, DALL-E, CAE v2), bad input."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import cae
import common
from conftest import SMOKE, run_script

RUNS = {  # name: (script, extra flags, processes); small --fake_size keeps each run to 2-4 steps
    "pixel": ("cae.py", ["--target", "pixel", "--fake_size", "32"], 2),  # the torchrun --nproc_per_node=2 run
    "dalle": ("cae.py", ["--fake_size", "16"], None),  # the README's smoke flags alone: a narrow random tokenizer
    "v2": ("cae_v2.py", ["--fake_size", "32"], None),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three runs, started together (they mostly wait on imports); name -> (output dir, process)."""
    outs = {name: tmp_path_factory.mktemp(name) for name in RUNS}
    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(len(RUNS)) as pool:
        mp.setenv("OMP_NUM_THREADS", "1")  # side by side on few cores: one thread each
        procs = {name: pool.submit(run_script, script, SMOKE + flags + ["--output_dir", outs[name]], nproc=nproc)
                 for name, (script, flags, nproc) in RUNS.items()}
        return {name: (outs[name], p.result()) for name, p in procs.items()}


def finished(runs, name, method, steps):
    out, proc = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)  # no pickled objects
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "step", "rng", "progress", "args", "method"}
    assert ckpt["method"] == method and (ckpt["epoch"], ckpt["step"]) == (1, 0) and isinstance(ckpt["args"], dict)
    assert ckpt["optimizer"]["state"][0]["step"].item() == steps
    assert (out / "checkpoint-0.pth").exists()
    stats = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(stats) == 1 and stats[0]["epoch"] == 0
    return ckpt, stats[0]["train_loss"], proc


def test_cae_pixel_target_trains_with_no_tokenizer_under_torchrun(runs):
    ckpt, loss, proc = finished(runs, "pixel", "cae", steps=2)  # 32 images / 2 ranks / batch 8
    assert ckpt["args"]["world_size"] == 2
    model = ckpt["model"]
    assert model["decoder_pred.weight"].shape == (16 * 16 * 3, 64)  # normalised pixels of a 16 x 16 patch
    assert model["encoder.blocks.0.ls1.gamma"].shape == (64,) and "regressor.blocks.3.norm_k.weight" in model
    assert not any(k.startswith(("blocks.", "tokenizer")) for k in model)  # no tokenizer weights
    assert ckpt["args"]["target"] == "pixel" and ckpt["args"]["mask_ratio"] == 0.5
    assert "DALL-E" not in proc.stderr
    assert 1.0 < loss < 20.0  # MSE of unit-variance pixels + 2 x MSE of layer-normed latents


def test_cae_dalle_target_with_a_random_tokenizer(runs):
    ckpt, loss, proc = finished(runs, "dalle", "cae", steps=2)
    assert ckpt["model"]["decoder_pred.weight"].shape == (8192, 64)  # logits over the dVAE vocabulary
    assert ckpt["args"]["dalle_weights"] == "none" and "random weights (--dalle_weights none)" in proc.stderr
    assert ckpt["args"]["target"] == "dalle" and ckpt["args"]["dalle_n_hid"] == 16
    assert 8.0 < loss < 25.0  # cross-entropy starts near ln 8192 = 9.0, plus 2 x the alignment MSE


def test_cae_v2_smoke_run(runs):
    ckpt, loss, _ = finished(runs, "v2", "cae_v2", steps=4)
    model = ckpt["model"]
    assert model["head.fc.weight"].shape == (32, 64) and model["head.norm.weight"].shape == (32,)  # tiny CLIP dim 32
    assert not any(k.startswith(("decoder", "teacher")) for k in model)  # no decoder, teacher not saved
    assert sum(k.startswith("regressor.blocks.") and k.endswith("norm_q.weight") for k in model) == 1  # depth 1
    assert ckpt["args"]["mask_ratio"] == 0.5 and tuple(ckpt["args"]["betas"]) == (0.9, 0.98)
    assert 0.0 < loss <= 4.0  # Eq. 2: two mean cosine distances, each in [0, 2]


@pytest.mark.parametrize("flags", [["--teacher_weights", "openai"], ["--dalle_weights", "missing.pkl"]])
def test_dalle_weights_missing_gives_one_clear_line(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(cae.main, SMOKE + ["--output_dir", str(tmp_path)] + flags)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "--dalle_weights" in lines[0] and "encoder.pkl" in lines[0]
    assert not (tmp_path / "checkpoint-last.pth").exists()
