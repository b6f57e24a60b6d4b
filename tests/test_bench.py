"""The benchmarks' building blocks run and are deterministic (no timing asserted)."""

import numpy as np
import pytest

from squinchcomm.bench import codec as codec_bench
from squinchcomm.bench.common import parse_size, size_sweep
from squinchcomm.models.corpus import load_corpus, sample_windows


def test_corpus_split_is_by_file_and_deterministic():
    a = load_corpus(max_bytes=1 << 18)
    assert a.train.size > 0 and a.val.size > 0
    assert not set(a.train_files) & set(a.val_files)
    assert a.sha256 == load_corpus(max_bytes=1 << 18).sha256


def test_windows_depend_only_on_seed_step_rank():
    data = load_corpus(max_bytes=1 << 18).train
    w = sample_windows(data, 4, 32, seed=1, step=3, rank=2)
    assert w.shape == (4, 33) and w.dtype == np.uint8
    assert np.array_equal(w, sample_windows(data, 4, 32, seed=1, step=3, rank=2))
    assert not np.array_equal(w, sample_windows(data, 4, 32, seed=1, step=3, rank=1))


def test_parse_size():
    assert [parse_size(s) for s in ("1024", "64K", "16M", "1G", "8MB")] == [
        1024, 64 << 10, 16 << 20, 1 << 30, 8 << 20]
    with pytest.raises(ValueError, match="use a byte count"):
        parse_size("lots")


def test_size_sweep():
    assert size_sweep("1K", "16K", 4) == [1024, 4096, 16384]
    assert size_sweep("64M", "64M", 2) == [64 << 20]
    with pytest.raises(ValueError, match="step factor must be >= 2"):
        size_sweep("1K", "4K", 1)
    with pytest.raises(ValueError, match="pass 4 <= -b <= -e"):
        size_sweep("8K", "4K", 2)


def test_codec_benchmark_rows(capsys):
    rows = codec_bench.main(["-b", "64K", "-e", "256K", "-f", "4", "-n", "2", "-w", "1",
                             "--backends", "numba"])
    out = capsys.readouterr().out
    assert out.startswith("# squinchcomm") and "x copy" in out
    assert {r["op"] for r in rows} == set(codec_bench.OPS)
    assert {r["size"] for r in rows} == {64 << 10, 256 << 10}
    assert all(r["gbps"] > 0 and r["time_us"] > 0 for r in rows)


def test_quality_quick_run_orders_the_methods():
    pytest.importorskip("torch")
    from squinchcomm.bench import quality

    doc = quality.main(["--quick", "--no-write"])
    rows = {(r["data"], r["method"]): r for r in doc["rows"]}
    for data in {d for d, _ in rows}:
        sq = rows[(data, "squinch-nearest")]
        assert sq["bits_per_element"] == 6
        # 6-bit Squinch: a few percent, worse than 16-bit casts, better than int4 at 6 bits.
        assert 0.01 < sq["rel_rms"] < 0.08
        assert rows[(data, "bf16")]["rel_rms"] < sq["rel_rms"] < rows[(data, "int4/b16")]["rel_rms"]
