"""benchmarks/ablate.py: every arm of its tables runs on the smoke flags, the claims' verdict rule, and a reduced table
end to end (two arms, one seed, a few steps) for the harness and its records: not the verdicts, which need the full
run (benchmarks/README.md)."""
import importlib
import json
import math
import os
import sys

import pytest
import torch

import common
from conftest import ROOT, SMOKE, python

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ablate  # noqa: E402
import learn  # noqa: E402

RECORD = {"table", "arm", "seed", "script", "flags", "run", "probe_top1", "teacher_r2", "colour_r2", "pretrain_s",
          "final_pretrain_loss"}


def test_list_names_every_arm_and_cae_fig4(capsys):
    ablate.main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    arms = [(t, arm) for t, spec in ablate.TABLES.items() for arm in spec["arms"]]
    assert len(lines) == len(arms) + 1 and lines[-1].startswith("cae_fig4") and "learn.py --cae_fig4" in lines[-1]
    for line, (t, arm) in zip(lines, arms):
        script, flags = ablate.TABLES[t]["arms"][arm][:2]
        assert line.split()[:3] == [t, arm, f"{script}.py"] and line.split()[3:] == flags
    for t in ("milan_t5", "cae_t2", "cae_v2_t1", "cae_v2_fig3", "mr_mae_t3", "mask_align_t4", "mask_align_t6"):
        assert t in ablate.TABLES  # the tables
    for t, spec in ablate.TABLES.items():  # every claim names two arms of its table
        assert all(a in spec["arms"] and b in spec["arms"] and a != b for a, b in spec["claims"]), t


def test_each_arm_trains_a_smoke_epoch_at_the_runs_grid(tmp_path, capsys):
    """Every arm's method file and flags, on the smoke flags at learn.py's 112 px (7 x 7 patches): a finite loss. (An arm's
    own run length, MaskAlign's equal-token protocol, is left out: one smoke epoch each.)"""
    def smoke(flags):
        return tuple(x for i, x in enumerate(flags) if "--epochs" not in flags[i - 1:i + 1] and
                     "--warmup_epochs" not in flags[i - 1:i + 1])
    arms = {(script, smoke(flags)) for spec in ablate.TABLES.values() for script, flags, _ in spec["arms"].values()}
    for i, (script, flags) in enumerate(sorted(arms)):
        importlib.import_module(script).main(SMOKE + ["--fake_size", "16", "--input_size", "112", *flags,
                                                      "--output_dir", str(tmp_path / str(i))])
        log = json.loads((tmp_path / str(i) / "log.txt").read_text())
        assert math.isfinite(log["train_loss"]) and log["train_loss"] > 0, (script, flags)


def test_verdict_rule():
    """holds: the paper's direction by more than 2 standard errors (sqrt(sd_a^2/n_a + sd_b^2/n_b)); reversed: the other
    way by as much; else unresolved."""
    def verdict(a, b):
        records = [dict(table="mask_align_t6", arm=arm, probe_top1=v) for arm, vs in (("ln", a), ("bn", b)) for v in vs]
        return next(c for c in ablate.claims(records) if (c["better"], c["worse"]) == ("ln", "bn"))
    c = verdict([30.0, 32.0, 34.0], [20.0, 21.0, 22.0])  # delta 11.5, se sqrt(4/3 + 1/3) = 1.29
    assert (c["mean_delta"], c["se"], c["verdict"], c["paper_delta"]) == (11.0, 1.29, "holds", 0.6)
    assert verdict([20.0, 21.0, 22.0], [30.0, 32.0, 34.0])["verdict"] == "reversed"
    assert verdict([30.0, 32.0, 34.0], [29.0, 31.0, 33.0])["verdict"] == "unresolved"  # 1 < 2 x 1.63
    assert verdict([30.0, 30.0], [29.0, 29.0])["verdict"] == "holds"  # no spread: any difference is one


def test_reduced_table_keeps_records_and_a_rerun_reproduces_them(tmp_path, capsys):
    scale = ["--classes", "2", "--train_per_class", "16", "--val_per_class", "8", "--teacher_steps", "5",
             "--teacher_batch", "8", "--epochs", "1", "--batch_size", "8", "--probe_epochs", "1", "--probe_batch", "8"]
    run = lambda *extra: ablate.main(["--tables", "mask_align_t6", "--arms", "ln", "bn", "--seeds", "0", "--out",
                                      str(tmp_path / "out"), *scale, *extra])  # noqa: E731
    threads = torch.get_num_threads()
    try:
        learn.PYTHON = python()  # the method files and finetune.py through the tests' fork server
        records, _ = run("--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png"))
        out = json.loads((tmp_path / "a.json").read_text())
        assert [set(r) for r in out["records"]] == [RECORD, RECORD] and out["claims"] == []  # one seed: no verdict
        assert [(r["arm"], r["script"], r["flags"]) for r in out["records"]] == [
            ("ln", "mask_align", ["--no-align_cls"]), ("bn", "mask_align", ["--target_norm", "bn", "--no-align_cls"])]
        for r in out["records"]:  # each run's own record, kept beside its checkpoint
            kept = json.loads((tmp_path / "out" / "runs" / r["run"] / "result.json").read_text())
            assert all(kept[k] == r[k] for k in ablate.RESULT_KEYS) and 0 <= r["probe_top1"] <= 100
        assert [r["seed"] for r in out["random_init"]] == [0] and 0 <= out["random_init"][0]["probe_top1"] <= 100
        assert (tmp_path / "a.png").stat().st_size > 0
        capsys.readouterr()
        assert run()[0] == records  # kept records: nothing is trained again
        assert "python mask_align.py" not in capsys.readouterr().out
        run("--arms", "bn", "--rerun")  # trained again into reruns/: the same record, to the digit
        assert "bn seed 0: reproduced to the digit" in capsys.readouterr().out
    finally:
        learn.PYTHON = [sys.executable]
        torch.set_num_threads(threads)
    with pytest.raises(common.UserError, match="exists"):  # a file it is given is never overwritten
        run("--json", str(tmp_path / "a.json"))
    with pytest.raises(common.UserError, match="another scale"):
        run("--epochs", "2")


def test_committed_full_run_has_three_seeds_of_every_arm_and_its_verdicts():
    """benchmarks/ablations.json, the full run the benchmarks README reads: every arm of every table with its flags and
    at least 3 seeds, one dataset and teacher (the scale) for all, and every claim's verdict recomputed here from the
    records (Welch's standard error, 2 of them) as well as each arm's mean and sd in the README's tables."""
    run = json.loads(open(os.path.join(ROOT, "benchmarks", "ablations.json")).read())
    assert run["scale"]["data_seed"] == 0 and run["scale"]["epochs"] * run["scale"]["classes"] > 0
    readme = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    for t, spec in ablate.TABLES.items():
        for arm, (script, flags, paper) in spec["arms"].items():
            recs = [r for r in run["records"] if (r["table"], r["arm"]) == (t, arm)]
            assert sorted(r["seed"] for r in recs)[:3] == [0, 1, 2], (t, arm)
            assert all(r["script"] == script and r["flags"] == flags and RECORD <= set(r) for r in recs), (t, arm)
            v = [r["probe_top1"] for r in recs]
            m = sum(v) / len(v)
            sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
            assert f"| {arm} | `{script}.py {' '.join(flags)}` | {paper} | {m:.1f} ± {sd:.1f} |" in readme, (t, arm)
        for better, worse in spec["claims"]:
            c = next(c for c in run["claims"] if (c["table"], c["better"], c["worse"]) == (t, better, worse))
            a, b = ([r["probe_top1"] for r in run["records"] if (r["table"], r["arm"]) == (t, x)] for x in (better, worse))
            var = [sum((x - sum(s) / len(s)) ** 2 for x in s) / (len(s) - 1) / len(s) for s in (a, b)]
            delta, se = sum(a) / len(a) - sum(b) / len(b), math.sqrt(sum(var))
            assert math.isclose(c["mean_delta"], delta, abs_tol=0.006) and math.isclose(c["se"], se, abs_tol=0.006)
            verdict = "holds" if delta > 2 * se else "reversed" if delta < -2 * se else "unresolved"
            paper = spec["arms"][better][2] - spec["arms"][worse][2]
            assert c["verdict"] == verdict and math.isclose(c["paper_delta"], paper, abs_tol=0.006), (t, better, worse)
            line = f"- {better} > {worse}: paper {paper:+.1f}, ours {delta:+.1f} (se {se:.1f}): **{verdict}**"
            assert line in readme, line
    assert len(run["random_init"]) >= 3
