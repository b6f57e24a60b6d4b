"""Tests for Gumbel top-k distillation storage (squinchcomm.nn.distill).

Expected values are computed here from the definitions: the target
distribution from log_softmax, Monte-Carlo tolerances from the standard error
of the draws, gradients from the closed form of the cross-entropy gradient,
byte counts from the storage spec (ids + fp16 log-probs + fp32 tau).
"""

import json
import os
import re
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from squinchcomm.nn.distill import (
    TEACHER_META,
    Reader,
    TopKSample,
    Writer,
    bytes_per_position,
    distill_loss,
    dump_teacher,
    open_teacher,
    read_shard,
    sample,
    weights,
    write_shard,
)

VOCAB = 50


def _teacher(seed, vocab=VOCAB, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale  # teacher logits


def _target(logits, temperature=1.0):
    """The documented target: softmax(logits / T) with fp16-rounded log-probs."""
    return torch.log_softmax(logits.double() / temperature, -1).half().double().exp()


def _estimates(logits, f, k, draws, seed, temperature=1.0):
    """sum_i w_i f(ids_i) for `draws` independent samples, float64 [draws]."""
    g = torch.Generator().manual_seed(seed)
    s = sample(logits.expand(draws, -1), k, temperature=temperature, generator=g)
    return (weights(s).double() * f[s.ids.long()]).sum(-1)


def test_unbiased_and_error_shrinks_like_inverse_sqrt_draws():
    logits = _teacher(1)
    f = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    truth = float((_target(logits) * f).sum())
    reps, n1, n2 = 200, 50, 800
    est = _estimates(logits, f, k=5, draws=reps * n2, seed=3).reshape(reps, n2)
    # Unbiased: the grand mean is within 4 standard errors of the truth.
    se = float(est.std()) / est.numel() ** 0.5
    assert abs(float(est.mean()) - truth) < 4 * se
    # RMS error over `reps` repetitions shrinks by sqrt(n2 / n1) = 4 (a biased
    # estimator would plateau at its bias and give a ratio near 1).
    rms1 = float(((est[:, :n1].mean(1) - truth) ** 2).mean().sqrt())
    rms2 = float(((est.mean(1) - truth) ** 2).mean().sqrt())
    assert 3.0 < rms1 / rms2 < 5.3


@pytest.mark.parametrize("k", [1, VOCAB - 1])
def test_unbiased_at_extreme_k(k):
    logits = _teacher(4)
    f = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    truth = float((_target(logits) * f).sum())
    est = _estimates(logits, f, k=k, draws=40000, seed=6)
    se = float(est.std()) / len(est) ** 0.5
    assert abs(float(est.mean()) - truth) < 4 * se + 1e-9


def test_k_equal_vocab_keeps_everything_with_weight_p():
    logits = _teacher(7)
    s = sample(logits.expand(3, -1), VOCAB)
    assert torch.all(s.tau == -torch.inf)
    assert torch.equal(torch.sort(s.ids.long(), -1).values, torch.arange(VOCAB).expand(3, -1))
    p = _target(logits)[s.ids.long()]
    torch.testing.assert_close(weights(s).double(), p, rtol=1e-6, atol=0)


def test_temperature_changes_the_target():
    logits = _teacher(8, scale=3.0)
    f = logits.double()  # the expected teacher logit depends strongly on T
    est = _estimates(logits, f, k=4, draws=40000, seed=9, temperature=2.5)
    se = float(est.std()) / len(est) ** 0.5
    at_t = float((_target(logits, 2.5) * f).sum())
    at_1 = float((_target(logits, 1.0) * f).sum())
    assert abs(float(est.mean()) - at_t) < 4 * se
    assert abs(float(est.mean()) - at_1) > 20 * se


@settings(max_examples=25, deadline=None)
@given(
    vocab=st.integers(2, 300),
    frac=st.floats(0.0, 1.0),
    positions=st.integers(1, 6),
    temperature=st.floats(0.3, 4.0),
    seed=st.integers(0, 2**31),
)
def test_sample_properties(vocab, frac, positions, temperature, seed):
    k = 1 + int(frac * (vocab - 1))
    logits = torch.randn(positions, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    s = sample(logits, k, temperature, generator=torch.Generator().manual_seed(seed))
    assert s.ids.shape == s.logp16.shape == (positions, k) and s.tau.shape == (positions,)
    assert s.ids.dtype == torch.int32 and s.logp16.dtype == torch.float16 and s.tau.dtype == torch.float32
    ids = s.ids.long()
    assert torch.all((ids >= 0) & (ids < vocab))
    assert all(len(set(row.tolist())) == k for row in ids)  # without replacement
    expected = torch.log_softmax(logits / temperature, -1).half()
    assert torch.equal(s.logp16, torch.gather(expected, -1, ids))
    assert torch.all(weights(s) >= s.logp16.float().exp() * (1 - 1e-6))  # q_i <= 1
    again = sample(logits, k, temperature, generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(s, again))


def test_sample_rejects_bad_input():
    logits = _teacher(0)
    for k in (0, VOCAB + 1):
        with pytest.raises(ValueError, match="k must be"):
            sample(logits, k)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, 3, temperature=0.0)
    with pytest.raises(ValueError, match="NaN"):
        sample(torch.full((2, VOCAB), float("nan")), 3)
    with pytest.raises(ValueError, match="floating-point"):
        sample(torch.zeros(VOCAB, dtype=torch.int64), 3)


def _explicit_loss_and_grad(logits, s, normalize):
    """Loss from the formula in float64 and its closed-form gradient.

    d/dz of -sum_i w_i log softmax(z)_{id_i} is (sum_i w_i) softmax(z) - sum_i w_i e_{id_i}.
    """
    p = s.logp16.double().exp()
    q = 1 - torch.exp(-torch.exp(s.logp16.double() - s.tau.double()[..., None]))
    w = p / q
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    z = logits.detach().double()
    soft = torch.exp(z - torch.logsumexp(z, -1, keepdim=True))
    per_pos = -(w * torch.log(torch.gather(soft, -1, s.ids.long()))).sum(-1)
    grad = w.sum(-1, keepdim=True) * soft - torch.zeros_like(z).scatter_add(-1, s.ids.long(), w)
    n = per_pos.numel()
    return per_pos.mean(), grad / n


@pytest.mark.parametrize("normalize", [False, True])
def test_distill_loss_value_and_gradient(normalize):
    g = torch.Generator().manual_seed(11)
    teacher = torch.randn(3, 4, VOCAB, generator=g) * 2
    s = sample(teacher, 6, generator=g)
    student = (torch.randn(3, 4, VOCAB, generator=g) * 2).requires_grad_()
    loss = distill_loss(student, s, normalize=normalize)
    loss.backward()
    want_loss, want_grad = _explicit_loss_and_grad(student, s, normalize)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    assert distill_loss(student, s, reduction="none").shape == (3, 4)
    torch.testing.assert_close(distill_loss(student, s, reduction="sum", normalize=normalize), loss * 12)


def test_distill_loss_is_unbiased_for_cross_entropy():
    teacher, student = _teacher(12), _teacher(13)
    draws = 20000
    s = sample(teacher.expand(draws, -1), 5, generator=torch.Generator().manual_seed(14))
    per_draw = distill_loss(student.expand(draws, -1), s, reduction="none").double()
    cross_entropy = float(-(_target(teacher) * torch.log_softmax(student.double(), -1)).sum())
    se = float(per_draw.std()) / draws**0.5
    assert abs(float(per_draw.mean()) - cross_entropy) < 4 * se


def test_distill_loss_rejects_bad_input():
    s = sample(_teacher(0).expand(4, -1), 3)
    with pytest.raises(ValueError, match="leading shape"):
        distill_loss(torch.zeros(5, VOCAB), s)
    with pytest.raises(ValueError, match="reduction"):
        distill_loss(torch.zeros(4, VOCAB), s, reduction="max")


def _concat(samples):
    """Flatten samples to [positions, k] and concatenate them in order."""
    k = samples[0].ids.shape[-1]
    return TopKSample(
        torch.cat([x.ids.reshape(-1, k) for x in samples]),
        torch.cat([x.logp16.reshape(-1, k) for x in samples]),
        torch.cat([x.tau.reshape(-1) for x in samples]),
    )


@pytest.mark.parametrize("vocab", [VOCAB, 70000])  # uint16 and int32 ids
def test_writer_reader_round_trip_and_rank_assignment(tmp_path, vocab):
    g = torch.Generator().manual_seed(15)
    k = 7
    batches = [sample(torch.randn(shape + (vocab,), generator=g), k, generator=g) for shape in [(4, 7), (5,), (13,)]]
    with Writer(str(tmp_path), vocab=vocab, k=k, temperature=1.5, positions_per_shard=10) as w:
        for b in batches:
            w.write(b)
    assert [os.path.basename(p) for p in w.paths] == [f"shard-{i:05d}.sqdk" for i in range(5)]
    everything = _concat(batches)  # 46 positions -> shards of 10, 10, 10, 10, 6
    reader = Reader(str(tmp_path))
    assert (reader.k, reader.vocab, reader.temperature, reader.positions) == (k, vocab, 1.5, 46)
    got = _concat(list(reader))
    assert all(torch.equal(a, b) for a, b in zip(got, everything))  # bit-exact, tau included
    world = 3
    per_rank = [Reader(str(tmp_path), rank=r, world=world) for r in range(world)]
    assert [len(r) for r in per_rank] == [2, 2, 1]
    for r, rd in enumerate(per_rank):
        for i, shard in zip(range(r, 5, world), rd):
            rows = slice(10 * i, min(10 * i + 10, 46))
            assert torch.equal(shard.ids, everything.ids[rows]) and torch.equal(shard.tau, everything.tau[rows])


def test_bytes_per_position_matches_spec_and_files(tmp_path):
    # Spec: k ids (2 bytes below 65537 entries, else 4), k fp16 log-probs, one fp32 tau.
    assert bytes_per_position(64, 50000) == 64 * 2 + 64 * 2 + 4 == 260
    assert bytes_per_position(64, 100000) == 64 * 4 + 64 * 2 + 4
    assert 2 * 50000 / bytes_per_position(64, 50000) > 380  # vs dense fp16 logits
    for vocab in (1000, 70000):
        path = str(tmp_path / f"v{vocab}.sqdk")
        s = sample(torch.randn(33, vocab), 64)
        write_shard(path, s, vocab)
        data = open(path, "rb").read()
        (hlen,) = struct.unpack("<I", data[8:12])
        assert len(data) - 12 - hlen == 33 * bytes_per_position(64, vocab)


def _one_shard(tmp_path, k=4):
    path = str(tmp_path / "shard-00000.sqdk")
    write_shard(path, sample(torch.randn(6, VOCAB), k), VOCAB)
    return path, open(path, "rb").read()


def _rewrite_header(data, **changes):
    (hlen,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + hlen])
    header.update(changes)
    raw = json.dumps(header).encode()
    return data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + hlen :]


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda d: b"NOTMAGIC" + d[8:], "bad magic"),
        (lambda d: d[:5], "bad magic"),
        (lambda d: d[:-3], "truncated"),
        (lambda d: d + b"\0", "trailing bytes"),
        (lambda d: d[:14], "corrupted or truncated header"),
        (lambda d: _rewrite_header(d, version=2), "unsupported version 2"),
        (lambda d: _rewrite_header(d, k=0), "k must be"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 0x40]), "CRC32 mismatch"),
    ],
)
def test_bad_files_raise_value_error_naming_file_and_problem(tmp_path, corrupt, problem):
    path, data = _one_shard(tmp_path)
    read_shard(path)  # the intact file reads
    with open(path, "wb") as f:
        f.write(corrupt(data))
    with pytest.raises(ValueError, match="shard-00000.sqdk") as e:
        list(Reader(str(tmp_path)))
    assert problem in str(e.value)


def test_reader_rejects_mismatched_and_missing_shards(tmp_path):
    _one_shard(tmp_path, k=4)
    with pytest.raises(ValueError, match=r"shard-00000.sqdk: k mismatch: shard has 4, expected 8"):
        Reader(str(tmp_path), k=8)
    write_shard(str(tmp_path / "shard-00001.sqdk"), sample(torch.randn(2, VOCAB), 5), VOCAB)
    with pytest.raises(ValueError, match=r"shard-00001.sqdk: k mismatch"):
        Reader(str(tmp_path))
    os.rename(tmp_path / "shard-00001.sqdk", tmp_path / "shard-00002.sqdk")
    with pytest.raises(ValueError, match="shard 1 .* is missing"):
        Reader(str(tmp_path))
    with pytest.raises(ValueError, match="already holds shards"):
        Writer(str(tmp_path), vocab=VOCAB, k=4)
    with pytest.raises(ValueError, match="rank"):
        Reader(str(tmp_path), rank=2, world=2)


def test_writer_rejects_mismatched_sample(tmp_path):
    w = Writer(str(tmp_path), vocab=VOCAB, k=4)
    with pytest.raises(ValueError, match="k=4"):
        w.write(sample(torch.randn(3, VOCAB), 5))
    bad = sample(torch.randn(3, VOCAB), 4)
    with pytest.raises(ValueError, match="vocab=50"):
        w.write(bad._replace(ids=bad.ids + VOCAB))


def test_masked_entries_get_zero_weight():
    logits = _teacher(16, vocab=10)
    logits[3:] = -torch.inf  # only 3 finite entries, k = 5 draws two masked ones
    s = sample(logits.expand(2000, -1), 5, generator=torch.Generator().manual_seed(17))
    w = weights(s)
    assert torch.all(torch.isfinite(w)) and torch.all(w[s.ids >= 3] == 0)
    # Every finite entry is always drawn (tau = -inf): the estimate is exact.
    torch.testing.assert_close(w.sum(-1).double(), torch.full((2000,), float(_target(logits).sum()), dtype=torch.float64))


# ------------------------------------------------- dump_teacher / open_teacher


def _run_logits(step, rank):
    """Teacher logits of (step, rank) of a 2-rank run: batch 2 x seq 3, distinct per pair."""
    return torch.randn(2, 3, VOCAB, generator=torch.Generator().manual_seed(100 * step + rank)) * 2


def test_dump_teacher_shard_of_step_and_rank_holds_their_logits(tmp_path):
    paths = dump_teacher(_run_logits, str(tmp_path), VOCAB, positions=6, steps=2, world=2, k=5,
                         seed=3, meta={"batch": 2, "seq": 3})
    assert [os.path.basename(p) for p in paths] == [f"shard-0000{i}.sqdk" for i in range(4)]
    with open(tmp_path / TEACHER_META) as f:
        assert json.load(f) == {"steps": 2, "seed": 3, "world": 2, "k": 5, "temperature": 1.0,
                                "batch": 2, "seq": 3}
    for rank in range(2):
        shards = list(open_teacher(str(tmp_path), rank, 2, steps=2, batch=2, seq=3, seed=3))
        assert len(shards) == 2
        for step, s in enumerate(shards, start=1):  # the rank's shards come in step order
            logp = torch.log_softmax(_run_logits(step, rank).reshape(6, VOCAB).double(), -1)
            assert s.ids.shape == (6, 5)
            # fp16 rounding of the log-probabilities only (relative error 2**-11)
            torch.testing.assert_close(s.logp16.double(), torch.gather(logp, 1, s.ids.long()),
                                       rtol=2**-10, atol=2**-14)
    again = dump_teacher(_run_logits, str(tmp_path / "again"), VOCAB, positions=6, steps=2,
                         world=2, k=5, seed=3)
    for a, b in zip(paths, again):  # the seed fixes the Gumbel noise
        assert torch.equal(read_shard(a)[1].ids, read_shard(b)[1].ids)


def test_dump_teacher_rejects_a_used_directory_and_a_wrong_batch(tmp_path):
    dump_teacher(_run_logits, str(tmp_path), VOCAB, positions=6, steps=1)
    with pytest.raises(ValueError, match="already holds shards"):
        dump_teacher(_run_logits, str(tmp_path), VOCAB, positions=6, steps=1)
    with pytest.raises(ValueError, match=r"teacher_logits\(1, 0\) has shape \(2, 3, 50\), not 4"):
        dump_teacher(_run_logits, str(tmp_path / "other"), VOCAB, positions=4, steps=1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        dump_teacher(_run_logits, str(tmp_path / "other"), VOCAB, positions=6, steps=0)


def test_open_teacher_refuses_a_dump_of_other_windows(tmp_path):
    dump_teacher(_run_logits, str(tmp_path), VOCAB, positions=6, steps=2, world=2,
                 meta={"batch": 2, "seq": 3})
    assert len(open_teacher(str(tmp_path), 1, 2, steps=1, batch=2, seq=3)) == 2
    for world, steps, batch, wrong in ((1, 2, 2, "'world': (2, 1)"), (2, 3, 2, "'steps': (2, 3)"),
                                       (2, 2, 4, "'batch': (2, 4)")):
        with pytest.raises(ValueError, match=f"dumped for other windows: .*{re.escape(wrong)}"):
            open_teacher(str(tmp_path), 0, world, steps=steps, batch=batch, seq=3)
