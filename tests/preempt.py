"""python tests/preempt.py SCRIPT ARGS...: runs SCRIPT as `python SCRIPT ARGS...` would, preempted the way
a cluster does it. PREEMPT_AT_STEP=k: right after the mid-epoch checkpoint at step k is written, every
rank SIGKILLs itself (rank 0 first copies that checkpoint to checkpoint-last.pth.at-kill). SIGNAL_AT_UPDATE=k: right
after the k-th optimiser update the process sends itself SIGNAL (SIGTERM, or SIGINT: Ctrl-C), or with SIGNAL_GROUP=1
sends it to its whole process group, DataLoader workers included, as a scheduler or a terminal does; SIGNAL_COUNT=n: n
times (a rank under torchrun gets a scheduler's SIGTERM twice: its own, and torchrun's forward). RAISE_AT_UPDATE=k:
right after the k-th optimiser update the process raises RuntimeError("injected failure at <time.time()> in pid
<pid>") (on rank RAISE_RANK only, if set), as an unexpected error (a CUDA out-of-memory, a bug) would.
HOLD_AT_UPDATE=k: right after the k-th update rank 0 writes its pid to the file HOLD_FILE, and every rank waits until
HOLD_FILE.go exists (a run kept alive while a test starts another). PARAMS_DIR=dir: at the end of training each rank
writes its parameters to dir/rank<r>.pth (to compare the ranks)."""
import os
import runpy
import shutil
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import common  # noqa: E402

kill_at, params_dir, save = int(os.environ.get("PREEMPT_AT_STEP", -1)), os.environ.get("PARAMS_DIR"), common.Checkpointer.save
signal_at, step, updates = int(os.environ.get("SIGNAL_AT_UPDATE", -1)), common.optimizer_step, [0]
raise_at, raise_rank = int(os.environ.get("RAISE_AT_UPDATE", -1)), os.environ.get("RAISE_RANK", os.environ.get("RANK", "0"))
hold_at, hold = int(os.environ.get("HOLD_AT_UPDATE", -1)), os.environ.get("HOLD_FILE")


def save_then_preempt(self, epoch, step, keep=False, meter=None):
    save(self, epoch, step, keep, **({"meter": meter} if meter else {}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has finished writing
    if step == kill_at:
        if self.args.rank == 0:  # a copy for the test to inspect after the resumed run has overwritten the file
            shutil.copy(self.last, self.last + ".at-kill")
        os.kill(os.getpid(), signal.SIGKILL)
    if params_dir and (epoch, step) == (self.args.epochs, 0):
        torch.save(self.model.state_dict(), os.path.join(params_dir, f"rank{self.args.rank}.pth"))


def step_then_signal(*args):
    step(*args)
    updates[0] += 1
    if updates[0] == signal_at:
        sig = getattr(signal, os.environ.get("SIGNAL", "SIGTERM"))
        for _ in range(int(os.environ.get("SIGNAL_COUNT", 1))):  # 2: a scheduler's SIGTERM and torchrun's forward of it
            os.killpg(os.getpgid(0), sig) if os.environ.get("SIGNAL_GROUP") else os.kill(os.getpid(), sig)
    if updates[0] == raise_at and raise_rank == os.environ.get("RANK", "0"):
        raise RuntimeError(f"injected failure at {time.time()} in pid {os.getpid()}")
    if updates[0] == hold_at:
        if os.environ.get("RANK", "0") == "0":
            open(hold + ".tmp", "w").write(str(os.getpid()))
            os.rename(hold + ".tmp", hold)
        while not os.path.exists(hold + ".go"):
            time.sleep(0.05)


common.Checkpointer.save, common.optimizer_step = save_then_preempt, step_then_signal
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(ROOT, sys.argv[0]), run_name="__main__")
