"""Smoke test of ``python -m squinchcomm.bench visibility --quick``: the JSON fields,
and mask bytes / skipped tiles recomputed here from the dense mask of each pattern."""

import json

import pytest

torch = pytest.importorskip("torch")

from squinchcomm.bench.__main__ import main as bench_main  # noqa: E402
from squinchcomm.bench.visibility import patterns  # noqa: E402
from squinchcomm.nn.visibility import dense_mask  # noqa: E402


def test_quick_run_writes_consistent_results(tmp_path):
    threads = torch.get_num_threads()
    assert bench_main(["visibility", "--quick", "--out", str(tmp_path), "--no-plot"]) == 0
    assert torch.get_num_threads() == threads  # --threads is restored for the caller
    doc = json.loads((tmp_path / "visibility.json").read_text())
    assert doc["machine"]["torch_threads"] == doc["parameters"]["threads"] == 1
    md = (tmp_path / "visibility.md").read_text()
    assert doc["benchmark"] == "visibility" and "--quick" in doc["command"]
    assert doc["command"] in md and doc["machine"]["cpu"] in md
    block = doc["parameters"]["block"]
    sizes = [256, 512]
    assert sorted({r["n"] for r in doc["rows"]}) == sizes
    assert len(doc["rows"]) == 3 * len(sizes)
    for row in doc["rows"]:
        n = row["n"]
        start, limit = patterns(n, doc["parameters"]["window"], doc["parameters"]["docs"])[
            row["pattern"]]
        mask = dense_mask(start, limit, n)
        # memory: two int64 per key vs one byte per (query, key)
        assert row["visibility_bytes"] == 2 * 8 * n
        assert row["dense_mask_bytes"] == mask.numel() == n * n
        # a tile is skippable iff no (query, key) in it is visible
        nb = -(-n // block)
        visible = mask.reshape(nb, block, nb, block).any(3).any(1)
        assert row["tiles"] == nb * nb
        assert row["skipped_tiles"] == int((~visible).sum())
        assert set(row["seconds"]) == {"blockwise", "dense", "sdpa_dense_mask"}
        assert all(s > 0 for s in row["seconds"].values())
        assert row["skipped"] == {}
        for path in ("blockwise", "sdpa_dense_mask"):
            assert row["max_abs_diff_vs_dense"][path] < 1e-5
    causal = {r["n"]: r for r in doc["rows"] if r["pattern"] == "causal"}
    assert causal[512]["skipped_tiles"] == 4 * 3 // 2  # strictly above the diagonal


def test_dense_skipped_above_dense_max_n(tmp_path):
    assert bench_main(["visibility", "--sizes", "256", "--dense-max-n", "128", "--repeats",
                       "1", "--out", str(tmp_path), "--no-plot"]) == 0
    doc = json.loads((tmp_path / "visibility.json").read_text())
    for row in doc["rows"]:
        assert set(row["seconds"]) == {"blockwise"}
        assert set(row["skipped"]) == {"dense", "sdpa_dense_mask"}
        assert row["max_abs_diff_vs_dense"] == {}
    assert "skipped" in (tmp_path / "visibility.md").read_text()
