"""The tests start scripts through tests/forkclient.py (a fork of a server that has imported torch): it must act as
`python SCRIPT ARGS...` does, or a test that passes through it would not say what a user's run does."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import python

SCRIPT = '''import atexit, os, signal, sys, time
what = sys.argv[1]
atexit.register(lambda: print("atexit", type(getattr(sys, "last_value", None)).__name__, file=sys.stderr))
print("argv", sys.argv[1:], "cwd", os.getcwd(), "path0", sys.path[0], "env", os.environ.get("PROBE"))
print("stdin", sys.stdin.read().strip())
sys.stdout.flush()
if what == "exit3":
    sys.exit(3)
if what == "raise":
    raise ValueError("boom")
if what == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
if what == "message":
    sys.exit("error: a message")
if what == "wait":
    open(sys.argv[2] + ".tmp", "w").write(str(os.getpid()))
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(60)
print("end", file=sys.stderr)
'''


@pytest.mark.parametrize("what", ["ok", "exit3", "raise", "sigterm", "message"])
def test_client_acts_as_python(what, tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PROBE="x y")
    real, forked = (subprocess.run(cmd + [str(script), what, "a b"], cwd=tmp_path, env=env, input="hello\n",
                                   capture_output=True, text=True, timeout=60)
                    for cmd in ([sys.executable], python()))
    assert forked.returncode == real.returncode and forked.stdout == real.stdout, (real, forked)
    assert forked.stderr.splitlines()[-2:] == real.stderr.splitlines()[-2:], (real.stderr, forked.stderr)
    assert f"path0 {tmp_path}" in forked.stdout and "env x y" in forked.stdout and "stdin hello" in forked.stdout


def test_signals_reach_the_script_and_a_killed_client_takes_it_along(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    for how in ("forward", "kill client"):
        started = tmp_path / how
        proc = subprocess.Popen(python(script, "wait", started), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                text=True)
        while not started.exists():
            time.sleep(0.05)
        pid = int(started.read_text())  # the script's process, not the client
        assert pid != proc.pid and os.path.exists(f"/proc/{pid}")
        if how == "forward":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == -signal.SIGTERM
        else:
            proc.kill()
            proc.wait(timeout=30)
        for _ in range(100):  # the script's process is gone too
            if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"{how}: the script's process {pid} still runs")
