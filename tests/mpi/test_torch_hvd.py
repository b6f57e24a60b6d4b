"""``squinchcomm.torch`` (the Horovod-compatible API) across real ranks.

Run: ``mpirun -n N python -m mpi4py -m pytest --with-mpi tests/mpi`` (N = 1..4,
tests/test_mpi_suites.py does it), over MPI or, with
``SQUINCHCOMM_TEST_TRANSPORT=torch``, over a torch.distributed gloo group.
Inputs derive from (seed, rank), so every rank computes every other rank's
gradient locally and checks the reduced result against the exact average
within the Squinch bound (nearest rounding errs by < 0.0762 of the block
maximum, once per quantization, two quantizations per allreduce).
"""

import copy
import hashlib
import io
import math
import os
import re

import numpy as np
import pytest

pytestmark = pytest.mark.mpi
MPI = pytest.importorskip("mpi4py.MPI")
torch = pytest.importorskip("torch")

import squinchcomm.torch as hvd  # noqa: E402
from squinchcomm.errors import MismatchError  # noqa: E402

Q = 0.0762  # worst-case nearest-rounding error / block max


@pytest.fixture(scope="module")
def world():
    """hvd initialized over MPI, or over torch.distributed gloo when
    SQUINCHCOMM_TEST_TRANSPORT=torch (mpirun only launches the ranks then).
    min_compress_bytes=0 so the tiny test tensors really are compressed."""
    if os.environ.get("SQUINCHCOMM_TEST_TRANSPORT", "mpi") == "torch":
        from squinchcomm.transport.torch_dist import init_process_group_from_env

        init_process_group_from_env(backend="gloo")
        hvd.init("torch", min_compress_bytes=0, timeout=60)
    else:
        hvd.init(MPI.COMM_WORLD.Dup(), min_compress_bytes=0, timeout=60)
    yield hvd.communicator()
    hvd.shutdown()


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def block_max(x):
    x = np.asarray(x, np.float64)
    pad = np.zeros(-x.size % 8)
    return np.repeat(np.abs(np.concatenate([x, pad])).reshape(-1, 8).max(axis=1), 8)[: x.size]


def squinch_bound(xs, scale):
    """Per-element bound of a two-stage Squinch allreduce of the flat inputs ``xs``."""
    mag = sum(np.abs(v) for v in xs) * scale
    first = Q * sum(block_max(v) for v in xs) * scale
    return first + Q * block_max(mag + first) + 1e-7 * mag + 1e-30


def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_same_everywhere(*tensors):
    assert len(set(hvd.allgather_object(digest(*tensors)))) == 1, "ranks differ"


def batch(seed, r, n=6):
    g = torch.Generator().manual_seed(1000 * seed + r)
    return torch.randn(n, 12, generator=g), torch.randn(n, 4, generator=g)


class Net(torch.nn.Module):
    def __init__(self, unused=False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 4))
        if unused:
            self.unused = torch.nn.Linear(3, 3)        # never used anywhere
            self.rank0_only = torch.nn.Linear(12, 4)   # used on rank 0 only
            self.frozen = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.net(x)


def make_model(seed=0, unused=False):
    torch.manual_seed(seed)  # the same initial weights on every rank
    return Net(unused)


def loss_fn(m, x, y):
    return ((m(x) - y) ** 2).sum()


def local_grads(model, seed, r, passes=1):
    """Rank r's gradient (summed over ``passes`` batches), computed here."""
    m = copy.deepcopy(model)
    m.zero_grad()
    for k in range(passes):
        loss_fn(m, *batch(seed + k, r)).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def bucket_flats(opt, names, grads_by_name):
    """The flat fp64 vector of every bucket, built from per-name gradients."""
    return [np.concatenate([grads_by_name[names[id(p)]].double().reshape(-1).numpy()
                            for p in b.params]) for b in opt._sq_buckets]


def check_reduced_grads(world, model, opt, ref_per_rank, compression):
    names = {id(p): n for n, p in model.named_parameters()}
    got = {n: p.grad for n, p in model.named_parameters()}
    got_flat = bucket_flats(opt, names, got)
    per_rank = [bucket_flats(opt, names, g) for g in ref_per_rank]
    for i, y in enumerate(got_flat):
        xs = [pr[i] for pr in per_rank]
        ref = sum(xs) / world.size
        if compression == "none":
            bound = 1e-6 * sum(np.abs(v) for v in xs) / world.size + 1e-30
        else:
            bound = squinch_bound(xs, 1 / world.size)
        assert np.all(np.abs(y - ref) <= bound), f"bucket {i}: max err {np.abs(y - ref).max()}"


# ----------------------------------------------------------------------------
# DistributedOptimizer
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["none", "squinch"])
def test_gradients_match_exact_average(world, compression):
    model = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=getattr(hvd.Compression, compression),
                                   fusion_threshold=300)  # several buckets
    assert len(opt._sq_buckets) > 1 and isinstance(opt, torch.optim.SGD)
    refs = [local_grads(model, 1, r) for r in range(world.size)]
    opt.zero_grad()
    loss_fn(model, *batch(1, world.rank)).backward()
    opt.synchronize()
    check_reduced_grads(world, model, opt, refs, compression)
    assert_same_everywhere(*[p.grad for p in model.parameters()])
    before = [p.detach().clone() for p in model.parameters()]
    with opt.skip_synchronize():
        opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.allclose(p.detach(), b - 0.1 * p.grad, rtol=1e-6, atol=1e-8)
    opt.remove_hooks()


def test_parameters_bit_identical_after_many_steps(world):
    model = make_model(seed=3)
    comp = hvd.Compression.squinch_with(error_feedback=True, rounding="stochastic")
    opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2),
                                   named_parameters=model.named_parameters(), compression=comp,
                                   fusion_threshold=512)
    for step in range(8):
        opt.zero_grad()
        loss_fn(model, *batch(10 + step, world.rank)).backward()
        opt.step()
    assert_same_everywhere(*model.parameters())
    assert opt.error_feedback.state  # residuals exist, one entry per bucket
    assert len(opt.error_feedback.state) == len(opt._sq_buckets)
    opt.remove_hooks()


def test_backward_passes_per_step_equals_concatenated_batch(world):
    model = make_model(seed=4)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=hvd.Compression.squinch,
                                   backward_passes_per_step=2)
    opt.zero_grad()
    for k in range(2):
        loss_fn(model, *batch(20 + k, world.rank)).backward()
    opt.synchronize()
    # Reference: one pass over the two batches concatenated (sum loss: gradients add).
    refs = []
    for r in range(world.size):
        m = copy.deepcopy(model)
        m.zero_grad()
        xs, ys = zip(*(batch(20 + k, r) for k in range(2)))
        loss_fn(m, torch.cat(xs), torch.cat(ys)).backward()
        refs.append({n: p.grad.detach().clone() for n, p in m.named_parameters()})
    check_reduced_grads(world, model, opt, refs, "squinch")
    with opt.skip_synchronize():
        opt.step()
    # A third pass before step() is a misuse Horovod also rejects.
    opt.zero_grad()
    for k in range(2):
        loss_fn(model, *batch(30 + k, world.rank)).backward()
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        loss_fn(model, *batch(32, world.rank)).backward()
    opt.remove_hooks()


def test_skip_synchronize_with_clipping(world):
    model = make_model(seed=5)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters())
    opt.zero_grad()
    loss_fn(model, *batch(40, world.rank)).backward()
    opt.synchronize()
    with pytest.raises(ValueError, match="zero_grad"):
        opt._sq_buckets[0].handle = object()  # a bucket still in flight
        opt.zero_grad()
    opt._sq_buckets[0].handle = None
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    assert total > 0.01  # clipping really happened
    clipped = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    with opt.skip_synchronize():
        opt.step()
    for b, g, p in zip(before, clipped, model.parameters()):
        assert torch.allclose(p.detach(), b - 0.5 * g, rtol=1e-6, atol=1e-8)  # clipped gradients, not re-reduced
    assert_same_everywhere(*model.parameters())
    # step() right after synchronize() without the context warns (Horovod's warning).
    opt.zero_grad()
    loss_fn(model, *batch(41, world.rank)).backward()
    opt.synchronize()
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()
    opt.remove_hooks()


def test_unused_and_frozen_parameters(world):
    model = make_model(seed=6, unused=True)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), fusion_threshold=0)
    x, y = batch(50, world.rank)
    opt.zero_grad()
    loss = loss_fn(model, x, y)
    if world.rank == 0:
        loss = loss + model.rank0_only(x).square().sum()
    loss.backward()
    opt.synchronize()
    assert torch.equal(model.unused.weight.grad, torch.zeros(3, 3))
    assert model.frozen.weight.grad is None  # requires_grad=False: never reduced
    m0 = copy.deepcopy(model)
    m0.rank0_only(batch(50, 0)[0]).square().sum().backward()
    ref = m0.rank0_only.weight.grad / world.size
    assert torch.allclose(model.rank0_only.weight.grad, ref, rtol=1e-5, atol=1e-7)
    with opt.skip_synchronize():
        opt.step()
    assert_same_everywhere(*[p for p in model.parameters() if p.requires_grad])
    opt.remove_hooks()


def test_state_dict_restores_residuals_bit_identically(world):
    comp = hvd.Compression.squinch_with(error_feedback=True)

    def build():
        model = make_model(seed=7)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                       named_parameters=model.named_parameters(),
                                       compression=comp, fusion_threshold=400)
        return model, opt

    def train(model, opt, steps):
        for s in steps:
            opt.zero_grad()
            loss_fn(model, *batch(60 + s, world.rank)).backward()
            opt.step()

    model, opt = build()
    train(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert any(float(e["residual"].abs().sum()) > 0
               for e in opt.state_dict()["squinchcomm"]["error_feedback"].values())
    train(model, opt, [3])
    expected = digest(*model.parameters())
    opt.remove_hooks()

    for restore_residuals in (True, False):
        model2, opt2 = build()
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        model2.load_state_dict(ckpt["model"])
        if not restore_residuals:
            del ckpt["opt"]["squinchcomm"]
        opt2.load_state_dict(ckpt["opt"])
        train(model2, opt2, [3])
        same = digest(*model2.parameters()) == expected
        assert same == restore_residuals  # without the residuals the step differs
        opt2.remove_hooks()


def test_non_finite_gradients_reach_every_rank(world):
    """AMP: an inf/NaN gradient on one rank must make every rank's reduced
    gradient non-finite, so GradScaler skips the step everywhere."""
    model = make_model(seed=9)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=hvd.Compression.squinch)
    x, y = batch(80, world.rank)
    if world.rank == 0:
        x[0, 0] = float("inf")
    loss_fn(model, x, y).backward()
    opt.synchronize()
    assert not torch.isfinite(model.net[0].weight.grad).all()
    assert_same_everywhere(torch.isfinite(model.net[0].weight.grad))
    opt.remove_hooks()


def test_misuse_errors(world):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    dup = [("w", named[0][1]), ("w", named[1][1])] + named[2:]
    with pytest.raises(ValueError, match="duplicated: w"):
        hvd.DistributedOptimizer(opt, named_parameters=dup)
    with pytest.raises(ValueError, match="does not name 1 of"):
        hvd.DistributedOptimizer(opt, named_parameters=named[:-1])
    with pytest.raises(ValueError, match="Adasum"):
        hvd.DistributedOptimizer(opt, named_parameters=named, op=hvd.Adasum)
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        hvd.DistributedOptimizer(opt, named_parameters=named, op=hvd.Sum,
                                 gradient_predivide_factor=2.0)
    with pytest.raises(ValueError, match="Adasum"):
        hvd.allreduce(torch.ones(3), op=hvd.Adasum)
    with pytest.raises(ValueError, match="Compression"):
        hvd.allreduce(torch.ones(3), compression=object())
    # None of the failed constructions left hooks behind.
    loss_fn(model, *batch(0, world.rank)).backward()


class _FourParams(torch.nn.Module):
    """Parameters of 1000, 10, 1000 and 10 float32 elements (4000/40 bytes),
    registered in that order: backward makes them ready in reverse."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(1000))
        self.b = torch.nn.Parameter(torch.ones(10))
        self.c = torch.nn.Parameter(torch.ones(1000))
        self.d = torch.nn.Parameter(torch.ones(10))


@pytest.mark.parametrize("first, expected", [
    # Reverse order d(40 B), c(4000), b(40), a(4000) under an 8000-byte cap.
    # A 100-byte first bucket closes before c; the next takes c+b (4040),
    # adding a would make 8040 > 8000.
    (100, [["d"], ["c", "b"], ["a"]]),
    # The default first cap (1 MiB) is clipped to the 8000-byte threshold:
    # d+c+b = 4080, + a = 8080 > 8000.
    (None, [["d", "c", "b"], ["a"]]),
    # 0: the first bucket holds one parameter.
    (0, [["d"], ["c", "b"], ["a"]]),
])
def test_bucket_layout_first_bucket_small(world, first, expected):
    model = _FourParams()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   fusion_threshold=8000, first_bucket_bytes=first)
    sizes = {"a": 1000, "b": 10, "c": 1000, "d": 10}
    assert [n for _, n in opt.buckets] == [sum(sizes[k] for k in b) for b in expected]
    # The layout works: a step averages every parameter's gradient exactly.
    ((model.a * (world.rank + 1)).sum() + model.b.sum() + model.c.sum()
     + model.d.sum()).backward()
    opt.synchronize()
    mean = (world.size + 1) / 2
    assert torch.allclose(model.a.grad, torch.full((1000,), mean), rtol=0, atol=2 * Q * world.size)
    opt.remove_hooks()


@pytest.mark.parametrize("last, expected", [
    # Registration order a(4000 B), b(40), c(4000), d(40); the last bucket is
    # cut from the front: a+b = 4040 <= 5000, + c = 8040 > 5000. The rest, in
    # reverse, under the 100-byte first cap: d alone, then c.
    (5000, [["d"], ["c"], ["b", "a"]]),
    # A cap below the first parameter still takes one: a alone.
    (0, [["d"], ["c", "b"], ["a"]]),
    # At or above the threshold: no cap of its own (the layout without it).
    (8000, [["d"], ["c", "b"], ["a"]]),
    # The whole model fits: one bucket, the last one.
    (10**6, [["d", "c", "b", "a"]]),
])
def test_bucket_layout_last_bucket_small(world, last, expected):
    model = _FourParams()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   fusion_threshold=8000 if last < 10**6 else 10**7,
                                   first_bucket_bytes=100, last_bucket_bytes=last)
    sizes = {"a": 1000, "b": 10, "c": 1000, "d": 10}
    assert [n for _, n in opt.buckets] == [sum(sizes[k] for k in b) for b in expected]
    # Every parameter is reduced once, in its own place: rank-dependent weights.
    ((model.a * (world.rank + 1)).sum() + 2 * model.b.sum() + 3 * model.c.sum()
     + (model.d * (world.rank + 2)).sum()).backward()
    opt.synchronize()
    tol = 2 * Q * world.size * 3
    for t, want in ((model.a, (world.size + 1) / 2), (model.b, 2.0), (model.c, 3.0),
                    (model.d, (world.size + 3) / 2)):
        assert torch.allclose(t.grad, torch.full_like(t, want), rtol=0, atol=tol)
    opt.remove_hooks()


def test_bucket_size_errors(world):
    model = _FourParams()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="first_bucket_bytes=-1"):
        hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                 first_bucket_bytes=-1)
    with pytest.raises(ValueError, match="last_bucket_bytes=-1"):
        hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                 last_bucket_bytes=-1)
    with pytest.raises(ValueError, match="fusion_threshold=-5"):
        hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                 fusion_threshold=-5)


def test_gradient_predivide_and_sum(world):
    model = make_model(seed=8)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   gradient_predivide_factor=2.0)
    refs = [local_grads(model, 70, r) for r in range(world.size)]
    loss_fn(model, *batch(70, world.rank)).backward()
    opt.synchronize()
    check_reduced_grads(world, model, opt, refs, "none")
    opt.remove_hooks()


# ----------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------
def rdata(seed, r, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(7919 * seed + r)
    return (torch.randn(n, generator=g) * 0.01).to(dtype)


def test_allreduce_variants(world):
    n = 1001
    xs = [rdata(1, r, n).double().numpy() for r in range(world.size)]
    x = rdata(1, world.rank, n)
    avg = hvd.allreduce(x, name="x")
    assert np.allclose(avg.numpy(), sum(xs) / world.size, rtol=1e-5, atol=1e-9)
    s = hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    assert np.allclose(s.numpy(), sum(xs), rtol=1e-5, atol=1e-9)
    q = hvd.allreduce(x, compression=hvd.Compression.squinch)
    assert np.all(np.abs(q.numpy() - sum(xs) / world.size) <= squinch_bound(xs, 1 / world.size))
    assert_same_everywhere(q)
    assert torch.equal(x, rdata(1, world.rank, n))  # out of place: input untouched
    y = x.clone()
    assert hvd.allreduce_(y, op=hvd.Sum) is y and np.allclose(y.numpy(), sum(xs), rtol=1e-5)
    # Horovod accepts integer and float64 tensors: exact sums.
    i = hvd.allreduce(torch.tensor([world.rank, 1]), op=hvd.Sum)
    assert i.dtype == torch.int64 and i.tolist() == [world.size * (world.size - 1) // 2, world.size]
    d = hvd.allreduce(torch.tensor([float(world.rank)], dtype=torch.float64))
    assert d.dtype == torch.float64 and d.item() == (world.size - 1) / 2
    # bf16 on the wire: bf16 inputs travel exactly, the sum and the 1/size scale
    # are fp32, and the average is rounded once to bf16 (relative error <= 2^-8).
    h = hvd.allreduce(rdata(2, world.rank, n, torch.bfloat16),
                      compression=hvd.Compression.bf16)
    assert h.dtype == torch.bfloat16 and h.shape == (n,)
    assert_same_everywhere(h)
    hs = [rdata(2, r, n, torch.bfloat16).double().numpy() for r in range(world.size)]
    ref = sum(hs) / world.size
    mag = sum(np.abs(v) for v in hs) / world.size
    err = np.abs(h.double().numpy() - ref)
    assert np.all(err <= 2.0 ** -8 * np.abs(ref) + 2e-6 * mag + 1e-30), err.max()


def test_async_synchronize_and_poll(world):
    n = 5000
    xs = [rdata(3, r, n).double().numpy() for r in range(world.size)]
    handles = [hvd.allreduce_async(rdata(3, world.rank, n), op=hvd.Sum,
                                   compression=hvd.Compression.squinch_with(error_feedback=True),
                                   name="async"),
               hvd.allreduce_async_(rdata(3, world.rank, n), op=hvd.Sum)]
    while not all([hvd.poll(h) for h in handles]):
        pass
    q, exact = [hvd.synchronize(h) for h in handles]
    assert np.allclose(exact.numpy(), sum(xs), rtol=1e-5, atol=1e-9)
    assert np.all(np.abs(q.numpy() - sum(xs)) <= squinch_bound(xs, 1.0))
    assert hvd.poll(handles[0]) and hvd.synchronize(handles[0]) is q


def test_grouped_allreduce(world):
    shapes = [(3, 5), (7,), (2, 2, 2)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32]
    mine = [rdata(4 + k, world.rank, math.prod(s), dt).reshape(s)
            for k, (s, dt) in enumerate(zip(shapes, dtypes))]
    out = hvd.grouped_allreduce(mine, op=hvd.Sum)
    for k, (o, s, dt) in enumerate(zip(out, shapes, dtypes)):
        ref = sum(rdata(4 + k, r, math.prod(s), dt).double() for r in range(world.size))
        assert o.shape == s and o.dtype == dt
        tol = 1e-5 if dt == torch.float32 else 1e-2
        assert torch.allclose(o.double().reshape(-1), ref, rtol=tol, atol=1e-6)
    inplace = [t.clone() for t in mine]
    hvd.grouped_allreduce_(inplace, op=hvd.Sum)
    assert all(torch.equal(a, b) for a, b in zip(inplace, out))


def test_allgather_broadcast_and_objects(world):
    rows = world.rank + 1
    x = torch.arange(rows * 3, dtype=torch.int32).reshape(rows, 3) + 100 * world.rank
    g = hvd.allgather(x)
    ref = torch.cat([torch.arange((r + 1) * 3, dtype=torch.int32).reshape(r + 1, 3) + 100 * r
                     for r in range(world.size)])
    assert torch.equal(g, ref)
    root = world.size - 1
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        t = (rdata(5, world.rank, 17) > 0 if dtype == torch.bool
             else (rdata(5, world.rank, 17) * 1000).to(dtype))
        expect = (rdata(5, root, 17) > 0 if dtype == torch.bool
                  else (rdata(5, root, 17) * 1000).to(dtype))
        b = hvd.broadcast(t, root_rank=root)
        assert torch.equal(b, expect)
        assert hvd.broadcast_(t, root) is t and torch.equal(t, expect)
    nc = torch.zeros(4, 6)[:, ::2]  # non-contiguous, in place
    if world.rank == 0:
        nc += 7
    hvd.broadcast_(nc, 0)
    assert torch.equal(nc, torch.full((4, 3), 7.0))
    obj = {"epoch": 3, "rank": world.rank, "blob": b"x" * 1000}
    got = hvd.broadcast_object(obj, root_rank=root)
    assert got == {"epoch": 3, "rank": root, "blob": b"x" * 1000}
    assert hvd.allgather_object(world.rank) == list(range(world.size))


def test_broadcast_parameters_and_optimizer_state(world):
    torch.manual_seed(100 + world.rank)  # different weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (world.rank + 1))
    if world.rank == 0:  # only the root has taken a step: others have empty state
        model(torch.randn(8, 5)).sum().backward()
        opt.step()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    sd = model.state_dict()
    assert_same_everywhere(*[sd[k] for k in sorted(sd)])  # incl. num_batches_tracked (int64)
    assert opt.param_groups[0]["lr"] == 0.01
    state = [opt.state[p] for p in model.parameters()]
    assert all(s for s in state)
    assert_same_everywhere(*[s[k] for s in state for k in ("exp_avg", "exp_avg_sq", "step")])
    # named_parameters form (a generator) is accepted too.
    torch.manual_seed(200 + world.rank)
    m2 = torch.nn.Linear(3, 2)
    hvd.broadcast_parameters(m2.named_parameters(), root_rank=world.size - 1)
    assert_same_everywhere(*m2.parameters())


def test_broadcast_optimizer_state_before_any_step(world):
    """A fresh optimizer (empty state everywhere, as right after construction
    in Horovod's examples): the root's hyperparameters arrive, the state
    stays consistent, and the first steps give identical parameters."""
    torch.manual_seed(7)
    model = torch.nn.Linear(4, 3)
    opt = hvd.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01 * (world.rank + 1), betas=(0.8, 0.9)),
        named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert not any(opt.state[p] for p in model.parameters())
    for step in range(2):
        opt.zero_grad()
        (model(torch.full((2, 4), float(world.rank + step))) ** 2).sum().backward()
        opt.step()
    assert_same_everywhere(*model.parameters())
    opt.remove_hooks()


def test_reducescatter_and_alltoall(world):
    rows = 2 * world.size + 1  # uneven: the first rank gets an extra row
    xs = [rdata(6, r, rows * 3).reshape(rows, 3) for r in range(world.size)]
    total = sum(x.double() for x in xs)
    counts = [rows // world.size + (1 if r < rows % world.size else 0) for r in range(world.size)]
    lo = sum(counts[: world.rank])
    mine = total[lo: lo + counts[world.rank]]
    rs = hvd.reducescatter(xs[world.rank], op=hvd.Sum)
    assert rs.shape == (counts[world.rank], 3) and torch.allclose(rs.double(), mine, rtol=1e-5)
    avg = hvd.reducescatter(xs[world.rank], compression=hvd.Compression.squinch)
    chunks = [x[lo: lo + counts[world.rank]].double().reshape(-1).numpy() for x in xs]
    bound = Q * sum(block_max(c) for c in chunks) / world.size + 1e-7  # one quantization
    assert np.all(np.abs(avg.double().reshape(-1).numpy() - mine.reshape(-1).numpy() / world.size)
                  <= bound)
    # alltoall: rank r sends (d + 1) rows to rank d, rows tagged with their source.
    splits = [d + 1 for d in range(world.size)]
    x = torch.cat([torch.full((d + 1, 2), float(10 * world.rank + d)) for d in range(world.size)])
    out, received = hvd.alltoall(x, splits=splits)
    assert received.tolist() == [world.rank + 1] * world.size
    ref = torch.cat([torch.full((world.rank + 1, 2), float(10 * s + world.rank))
                     for s in range(world.size)])
    assert torch.equal(out, ref)
    eq = hvd.alltoall(torch.arange(world.size * 2, dtype=torch.int64) + 100 * world.rank)
    assert eq.tolist() == [v for s in range(world.size)
                           for v in (100 * s + 2 * world.rank, 100 * s + 2 * world.rank + 1)]
    hvd.barrier()


def test_reducescatter_is_the_communicators_reduce_scatter(world):
    """hvd.reducescatter is Communicator.reduce_scatter over Horovod's row
    splits: the same bits as the Communicator call, and (independently) as the
    NumPy oracle's encode/decode of each rank's rows summed in fp32."""
    from squinchcomm import codec

    rows, row = 3 * world.size + 2, 11
    counts = [rows // world.size + (1 if r < rows % world.size else 0) for r in range(world.size)]
    lo = sum(counts[: world.rank]) * row
    n_mine = counts[world.rank] * row
    xs = [rdata(7, r, rows * row).reshape(rows, row) for r in range(world.size)]
    got = hvd.reducescatter(xs[world.rank], compression=hvd.Compression.squinch)
    acc = np.zeros(n_mine, np.float32)
    for x in xs:  # rank order, fp32
        part = x.reshape(-1)[lo: lo + n_mine].numpy()
        acc = acc + codec.decode(codec.encode(part, backend="oracle", offset=lo), n_mine,
                                 backend="oracle")
    assert got.shape == (counts[world.rank], row) and got.dtype == torch.float32
    assert np.array_equal(got.reshape(-1).numpy(), acc * np.float32(1 / world.size))
    shard, _ = world.reduce_scatter(xs[world.rank], counts=[c * row for c in counts],
                                    compression="squinch")
    assert torch.equal(got.reshape(-1), shard)
    # Integers: exact sums, Horovod's rows.
    ints = torch.arange(rows * 2, dtype=torch.int64).reshape(rows, 2) * (world.rank + 1) + 2 ** 40
    total = sum(torch.arange(rows * 2, dtype=torch.int64).reshape(rows, 2) * (r + 1) + 2 ** 40
                for r in range(world.size))
    start = sum(counts[: world.rank])
    assert torch.equal(hvd.reducescatter(ints, op=hvd.Sum),
                       total[start: start + counts[world.rank]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32])
def test_allreduce_of_dtypes_the_compressors_do_not_take(world, dtype):
    t = (torch.arange(1000, dtype=torch.float64) * (world.rank + 1) + 2 ** 35).to(dtype) \
        if dtype != torch.int32 else torch.arange(1000, dtype=dtype) * (world.rank + 1)
    total = sum((torch.arange(1000, dtype=torch.float64) * (r + 1) + 2 ** 35).to(dtype)
                if dtype != torch.int32 else torch.arange(1000, dtype=dtype) * (r + 1)
                for r in range(world.size))
    got = hvd.allreduce(t, op=hvd.Sum, compression=hvd.Compression.squinch)
    assert got.dtype == dtype and torch.equal(got, total)
    assert_same_everywhere(got)


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="needs ranks that disagree")
@pytest.mark.parametrize("mismatch", ["shape", "dtype", "int32"])
def test_mismatched_allreduce_raises_on_every_rank(world, mismatch):
    """Shapes or dtypes that differ across ranks raise the same ValueError on
    every rank (never a tensor of uninitialised memory), and the next
    collective works. int32 against float32 skipped the check (the integer
    path) and gave garbage on one rank."""
    if mismatch == "shape":
        t = torch.ones(100 + 8 * world.rank)
    elif mismatch == "dtype":
        t = torch.ones(100, dtype=torch.float32 if world.rank == 0 else torch.bfloat16)
    else:
        t = torch.ones(100, dtype=torch.int32 if world.rank == 0 else torch.float32)
    with pytest.raises(ValueError, match="ranks disagree .*" + mismatch[:5]) as info:
        hvd.allreduce(t, name="grad", compression=hvd.Compression.squinch)
    assert isinstance(info.value, RuntimeError)  # what a Horovod script catches
    assert len(set(world.allgather_object(str(info.value)))) == 1  # one message everywhere
    with pytest.raises(ValueError, match="ranks disagree"):
        hvd.synchronize(hvd.allreduce_async_(t, name="grad"))
    assert torch.equal(hvd.allreduce(torch.ones(7), op=hvd.Sum), torch.full((7,), world.size * 1.0))


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="needs ranks that disagree")
def test_grouped_allreduce_with_mismatched_inputs_raises(world):
    """It returned the inputs unsummed."""
    ts = [torch.ones(10), torch.ones(20 + world.rank)]
    with pytest.raises(ValueError, match="ranks disagree"):
        hvd.grouped_allreduce(ts, op=hvd.Sum)
    got = hvd.grouped_allreduce([torch.ones(10), torch.ones(20)], op=hvd.Sum)
    assert all(torch.equal(g, torch.full_like(g, world.size)) for g in got)


def test_min_max_product(world):
    """Horovod's Min, Max and Product, on tensors of every float width."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int64):
        t = torch.tensor([world.rank, -world.rank, 2, 1], dtype=dtype)
        assert torch.equal(hvd.allreduce(t, op=hvd.Max),
                           torch.tensor([world.size - 1, 0, 2, 1], dtype=dtype))
        assert torch.equal(hvd.allreduce(t, op=hvd.Min),
                           torch.tensor([0, 1 - world.size, 2, 1], dtype=dtype))
        assert torch.equal(hvd.allreduce(t, op=hvd.Product)[2:],
                           torch.tensor([2 ** world.size, 1], dtype=dtype))
    with pytest.raises(ValueError, match="runs uncompressed"):
        hvd.allreduce(torch.ones(4), op=hvd.Max, compression=hvd.Compression.squinch)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="averages or sums gradients"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=model.named_parameters(), op=hvd.Max)


def test_autograd_through_the_collectives(world):
    """Each collective is differentiable as in Horovod. Rank r's loss weighs
    the output by (r + 1) (rows by their index too), so every gradient below
    follows from the chain rule over the sum of all ranks' losses."""
    n, r = world.size, world.rank
    S = n * (n + 1) / 2  # sum over ranks of (r + 1)

    def grad_of(fn, x):
        x = x.clone().requires_grad_(True)
        fn(x).backward()
        return x.grad

    x = torch.arange(6, dtype=torch.float32) + r
    g = grad_of(lambda t: (hvd.allreduce(t, op=hvd.Sum) * (r + 1)).sum(), x)
    assert torch.equal(g, torch.full((6,), S))
    g = grad_of(lambda t: (hvd.allreduce(t, op=hvd.Average) * (r + 1)).sum(), x)
    assert torch.allclose(g, torch.full((6,), S / n), rtol=1e-6)
    # allgather: rank s's rows sit at global rows offset_s...; weights by row.
    rows = r + 1
    offset = sum(range(1, r + 1))
    xg = torch.ones(rows, 2)
    total_rows = n * (n + 1) // 2
    weight = torch.arange(1, total_rows + 1, dtype=torch.float32)[:, None] * (r + 1)
    g = grad_of(lambda t: (hvd.allgather(t) * weight).sum(), xg)
    want = S * torch.arange(offset + 1, offset + rows + 1, dtype=torch.float32)[:, None]
    assert torch.equal(g, want.expand(rows, 2))
    # broadcast: the root's input reached everyone.
    g = grad_of(lambda t: (hvd.broadcast(t, root_rank=n - 1) * (r + 1)).sum(), x)
    assert torch.equal(g, torch.full((6,), S if r == n - 1 else 0.0))
    # alltoall: rows 2d, 2d+1 went to rank d, whose loss weighs them by d + 1.
    xa = torch.ones(2 * n, 1)
    g = grad_of(lambda t: (hvd.alltoall(t) * (r + 1)).sum(), xa)
    assert torch.equal(g, torch.arange(1, n + 1, dtype=torch.float32).repeat_interleave(2)[:, None])
    # reducescatter: rank d's rows (2 each) are weighed by d + 1 in its loss.
    xr = torch.ones(2 * n)
    want = torch.arange(1, n + 1, dtype=torch.float32).repeat_interleave(2)
    g = grad_of(lambda t: (hvd.reducescatter(t, op=hvd.Sum) * (r + 1)).sum(), xr)
    assert torch.equal(g, want)
    g = grad_of(lambda t: (hvd.reducescatter(t, op=hvd.Average) * (r + 1)).sum(), xr)
    assert torch.allclose(g, want / n, rtol=1e-6)
    # Grouped forms: each tensor as its single form.
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, 2, requires_grad=True)
    ya, yb = hvd.grouped_allreduce([a, b], op=hvd.Sum)
    ((ya * (r + 1)).sum() + (yb * 2 * (r + 1)).sum()).backward()
    assert torch.equal(a.grad, torch.full((3,), S)) and torch.equal(b.grad, torch.full((2, 2), 2 * S))
    a = torch.ones(2 * n, requires_grad=True)
    (ga,) = hvd.grouped_reducescatter([a], op=hvd.Sum)
    (ga * (r + 1)).sum().backward()
    assert torch.equal(a.grad, want)
    a = torch.ones(rows, 2, requires_grad=True)
    (gg,) = hvd.grouped_allgather([a])
    (gg * weight).sum().backward()
    assert torch.equal(a.grad, (S * torch.arange(offset + 1, offset + rows + 1,
                                                 dtype=torch.float32)[:, None]).expand(rows, 2))
    # Max has no gradient here: a clear error, not a wrong one.
    m = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="op=max has no gradient"):
        hvd.allreduce(m, op=hvd.Max).sum().backward()


def test_sparse_allreduce_and_sparse_gradients(world):
    """Horovod's sparse allreduce (allgather of indices and values) and a
    DistributedOptimizer over an nn.Embedding(sparse=True): the sparse
    gradient equals the exact average of every rank's, and stays sparse."""
    n, r = world.size, world.rank
    t = torch.sparse_coo_tensor([[r, 5]], [float(r + 1), 1.0], (8,), check_invariants=True)
    got = hvd.synchronize(hvd.sparse_allreduce_async(t, name="sp", op=hvd.Sum))
    want = torch.zeros(8)
    for q in range(n):
        want[q] += q + 1
    want[5] += n
    assert got.is_sparse and torch.equal(got.to_dense(), want)
    avg = hvd.synchronize(hvd.sparse_allreduce_async(t, op=hvd.Average))
    assert torch.allclose(avg.to_dense(), want / n)
    with pytest.raises(ValueError, match="sparse_coo"):
        hvd.sparse_allreduce_async(torch.ones(3))
    if n > 1:
        wrong = torch.sparse_coo_tensor([[0]], [1.0], (8 + (r == n - 1),),
                                        check_invariants=True)  # one rank's shape differs
        with pytest.raises(ValueError, match=r"disagree on the dense shape \(rank 0=\(8,\)"):
            hvd.synchronize(hvd.sparse_allreduce_async(wrong, name="sp_bad"))

    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=1.0),
                                   named_parameters=emb.named_parameters())
    ids = torch.tensor([r, 9])
    (emb(ids) * (r + 1)).sum().backward()
    opt.synchronize()
    assert emb.weight.grad.is_sparse
    want = torch.zeros(10, 4)
    for q in range(n):
        want[q] += (q + 1) / n
        want[9] += (q + 1) / n
    assert torch.allclose(emb.weight.grad.to_dense(), want, rtol=1e-6)
    opt.remove_hooks()


def test_timeline_records_every_collective(world, tmp_path):
    """hvd.start_timeline / stop_timeline write a Chrome trace of the
    operations, in submission order, with a file per rank for '{rank}'."""
    import json

    root = world.allgather_object(str(tmp_path))[0]  # one directory for every rank
    hvd.start_timeline(os.path.join(root, "timeline_{rank}.json"))
    hvd.allreduce(torch.ones(10), name="first")
    hvd.broadcast(torch.ones(3), root_rank=0, name="second")
    hvd.stop_timeline()
    with open(os.path.join(root, f"timeline_{world.rank}.json")) as fh:
        events = json.load(fh)["traceEvents"]
    names = [e["name"] for e in events]
    assert names[-2].startswith("allreduce of 'first'") and names[-1].startswith(
        "broadcast of 'second'"), names
    assert all(e["ph"] == "X" and e["dur"] >= 0 and e["args"]["queued_us"] >= 0
               for e in events)
    assert events[-1]["ts"] >= events[-2]["ts"] + events[-2]["dur"]  # one after the other
    with pytest.warns(UserWarning, match="mark_cycles"):
        hvd.start_timeline(os.path.join(root, "cycles_{rank}.json"), mark_cycles=True)
    hvd.stop_timeline()


def test_process_sets(world):
    """Horovod's process sets over real sub-communicators: collectives,
    compressed ones included, and DistributedOptimizer inside the set; the
    other ranks are refused; sets must agree across ranks."""
    n, r = world.size, world.rank
    members = [q for q in range(n) if q % 2 == 0]
    if n == 1:  # [0] is the global set itself
        with pytest.raises(ValueError, match="already registered"):
            hvd.add_process_set(members)
        pytest.skip("a proper subset needs two ranks")
    evens = hvd.add_process_set(members)
    assert evens.process_set_id == 1 and evens.size() == len(members)
    assert evens.included() == (r in members)
    assert evens.rank() == (members.index(r) if r in members else None)
    with pytest.raises(ValueError, match="already registered"):
        hvd.add_process_set(members)
    if evens.included():
        x = torch.arange(1000, dtype=torch.float32) * (r + 1)
        got = hvd.allreduce(x, op=hvd.Sum, process_set=evens)
        assert torch.equal(got, sum(torch.arange(1000, dtype=torch.float32) * (q + 1)
                                    for q in members))
        big = torch.linspace(-1, 1, 4096) * (r + 1)
        sq = hvd.allreduce(big, op=hvd.Average, process_set=evens,
                           compression=hvd.Compression.squinch)
        exact = sum(torch.linspace(-1, 1, 4096) * (q + 1) for q in members) / len(members)
        bound = squinch_bound([(torch.linspace(-1, 1, 4096) * (q + 1)).numpy() for q in members],
                              1 / len(members))
        assert np.all(np.abs(sq.numpy() - exact.numpy()) <= bound)
        digests = hvd.allgather_object(digest(sq), process_set=evens)
        assert len(set(digests)) == 1
        root = members[-1]  # a global rank, as in Horovod
        b = hvd.broadcast(torch.full((3,), float(r)), root_rank=root, process_set=evens)
        assert torch.equal(b, torch.full((3,), float(root)))
        g = hvd.allgather(torch.tensor([r]), process_set=evens)
        assert g.tolist() == members
        with pytest.raises(ValueError, match="is not in"):
            hvd.broadcast(torch.ones(1), root_rank=1 if n > 1 else 5, process_set=evens)
        model = torch.nn.Linear(3, 1, bias=False)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(),
                                       process_set=evens)
        (model(torch.ones(1, 3)) * (r + 1)).sum().backward()
        opt.synchronize()
        mean = sum(q + 1 for q in members) / len(members)
        assert torch.allclose(model.weight.grad, torch.full((1, 3), mean))
        opt.remove_hooks()
    else:
        with pytest.raises(ValueError, match=f"rank {r} is not in"):
            hvd.allreduce(torch.ones(3), process_set=evens)
    world.barrier()
    assert hvd.remove_process_set(evens) and not hvd.remove_process_set(evens)
    with pytest.raises(ValueError, match="not registered"):
        hvd.allreduce(torch.ones(3), process_set=evens)
    if n > 1:  # ranks that disagree on the members: the same error everywhere
        with pytest.raises(ValueError, match="add_process_set: ranks disagree"):
            hvd.add_process_set([0] if r == 0 else [0, 1])
    # The global set is every rank.
    assert hvd.global_process_set.ranks == list(range(n))
    assert torch.equal(hvd.allreduce(torch.ones(2), op=hvd.Sum,
                                     process_set=hvd.global_process_set), torch.full((2,), n * 1.0))


def test_compressor_interface_as_horovod(world):
    """Horovod's Compressor calls, used directly by some scripts: fp16/bf16
    cast floating tensors and decompress restores the dtype; integer tensors
    and none/squinch pass through."""
    t = torch.linspace(-1, 1, 11, dtype=torch.float32)
    for comp, wire in ((hvd.Compression.fp16, torch.float16),
                       (hvd.Compression.bf16, torch.bfloat16)):
        c, ctx = comp.compress(t)
        assert c.dtype == wire and ctx == torch.float32
        back = comp.decompress(c, ctx)
        assert back.dtype == torch.float32 and torch.equal(back, t.to(wire).float())
        i = torch.arange(5)
        assert comp.compress(i) == (i, None)
    for comp in (hvd.Compression.none, hvd.Compression.squinch):
        c, ctx = comp.compress(t)
        assert c is t and ctx is None and comp.decompress(c, ctx) is t


def test_horovod_queries_and_names(world):
    """The build/runtime queries and names Horovod scripts and their test
    helpers call, answered for the engine really in use."""
    over_torch = os.environ.get("SQUINCHCOMM_TEST_TRANSPORT", "mpi") == "torch"
    assert hvd.mpi_enabled() is (not over_torch)
    assert hvd.gloo_enabled() is over_torch
    assert hvd.mpi_threads_supported() is (MPI.Query_thread() == MPI.THREAD_MULTIPLE)
    assert hvd.ccl_built() is False and hvd.rocm_built() is False
    assert isinstance(hvd.cuda_built(), bool)
    assert hvd.is_homogeneous() is (world.size % world.local_size == 0
                                    and world.size == world.local_size * world.cross_size)
    from squinchcomm.errors import TransportError

    assert hvd.HorovodInternalError is TransportError
    model = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    assert opt._parameter_names == {p: n for n, p in model.named_parameters()}
    opt.remove_hooks()


def test_bool_allreduce_is_a_logical_or(world):
    flags = [torch.zeros(50, dtype=torch.bool) for _ in range(world.size)]
    for r, f in enumerate(flags):
        f[r::world.size + 1] = True
    got = hvd.allreduce(flags[world.rank], name="flags")
    assert got.dtype == torch.bool
    want = torch.stack(flags).any(dim=0)
    assert torch.equal(got, want)



@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="needs ranks that disagree")
def test_transposed_parameter_shapes_are_a_mismatch(world):
    """(8, 4) on one rank and (4, 8) on another have the same size and name:
    the layout check compares shapes too (it compared names and sizes only)."""
    shape = (8, 4) if world.rank == 0 else (4, 8)
    p = torch.nn.Parameter(torch.zeros(shape))
    with pytest.raises(ValueError, match="DistributedOptimizer.*ranks disagree"):
        hvd.DistributedOptimizer(torch.optim.SGD([p], lr=0.1), named_parameters=[("w", p)])


def test_reducescatter_async_and_grouped_forms(world):
    """reducescatter_async, grouped_reducescatter and grouped_allgather give
    what the one-tensor calls give (Horovod names a script may call)."""
    g = torch.Generator().manual_seed(90 + world.rank)
    xs = [torch.randn(3 * world.size + 1, 5, generator=g), torch.randn(world.size, 2, generator=g)]
    singles = [hvd.reducescatter(x, compression=hvd.Compression.squinch) for x in xs]
    h = hvd.reducescatter_async(xs[0], compression=hvd.Compression.squinch)
    assert torch.equal(hvd.synchronize(h), singles[0])
    grouped = hvd.grouped_reducescatter(xs, compression=hvd.Compression.squinch)
    assert all(torch.equal(a, b) for a, b in zip(grouped, singles))
    parts = [torch.arange(world.rank + 1, dtype=torch.int64), torch.full((2, 3), world.rank)]
    gathered = hvd.grouped_allgather(parts, name="parts")
    assert all(torch.equal(a, hvd.allgather(p)) for a, p in zip(gathered, parts))
    assert gathered[0].numel() == sum(r + 1 for r in range(world.size))


# ----------------------------------------------------------------------------
# join: uneven data
# ----------------------------------------------------------------------------
def test_join_answers_the_others_allreduces_with_zeros(world):
    """Rank r runs r + 1 steps, then joins: each step's allreduce (Squinch
    float32, exact int64, Sum and Average) equals the sum over the ranks
    still running, averages divide by the world size, results are
    bit-identical across the ranks that ran the step, and every rank's
    join() returns the last rank to join (the highest, which ran longest)."""
    n, r = world.size, world.rank
    x = torch.linspace(-1.0, 1.0, 4096)
    got = []
    for k in range(r + 1):
        s = hvd.allreduce(x * (r + 1), op=hvd.Sum, name=f"j{k}",
                          compression=hvd.Compression.squinch)
        a = hvd.allreduce(torch.full((5,), r + 1, dtype=torch.int64), op=hvd.Sum, name=f"i{k}")
        m = hvd.allreduce(x * (r + 1), name=f"m{k}", compression=hvd.Compression.none)
        live = [q for q in range(n) if q >= k]  # rank q runs steps 0..q
        want = x.double() * sum(q + 1 for q in live)
        assert (s.double() - want).abs().max() <= 2 * Q * want.abs().max() + 1e-6
        assert torch.equal(a, torch.full((5,), sum(q + 1 for q in live), dtype=torch.int64))
        assert torch.allclose(m.double(), want / n, rtol=1e-5, atol=1e-6)
        if k % 2:
            hvd.barrier()  # a barrier is answered by the joined ranks too
        got.append(hashlib.sha256(s.numpy().tobytes() + m.numpy().tobytes()).hexdigest())
    assert hvd.join() == n - 1
    hashes = world.allgather_object(got)
    for k in range(n):
        assert len({h[k] for h in hashes if len(h) > k}) == 1, f"step {k} differs across ranks"


def test_join_with_distributed_optimizer(world):
    """Horovod's uneven-data idiom: ranks leave the loop at different steps
    and call join(); the ranks still training get sum(live grads) / size
    through DistributedOptimizer's fused Squinch buffers."""
    n, r = world.size, world.rank
    w = torch.nn.Parameter(torch.zeros(3000))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=hvd.Compression.squinch)
    for k in range(r + 1):
        opt.zero_grad()
        (w * (r + 1)).sum().backward()
        opt.step()
        want = sum(q + 1 for q in range(k, n)) / n
        assert (w.grad - want).abs().max() <= 2 * Q * want + 1e-6, (k, w.grad[:3])
    opt.remove_hooks()
    assert hvd.join() == n - 1


def test_join_refuses_other_collectives_on_every_rank(world):
    """While a rank has joined, a broadcast (or allgather) of the others
    raises the same MismatchError on every rank, the joined one included;
    the group stays usable; join needs the metadata check."""
    n, r = world.size, world.rank
    if n == 1:
        pytest.skip("needs 2 ranks")
    want = "rank 1 called broadcast while rank(s) 0 had joined"
    with pytest.raises(MismatchError, match=re.escape(want)) as info:
        if r == 0:
            hvd.join()
        else:
            hvd.broadcast(torch.ones(3), root_rank=1, name="bj")
    msgs = world.allgather_object(str(info.value))
    assert len(set(msgs)) == 1, msgs
    assert torch.equal(hvd.allreduce(torch.ones(2), op=hvd.Sum, name="after_j"),
                       torch.full((2,), float(n)))
    from squinchcomm.collectives import Communicator

    if world.transport.name == "mpi":
        unchecked = Communicator(MPI.COMM_WORLD.Dup(), timeout=60, check_metadata=False)
    else:
        from squinchcomm.transport.torch_dist import TorchTransport

        unchecked = Communicator(TorchTransport(), timeout=60, check_metadata=False)
    with pytest.raises(ValueError, match="join\\(\\) needs the metadata check"):
        unchecked.join()


# ----------------------------------------------------------------------------
# SyncBatchNorm
# ----------------------------------------------------------------------------
def test_sync_batch_norm_equals_batch_norm_of_the_global_batch(world):
    """hvd.SyncBatchNorm on rank batches of different sizes gives what
    torch.nn.BatchNorm2d gives on all of them concatenated, in one process:
    outputs, input gradients of the sum of every rank's loss, the summed
    weight and bias gradients, the running statistics after two steps, and
    the eval output from them."""
    n, r = world.size, world.rank

    def batch(q, step):
        g = torch.Generator().manual_seed(1000 * step + q)
        return (torch.randn(2 + q, 3, 4, 5, generator=g, dtype=torch.float64) * (q + 1) + q,
                torch.randn(2 + q, 3, 4, 5, generator=g, dtype=torch.float64))

    sync = hvd.SyncBatchNorm(3).double()
    ref = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        for m in (sync, ref):
            m.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    for step in range(2):
        sync.zero_grad()
        ref.zero_grad()
        x, w = batch(r, step)
        x.requires_grad_(True)
        y = sync(x)
        (y * w).sum().backward()
        xs = [batch(q, step)[0].requires_grad_(True) for q in range(n)]
        ws = [batch(q, step)[1] for q in range(n)]
        ys = ref(torch.cat(xs)).split([2 + q for q in range(n)])
        sum((yq * wq).sum() for yq, wq in zip(ys, ws)).backward()
        assert torch.allclose(y, ys[r], rtol=1e-10, atol=1e-10)
        assert torch.allclose(x.grad, xs[r].grad, rtol=1e-9, atol=1e-10)
        for p, q in ((sync.weight, ref.weight), (sync.bias, ref.bias)):
            total = hvd.allreduce(p.grad, op=hvd.Sum, name=f"bn.grad.{step}.{p.shape}")
            assert torch.allclose(total, q.grad, rtol=1e-9, atol=1e-10)
    assert torch.allclose(sync.running_mean, ref.running_mean, rtol=1e-12)
    assert torch.allclose(sync.running_var, ref.running_var, rtol=1e-12)
    assert int(sync.num_batches_tracked) == 2
    sync.eval()
    ref.eval()
    x, _ = batch(r, 7)
    assert torch.allclose(sync(x), ref(x), rtol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        sync.train()(torch.ones(2, 4, 3))


def test_join_with_sync_batch_norm_and_optimizer(world):
    """Uneven data through a model with SyncBatchNorm and DistributedOptimizer:
    the joined ranks answer the statistics' allreduces (forward and backward,
    interleaved with the gradient buckets) with zeros, so the ranks still
    running normalize over their own batches; parameters and running
    statistics stay bit-identical across the ranks that ran each step."""
    n, r = world.size, world.rank
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), hvd.SyncBatchNorm(4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=hvd.Compression.squinch)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    digests = []
    for k in range(r + 1):
        g = torch.Generator().manual_seed(100 * k + r)
        x, y = torch.randn(3, 2, 8, 8, generator=g), torch.randint(0, 3, (3,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        state = torch.cat([t.detach().reshape(-1).float() for t in model.state_dict().values()])
        assert torch.isfinite(state).all()
        digests.append(hashlib.sha256(state.numpy().tobytes()).hexdigest())
    opt.remove_hooks()
    assert hvd.join() == n - 1
    every = world.allgather_object(digests)
    for k in range(n):
        assert len({d[k] for d in every if len(d) > k}) == 1, f"step {k} differs across ranks"


# ----------------------------------------------------------------------------
# ZeRO: DistributedOptimizer(shard_optimizer_state=True)
# ----------------------------------------------------------------------------
def sharded_pair(compression, shard_lr=1e-3):
    """The same model and Adam (two parameter groups) wrapped sharded and not;
    each rank starts from its own weights, and rank 0's are broadcast after
    wrapping, as Horovod's examples do (the shards must start from those)."""
    pair = []
    for shard in (True, False):
        m = make_model(seed=hvd.rank())
        groups = [{"params": m.net[0].parameters()},
                  {"params": m.net[2].parameters(), "lr": 3 * shard_lr}]
        opt = hvd.DistributedOptimizer(torch.optim.Adam(groups, lr=shard_lr),
                                       named_parameters=m.named_parameters(),
                                       compression=compression, shard_optimizer_state=shard,
                                       fusion_threshold=256)
        hvd.broadcast_parameters(m.state_dict(), root_rank=0)
        pair.append((m, opt))
    return pair


@pytest.mark.parametrize("compression", ["none", "squinch"])
def test_sharded_optimizer_state(world, compression):
    """Gradients reduce-scattered, each rank stepping its shard, parameters
    all-gathered: bit-identical on every rank after many steps; the same
    parameters as the unsharded optimizer without compression (fp32 sums),
    the same loss curve within the format's error with Squinch; Adam's
    moments on each rank cover its shard only (together exactly the model)."""
    n, r = world.size, world.rank
    comp = hvd.Compression.none if compression == "none" else hvd.Compression.squinch
    (a, oa), (b, ob) = sharded_pair(comp)
    hvd.broadcast_optimizer_state(oa, root_rank=0)  # empty state: the hyperparameters only
    losses = {id(oa): [], id(ob): []}
    for step in range(8):
        x, y = batch(40 + step, r)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            loss = loss_fn(m, x, y)
            loss.backward()
            o.step()
            losses[id(o)].append(loss.item())
    assert_same_everywhere(*a.parameters())
    if compression == "none":
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    else:
        assert np.allclose(losses[id(oa)], losses[id(ob)], rtol=0.05), losses
    moments = sum(t.numel() for s in oa.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    total = sum(p.numel() for p in a.parameters())
    assert sum(hvd.allgather_object(moments)) == 2 * total  # shards partition every bucket
    assert moments <= 2 * (total / n + 8 * len(oa.buckets))  # block-aligned shards
    with pytest.raises(ValueError, match="shards its state"):
        hvd.broadcast_optimizer_state(oa, root_rank=0)


def test_sharded_optimizer_clips_by_the_global_norm(world):
    """clip_grad_norm_ computes the norm of the full reduced gradient from the
    shards; the step then applies the clipped average gradient."""
    n, r = world.size, world.rank
    model = make_model()
    start = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters(),
                                   shard_optimizer_state=True, fusion_threshold=256)
    loss_fn(model, *batch(50, r)).backward()
    grads = [local_grads(start, 50, k) for k in range(n)]
    avg = {name: sum(g[name].double() for g in grads) / n for name in grads[0]}
    exact = math.sqrt(sum(float((v ** 2).sum()) for v in avg.values()))
    norm = opt.clip_grad_norm_(0.01)
    assert float(norm) == pytest.approx(exact, rel=1e-5)
    with opt.skip_synchronize():
        opt.step()
    for name, p in model.named_parameters():
        expected = dict(start.named_parameters())[name].double() - 0.5 * avg[name] * 0.01 / exact
        assert torch.allclose(p.double(), expected, rtol=1e-5, atol=1e-7), name
    assert_same_everywhere(*model.parameters())


def test_sharded_optimizer_errors(world):
    model = make_model()
    with pytest.raises(ValueError, match="hierarchical"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=model.named_parameters(),
                                 compression=hvd.Compression.squinch_with(hierarchical=True),
                                 shard_optimizer_state=True)
    stepped = torch.optim.Adam(model.parameters(), lr=0.1)
    loss_fn(model, *batch(0, world.rank)).backward()
    stepped.step()
    with pytest.raises(ValueError, match="has not stepped"):
        hvd.DistributedOptimizer(stepped, named_parameters=model.named_parameters(),
                                 shard_optimizer_state=True)


@pytest.mark.parametrize("shard", [False, True])
def test_compression_warm_up_and_opt_out(world, shard):
    """start_step=2: the first two steps reduce uncompressed (the exact fp32
    average), compression starts at the third; the biases, opted out by a
    predicate, stay exact throughout. Also with the sharded optimizer."""
    n, r = world.size, world.rank
    model = make_model()
    start = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), named_parameters=model.named_parameters(),
        compression=hvd.Compression.squinch_with(start_step=2), fusion_threshold=256,
        uncompressed_params=lambda name, p: name.endswith("bias"), shard_optimizer_state=shard)
    if not shard:
        assert {b.plain for b in opt._sq_buckets} == {True, False}
    for step in range(3):
        opt.zero_grad()
        loss_fn(model, *batch(60 + step, r)).backward()
        opt.synchronize()
        grads = [local_grads(start, 60 + step, k) for k in range(n)]
        if shard:  # the gradients live on the shards: gather them as the step sees them
            got = torch.cat([hvd.allgather(s.grad) for s, *_ in opt._sq_shards])
            order = [p for b in opt._sq_buckets for p in b.params]
            names = {id(p): name for name, p in model.named_parameters()}
            got_by = {}
            at = 0
            for p in order:
                got_by[names[id(p)]] = got[at:at + p.numel()].view_as(p)
                at += p.numel()
        else:
            got_by = {name: p.grad for name, p in model.named_parameters()}
        errors = {}
        for name in got_by:
            exact = sum(g[name].double() for g in grads) / n
            errors[name] = float((got_by[name].double() - exact).abs().max() /
                                 (exact.abs().max() + 1e-30))
        exact_ones = [k for k in errors if step < 2 or k.endswith("bias")]
        assert all(errors[k] < 1e-5 for k in exact_ones), (step, errors)
        if step == 2 and n > 1:
            weights = [errors[k] for k in errors if k.endswith("weight")]
            assert max(weights) > 1e-4 and max(weights) < 2 * Q, (step, errors)
        with opt.skip_synchronize():
            opt.step()
    with pytest.raises(ValueError, match="not trainable parameters"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=model.named_parameters(),
                                 uncompressed_params=["net.9.weight"])


def test_sharded_optimizer_checkpoint_round_trip(world):
    """Each rank saves its shard's optimizer state (Adam moments, residuals);
    a fresh sharded optimizer on a fresh model restored from the model and
    that state takes the next step bit-identical to the uninterrupted run."""
    r = world.rank

    def build():
        m = make_model()
        return m, hvd.DistributedOptimizer(
            torch.optim.Adam(m.parameters(), lr=1e-2), named_parameters=m.named_parameters(),
            compression=hvd.Compression.squinch_with(error_feedback=True),
            fusion_threshold=256, shard_optimizer_state=True)

    def step(m, o, k):
        o.zero_grad()
        loss_fn(m, *batch(90 + k, r)).backward()
        o.step()

    model, opt = build()
    for k in range(3):
        step(model, opt, k)
    saved_model = copy.deepcopy(model.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    step(model, opt, 3)
    fresh, fresh_opt = build()
    fresh.load_state_dict(saved_model)
    buf.seek(0)
    fresh_opt.load_state_dict(torch.load(buf, weights_only=False))
    step(fresh, fresh_opt, 3)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert_same_everywhere(*fresh.parameters())


# ----------------------------------------------------------------------------
# compression="auto"
# ----------------------------------------------------------------------------
def _one_step_grads(compression, seed=7):
    model = make_model(seed=seed)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=compression, fusion_threshold=300)
    opt.zero_grad()
    loss_fn(model, *batch(seed, hvd.rank())).backward()
    opt.synchronize()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.remove_hooks()
    return grads


def test_auto_compression_in_the_optimizer_follows_the_link_model(world):
    """hvd.Compression.auto sends each bucket in the method the communicator's
    link model picks: over a stated 50 Mbit/s link the gradients are, bit for
    bit, those of Compression.squinch; over a 1 Tbit/s link with a slow codec,
    those of Compression.none."""
    if world.size == 1:
        pytest.skip("one rank: auto is always uncompressed")
    from squinchcomm import LinkModel

    try:
        world.set_link_model(LinkModel.from_rates(world.size, 50e6))
        slow = _one_step_grads(hvd.Compression.auto)
        world.set_link_model(LinkModel.from_rates(world.size, 1e12, squinch_gbps=0.1,
                                                  bf16_gbps=0.1))
        fast = _one_step_grads(hvd.Compression.auto)
    finally:
        world.link_model = None
    squinch, none = _one_step_grads(hvd.Compression.squinch), _one_step_grads(hvd.Compression.none)
    assert all(torch.equal(a, b) for a, b in zip(slow, squinch))
    assert all(torch.equal(a, b) for a, b in zip(fast, none))
    assert not all(torch.equal(a, b) for a, b in zip(squinch, none))
    assert_same_everywhere(*slow, *fast)
