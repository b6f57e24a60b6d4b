"""FSDP2 with the Squinch reduce-scatter (squinchcomm.torch.fsdp), on real
ranks: mpirun starts them, torch.distributed gloo connects them (FSDP2 runs
on the CPU with gloo). Runs in the MPI suites (1-4 ranks); the torch suites
would repeat the same runs, so it skips there.

Every rank computes every rank's gradient locally (inputs derive from
(seed, rank)), so the exact fp64 average is known everywhere. The library's
reduce-scatter encodes each rank's whole flat gradient once (nearest
rounding errs by < 0.0762 of its block's maximum) and sums in fp32, so a
unit's reduced gradient is within 0.0762 * sum_r max|g_r| / N of the exact
average (the block max taken over the unit: FSDP's flat buffer puts several
parameters in one block).
"""

import hashlib
import os

import numpy as np
import pytest

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(os.environ.get("SQUINCHCOMM_TEST_TRANSPORT", "mpi") == "torch",
                                 reason="FSDP2 always runs over gloo: the MPI suites cover it")]
MPI = pytest.importorskip("mpi4py.MPI")
torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

from squinchcomm.torch import fsdp  # noqa: E402

Q = 0.0762  # worst-case nearest-rounding error / block max


@pytest.fixture(scope="module")
def world():
    from squinchcomm.transport.torch_dist import init_process_group_from_env

    init_process_group_from_env(backend="gloo", timeout=120)
    return dist.get_rank(), dist.get_world_size()


def needs(world, ranks):
    if world[1] < ranks:
        pytest.skip(f"needs {ranks} ranks")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
class Net(torch.nn.Module):
    """Two FSDP units of odd sizes (301 rows do not split evenly over 2-4
    ranks: FSDP pads), and a root unit holding the last bias."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(37, 301)
        self.b = torch.nn.Linear(301, 13, bias=False)
        self.bias = torch.nn.Parameter(torch.zeros(13))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + self.bias


def make(seed=0):
    torch.manual_seed(seed)  # the same initial weights on every rank
    return Net()


def batch(step, r):
    g = torch.Generator().manual_seed(1000 * step + r)
    return torch.randn(8, 37, generator=g), torch.randn(8, 13, generator=g)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


UNITS = {"a": ["a.weight", "a.bias"], "b": ["b.weight"], "<root>": ["bias"]}


def shard(model, mesh=None, reduce_dtype=None):
    mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype) if reduce_dtype else MixedPrecisionPolicy()
    fully_shard(model.a, mesh=mesh, mp_policy=mp)
    fully_shard(model.b, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def exact_grads(model_seed, step, ranks):
    """Every listed rank's gradient of the unsharded model, in fp64."""
    out = []
    for r in ranks:
        ref = make(model_seed).double()
        x, y = batch(step, r)
        loss_of(ref, x.double(), y.double()).backward()
        out.append({n: p.grad.clone() for n, p in ref.named_parameters()})
    return out


def full_grads(model):
    return {n: p.grad.full_tensor().double() for n, p in model.named_parameters()}


def per_unit(got, per_rank):
    """(unit, every rank's flat fp64 gradient, the reduced flat result) per FSDP unit."""
    for unit, names in UNITS.items():
        yield (unit, [torch.cat([g[k].reshape(-1) for k in names]) for g in per_rank],
               torch.cat([got[k].reshape(-1) for k in names]))


def check_within_bound(got, per_rank, compression, divide):
    for unit, flat, mine in per_unit(got, per_rank):
        total = sum(flat) / divide
        mag = sum(f.abs() for f in flat) / divide
        top = sum(f.abs().max() for f in flat) / divide
        # fp32 forward/backward against the fp64 reference: 1e-5 of the unit's max
        if compression == "squinch":
            bound = Q * top + 1e-5 * top
        elif compression == "none":
            bound = 1e-5 * top
        else:  # fp16 / bf16 on the wire: one rounding of each rank's value
            bound = 2.0 ** -8 * mag + 1e-5 * top
        err = (mine - total).abs()
        assert bool((err <= bound).all()), (f"unit {unit}: max err {err.max().item():.3g}, "
                                            f"bound there {bound[err.argmax()].item():.3g}")
        if compression != "none" and len(per_rank) > 1:
            assert err.max() > 0  # really compressed (an uncompressed sum is exact here)


def digest(model):
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().full_tensor().contiguous().numpy().tobytes())
    return h.hexdigest()


def same_on_every_rank(text):
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, text)
    return len(set(every)) == 1


# ----------------------------------------------------------------------------
# the compressed reduce-scatter inside FSDP2
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["squinch", "bf16", "fp16", "none"])
def test_reduced_gradients_within_the_bound(world, compression):
    """FSDP2 + compressed reduce-scatter against the exact average, and FSDP2
    with its own reduce-scatter on the same model and data (world size 1:
    FSDP never calls a reduce-scatter; the gradient is the local one)."""
    r, n = world
    ours = shard(make())
    state = fsdp.compress(ours, compression=compression, min_compress_bytes=0)
    assert sorted(state.units) == sorted(UNITS)
    theirs = shard(make())
    x, y = batch(0, r)
    loss_of(ours, x, y).backward()
    loss_of(theirs, x, y).backward()
    per_rank = exact_grads(0, 0, range(n))
    check_within_bound(full_grads(ours), per_rank, compression if n > 1 else "none", n)
    check_within_bound(full_grads(theirs), per_rank, "none", n)


def test_bf16_reduce_dtype(world):
    """MixedPrecisionPolicy(reduce_dtype=bf16): FSDP hands the reduce-scatter
    bf16 gradients and a bf16 output; the result is within Squinch's bound
    plus one bf16 rounding of the output."""
    needs(world, 2)
    r, n = world
    model = shard(make(), reduce_dtype=torch.bfloat16)
    fsdp.compress(model, min_compress_bytes=0)
    x, y = batch(1, r)
    loss_of(model, x, y).backward()
    for unit, flat, mine in per_unit(full_grads(model), exact_grads(0, 1, range(n))):
        total = sum(flat) / n
        # bf16 input (one rounding per rank), Squinch, bf16 output (one rounding)
        bound = (Q + 2.0 ** -8 + 1e-5) * sum(f.abs().max() for f in flat) / n + 2.0 ** -8 * total.abs()
        assert bool(((mine - total).abs() <= bound).all()), unit


@pytest.mark.parametrize("mode", ["divide_factor", "force_sum"])
def test_fsdp_reduce_ops(world, mode):
    """set_gradient_divide_factor(f) makes FSDP pass PREMUL_SUM(1/f);
    set_force_sum_reduction_for_comms(True) passes SUM and divides after."""
    needs(world, 2)
    r, n = world
    model = shard(make())
    factor = 2.5 * n
    for unit in (model.a, model.b, model):
        if mode == "divide_factor":
            unit.set_gradient_divide_factor(factor)
        else:
            unit.set_force_sum_reduction_for_comms(True)
    fsdp.compress(model, min_compress_bytes=0)
    x, y = batch(2, r)
    loss_of(model, x, y).backward()
    divide = factor if mode == "divide_factor" else n
    check_within_bound(full_grads(model), exact_grads(0, 2, range(n)), "squinch", divide)


def test_training_keeps_every_rank_identical_and_tracks_fsdp(world):
    """Ten SGD steps with error feedback: the gathered parameters are
    bit-identical on every rank, and the loss stays within a few percent of
    FSDP2 with its own reduce-scatter on the same data."""
    r, n = world
    ours, theirs = shard(make()), shard(make())
    fsdp.compress(ours, error_feedback=True, min_compress_bytes=0)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ours, theirs)]
    losses = {0: [], 1: []}
    for step in range(10):
        x, y = batch(10 + step, r)
        for i, (m, opt) in enumerate(zip((ours, theirs), opts)):
            opt.zero_grad()
            loss = loss_of(m, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            losses[i].append(loss.item())
    assert same_on_every_rank(digest(ours))
    assert np.isfinite(losses[0]).all()
    assert abs(losses[0][-1] - losses[1][-1]) <= 0.05 * losses[1][-1], losses


def test_error_feedback_checkpoint_round_trip(world):
    """Save parameters and residuals after two steps; a fresh model restored
    from them takes a third step bit-identical to the uninterrupted run."""
    r, n = world

    def step(model, k):
        model.zero_grad()
        loss_of(model, *batch(20 + k, r)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad

    model = shard(make())
    state = fsdp.compress(model, error_feedback=True, min_compress_bytes=0)
    step(model, 0)
    step(model, 1)
    params = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    residuals = state.state_dict()
    assert list(residuals) == [f"rank{r}"]
    if n > 1:
        assert residuals[f"rank{r}"], "no residuals saved"
    step(model, 2)
    after = digest(model)

    fresh = make(seed=1)
    fresh.load_state_dict(params)
    fresh = shard(fresh)
    restored = fsdp.compress(fresh, error_feedback=True, min_compress_bytes=0)
    restored.load_state_dict(residuals)
    step(fresh, 2)
    assert digest(fresh) == after
    if n > 1:  # without the residuals the step differs: they carry real error
        plain = make(seed=1)
        plain.load_state_dict(params)
        plain = shard(plain)
        fsdp.compress(plain, error_feedback=True, min_compress_bytes=0)
        step(plain, 2)
        assert digest(plain) != after
    with pytest.raises(ValueError, match="rank"):
        restored.load_state_dict({"rank99": {}})


@pytest.mark.parametrize("how", ["fsdp", "hsdp"])
def test_warm_up_and_uncompressed_units(world, how):
    """start_step=1: the first reduction of every unit is exact; unit "b",
    opted out by name, stays exact; the others are compressed afterwards.
    HSDP: the same for the cross-node allreduce (nodes of one rank here)."""
    needs(world, 2)
    r, n = world
    if how == "fsdp":
        model = shard(make())
        state = fsdp.compress(model, start_step=1, uncompressed=["b"], min_compress_bytes=0)
    else:  # every rank a node: FSDP over one rank, everything across nodes
        mesh = init_device_mesh("cpu", (n, 1), mesh_dim_names=("node", "shard"))
        model = shard(make(), mesh=mesh["shard"])
        state = fsdp.compress_across_nodes(model, mesh["node"].get_group(), start_step=1,
                                           uncompressed=lambda name, m: name == "b",
                                           min_compress_bytes=0)
    assert sorted(state.units) == (["<root>", "a"] if how == "fsdp" else ["<root>", "a", "b"])
    for step in (0, 1):
        model.zero_grad()
        loss_of(model, *batch(70 + step, r)).backward()
        for unit, flat, mine in per_unit(full_grads(model), exact_grads(0, 70 + step, range(n))):
            top = sum(f.abs().max() for f in flat) / n
            err = (mine - sum(flat) / n).abs().max()
            if step == 0 or unit == "b":
                assert err <= 1e-5 * top, (how, step, unit, float(err))
            else:  # compressed (two quantizations across nodes)
                assert 0 < err <= (2 * Q + Q * Q + 1e-5) * top, (how, step, unit, float(err))
    with pytest.raises(ValueError, match="not FSDP units"):
        fsdp.compress(shard(make()), uncompressed=["nope"])


def test_configuration_errors(world):
    with pytest.raises(ValueError, match="fully_shard"):
        fsdp.compress(make())  # no FSDP unit
    with pytest.raises(ValueError, match="compression"):
        fsdp.compress(shard(make()), compression="int4")
    # a unit with parameters on two meshes (shard_placement_fn): FSDP refuses a
    # custom reduce-scatter there; the error names the unit
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp._fully_shard._fsdp_common import (FSDPMeshInfo,
                                                                  ShardPlacementResult)
    from torch.distributed.tensor import Shard

    other = DeviceMesh.from_group(dist.new_group(list(range(world[1]))), "cpu")
    model = make()
    fully_shard(model.a, shard_placement_fn=lambda p: ShardPlacementResult(
        Shard(0), FSDPMeshInfo(other, shard_mesh_dim=0)) if p is model.a.bias else None)
    fully_shard(model)
    with pytest.raises(ValueError, match="FSDP unit 'a'.*one mesh per unit"):
        fsdp.compress(model)
    rs = fsdp._CompressedReduceScatter(fsdp.FSDPCompression(), "x")
    with pytest.raises(ValueError, match="AVG, SUM and PREMUL_SUM"):
        rs(torch.zeros(4), torch.zeros(4 * world[1]), dist.group.WORLD, dist.ReduceOp.MAX)
    with pytest.raises(ValueError, match="expected"):
        rs(torch.zeros(4), torch.zeros(5 * world[1]), dist.group.WORLD, dist.ReduceOp.AVG)


# ----------------------------------------------------------------------------
# HSDP: sharded inside a node, compressed across nodes
# ----------------------------------------------------------------------------
def test_hsdp_compresses_only_across_nodes(world):
    """2 nodes x 2 ranks (node size set explicitly): FSDP2 over each node's
    ranks with its own reduce-scatter, the shards averaged across nodes by a
    Squinch allreduce. The gradient is within the bound of the exact average
    over all 4 ranks, the only communicator built is over the 2 ranks of one
    position on both nodes, the gradient norm for clipping is the full one,
    and after training every rank holds the same parameters."""
    r, n = world
    if n != 4:
        pytest.skip("needs exactly 4 ranks (2 nodes x 2)")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("node", "shard"))
    model = shard(make(), mesh=mesh["shard"])
    state = fsdp.compress_across_nodes(model, mesh["node"].get_group(), min_compress_bytes=0)
    x, y = batch(30, r)
    loss_of(model, x, y).backward()
    got = full_grads(model)
    per_rank = exact_grads(0, 30, range(n))
    # Node sums are exact (fp32); the cross-node allreduce quantizes twice
    # (encode, re-encode of the reduced shard): bound each stage by Q x max.
    for unit, flat, mine in per_unit(got, per_rank):
        nodes = [(flat[0] + flat[1]) / 2, (flat[2] + flat[3]) / 2]
        total = sum(nodes) / 2
        first = Q * sum(v.abs().max() for v in nodes) / 2
        bound = first + Q * (total.abs().max() + first) + 1e-5 * sum(v.abs().max() for v in flat)
        err = (mine - total).abs()
        assert bool((err <= bound).all()), f"unit {unit}: {err.max().item():.3g}"
        assert err.max() > 0
    assert [c.size for c in state._comms.values()] == [2]
    ranks = dist.get_process_group_ranks(next(iter(state._comms)))
    assert ranks == [r % 2, r % 2 + 2]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    full = torch.sqrt(sum((g ** 2).sum() for g in got.values()))
    assert torch.isclose(norm.double(), full, rtol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for k in range(4):
        opt.zero_grad()
        loss_of(model, *batch(31 + k, r)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert same_on_every_rank(digest(model))


def test_auto_sends_each_unit_in_the_method_the_link_model_picks(world):
    """compression="auto" with a stated link: over 50 Mbit/s every unit's
    reduce-scatter is Squinch's, bit for bit; over 1 Tbit/s with a slow codec
    it is the uncompressed one. Without a stated link the communicator probes
    at the first reduction and every rank holds the same model."""
    from squinchcomm import LinkModel

    r, n = world
    if n == 1:
        pytest.skip("one rank: FSDP calls no reduce-scatter")

    def grads(**options):
        model = shard(make())
        state = fsdp.compress(model, min_compress_bytes=0, **options)
        loss_of(model, *batch(0, r)).backward()
        return full_grads(model), state

    slow, _ = grads(compression="auto", link_model=LinkModel.from_rates(n, 50e6))
    fast, _ = grads(compression="auto", link_model=LinkModel.from_rates(
        n, 1e12, squinch_gbps=0.1, bf16_gbps=0.1))
    squinch, _ = grads(compression="squinch")
    none, _ = grads(compression="none")
    assert all(torch.equal(slow[k], squinch[k]) for k in slow)
    assert all(torch.equal(fast[k], none[k]) for k in fast)
    assert not all(torch.equal(squinch[k], none[k]) for k in slow)
    probed, state = grads(compression="auto")
    (comm,) = state._comms.values()
    assert comm.link_model.source == "probe"
    assert same_on_every_rank(repr(comm.link_model.to_dict()))
    check_within_bound(probed, exact_grads(0, 0, range(n)), "squinch", n)  # loosest bound
