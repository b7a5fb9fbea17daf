"""Run llamaprune commands and kill them at chosen moments: the fault-injection helper of tests/test_faults.py.

The heavy imports happen once here; each run is a forked child that calls the console entry point, so a kill
lands in llamaprune's own work, not in Python's start-up. Per job, a first run goes to completion and times the
command (T); then each kill runs the command into its own output and sends a signal at ``fraction * T``, and
notes the temporaries then left beside the outputs (the next run sweeps them).

    python tests/fault_runner.py spec.json  ->  one JSON line: per job, T and each kill's outcome
spec: {"logs": DIR, "jobs": [{"argv": [... "{out}" ...], "full": OUT, "kills": [[OUT, FRACTION, SIGNAL], ...]}]}
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402,F401  (imported before forking, as every module the commands use)
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import llamaprune.apply.command  # noqa: E402,F401
import llamaprune.recover.command  # noqa: E402,F401
import llamaprune.score.command  # noqa: E402,F401
from llamaprune.cli.app import main  # noqa: E402

TEMPORARY = re.compile(r"^\..+\.(tmp|old)-")  # what atomic_dir names its temporaries (docs/ARTIFACTS.md)


def start(argv: list[str], out: str, log: str) -> int:
    """Fork a child that runs ``llamaprune ARGV`` with ``{out}`` filled in; its output goes to ``log``."""
    pid = os.fork()
    if pid:
        return pid
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["llamaprune", *(arg.replace("{out}", out) for arg in argv)]
    code = 1
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def outcome(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def run_job(job: dict, logs: str) -> dict:
    began = time.perf_counter()
    _, status = os.waitpid(start(job["argv"], job["full"], os.path.join(logs, f"{job['argv'][0]}-full.log")), 0)
    seconds = time.perf_counter() - began
    kills = []
    for i, (out, fraction, signum) in enumerate(job["kills"]):
        pid = start(job["argv"], out, os.path.join(logs, f"{job['argv'][0]}-{i}.log"))
        time.sleep(fraction * seconds)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        _, killed = os.waitpid(pid, 0)
        parent = os.path.dirname(out)
        left = sorted(name for name in os.listdir(parent) if TEMPORARY.match(name))  # before the next run sweeps
        kills.append({"out": out, "at": round(fraction * seconds, 3), "signal": signum, "outcome": outcome(killed),
                      "left": left})
    return {"seconds": seconds, "full": outcome(status), "kills": kills}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    print(json.dumps([run_job(job, spec["logs"]) for job in spec["jobs"]]))
