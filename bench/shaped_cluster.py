"""A bandwidth-limited cluster on one machine: hosts as network namespaces.

    sudo python bench/shaped_cluster.py --ranks 4 --rate 1gbit -- \\
        allreduce -b 64M -e 64M -n 3 -w 1 --methods engine_fp32,squinch,fp16
    sudo python bench/shaped_cluster.py --ranks 8 --ranks-per-host 2 --rate 1gbit \\
        --log train.txt -- train --steps 10
    sudo python bench/shaped_cluster.py --cleanup     # leftovers of a killed run

What it builds and runs:

1. A bridge namespace with no uplink and ``--ranks / --ranks-per-host`` host
   namespaces, each joined to the bridge by a veth pair with an address in
   10.77.0.0/24 (used only inside these namespaces).
2. Every link is shaped with ``tc`` tbf in both directions (host egress and
   bridge egress towards the host) to ``--rate``; ``--delay`` adds netem
   latency in each direction.
3. ``--ranks-per-host`` ranks per host namespace, like the GPUs of a node:
   they share the host's shaped link, and their traffic to each other stays
   on the namespace's loopback (unshaped). Each rank runs
   ``python -m squinchcomm.bench <command> ...`` (the arguments after ``--``)
   with torchrun's variables (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
   WORLD_SIZE, MASTER_ADDR/PORT = host 0) and GLOO_SOCKET_IFNAME, so torch
   gloo runs over the namespace's interface and squinchcomm sees one node per
   host. ``--transport torch`` is added for the commands that take it;
   arguments starting with ``-`` right after ``--`` are ``allreduce``'s (the
   old form). SQUINCHCOMM_BENCH_NETWORK describes the cluster to the
   benchmark, which records it in its header and JSON.
4. Rank 0's report is printed (and saved with ``--log``); a failing rank's
   last lines are printed; once a rank fails the others get a few seconds,
   then are killed, as is everything at ``--timeout``.
5. Everything is torn down afterwards, also on failure, SIGTERM, SIGHUP or
   Ctrl-C. Needs root and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "sqc"  # every namespace and link this script creates starts with it
SUBNET = "10.77.0"
ROOT = Path(__file__).resolve().parents[1]
MASTER_PORT = 29555
#: squinchcomm.bench commands that take ``--transport`` (torch is added for them).
TRANSPORT_COMMANDS = ("allreduce", "reduce_scatter", "allgather")
DEFAULT_COMMAND = ["allreduce", "-b", "64M", "-e", "64M", "-n", "3", "-w", "1"]
GRACE_S = 10.0  # after one rank fails, how long the others may take to fail too
TAIL_LINES = 40


def sh(*cmd: str, check: bool = True):
    """Run a command; raise with its stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout.split()
    return [n for n in out if n.startswith(PREFIX)]


def teardown():
    """Kill what still runs in this script's namespaces, then delete them (their
    veths go with them; a namespace with a live process would outlive its name)."""
    for ns in namespaces():
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", ns, check=False)


def shape(ns: str, dev: str, rate: str, delay: str | None):
    """tbf at ``rate`` on ``dev``'s egress (below a netem delay when asked)."""
    if delay:
        try:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle",
               "1:", "netem", "delay", delay)
        except RuntimeError as e:
            raise RuntimeError(f"{e} (--delay needs the kernel's netem qdisc, sch_netem: load "
                               "it with modprobe sch_netem, or run without --delay)") from None
        parent = ["parent", "1:1", "handle", "10:"]
    else:
        parent = ["root"]
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *parent, "tbf", "rate", rate,
       "burst", "256kb", "latency", "50ms")


def host_ns(host: int) -> str:
    return f"{PREFIX}h{host}"


def build(hosts: int, rate: str, delay: str | None):
    """Step 1: the bridge namespace; step 2: one shaped namespace per host."""
    bridge = f"{PREFIX}br"
    sh("ip", "netns", "add", bridge)
    sh("ip", "netns", "exec", bridge, "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", bridge, "ip", "link", "set", "br0", "up")
    for h in range(hosts):
        host, veth_h, veth_b = host_ns(h), f"{PREFIX}v{h}", f"{PREFIX}b{h}"
        sh("ip", "netns", "add", host)
        sh("ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_h, "netns", host)
        sh("ip", "link", "set", veth_b, "netns", bridge)
        sh("ip", "netns", "exec", host, "ip", "link", "set", veth_h, "name", "eth0")
        sh("ip", "netns", "exec", host, "ip", "addr", "add", f"{SUBNET}.{h + 1}/24", "dev", "eth0")
        sh("ip", "netns", "exec", host, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", host, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", bridge, "ip", "link", "set", veth_b, "master", "br0")
        sh("ip", "netns", "exec", bridge, "ip", "link", "set", veth_b, "up")
        if rate != "none":  # none: the same namespaces, links unshaped (the reference)
            shape(host, "eth0", rate, delay)  # host -> bridge
            shape(bridge, veth_b, rate, delay)  # bridge -> host


def bench_command(tokens: list[str]) -> list[str]:
    """The ``squinchcomm.bench`` command line from the arguments after ``--``."""
    if not tokens:
        return list(DEFAULT_COMMAND)
    if tokens[0].startswith("-"):  # the old form: allreduce's options only
        tokens = ["allreduce", *tokens]
    sys.path.insert(0, str(ROOT))  # the checkout the ranks run (PYTHONPATH below)
    from squinchcomm.bench import COMMANDS

    command, rest = tokens[0], tokens[1:]
    if command not in COMMANDS:
        raise SystemExit(f"'{command}' is not a squinchcomm.bench command: put one of "
                         f"{', '.join(COMMANDS)} right after '--'")
    given = any(t == "--transport" or t.startswith("--transport=") for t in rest)
    if command in TRANSPORT_COMMANDS and not given:
        rest = ["--transport", "torch", *rest]
    return [command, *rest]


def describe(hosts: int, per_host: int, rate: str, delay: str | None) -> str:
    """The network line benchmarks record (plot_shaped.py reads 'every link <rate>')."""
    ranks = f"{per_host} ranks each, sharing its link" if per_host > 1 else "1 rank each"
    return (f"shaped cluster: {hosts} hosts x {ranks} (network namespaces on one machine), "
            + ("links unshaped (veth, no tc)" if rate == "none" else
               f"every link {rate} each way (tc tbf)")
            + (f", +{delay} latency each way (netem)" if delay else "")
            + ", torch gloo over veth + bridge")


class Rank:
    """One rank's process and its captured output (a file, so a chatty rank
    cannot block on a full pipe). Rank 0 (``echo``: where its stdout goes too)
    is read through pipes instead, line by line, so its report appears live."""

    def __init__(self, rank: int, host: int, cmd: list[str], env: dict, logdir: str,
                 echo: list | None = None):
        self.rank, self.host = rank, host
        self.path = Path(logdir, f"rank{rank}.txt")
        self.fate = None  # why we killed it, if we did
        self.out = open(self.path, "w")
        self.pumps = []
        if echo is None:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            return
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        for stream, sinks in ((self.proc.stdout, [self.out, *echo]),
                              (self.proc.stderr, [self.out, sys.stderr])):
            t = threading.Thread(target=_pump, args=(stream, sinks), daemon=True)
            t.start()
            self.pumps.append(t)

    def kill(self, fate: str):
        """Kill it (and anything it started) unless it has exited; remember why."""
        if self.proc.poll() is None:
            self.fate = fate
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pgid == pid
            except ProcessLookupError:
                pass
        self.proc.wait()

    def tail(self) -> str:
        """Its last lines, once its output is complete."""
        for t in self.pumps:
            t.join(timeout=5)
        self.out.close()
        lines = self.path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-TAIL_LINES:])


def _pump(stream, sinks):
    """Copy a child's output line by line to every sink that still takes it."""
    sinks = list(sinks)
    for line in stream:
        for s in list(sinks):
            try:
                s.write(line)
                s.flush()
            except (OSError, ValueError):  # e.g. a closed pipe: keep draining the child
                sinks.remove(s)


def run(hosts: int, per_host: int, command: list[str], timeout: float, network: str,
        log) -> int:
    """Step 3 and 4: start the ranks, wait, report failures; return the exit code."""
    world = hosts * per_host
    base = dict(os.environ, SQUINCHCOMM_BENCH_NETWORK=network, WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(per_host), MASTER_ADDR=f"{SUBNET}.1",
                MASTER_PORT=str(MASTER_PORT), GLOO_SOCKET_IFNAME="eth0",
                NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ranks: list[Rank] = []
    with tempfile.TemporaryDirectory(prefix="sqc-ranks-") as logdir:
        try:
            for r in range(world):
                h = r // per_host
                cmd = ["ip", "netns", "exec", host_ns(h), sys.executable, "-m",
                       "squinchcomm.bench", *command]
                env = dict(base, RANK=str(r), LOCAL_RANK=str(r % per_host), GROUP_RANK=str(h))
                echo = ([sys.stdout] + ([log] if log else [])) if r == 0 else None
                ranks.append(Rank(r, h, cmd, env, logdir, echo))
            code = _wait(ranks, timeout)
        finally:
            for rk in ranks:
                rk.kill("interrupted")
        for rk in ranks:
            rc = rk.proc.returncode
            if rc or rk.fate:
                why = rk.fate or f"exit code {rc}"
                tail = rk.tail()
                print(f"--- rank {rk.rank} (host {rk.host}): {why}; "
                      + ("its output is above ---" if rk.pumps else f"its last lines ---\n{tail}"),
                      file=sys.stderr)
            else:
                rk.tail()  # drain rank 0's output before returning
    return code


def _wait(ranks: list[Rank], timeout: float) -> int:
    """Wait for every rank; kill the rest GRACE_S after a failure or at the timeout."""
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(rk.proc.poll() is None for rk in ranks):
        now = time.monotonic()
        if failed_at is None and any(rk.proc.poll() for rk in ranks):
            failed_at = now
        if now > deadline:
            print(f"# shaped cluster: ranks did not finish within {timeout:g} s; killing them",
                  file=sys.stderr)
            for rk in ranks:
                rk.kill(f"killed at the {timeout:g} s timeout")
            return 124
        if failed_at is not None and now - failed_at > GRACE_S:
            for rk in ranks:
                rk.kill(f"killed {GRACE_S:g} s after another rank failed")
        time.sleep(0.1)
    # The first rank that failed by itself names the exit code (signals: 1).
    own = [rk.proc.returncode for rk in ranks if rk.proc.returncode and rk.fate is None]
    if own:
        return own[0] if own[0] > 0 else 1
    return 1 if any(rk.proc.returncode for rk in ranks) else 0


def _check_host():
    """Root, and iproute2's ip and tc: say what is missing and how to get it."""
    if os.geteuid() != 0:
        raise SystemExit("bench/shaped_cluster.py needs root (ip netns, tc): run it with sudo")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"bench/shaped_cluster.py needs {' and '.join(missing)} (iproute2): "
                         "install it, e.g. apt-get install iproute2")


def _on_signal(signum, _frame):
    sys.exit(128 + signum)  # raises SystemExit: the finally blocks tear everything down


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tokens = []
    if "--" in argv:
        i = argv.index("--")
        argv, tokens = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s [options] [-- COMMAND [ARGS...]]")
    p.add_argument("--ranks", type=int, default=4, help="ranks in all (default 4)")
    p.add_argument("--ranks-per-host", type=int, default=1,
                   help="ranks per host namespace, sharing its link (default 1)")
    p.add_argument("--rate", default="1gbit", help="tc rate per link and direction, e.g. "
                   "200mbit; none: unshaped links (the same cluster, as a reference)")
    p.add_argument("--delay", default=None, help="added one-way latency, e.g. 1ms (netem)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before everything is "
                                                              "killed (default 900)")
    p.add_argument("--log", metavar="FILE", help="also write rank 0's report to FILE")
    p.add_argument("--cleanup", action="store_true", help="only remove leftover namespaces")
    args = p.parse_args(argv)
    _check_host()
    if args.cleanup:
        teardown()
        return 0
    if args.ranks < 1 or args.ranks_per_host < 1 or args.ranks % args.ranks_per_host:
        raise SystemExit(f"--ranks {args.ranks} --ranks-per-host {args.ranks_per_host}: the "
                         "ranks must split into whole hosts (ranks a multiple of ranks-per-host)")
    hosts = args.ranks // args.ranks_per_host
    if hosts > 250:
        raise SystemExit(f"{hosts} hosts: at most 250 fit the 10.77.0.0/24 subnet")
    if args.rate != "none" and not re.fullmatch(r"\d+(\.\d+)?(kbit|mbit|gbit)", args.rate):
        raise SystemExit(f"--rate {args.rate!r}: pass a tc rate like 200mbit, 1gbit or 10gbit, "
                         "or none (unshaped links, the reference to compare with)")
    if args.rate == "none" and args.delay:
        raise SystemExit("--delay needs a --rate (netem sits below the tbf shaper)")
    if args.delay and not re.fullmatch(r"\d+(\.\d+)?(us|ms|s)", args.delay):
        raise SystemExit(f"--delay {args.delay!r}: pass a netem delay like 500us or 1ms")
    command = bench_command(tokens)
    if namespaces():
        raise SystemExit(f"namespaces {namespaces()} exist: another run is active, or run "
                         "with --cleanup")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    network = describe(hosts, args.ranks_per_host, args.rate, args.delay)
    log = open(args.log, "w") if args.log else None
    try:
        build(hosts, args.rate, args.delay)
        line = ("# shaped cluster: python bench/shaped_cluster.py "
                + " ".join([*argv, "--", *command]) + "\n")
        for out in [sys.stdout] + ([log] if log else []):
            out.write(line)
            out.flush()
        return run(hosts, args.ranks_per_host, command, args.timeout, network, log)
    except RuntimeError as e:  # a failed ip/tc call
        raise SystemExit(f"bench/shaped_cluster.py could not build the cluster: {e}") from None
    except KeyboardInterrupt:
        print("# shaped cluster: interrupted; tearing down", file=sys.stderr)
        return 130
    finally:
        teardown()
        if log:
            log.close()


if __name__ == "__main__":
    sys.exit(main())
