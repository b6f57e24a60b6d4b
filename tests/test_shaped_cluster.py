"""bench/shaped_cluster.py builds a real bandwidth-limited cluster (network
namespaces + tc), runs benchmarks on it and removes it again, also when the
benchmark fails or the script is signalled. Needs root and ip/tc: skipped
otherwise."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "bench" / "shaped_cluster.py")
TINY_TRAIN = ["train", "--layers", "1", "--width", "32", "--heads", "2", "--seq", "32",
              "--batch", "2", "--steps", "2", "--warmup", "1"]


def _netns_usable():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    probe = subprocess.run(["ip", "netns", "add", "sqcprobe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "sqcprobe"], capture_output=True)
    return probe.returncode == 0


needs_netns = pytest.mark.skipif(not _netns_usable(),
                                 reason="needs root, iproute2 and network namespaces")


def _leftovers():
    return [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout.split() if n.startswith("sqc")]


def _running(marker: str) -> list[int]:
    """Pids of processes whose command line contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(
                    errors="replace").replace("\0", " "):
                pids.append(int(proc.name))
        except OSError:  # exited meanwhile
            pass
    return pids


# A long benchmark (64 MiB at 10 Mbit/s), marked by an unusual seed to find its ranks.
LONG = ["--rate", "10mbit", "--", "allreduce", "-b", "64M", "-e", "64M", "-n", "20",
        "--seed", "73571"]


def _cluster(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@needs_netns
def test_shaped_cluster_runs_and_cleans_up(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "r.json"
    # The old form: allreduce's options right after "--".
    proc = _cluster("--ranks", "2", "--rate", "200mbit", "--timeout", "240", "--", "-b", "1M",
                    "-e", "1M", "-n", "1", "-w", "1", "--methods", "engine_fp32,squinch",
                    "--json", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "every link 200mbit each way" in proc.stdout
    assert "bit-identical results on every rank: all rows" in proc.stdout
    assert _leftovers() == []  # torn down


@needs_netns
def test_train_on_two_hosts_with_log(tmp_path):
    pytest.importorskip("torch")
    log, out = tmp_path / "train.txt", tmp_path / "train.json"
    proc = _cluster("--ranks", "2", "--rate", "1gbit", "--timeout", "240", "--log", str(log),
                    "--", *TINY_TRAIN, "--methods", "hvd_fp32,squinch,ddp_squinch",
                    "--json", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # The log holds exactly rank 0's report (the command line first).
    assert log.read_text() == proc.stdout
    assert proc.stdout.startswith("# shaped cluster: python bench/shaped_cluster.py")
    assert "every link 1gbit each way" in proc.stdout
    assert "parameters bit-identical on every rank: all methods" in proc.stdout
    doc = json.loads(out.read_text())
    assert [r["method"] for r in doc["rows"]] == ["hvd_fp32", "squinch", "ddp_squinch"]
    assert doc["world_size"] == 2 and doc["nodes"] == 2 and doc["ranks_per_node"] == 1
    assert "every link 1gbit each way" in doc["network"]
    assert _leftovers() == []


@needs_netns
def test_ranks_per_host_are_one_node_to_squinchcomm():
    """4 ranks on 2 hosts: squinchcomm's node detection sees 2 nodes of 2 ranks,
    so its hierarchical mode turns on."""
    pytest.importorskip("torch")
    proc = _cluster("--ranks", "4", "--ranks-per-host", "2", "--rate", "1gbit", "--timeout",
                    "240", "--", *TINY_TRAIN, "--methods", "hvd_fp32,squinch", "--hierarchical")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "2 hosts x 2 ranks each, sharing its link" in proc.stdout
    assert "world 4  nodes 2 x 2 ranks (squinchcomm's node detection)  hierarchical on" \
        in proc.stdout
    assert "parameters bit-identical on every rank: all methods" in proc.stdout
    assert _leftovers() == []


@needs_netns
def test_a_failing_benchmark_is_reported_and_torn_down():
    pytest.importorskip("torch")
    proc = _cluster("--ranks", "2", "--rate", "1gbit", "--timeout", "120", "--", "allreduce",
                    "-b", "1M", "-e", "1M", "--methods", "nope", timeout=180)
    assert proc.returncode not in (0, 124)
    # Rank 1's own output, tail printed by the script: the benchmark's message.
    assert "--- rank 1 (host 1): exit code" in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.count("--methods 'nope'") >= 2  # rank 0 live, rank 1 in its tail
    assert _leftovers() == []


@needs_netns
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM),
                                       (signal.SIGINT, 130)])
def test_a_signal_tears_everything_down(sig, code):
    pytest.importorskip("torch")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--ranks", "2", *LONG],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        first = proc.stdout.readline()  # printed once the cluster is up
        assert first.startswith("# shaped cluster:"), first + proc.stderr.read()
        assert len(_leftovers()) == 3  # bridge + 2 hosts
        deadline = time.monotonic() + 60
        while len(_running("--seed 73571")) < 3:  # the script and its two ranks
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        if proc.poll() is None:  # the test failed: clean up as a user would
            proc.kill()
            proc.wait()
            _cluster("--cleanup", timeout=60)
    assert _leftovers() == [] and _running("--seed 73571") == []


@needs_netns
def test_the_timeout_kills_everything():
    pytest.importorskip("torch")
    proc = _cluster("--ranks", "2", "--timeout", "8", *LONG, timeout=120)
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert "ranks did not finish within 8 s" in proc.stderr
    assert "--- rank 1 (host 1): killed at the 8 s timeout" in proc.stderr
    assert _leftovers() == [] and _running("--seed 73571") == []


@needs_netns
@pytest.mark.parametrize("args, message", [
    (["--ranks", "3", "--ranks-per-host", "2"], "ranks must split into whole hosts"),
    (["--rate", "1gb"], "pass a tc rate like 200mbit"),
    (["--", "allreduse", "-b", "1M"], "'allreduse' is not a squinchcomm.bench command"),
])
def test_bad_arguments_fail_before_building(args, message):
    proc = _cluster(*args, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert _leftovers() == []


def test_missing_iproute2_is_named():
    if os.geteuid() != 0:
        pytest.skip("not root: the root check comes first")
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PATH="/nonexistent"))
    assert proc.returncode != 0 and "needs ip and tc (iproute2)" in proc.stderr


def test_needs_root_message():
    if os.geteuid() == 0:
        pytest.skip("running as root")
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "needs root" in proc.stderr

