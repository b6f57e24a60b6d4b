"""bench/shaped_cluster.py builds a real bandwidth-limited cluster (network
namespaces + tc) and removes it again. Needs root and ip/tc: skipped otherwise."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _netns_usable():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    probe = subprocess.run(["ip", "netns", "add", "sqcprobe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "sqcprobe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _netns_usable(), reason="needs root, iproute2 and network namespaces")
def test_shaped_cluster_runs_and_cleans_up(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "shaped_cluster.py"), "--ranks", "2", "--rate",
         "200mbit", "--timeout", "240", "--", "-b", "1M", "-e", "1M", "-n", "1", "-w", "1",
         "--methods", "engine_fp32,squinch", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "every link 200mbit each way" in proc.stdout
    assert "bit-identical results on every rank: all rows" in proc.stdout
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "sqc" not in left  # torn down


def test_needs_root_message():
    if os.geteuid() == 0:
        pytest.skip("running as root")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "shaped_cluster.py")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "needs root" in proc.stderr


def test_plot_reads_the_committed_results():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import plot_shaped
    finally:
        sys.path.pop(0)
    assert plot_shaped.rate_gbit("every link 200mbit each way") == 0.2
    assert plot_shaped.rate_gbit("# network ... every link 10gbit each way") == 10.0
    with pytest.raises(ValueError, match="no link rate"):
        plot_shaped.rate_gbit("loopback")
    paths = sorted((ROOT / "bench" / "results").glob("shaped_4rank_*_64M.json"))
    if not paths:
        pytest.skip("no shaped-cluster results committed")
    series = plot_shaped.load(paths)
    rates = [r for r, _ in series["engine_fp32"]]
    assert rates == sorted(rates) and len(rates) == len(paths)
    assert all(t > 0 for pts in series.values() for _, t in pts)
