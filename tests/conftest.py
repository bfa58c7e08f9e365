"""Shared test helpers: the repo root on sys.path, the README's smoke flags, a subprocess runner."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the README's smoke run: tiny model, random tiny teacher, no downloads
SMOKE = ["--data", "fake", "--model", "vit_nano_patch16", "--teacher", "tiny", "--teacher_weights", "none",
         "--epochs", "1", "--batch_size", "8", "--num_workers", "0"]


def run_script(script, args, nproc=None, timeout=240, env=None):
    """Run a method file as a user would (python or torchrun); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if nproc:  # two ranks on two cores: one thread each
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_forked(cases, timeout=240):
    """Many `python SCRIPT ARGS...` runs, each its own process, sharing one start-up (tests/forkrun.py).
    cases: {name: [script, args...] or ([script, args...], {env})}, run in order -> {name: (exit code, stdout,
    stderr)}."""
    import json
    cases = {name: {"argv": [str(a) for a in (c[0] if isinstance(c, tuple) else c)],
                    "env": c[1] if isinstance(c, tuple) else {}} for name, c in cases.items()}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "forkrun.py")], input=json.dumps(cases),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: tuple(r) for name, r in json.loads(proc.stdout).items()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_teacher():
    import common
    return common.Teacher("tiny", "none", grid=14)


def images(batch=2, size=224, seed=0):
    """ImageNet-normalised-looking random images [B, 3, size, size]."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
