"""The model behind compression="auto" (squinchcomm.collectives.policy), on
one process: times from the stated formula worked by hand, choices at links
where the answer is plain, the fit, and the errors. The probe across real
ranks is tested in tests/mpi/test_collectives.py."""

import numpy as np
import pytest

from squinchcomm.collectives import policy
from squinchcomm.collectives.policy import CANDIDATES, LinkModel

MiB = 1 << 20


def stated(bps, world=4, squinch_gbps=1.0, bf16_gbps=4.0, latency=0.0, pipeline=16 * MiB):
    return LinkModel.from_rates(world, bps, latency_s=latency, squinch_gbps=squinch_gbps,
                                bf16_gbps=bf16_gbps, pipeline_bytes=pipeline)


def test_times_worked_by_hand():
    """4 ranks at 1 Gbit/s (125e6 B/s), 1 Mi elements: every rank sends
    2 * 3/4 of the payload; Squinch's 1 GB/s codec takes 4 MiB / 1e9 s, and
    below the 16 MiB pipeline chunk codec and wire run back to back."""
    m = stated(1e9, latency=1e-3)
    n = MiB  # elements: 4 MiB of fp32, one chunk
    assert m.time("none", n) == pytest.approx(1e-3 + 1.5 * 4 * n / 125e6)
    assert m.time("bf16", n) == pytest.approx(1e-3 + 1.5 * 2 * n / 125e6 + 4 * n / 4e9)
    assert m.time("squinch", n) == pytest.approx(1e-3 + 1.5 * 0.75 * n / 125e6 + 4 * n / 1e9)


def test_pipelining_hides_the_shorter_stage_but_one_chunk():
    """64 MiB of fp32 in 16 MiB chunks: K = 4, T = max(C, W) + min(C, W) / 4."""
    m = stated(1e9)
    n = 16 * MiB
    wire, codec = 1.5 * 0.75 * n / 125e6, 4 * n / 1e9
    assert m.time("squinch", n) == pytest.approx(max(wire, codec) + min(wire, codec) / 4)
    unpiped = stated(1e9, pipeline=0)
    assert unpiped.time("squinch", n) == pytest.approx(wire + codec)


@pytest.mark.parametrize("bps, want", [(50e6, "squinch"), (1e13, "none")])
def test_plain_choices(bps, want):
    """A slow link: the 5.3x smaller payload wins by far; an almost free link:
    every codec only adds time."""
    m = stated(bps)
    for n in (MiB // 4, MiB, 64 * MiB):
        assert m.choose(n) == want


def test_bf16_between_them():
    """At 10 Gbit/s with a slow Squinch codec (0.5 GB/s) and a fast cast (20
    GB/s), 64 MiB: fp32 wire 75.5 ms, bf16 37.7 + 3.4 ms, Squinch at least
    the 134 ms codec. bf16 wins."""
    m = stated(10e9, squinch_gbps=0.5, bf16_gbps=20.0)
    assert m.choose(16 * MiB) == "bf16"


def test_latency_keeps_small_messages_uncompressed():
    """With 1 ms more per compressed call, a 16 KiB message stays fp32 even on
    a slow link (its whole fp32 wire time is 0.5 ms at 200 Mbit/s)."""
    m = LinkModel(world=4, bytes_per_s=25e6, latency={"none": 1e-4, "bf16": 1.1e-3,
                                                      "squinch": 1.1e-3},
                  codec_s_per_elem={"none": 0.0, "bf16": 1e-9, "squinch": 4e-9})
    assert m.choose(4096) == "none"
    assert m.choose(16 * MiB) == "squinch"
    ranges = m.ranges()
    assert ranges[0] == (4 << 10, "none") and ranges[-1][1] == "squinch"
    sizes = [b for b, _ in ranges]
    assert sizes == sorted(sizes)


def test_one_rank_is_always_uncompressed():
    assert stated(1e6, world=1).choose(64 * MiB) == "none"


def test_near_ties_go_to_the_less_lossy_method():
    """Squinch modelled 1% faster than bf16 (under the 2% margin) loses to it;
    3% faster wins."""
    def model(squinch_latency):
        return LinkModel(world=2, bytes_per_s=1e15,
                         latency={"none": 1.0, "bf16": 0.5, "squinch": squinch_latency},
                         codec_s_per_elem=dict.fromkeys(CANDIDATES, 0.0))
    assert model(0.495).choose(MiB) == "bf16"
    assert model(0.485).choose(MiB) == "squinch"


def test_round_trip_and_description():
    m = stated(1e9)
    assert LinkModel.from_dict(m.to_dict()) == m
    text = m.describe()
    assert "1 Gbit/s" in text and "squinch" in text


def test_fit_recovers_a_line():
    sizes = np.array([65536.0, 262144.0, 1048576.0])
    a, b = policy._fit(sizes, 2e-4 + 3e-9 * sizes)
    assert a == pytest.approx(2e-4) and b == pytest.approx(3e-9)
    a, b = policy._fit(sizes, np.full(3, 5e-4))  # flat: all latency
    assert a == pytest.approx(5e-4) and b == pytest.approx(0.0, abs=1e-15)
    a, b = policy._fit(sizes, -1e-4 + 2e-9 * sizes)  # negative intercept: through the origin
    assert a == 0.0 and b > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"bytes_per_s": 0.0}, "bytes_per_s must be > 0"),
    ({"latency": {"none": 0.0, "bf16": 0.0}}, "squinch"),
    ({"codec_s_per_elem": {"none": 0.0, "bf16": -1.0, "squinch": 0.0}}, "finite and >= 0"),
    ({"latency": {"none": float("nan"), "bf16": 0.0, "squinch": 0.0}}, "finite and >= 0"),
])
def test_bad_models_are_refused(kwargs, match):
    base = dict(world=2, bytes_per_s=1e9, latency=dict.fromkeys(CANDIDATES, 0.0),
                codec_s_per_elem=dict.fromkeys(CANDIDATES, 0.0))
    with pytest.raises(ValueError, match=match):
        LinkModel(**{**base, **kwargs})


def test_auto_is_a_choice_everywhere_users_name_compression():
    from squinchcomm.collectives import CHOICES, COMPRESSIONS

    assert "auto" in CHOICES and "auto" not in COMPRESSIONS  # not a wire format
    pytest.importorskip("torch")
    from squinchcomm.torch import Compression
    from squinchcomm.torch.compression import as_compression

    assert as_compression("auto") == Compression.auto
    assert Compression.auto_with(error_feedback=True).error_feedback is True


def test_measured_times_win_within_the_probed_sizes():
    """The formula says Squinch (slow link); the probe measured fp32 fastest up
    to 1 MiB: there the measurement decides (interpolated, the smallest
    point below it), above it the formula."""
    m = LinkModel(world=4, bytes_per_s=25e6, latency=dict.fromkeys(CANDIDATES, 1e-3),
                  codec_s_per_elem={"none": 0.0, "bf16": 1e-9, "squinch": 4e-9},
                  probe={"none": [[256 << 10, 0.002], [MiB, 0.004]],
                         "bf16": [[256 << 10, 0.003], [MiB, 0.006]],
                         "squinch": [[256 << 10, 0.005], [MiB, 0.005]]})
    assert m.time("none", (512 << 10) // 4) == pytest.approx(0.002 + 0.002 / 3)
    assert m.time("bf16", 1000) == 0.003  # below the smallest probe: its time
    assert m.choose(MiB // 4) == "none" and m.choose(1000) == "none"
    assert m.choose(16 * MiB) == "squinch"  # above: the formula (slow link)
