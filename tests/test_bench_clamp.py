"""Smoke test of ``python -m squinchcomm.bench clamp --quick``: the JSON fields, and
the properties the measurement claims, checked on its numbers; and the sweep it runs,
``measure_error_vs_scale``."""

import json

import pytest

pytest.importorskip("torch")

from squinchcomm.bench.__main__ import main as bench_main  # noqa: E402
from squinchcomm.bench.clamp import measure_error_vs_scale  # noqa: E402


def test_quick_run_writes_consistent_results(tmp_path):
    assert bench_main(["clamp", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "clamp.json").read_text())
    md = (tmp_path / "clamp.md").read_text()
    assert (tmp_path / "clamp_error_vs_weight_scale.png").stat().st_size > 0
    assert doc["benchmark"] == "clamp" and doc["command"] in md
    assert doc["parameters"]["bits"] == [8, 4]
    modes = ("constant", "std", "rms", "weight")
    assert set(doc["results"]) == {"8", "4"}
    for bits, rows in doc["results"].items():
        assert f"## int{bits}" in md
        scales = [r["scale"] for r in rows]
        assert scales == [1.0, 0.1, 0.01]
        by_scale = dict(zip(scales, rows))
        one = by_scale[1.0]
        for r in rows:
            assert set(r["sqnr_db"]) == set(r["zeroed"]) == set(modes)
            assert all(0.0 <= z <= 1.0 for z in r["zeroed"].values())
            # the rms limit scales with the data (s^2), so every scale quantizes
            # like scale 1, where the constant limit equals the rms limit
            assert r["sqnr_db"]["rms"] == pytest.approx(one["sqnr_db"]["constant"], abs=0.05)
            assert r["zeroed"]["rms"] == pytest.approx(one["zeroed"]["constant"], abs=2e-3)
        # the constant limit flushes more values as the band narrows ...
        const_zeroed = [r["zeroed"]["constant"] for r in rows]
        assert const_zeroed == sorted(const_zeroed)
        # ... until the dynamic limits win by far
        small = by_scale[0.01]
        for mode in ("std", "rms", "weight"):
            assert small["sqnr_db"][mode] > small["sqnr_db"]["constant"] + 10
            assert small["zeroed"][mode] < small["zeroed"]["constant"]
    # more bits, less error, for a dynamic limit
    assert doc["results"]["8"][0]["sqnr_db"]["rms"] > doc["results"]["4"][0]["sqnr_db"]["rms"]


def test_bad_arguments_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_main(["clamp", "--bits", "1", "--out", str(tmp_path)])
    assert "--bits must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["clamp", "--scales", "1,0", "--out", str(tmp_path)])
    assert "--scales must be > 0" in capsys.readouterr().err


def test_measure_error_vs_scale_curve():
    rows = measure_error_vs_scale(scales=(1.0, 0.01), tokens=128, d_in=64, d_ff=256)
    assert [r["scale"] for r in rows] == [1.0, 0.01]
    first, last = rows
    assert first["sqnr_db"]["constant"] > 20.0
    assert last["zeroed"]["constant"] > 0.9 and last["sqnr_db"]["constant"] < 1.0
    for mode in ("std", "rms", "weight"):
        assert last["sqnr_db"][mode] > 20.0
        assert abs(last["sqnr_db"][mode] - first["sqnr_db"][mode]) < 0.5
