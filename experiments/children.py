"""Sub-experiments as child processes: ``jobs`` at a time, logged, timed, and stopped cleanly on Ctrl-C / SIGTERM.

Multi-step studies (``paper``, ``trusted``) run each unit of work as its own process through the one
command line, ``python -m experiments.cli <study> ARGS``, so a crash in one does not stop the others
and its exact command can be recorded. :func:`run_children` is the one place that starts, waits for
and stops them:

* every child runs in its own process group (a terminal's Ctrl-C reaches only the parent, which decides);
* on ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM through :func:`sigterm_as_interrupt`) no new child is
  started, every running child's group gets SIGTERM, then SIGKILL after ``grace`` seconds, and the
  interrupt propagates (the command line prints one line and exits 130). Children write their results
  atomically and resume from their checkpoints, so a rerun picks up every finished unit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["Child", "child_env", "cli_command", "run_children", "sigterm_as_interrupt"]


def cli_command(study: str, argv: List[str]) -> str:
    """``python -m experiments.cli <study> ARGS`` as a shell line (arguments with spaces or brackets quoted)."""
    quote = lambda a: f"'{a}'" if any(ch in a for ch in " []{},") else a  # noqa: E731
    return " ".join(["python", "-m", "experiments.cli", study] + [quote(a) for a in argv])


@dataclass
class Child:
    """One child process: ``python -m experiments.cli <study> <argv>``, stdout/stderr to ``log``."""

    name: str
    study: str
    argv: List[str]
    log: Path
    status: str = "pending"
    seconds: float = 0.0
    cpu_seconds: float = float("nan")
    returncode: Optional[int] = None
    message: str = ""

    def command(self) -> str:
        """The shell command that runs this child alone."""
        return cli_command(self.study, self.argv)


def child_env() -> Dict[str, str]:
    """The environment of a child: this checkout first on ``PYTHONPATH``, fixed hash seed, ``CI`` set (no bars)."""
    env = dict(os.environ, PYTHONHASHSEED="0", CI=os.environ.get("CI", "1"))
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    return env


def sigterm_as_interrupt() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread (so it stops a study as Ctrl-C does)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_children(children: Sequence[Child], jobs: int = 2, timeout: Optional[float] = None,
                 on_event: Callable[[str], None] = print, grace: float = 1.5) -> None:
    """Run ``children`` ``jobs`` at a time, in list order; each gets its status, wall and CPU seconds.

    CPU seconds are the child's user + sys time (``wait4``), which the machine's load does not change.
    A child that exits non-zero is ``failed`` with the last lines of its log; one past ``timeout``
    seconds is killed and ``failed``.

    Raises:
        KeyboardInterrupt: after stopping every running child (see the module docstring).
    """
    env = child_env()
    stop = threading.Event()
    lock = threading.Lock()
    live: Dict[int, subprocess.Popen] = {}
    queue = list(children)

    def one(c: Child) -> None:
        c.log.parent.mkdir(parents=True, exist_ok=True)
        on_event(f"start {c.name}: {c.command()}")
        t0 = time.perf_counter()
        rc, cpu = -1, float("nan")
        with open(c.log, "w") as fh:
            with lock:
                if stop.is_set():
                    c.status = "interrupted"
                    return
                proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", c.study] + c.argv, stdout=fh,
                                        stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(), start_new_session=True)
                live[proc.pid] = proc
            try:
                while True:
                    pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        rc, cpu = os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime
                        proc.returncode = rc
                        break
                    if stop.is_set():
                        c.status, c.seconds = "interrupted", time.perf_counter() - t0
                        return
                    if timeout is not None and time.perf_counter() - t0 > timeout:
                        _stop(proc, grace)
                        rc = -1
                        break
                    time.sleep(0.1)
            finally:
                with lock:
                    live.pop(proc.pid, None)
        c.seconds, c.cpu_seconds, c.returncode = time.perf_counter() - t0, cpu, rc
        if rc == 0:
            c.status = "done"
        else:
            tail = c.log.read_text(errors="replace").strip().splitlines()[-3:]
            c.status = "failed"
            c.message = f"exit code {rc}" + (" (timeout)" if rc == -1 else "") + ": " + " | ".join(tail)
        on_event(f"{c.name}: {c.status} in {c.seconds:.0f}s (cpu {cpu:.0f}s) {c.message}".rstrip())

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                c = queue.pop(0)
            one(c)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(jobs, len(queue))))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        with lock:
            procs = list(live.values())
        stoppers = [threading.Thread(target=_stop, args=(p, grace), daemon=True) for p in procs]
        for s in stoppers:
            s.start()
        for s in stoppers:
            s.join(grace + 6.0)
        for c in children:
            if c.status == "pending":
                c.status = "interrupted"
        raise
