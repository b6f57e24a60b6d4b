"""bench/report.py (plots and summary tables from results JSON) and
bench/reproduce.py (the one command behind them), on synthetic results
written here, so the expected numbers come from this file, not the code."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
import reproduce  # noqa: E402

sys.path.pop(0)

MiB = 1 << 20


def _row(method, size, time_ms, wire, rel=0.05, ef=False):
    n = size // 4
    t = time_ms / 1e3
    return dict(size=size, count=n, method=method, time_us=time_ms * 1e3, algbw=size / t / 1e9,
                busbw=size / t / 1e9 * 1.5, wire_mb=wire * n * 1.5 / 1e6, rel_rms=rel,
                rel_rms_mean_of_calls=rel / 5, error_feedback=ef, collective="allreduce")


def _write_run(path, rate, fp32_ms, squinch_ms, sizes=(MiB, 64 * MiB)):
    rows = []
    for size in sizes:
        k = size / (64 * MiB)
        rows += [_row("engine_fp32", size, fp32_ms * k, 4, rel=1e-8),
                 _row("squinch", size, squinch_ms * k, 0.75),
                 _row("squinch_ef", size, squinch_ms * k * 1.2, 0.75, ef=True)]
    doc = dict(network=f"shaped cluster: 4 hosts, every link {rate} each way (tc tbf)",
               world_size=4, versions={"squinchcomm": "test"}, rows=rows)
    path.write_text(json.dumps(doc))


def test_rate_and_crossover():
    assert report.rate_gbit("every link 200mbit each way") == pytest.approx(0.2)
    assert report.rate_gbit("# network ... every link 10gbit each way") == pytest.approx(10)
    with pytest.raises(ValueError, match="no link rate"):
        report.rate_gbit("loopback")
    # speedup 4 at 1 Gbit/s, 1/4 at 100 Gbit/s: log-linear midpoint is 10 Gbit/s
    assert report.crossover([1, 100], [4, 0.25]) == pytest.approx(10)
    assert report.crossover([1, 10], [3, 2]) is None


def test_report_writes_plots_and_summary(tmp_path):
    # 200 Mbit/s: 4000 vs 1000 ms; 1 Gbit/s: 900 vs 400; 10 Gbit/s: 200 vs 250
    for rate, fp32, sq in (("200mbit", 4000, 1000), ("1gbit", 900, 400), ("10gbit", 200, 250)):
        _write_run(tmp_path / f"shaped_4rank_{rate}.json", rate, fp32, sq)
    written = report.main(["--results", str(tmp_path)])
    names = {Path(w).name for w in written}
    assert {"busbw_vs_size.png", "speedup_vs_rate.png", "error_vs_bits.png",
            "summary.md"} <= names
    for w in written:
        assert Path(w).stat().st_size > 0
    text = (tmp_path / "summary.md").read_text()
    assert "| engine_fp32 | 100.7 |" in text  # 4 B/elem * 16Mi elem * 1.5 = 100.7 MB
    assert "4,000 (4.00x)" in text and "900 (2.25x)" in text and "200 (0.80x)" in text
    assert "1,200 (3.33x vs fp32)" in text  # squinch_ef: 4000 / 1200
    # crossover between 1 (2.25x) and 10 Gbit/s (0.8x), log-linear
    import math
    f = math.log(2.25) / (math.log(2.25) - math.log(0.8))
    assert f"**about {float(f'{10 ** f:.2g}'):g} Gbit/s**" in text


def test_reproduce_lists_every_step_without_running(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--list",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in ("codec", "quality", "pipeline", "mpi", "shaped", "collectives", "hier",
                 "train", "model", "companions", "parity", "diloco", "report"):
        assert f"[{step}]" in proc.stdout
    for rate in ("200mbit", "1gbit", "10gbit"):
        assert f"shaped_4rank_{rate}.json" in proc.stdout
    # every subcommand it runs exists
    from squinchcomm.bench import COMMANDS

    for cmds in reproduce.steps(tmp_path).values():
        for cmd, _ in cmds:
            if "squinchcomm.bench" in cmd:
                assert cmd[cmd.index("squinchcomm.bench") + 1] in COMMANDS
            if "--" in cmd:
                assert cmd[cmd.index("--") + 1] in COMMANDS


def test_reproduce_rejects_unknown_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--only",
                           "codec,nope", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "unknown step" in proc.stderr and "nope" in proc.stderr


def test_auto_table_names_the_pick_and_its_distance_from_the_fastest():
    """auto's pick is read from its wire bytes; the two ratios divide by the
    fastest of fp32, bf16 and Squinch at that rate and size."""
    size = 4 * MiB
    doc = dict(rows=[_row("engine_fp32", size, 40.0, 4, rel=1e-8), _row("bf16", size, 20.0, 2),
                     _row("squinch", size, 25.0, 0.75), _row("auto", size, 22.0, 2)])
    rows = report.rows_at(doc, size)
    assert report.auto_pick(rows) == "bf16"
    lines = report.auto_table({10.0: doc})
    assert "| 10 Gbit/s | 4 MiB | bf16 | bf16 (20.0 ms) | 1.00 | 1.10 |" in lines
    doc["rows"][-1] = _row("auto", size, 30.0, 0.75)  # picked Squinch: 25 / 20
    lines = report.auto_table({10.0: doc})
    assert "| 10 Gbit/s | 4 MiB | squinch | bf16 (20.0 ms) | 1.25 | 1.50 |" in lines
    assert report.auto_table({10.0: dict(rows=doc["rows"][:3])}) == []  # no auto row
