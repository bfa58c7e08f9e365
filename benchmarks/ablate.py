"""Each paper's headline ablation claims, measured at laptop scale on the paper's own yardstick.

  python benchmarks/ablate.py --list
  python benchmarks/ablate.py --tables milan_t5 --out ablate_out --json milan_t5.json --plot milan_t5.png

The papers argue through their ablation tables. This runs their headline rows on learn.py's laptop-scale setting and
says, per claim, whether it holds here. Everything but the arms is learn.py's, imported, not copied: its synthetic
dataset (10 shape and texture classes as JPEGs), its teacher (the `tiny` CLIP tower trained supervised on that
dataset, one teacher for every arm), its recipe rule (each method file's defaults, the same epochs and batch for all,
each paper's warmup fraction and peak lr: learn.py --help), its evaluations (learn.evaluate: finetune.py with one
laptop recipe per protocol) and its two R^2 columns (colour_r2: how much of the student's patch tokens is the patch's
mean colour; teacher_r2: how well they predict the teacher's tokens). An arm is a method file and its flags, the row's
own, never tuned: a claim that does not hold at this scale is a finding, not a reason to change an arm or a recipe.
One table leaves the recipe rule's length, as its paper does: mask_align_t4_tokens trains each mask ratio on as many
aligned tokens (MaskAlign Sec. 4.3), beside mask_align_t4's equal steps.

Each table is scored on its paper's yardstick (metric): fine-tuning (MILAN Table 5, MR-MAE Table 3, MaskAlign Tables 4
and 6), the attentive probe (CAE Table 2) or the linear probe (MILAN Table 7, CAE v2 Table 1 and Figure 3; MILAN Table
7 #6 probes #5's runs on the top half of the patches by the teacher's [CLS] attention); every run is also linear-probed
(probe_top1), a second column comparable across tables. The recipes (learn.py --help): finetune.py's defaults (its
papers' optimiser, layer decay, drop path, augmentation, head) at the probe's batch and crop scale, --probe_epochs or
--finetune_epochs, each protocol's paper warmup fraction and peak lr (fine-tuning 2e-3, attentive probe 0.4, linear
probe 6.4), chosen before any arm was measured with them and the same for every arm and table.

Seeds vary the student (--seed of the pre-training: initialisation, masks, data order) and its evaluations; the
dataset and the teacher stay those of --data_seed; both arms of a claim still unresolved after --seeds also run
--close_seeds (and so on, for a claim that an arm's new seeds leave unresolved). The reference is learn.py's
random_init row per seed: the randomly initialised student through the same yardsticks (dashed lines in the picture).
Each (arm, seed) record is complete in one go (pre-training, then every yardstick it needs and the R^2) and kept in
OUT/runs/<script>-<hash>-s<seed>/result.json, so a table can be extended (more --seeds), resumed (a run with a record
is not trained again, a cut run goes on from its checkpoint) or re-run arm by arm (--rerun: trains again into
OUT/reruns/ and says whether the record is reproduced). Records of an earlier --json at the same scale and recipe
(--records, by default the committed benchmarks/ablations.json) are reused, not retrained. A run shared by two tables
(the same method file and resolved flags: MaskAlign Table 4's 0.7 is Table 6's LN; CAE v2 Figure 3's 0.5 is Table 1's
No. 3 at the nano size; MILAN Tables 5 and 7) is trained once.

Per claim ("A above B by x points" in the paper), on each yardstick, over the seeds: mean_delta = mean(A) - mean(B),
se = sqrt(sd_A^2 / n_A + sd_B^2 / n_B) (sample sd), and the verdict: holds (mean_delta > 2 se, the paper's
direction), reversed (mean_delta < -2 se), unresolved, or pending (fewer than 2 seeds a side); the report says whether
the paper's yardstick changed the linear probe's verdict. The papers' numbers are ImageNet scores of ViT-B on the same
yardstick (CAE v2 Figure 3: ViT-T): only the direction and order compare with ours.

Cost on the 2-core machine (idle, measured: one arm and seed, i.e. 992 pre-training steps, the linear probe and R^2,
takes 64-108 s, by method; the fine-tuning and attentive probe columns add their runs, benchmarks/README.md): the
dataset and teacher once, 3-4 minutes; all tables several hours. CAE Fig. 4 stays learn.py's (--cae_fig4); --list
names it beside them."""
import argparse
import hashlib
import importlib
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import common  # noqa: E402
from common import UserError  # noqa: E402
import learn  # noqa: E402

PIXEL_MILAN = ["--target", "pixel", "--decoder", "mae", "--mask_type", "random"]
TABLES = {  # name: the paper's table, its metric, arms {arm: (method file, flags, the paper's number)}, claims
    "milan_t5": dict(
        paper="MILAN", table="Table 5 #1, #2, #7, #8", metric="finetune",
        paper_metric="ViT-B ImageNet fine-tuning top-1, Table 5",
        arms={"1_mae": ("milan", PIXEL_MILAN, 83.0), "2_clip": ("milan", ["--decoder", "mae", "--mask_type", "random"], 83.9),
              "7_prompting": ("milan", ["--mask_type", "random"], 85.1), "8_milan": ("milan", [], 85.4)},
        claims=[("2_clip", "1_mae"), ("7_prompting", "2_clip"), ("8_milan", "7_prompting")],
        note="Table 7 probes the same arms linearly (milan_t7), where #7 is above #8 by 1.0"),
    "milan_t7": dict(
        paper="MILAN", table="Table 7 #1, #2, #4, #5, #6 (= Table 5 #1, #2, #7, #8: the same runs; #6: #5's, probed "
              "on the top half of the patches by the teacher's [CLS] attention)", metric="linprobe",
        paper_metric="ViT-B ImageNet linear probe top-1, Table 7",
        arms={"1_mae": ("milan", PIXEL_MILAN, 62.0), "2_clip": ("milan", ["--decoder", "mae", "--mask_type", "random"], 67.1),
              "7_prompting": ("milan", ["--mask_type", "random"], 79.9), "8_milan": ("milan", [], 78.9),
              "6_semantic_probe": ("milan", [], 80.0, "semantic_probe")},  # #5's runs, probed on the top half
        claims=[("2_clip", "1_mae"), ("7_prompting", "2_clip"), ("7_prompting", "8_milan"), ("6_semantic_probe", "8_milan")],
        note="the paper: the encoder over-adapts to the sampled salient patches, so #8 probes below #7 (Table 5's "
             "fine-tuning has #8 above #7 by 0.3)"),
    "cae_t2": dict(
        paper="CAE", table="Table 2 (decoder, alignment) with CLIP targets (--target clip)", metric="attnprobe",
        paper_metric="ViT-B ImageNet attentive probe top-1, Table 2 (DALL-E targets)",
        arms={"neither": ("cae", ["--target", "clip", "--decoder_depth", "0", "--align_weight", "0"], 71.2),
              "decoder": ("cae", ["--target", "clip", "--align_weight", "0"], 72.7),
              "both": ("cae", ["--target", "clip"], 73.8)},
        claims=[("both", "decoder"), ("decoder", "neither")],
        note="the paper's Table 2 predicts DALL-E tokens; here the teacher's features (CAE v2's No. 1 target), since "
             "pixel targets probe at the random student's level at this scale (README 'The learning run')"),
    "cae_v2_t1": dict(
        paper="CAE v2", table="Table 1 No. 1-3, Table 2 (l_v alone)", metric="linprobe",
        paper_metric="ViT-B ImageNet linear probe top-1, Tables 1 and 2",
        arms={"no1_cae_clip": ("cae", ["--target", "clip"], 75.8), "no2_l_z": ("cae_v2", ["--no-visible_align"], 78.4),
              "no3_cae_v2": ("cae_v2", [], 80.7), "l_v": ("cae_v2", ["--regressor_depth", "0"], 80.5)},
        claims=[("no2_l_z", "no1_cae_clip"), ("no3_cae_v2", "no2_l_z"), ("l_v", "no2_l_z")],
        note="No. 1 runs cae.py with CAE's own recipe (crop scale 0.08, no colour jitter, betas (0.9, 0.999)), No. 2 and "
             "No. 3 cae_v2.py's (Table 8): each file keeps its defaults"),
    "cae_v2_fig3": dict(
        paper="CAE v2", table="Figure 3 (mask ratio) at the nano size", metric="linprobe",
        paper_metric="ViT-T ImageNet linear probe top-1, Figure 3",
        arms={"r0.15": ("cae_v2", ["--mask_ratio", "0.15"], 69.3), "r0.5": ("cae_v2", ["--mask_ratio", "0.5"], 67.1),
              "r0.75": ("cae_v2", ["--mask_ratio", "0.75"], 61.9), "r0.9": ("cae_v2", ["--mask_ratio", "0.9"], 52.0)},
        claims=[("r0.15", "r0.5"), ("r0.5", "r0.75"), ("r0.75", "r0.9")],
        note="the paper's smallest model (ViT-T, 5.7 M parameters) prefers 15%; ours is smaller still (0.1 M, 7 x 7 "
             "patches)"),
    "mr_mae_t3": dict(
        paper="MR-MAE", table="Table 3 rows 1, 2, 4, 5, 6", metric="finetune",
        paper_metric="ViT-B ImageNet fine-tuning top-1, Table 3",
        arms={"row1_mae": ("mr_mae", ["--loss_weights", "1", "0", "--focus", "none", "--fusion_layers", "2"], 83.0),
              "row2_mimic": ("mr_mae", ["--focus", "none", "--fusion_layers", "2"], 84.7),
              "row4_mr_mae": ("mr_mae", [], 85.0), "row5_both_reconstructed": ("mr_mae", ["--high_level", "reconstruct"], 83.3),
              "row6_mimic_only": ("mr_mae", ["--loss_weights", "0", "1"], 84.9)},
        claims=[("row2_mimic", "row1_mae"), ("row4_mr_mae", "row5_both_reconstructed"), ("row4_mr_mae", "row6_mimic_only")],
        note="--fusion_layers 2 is no fusion at the nano depth of 2 blocks; row 1 is learn.py's mae_pixel control"),
    "mask_align_t4": dict(
        paper="MaskAlign", table="Table 4 (mask ratio), without [CLS] in the loss as the paper's Table 4", metric="finetune",
        paper_metric="ViT-B ImageNet fine-tuning top-1, Table 4",
        arms={"r0": ("mask_align", ["--mask_ratio", "0", "--no-align_cls"], 84.9),
              "r0.4": ("mask_align", ["--mask_ratio", "0.4", "--no-align_cls"], 85.2),
              "r0.7": ("mask_align", ["--no-align_cls"], 85.3),
              "r0.9": ("mask_align", ["--mask_ratio", "0.9", "--no-align_cls"], 84.4)},
        claims=[("r0.7", "r0"), ("r0.7", "r0.9")],
        note="every arm keeps the recipe rule's steps; the paper trains each ratio on as many aligned tokens as 200 "
             "epochs at 0.7 (60 epochs at 0, 600 at 0.9): mask_align_t4_tokens"),
    "mask_align_t4_tokens": dict(
        paper="MaskAlign", table="Table 4 (mask ratio) with the paper's protocol: as many aligned tokens per ratio",
        metric="finetune", paper_metric="ViT-B ImageNet fine-tuning top-1, Table 4",
        arms={"r0": ("mask_align", ["--mask_ratio", "0", "--epochs", "5", "--warmup_epochs", "0.5", "--no-align_cls"], 84.9),
              "r0.4": ("mask_align", ["--mask_ratio", "0.4", "--epochs", "8", "--warmup_epochs", "0.8", "--no-align_cls"],
                       85.2),
              "r0.7": ("mask_align", ["--no-align_cls"], 85.3),
              "r0.9": ("mask_align", ["--mask_ratio", "0.9", "--epochs", "48", "--warmup_epochs", "4.8", "--no-align_cls"],
                       84.4)},
        claims=[("r0.7", "r0"), ("r0.7", "r0.9")],
        note="Sec. 4.3: 'we adjust the training iterations for each experiment to be equal to 200 epochs for 70% mask "
             "ratio': here 16 x 0.3 / (1 - r) epochs (0: 4.8, rounded to 5), a tenth of them warmup; the one table whose "
             "arms leave the recipe rule's length, as the paper's own rows do"),
    "mask_align_t6": dict(
        paper="MaskAlign", table="Table 6 (target normalisation), without [CLS]", metric="finetune",
        paper_metric="ViT-B ImageNet fine-tuning top-1, Table 6",
        arms={"ln": ("mask_align", ["--no-align_cls"], 85.3),
              "bn": ("mask_align", ["--target_norm", "bn", "--no-align_cls"], 84.7),
              "none": ("mask_align", ["--target_norm", "none", "--no-align_cls"], 84.3)},
        claims=[("ln", "bn"), ("bn", "none")], note=""),
}
FIG4 = "cae_fig4  CAE Fig. 4 (alignment on / off, encoder-to-decoder reconstruction): benchmarks/learn.py --cae_fig4"
MARKER = ".made_by_ablate_py"
MEASURES = {  # a yardstick: finetune.py --mode and its extra flags (learn.evaluate's recipe) -> the record's column
    "linprobe": ("linprobe", []), "attnprobe": ("attnprobe", []), "finetune": ("finetune", []),
    "semantic_probe": ("linprobe", ["--probe_patches", "semantic", "--teacher", "tiny", "--teacher_weights", "TEACHER"])}
RUN_KEYS = ("teacher_r2", "colour_r2", "final_pretrain_loss")  # what a re-run must reproduce, beside every column
SCALE = ("classes", "train_per_class", "val_per_class", "image_size", "input_size", "teacher_steps", "teacher_batch",
         "epochs", "batch_size", "probe_epochs", "probe_batch", "finetune_epochs", "threads")  # learn.py's flags passed on
RECIPE = ("probe_lr", "probe_crop_min", "probe_pool", "attnprobe_lr", "finetune_lr")  # the yardsticks' recipe (learn.py)


def column(measure):
    """The record's key of a yardstick's val top-1 (the linear probe's keeps its first name)."""
    return "probe_top1" if measure == "linprobe" else f"{measure}_top1"


def arm_measure(table, arm):
    """The yardstick of an arm: its table's metric, or the arm's own (a 4th entry: MILAN Table 7 #6's probe)."""
    spec = TABLES[table]["arms"][arm]
    return spec[3] if len(spec) > 3 else TABLES[table]["metric"]


def get_args(argv=None):
    d = learn.get_args([])  # learn.py's defaults: the scale of the run
    p = common.Parser(description=__doc__, formatter_class=learn.Help)
    a = p.add_argument
    a("--list", action="store_true", help="print one line per arm (table, arm, method file, flags) and exit")
    a("--tables", nargs="+", choices=list(TABLES), default=list(TABLES), help="tables to run")
    a("--arms", nargs="+", help="only these arms of the tables (default: all; --list names them)")
    a("--seeds", nargs="+", type=common.SIZE, default=[0, 1, 2], help="student seeds of every arm")
    a("--close_seeds", nargs="*", type=common.SIZE, default=[3, 4], help="more seeds for both arms of every claim "
      "still unresolved on its paper's yardstick after --seeds")
    a("--out", default="ablate_out", help="work folder: data, teacher, one folder per run with its record; an existing "
      "one is used again only if ablate.py made it at the same scale")
    a("--records", default=os.path.join(ROOT, "benchmarks", "ablations.json"), help="a --json of an earlier run: its "
      "records at this scale and recipe are taken as kept runs, not trained again (none: train every run)")
    a("--json", help="write the records and the claims' verdicts (a new file: an existing one is never overwritten)")
    a("--plot", help="write a PNG: per table, each arm's score on the paper's yardstick and the linear probe over the "
      "seeds, the paper's number beside (new file); and beside it <name>_claims.png: per claim the paper's difference "
      "against ours, coloured by verdict")
    a("--rerun", action="store_true", help="train the selected arms and seeds again into OUT/reruns/ and say whether "
      "each record is reproduced (times aside); kept records are not touched")
    a("--report", action="store_true", help="train nothing: the tables, --json and --plot from the records kept so far")
    a("--data_seed", type=common.SIZE, default=d.seed, help="seed of the dataset and the teacher (learn.py --seed)")
    for k in SCALE:  # the scale, as learn.py's flags of the same names
        default = 8 if k == "finetune_epochs" else getattr(d, k)  # (learn.py's own default: no fine-tuning)
        a(f"--{k}", type=common.COUNT, default=default, help=f"learn.py --{k}")
    args = p.parse_args(argv)
    arms = {arm for t in args.tables for arm in TABLES[t]["arms"]}
    if args.arms and not set(args.arms) <= arms:
        raise UserError(f"--arms {' '.join(sorted(set(args.arms) - arms))}: not an arm of --tables "
                        f"{' '.join(args.tables)}; --list names them")
    for path, flag in ((args.json, "--json"), (args.plot, "--plot"), (args.plot and claims_png(args.plot), "--plot")):
        if path and os.path.exists(path):
            raise UserError(f"{flag} {path} exists; pass a new file name (nothing is overwritten)")
    if args.records != "none" and not os.path.isfile(args.records):
        raise UserError(f"--records {args.records}: no such file; pass an earlier --json or none")
    return args


def claims_png(path):
    return os.path.splitext(path)[0] + "_claims.png"


def learn_args(args, seed):
    """learn.py's Namespace for this scale, its --seed the given one (the dataset and teacher's, or a run's probe)."""
    return learn.get_args(["--seed", str(seed)] + [x for k in SCALE for x in (f"--{k}", str(getattr(args, k)))])


def config(args):
    """What a record depends on besides its run: the scale (data, teacher, lengths) and the yardsticks' recipe."""
    la = learn_args(args, args.data_seed)
    return dict(scale={k: getattr(args, k) for k in ("data_seed",) + SCALE}, recipe={k: getattr(la, k) for k in RECIPE})


def selected(args, seeds=None, arms=None):
    """[(table, arm, script, flags, paper number, seed)] of --tables and --arms (or arms: {(table, arm)})."""
    return [(t, arm, spec[0], spec[1], spec[2], seed) for seed in (seeds or args.seeds) for t in args.tables
            for arm, spec in TABLES[t]["arms"].items()
            if (not args.arms or arm in args.arms) and (arms is None or (t, arm) in arms)]


def command(script, flags, seed, run_dir, args, data, teacher):
    return learn.pretrain_command(script, flags + ["--resume", "auto"], run_dir, learn_args(args, seed), data, teacher)


def run_id(script, flags, seed, args):
    """The run's identity: the method file, the seed, and what the flags change in the file's resolved arguments at this
    scale (so --mask_ratio 0.5 where 0.5 is the default is the same run, and a flag the file gains later, at its
    default, leaves every identity as it was); the paths are placeholders: the same run in any folder."""
    module = importlib.import_module(script)
    resolve = lambda f: vars(module.get_args(command(script, f, seed, "OUT", args, "DATA", "TEACHER")[1:-2]))  # noqa: E731
    base, own = resolve([]), resolve(flags)
    changed = {k: v for k, v in own.items() if k not in base or base[k] != v}
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{script}-{digest}-s{seed}"


def prepare(args, log):
    """OUT with its dataset and teacher (made once, at this scale); refuses a folder made otherwise."""
    out, cfg = os.path.abspath(args.out), config(args)
    cfg_path = os.path.join(out, "config.json")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER))):
        raise UserError(f"--out {args.out}: holds files ablate.py did not write; pass a new or empty folder")
    if os.path.isfile(cfg_path) and json.load(open(cfg_path)) != cfg:
        raise UserError(f"--out {args.out}: was made at another scale or recipe ({cfg_path}); pass the same flags or a "
                        f"new folder")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "a").close()
    la, data, teacher = learn_args(args, args.data_seed), os.path.join(out, "data"), os.path.join(out, "teacher.pth")
    if not os.path.isfile(teacher):
        learn.make_dataset(data, la.seed, la.classes, la.train_per_class, la.val_per_class, la.image_size)
        log(f"wrote the dataset to {data}; training the teacher")
        secs, loss = learn.train_teacher(la, data, teacher + ".tmp", log)
        os.replace(teacher + ".tmp", teacher)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        log(f"teacher: {secs:.0f} s, final train loss {loss:.4f}")
    return out, data, teacher


def committed(args):
    """The records of --records made at this scale and recipe, by run identity (recomputed from script, flags and seed)
    -> {run: {column: value}}: what each kept run measured."""
    if args.records == "none":
        return {}
    old = json.load(open(args.records))
    if {k: old.get(k) for k in ("scale", "recipe")} != config(args):
        return {}
    kept = {f"random_init-s{r['seed']}": dict(r) for r in old.get("random_init", [])}
    for r in old["records"]:
        kept.setdefault(run_id(r["script"], r["flags"], r["seed"], args), {}).update(
            {k: v for k, v in r.items() if k not in ("table", "arm", "run")})
    return kept


class Measure:
    """The colour and teacher tokens of the val patches, computed once; then each run's yardsticks and R^2."""
    def __init__(self, args, data, teacher_path):
        self.args, self.data, self.teacher_path = args, data, teacher_path
        la = learn_args(args, args.data_seed)
        teacher = common.Teacher("tiny", teacher_path, grid=la.input_size // 16)
        self.colour = learn.val_patches(learn.patch_colour, la, data)
        self.teacher_tokens = learn.val_patches(lambda x: teacher(x)["tokens"], la, data)

    def __call__(self, ckpt, run_dir, seed, measures, log, env):
        """The yardsticks of `measures` (each once, a new folder per try) and the two R^2 of the checkpoint."""
        la, result = learn_args(self.args, seed), {}
        for m in sorted(measures):
            mode, extra = MEASURES[m]
            extra = [self.teacher_path if x == "TEACHER" else x for x in extra]
            folder = os.path.join(run_dir, f"{m}-{time.strftime('%Y%m%d-%H%M%S')}")  # a new one if one was cut short
            secs, top1 = learn.evaluate(mode, ckpt, folder, la, self.data, log, m, env, extra)
            result.update({column(m): top1, f"{m}_s": round(secs, 1)})
        t = learn.val_patches(learn.student_encoder(ckpt, la), la, self.data)
        return dict(result, teacher_r2=learn.linear_r2(t, self.teacher_tokens), colour_r2=learn.linear_r2(self.colour, t))


def write_record(run_dir, result):
    with open(os.path.join(run_dir, "result.json.tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(run_dir, "result.json.tmp"), os.path.join(run_dir, "result.json"))
    return result


def train_and_measure(script, flags, seed, run_dir, args, data, teacher, measure, measures, log, env):
    """One arm and seed, complete in one go: pre-training through the method file's command line (--resume auto: a run
    cut short goes on where its checkpoint stands, bit-identically), then every yardstick it needs and R^2 -> its
    record, OUT/runs/.../result.json (written once all are measured)."""
    cmd = command(script, flags, seed, run_dir, args, data, teacher)
    log(f"python {' '.join(cmd)}")
    secs, records = learn.run(cmd, run_dir, log, os.path.basename(run_dir), env)
    ckpt = os.path.join(run_dir, "checkpoint-last.pth")
    return write_record(run_dir, dict(script=script, flags=flags, seed=seed, command=cmd[:-2], pretrain_s=round(secs, 1),
                                      final_pretrain_loss=records[-1]["train_loss"],
                                      **measure(ckpt, run_dir, seed, measures, log, env)))


def random_student(seed, out, args, measure, measures, kept, log, env):
    """The reference: the randomly initialised student of this seed (as common.setup seeds before a method builds it)
    through the same yardsticks and R^2, as learn.py's random_init row -> its record, OUT/runs/random_init-s<seed>/."""
    rid = f"random_init-s{seed}"
    run_dir, path = os.path.join(out, "runs", rid), os.path.join(out, "runs", rid, "result.json")
    have = json.load(open(path)) if os.path.isfile(path) else kept.get(rid, {})
    missing = {m for m in measures if column(m) not in have}
    if missing and measure:
        os.makedirs(run_dir, exist_ok=True)
        torch.manual_seed(seed)
        ckpt = os.path.join(run_dir, "random_init.pth")
        torch.save(common.build_vit("vit_nano_patch16", args.input_size).state_dict(), ckpt)
        have = write_record(run_dir, dict(have, seed=seed, **measure(ckpt, run_dir, seed, missing, log, env)))
    return have or None  # (--report: as kept)


def verdict(a, b):
    """mean(a) - mean(b), its standard error sqrt(sd_a^2 / n_a + sd_b^2 / n_b) (sample sd) and the verdict: holds beyond
    2 of them in the paper's direction, reversed beyond 2 the other way, else unresolved; None below 2 seeds a side."""
    a, b = np.array(a, dtype=float), np.array(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    delta, se = a.mean() - b.mean(), math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return dict(mean_delta=float(delta), se=se, seeds=[len(a), len(b)],  # unrounded: the report rounds once
                verdict="holds" if delta > 2 * se else "reversed" if delta < -2 * se else "unresolved")


def scores(records, table, arm, key):
    return [r[key] for r in records if (r["table"], r["arm"]) == (table, arm) and r.get(key) is not None]


def claims(records):
    """Per table and claim: the paper's delta; ours on the paper's yardstick (each arm's own) and on the linear probe,
    each with its standard error and verdict ('pending' where a side has fewer than 2 seeds); changed: whether the
    yardstick changed the verdict."""
    out = []
    for t, spec in TABLES.items():
        if not any(r["table"] == t for r in records):
            continue
        for better, worse in spec["claims"]:
            on = verdict(*(scores(records, t, x, column(arm_measure(t, x))) for x in (better, worse)))
            lp = verdict(*(scores(records, t, x, "probe_top1") for x in (better, worse)))
            c = dict(table=t, better=better, worse=worse, metric=spec["metric"],
                     paper_delta=round(spec["arms"][better][2] - spec["arms"][worse][2], 2),
                     **(on or dict(mean_delta=None, se=None, seeds=None, verdict="pending")),
                     **{f"lp_{k}": v for k, v in (lp or dict(mean_delta=None, se=None, seeds=None, verdict="pending")).items()})
            c["changed"] = None if "pending" in (c["verdict"], c["lp_verdict"]) else c["verdict"] != c["lp_verdict"]
            out.append(c)
    return out


def unresolved_arms(verdicts):
    return {(c["table"], x) for c in verdicts if c["verdict"] == "unresolved" for x in (c["better"], c["worse"])}


def with_close_seeds(args, records, run_all):
    """--close_seeds for both arms of every claim unresolved on its yardstick, again until no claim stays unresolved
    with an arm not yet given them (an arm given more seeds for one claim enters its other claims with them too)."""
    closed = set()
    while args.close_seeds and not args.arms and (close := unresolved_arms(claims(records)) - closed):
        records += run_all(selected(args, seeds=args.close_seeds, arms=close))
        closed |= close
    return records


def summary(values):
    v = np.array(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}" if len(v) else "pending"


def report(records, verdicts, randoms):
    """Markdown tables: per table, arm / flags / paper / ours on the paper's yardstick and on the linear probe (mean ±
    sd) / seeds / teacher R^2 / colour R^2; then the claims, both verdicts. randoms: the random-init student's records,
    the level a student that learnt nothing reaches on each yardstick."""
    for m in MEASURES:
        v = [r[column(m)] for r in randoms if column(m) in r]
        if v:
            print(f"reference: the random-init student, {m}: {summary(v)}% (seeds "
                  f"{', '.join(str(r['seed']) for r in randoms if column(m) in r)})")
    for t, spec in TABLES.items():
        rows = [r for r in records if r["table"] == t]
        if not rows:
            continue
        m = spec["metric"]
        print(f"\n{t}: {spec['paper']} {spec['table']}; paper: {spec['paper_metric']}\n"
              f"| arm | flags | paper | {m} top-1 (%) | linear probe top-1 (%) | seeds (each column) | teacher R² | colour R² |\n"
              f"|---|---|---|---|---|---|---|---|")
        for arm, (script, flags, number, *_) in spec["arms"].items():
            rs = [r for r in rows if r["arm"] == arm]
            if rs:
                on, lp = scores(rows, t, arm, column(arm_measure(t, arm))), scores(rows, t, arm, "probe_top1")
                r2 = " | ".join(f"{np.mean([r[k] for r in rs]):.2f}" for k in ("teacher_r2", "colour_r2"))
                seeds = f"{len(on)}" if len(on) == len(lp) else f"{len(on)} / {len(lp)}"  # (yardstick / probe)
                print(f"| {arm} | `{script}.py {' '.join(flags)}` | {number} | {summary(on)} | "
                      f"{summary(lp) if arm_measure(t, arm) != 'linprobe' else 'the same'} | {seeds} | {r2} |")
        for c in (c for c in verdicts if c["table"] == t):
            print(claim_line(c))


def claim_line(c):
    """One claim as the README reads it: the paper's delta, ours on its yardstick and on the linear probe."""
    on = f"ours {c['mean_delta']:+.1f} (se {c['se']:.1f}): **{c['verdict']}**" if c["mean_delta"] is not None else \
        "ours: **pending**"
    lp = "" if c["metric"] == "linprobe" else "; linear probe " + (
        f"{c['lp_mean_delta']:+.1f} (se {c['lp_se']:.1f}): {c['lp_verdict']}" if c["lp_mean_delta"] is not None
        else "pending") + ("" if c["changed"] is None else ", the yardstick changed the verdict" if c["changed"]
                           else ", the same verdict")
    return f"- {c['better']} > {c['worse']}: paper {c['paper_delta']:+.1f}, {c['metric']} {on}{lp}"


COLOURS = {"holds": (40, 150, 60), "reversed": (200, 40, 40), "unresolved": (150, 150, 150), "pending": (170, 170, 170)}


def plot(records, verdicts, randoms, path):
    """Per table a panel: per arm its score on the paper's yardstick (left bar, blue) and on the linear probe (right
    bar, orange; one bar where they are the same), each seed a dot, mean +- sd, the paper's number under it, and dashed
    lines at the random-init student's levels."""
    tables = [t for t in TABLES if any(r["table"] == t for r in records)]
    cols, pw, ph = 2, 470, 250
    im = Image.new("RGB", (cols * pw + 20, math.ceil(len(tables) / cols) * (ph + 80) + 10), "white")
    d = ImageDraw.Draw(im)
    for k, t in enumerate(tables):
        spec, x0, y0 = TABLES[t], 10 + (k % cols) * pw, 10 + (k // cols) * (ph + 80)
        arms = [a for a in spec["arms"] if any((r["table"], r["arm"]) == (t, a) for r in records)]
        keys = [column(spec["metric"])] + (["probe_top1"] if spec["metric"] != "linprobe" else [])
        values = {(a, i): scores(records, t, a, column(arm_measure(t, a)) if i == 0 else key)
                  for a in arms for i, key in enumerate(keys)}
        top = max([max(v) for v in values.values() if v] + [1.0]) * 1.15
        common.draw_text(d, (x0, y0), f"{t}: top-1 (%), 0 - {top:.0f}; blue {spec['metric']}" +
                         (", orange linprobe" if len(keys) > 1 else ""))
        base, height, w = y0 + 20 + ph - 60, ph - 60, (pw - 30) / len(arms)
        d.line([(x0, base), (x0 + pw - 30, base)], fill=(150, 150, 150))
        y = lambda val: base - height * val / top  # noqa: E731
        for i, a in enumerate(arms):
            for j in range(len(keys)):
                v, cx = np.array(values[(a, j)]), x0 + w * (i + 0.5) + (j - (len(keys) - 1) / 2) * w / 4
                if not len(v):
                    continue
                m, sd = v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)
                d.rectangle([cx - w / 9, y(m), cx + w / 9, base], fill=(170, 190, 230) if j == 0 else (240, 190, 140))
                d.line([(cx, y(m + sd)), (cx, y(m - sd))], fill=(40, 40, 120), width=2)
                for val in v:
                    d.ellipse([cx - 2, y(val) - 2, cx + 2, y(val) + 2], fill=(200, 40, 40))
            common.draw_text(d, (x0 + w * i + 2, base + 4), a[:14])
            common.draw_text(d, (x0 + w * i + 2, base + 16), f"paper {spec['arms'][a][2]}")
        for j, key in enumerate(keys):
            level = [r[key] for r in randoms if key in r]
            if level:
                yl = y(np.mean(level))
                for x in range(int(x0), int(x0 + pw - 30), 8):
                    d.line([(x, yl), (x + 4, yl)], fill=(60, 60, 160) if j == 0 else (200, 120, 40))
        common.draw_text(d, (x0 + pw - 130, y0 + 12), "dashed: random init", fill=(90, 90, 90))
        for j, c in enumerate(c for c in verdicts if c["table"] == t):
            ours = f"{c['mean_delta']:+.1f} +- {c['se']:.1f}" if c["mean_delta"] is not None else ""
            lp = "" if c["metric"] == "linprobe" else f"; linprobe {c['lp_verdict']}"  # (as claim_line)
            common.draw_text(d, (x0, base + 30 + 12 * j), f"{c['better']} > {c['worse']}: {c['verdict']} {ours}{lp}",
                             fill=COLOURS[c["verdict"]])
    im.save(path)


def plot_claims(verdicts, path):
    """One point per claim: the paper's difference (x) against ours on the paper's yardstick (y), +- 2 standard errors,
    coloured by the verdict; the axes cross at 0, so a claim that holds sits in the upper right (the papers' deltas
    are ImageNet points of ViT-B, ours laptop points: only the sign and the order compare). The names stand in a
    column beside the plot, in the points' order from the top, each joined to its point by a line."""
    cs = sorted((c for c in verdicts if c["mean_delta"] is not None), key=lambda c: -c["mean_delta"])
    W, H, m, P = 1000, 560, 60, 640  # P: the plot's right edge, the names' column right of it
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    xs = max([abs(c["paper_delta"]) for c in cs] + [1.0]) * 1.1
    ys = max([abs(c["mean_delta"]) + 2 * c["se"] for c in cs] + [1.0]) * 1.1
    X = lambda v: m + (P - 2 * m) * (v + xs) / (2 * xs)  # noqa: E731
    Y = lambda v: H - m - (H - 2 * m) * (v + ys) / (2 * ys)  # noqa: E731
    d.line([(X(-xs), Y(0)), (X(xs), Y(0))], fill=(120, 120, 120)), d.line([(X(0), Y(-ys)), (X(0), Y(ys))], fill=(120, 120, 120))
    common.draw_text(d, (m, 10), f"each claim: paper's difference (x, ImageNet points, +-{xs:.1f}) against ours on the "
                                 f"paper's yardstick (y, +-{ys:.1f}), bars 2 se")
    for i, (name, colour) in enumerate(COLOURS.items()):
        n = sum(c["verdict"] == name for c in verdicts)
        common.draw_text(d, (m + 150 * i, 26), f"{name}: {n}", fill=colour)
    ly = [Y(c["mean_delta"]) for c in cs]
    for k in range(1, len(ly)):  # each name at its point's height or just below the name above it
        ly[k] = max(ly[k], ly[k - 1] + 15)
    ly = [y - max(0, ly[-1] - (H - 12)) for y in ly] if ly else ly  # the column pushed up to fit
    for c, y in zip(cs, ly):
        cx, cy = X(c["paper_delta"]), Y(c["mean_delta"])
        d.line([(cx, Y(c["mean_delta"] - 2 * c["se"])), (cx, Y(c["mean_delta"] + 2 * c["se"]))], fill=COLOURS[c["verdict"]])
        d.line([(cx + 5, cy), (P - 6, y), (P, y)], fill=(215, 215, 215))
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=COLOURS[c["verdict"]])
        common.draw_text(d, (P + 4, y - 6), f"{c['table']} {c['better']} > {c['worse']}", fill=COLOURS[c["verdict"]])
    im.save(path)


def main(argv=None):
    args = get_args(argv)
    if args.list:
        for t, arm, script, flags, number, _ in selected(args, seeds=[0]):
            print(f"{t:14s} {arm:24s} {script}.py {' '.join(flags)}")
        return print(FIG4)
    t_start = time.time()
    log = lambda s: print(f"[{time.time() - t_start:6.0f} s] {s}", flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)  # before the teacher trains: its numbers depend on the thread count
    out, data, teacher = prepare(args, log) if not args.report else (os.path.abspath(args.out), None, None)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    kept, state = committed(args), dict(measure=None, differ=[])

    def measure_once():
        state["measure"] = state["measure"] or Measure(args, data, teacher)
        return state["measure"]

    def run_all(todo):
        needs = {}  # run -> the yardsticks every selected arm of it needs (the linear probe always)
        for t, arm, script, flags, number, seed in todo:
            needs.setdefault(run_id(script, flags, seed, args), {"linprobe"}).add(arm_measure(t, arm))
        records = []
        for t, arm, script, flags, number, seed in todo:  # seed by seed: a cut table has its arms at the same seeds
            rid = run_id(script, flags, seed, args)
            run_dir, path = os.path.join(out, "runs", rid), os.path.join(out, "runs", rid, "result.json")
            have = json.load(open(path)) if os.path.isfile(path) else dict(kept.get(rid, {}))
            missing = {m for m in needs[rid] if column(m) not in have}
            if args.rerun:
                rerun_dir = os.path.join(out, "reruns", f"{rid}-{time.strftime('%Y%m%d-%H%M%S')}")
                log(f"{t} {arm} seed {seed}: {rerun_dir}")
                new = train_and_measure(script, flags, seed, rerun_dir, args, data, teacher, measure_once(), needs[rid],
                                        log, env)
                diff = [f"{k} {have[k]} -> {new[k]}" for k in RUN_KEYS + tuple(column(m) for m in needs[rid])
                        if k in have and have[k] != new[k]]
                log(f"{t} {arm} seed {seed}: " + ("reproduced to the digit" if not diff else "DIFFERS: " + ", ".join(diff)))
                state["differ"] += diff
                have = have if have else new
            elif missing and not args.report:
                log(f"{t} {arm} seed {seed}: {run_dir}")
                if os.path.isfile(os.path.join(run_dir, "result.json")):  # the run is here: its missing yardsticks only
                    have = write_record(run_dir, dict(have, **measure_once()(os.path.join(run_dir, "checkpoint-last.pth"),
                                                                             run_dir, seed, missing, log, env)))
                else:  # trained again (a kept record without its checkpoint too), measured in one go
                    have = train_and_measure(script, flags, seed, run_dir, args, data, teacher, measure_once(),
                                             needs[rid], log, env)
            if have:
                records.append(dict(table=t, arm=arm, seed=seed, script=script, flags=flags, run=rid,
                                    **{k: v for k, v in have.items() if k not in ("script", "flags", "seed", "command")}))
        return records

    records = with_close_seeds(args, run_all(selected(args)), run_all)
    measures = {arm_measure(t, arm) for t, arm, *_ in selected(args, seeds=[0])} | {"linprobe"}
    randoms = [r for r in (random_student(seed, out, args, None if args.report else measure_once(), measures, kept, log,
                                          env) for seed in args.seeds) if r]
    verdicts = claims(records)
    report(records, verdicts, randoms)
    if args.json:
        with open(args.json, "x") as f:
            json.dump(dict(records=records, claims=verdicts, random_init=randoms, **config(args)), f, indent=1)
    if args.plot:
        plot(records, verdicts, randoms, args.plot)
        plot_claims(verdicts, claims_png(args.plot))
    if state["differ"]:
        raise SystemExit(f"{len(state['differ'])} value(s) not reproduced (above)")
    return records, verdicts


if __name__ == "__main__":
    common.cli(main)
