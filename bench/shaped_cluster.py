"""A bandwidth-limited cluster on one machine: N hosts as network namespaces.

    sudo python bench/shaped_cluster.py --ranks 4 --rate 1gbit -- \
        -b 64M -e 64M -n 3 -w 1 --methods engine_fp32,squinch,fp16

Builds a bridge namespace with no uplink and N host namespaces, each joined to
the bridge by a veth pair with addresses in 10.77.0.0/24 (these namespaces
only). Every link is shaped with ``tc`` tbf in both directions (host egress
and bridge egress towards the host) to ``--rate`` (optional ``--delay`` adds
netem latency). One rank per namespace runs
``python -m squinchcomm.bench allreduce --transport torch`` (torch.distributed
gloo over the namespace interface) with the arguments after ``--``; rank 0's
report is printed. Everything is torn down afterwards, also on failure or
Ctrl-C; ``--cleanup`` removes leftovers of an interrupted run. Needs root.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "sqc"  # every namespace and link this script creates starts with it
SUBNET = "10.77.0"
ROOT = Path(__file__).resolve().parents[1]


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
    """Delete every namespace this script made (their veths go with them)."""
    for ns in namespaces():
        sh("ip", "netns", "del", ns, check=False)


def shape(ns: str, dev: str, rate: str, delay: str | None):
    """tbf at ``rate`` on ``dev``'s egress (plus netem delay when asked)."""
    if delay:
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
           "netem", "delay", delay)
        parent = ["parent", "1:1", "handle", "10:"]
    else:
        parent = ["root"]
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *parent, "tbf", "rate", rate,
       "burst", "256kb", "latency", "50ms")


def build(ranks: int, rate: str, delay: str | None):
    """Step 1: the bridge namespace; step 2: one shaped host namespace per rank."""
    bridge = f"{PREFIX}br"
    sh("ip", "netns", "add", bridge)
    sh("ip", "netns", "exec", bridge, "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", bridge, "ip", "link", "set", "br0", "up")
    for r in range(ranks):
        host, veth_h, veth_b = f"{PREFIX}h{r}", f"{PREFIX}v{r}", f"{PREFIX}b{r}"
        sh("ip", "netns", "add", host)
        sh("ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_h, "netns", host)
        sh("ip", "link", "set", veth_b, "netns", bridge)
        sh("ip", "netns", "exec", host, "ip", "link", "set", veth_h, "name", "eth0")
        sh("ip", "netns", "exec", host, "ip", "addr", "add", f"{SUBNET}.{r + 1}/24", "dev", "eth0")
        sh("ip", "netns", "exec", host, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", host, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", bridge, "ip", "link", "set", veth_b, "master", "br0")
        sh("ip", "netns", "exec", bridge, "ip", "link", "set", veth_b, "up")
        shape(host, "eth0", rate, delay)  # host -> bridge
        shape(bridge, veth_b, rate, delay)  # bridge -> host


def run(ranks: int, bench_args: list[str], timeout: float, network: str) -> int:
    """Step 3: one rank per namespace; print rank 0's report; return the exit code."""
    env = dict(os.environ, SQUINCHCOMM_BENCH_NETWORK=network, WORLD_SIZE=str(ranks), MASTER_ADDR=f"{SUBNET}.1",
               MASTER_PORT="29555", GLOO_SOCKET_IFNAME="eth0", NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    for r in range(ranks):
        cmd = ["ip", "netns", "exec", f"{PREFIX}h{r}", sys.executable, "-m",
               "squinchcomm.bench", "allreduce", "--transport", "torch", *bench_args]
        procs.append(subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK="0",
                                                     LOCAL_WORLD_SIZE="1"),
                                      stdout=subprocess.PIPE if r else None,
                                      stderr=subprocess.STDOUT, cwd=ROOT, text=True))
    deadline = time.monotonic() + timeout
    code = 0
    try:
        for p in procs:
            code |= p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        print(f"# shaped cluster: ranks did not finish within {timeout:g} s", file=sys.stderr)
        code = 124
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs[1:], 1):
        if p.returncode:
            print(f"--- rank {r} ---\n{p.stdout.read()[-3000:]}", file=sys.stderr)
    return code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    else:
        bench_args = ["-b", "64M", "-e", "64M", "-n", "3", "-w", "1"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rate", default="1gbit", help="tc rate per link and direction, e.g. 200mbit")
    p.add_argument("--delay", default=None, help="added one-way latency, e.g. 1ms (netem)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--cleanup", action="store_true", help="only remove leftover namespaces")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/shaped_cluster.py needs root (ip netns, tc): run it with sudo")
    if args.cleanup:
        teardown()
        return 0
    if namespaces():
        raise SystemExit(f"namespaces {namespaces()} exist: another run is active, or run "
                         "with --cleanup")
    # Tear down on Ctrl-C / SIGTERM too: the finally below runs on SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        build(args.ranks, args.rate, args.delay)
        network = (f"shaped cluster: {args.ranks} hosts (network namespaces on one machine), "
                   f"every link {args.rate} each way (tc tbf)"
                   f"{', +' + args.delay + ' latency (netem)' if args.delay else ''}, "
                   "torch gloo over veth + bridge")
        return run(args.ranks, bench_args, args.timeout, network)
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
