"""Run test worker processes with a deadline: the harness behind the real
multi-process torch.distributed tests (a deadlock fails a test, never hangs it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "PMI_RANK", "PMI_SIZE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    """This process's environment without any launcher variables, with the repo
    on PYTHONPATH, one thread per worker and gloo on loopback."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # never a host name that resolves elsewhere
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_workers(script: Path, args: list[str], envs: list[dict], deadline: float,
                what: str) -> list[str]:
    """Start ``python script *args`` once per environment (rank order), wait up
    to ``deadline`` seconds, kill what is left; fail the test with every rank's
    output if one failed or the deadline passed. Returns the outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs = [], []
        for rank, env in enumerate(envs):
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        end = time.monotonic() + deadline
        timed_out = False
        try:
            for p in procs:
                try:
                    p.wait(timeout=max(end - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            for p in procs:  # only the processes (and their sessions) started here
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    report = "\n".join(f"--- rank {r} exit {p.returncode} ---\n{out[-4000:]}"
                       for r, (p, out) in enumerate(zip(procs, outputs)))
    if timed_out:
        pytest.fail(f"{what} did not finish within {deadline:g} s (deadlock?)\n{report}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"{what} failed\n{report}")
    return outputs


def exit_after(body, *args) -> None:
    """Run a worker process's ``body(*args)`` and end the process: exit 0, or
    print the traceback and exit 1. ``os._exit``: a failed rank may leave a
    gloo or engine thread blocked, which a normal exit would wait for."""
    code = 0
    try:
        body(*args)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
