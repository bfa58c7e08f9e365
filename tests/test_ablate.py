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
from PIL import Image

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
    for t in ("milan_t5", "milan_t7", "cae_t2", "cae_v2_t1", "cae_v2_fig3", "mr_mae_t3", "mask_align_t4", "mask_align_t6"):
        assert t in ablate.TABLES  # the tables
    yardsticks = {t: spec["metric"] for t, spec in ablate.TABLES.items()}  # each table's paper's own (issue 35)
    assert yardsticks == {"milan_t5": "finetune", "milan_t7": "linprobe", "cae_t2": "attnprobe", "cae_v2_t1": "linprobe",
                          "cae_v2_fig3": "linprobe", "mr_mae_t3": "finetune", "mask_align_t4": "finetune",
                          "mask_align_t4_tokens": "finetune", "mask_align_t6": "finetune"}
    for t, spec in ablate.TABLES.items():  # every claim names two arms of its table
        assert all(a in spec["arms"] and b in spec["arms"] and a != b for a, b in spec["claims"]), t


def test_each_arm_trains_a_smoke_epoch_at_the_runs_grid(tmp_path, capsys):
    """Every arm's method file and flags, on the smoke flags at learn.py's 112 px (7 x 7 patches): a finite loss. (An arm's
    own run length, MaskAlign's equal-token protocol, is left out: one smoke epoch each.)"""
    def smoke(flags):
        return tuple(x for i, x in enumerate(flags) if "--epochs" not in flags[i - 1:i + 1] and
                     "--warmup_epochs" not in flags[i - 1:i + 1])
    arms = {(script, smoke(flags)) for spec in ablate.TABLES.values() for script, flags, *_ in spec["arms"].values()}
    for i, (script, flags) in enumerate(sorted(arms)):
        importlib.import_module(script).main(SMOKE + ["--fake_size", "16", "--input_size", "112", *flags,
                                                      "--output_dir", str(tmp_path / str(i))])
        log = json.loads((tmp_path / str(i) / "log.txt").read_text())
        assert math.isfinite(log["train_loss"]) and log["train_loss"] > 0, (script, flags)


def test_verdict_rule_on_each_yardstick():
    """holds: the paper's direction by more than 2 standard errors (sqrt(sd_a^2/n_a + sd_b^2/n_b)); reversed: the other
    way by as much; else unresolved; pending below 2 seeds a side. On the table's yardstick (MaskAlign Table 6:
    fine-tuning, finetune_top1) and on the linear probe (probe_top1) beside it, and whether the two verdicts differ."""
    def claim(ft_a, ft_b, lp_a=(1.0, 2.0), lp_b=(1.0, 2.0)):
        records = [dict(table="mask_align_t6", arm=arm, probe_top1=p, **({} if f is None else dict(finetune_top1=f)))
                   for arm, fs, ps in (("ln", ft_a, lp_a), ("bn", ft_b, lp_b)) for f, p in zip(fs, ps)]
        return next(c for c in ablate.claims(records) if (c["better"], c["worse"]) == ("ln", "bn"))
    c = claim([30.0, 32.0, 34.0], [20.0, 21.0, 22.0], [10.0, 11.0, 12.0], [20.0, 21.0, 22.0])  # se sqrt(4/3 + 1/3)
    assert (c["mean_delta"], c["se"], c["verdict"], c["paper_delta"], c["metric"]) == \
        (11.0, pytest.approx(math.sqrt(4 / 3 + 1 / 3)), "holds", 0.6, "finetune")
    assert (c["lp_mean_delta"], c["lp_se"], c["lp_verdict"], c["changed"]) == \
        (-10.0, pytest.approx(math.sqrt(1 / 3 + 1 / 3)), "reversed", True)
    assert ablate.claim_line(c).startswith("- ln > bn: paper +0.6, finetune ours +11.0 (se 1.3)")
    c = claim([5.0, 8.9038], [1.0, 1.0])  # se sqrt(3.9038^2 / 2 / 2) = 1.9519: rounded once 2.0 (through 1.95: 1.9)
    assert "finetune ours +6.0 (se 2.0)" in ablate.claim_line(c)
    assert claim([20.0, 21.0, 22.0], [30.0, 32.0, 34.0])["verdict"] == "reversed"
    c = claim([30.0, 32.0, 34.0], [29.0, 31.0, 33.0])  # 1 < 2 x 1.63
    assert (c["verdict"], c["lp_verdict"], c["changed"]) == ("unresolved", "unresolved", False)
    assert claim([30.0, 30.0], [29.0, 29.0])["verdict"] == "holds"  # no spread: any difference is one
    c = claim([30.0, None], [29.0, 28.0])  # ln's second seed not fine-tuned yet: that verdict waits, the probe's stands
    assert (c["verdict"], c["mean_delta"], c["lp_verdict"], c["changed"]) == ("pending", None, "unresolved", None)
    assert ablate.unresolved_arms(ablate.claims([dict(table="mask_align_t6", arm=a, finetune_top1=v, probe_top1=v)
                                                for a, v in (("ln", 1.0), ("ln", 3.0), ("bn", 2.0), ("bn", 2.5),
                                                             ("none", 0.0), ("none", 0.1))])) == \
        {("mask_align_t6", "ln"), ("mask_align_t6", "bn")}  # ln vs bn unresolved; bn > none holds: close seeds for two


def test_close_seeds_are_given_again_until_no_claim_they_touch_stays_unresolved():
    """MaskAlign Table 6 (LN > BN > none, fine-tuning): LN vs BN is unresolved at seeds 0-2 and both get 3-4; BN's new
    seeds spread it so that BN > none, held at 3 seeds, is unresolved at 5 against 3: none gets 3-4 too, then it stops."""
    ft = {"ln": [30, 32, 34, 31, 33], "bn": [29, 31, 33, 10, 50], "none": [20, 20.5, 21, 20, 21]}
    calls = []

    def run_all(todo):
        calls.append(sorted({(t, arm) for t, arm, *_ in todo}))
        return [dict(table=t, arm=arm, seed=seed, finetune_top1=ft[arm][seed], probe_top1=ft[arm][seed])
                for t, arm, _, _, _, seed in todo]
    args = ablate.get_args(["--tables", "mask_align_t6"])
    records = ablate.with_close_seeds(args, run_all(ablate.selected(args)), run_all)
    assert calls == [[("mask_align_t6", a) for a in arms] for arms in (("bn", "ln", "none"), ("bn", "ln"), ("none",))]
    assert sorted((r["arm"], r["seed"]) for r in records) == sorted((a, s) for a in ft for s in range(5))
    calls.clear()
    args = ablate.get_args(["--tables", "mask_align_t6", "--arms", "ln", "bn"])  # chosen arms: no close seeds
    ablate.with_close_seeds(args, run_all(ablate.selected(args)), run_all)
    assert len(calls) == 1


def test_reduced_tables_on_each_yardstick_keep_complete_records_and_reproduce(tmp_path, capsys):
    """MaskAlign Table 6's LN arm (fine-tuning) and CAE Table 2's full CAE (attentive probe), one seed, a few steps:
    each record holds its pre-training, the linear probe and its paper's yardstick, kept beside its checkpoint; the
    random-init student has all three; the JSON and both pictures are written; a second call, and one in a new folder
    from the first's JSON (--records), train nothing; --rerun of the fine-tuning record reproduces it to the digit."""
    scale = ["--classes", "2", "--train_per_class", "16", "--val_per_class", "8", "--teacher_steps", "5",
             "--teacher_batch", "8", "--epochs", "1", "--batch_size", "8", "--probe_epochs", "1", "--probe_batch", "8",
             "--finetune_epochs", "1"]
    run = lambda out, *extra: ablate.main(["--tables", "mask_align_t6", "cae_t2", "--arms", "ln", "both", "--seeds", "0",
                                           "--out", str(tmp_path / out), *scale, *extra])  # noqa: E731
    threads = torch.get_num_threads()
    try:
        learn.PYTHON = python()  # the method files and finetune.py through the tests' fork server
        records, _ = run("out", "--records", "none", "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png"))
        out = json.loads((tmp_path / "a.json").read_text())
        assert [(r["table"], r["arm"], r["script"], r["flags"]) for r in out["records"]] == [
            ("mask_align_t6", "ln", "mask_align", ["--no-align_cls"]), ("cae_t2", "both", "cae", ["--target", "clip"])]
        ft, att = out["records"]
        assert RECORD | {"finetune_top1"} <= set(ft) and "attnprobe_top1" not in ft
        assert RECORD | {"attnprobe_top1"} <= set(att) and "finetune_top1" not in att
        for r in out["records"]:  # each run's own record, kept beside its checkpoint, every column in it
            kept = json.loads((tmp_path / "out" / "runs" / r["run"] / "result.json").read_text())
            assert all(kept[k] == r[k] for k in set(r) - {"table", "arm", "run"})
            assert all(0 <= r[k] <= 100 for k in r if k.endswith("_top1"))
        assert out["claims"] and all(c["verdict"] == "pending" for c in out["claims"])  # one seed: no verdict yet
        assert [r["seed"] for r in out["random_init"]] == [0]
        assert {"probe_top1", "finetune_top1", "attnprobe_top1"} <= set(out["random_init"][0])
        assert out["scale"]["finetune_epochs"] == 1 and out["recipe"] == {"probe_lr": 6.4, "probe_crop_min": 0.5,
                                                                           "probe_pool": "avg", "attnprobe_lr": 0.4,
                                                                           "finetune_lr": 0.002}
        for png in ("a.png", "a_claims.png"):
            assert Image.open(tmp_path / png).size[0] > 400
        capsys.readouterr()
        assert run("out", "--records", "none")[0] == records  # kept records: nothing is trained again
        assert run("elsewhere", "--records", str(tmp_path / "a.json"))[0] == [  # from the JSON: nothing trained
            dict(r, run=r["run"]) for r in records]
        assert "python mask_align.py" not in capsys.readouterr().out and "python cae.py" not in capsys.readouterr().out
        assert not (tmp_path / "elsewhere" / "runs").exists()
        run("out", "--records", "none", "--arms", "ln", "--rerun")  # trained again into reruns/: the same record
        assert "ln seed 0: reproduced to the digit" in capsys.readouterr().out
    finally:
        learn.PYTHON = [sys.executable]
        torch.set_num_threads(threads)
    with pytest.raises(common.UserError, match="exists"):  # a file it is given is never overwritten
        run("out", "--json", str(tmp_path / "a.json"))
    with pytest.raises(common.UserError, match="another scale"):
        run("out", "--epochs", "2")


def claim_line(c):
    """The README's line of a claim, written here from the records' numbers (not ablate.py's own formatting)."""
    on = f"ours {c['on'][0]:+.1f} (se {c['on'][1]:.1f}): **{c['on'][2]}**" if c["on"] else "ours: **pending**"
    head = f"- {c['better']} > {c['worse']}: paper {c['paper']:+.1f}, {c['metric']} {on}"
    if c["metric"] == "linprobe":
        return head
    lp = f"{c['lp'][0]:+.1f} (se {c['lp'][1]:.1f}): {c['lp'][2]}" if c["lp"] else "pending"
    same = "" if not (c["on"] and c["lp"]) else ", the yardstick changed the verdict" if c["on"][2] != c["lp"][2] \
        else ", the same verdict"
    return f"{head}; linear probe {lp}{same}"


def test_committed_run_its_verdicts_on_both_yardsticks_and_the_readmes():
    """benchmarks/ablations.json, the run the benchmarks README reads: every arm of every table with its flags and at
    least 3 seeds of the linear probe, one scale and recipe for all; every claim's verdict on its paper's yardstick
    (where 2 seeds a side have it) and on the linear probe recomputed here from the records (Welch's standard error, 2
    of them), each arm's means and sds and each claim's line in benchmarks/README.md, and the README's count."""
    run = json.loads(open(os.path.join(ROOT, "benchmarks", "ablations.json")).read())
    assert run["scale"]["data_seed"] == 0 and run["scale"]["epochs"] * run["scale"]["classes"] > 0
    assert {k: run[k] for k in ("scale", "recipe")} == ablate.config(ablate.get_args(["--records", "none"]))
    readme = open(os.path.join(ROOT, "benchmarks", "README.md")).read()

    def stats(v):
        m = sum(v) / len(v)
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

    def welch(a, b):
        if len(a) < 2 or len(b) < 2:
            return None
        (ma, sa), (mb, sb) = stats(a), stats(b)
        delta, se = ma - mb, math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
        return delta, se, "holds" if delta > 2 * se else "reversed" if delta < -2 * se else "unresolved"
    holds = total = 0
    for t, spec in ablate.TABLES.items():
        keys = {arm: {"linprobe": "probe_top1", "finetune": "finetune_top1", "attnprobe": "attnprobe_top1",
                      "semantic_probe": "semantic_probe_top1"}[own[0] if own else spec["metric"]]
                for arm, (_, _, _, *own) in spec["arms"].items()}  # each arm's paper's yardstick
        col = lambda arm, k: [r[k] for r in run["records"] if (r["table"], r["arm"]) == (t, arm) and k in r]  # noqa
        for arm, (script, flags, paper, *_) in spec["arms"].items():
            recs = [r for r in run["records"] if (r["table"], r["arm"]) == (t, arm)]
            assert sorted(r["seed"] for r in recs)[:3] == [0, 1, 2], (t, arm)
            assert all(r["script"] == script and r["flags"] == flags and RECORD <= set(r) for r in recs), (t, arm)
            on, lp = col(arm, keys[arm]), col(arm, "probe_top1")
            cell = lambda v: "pending" if not v else "{:.1f} ± {:.1f}".format(*stats(v)) if len(v) > 1 else \
                f"{v[0]:.1f} ± 0.0"  # noqa: E731
            other = "the same" if keys[arm] == "probe_top1" else cell(lp)
            assert f"| {arm} | `{script}.py {' '.join(flags)}` | {paper} | {cell(on)} | {other} |" in readme, (t, arm)
        for better, worse in spec["claims"]:
            c = next(c for c in run["claims"] if (c["table"], c["better"], c["worse"]) == (t, better, worse))
            on = welch(col(better, keys[better]), col(worse, keys[worse]))
            lp = welch(col(better, "probe_top1"), col(worse, "probe_top1"))
            for got, want in (((c["mean_delta"], c["se"], c["verdict"]), on), ((c["lp_mean_delta"], c["lp_se"],
                                                                                 c["lp_verdict"]), lp)):
                assert (got[2] == "pending") if want is None else (
                    math.isclose(got[0], want[0], abs_tol=0.006) and math.isclose(got[1], want[1], abs_tol=0.006)
                    and got[2] == want[2]), (t, better, worse)
            paper = spec["arms"][better][2] - spec["arms"][worse][2]
            line = claim_line(dict(better=better, worse=worse, paper=paper, metric=spec["metric"], on=on, lp=lp))
            assert line in readme, line
            total += 1
            holds += bool(on) and on[2] == "holds"
    assert len(run["random_init"]) >= 3
    top = open(os.path.join(ROOT, "README.md")).read()
    assert f"Of their {total} claims {holds} hold on their paper's own yardstick" in " ".join(top.split())
