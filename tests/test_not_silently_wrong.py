"""Not silently wrong: unreadable files counted once, whatever the batch; a checkpoint rebuilds the network it trained
(CAE v2's ViT-T heads); 16-bit images decode to their 8-bit values; an epoch too short for --accum_iter is refused;
a resume names the flags that differ and refuses those that change what is trained; sizes that cannot work are
refused at the start."""
import json
import os

import numpy as np
from PIL import Image

from conftest import SMOKE, run_forked
from test_nothing_lost import error_line, tiny_pngs


def test_unreadable_files_are_counted_once_whatever_the_batch(tmp_path):
    """403 files, 3 unreadable in a row (a/100-102 in ImageFolder's order; 0.74%). A bad file's stand-in is the next
    index, itself bad here: each attempt was counted, so one bad file counted up to 3 times and batch 7 stopped the run
    ("6 of 399 (over 1%)") where batch 50 went through. Now: both train, unreadable_images 3, each file named once."""
    tiny_pngs(tmp_path / "data", 201, ("a",))
    tiny_pngs(tmp_path / "data", 202, ("b",), seed=1)
    for i in (100, 101, 102):
        (tmp_path / "data" / "a" / f"{i:03d}.png").write_bytes(b"not an image")
    runs = run_forked({b: ["milan.py"] + SMOKE + ["--data", tmp_path / "data", "--input_size", "32", "--batch_size", b,
                                                  "--log_every", "1", "--output_dir", tmp_path / f"out{b}"]
                       for b in ("7", "50")})
    for b, (code, _, err) in runs.items():
        assert code == 0, (b, err[-2000:])
        assert json.loads((tmp_path / f"out{b}" / "log.txt").read_text())["unreadable_images"] == 3, b
        assert [err.count(f"a/{i}.png") for i in (100, 101, 102)] == [1, 1, 1], (b, err[-2000:])
