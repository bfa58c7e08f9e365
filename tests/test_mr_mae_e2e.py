"""mr_mae.py as a user runs it: smoke runs with the plain ViT and with the masked convolution stages."""
import json
from argparse import Namespace

import pytest
import torch

import common
import mr_mae
from conftest import SMOKE, images, run_script


@pytest.mark.parametrize("arch,fake_size", [("vit", 64), ("convvit_nano", 32)])
def test_smoke_run_writes_checkpoint_and_log(arch, fake_size, tmp_path):
    proc = run_script("mr_mae.py", SMOKE + ["--arch", arch, "--fake_size", fake_size, "--output_dir", tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "step", "rng", "progress", "args", "method"}
    assert ckpt["method"] == "mr_mae" and (ckpt["epoch"], ckpt["step"]) == (1, 0)
    args = ckpt["args"]
    assert args["arch"] == arch and args["fusion_layers"] == [1, 2] and args["focus"] == "attention"
    assert (args["decoder_dim"], args["decoder_depth"], args["decoder_heads"]) == (64, 2, 2)  # nano decoder
    assert args["warmup_epochs"] == 80 and args["blr"] == 1.5e-4 and args["norm_pix_loss"] is True
    sd = ckpt["model"]
    assert sd["mimic_head.weight"].shape == (32, 64) and sd["decoder_pred.weight"].shape == (768, 64)  # tiny C = 32
    assert not any("teacher" in k for k in sd)
    assert ckpt["optimizer"]["state"][0]["step"].item() == fake_size // 8  # one update per batch of 8
    # what finetune.py does: rebuild the encoder from the checkpoint's args and load model.encoder.* strictly
    enc = mr_mae.build_encoder(Namespace(**args))
    enc.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}, strict=True)
    assert isinstance(enc, mr_mae.ConvViT if arch != "vit" else common.ViT)
    assert enc.eval()(images(1)).shape == (1, 197, 64)
    stats = json.loads((tmp_path / "log.txt").read_text())
    # at init L_R ~ 767 per patch (sum of 768 unit-variance values), L_M small: 0.5 L_R + 0.5 L_M ~ 400-500
    assert stats["epoch"] == 0 and 300.0 < stats["train_loss"] < 1000.0


def test_fusion_layers_without_the_last_block_give_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(mr_mae.main, SMOKE + ["--fusion_layers", "1", "--output_dir", str(tmp_path)])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1 and "--fusion_layers" in err[0]
