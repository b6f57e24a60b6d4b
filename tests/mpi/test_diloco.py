"""``hvd.DiLoCo`` (DiLoCo and Streaming DiLoCo) across real ranks.

Run: ``mpirun -n N python -m mpi4py -m pytest --with-mpi tests/mpi`` (N = 1..4,
tests/test_mpi_suites.py does it), over MPI or, with
``SQUINCHCOMM_TEST_TRANSPORT=torch``, over a torch.distributed gloo group.
Every rank's data derives from (seed, rank, step), so each rank can replay
every other rank's local training and check the library against a plain
single-process implementation of the papers' update rules.
"""

import functools
import io
import os
import time

import pytest

pytestmark = pytest.mark.mpi
MPI = pytest.importorskip("mpi4py.MPI")
torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

import squinchcomm.torch as hvd  # noqa: E402
from squinchcomm.errors import MismatchError  # noqa: E402
import test_torch_hvd  # noqa: E402
from test_torch_hvd import squinch_bound  # noqa: E402

world = test_torch_hvd.world  # the fixture: hvd over MPI, or gloo with
# SQUINCHCOMM_TEST_TRANSPORT=torch; min_compress_bytes=0


def digest(tensors):
    return test_torch_hvd.digest(*tensors)  # (fp32 tensors here)


def same_everywhere(tensors) -> bool:
    return len(set(hvd.allgather_object(digest(tensors)))) == 1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 24)
        self.b = torch.nn.Linear(24, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def make(seed=0):
    torch.manual_seed(seed)  # the same initial weights on every rank
    return Net()


def batch(seed, r, t):
    g = torch.Generator().manual_seed(100_000 * seed + 1000 * r + t)
    return torch.randn(8, 12, generator=g), torch.randn(8, 4, generator=g)


def local_step(model, opt, seed, r, t):
    opt.zero_grad()
    x, y = batch(seed, r, t)
    ((model(x) - y) ** 2).mean().backward()


def train(world, diloco, steps, seed=0, start=1, after_sync=None):
    for t in range(start, start + steps):
        local_step(diloco.model, diloco.inner_optimizer, seed, world.rank, t)
        diloco.step()
        if after_sync is not None:
            after_sync(t)


def sgd1(params):
    return torch.optim.SGD(params, lr=1.0)


COMPRESSIONS = {"none": hvd.Compression.none, "bf16": hvd.Compression.bf16,
                "squinch": hvd.Compression.squinch,
                "squinch_ef": hvd.Compression.squinch_with(error_feedback=True)}


# ----------------------------------------------------------------------------
# sync_every=1, outer SGD lr 1 = synchronous data parallelism
# ----------------------------------------------------------------------------
def grid_grads(seed, world_size, t):
    """Per-rank gradients on a dyadic grid whose average is on the grid too:
    the last rank's makes the sum N * m for an m on the grid, so the average
    is m exactly at any world size."""
    g = torch.Generator().manual_seed(seed * 7919 + t)
    shapes = [(4, 16), (4,)]
    per_rank = [[torch.randint(-16, 17, s, generator=g).float() / 16 for s in shapes]
                for _ in range(world_size - 1)]
    m = [torch.randint(-16, 17, s, generator=g).float() / 16 for s in shapes]
    last = [world_size * mi - sum((pr[i] for pr in per_rank), torch.zeros(s))
            for i, (mi, s) in enumerate(zip(m, shapes))]
    return per_rank + [last]


@pytest.mark.parametrize("compression", ["none", "bf16", "squinch"])
def test_sync_every_1_is_synchronous_data_parallel(world, compression):
    """H = 1, outer SGD lr 1 without momentum: the global parameters move by
    the average of lr * g exactly as data parallelism's SGD step does. The
    loss is linear in the parameters (gradient = the rank's data, on a
    dyadic grid, lr a power of two), so every step of both runs is exact
    arithmetic until the compressed average enters: bit for bit for none
    over every step; bf16 commutes with a power-of-two scale, so it is bit
    for bit at the first sync and within an ulp per step after it; Squinch's
    scales are not powers of two apart (it quantizes lr g, data parallelism
    g), so the two runs differ by at most both runs' Squinch error."""
    lr = 0.25
    init = torch.Generator().manual_seed(5)
    w0 = torch.randint(-64, 65, (4, 16), generator=init).float() / 16
    b0 = torch.randint(-64, 65, (4,), generator=init).float() / 16

    def model():
        m = torch.nn.Linear(16, 4)
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)
        return m

    def grads_into(m, t):
        gw, gb = grid_grads(11, world.size, t)[world.rank]
        (m.weight * gw).sum().add((m.bias * gb).sum()).backward()

    # DiLoCo with H = 1.
    dm = model()
    inner = torch.optim.SGD(dm.parameters(), lr=lr)
    d = hvd.DiLoCo(dm, inner, sync_every=1, outer_optimizer=sgd1,
                   compression=COMPRESSIONS[compression], name=f"h1.{compression}")
    # Data parallelism: the averaged gradient (one flat buffer, the same
    # blocks as DiLoCo's fragment), then SGD.
    pm = model()
    popt = torch.optim.SGD(pm.parameters(), lr=lr)
    steps = 5
    bound = np.zeros(68)
    for t in range(1, steps + 1):
        inner.zero_grad()
        grads_into(dm, t)
        d.step()
        popt.zero_grad()
        grads_into(pm, t)
        flat = torch.cat([p.grad.reshape(-1) for p in pm.parameters()])
        avg = hvd.allreduce(flat, op=hvd.Average, name=f"dp.{compression}",
                            compression=COMPRESSIONS[compression])
        for p, g in zip(pm.parameters(), torch.split(avg, [p.numel() for p in pm.parameters()])):
            p.grad = g.view_as(p).clone()
        popt.step()
        same = all(torch.equal(a, b) for a, b in zip(dm.parameters(), pm.parameters()))
        # Off the grid after a compressed sync: DiLoCo's inner step rounds
        # theta - lr g (data parallelism never forms it), an ulp of |theta| < 8.
        bound += 2.0 ** -21
        if compression == "squinch":
            per_rank = [np.concatenate([g.double().reshape(-1).numpy() for g in gr])
                        for gr in grid_grads(11, world.size, t)]
            bound += 2 * lr * squinch_bound(per_rank, 1 / world.size)
        if compression == "none" or (compression == "bf16" and t == 1):
            assert same, f"step {t}: DiLoCo(H=1) differs from data parallelism"
        else:
            diff = torch.cat([(a - b).reshape(-1) for a, b in zip(dm.parameters(),
                                                                   pm.parameters())])
            assert np.all(np.abs(diff.detach().double().numpy()) <= bound), f"step {t}"
        assert same_everywhere(list(dm.parameters()))
    assert d.syncs == [steps]


# ----------------------------------------------------------------------------
# Against a single-process implementation of the update rules
# ----------------------------------------------------------------------------
def reference(world_size, seed, steps, H, fragments, delay, mixing, outer):
    """DiLoCo / Streaming DiLoCo written out for all ranks in one process:
    every worker's local model and AdamW, the global copies and the outer
    optimizer; fragment p is sent at steps t with t % H == ((p+1) H // P) % H
    (pseudo-gradient global - local, averaged in fp64) and applied tau steps
    later; local = mixing * local + (1 - mixing) * global."""
    workers = [make() for _ in range(world_size)]
    inners = [torch.optim.AdamW(w.parameters(), lr=1e-2) for w in workers]
    glob = {n: p.detach().clone() for n, p in workers[0].named_parameters()}
    opt = outer(list(glob.values()))
    P = len(fragments)
    flight = []
    for t in range(1, steps + 1):
        for r, (w, o) in enumerate(zip(workers, inners)):
            local_step(w, o, seed, r, t)
            o.step()
        for p, names in enumerate(fragments):
            if t % H == (p + 1) * H // P % H:
                avg = {n: sum((glob[n].double() - dict(w.named_parameters())[n].detach().double())
                              for w in workers) / world_size for n in names}
                flight.append((t, names, avg))
        for item in [f for f in flight if f[0] + delay <= t]:
            flight.remove(item)
            _, names, avg = item
            for n in names:
                glob[n].grad = avg[n].float()
            opt.step()
            for n in names:
                glob[n].grad = None
            for w in workers:
                params = dict(w.named_parameters())
                with torch.no_grad():
                    for n in names:
                        params[n].copy_(mixing * params[n] + (1 - mixing) * glob[n])
    return glob, workers


@pytest.mark.parametrize("mode", ["diloco", "streaming"])
def test_matches_the_update_rules(world, mode):
    H, steps = 4, 11
    if mode == "diloco":
        fragments, delay, mixing = [["a.weight", "a.bias", "b.weight", "b.bias"]], 0, 0.0
    else:
        fragments, delay, mixing = [["a.weight", "a.bias"], ["b.weight", "b.bias"]], 1, 0.25
    nesterov = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
    model = make()
    d = hvd.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), sync_every=H,
                   compression=hvd.Compression.none, fragments=fragments,
                   fragment_sync_delay=delay, mixing=mixing, name=f"rules.{mode}")
    train(world, d, steps)
    glob, workers = reference(world.size, 0, steps, H, fragments, delay, mixing, nesterov)
    for n, g in d.global_parameters().items():
        torch.testing.assert_close(g, glob[n], rtol=2e-5, atol=2e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, dict(workers[world.rank].named_parameters())[n],
                                   rtol=2e-5, atol=2e-6)
    # Streaming: fragment 0 launches at 2, 6, 10 (applied a step later),
    # fragment 1 at 4 and 8.
    assert d.syncs == ([3, 2] if mode == "streaming" else [2])


# ----------------------------------------------------------------------------
# Identical on every rank; the schedule
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
@pytest.mark.parametrize("mode", ["diloco", "streaming"])
def test_global_parameters_identical_on_every_rank(world, compression, mode):
    model = make(1)
    streaming = mode == "streaming"
    d = hvd.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), sync_every=3,
                   compression=COMPRESSIONS[compression], fragments=2 if streaming else 1,
                   fragment_sync_delay=1 if streaming else 0, name=f"same.{mode}.{compression}")
    checked = []

    def check(t):
        assert same_everywhere(list(d.global_parameters().values())), f"step {t}"
        if not streaming and t % 3 == 0:  # mixing 0: the local parameters too
            assert same_everywhere(list(model.parameters())), f"step {t}"
        checked.append(t)

    train(world, d, 7, seed=3, after_sync=check)
    # H = 3: plain syncs at 3 and 6; streaming: fragment 0 launches at 1, 4, 7
    # (applied at 2, 5, 8), fragment 1 at 3 and 6 (applied at 4 and 7).
    assert len(checked) == 7 and d.syncs == ([2, 2] if streaming else [2])
    if world.size > 1 and streaming:
        # mixing 0.5 keeps each rank's own steps: the local parameters differ.
        assert not same_everywhere(list(model.parameters()))


def test_fragments_cover_every_parameter_once_per_cycle(world):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(5)])
    d = hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.01), sync_every=6,
                   fragments=4, compression=hvd.Compression.none, name="cover")
    names = [n for f in d.fragments for n in f.names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert sorted(f.offset for f in d.fragments) == [0, 1, 3, 4]  # staggered over the cycle
    for cycle in (1, 2):
        for t in range(6 * (cycle - 1) + 1, 6 * cycle + 1):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            d.step()
        assert d.syncs == [cycle] * 4


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------
def build(seed=2):
    model = make(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    d = hvd.DiLoCo(model, inner, sync_every=4, fragments=2, fragment_sync_delay=1,
                   compression=hvd.Compression.squinch_with(error_feedback=True), name="ckpt")
    return model, inner, d


def test_checkpoint_round_trip_is_bit_identical(world):
    model, inner, d = build()
    train(world, d, 10)  # the uninterrupted run
    want = digest(list(model.parameters()) + list(d.global_parameters().values()))

    model, inner, d = build()
    train(world, d, 6)  # step 6 launched fragment 0: its exchange is in flight
    assert len(d._pending) == 1
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "inner": inner.state_dict(),
                "diloco": d.state_dict()}, buf)
    saved = buf.getvalue()

    def resume(drop_residuals=False):
        state = torch.load(io.BytesIO(saved), weights_only=True)
        m, i, dd = build(seed=9)  # other weights: everything must come from the checkpoint
        m.load_state_dict(state["model"])
        i.load_state_dict(state["inner"])
        if drop_residuals:
            state["diloco"]["error_feedback"] = {}
        dd.load_state_dict(state["diloco"])
        train(world, dd, 4, start=7)
        return digest(list(m.parameters()) + list(dd.global_parameters().values()))

    assert resume() == want
    assert resume(drop_residuals=True) != want  # the residuals carry real state


def test_load_refuses_other_options(world):
    _, _, d = build()
    state = d.state_dict()
    model = make(2)
    other = hvd.DiLoCo(model, torch.optim.AdamW(model.parameters()), sync_every=5, fragments=2,
                       name="ckpt")
    with pytest.raises(ValueError, match="sync_every"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------
# Misuse
# ----------------------------------------------------------------------------
def test_ranks_with_different_options_fail_on_every_rank(world):
    model = make()
    if world.size == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(MismatchError, match="sync_every"):
        hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=1),
                   sync_every=4 + (world.rank == world.size - 1))
    with pytest.raises(MismatchError, match="fragment_sync_delay"):
        hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=1), sync_every=4,
                   fragment_sync_delay=world.rank % 2)
    # One rank refuses its own arguments: every rank raises it (none waits).
    with pytest.raises(ValueError, match=f"rank {world.size - 1}: 3 fragments cannot be "
                                         "staggered over sync_every=2"):
        hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=1), sync_every=2,
                   fragments=3 if world.rank == world.size - 1 else 2)


def test_parameters_that_differ_across_ranks_are_refused(world):
    if world.size == 1:
        pytest.skip("needs two ranks")
    model = make(world.rank)  # other weights on every rank
    with pytest.raises(MismatchError, match="broadcast_parameters"):
        hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=1), sync_every=2)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=1), sync_every=2)


def test_bad_fragments_and_options(world):
    model = make()
    sgd = torch.optim.SGD(model.parameters(), lr=1)
    with pytest.raises(ValueError, match="do not cover 1 trainable parameter.*b.bias"):
        hvd.DiLoCo(model, sgd, sync_every=4, fragments=[["a.weight", "a.bias"], ["b.weight"]])
    with pytest.raises(ValueError, match="'a.bias' is in fragments 0 and 1"):
        hvd.DiLoCo(model, sgd, sync_every=4,
                   fragments=[["a.weight", "a.bias"], ["a.bias", "b.weight", "b.bias"]])
    with pytest.raises(ValueError, match="'c.weight', which is not a trainable parameter"):
        hvd.DiLoCo(model, sgd, sync_every=4, fragments=[["a.weight", "a.bias", "b.weight",
                                                         "b.bias", "c.weight"]])
    with pytest.raises(ValueError, match="at most sync_every fragments"):
        hvd.DiLoCo(model, sgd, sync_every=2, fragments=3)
    with pytest.raises(ValueError, match="0 <= delay < sync_every"):
        hvd.DiLoCo(model, sgd, sync_every=2, fragment_sync_delay=2)
    with pytest.raises(ValueError, match="sync_every=0"):
        hvd.DiLoCo(model, sgd, sync_every=0)
    with pytest.raises(ValueError, match="mixing=1"):
        hvd.DiLoCo(model, sgd, sync_every=2, mixing=1)


def test_a_model_that_changes_shape_is_refused(world):
    model = make()
    d = hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2,
                   name="reshape")
    train(world, d, 2)
    with torch.no_grad():
        model.b.weight.data = torch.zeros(8, 12)  # same size, another shape (on every rank)
    d.zero_grad()
    d.step()  # no gradients: the inner SGD leaves the parameters alone
    with pytest.raises(ValueError, match="'b.weight' changed shape from \\(4, 24\\) to \\(8, 12\\)"):
        d.step()


def test_a_shape_change_on_one_rank_raises_on_every_rank(world):
    """Rank 0's parameter changes shape (same size): every rank raises a
    ValueError naming it at the next sync, no rank waits for a timeout."""
    model = make()
    d = hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2,
                   name="reshape1")
    train(world, d, 2)
    if world.rank == 0:
        with torch.no_grad():
            model.b.weight.data = torch.zeros(8, 12)
    d.zero_grad()
    d.step()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"'b.weight' changed shape from \(4, 24\) to \(8, 12\)"):
        d.step()
    assert time.perf_counter() - t0 < 10  # the metadata check, not the timeout


def test_wire_bytes_fall_with_compression(world):
    counts = {}
    for comp in ("none", "bf16", "squinch"):
        model = make()
        d = hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.01), sync_every=2,
                       compression=COMPRESSIONS[comp], name=f"bytes.{comp}")
        train(world, d, 4)
        counts[comp] = d.wire_bytes
    n = sum(p.numel() for p in make().parameters())
    ring = 2 * (world.size - 1) / world.size
    assert counts["none"] == pytest.approx(2 * ring * 4 * n)  # two syncs of fp32
    assert counts["bf16"] == pytest.approx(2 * ring * 2 * n)
    # 6 bytes per 8 values, whole blocks per rank's shard
    assert counts["squinch"] <= 2 * ring * (0.75 * n + 6 * world.size)
    assert counts["squinch"] >= 2 * ring * 0.75 * n


def test_training_loop_collectives_during_a_streaming_exchange(world):
    """A loss all_reduce on the default gloo group while a fragment's exchange
    is in flight (as the parity benchmark's loop does): the exchanges run on a
    group of their own, so the two never meet in different orders (the same
    group hung here: rank A's all_reduce met rank B's exchange)."""
    if os.environ.get("SQUINCHCOMM_TEST_TRANSPORT", "mpi") != "torch":
        pytest.skip("raw torch.distributed collectives: the gloo suites")
    import torch.distributed as dist

    model = make(4)
    d = hvd.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), sync_every=4,
                   fragments=2, fragment_sync_delay=3, compression=hvd.Compression.squinch,
                   name="loop")
    losses = []
    for t in range(1, 10):
        local_step(model, d.inner_optimizer, 5, world.rank, t)
        loss = torch.tensor([float(t)])
        dist.all_reduce(loss)  # the training loop's own collective
        losses.append(float(loss))
        d.step()
    assert losses == [float(t * world.size) for t in range(1, 10)]
    assert d.syncs == [2, 1] and same_everywhere(list(d.global_parameters().values()))
