"""Runs many command lines of the scripts as separate processes that share one interpreter start-up.
torch is imported once (3 s here); then each case is a fork that runs `python SCRIPT ARGS...` through
runpy, with its own exit code, stdout and stderr, exactly as a user's shell would see them.
stdin: JSON {name: [script, arg, ...] or {"argv": [...], "env": {...}}}, run in that order;
stdout: JSON {name: [exit code, stdout, stderr]}."""
import json
import os
import runpy
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch, torchvision, common  # noqa: E401,F401  the slow imports, once, before any fork


def run(argv, env=None):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: a fresh `python SCRIPT ARGS...` but for the interpreter start-up
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            sys.argv, code = argv, 0
            os.environ.update(env or {})
            try:
                runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (e.code is not None and print(e.code, file=sys.stderr) or 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0), err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


if __name__ == "__main__":
    os.chdir(ROOT)
    cases = json.load(sys.stdin)
    cases = {name: c if isinstance(c, dict) else {"argv": c} for name, c in cases.items()}
    json.dump({name: run(c["argv"], c.get("env")) for name, c in cases.items()}, sys.stdout)
