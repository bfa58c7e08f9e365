"""The cost structure the papers claim, counted with torch.utils.flop_counter (deterministic: FLOPs, not time)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import milan
from conftest import images


def flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_encoder_processes_only_the_visible_tokens():
    """At mask ratio 0.75 the encoder costs at most 0.3x its cost on all 196 patches (49 + CLS of 197 tokens)."""
    vit, x = common.build_vit("vit_base_patch16").to("meta"), torch.empty(2, 3, 224, 224, device="meta")
    ids_keep = torch.arange(49, device="meta").expand(2, -1)
    full, masked = flops(lambda: vit(x)), flops(lambda: vit(x, ids_keep))
    assert masked <= 0.3 * full
    assert masked >= 0.2 * full  # and it does process them: 50 / 197 tokens of the linear layers


def test_teacher_forward_records_no_autograd_graph(tiny_teacher):
    x = images(2).requires_grad_()
    out = tiny_teacher(x, tokens=True, hidden=True, cls_attn=True)
    for t in [out["tokens"], out["cls_attn"], *out["hidden"]]:
        assert t.grad_fn is None and not t.requires_grad


def decoder_flops(decoder, ids_keep, ids_mask):
    model = milan.MILAN(common.build_vit("vit_base_patch16"), 512, decoder=decoder).to("meta")  # 512 wide, 8 deep, 16 heads
    latent = torch.empty(1, 50, 768, device="meta")
    return flops(lambda: model.forward_decoder(latent, ids_keep, ids_mask))


def test_prompting_decoder_is_about_20_percent_cheaper_than_maes():
    """MILAN Sec. 2.3: at 75% masking the prompting decoder (queries = the 147 masked tokens only, keys and
    values = prompts + mask tokens) costs ~20% less than MAE's decoder (all 197 tokens in every block)."""
    mask = torch.zeros(1, 196, dtype=torch.bool)
    mask[:, 49:] = True
    ids_keep, ids_mask = common.ids_from_mask(mask, 49)
    ids_keep, ids_mask = ids_keep.to("meta"), ids_mask.to("meta")
    ratio = decoder_flops("prompting", ids_keep, ids_mask) / decoder_flops("mae", ids_keep, ids_mask)
    assert 0.72 <= ratio <= 0.88, ratio


def test_loader_compares_with_the_mae_reference_on_the_same_files(tmp_path):
    """benchmarks/loader.py at a tiny size: for each JPEG set and transform a record of the MAE reference pipeline and
    one of ours, with the keys the input-path table reads; the long-tailed set reports the reduced-scale decode's
    pixel error."""
    from conftest import run_script
    import json
    proc = run_script("benchmarks/loader.py", ["--images", 24, "--epochs", 1, "--workers", 1, "--batch_size", 4,
                                               "--transforms", "milan", "--json", tmp_path / "l.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads((tmp_path / "l.json").read_text())
    timed = [r for r in recs if "images_per_s" in r]
    assert sorted((r["sizes"], r["pipeline"]) for r in timed) == [("500x375", "mae_reference"), ("500x375", "ours"),
                                                                 ("long_tail", "mae_reference"), ("long_tail", "ours")]
    keys = {"pipeline", "transform", "sizes", "images_per_s", "cpu_ms_per_image", "workers", "projected_12_cores"}
    assert all(keys <= set(r) and r["cpu_ms_per_image"] > 0 for r in timed)
    draft = next(r for r in recs if "draft_mean_abs_error_levels" in r)
    assert draft["sizes"] == "long_tail" and 0 <= draft["draft_mean_abs_error_levels"] < 3
