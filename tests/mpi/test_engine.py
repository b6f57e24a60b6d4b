"""The progress engine across real ranks: operations progress without polling,
keep one order under rank-dependent timing, fail loudly on every rank and do
not wedge what comes after; exact collectives of float64 and integers; the
reduce-scatter over arbitrary splits.

Run like the other MPI suites (tests/test_mpi_suites.py), over MPI or over
torch.distributed gloo (``SQUINCHCOMM_TEST_TRANSPORT=torch``).
"""

import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.mpi
MPI = pytest.importorskip("mpi4py.MPI")

from squinchcomm import codec  # noqa: E402
from squinchcomm.collectives import Communicator  # noqa: E402
from test_collectives import Q, all_inputs, block_max, comm, data, same_everywhere  # noqa: E402,F401


def squinch_bound(xs, scale):
    mag = sum(np.abs(v) for v in xs) * scale
    first = Q * sum(block_max(v) for v in xs) * scale
    return first + Q * block_max(mag + first) + 1e-30


def test_unpolled_handle_completes_while_the_caller_sleeps(comm):
    """A two-stage compressed allreduce finishes while its caller only sleeps:
    nobody calls test() or wait() until it is done."""
    n = 40_000
    finished = threading.Event()
    h = comm.allreduce_async(data(30, comm.rank, n), compression="squinch")
    h.add_done_callback(lambda _: finished.set())
    assert finished.wait(60), "the operation did not progress without being polled"
    assert h.test()
    y = h.wait()
    xs = all_inputs(comm, 30, n)
    assert np.all(np.abs(y - sum(xs) / comm.size) <= squinch_bound(xs, 1 / comm.size))
    same_everywhere(comm, y)


def test_buckets_in_flight_with_rank_dependent_delays(comm):
    """Gradient buckets submitted one by one with rank-dependent compute in
    between (as backward produces them), several in flight, then waited for in
    a rank-dependent order: every result is within its bound and bit-identical
    on every rank, and all of them completed before anyone waited."""
    sizes = [30_000, 5_000, 70_001, 12_345, 40_000, 8]
    comps = ["squinch", "bf16", "squinch", "none", "fp16", "squinch"]
    done = [threading.Event() for _ in sizes]
    handles = []
    for i, (n, c) in enumerate(zip(sizes, comps)):
        time.sleep(0.02 * ((comm.rank + i) % 3))  # this rank's "backward" for bucket i
        h = comm.allreduce_async(data(40 + i, comm.rank, n), compression=c, name=f"bucket{i}")
        h.add_done_callback(lambda _, e=done[i]: e.set())
        handles.append(h)
    for e in done:  # sleep, do not poll
        assert e.wait(60), "a bucket did not complete without polling"
    order = np.random.default_rng(comm.rank).permutation(len(sizes))
    results = {int(i): handles[int(i)].wait() for i in order}
    for i, (n, c) in enumerate(zip(sizes, comps)):
        xs = all_inputs(comm, 40 + i, n)
        ref = sum(xs) / comm.size
        mag = sum(np.abs(v) for v in xs) / comm.size
        u, tiny = {"bf16": (2.0 ** -8, 0.0), "fp16": (2.0 ** -11, 2.0 ** -25)}.get(c, (0, 0))
        bound = {"squinch": squinch_bound(xs, 1 / comm.size),  # as in test_collectives
                 "bf16": u * mag * (2 + u) + 2 * tiny, "fp16": u * mag * (2 + u) + 2 * tiny,
                 "none": 0.0}[c] + 1e-6 * mag + 1e-30
        assert np.all(np.abs(results[i] - ref) <= bound), (i, c)
        same_everywhere(comm, results[i])


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="needs ranks that disagree")
def test_mismatched_shapes_raise_on_every_rank_and_do_not_wedge(comm):
    x = np.ones(1000 + 8 * comm.rank, np.float32)
    h = comm.allreduce_async(x, compression="squinch", name="w")
    with pytest.raises(ValueError, match="allreduce: ranks disagree .*shape"):
        h.wait()
    # The next operations run normally.
    y = comm.allreduce(np.full(1000, comm.rank, np.float32), compression="none", op="sum")
    assert np.array_equal(y, np.full(1000, sum(range(comm.size)), np.float32))


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="needs ranks that disagree")
def test_different_collectives_raise_on_every_rank(comm):
    """Rank 0 calls allreduce while the others call reduce_scatter on the same
    tensor: the kind of collective is part of what ranks agree on."""
    x = np.ones(4096, np.float32)
    with pytest.raises(ValueError, match="ranks disagree .*collective") as info:
        if comm.rank == 0:
            comm.allreduce(x, compression="squinch")
        else:
            comm.reduce_scatter(x, compression="squinch")
    # One message on every rank (each used to describe the mismatch from its
    # own side), catchable as Horovod users catch it (a RuntimeError).
    assert isinstance(info.value, RuntimeError)
    assert len(set(comm.transport.allgather_object(str(info.value)))) == 1
    comm.barrier()


def _communicator_like(comm, **options):
    """A new Communicator over a new group of the same ranks and engine kind."""
    from squinchcomm.collectives import Communicator

    if comm.transport.name == "mpi":
        return Communicator(MPI.COMM_WORLD.Dup(), timeout=60, **options)
    from squinchcomm.transport.torch_dist import TorchTransport

    return Communicator(TorchTransport(), timeout=60, **options)


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="needs ranks that disagree")
@pytest.mark.parametrize("setting, values", [
    ("pipeline_bytes", (1 << 20, 4 << 20)),  # gave a silently wrong result over MPI
    ("check_metadata", (True, False)),       # gave a segmentation fault under MPI
    ("min_compress_bytes", (0, 65536)),
])
def test_settings_that_shape_the_exchange_must_agree(comm, setting, values):
    """A communicator whose ranks were built with different wire settings is
    refused at construction with the same MismatchError on every rank."""
    from squinchcomm.errors import MismatchError

    value = values[0] if comm.rank == 0 else values[1]
    with pytest.raises(MismatchError, match=rf"Communicator\(\): ranks disagree "
                                            rf"\({setting}: rank 0={values[0]!r}, "
                                            f"rank 1={values[1]!r}") as info:
        _communicator_like(comm, **{setting: value})
    assert len(set(comm.transport.allgather_object(str(info.value)))) == 1
    # Equal settings are accepted, and the new communicator works.
    other = _communicator_like(comm, **{setting: values[1]})
    assert np.array_equal(other.allreduce(np.ones(10, np.float32), op="sum", compression="none"),
                          np.full(10, comm.size, np.float32))


def test_a_name_in_flight_twice_is_refused(comm):
    """Horovod's rule: two collectives with one name in flight at once are an
    error at the second call (it ended in MPI_ERR_TRUNCATE later)."""
    gate = threading.Event()

    def hold():  # keeps the engine busy, so the first 'dup' is surely in flight
        gate.wait(30)
        return None
        yield

    comm.engine.submit(hold(), what="hold", timeout=30)
    x = np.ones(1000, np.float32)
    h = comm.allreduce_async(x, name="dup", op="sum", compression="none")
    try:
        with pytest.raises(ValueError, match="another collective named 'dup' is still in flight"):
            comm.allreduce_async(x, name="dup", op="sum", compression="none")
    finally:
        gate.set()
    assert np.array_equal(h.wait(), np.full(1000, comm.size, np.float32))
    # Once done, the name is free again.
    assert np.array_equal(comm.allreduce(x, name="dup", op="sum", compression="none"),
                          np.full(1000, comm.size, np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float64])
@pytest.mark.parametrize("op", ["sum", "average"])
def test_exact_allreduce_of_float64_and_integers(comm, dtype, op):
    """dtypes the compressors do not take are summed exactly, uncompressed,
    whatever compression is asked for."""
    n = 1001
    rng = [np.random.default_rng([50, r]) for r in range(comm.size)]
    if dtype is np.int64:
        xs = [g.integers(-2 ** 50, 2 ** 50, n) for g in rng]  # beyond float64's 2**53 when summed
    elif dtype is np.float64:
        xs = [g.standard_normal(n) for g in rng]
    else:
        hi = 100 if dtype is np.uint8 else 2 ** 20
        xs = [g.integers(0 if dtype is np.uint8 else -hi, hi // comm.size, n) for g in rng]
    xs = [v.astype(dtype) for v in xs]
    y = comm.allreduce(xs[comm.rank], op=op, compression="squinch")
    assert y.dtype == dtype and y.shape == (n,)
    if dtype is np.float64:
        total = sum(xs)
        ref = total / comm.size if op == "average" else total
        assert np.allclose(y, ref, rtol=1e-13, atol=1e-13)
    else:
        total = sum(v.astype(object) for v in xs)  # Python integers: exact
        if op == "average":  # truncation toward zero, like Horovod
            total = np.array([abs(int(t)) // comm.size * (1 if t >= 0 else -1) for t in total],
                             dtype=object)
        assert [int(v) for v in y] == [int(t) for t in total]
    same_everywhere(comm, y)


@pytest.mark.parametrize("pipeline_bytes", [0, 4 * 20])
@pytest.mark.parametrize("compression", ["squinch", "none"])
def test_reduce_scatter_over_uneven_splits_matches_the_oracle(comm, compression,
                                                              pipeline_bytes):
    """Horovod-style row splits (not block-aligned): every rank's part is
    encoded on its own, summed in fp32 in rank order; the expectation is
    built here from the NumPy oracle codec, not from the collective. With
    pipeline_bytes 80 the parts (91-104 elements) run in 4-5 chunks of 24
    elements, a different number for different parts."""
    row, rows = 13, 7 * comm.size + 3
    splits = [(rows // comm.size + (1 if r < rows % comm.size else 0)) * row
              for r in range(comm.size)]
    n = rows * row
    bounds = np.cumsum([0] + splits)
    lo, hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    c = Communicator(comm.transport, min_compress_bytes=0, timeout=60,
                     pipeline_bytes=pipeline_bytes)
    shard, got_bounds = c.reduce_scatter(data(60, comm.rank, n), counts=splits,
                                         compression=compression, op="average")
    assert got_bounds == (lo, hi) and shard.dtype == np.float32
    acc = np.zeros(hi - lo, np.float32)
    for r in range(comm.size):  # rank order, fp32, from +0
        part = data(60, r, n)[lo:hi]
        if compression == "squinch":
            part = codec.decode(codec.encode(part, backend="oracle", offset=lo), hi - lo,
                                backend="oracle")
        acc = acc + part
    assert np.array_equal(shard, acc * np.float32(1 / comm.size))


@pytest.mark.parametrize("compression", ["squinch", "bf16"])
def test_pipelined_reduce_scatter_gives_the_same_bits(comm, compression):
    """Stochastic rounding and error feedback over three steps: the pipelined
    reduce-scatter (chunks of 1, 3 and about 25 per part) gives the bits of
    the one-piece one, and stays within the bound of the exact average."""
    n = 50_021
    results = []
    for pipeline_bytes in (0, 4 * 6_000 + 4, 4 * 700):
        c = Communicator(comm.transport, min_compress_bytes=0, rounding="stochastic",
                         timeout=60, pipeline_bytes=pipeline_bytes)
        steps = [c.reduce_scatter(data(80 + step, comm.rank, n), compression=compression,
                                  error_feedback=True, name="g")[0] for step in range(3)]
        results.append(np.concatenate(steps))
    for other in results[1:]:
        assert np.array_equal(results[0], other)
    lo, hi = c.reduce_scatter(np.zeros(n, np.float32), compression="none")[1]
    ref = (sum(all_inputs(comm, 80, n)) / comm.size)[lo:hi]
    q = Q if compression == "squinch" else 2.0 ** -8
    assert np.abs(results[0][:hi - lo] - ref).max() <= 2 * q * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("op", ["sum", "average"])
def test_bool_allreduce_is_a_logical_or(comm, op):
    """bool tensors reduce as Horovod's do, to the logical or of every rank's
    values, whatever the op and the compression asked for (it raised before)."""
    n = 997
    xs = [np.random.default_rng([80, r]).random(n) < 0.1 for r in range(comm.size)]
    y = comm.allreduce(xs[comm.rank], op=op, compression="squinch")
    assert y.dtype == np.bool_ and y.shape == (n,)
    assert np.array_equal(y, np.logical_or.reduce(xs))
    same_everywhere(comm, y)



def test_messages_above_mpis_count_limit_are_split(comm, monkeypatch):
    """An uncompressed broadcast above 2^31 bytes raised a bare MPI_ERR_ARG
    (MPI's count is a C int). The limit is lowered here so that the split
    path runs on small arrays: the results must be exact."""
    if comm.transport.name != "mpi":
        pytest.skip("MPI's count limit")
    from squinchcomm.transport import mpi as mpi_transport

    monkeypatch.setattr(mpi_transport, "MAX_COUNT", 1000)
    x = (np.arange(10_007, dtype=np.float64) * 3 + 1) if comm.rank == comm.size - 1 \
        else np.zeros(10_007)
    got = comm.broadcast(x, root=comm.size - 1)  # 80 KB: 81 pieces of 1000 bytes
    assert np.array_equal(got, np.arange(10_007, dtype=np.float64) * 3 + 1)
    ints = np.arange(2_501, dtype=np.int64) * (comm.rank + 1) + 2**40
    total = sum(np.arange(2_501, dtype=np.int64) * (r + 1) + 2**40 for r in range(comm.size))
    assert np.array_equal(comm.allreduce(ints, op="sum"), total)  # 3 pieces of <= 1000


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("op", ["min", "max", "product"])
def test_min_max_product_are_exact(comm, dtype, op):
    """Horovod's Min, Max and Product: uncompressed, exact, bit-identical
    (the communicator's default compression does not apply to them)."""
    n = 1001
    def mine(r):
        v = np.random.default_rng([7, r]).integers(-3, 4, n)  # small: products stay exact
        return v.astype(dtype)
    xs = [mine(r).astype(np.float64) for r in range(comm.size)]
    want = {"min": np.minimum.reduce(xs), "max": np.maximum.reduce(xs),
            "product": np.multiply.reduce(xs)}[op]
    got = comm.allreduce(mine(comm.rank), op=op)  # default compression: squinch
    assert got.dtype == dtype and np.array_equal(got.astype(np.float64), want)
    same_everywhere(comm, got)


def test_integer_scaling_follows_horovod(comm):
    """Horovod scales integers in float64 and truncates toward zero: prescale
    on each input, then postscale (divided by N for an average) on the sum.
    They were refused."""
    x = np.arange(-50, 51, dtype=np.int64) * (comm.rank + 3)
    inputs = [np.arange(-50, 51, dtype=np.int64) * (r + 3) for r in range(comm.size)]
    pre = sum(np.trunc(v * 0.5).astype(np.int64) for v in inputs)
    assert np.array_equal(comm.allreduce(x, op="sum", prescale=0.5), pre)
    total = sum(inputs)
    want = np.trunc(total.astype(np.float64) * (3.0 / comm.size)).astype(np.int64)
    got = comm.allreduce(x.astype(np.int32), op="average", postscale=3.0)
    assert got.dtype == np.int32 and np.array_equal(got, want.astype(np.int32))
    # Without a postscale the average stays the exact truncated quotient.
    want = np.sign(total) * (np.abs(total) // comm.size)
    assert np.array_equal(comm.allreduce(x, op="average"), want)
