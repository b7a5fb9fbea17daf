"""Run llamaprune commands and kill them at chosen moments: the fault-injection helper of tests/test_faults.py.

The heavy imports happen once here; each run is a forked child that calls the console entry point, so a kill
lands in llamaprune's own work, not in Python's start-up. Per job, a first run goes to completion and times the
command (T); then each kill runs the command into its own output and sends a signal at ``fraction * T``, or, with
``"temporary"`` for the fraction, as soon as the output's temporary directory exists and is locked (a kill that
surely lands while the output is half-written). It notes the temporaries then left beside the outputs (the next
run sweeps them) and whether the signal reached a running command: a child that has returned from the command
(whatever its exit code) leaves a marker file, and a child found with its marker is not signalled (its outcome is
then the command's own).

    python tests/fault_runner.py spec.json  ->  one JSON line: per job, T and each kill's outcome
spec: {"logs": DIR, "jobs": [{"argv": [... "{out}" ...], "full": OUT, "kills": [[OUT, FRACTION, SIGNAL], ...]}]}
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402,F401  (imported before forking, as every module the commands use)
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import llamaprune.apply.command  # noqa: E402,F401
import llamaprune.recover.command  # noqa: E402,F401
import llamaprune.scoring.command  # noqa: E402,F401
from llamaprune.cli.app import main  # noqa: E402
from llamaprune.core.temporaries import LOCK  # noqa: E402

TEMPORARY = re.compile(r"^\..+\.(tmp|old)-")  # what atomic_dir names its temporaries (docs/ARTIFACTS.md)


def start(argv: list[str], out: str, log: str) -> int:
    """Fork a child that runs ``llamaprune ARGV`` with ``{out}`` filled in; its output goes to ``log``, and
    ``log + ".returned"`` is made once the command has returned."""
    pid = os.fork()
    if pid:
        return pid
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["llamaprune", *(arg.replace("{out}", out) for arg in argv)]
    code, returned = 1, False
    try:
        main()
    except SystemExit as done:
        code, returned = (done.code if isinstance(done.code, int) else 0), True
    finally:
        try:  # a SIGTERM from here on is ignored (no Terminated raised past os._exit, so no child runs on)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            sys.stdout.flush()
            sys.stderr.flush()
            if returned:
                os.close(os.open(returned_marker(log), os.O_WRONLY | os.O_CREAT, 0o644))
        finally:
            os._exit(code)


def returned_marker(log: str) -> str:
    return log + ".returned"


def outcome(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def locked_temporary(out: str) -> bool:
    """Whether ``out``'s temporary directory exists and holds its lock file (atomic_dir's ``.NAME.tmp-XXXX``)."""
    parent, prefix = os.path.dirname(out), f".{os.path.basename(out)}.tmp-"
    return any(name.startswith(prefix) and os.path.exists(os.path.join(parent, name, LOCK))
               for name in os.listdir(parent))


def wait_for(pid: int, out: str, log: str, when, seconds: float) -> bool:
    """Wait until the moment to signal: ``when * seconds`` after the start, or (``when == "temporary"``) until the
    output's temporary is locked. False if the command returned (or the child ended) first."""
    if when != "temporary":
        time.sleep(when * seconds)
        return not os.path.exists(returned_marker(log))
    while not os.path.exists(returned_marker(log)):
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:  # ended; not reaped
            return False
        if locked_temporary(out):
            return True
        time.sleep(0.0005)
    return False


def run_job(job: dict, logs: str) -> dict:
    began = time.perf_counter()
    _, status = os.waitpid(start(job["argv"], job["full"], os.path.join(logs, f"{job['argv'][0]}-full.log")), 0)
    seconds = time.perf_counter() - began
    kills = []
    for i, (out, when, signum) in enumerate(job["kills"]):
        log = os.path.join(logs, f"{job['argv'][0]}-{i}.log")
        began = time.perf_counter()
        pid = start(job["argv"], out, log)
        running = wait_for(pid, out, log, when, seconds)
        at = time.perf_counter() - began
        if running:  # the command has not returned: the signal interrupts it
            os.kill(pid, signum)
        _, killed = os.waitpid(pid, 0)
        if running and outcome(killed) == "exit 0" and os.path.exists(returned_marker(log)):
            running = False  # it returned between the check and the signal, which then found SIGTERM ignored
        parent = os.path.dirname(out)
        left = sorted(name for name in os.listdir(parent) if TEMPORARY.match(name))  # before the next run sweeps
        kills.append({"out": out, "when": when, "at": round(at, 3), "signal": signum, "running": running,
                      "outcome": outcome(killed), "left": left})
    return {"seconds": seconds, "full": outcome(status), "kills": kills}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    print(json.dumps([run_job(job, spec["logs"]) for job in spec["jobs"]]))
