"""Cost of one pre-training step of each method: GFLOPs per image (teacher forward, student forward +
backward, and the decoder / regressor / heads part of the student), images/s (median of timed steps
after warm-up), peak memory, and on CUDA the model FLOP utilisation against the device's bf16 peak.

  python benchmarks/bench.py --device cpu --model vit_base_patch16 --teacher ViT-B-16 \\
      --teacher_weights none --batch_size 8 --json out.json

Each method runs in its own process (clean peak-memory numbers) through the interface every method
file shares: get_args, build_transform, build_model, forward_step. `milan_mae_decoder` is milan.py's
--decoder mae arm: MAE's decoder in place of the prompting decoder (the MILAN Sec. 2.3 cost comparison).
`--variant` re-creates the code as it would be without one speed measure, to measure before/after:
  teacher_grad     the teacher is not frozen and runs with autograd (no requires_grad_(False), no no_grad)
  eager_attention  attention as softmax(q k^T / sqrt(d)) v instead of F.scaled_dot_product_attention
  sync_every_step  loss.item() after every step (a host-device sync)
  unfused_adamw    AdamW without fused=True (CUDA only)
  fp32_teacher     the frozen teacher keeps fp32 weights that autocast casts every step, and is not compiled
  per_patch        forward_step also computes the per-patch loss of the pictures at every step; timed in alternation
                   with the step without it, in the same process (step_s_median_baseline in the record)
FLOPs come from torch.utils.flop_counter (matmuls, convolutions and attention; no element-wise ops).
`--profile` also runs torch.profiler over the timed steps and prints where the time goes: on CUDA the share of
kernel time per kind of kernel (matmul, attention, LayerNorm, copies and casts, compiled fused kernels, optimizer,
other element-wise) with the top kernels and the copy kernels per step; on CPU the same for the CPU ops' self time.
"""
import argparse
import importlib
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

import common  # noqa: E402

METHODS = {  # method -> (module, extra flags)
    "milan": ("milan", []),
    "milan_mae_decoder": ("milan", ["--decoder", "mae"]),
    "cae": ("cae", ["--target", "dalle", "--dalle_weights", "none"]),
    "cae_v2": ("cae_v2", []),
    "mr_mae": ("mr_mae", []),
    "mask_align": ("mask_align", []),
}
PYTHON = [sys.executable]  # how each method's process is started (the tests start it through their fork server)
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity


def eager_attention_forward(self, x):  # the 'before' of SDPA: materialised [B, H, N, N] attention
    q, k, v = self.qkv_heads(x)
    a = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    return self.proj((a @ v).transpose(1, 2).flatten(2))


# ---- Where the time goes (--profile) -------------------------------------------------------------
KINDS = [  # (kind, name fragments), first match wins; names are CUDA kernels, or aten ops on CPU
    ("optimizer", ("adam", "multi_tensor", "foreach", "optimizer")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("matmul", ("gemm", "matmul", "aten::mm", "addmm", "bmm", "linear", "cutlass", "xmma", "cublas", "conv", "sm90_")),
    ("layernorm", ("layer_norm", "layernorm")),
    ("copy/cast", ("copy", "cat", "clone", "contiguous", "to_copy", "cast", "index", "gather", "scatter")),
    ("compiled fused", ("triton",)),
]


def kind_of(name):
    low = name.lower()
    return next((k for k, frags in KINDS if any(f in low for f in frags)), "other element-wise")


def profile_shares(step, steps, cuda):
    """Runs `steps` steps under torch.profiler -> {kinds: {kind: share}, top: [[name, share, calls/step]], copies_per_step,
    total_ms_per_step}. CUDA: kernel time on the device; CPU: the ops' self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    time_of, calls = collections.Counter(), collections.Counter()
    if cuda:  # every kernel launched, with its duration on the device
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                time_of[e.name] += e.time_range.end - e.time_range.start
                calls[e.name] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                time_of[e.key] += e.self_cpu_time_total
                calls[e.key] += e.count
    total = sum(time_of.values()) or 1
    kinds = collections.Counter()
    for name, t in time_of.items():
        kinds[kind_of(name)] += t / total
    top = [[name[:90], t / total, calls[name] / steps] for name, t in time_of.most_common(15)]
    copies = sum(c for name, c in calls.items() if kind_of(name) == "copy/cast") / steps
    return dict(kinds=dict(kinds.most_common()), top=top, copies_per_step=copies, total_ms_per_step=total / steps / 1e3)


def print_profile(method, prof):
    print(f"{method}: {prof['total_ms_per_step']:.1f} ms of {'kernel' if 'cuda' in prof.get('on', '') else 'op'} time "
          f"per step, {prof['copies_per_step']:.0f} copy/cast calls per step")
    print("  " + ", ".join(f"{k} {v:.1%}" for k, v in prof["kinds"].items()))
    for name, share, calls in prof["top"]:
        print(f"  {share:6.1%} {calls:6.1f}/step  {name}")


# ---- One method, in this process ------------------------------------------------------------------
def build(method, opts):
    module = importlib.import_module(METHODS[method][0])
    teacher = [] if METHODS[method][0] == "cae" else ["--teacher", opts.teacher, "--teacher_weights", opts.teacher_weights]
    argv = ["--data", "fake", "--model", opts.model, "--batch_size", str(opts.batch_size), "--fake_size",
            str(opts.batch_size), "--num_workers", "0", "--accum_iter", "1"] + teacher + METHODS[method][1]  # one step
    # of one batch (its cost does not depend on accumulation, which an epoch of one step would not allow); CAE: DALL-E
    args = module.get_args(argv)
    args.rank, args.world_size, args.device, args.lr = 0, 1, opts.device, 1e-4
    args.amp = "bf16" if opts.device.startswith("cuda") else "none"
    model, teacher = module.build_model(args)
    batch, _ = next(iter(common.build_loader(common.build_dataset(args, module.build_transform(args)), args)))
    return module, args, model, teacher, common.to_device(batch, opts.device)


def mha_flops(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs):
    """torch.nn.MultiheadAttention's fused inference kernel (open_clip's CLIP blocks under no_grad), which
    torch.utils.flop_counter does not count: in-projection, q k^T, attention x v, out-projection."""
    B, L, E = query
    S = key[1]
    return 2 * B * (L * E * E + 2 * S * E * E + 2 * L * S * E + L * E * E)


def cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    """F.scaled_dot_product_attention's CPU kernel, which torch.utils.flop_counter does not count (its CUDA kernels it
    does): q k^T and the attention-weighted sum of v."""
    return sdpa_flop_count(query, key, value)


def cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)  # the gradients of q, k, v and of the weights


CUSTOM_FLOPS = {torch.ops.aten._native_multi_head_attention: mha_flops,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward_flops}


def flop_counts(module, model, teacher, batch, args, detach_encoder=False):
    """Per-module FLOPs of one forward + backward: {'Global': total, module name: its part}."""
    encoder = model.encoder
    if detach_encoder:  # swap in a plain callable (not a module: module hooks would see the fresh leaves)
        class EncoderWithoutAutograd:
            def __getattr__(self, name):
                return getattr(encoder, name)

            def __call__(self, *a, **k):
                if not torch.is_grad_enabled():  # e.g. CAE's alignment target: already without autograd
                    return encoder(*a, **k)
                with torch.no_grad():
                    out = encoder(*a, **k)
                leaf = lambda t: t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
                return torch.utils._pytree.tree_map(leaf, out)
        del model._modules["encoder"]
        object.__setattr__(model, "encoder", EncoderWithoutAutograd())
    try:
        with FlopCounterMode(display=False, depth=None,
                             custom_mapping=CUSTOM_FLOPS) as fc:
            with common.autocast(args):
                loss = module.forward_step(model, teacher, batch, args)["loss"]
            loss.backward()
    finally:
        if detach_encoder:
            object.__delattr__(model, "encoder")
            model.encoder = encoder
    return {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}


def measure(method, opts):
    torch.manual_seed(0)
    if "eager_attention" in opts.variant:
        common.Attention.forward = eager_attention_forward
    if "teacher_grad" in opts.variant:
        common.Teacher.forward = common.Teacher.forward.__wrapped__  # without the no_grad decorator
    module, args, model, teacher, batch = build(method, opts)
    args.compile = opts.compile
    if isinstance(teacher, common.Teacher) and "fp32_teacher" not in opts.variant:
        teacher.prepare(args)  # as in training: on CUDA its weights in bf16; --compile: compiled too
    if "teacher_grad" in opts.variant and teacher is not None:
        teacher.requires_grad_(True)
    cuda = opts.device.startswith("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=cuda and "unfused_adamw" not in opts.variant)
    step_model = torch.compile(model) if opts.compile else model
    B = args.batch_size

    def step(per_patch="per_patch" in opts.variant):
        with common.autocast(args):
            loss = module.forward_step(step_model, teacher, batch, args, per_patch=per_patch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if "sync_every_step" in opts.variant:
            loss.item()

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # FLOPs of one step. Pass 1, the real step: everything outside the student's root module ran in the
    # teacher (CLIP, DINO or the DALL-E tokenizer, forward only); the rest is the student's forward + backward.
    # Pass 2 runs the encoder without autograd and hands its outputs on as fresh leaves that require grad:
    # what remains is the encoder's forward plus the decoder / regressor / heads' forward + backward (with the
    # gradient w.r.t. their input, as in pass 1). torch's per-module attribution of backward FLOPs is not used:
    # it misses the encoder's backward when a method reads per-block outputs (MR-MAE, MaskAlign).
    model.train()
    root = type(model).__name__
    counts = [flop_counts(module, model, teacher, batch, args, detach_encoder=d) for d in (False, True)]
    teacher_flops = counts[0]["Global"] - counts[0].get(root, 0)
    student = counts[0]["Global"] - teacher_flops
    decoder = counts[1]["Global"] - teacher_flops - counts[1].get(type(model.encoder).__name__, 0)
    opt.zero_grad(set_to_none=True)
    for _ in range(opts.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, baseline = [], []
    for _ in range(opts.steps):
        times.append(timed(step))
        if "per_patch" in opts.variant:  # the same step without the picture outputs, in alternation (same drift)
            baseline.append(timed(lambda: step(per_patch=False)))
    median = statistics.median(times)
    prof = profile_shares(step, opts.steps, cuda) if opts.profile else None
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec = dict(method=method, model=opts.model, teacher=opts.teacher, device=device_name(opts.device),
               batch_size=B, gflops_teacher=teacher_flops / B / 1e9, gflops_student=student / B / 1e9,
               gflops_decoder=decoder / B / 1e9, images_per_s=B / median, peak_mem_mb=peak,
               step_s_median=median, step_s_all=times, variant=opts.variant or "baseline", compile=opts.compile)
    if baseline:
        rec.update(step_s_median_baseline=statistics.median(baseline), step_s_all_baseline=baseline)
    if prof:
        rec["profile"] = dict(prof, on=opts.device)
    if cuda:
        peak_tflops = opts.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in rec["device"]), None)
        rec["mfu"] = counts[0]["Global"] / median / (peak_tflops * 1e12) if peak_tflops else None
    return rec


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class Help(argparse.RawDescriptionHelpFormatter, common.DefaultsHelpFormatter):
    """This docstring as the description, and every flag's default in --help."""


def main(argv=None):
    p = common.Parser(description=__doc__, formatter_class=Help)  # a bad value: one error line (exit 2)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--model", default="vit_base_patch16", help=", ".join(common.VIT_CONFIGS))
    p.add_argument("--teacher", default="ViT-B-16", help="open_clip ViT name, dino_vitb16, or tiny")
    p.add_argument("--teacher_weights", default="none", help="weights do not change the cost; 'none' needs no file")
    p.add_argument("--batch_size", type=common.COUNT, default=8, help="images per step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--warmup", type=common.SIZE, default=2, help="untimed steps first")
    p.add_argument("--steps", type=common.COUNT, default=5, help="timed steps; images/s uses their median")
    p.add_argument("--variant", default="", help="comma-separated 'before' variants (see above)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--peak_tflops", type=common.POS, help="bf16 peak of the GPU, when its name is not known here")
    p.add_argument("--profile", action="store_true", help="print the time shares per kind of kernel (CUDA) or op (CPU)")
    p.add_argument("--json", help="write the records (a JSON list) here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    opts = p.parse_args(argv)
    opts.variant = [v for v in opts.variant.split(",") if v]
    if opts.one:
        print("RECORD " + json.dumps(measure(opts.one, opts)))
        return
    unknown = [m for m in opts.methods.split(",") if m not in METHODS]
    if unknown:
        raise common.UserError(f"--methods: unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    records = []
    for method in opts.methods.split(","):
        cmd = PYTHON + [os.path.abspath(__file__), "--one", method] + argv
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RECORD ")]
        if proc.returncode or not line:
            print(f"{method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rec = json.loads(line[0][7:])
        records.append(rec)
        print(f"{method:18s} GFLOPs/img teacher {rec['gflops_teacher']:7.2f} student {rec['gflops_student']:7.2f} "
              f"(decoder {rec['gflops_decoder']:6.2f})  {rec['images_per_s']:8.2f} img/s  "
              f"peak {rec['peak_mem_mb']:8.0f} MB" + (f"  MFU {rec['mfu']:.1%}" if rec.get("mfu") else ""), flush=True)
        if rec.get("step_s_median_baseline"):
            print(f"  step median {rec['step_s_median']:.4f} s with {','.join(rec['variant'])}, "
                  f"{rec['step_s_median_baseline']:.4f} s without (alternating): ratio "
                  f"{rec['step_s_median'] / rec['step_s_median_baseline']:.3f}", flush=True)
        if rec.get("profile"):
            print_profile(method, rec["profile"])
        if opts.json:  # after every method: a run cut short keeps what it measured
            with open(opts.json, "w") as f:
                json.dump(records, f, indent=1)
    if len(records) < len(opts.methods.split(",")):
        sys.exit(1)


if __name__ == "__main__":
    common.cli(main)
