"""Nothing hung: an unexpected error ends the run and its DataLoader workers within seconds (one process and under
torchrun), and an image PIL refuses as a decompression bomb is an unreadable image like any other."""
import json
import os
import re
import subprocess
import time

import numpy as np
from PIL import Image

from conftest import ROOT, SMOKE, python, run_forked, run_script
from test_operations import FAST

FAILS = FAST + ["--epochs", "2", "--accum_iter", "1"]  # 4 updates an epoch; tests/preempt.py raises after update 2


def group_alive(pgid):
    """The processes of process group pgid that still run (zombies excluded): the script and its DataLoader workers."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            alive.append(int(pid))
    return alive


def failure(err):
    """(time, pid) of tests/preempt.py's injected RuntimeError in a stderr."""
    t, pid = re.search(r"RuntimeError: injected failure at ([\d.]+) in pid (\d+)", err).groups()
    return float(t), int(pid)


def test_an_unexpected_error_with_workers_ends_the_run_within_seconds(tmp_path):
    """A RuntimeError raised in training (as a CUDA out-of-memory would be) with 2 DataLoader workers: its traceback, exit
    1, within 10 s of the error, and no worker left (they ignore SIGTERM: the interpreter's exit waited on them forever)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RAISE_AT_UPDATE="2")
    proc = subprocess.run(python("tests/preempt.py", "milan.py", *FAILS, "--num_workers", "2", "--output_dir", tmp_path),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    ended = time.time()
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    failed_at, pid = failure(proc.stderr)
    assert ended - failed_at < 10, ended - failed_at
    deadline = time.time() + 3
    while group_alive(pid) and time.time() < deadline:  # (killed workers may take a moment to go)
        time.sleep(0.1)
    assert group_alive(pid) == []



def test_an_unexpected_error_on_one_rank_ends_torchrun_within_seconds(tmp_path):
    """Under torchrun (2 processes, a worker each) rank 0 fails after update 2: rank 0 prints the traceback, rank 1 stops
    with its own error (its peer is gone), torchrun exits non-zero within 10 s of the failure."""
    proc = run_script("tests/preempt.py", ["milan.py"] + FAILS + ["--batch_size", "4", "--num_workers", "1",
                                                                  "--output_dir", tmp_path], nproc=2, timeout=60,
                      env={"RAISE_AT_UPDATE": "2", "RAISE_RANK": "0"})
    ended = time.time()
    assert proc.returncode != 0 and proc.stderr.count("RuntimeError: injected failure") == 1, proc.stderr[-3000:]
    assert ended - failure(proc.stderr)[0] < 10


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path):
    """A PNG of 14,000 x 14,000 pixels (over twice PIL's MAX_IMAGE_PIXELS: Image.open raises DecompressionBombError, not
    an OSError) among 200 readable ones: named once, counted, skipped; the run trains (it was a traceback)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "data" / c)
        for i in range(100):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i:03d}.png")
    Image.new("1", (14000, 14000)).save(tmp_path / "data" / "a" / "bomb.png")  # 24 MB in memory, a few KB as a file
    run = run_forked({"train": ["milan.py"] + SMOKE + ["--data", tmp_path / "data", "--input_size", "32",
                                                       "--output_dir", tmp_path / "out"]})["train"]
    code, _, err = run
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert err.count("bomb.png") == 1 and "DecompressionBombError" in err
    assert json.loads((tmp_path / "out" / "log.txt").read_text())["unreadable_images"] == 1
