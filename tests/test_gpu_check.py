"""bench/gpu_check.sh, the device check, runs end to end on a CPU machine
(every GPU part reported as skipped, logs and summary written), and its part
runner keeps to its budgets: a part past its budget is stopped and reported,
a part with too little time left is skipped, a failing command fails its part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from squinchcomm.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_check_on_a_machine_without_gpu_skips_every_part(tmp_path):
    if gpu_check.gpu_reason() is None:
        pytest.skip("this machine has a GPU: the check would really run")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [p["name"] for p in summary["parts"]]
    assert names == ["kernels", "arrays", "torch", "bench", "sanitizer", "parity"]
    assert summary["gpu"] is False
    for part in summary["parts"]:
        assert part["status"] == "skipped" and part["reason"].startswith("no GPU:"), part
    assert sum(p["budget_s"] for p in summary["parts"]) <= 540  # fits the 9 minutes
    # The table is printed last, one line per part.
    table = proc.stdout.strip().splitlines()[-7:]
    assert table[0].split()[:2] == ["part", "status"]
    assert [line.split()[0] for line in table[1:]] == names
    assert (tmp_path / "summary.txt").read_text().strip().splitlines() == table


def test_script_needs_an_output_folder():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "usage: bench/gpu_check.sh OUT_FOLDER" in proc.stderr


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--only", "kernels,warp_drive"])


def _part(commands, budget=30.0, minimum=0.0):
    return gpu_check.Part("p", "a test part", budget, minimum, commands)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_part_runner_statuses(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    ok = gpu_check.run_part(1, _part([_py("print('3 passed, 2 skipped in 1.0s')"),
                                      _py("print('\\x1b[32m== 1 passed in 0.1s ==')")]),
                            tmp_path, 100, env)
    assert ok.status == "passed" and ok.numbers == {"passed": 4, "skipped": 2}
    assert "3 passed" in (tmp_path / ok.log).read_text()

    bad = gpu_check.run_part(2, _part([_py("import sys; sys.exit(4)"), _py("print('never')")]),
                             tmp_path, 100, env)
    assert bad.status == "failed" and bad.reason.startswith("exit 4")
    assert "never" not in (tmp_path / bad.log).read_text()  # stops at the first failure

    slow = gpu_check.run_part(3, _part([_py("import time; time.sleep(30)")], budget=1.5),
                              tmp_path, 100, env)
    assert slow.status == "timeout" and slow.seconds < 10

    short = gpu_check.run_part(4, _part([_py("pass")], minimum=20), tmp_path, 10, env)
    assert short.status == "skipped" and "10 s left" in short.reason

    absent = gpu_check.run_part(5, _part([["no-such-tool-xyz", "--flag"]]), tmp_path, 100, env)
    assert absent.status == "skipped" and "no-such-tool-xyz is not installed" in absent.reason


def test_whole_check_budget_skips_later_parts(tmp_path, monkeypatch):
    """When the parts before it used the time, a part is skipped, not started."""
    monkeypatch.setattr(gpu_check, "gpu_reason", lambda: None)
    fake = [gpu_check.Part("first", "", 2.0, 0.0, [_py("import time; time.sleep(1.5)")]),
            gpu_check.Part("second", "", 10.0, 5.0, [_py("pass")])]
    monkeypatch.setattr(gpu_check, "parts", lambda out: fake)
    monkeypatch.setattr(gpu_check, "machine", lambda: {})
    summary = gpu_check.check(tmp_path, budget_s=6.0)
    first, second = summary["parts"]
    assert first["status"] == "passed"
    assert second["status"] == "skipped" and "part needs >= 5 s" in second["reason"]


def test_bench_help_lists_every_command():
    """``python -m squinchcomm.bench --help`` lists the commands, one line
    each, and exits 0 (it used to exit 2 with one line); an unknown command
    exits 2 with the same list."""
    from squinchcomm.bench import COMMANDS

    ok = subprocess.run([sys.executable, "-m", "squinchcomm.bench", "--help"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    listed = [line.split()[0] for line in ok.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert all(len(line.split()) > 2 for line in ok.stdout.splitlines() if line.startswith("  "))
    bad = subprocess.run([sys.executable, "-m", "squinchcomm.bench", "warp"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "unknown command 'warp'" in bad.stderr


def test_bench_numbers_read_the_codec_benchmark_json(tmp_path):
    """The bench part's figures come from the codec benchmark's real JSON
    (run here on the CPU backend and relabelled, since the part reads the
    cuda rows): GB/s and x copy per op, and whether encode, decode and
    reduce-encode all reach the 0.85 target."""
    out = tmp_path / "codec.json"
    proc = subprocess.run([sys.executable, "-m", "squinchcomm.bench", "codec", "--backends",
                           "numba", "-b", "1M", "-e", "1M", "-n", "2", "-w", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for row in data["rows"]:
        row["backend"] = "cuda"
    (tmp_path / "codec_gpu.json").write_text(json.dumps(data))
    nums = gpu_check._numbers("bench", "", tmp_path)
    ratios = {r["op"]: r["vs_copy"] for r in data["rows"]}
    for op in ("encode", "encode_sr", "decode", "decode_acc", "reduce_encode"):
        assert nums[f"{op}_x_copy"] == round(ratios[op], 3)
    assert nums["codec_target_met"] is (min(ratios["encode"], ratios["decode"],
                                            ratios["reduce_encode"]) >= 0.85)


def test_a_tool_the_machine_cannot_run_is_skipped_not_failed(tmp_path):
    """compute-sanitizer answers "Device not supported" under gVisor: the part
    says so as skipped; any other failure of the same part is a failure."""
    env = {"PATH": "/usr/bin:/bin"}
    says = _py("import sys; print('Device not supported'); sys.exit(1)")
    part = gpu_check.Part("s", "", 30.0, 0.0, [says], unsupported="Device not supported")
    res = gpu_check.run_part(1, part, tmp_path, 100, env)
    assert res.status == "skipped" and "Device not supported" in res.reason
    part = gpu_check.Part("s", "", 30.0, 0.0, [_py("import sys; sys.exit(3)")],
                          unsupported="Device not supported")
    assert gpu_check.run_part(2, part, tmp_path, 100, env).status == "failed"
