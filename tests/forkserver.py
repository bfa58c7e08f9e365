"""The tests' process starter: `python SCRIPT ARGS...` without paying the interpreter start-up each time.
torch, torchvision, open_clip and common are imported once (about 4 s here, most of a smoke run), then the server
forks a fresh process per request. tests/forkclient.py is the client: `python tests/forkclient.py SCRIPT ARGS...`
behaves as `python SCRIPT ARGS...` would (the same argv, environment, working directory, stdin/stdout/stderr,
exit code or killing signal), and forwards SIGINT / SIGTERM / SIGHUP to the script. Run by tests/conftest.py:
`python tests/forkserver.py SOCKET` prints "ready" once listening; it stops when its parent (pytest) is gone.
The script's torch threads follow OMP_NUM_THREADS in its environment, as in a fresh interpreter; when it ends, its
atexit handlers run as the interpreter's exit runs them (an uncaught exception kept in sys.last_value meanwhile).
Each request gets a supervisor (a fork of the server) that forks the script's process (a new process group, as a
shell job), tells the client its pid, waits for it and sends the exit status back; if the client disappears
(killed, timed out) the supervisor SIGKILLs the script's process group."""
import atexit
import ctypes
import json
import os
import runpy
import select
import signal
import socket
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = sys.path[1:]  # sys.path after the script's own folder, as `python SCRIPT` starts with it
sys.path.insert(0, ROOT)
import torch, torchvision, open_clip, common  # noqa: E401,F401,E402  the slow imports, once, before any fork
THREADS = torch.get_num_threads()  # what a fresh `python SCRIPT` gets without OMP_NUM_THREADS


def recv_request(conn):
    """One JSON line {argv, env, cwd}, sent with the client's stdin, stdout and stderr (SCM_RIGHTS)."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise EOFError
        data += more
    return json.loads(data), fds


def die_with_parent():
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL): when the server ends (pytest is done), nothing it started lives on."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_script(req, fds):
    """In the script's process: become `python ARGV...` and never return."""
    code = 1
    try:
        die_with_parent()
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or THREADS))  # as a fresh interpreter reads it
        argv, code = req["argv"], 0
        if argv[0] == "-m":  # python -m MODULE ARGS...
            sys.path[:] = [os.getcwd()] + PATH
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.path[:] = [os.path.dirname(os.path.abspath(argv[0]))] + PATH
            sys.argv = argv
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (e.code is not None and print(e.code, file=sys.stderr) or 1)
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        sys.last_type, sys.last_value, sys.last_traceback = sys.exc_info()  # as the interpreter keeps them, frames and all
        code = 1
    try:  # then the interpreter's exit: the atexit handlers (multiprocessing's joins its children, torch's, the script's)
        atexit._run_exitfuncs()
        sys.stdout.flush(), sys.stderr.flush()
    finally:
        os._exit(code)


def supervise(conn):
    """In the supervisor: start the script's process, report its pid and then its exit status to the client."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    req, fds = recv_request(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        run_script(req, fds)
    try:
        os.setpgid(pid, pid)  # also here, so that the kill below cannot miss it (the usual race)
    except OSError:
        pass
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            conn.sendall(f"{status}\n".encode())
            return
        if select.select([conn], [], [], 0.05)[0] and not conn.recv(1):  # the client is gone: so is the script
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return


def serve(path):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped as they end
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    server.settimeout(1.0)
    print("ready", flush=True)
    while os.getppid() == parent:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            server.close()
            try:
                supervise(conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
