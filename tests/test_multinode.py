"""Several nodes: two torchrun launchers on localhost act as two nodes of one process each (gloo)."""
import os
import socket
import subprocess

import pytest
import torch

from conftest import ROOT, SMOKE, python

FLAGS = SMOKE + ["--fake_size", "32", "--epochs", "2", "--batch_size", "4", "--accum_iter", "1",
                 "--save_every_steps", "2"]  # 4 steps of 4 per rank per epoch; a mid-epoch checkpoint at step 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(node_args, env=None):
    """One torchrun launcher per node, as a cluster's job script starts them: `--nnodes 2 --node_rank i` and node
    0's address (static rendezvous, so that node 0 is always rank 0). node_args: the script's flags per node.
    Returns the started processes."""
    port, procs = free_port(), []
    for node, argv in enumerate(node_args):
        cmd = python("-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                     "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "--no-python",
                     *python("tests/preempt.py", *argv))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))))
    return procs


def finish(procs, timeout=240):
    """(exit code, stdout, stderr) of each launcher; a hang kills them all (the fork server's supervisor then kills
    the launcher's process group) and fails the test."""
    try:
        return [(p.wait(timeout=timeout), p.stdout.read(), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def params(folder):
    return [torch.load(folder / f"rank{r}.pth", weights_only=True) for r in (0, 1)]


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_killed_and_resumed_equal_an_uninterrupted_run(tmp_path):
    whole, cut, empty = tmp_path / "whole", tmp_path / "cut", tmp_path / "empty"
    for d in (whole, cut, empty):
        d.mkdir()
    runs = [launch([["milan.py"] + FLAGS + ["--output_dir", whole]] * 2, {"PARAMS_DIR": str(whole)}),
            launch([["milan.py"] + FLAGS + ["--output_dir", cut]] * 2, {"PREEMPT_AT_STEP": "2"})]
    (w0, w1), (k0, k1) = (finish(r) for r in runs)
    assert w0[0] == 0 and w1[0] == 0, (w0[2] + w1[2])[-3000:]
    assert k0[0] != 0 and k1[0] != 0  # both nodes lost their process
    mid = torch.load(cut / "checkpoint-last.pth.at-kill", weights_only=True)
    assert (mid["epoch"], mid["step"]) == (0, 2) and len(mid["rng"]) == 2
    assert not torch.equal(mid["rng"][0]["torch"], mid["rng"][1]["torch"])  # each rank's own RNG state
    # relaunch both with --resume auto; node 1's --output_dir is empty, yet it resumes rank 0's checkpoint (node 1
    # alone would start fresh); and, at the same time, a pair of nodes whose datasets differ in size is refused
    resumed = launch([["milan.py"] + FLAGS + ["--output_dir", cut, "--resume", "auto"],
                      ["milan.py"] + FLAGS + ["--output_dir", empty, "--resume", "auto"]], {"PARAMS_DIR": str(cut)})
    odd = launch([["milan.py"] + FLAGS + ["--output_dir", tmp_path / "odd"],
                  ["milan.py"] + FLAGS + ["--output_dir", tmp_path / "odd", "--fake_size", "40"]])
    (r0, r1), (o0, o1) = finish(resumed), finish(odd)
    assert r0[0] == 0 and r1[0] == 0, (r0[2] + r1[2])[-3000:]
    assert "resumed from" in r0[1] and "epoch 0, step 2" in r0[1]
    (a0, a1), (b0, b1) = params(whole), params(cut)
    assert_same(a0, a1), assert_same(b0, b1)  # both ranks hold the same parameters
    assert_same(a0, b0)  # and the interrupted run ends bit-identical to the uninterrupted one
    a, b = (torch.load(d / "checkpoint-last.pth", weights_only=True) for d in (whole, cut))
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same(s_a, s_b)
    for code, _, err in (o0, o1):  # every rank stops with the same line instead of hanging
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert code != 0 and lines == ["error: --data fake: rank 1 sees 40 images, rank 0 32; every node needs the "
                                       "same dataset at the same path"], err[-3000:]


def test_num_workers_share_this_nodes_cores(monkeypatch):
    """The default --num_workers divides this node's cores by this node's processes (LOCAL_WORLD_SIZE), not by all."""
    import common
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    for local, workers in ((8, 10), (16, 5), (96, 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        args = common.get_parser("x").parse_args(["--data", "fake", "--mask_ratio", "0.75"])
        common.setup(args)  # one process here (no WORLD_SIZE): no process group
        assert args.num_workers == workers, local


def test_a_rank_that_cannot_read_rank_0s_checkpoint_stops_every_rank(monkeypatch, tmp_path):
    """An output dir that is not shared: rank 0 resumes from a file that rank 1 cannot see. Rank 1 takes rank 0's
    choice (it does not start fresh from its own empty folder) and the problem reaches every rank (the all-gather),
    so no rank waits for another in a collective."""
    import argparse
    import common
    monkeypatch.setattr(common.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(common.dist, "broadcast_object_list", lambda box, src: box.__setitem__(0, "/node0/ckpt.pth"))
    gathered = []
    monkeypatch.setattr(common.dist, "all_gather_object", lambda out, obj: (gathered.append(obj), out.__setitem__(
        slice(None), [None, obj]))[-1])  # rank 0 had no problem; this is rank 1
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path), rank=1)
    with pytest.raises(common.UserError, match="rank 1 cannot read /node0/ckpt.pth.*--output_dir"):
        common.resume_path(args)
    assert gathered and gathered[0].startswith("--resume: rank 1")  # the message went to the other ranks
