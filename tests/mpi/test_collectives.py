"""Collectives across real MPI ranks.

Run: ``mpirun -n N python -m mpi4py -m pytest --with-mpi tests/mpi`` (N = 1..4;
tests/test_mpi_suites.py does this), over MPI or, with
``SQUINCHCOMM_TEST_TRANSPORT=torch``, over a torch.distributed gloo group: one
test body for every engine. Every input derives from (seed, rank), so
each rank computes the exact fp64 reference locally (nccl-tests' verifiable
style). Bounds come from the format: nearest rounding errs by at most
(29/450) e^(1/6) < 0.0762 of the block maximum, once per quantization.
"""

import hashlib
import os

import numpy as np
import pytest

pytestmark = pytest.mark.mpi
MPI = pytest.importorskip("mpi4py.MPI")

from squinchcomm.codec import oracle  # noqa: E402
from squinchcomm.collectives import Communicator, shard_bounds  # noqa: E402

Q = 0.0762  # worst-case nearest-rounding error / block max
SIZES = [0, 1, 7, 8, 1000, 4099, 65536 + 13]


@pytest.fixture(scope="module")
def comm():
    """The communicator under test: MPI, or torch.distributed gloo when
    SQUINCHCOMM_TEST_TRANSPORT=torch (mpirun only launches the ranks then)."""
    if os.environ.get("SQUINCHCOMM_TEST_TRANSPORT", "mpi") == "torch":
        from squinchcomm.transport.torch_dist import TorchTransport, init_process_group_from_env

        init_process_group_from_env(backend="gloo")
        return Communicator(TorchTransport(), min_compress_bytes=0, timeout=60)
    return Communicator(MPI.COMM_WORLD.Dup(), min_compress_bytes=0, timeout=60)


def data(seed, rank, n, dtype=np.float32):
    """Rank ``rank``'s input: heavy-tailed, gradient-like, reproducible anywhere."""
    return (np.random.default_rng([seed, rank, n]).standard_t(3, n) * 1e-2).astype(dtype)


def all_inputs(comm, seed, n, dtype=np.float32):
    return [data(seed, r, n, dtype).astype(np.float64) for r in range(comm.size)]


def block_max(x):
    pad = np.zeros(-x.size % 8)
    return np.repeat(np.abs(np.concatenate([x, pad])).reshape(-1, 8).max(axis=1), 8)[: x.size]


def same_everywhere(comm, arr):
    digests = comm.transport.allgather_object(hashlib.sha256(np.ascontiguousarray(arr)
                                                             .tobytes()).hexdigest())
    assert len(set(digests)) == 1, "results differ across ranks"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", ["average", "sum"])
@pytest.mark.parametrize("compression", ["none", "fp16", "bf16", "squinch"])
def test_allreduce_error_bound_and_bit_identical(comm, n, op, compression):
    x = data(1, comm.rank, n)
    xs = all_inputs(comm, 1, n)
    scale = 1 / comm.size if op == "average" else 1.0
    ref = sum(xs) * scale
    y = comm.allreduce(x, op=op, compression=compression)
    assert y.shape == x.shape and y.dtype == np.float32
    same_everywhere(comm, y)
    mag = sum(np.abs(v) for v in xs) * scale  # bound on |each term| summed
    if compression == "none":
        bound = 1e-6 * mag + 1e-30
    elif compression in ("fp16", "bf16"):
        u = 2.0 ** -11 if compression == "fp16" else 2.0 ** -8
        tiny = 2.0 ** -25 if compression == "fp16" else 0.0  # fp16 subnormal spacing / 2
        bound = u * mag * (2 + u) + 1e-6 * mag + (comm.size * scale + 1) * tiny + 1e-30
    else:
        first = Q * sum(block_max(v) for v in xs) * scale  # per-element, stage 1
        bound = first + Q * block_max(mag + first) + 1e-30  # stage 2 on the reduced value
    assert np.all(np.abs(y - ref) <= bound)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_return_their_dtype(comm, dtype):
    torch = pytest.importorskip("torch")
    n = 3001
    x = torch.from_numpy(data(2, comm.rank, n)).to(getattr(torch, dtype))
    y = comm.allreduce(x, compression="squinch")
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.shape == x.shape
    same_everywhere(comm, y.view(torch.int16).numpy())
    ref = sum(torch.from_numpy(data(2, r, n)).to(getattr(torch, dtype)).double()
              for r in range(comm.size)) / comm.size
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < 0.12


def test_bytes_sent_counts_what_the_call_sends(comm):
    """The ring model from first principles: an allreduce sends 2(N-1)/N of
    the tensor, a reduce-scatter (N-1)/N; Squinch is 6 bytes per 8 values,
    uncompressed is the input's own dtype, float64 is never compressed, and a
    tensor under min_compress_bytes goes uncompressed."""
    n, ring = 4096, 2 * (comm.size - 1) / comm.size
    x = data(0, comm.rank, n)
    assert comm.bytes_sent(x, "none") == pytest.approx((ring * 4 * n, ring * 4 * n))
    assert comm.bytes_sent(x, "squinch") == pytest.approx((ring * 6 * n / 8, ring * 4 * n))
    assert comm.bytes_sent(x, "bf16") == pytest.approx((ring * 2 * n, ring * 4 * n))
    assert comm.bytes_sent(x.astype(np.float16), "none") == pytest.approx((ring * 2 * n,) * 2)
    assert comm.bytes_sent(x.astype(np.float64), "squinch") == pytest.approx((ring * 8 * n,) * 2)
    assert comm.bytes_sent(x, "squinch", collective="reduce_scatter") == \
        pytest.approx((ring / 2 * 6 * n / 8, ring / 2 * 4 * n))
    saved, comm.min_compress_bytes = comm.min_compress_bytes, 4 * n + 1
    try:
        assert comm.bytes_sent(x, "squinch") == pytest.approx((ring * 4 * n,) * 2)
    finally:
        comm.min_compress_bytes = saved


def test_reduce_scatter_shards_cover_the_tensor(comm):
    n = 10_001
    xs = all_inputs(comm, 3, n)
    ref = sum(xs) / comm.size
    for compression in ("none", "squinch"):
        shard, (lo, hi) = comm.reduce_scatter(data(3, comm.rank, n), compression=compression)
        assert (lo, hi) == tuple(shard_bounds(n, comm.size)[comm.rank: comm.rank + 2])
        assert shard.dtype == np.float32 and shard.size == hi - lo
        bound = (1e-6 if compression == "none" else Q) * \
            (sum(block_max(v) for v in xs) / comm.size)[lo:hi] + 1e-30
        assert np.all(np.abs(shard - ref[lo:hi]) <= bound)  # one quantization only
        spans = comm.transport.allgather_object((lo, hi))
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_allgather_variable_rows(comm):
    rows = comm.rank + 2
    x = data(4, comm.rank, rows * 5).reshape(rows, 5)
    full = np.concatenate([data(4, r, (r + 2) * 5).reshape(r + 2, 5) for r in range(comm.size)])
    y = comm.allgather(x)
    assert y.shape == full.shape and np.array_equal(y, full)
    z = comm.allgather(x, compression="squinch")
    assert z.shape == full.shape
    same_everywhere(comm, z)
    bound = Q * np.concatenate([block_max(data(4, r, (r + 2) * 5).astype(np.float64))
                                for r in range(comm.size)]).reshape(full.shape)
    assert np.all(np.abs(z - full) <= bound + 1e-30)


def test_broadcast_from_last_rank(comm):
    root = comm.size - 1
    x = data(5, comm.rank, 777)
    comm.broadcast(x, root=root)
    assert np.array_equal(x, data(5, root, 777))


def test_alltoall_uneven_splits(comm):
    splits = [(comm.rank + r) % 3 for r in range(comm.size)]  # zeros included
    x = np.arange(sum(splits), dtype=np.float32) + 100 * comm.rank
    recv, recv_splits = comm.alltoall(x, splits)
    expected = []
    for src in range(comm.size):
        s = [(src + r) % 3 for r in range(comm.size)]
        start = sum(s[: comm.rank])
        expected.append(np.arange(start, start + s[comm.rank], dtype=np.float32) + 100 * src)
    assert recv_splits == [e.size for e in expected]
    assert np.array_equal(recv, np.concatenate(expected))


def test_nan_and_inf_propagate_identically(comm):
    n = 1000
    x = data(6, comm.rank, n)
    if comm.rank == comm.size - 1:
        x[17] = np.nan
        x[500] = np.inf
    for compression in ("squinch", "fp16", "none"):
        y = comm.allreduce(x, compression=compression)
        same_everywhere(comm, y)
        assert not np.isfinite(y[17]) and not np.isfinite(y[500])
        if compression == "squinch":  # whole blocks become NaN, the rest stays finite
            assert np.isnan(y[16:24]).all() and np.isnan(y[496:504]).all()
            assert np.isfinite(np.delete(y, np.r_[16:24, 496:504])).all()


def test_async_handles_complete_in_any_order(comm):
    xs = [data(7, comm.rank, 5000 + i) for i in range(3)]
    handles = [comm.allreduce_async(x) for x in xs]
    results = [h.wait() for h in reversed(handles)][::-1]
    for x, y in zip(xs, results):
        assert np.array_equal(y, comm.allreduce(x)) or comm.rounding == "stochastic"
    assert all(h.test() for h in handles)


def test_in_place_and_torch_tensors(comm):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(data(8, comm.rank, 4096).copy())
    expected = comm.allreduce(t.numpy().copy())
    out = comm.allreduce(t, out=t)
    assert out is t and np.array_equal(t.numpy(), expected)


def test_small_tensors_skip_compression(comm):
    small = Communicator(comm.transport, min_compress_bytes=1 << 20, timeout=60)
    x = data(9, comm.rank, 1000)
    y = small.allreduce(x, compression="squinch")
    ref = sum(all_inputs(comm, 9, 1000)) / comm.size
    assert np.max(np.abs(y - ref)) <= 1e-6 * np.max(np.abs(ref))  # exact fp32 path


def test_error_feedback_accumulates_and_checkpoints(comm):
    n, steps = 8000, 12
    c = Communicator(comm.transport, min_compress_bytes=0, timeout=60)
    x = data(10, comm.rank, n)
    ref = sum(all_inputs(comm, 10, n)) / comm.size
    total_ef = np.zeros(n)
    total_plain = np.zeros(n)
    for _ in range(steps):
        total_ef += c.allreduce(x, name="w", error_feedback=True)
        total_plain += c.allreduce(x)
    err_ef = np.linalg.norm(total_ef / steps - ref)
    err_plain = np.linalg.norm(total_plain / steps - ref)
    assert err_ef < 0.5 * err_plain  # the residual carries each step's error forward
    # state_dict round trip: restoring reproduces the next step bit for bit.
    saved = c.error_feedback.state_dict()
    a = c.allreduce(x, name="w", error_feedback=True)
    c.error_feedback.load_state_dict(saved, world=comm.size)
    b = c.allreduce(x, name="w", error_feedback=True)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="saved at world size"):
        c.error_feedback.load_state_dict(
            {"k": {**next(iter(saved.values())), "world": comm.size + 1}}, world=comm.size)
    with pytest.raises(ValueError, match="pass name="):
        c.allreduce(x, error_feedback=True)


def test_mismatched_shapes_raise_on_every_rank(comm):
    n = 100 if comm.rank == 0 else 101
    if comm.size == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(ValueError, match=r"allreduce: ranks disagree \(shape: rank 0=\(100,\)"):
        comm.allreduce(np.zeros(n, np.float32))
    comp = "squinch" if comm.rank == 0 else "fp16"
    with pytest.raises(ValueError, match="compression: rank 0='squinch'"):
        comm.allreduce(np.zeros(4096, np.float32), compression=comp)
    comm.barrier()  # still usable afterwards


def test_hierarchical_matches_bound_and_is_bit_identical(comm):
    if comm.size != 4:
        pytest.skip("emulates 2 nodes x 2 ranks")
    h = Communicator(comm.transport, hierarchical=True, node_size=2, min_compress_bytes=0,
                     rounding="nearest", timeout=60)
    assert (h.local_size, h.cross_size, h.hierarchical) == (2, 2, True)
    assert h.local_rank == comm.rank % 2 and h.cross_rank == comm.rank // 2
    n = 20_003
    xs = all_inputs(comm, 11, n)
    y = h.allreduce(data(11, comm.rank, n))
    same_everywhere(comm, y)
    ref = sum(xs) / 4
    nodes = [xs[0] + xs[1], xs[2] + xs[3]]  # uncompressed inside a node
    first = Q * sum(block_max(v) for v in nodes) / 4
    bound = first + Q * block_max(sum(np.abs(v) for v in nodes) / 4 + first) + 1e-6 * np.abs(ref)
    assert np.all(np.abs(y - ref) <= bound)
    # Exact result, from the NumPy codec reference: each node's fp32 sum (two
    # terms, so independent of order) is Squinch-encoded once, the two node
    # payloads are decoded, summed, scaled by 1/4 and re-encoded, and that is
    # decoded. Nearest rounding works block by block, and every node slice and
    # shard is block-aligned, so slicing cannot change these bytes.
    node32 = [data(11, 0, n) + data(11, 1, n), data(11, 2, n) + data(11, 3, n)]
    stage1 = np.stack([oracle.encode(v) for v in node32])
    want = oracle.decode(oracle.reduce_encode(stage1, n, 0.25), n)
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
    # The flat allreduce of the same inputs: its own two-stage bound on the four
    # rank inputs, bit-identical everywhere, and different bits from the
    # hierarchical result (which quantizes node sums, not rank inputs).
    flat = Communicator(comm.transport, min_compress_bytes=0, rounding="nearest", timeout=60)
    f = flat.allreduce(data(11, comm.rank, n))
    same_everywhere(comm, f)
    mag = sum(np.abs(v) for v in xs) / 4
    first_f = Q * sum(block_max(v) for v in xs) / 4
    assert np.all(np.abs(f - ref) <= first_f + Q * block_max(mag + first_f) + 1e-6 * mag)
    assert not np.array_equal(f, y)


def test_default_communicator_api(comm):
    import squinchcomm

    squinchcomm.shutdown()
    with pytest.raises(ValueError, match=r"is not initialized: call squinchcomm.init\(\)"):
        squinchcomm.rank()
    c = squinchcomm.init(comm.transport, compression="bf16")
    assert squinchcomm.is_initialized() and c.compression == "bf16"
    assert (squinchcomm.rank(), squinchcomm.size()) == (comm.rank, comm.size)
    assert 0 <= squinchcomm.local_rank() < squinchcomm.local_size()
    assert squinchcomm.local_size() * squinchcomm.cross_size() == comm.size
    squinchcomm.shutdown()
    assert not squinchcomm.is_initialized()
    with pytest.raises(ValueError, match="transport='tcp'"):
        squinchcomm.init("tcp")


def test_bad_arguments_raise_value_errors(comm):
    x = np.zeros(4096, np.float32)
    with pytest.raises(ValueError, match="compression='int3': choose one of none, fp16"):
        comm.allreduce(x, compression="int3")
    with pytest.raises(ValueError, match="op='median': choose one of average, sum, min, max"):
        comm.allreduce(x, op="median")
    with pytest.raises(ValueError, match="op='max' runs uncompressed"):
        comm.allreduce(x, op="max", compression="squinch")
    with pytest.raises(ValueError, match="op='min': choose one of average, sum"):
        comm.reduce_scatter(x, op="min")
    with pytest.raises(ValueError, match="cannot reduce complex64 data"):
        comm.allreduce(np.zeros(4096, np.complex64))
    with pytest.raises(ValueError, match="prescale/postscale of bool data"):
        comm.allreduce(np.zeros(16, bool), prescale=0.5)
    with pytest.raises(ValueError, match="must be contiguous"):
        comm.allreduce(np.zeros((64, 64), np.float32).T)
    with pytest.raises(ValueError, match="out has 10 elements, expected 4096"):
        comm.allreduce(x, out=np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="is not a rank"):
        comm.broadcast(x, root=comm.size)
    with pytest.raises(ValueError, match="non-negative entries"):
        comm.alltoall(x, splits=[-1] + [0] * (comm.size - 1))
    with pytest.raises(ValueError, match="node_size=3 does not divide") if comm.size % 3 else \
            pytest.raises(ValueError, match="node_size=5 does not divide"):
        Communicator(comm.transport, node_size=3 if comm.size % 3 else 5)
    comm.barrier()


@pytest.mark.parametrize("compression", ["squinch", "bf16"])
def test_compressed_broadcast_and_alltoall(comm, compression):
    root = comm.size // 2
    x = data(12, comm.rank, 5003)
    comm.broadcast(x, root=root, compression=compression)
    same_everywhere(comm, x)  # the root decodes the same bytes as everyone
    src = data(12, root, 5003).astype(np.float64)
    q = Q if compression == "squinch" else 2.0 ** -8
    assert np.all(np.abs(x - src) <= q * (block_max(src) if compression == "squinch"
                                          else np.abs(src)) + 1e-30)
    splits = [1000 + 7 * ((comm.rank + r) % 3) for r in range(comm.size)]
    y = data(13, comm.rank, sum(splits))
    recv, recv_splits = comm.alltoall(y, splits, compression=compression)
    start = 0
    for src_rank in range(comm.size):
        s = [1000 + 7 * ((src_rank + r) % 3) for r in range(comm.size)]
        lo = sum(s[: comm.rank])
        sent = data(13, src_rank, sum(s))[lo: lo + s[comm.rank]].astype(np.float64)
        got = recv[start: start + recv_splits[src_rank]]
        bound = q * (block_max(sent) if compression == "squinch" else np.abs(sent)) + 1e-30
        assert got.size == sent.size and np.all(np.abs(got - sent) <= bound)
        start += recv_splits[src_rank]


def test_async_handles_polled_in_rank_dependent_orders(comm):
    """Ranks poll and wait on their handles in different orders; operations
    still run in submission order everywhere, so nothing is mismatched."""
    xs = [data(14, comm.rank, 20_000 + 8 * i) for i in range(4)]
    handles = [comm.allreduce_async(x, compression=c)
               for x, c in zip(xs, ["squinch", "none", "bf16", "squinch"])]
    gathered = comm.allgather(np.arange(3, dtype=np.float32))  # blocking op queued behind them
    assert gathered.size == 3 * comm.size
    rng = np.random.default_rng(comm.rank)
    for _ in range(25):
        handles[int(rng.integers(4))].test()
    results = {int(i): handles[int(i)].wait() for i in rng.permutation(4)}
    for i, (x, c) in enumerate(zip(xs, ["squinch", "none", "bf16", "squinch"])):
        assert np.array_equal(results[i], comm.allreduce(x, compression=c))
        same_everywhere(comm, results[i])


@pytest.mark.parametrize("compression", ["squinch", "bf16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_pipelined_chunks_give_the_same_bits(comm, compression, rounding):
    """A large allreduce runs in overlapped chunks (pipeline_bytes); chunks and
    shards are block-aligned and rounding draws from global indices, so the
    result, error feedback included, must not depend on the chunk size. The
    chunk sizes here cut the tensor into 1, 3 and about 25 chunks, uneven ones
    and ones that split blocks' worth of shards differently per rank."""
    n = 50_021
    results = []
    for pipeline_bytes in (0, 4 * 17_000 + 4, 8_000):
        c = Communicator(comm.transport, min_compress_bytes=0, rounding=rounding, timeout=60,
                         pipeline_bytes=pipeline_bytes)
        steps = [c.allreduce(data(15 + step, comm.rank, n), compression=compression,
                             error_feedback=True, name="w") for step in range(3)]
        results.append(np.concatenate(steps))
    same_everywhere(comm, results[-1])
    for other in results[1:]:
        assert np.array_equal(results[0], other)
    ref = sum(all_inputs(comm, 15, n)) / comm.size
    q = 2 * Q if compression == "squinch" else 2.0 ** -7
    assert np.abs(results[0][:n] - ref).max() <= 2 * q * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("compression", ["squinch", "bf16"])
def test_hierarchical_pipelined_gives_the_same_bits(comm, compression):
    """2 x 2 ranks: the cross-node allreduce in 4 KiB chunks, whose payloads
    the node shares (step 3), gives the bits of the one-piece run, with and
    without error feedback (two calls: the residuals carry over)."""
    if comm.size != 4:
        pytest.skip("emulates 2 nodes x 2 ranks")
    runs = []
    for pipeline in (0, 4096):
        h = Communicator(comm.transport, hierarchical=True, node_size=2, min_compress_bytes=0,
                         pipeline_bytes=pipeline, timeout=60)
        out = [h.allreduce(data(41 + k, comm.rank, 50_001), compression=compression)
               for k in range(2)]
        out += [h.allreduce(data(43, comm.rank, 50_001), compression=compression,
                            name="hier-ef", error_feedback=True) for _ in range(2)]
        runs.append(out)
    for a, b in zip(*runs):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        same_everywhere(comm, a)
    assert not np.array_equal(runs[0][2], runs[0][3])  # same input: the residual changed it


def test_join_answers_with_zeros_exactly(comm):
    """The last rank joins at once (Communicator.join); the others' flat,
    error-feedback and (2 x 2 ranks) hierarchical allreduces see zeros from
    it: within the Squinch bound of the sum over the others, bit-identical
    across them, and the hierarchical bytes equal the NumPy codec reference
    with a zero input. join() returns the last to join on every rank."""
    if comm.size < 2:
        pytest.skip("needs 2 ranks")
    last, n = comm.size - 1, 20_003
    hier = (Communicator(comm.transport, hierarchical=True, node_size=2, min_compress_bytes=0,
                         rounding="nearest", timeout=60) if comm.size == 4 else None)
    got = []
    if comm.rank == last:
        if hier is not None:
            assert hier.join() == last - 1  # ranks 0..last-1 join together: the highest
        assert comm.join() == last - 1
    else:
        if hier is not None:
            h = hier.allreduce(data(11, comm.rank, n))
            node32 = [data(11, 0, n) + data(11, 1, n), data(11, 2, n)]  # rank 3 adds zeros
            stage1 = np.stack([oracle.encode(v) for v in node32])
            want = oracle.decode(oracle.reduce_encode(stage1, n, 0.25), n)
            assert np.array_equal(h.view(np.uint32), want.view(np.uint32))
            assert hier.join() == last - 1
            got.append(h)
        xs = all_inputs(comm, 12, n)[:last]
        mag = sum(np.abs(v) for v in xs)
        first = Q * sum(block_max(v) for v in xs)
        bound = first + Q * block_max(mag + first) + 1e-6 * mag
        y = comm.allreduce(data(12, comm.rank, n), op="sum", rounding="nearest")
        assert np.all(np.abs(y - sum(xs)) <= bound)
        e = comm.allreduce(data(12, comm.rank, n), op="sum", name="join_ef",
                           error_feedback=True, rounding="stochastic")
        assert np.all(np.abs(e - sum(xs)) <= 2 * bound)  # stochastic: under one step
        got += [y, e]
        assert comm.join() == last - 1
    digests = comm.transport.allgather_object(
        [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in got])
    assert len({tuple(d) for d in digests[:last]}) == 1, "results differ across ranks"


# ---------------------------------------------------------------------------- compression="auto"
from squinchcomm.collectives import LinkModel  # noqa: E402


def _stated(comm, bandwidth_bps, squinch_gbps=1.0):
    return LinkModel.from_rates(comm.size, bandwidth_bps, latency_s=1e-4,
                                squinch_gbps=squinch_gbps, bf16_gbps=4.0)


def test_auto_probe_gives_every_rank_the_same_model(comm):
    """Built with compression="auto", the communicator probes its link at
    construction; every rank holds the same model, so every rank sends each
    size in the same method, and the result is that method's, bit for bit."""
    auto = Communicator(comm.transport, compression="auto", min_compress_bytes=0, timeout=60)
    model = auto.link_model
    assert model is not None and model.world == comm.size
    same_everywhere(comm, np.frombuffer(repr(model.to_dict()).encode(), np.uint8))
    if comm.size == 1:
        assert model.source == "single rank" and model.choose(1 << 26) == "none"
    else:
        assert model.source == "probe" and model.bytes_per_s > 0
        assert {m for _, m in model.ranges()} <= {"none", "bf16", "squinch"}
    for n in (1000, 300_000, 2_000_000):
        x = data(31, comm.rank, n)
        chosen = model.choose(n)
        got = auto.allreduce(x)
        want = comm.allreduce(x, compression=chosen)
        assert np.array_equal(got, want), f"n={n}: auto did not send in {chosen}"
        same_everywhere(comm, got)
    again = auto.measure_link(probe_bytes=[64 << 10, 256 << 10], repeats=1)  # re-measurable
    assert auto.link_model is again and again.world == comm.size
    same_everywhere(comm, np.frombuffer(repr(again.to_dict()).encode(), np.uint8))


@pytest.mark.parametrize("collective", ["allreduce", "reduce_scatter", "allgather"])
def test_auto_follows_a_stated_link(comm, collective):
    """A slow stated link (50 Mbit/s) makes a 1 MiB message go in Squinch (its
    wire time, 5.3x shorter than fp32's, outweighs a 1 GB/s codec); a fast one
    (1 Tbit/s) with a slow codec makes it go uncompressed, exact."""
    if comm.size == 1:
        pytest.skip("one rank: nothing travels, auto is always uncompressed")
    n = 1 << 18
    x = data(32, comm.rank, n)
    call = {"allreduce": lambda c, **kw: c.allreduce(x, **kw),
            "reduce_scatter": lambda c, **kw: c.reduce_scatter(x, **kw)[0],  # (shard, bounds)
            "allgather": lambda c, **kw: c.allgather(x, **kw)}[collective]
    slow = Communicator(comm.transport, compression="auto", min_compress_bytes=0, timeout=60,
                        link_model=_stated(comm, 50e6))
    fast = Communicator(comm.transport, compression="auto", min_compress_bytes=0, timeout=60,
                        link_model=_stated(comm, 1e12, squinch_gbps=0.1))
    # (allgather moves exact bytes unless asked: its compression= defaults to none)
    assert np.array_equal(call(slow, compression="auto"), call(comm, compression="squinch"))
    assert np.array_equal(call(fast, compression="auto"), call(comm, compression="none"))
    assert not np.array_equal(call(slow, compression="auto"), call(fast, compression="auto"))


def test_auto_per_call_probes_once_at_first_use(comm):
    """compression="auto" on a communicator built without it measures the link
    at the first such call (collectively, in program order), then reuses it."""
    c = Communicator(comm.transport, min_compress_bytes=0, timeout=60)
    assert c.link_model is None
    c.allreduce(data(33, comm.rank, 4096), compression="auto")
    first = c.link_model
    assert first is not None and first.world == comm.size
    c.allreduce(data(34, comm.rank, 4096), compression="auto")
    assert c.link_model is first


def test_auto_with_different_models_raises_on_every_rank(comm):
    """Ranks that state different links would send in different methods: the
    metadata check names the disagreement on every rank instead of mixing
    wire formats."""
    if comm.size == 1:
        pytest.skip("needs two ranks")
    model = _stated(comm, 50e6 if comm.rank == 0 else 1e12, squinch_gbps=0.1)
    c = Communicator(comm.transport, compression="auto", min_compress_bytes=0, timeout=60,
                     link_model=model)
    with pytest.raises(ValueError, match="compression: rank 0='squinch'"):
        c.allreduce(data(35, comm.rank, 1 << 18))
    comm.barrier()


def test_auto_rejects_a_model_for_another_world(comm):
    with pytest.raises(ValueError, match=f"link_model is for {comm.size + 1} ranks"):
        Communicator(comm.transport, compression="auto", timeout=60,
                     link_model=LinkModel.from_rates(comm.size + 1, 1e9))
    comm.barrier()
