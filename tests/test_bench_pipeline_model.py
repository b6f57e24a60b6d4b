"""The pipeline benchmark (single-device stages of the compressed allreduce) and
the allreduce time model: columns, JSON, the model's algebra and validation.

Timings measured here are not asserted beyond being positive; the model's checks
recompute its formula here, from the issue's statement and the wire format. The
committed shaped-cluster results are recomputed from their raw numbers and held to
the README's reading of them (the model is optimistic, and close at slow links).
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import no_gpu

from squinchcomm import codec
from squinchcomm.bench import model, pipeline

# Bytes per element on the wire, from the format: 6-byte blocks of 8 values.
SQUINCH_B = codec.BLOCK_BYTES / codec.BLOCK
PIPELINE_KEYS = {"device", "size", "count", "type", "ranks", "shard", "encode_us",
                 "reduce_encode_us", "decode_us", "copy_us", "codec_us", "codec_gbps",
                 "copy_gbps", "encode_vs_copy", "reduce_encode_vs_copy", "decode_vs_copy",
                 "wire_bytes", "ns_per_wire_byte"}


def t_model(n, ranks, rate_bps, eff, alpha, bytes_per_el, codec_s=0.0, overhead=0.0):
    """The issue's formula, written out again: codec + 2(N-1)/N * bytes / (eff B) + 2(N-1) alpha."""
    return (codec_s + 2 * (ranks - 1) / ranks * bytes_per_el * n / (eff * rate_bps / 8)
            + 2 * (ranks - 1) * alpha + overhead)


def squinch_wire_s(n, ranks, rate_bps, eff):
    """W: Squinch's 0.75 B per element, 2(N-1)/N of the tensor, at eff * B."""
    return 2 * (ranks - 1) / ranks * SQUINCH_B * n / (eff * rate_bps / 8)


def t_pipelined(n, ranks, rate_bps, eff, alpha, codec_s, overhead, chunks):
    """Codec and wire as two stages over K chunks: max(C, W) + min(C, W) / K + latency."""
    wire = squinch_wire_s(n, ranks, rate_bps, eff)
    return (max(codec_s, wire) + min(codec_s, wire) / chunks + 2 * (ranks - 1) * alpha
            + overhead)


def expected_chunks(n, pipeline_bytes):
    """ceil(n / chunk) with chunks of pipeline_bytes / 4 elements rounded up to whole
    8-blocks; one chunk when pipelining is off."""
    if pipeline_bytes == 0:
        return 1
    return math.ceil(n / (math.ceil(pipeline_bytes / 4 / 8) * 8))


def expected_shard(n, ranks):
    """Shard 0 of collectives.shard_bounds: ceil(blocks / N) whole blocks, at most n."""
    blocks = math.ceil(n / 8)
    return min(n, math.ceil(blocks / ranks) * 8)


# ---------------------------------------------------------------------------- pipeline
def check_pipeline_rows(rows, sizes, ranks_list, device):
    assert {(r["size"], r["ranks"]) for r in rows} == {(s, k) for s in sizes for k in ranks_list}
    for r in rows:
        assert set(r) == PIPELINE_KEYS and r["device"] == device
        n, k = r["count"], r["ranks"]
        assert r["size"] == 4 * n and r["shard"] == expected_shard(n, k)
        for key in ("encode_us", "reduce_encode_us", "decode_us", "copy_us"):
            assert r[key] > 0, key
        assert r["codec_us"] == pytest.approx(r["encode_us"] + r["reduce_encode_us"]
                                              + r["decode_us"])
        assert r["encode_vs_copy"] == pytest.approx(r["copy_us"] / r["encode_us"])
        assert r["decode_vs_copy"] == pytest.approx(r["copy_us"] / r["decode_us"])
        assert r["codec_gbps"] == pytest.approx(4 * n / r["codec_us"] / 1e3)
        wire = 2 * (k - 1) / k * SQUINCH_B * n
        assert r["wire_bytes"] == pytest.approx(wire)
        assert r["ns_per_wire_byte"] == pytest.approx(r["codec_us"] * 1e3 / wire)


def test_pipeline_cpu_every_column_and_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    rows = pipeline.main(["-b", "64K", "-e", "256K", "-f", "4", "-n", "1", "-w", "1",
                          "--ranks", "2,4", "--json", str(out)])
    text = capsys.readouterr().out
    check_pipeline_rows(rows, [64 << 10, 256 << 10], [2, 4], "cpu")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[0].startswith("# squinchcomm") and "# device cpu" in text
    assert "numba" in text and "copy(us)" in text and "ns/wireB" in text
    body = [line.split() for line in text.splitlines() if not line.startswith("#")]
    assert [(int(b[0]), int(b[2])) for b in body] == [(r["size"], r["ranks"]) for r in rows]
    doc = json.loads(out.read_text())
    assert doc["rows"] == rows and doc["device"].startswith("cpu")
    assert doc["versions"]["squinchcomm"] and doc["args"]["ranks"] == "2,4"


def test_pipeline_cuda_errors_clearly_without_gpu(capsys):
    try:
        import cupy

        if cupy.is_available():
            pytest.skip("a GPU is present: test_pipeline_cuda covers --device cuda")
    except Exception:
        pass
    with pytest.raises(SystemExit):
        pipeline.main(["--device", "cuda", "-b", "64K", "-e", "64K", "-n", "1"])
    err = capsys.readouterr().err
    assert "--device cuda needs" in err and "--device cpu" in err


@pytest.mark.gpu
def test_pipeline_cuda(capsys):
    try:
        import cupy

        usable = cupy.is_available()
    except Exception as exc:
        usable, reason = False, f"cupy cannot be imported: {exc}"
    else:
        reason = "cupy.is_available() is False"
    if not usable:
        no_gpu(f"no usable CUDA GPU: {reason}")
    rows = pipeline.main(["--device", "cuda", "-b", "1M", "-e", "4M", "-n", "3", "-w", "1",
                          "--ranks", "4,8"])
    text = capsys.readouterr().out
    check_pipeline_rows(rows, [1 << 20, 4 << 20], [4, 8], "cuda")
    assert "# device cuda:" in text and "device-to-device copy" in text


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "1"], "world sizes >= 2"),
    (["--ranks", "four"], "world sizes >= 2"),
    (["-b", "8K", "-e", "4K"], "pass 4 <= -b <= -e"),
    (["-n", "0"], "-n >= 1"),
    (["--device", "tpu"], "invalid choice"),
])
def test_pipeline_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(argv)
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- model
def run_model(capsys, *argv):
    doc = model.main(list(argv))
    return doc, capsys.readouterr().out


@pytest.mark.parametrize("pipeline_bytes, chunks", [("16M", 1), ("1M", 16)])
def test_free_codec_reaches_the_wire_byte_ratio(capsys, pipeline_bytes, chunks):
    doc, text = run_model(capsys, "--codec-gbps", "inf", "--alpha", "0", "--ranks", "8",
                          "--size", "16M", "--rates", "100mbit,1gbit,400gbit",
                          "--pipeline-bytes", pipeline_bytes)
    assert len(doc["rows"]) == 3 and doc["chunks"] == chunks
    for r in doc["rows"]:
        assert r["speedup_fp32"] == pytest.approx(4 / SQUINCH_B)
        assert r["speedup_bf16"] == pytest.approx(2 / SQUINCH_B)
    assert doc["crossover_fp32_bps"] is None and "pays at every rate" in text
    assert f"{4 / SQUINCH_B:.2f}x over fp32, {2 / SQUINCH_B:.2f}x over bf16" in text


@pytest.mark.parametrize("pipeline_bytes", [16 << 20, 0, 4 << 20])
@pytest.mark.parametrize("ranks", [2, 4, 16])
def test_crossover_is_where_the_times_meet(capsys, ranks, pipeline_bytes):
    eff, alpha, overhead, gbps, n = 0.8, 20e-6, 3e-4, 5.0, 4 << 20
    doc, text = run_model(capsys, "--codec-gbps", str(gbps), "--alpha", "20us", "--overhead",
                          "0.3ms", "--efficiency", str(eff), "--ranks", str(ranks),
                          "--size", str(4 * n), "--pipeline-bytes", str(pipeline_bytes))
    codec_s, chunks = 4 * n / (gbps * 1e9), expected_chunks(n, pipeline_bytes)
    assert doc["chunks"] == chunks and f"K = {chunks} pipeline chunk" in text

    def t_sq(rate):
        if chunks == 1:  # unpipelined: the stages back to back, the formula
            return t_model(n, ranks, rate, eff, alpha, SQUINCH_B, codec_s, overhead)
        return t_pipelined(n, ranks, rate, eff, alpha, codec_s, overhead, chunks)

    for base, width in (("fp32", 4.0), ("bf16", 2.0)):
        rate = doc[f"crossover_{base}_bps"]
        assert t_sq(rate) == pytest.approx(t_model(n, ranks, rate, eff, alpha, width), rel=1e-9)
        # Below the crossover Squinch wins, above it loses.
        assert t_sq(rate / 2) < t_model(n, ranks, rate / 2, eff, alpha, width)
        assert t_sq(rate * 2) > t_model(n, ranks, rate * 2, eff, alpha, width)
        assert f"{rate / 1e9:.3g} Gbit/s" in text
    for r in doc["rows"]:
        assert r["squinch_s"] == pytest.approx(t_sq(r["rate_bps"]))
        assert r["fp32_s"] == pytest.approx(t_model(n, ranks, r["rate_bps"], eff, alpha, 4.0))
    # The default rates cover both regimes: the codec and the wire each the longer stage.
    longer = {squinch_wire_s(n, ranks, r["rate_bps"], eff) > codec_s for r in doc["rows"]}
    assert longer == {True, False}


@pytest.mark.parametrize("codec_s, overhead, wire_longer", [
    (0.05, 0.0, False),  # the codec is the longer stage at the crossover
    (0.01, 0.2, True),   # a large overhead pushes the crossover to slow links
    (0.0, 0.01, True),   # no codec cost: only the overhead against the saved bytes
])
@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("ranks", [2, 4, 16])
def test_crossover_solves_the_pipelined_model(ranks, chunks, codec_s, overhead, wire_longer):
    n, eff, alpha = 1 << 22, 0.7, 1e-5
    for base, width in (("fp32", 4.0), ("bf16", 2.0)):
        rate = model.crossover_bps(n, ranks, eff, codec_s, overhead, base, chunks)
        assert (squinch_wire_s(n, ranks, rate, eff) > codec_s) == wire_longer
        assert t_pipelined(n, ranks, rate, eff, alpha, codec_s, overhead, chunks) == \
            pytest.approx(t_model(n, ranks, rate, eff, alpha, width), rel=1e-9)
        for slower, wins in ((0.9, True), (1.1, False)):
            t_sq = t_pipelined(n, ranks, rate * slower, eff, alpha, codec_s, overhead, chunks)
            assert (t_sq < t_model(n, ranks, rate * slower, eff, alpha, width)) == wins


@pytest.mark.parametrize("n, pipeline_bytes", [
    (4 << 20, 16 << 20), (4 << 20, 4 << 20), (4 << 20, 3 << 20), ((4 << 20) + 1, 16 << 20),
    (4 << 20, 0), (100, 40),  # 10 elements per chunk round up to 16: 7 chunks, not 10
])
def test_pipeline_chunks_follow_the_allreduce(n, pipeline_bytes):
    assert model.pipeline_chunks(n, pipeline_bytes) == expected_chunks(n, pipeline_bytes)
    with pytest.raises(ValueError, match="pass 0"):
        model.pipeline_chunks(n, -1)


def test_model_is_monotonic_in_rate(capsys):
    doc, _ = run_model(capsys, "--codec-gbps", "2", "--rates",
                       "100mbit,200mbit,1gbit,2.5gbit,10gbit,25gbit,100gbit,400gbit")
    rows = doc["rows"]
    assert [r["rate_bps"] for r in rows] == sorted(r["rate_bps"] for r in rows)
    for key in ("fp32_s", "bf16_s", "squinch_s", "speedup_fp32", "speedup_bf16"):
        values = [r[key] for r in rows]
        assert all(a > b for a, b in zip(values, values[1:])), key
    assert all(r["speedup_fp32"] < 4 / SQUINCH_B for r in rows)


def test_codec_time_from_a_pipeline_json(tmp_path, capsys):
    # 2 ns/element at 1M elements, 1 ns/element at 4M, 4 ranks only.
    rows = [dict(ranks=4, count=1 << 20, codec_us=2e-3 * (1 << 20), device="cpu"),
            dict(ranks=4, count=4 << 20, codec_us=1e-3 * (4 << 20), device="cpu")]
    path = tmp_path / "pipe.json"
    path.write_text(json.dumps({"device": "cpu test", "rows": rows}))
    base = ["--pipeline", str(path), "--ranks", "4", "--alpha", "0"]
    doc, text = run_model(capsys, *base, "--size", "16M")  # 4M elements: measured exactly
    assert doc["rows"][0]["codec_s"] == pytest.approx(1e-9 * (4 << 20))
    assert "measured at this size" in text and "GPU numbers are unmeasured" in text
    doc, _ = run_model(capsys, *base, "--size", "8M")  # 2M elements: between the two costs
    assert 1e-9 * (2 << 20) < doc["rows"][0]["codec_s"] < 2e-9 * (2 << 20)
    doc, text = run_model(capsys, *base, "--size", "64M")  # beyond: nearest cost per element
    assert doc["rows"][0]["codec_s"] == pytest.approx(1e-9 * (16 << 20))
    assert "extrapolated" in text
    with pytest.raises(SystemExit):
        model.main(["--pipeline", str(path), "--ranks", "8"])
    assert "--ranks 8" in capsys.readouterr().err


def shaped_json(tmp_path, name, rate, eff, alpha, codec_ms, network_in_json=True,
                pipeline_bytes=None):
    """A synthetic shaped-cluster result at 4 ranks, 16 MiB, whose engine_fp32
    time follows the model at ``eff``; squinch measured 10% over its unpipelined
    model. ``pipeline_bytes`` is recorded in the JSON when given."""
    n, ranks = 4 << 20, 4
    t_fp32 = t_model(n, ranks, rate, eff, alpha, 4.0)
    t_sq = 1.1 * t_model(n, ranks, rate, eff, alpha, SQUINCH_B, codec_ms * 1e-3)
    network = f"shaped cluster: 4 hosts, every link {name} each way (tc tbf)"
    stage_ms = dict(encode=codec_ms / 2, reduce_encode=codec_ms / 4, decode=codec_ms / 4,
                    alltoall=1.0, allgather=2.0)
    doc = dict(world_size=ranks, args={},
               rows=[dict(method="engine_fp32", size=4 * n, count=n, time_us=t_fp32 * 1e6),
                     dict(method="squinch", size=4 * n, count=n, time_us=t_sq * 1e6)],
               stages=[dict(method="squinch", size=4 * n, rank0_ms=stage_ms)])
    if pipeline_bytes is not None:
        doc["pipeline_bytes"] = pipeline_bytes
    path = tmp_path / f"shaped_{name}.json"
    if network_in_json:
        doc["network"] = network
    else:
        path.with_suffix(".txt").write_text(f"# squinchcomm\n# network {network}\n")
    path.write_text(json.dumps(doc))
    return path, t_sq


def test_validate_fits_the_efficiency_and_predicts_squinch(tmp_path, capsys):
    alpha = 50e-6
    a, t_a = shaped_json(tmp_path, "1gbit", 1e9, 0.8, alpha, codec_ms=40.0)
    b, t_b = shaped_json(tmp_path, "200mbit", 2e8, 0.9, alpha, codec_ms=20.0,
                         network_in_json=False)
    doc, text = run_model(capsys, "--alpha", "50us", "--validate", str(a), str(b))
    rows = doc["validation"]
    assert [r["rate_bps"] for r in rows] == [2e8, 1e9]
    n = 4 << 20
    for r, eff, rate, codec_ms, t_sq in ((rows[0], 0.9, 2e8, 20.0, t_b),
                                         (rows[1], 0.8, 1e9, 40.0, t_a)):
        assert r["efficiency"] == pytest.approx(eff)
        assert r["codec_model_s"] == pytest.approx(codec_ms * 1e-3)
        assert r["squinch_model_s"] == pytest.approx(
            t_model(n, 4, rate, eff, alpha, SQUINCH_B, codec_ms * 1e-3))
        assert r["squinch_measured_s"] == pytest.approx(t_sq)
        assert r["exchange_measured_s"] == pytest.approx(3e-3)
    assert "fitted" in text and "engine_fp32" in text
    # A stated codec speed replaces the files' stage times.
    doc, text = run_model(capsys, "--alpha", "50us", "--codec-gbps", "1", "--validate", str(a))
    assert doc["validation"][0]["codec_model_s"] == pytest.approx(4 * n / 1e9)
    assert "--codec-gbps 1" in text


def test_validate_takes_the_chunk_size_from_the_file(tmp_path, capsys):
    alpha, eff, n = 50e-6, 0.8, 4 << 20
    recorded, _ = shaped_json(tmp_path, "1gbit", 1e9, eff, alpha, codec_ms=80.0,
                              pipeline_bytes=4 << 20)
    plain, _ = shaped_json(tmp_path, "200mbit", 2e8, eff, alpha, codec_ms=80.0)
    doc, text = run_model(capsys, "--alpha", "50us", "--pipeline-bytes", "1M",
                          "--validate", str(recorded), str(plain))
    rows = {r["file"]: r for r in doc["validation"]}
    for path, rate, pipeline_bytes in ((recorded, 1e9, 4 << 20), (plain, 2e8, 1 << 20)):
        r, chunks = rows[str(path)], math.ceil(4 * n / pipeline_bytes)
        assert r["pipeline_bytes"] == pipeline_bytes and r["chunks"] == chunks
        assert r["squinch_model_s"] == pytest.approx(
            t_pipelined(n, 4, rate, eff, alpha, 80e-3, 0.0, chunks))
    assert f"K for {recorded}: the file's pipeline_bytes {4 << 20}" in text
    assert f"K for {plain}: --pipeline-bytes {1 << 20}, assumed" in text


SHAPED_RATES = {"200mbit": 2e8, "1gbit": 1e9, "10gbit": 1e10}  # bits/s, by file name


def test_validate_the_committed_shaped_results(capsys):
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[1].glob(
        "bench/results/shaped_4rank_*bit.json"))
    if not paths:
        pytest.skip("no shaped-cluster results in bench/results")
    doc, _ = run_model(capsys, "--validate", *map(str, paths))
    # one row per file and size present in both the engine_fp32 and squinch rows
    sizes = [{r["size"] for r in json.loads(p.read_text())["rows"] if r["method"] == "squinch"}
             for p in paths]
    assert len(doc["validation"]) == sum(len(s) for s in sizes)
    alpha = 10e-6  # the command's default --alpha
    rows = {(r["file"], r["size"]): r for r in doc["validation"]}
    for path in paths:
        # Recomputed here from the file's raw numbers: the rate from the file name
        # (shaped_4rank_<rate>.json), the efficiency that makes the written-out fp32
        # formula give the measured fp32 time, the codec time from the stage table.
        raw = json.loads(path.read_text())
        rate = SHAPED_RATES[path.stem.rsplit("_", 1)[1]]
        ranks = raw["world_size"]
        timed = {(r["method"], r["size"]): r for r in raw["rows"]}
        for stage in (s for s in raw["stages"] if s["method"] == "squinch"):
            r = rows[(str(path), stage["size"])]
            n = timed[("squinch", stage["size"])]["count"]
            t_fp32 = timed[("engine_fp32", stage["size"])]["time_us"] * 1e-6
            t_sq = timed[("squinch", stage["size"])]["time_us"] * 1e-6
            eff = (2 * (ranks - 1) / ranks * 4 * n * 8 / rate) / (t_fp32 - 2 * (ranks - 1) * alpha)
            ms = stage["rank0_ms"]
            codec_s = (ms["encode"] + ms["reduce_encode"] + ms["decode"]) * 1e-3
            chunks = expected_chunks(n, raw.get("pipeline_bytes", 16 << 20))
            assert r["efficiency"] == pytest.approx(eff, rel=1e-9)
            assert r["chunks"] == chunks
            assert r["squinch_model_s"] == pytest.approx(
                t_pipelined(n, ranks, rate, eff, alpha, codec_s, 0.0, chunks), rel=1e-9)
            assert r["squinch_measured_s"] == pytest.approx(t_sq, rel=1e-12)
            # The README's reading of these runs: from 4 MiB up the model is
            # optimistic (it assumes perfect codec/wire overlap), and at 200 Mbit/s
            # and 1 Gbit/s from 16 MiB up it predicts the measured Squinch time to
            # within 30%.
            ratio = r["squinch_model_s"] / t_sq
            if stage["size"] >= 4 << 20:
                assert ratio <= 1.0, (path.name, stage["size"], ratio)
            if rate <= 1e9 and stage["size"] >= 16 << 20:
                assert ratio >= 0.7, (path.name, stage["size"], ratio)


@pytest.mark.parametrize("argv, message", [
    (["--codec-gbps", "1", "--rates", "fast"], "use a positive rate like"),
    (["--codec-gbps", "1", "--rates", "0gbit"], "use a positive rate like"),
    (["--codec-gbps", "1", "--alpha", "soon"], "non-negative duration"),
    (["--codec-gbps", "1", "--efficiency", "1.5"], "fraction in (0, 1]"),
    (["--codec-gbps", "1", "--ranks", "1"], "N >= 2"),
    (["--codec-gbps", "0"], "positive throughput"),
    (["--size", "64M"], "pass --pipeline FILE"),
    (["--pipeline", "/nonexistent/pipe.json"], "No such file"),
    (["--codec-gbps", "1", "--pipeline", "x.json"], "not allowed with"),
    (["--codec-gbps", "1", "--pipeline-bytes", "-1"], "use a byte count like"),
    (["--codec-gbps", "1", "--pipeline-bytes", "lots"], "use a byte count like"),
])
def test_model_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        model.main(argv)
    assert message in capsys.readouterr().err


def test_validate_bad_files(tmp_path, capsys):
    path, _ = shaped_json(tmp_path, "1gbit", 1e9, 0.8, 0.0, codec_ms=40.0)
    doc = json.loads(path.read_text())
    doc["rows"] = [r for r in doc["rows"] if r["method"] != "engine_fp32"]
    path.write_text(json.dumps(doc))
    with pytest.raises(SystemExit):
        model.main(["--validate", str(path)])
    assert "no engine_fp32 row" in capsys.readouterr().err
    doc["network"] = "this machine"
    path.write_text(json.dumps(doc))
    with pytest.raises(SystemExit):
        model.main(["--validate", str(path)])
    assert "every link <rate>" in capsys.readouterr().err
    path, _ = shaped_json(tmp_path, "1gbit", 1e9, 0.8, 0.0, codec_ms=40.0, pipeline_bytes="16M")
    with pytest.raises(SystemExit):
        model.main(["--validate", str(path)])
    assert "'pipeline_bytes' is '16M'" in capsys.readouterr().err
