"""Shared test helpers: the repo root on sys.path, the README's smoke flags, a subprocess runner."""
import atexit
import os
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the README's smoke run: tiny model, random tiny teacher, no downloads
SMOKE = ["--data", "fake", "--model", "vit_nano_patch16", "--teacher", "tiny", "--teacher_weights", "none",
         "--epochs", "1", "--batch_size", "8", "--num_workers", "0"]


# tests/forkserver.py: imports torch once; every script the tests run is then a fork of it, through
# tests/forkclient.py. Its socket is named here, before any test copies os.environ for a child, and it starts on
# first use.
_sock = os.path.join(tempfile.mkdtemp(prefix="mimlab-"), "forkserver.sock")
os.environ["MIMLAB_FORKSERVER"] = _sock if len(_sock) < 100 else os.path.join(  # (a socket path has at most 107 bytes)
    tempfile.mkdtemp(prefix="mimlab-", dir="/tmp"), "forkserver.sock")
_server, _server_lock = [], threading.Lock()


def forkserver():
    """Start tests/forkserver.py once per session (thread-safe); -> the command line of its client."""
    with _server_lock:
        if not _server or _server[0].poll() is not None:
            env = dict(os.environ)
            if os.path.exists(env["MIMLAB_FORKSERVER"]):
                os.remove(env["MIMLAB_FORKSERVER"])
            server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py"),
                                       env["MIMLAB_FORKSERVER"]], cwd=ROOT, stdout=subprocess.PIPE, env=env)
            assert server.stdout.readline() == b"ready\n", "tests/forkserver.py did not start"
            atexit.register(server.kill)
            _server[:] = [server]
    return [sys.executable, os.path.join(ROOT, "tests", "forkclient.py")]


def python(*argv):
    """The command line of `python ARGV...` as the tests start it: through the fork server (the interpreter
    start-up paid once per session)."""
    return forkserver() + [str(a) for a in argv]


def run_script(script, args, nproc=None, timeout=240, env=None):
    """Run a method file as a user would (python or torchrun); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))  # (MIMLAB_FORKSERVER included)
    if nproc:  # two ranks on two cores: one thread each; each worker through the fork server as well
        env["OMP_NUM_THREADS"] = "1"
        cmd = python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--no-python",
                     *python(script))
    else:
        cmd = python(script)
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_forked(cases, timeout=240):
    """Many `python SCRIPT ARGS...` runs, in order, each its own process (through the fork server), one thread each.
    cases: {name: [script, args...] or ([script, args...], {env})} -> {name: (exit code, stdout, stderr)}."""
    out = {}
    for name, c in cases.items():
        argv, env = (c if isinstance(c, tuple) else (c, {}))
        p = subprocess.run(python(*argv), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, OMP_NUM_THREADS="1", **env))
        out[name] = (p.returncode, p.stdout, p.stderr)
    return out


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
