"""`python tests/forkclient.py SCRIPT ARGS...` (or `-m MODULE ARGS...`) acts as `python SCRIPT ARGS...`, but the
script runs in a process forked from tests/forkserver.py (the server conftest.py started, named by
$MIMLAB_FORKSERVER), which has imported torch already. This process passes its argv, environment, working
directory and stdin/stdout/stderr, forwards SIGINT, SIGTERM and SIGHUP, and ends as the script ends (the same exit
code, or killed by the same signal). Standard library only: it starts in milliseconds."""
import json
import os
import signal
import socket
import sys

conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(os.environ["MIMLAB_FORKSERVER"])
request = json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}) + "\n"
socket.send_fds(conn, [request.encode()], [0, 1, 2])
reply = conn.makefile("r")
pid = int(reply.readline())
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
line = reply.readline()
if not line:  # the supervisor is gone (cannot happen unless the server was killed)
    sys.exit(1)
code = os.waitstatus_to_exitcode(int(line))
if code < 0:  # killed by a signal: so is this process
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
