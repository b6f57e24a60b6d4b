"""The DDP communication hooks across real processes: torch.distributed gloo on 127.0.0.1.

Each test launches N copies of this file as workers (``python
tests/test_ddp_hook.py SCENARIO``) with torchrun's environment variables. The
workers train an unmodified ``DistributedDataParallel`` MLP whose inputs
derive from (seed, rank, step), so every rank can recompute what the exact
average would have been. A worker reports through its exit code and output;
the harness kills the job past a deadline, so a deadlock fails the test
instead of hanging it.

Error bounds (derived, not observed). Squinch nearest rounding: a block of 8
with max |x| = m gets the scale A with m < A <= m e^(1/6); the widest gap
between levels A (c/15)^2 is the top one, A (1 - (14/15)^2), so an element
errs by at most C = (1 - (14/15)^2) / 2 * e^(1/6) ~ 0.0762 times m. The
allreduce quantizes twice: each rank's gradient g_r (error <= C m_r per
element of block b), then the fp32 average s of the decoded values, whose
block max is <= (1 + C) mean_r m_r; so the result errs from the exact
average by at most C (2 + C) mean_r m_r(b). fp16 / bf16 casts (round to
nearest, unit roundoff u = 2^-11 / 2^-8, absolute floor a for fp16's
subnormals): u M + a + u ((1 + u) M + a) + a with M = mean_r |g_r|.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from squinch_data import FP32_SLACK, SQUINCH_C
from workers import base_env, exit_after, free_port, run_workers

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # seconds a healthy collective may take on a loaded 2-core machine

#: (unit roundoff, absolute floor) of the cast codecs.
CAST = {"fp16": (2.0 ** -11, 2.0 ** -25), "bf16": (2.0 ** -8, 2.0 ** -134)}


# ---------------------------------------------------------------------------
# The model and the data (inside the workers)
# ---------------------------------------------------------------------------

class MLP(torch.nn.Module):
    """A small MLP whose layers are registered in the reverse of their use order,
    so DDP's rebuilt buckets (gradient-ready order) differ from its first ones."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(96, 10)
        self.hidden = torch.nn.Linear(128, 96)
        self.inp = torch.nn.Linear(32, 128)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def make_model(seed: int) -> MLP:
    torch.manual_seed(seed)  # the same initial weights on every rank
    return MLP()


def batch(seed: int, rank: int, step: int):
    """This rank's batch at ``step``: a pure function of (seed, rank, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 1009 + step)
    x = torch.randn(16, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return x, y


def train_step(ddp, opt, seed: int, rank: int, step: int) -> float:
    x, y = batch(seed, rank, step)
    opt.zero_grad(set_to_none=False)
    loss = torch.nn.functional.cross_entropy(ddp(x), y)
    loss.backward()
    if opt is not None:
        opt.step()
    return loss.item()


def params_digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def wrap(model, bucket_cap_mb: float = 0.02):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # 0.02 MiB: several buckets for this ~17k-parameter model.
    return DDP(model, bucket_cap_mb=bucket_cap_mb)


def recording(hook, log: list):
    """Wrap ``hook``: log each bucket's (index, input, output, parameters).
    The output is recorded when the hook's future completes (the hooks run
    asynchronously), in a chained future that DDP waits for."""
    def wrapped(state, bucket):
        before = bucket.buffer().detach().clone()
        index, params = bucket.index(), bucket.parameters()
        fut = hook(state, bucket)

        def record(f):
            out = f.value()
            log.append((index, before, out.detach().clone(), params))
            return out

        return fut.then(record)
    return wrapped


# ---------------------------------------------------------------------------
# Scenarios (inside the workers)
# ---------------------------------------------------------------------------

def bucket_bound(codec: str, inputs: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |result - exact average| (module docstring).

    Args:
        codec: "squinch" | "fp16" | "bf16".
        inputs: (world, n) float64, every rank's bucket buffer.

    Returns:
        (n,) float64 bound, with fp32 slack added.
    """
    world, n = inputs.shape
    a = inputs.abs()
    if codec == "squinch":
        pad = (-n) % 8
        blocks = torch.nn.functional.pad(a, (0, pad)).view(world, -1, 8)  # (world, nb, 8)
        m = blocks.amax(dim=2).mean(dim=0)  # (nb,) mean over ranks of the block max
        per_block = SQUINCH_C * (2 + SQUINCH_C) * m + FP32_SLACK * m
        return per_block.repeat_interleave(8)[:n]
    u, floor = CAST[codec]
    mean = a.mean(dim=0)  # (n,)
    return u * mean + floor + u * ((1 + u) * mean + floor) + floor + FP32_SLACK * mean


def scenario_match(seed: int) -> None:
    """Squinch / fp16 / bf16 hooks vs DDP without a hook, step by step."""
    import torch.distributed as dist

    from squinchcomm.torch.ddp_hooks import SquinchHookState, bf16_hook, fp16_hook, squinch_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    steps = 4
    for codec, hook in (("squinch", squinch_hook), ("fp16", fp16_hook), ("bf16", bf16_hook)):
        ref = wrap(make_model(seed))  # plain DDP: the exact (fp32) average
        model = wrap(make_model(seed))
        # The state exists before the hook is registered; the communicator
        # only on the first bucket. Error feedback off: the bound is per step.
        state = SquinchHookState(error_feedback=False, min_compress_bytes=0, timeout=WAIT)
        assert state._comm is None
        log: list = []
        model.register_comm_hook(state, recording(hook, log))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.0)
        layouts, worst = [], 0.0
        for step in range(steps):
            ref.module.load_state_dict(model.module.state_dict())  # same point: exact grads there
            train_step(ref, ref_opt, seed, rank, step)
            log.clear()
            x, y = batch(seed, rank, step)
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            # The log is in completion order; compare buckets across ranks in
            # bucket order whatever order they completed in.
            log.sort(key=lambda entry: entry[0])
            layouts.append([(i, inp.numel()) for i, inp, _, _ in log])
            # Per-parameter bounds from every rank's bucket inputs.
            bound = {}
            for _, inp, out, params in log:
                gathered = [torch.empty_like(inp) for _ in range(world)]
                dist.all_gather(gathered, inp)
                stack = torch.stack(gathered).double()  # (world, n)
                exact = stack.mean(dim=0)
                b = bucket_bound(codec, stack)
                err = (out.double() - exact).abs()
                assert bool((err <= b).all()), (codec, step, float((err - b).max()))
                worst = max(worst, float(err.max()))
                offset = 0
                for p in params:
                    bound[id(p)] = b[offset:offset + p.numel()].view(p.shape)
                    offset += p.numel()
            assert len(bound) == len(list(model.parameters()))
            for (name, p), q in zip(model.module.named_parameters(), ref.module.parameters()):
                err = (p.grad.double() - q.grad.double()).abs()
                excess = float((err - bound[id(p)]).max())
                assert excess <= 0, f"{codec} step {step} {name}: exceeds the bound by {excess}"
            opt.step()
        # Compressed for real (not an exact passthrough), and buckets were rebuilt.
        assert worst > 0, codec
        # DDP's first layout caps only its first bucket (at 1 MiB); the rebuilt
        # one splits at bucket_cap_mb.
        assert len(layouts[1]) > 1, layouts
        assert layouts[0] != layouts[1] and layouts[1] == layouts[2] == layouts[3], layouts
        # Residual-free: no error-feedback state was created.
        assert state.state_dict()["residuals"] == {}
        # Every rank holds bit-identical parameters.
        digests = [None] * world
        dist.all_gather_object(digests, params_digest(model.module))
        assert len(set(digests)) == 1, (codec, digests)
        if rank == 0:
            print(f"{codec}: {steps} steps, {len(layouts[0])} -> {len(layouts[1])} buckets, "
                  f"largest error {worst:.3g}, parameters identical on {world} ranks", flush=True)


def scenario_checkpoint(seed: int) -> None:
    """Error feedback across the bucket rebuild; pickle; state_dict round trip."""
    import torch.distributed as dist

    from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    state = SquinchHookState(error_feedback=True, min_compress_bytes=0, timeout=WAIT)
    # Step 1: pickles before the communicator exists (no process group inside).
    fresh = pickle.loads(pickle.dumps(state))
    assert fresh._comm is None and fresh.process_group is None
    model = wrap(make_model(seed))
    log: list = []
    model.register_comm_hook(state, recording(squinch_hook, log))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    names_per_step = []
    for step in range(3):
        log.clear()
        train_step(model, opt, seed, rank, step)
        names_per_step.append(set(state._last_seen))
    # Step 2: the first layout's residuals were retired after going unused twice.
    ef_keys = set(state.communicator.error_feedback.state)
    first = {n for n in names_per_step[0] if n not in names_per_step[2]}
    assert first, names_per_step  # the rebuild changed the identities
    assert not any(k.endswith("/" + n) for k in ef_keys for n in first), ef_keys
    assert len(ef_keys) == len(log), (ef_keys, len(log))
    # Step 3: pickle with a live communicator: the process group stays behind.
    blob = pickle.dumps(state)
    saved = state.state_dict()
    restored = pickle.loads(blob)
    assert restored._comm is None and restored.process_group is None
    for key, entry in saved["residuals"].items():
        again = restored.state_dict()["residuals"][key]
        assert np.array_equal(entry["residual"], again["residual"]), key
        assert np.array_equal(entry["shard_residual"], again["shard_residual"]), key
        assert float(np.abs(entry["residual"]).max()) > 0, key  # there is something to restore
    # Step 4: take step 3 twice from the same checkpoint; bit-identical params.
    model_sd, opt_sd = copy.deepcopy(model.module.state_dict()), copy.deepcopy(opt.state_dict())
    train_step(model, opt, seed, rank, 3)
    first_run = [p.detach().clone() for p in model.parameters()]
    model.module.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)
    state.load_state_dict(pickle.loads(pickle.dumps(saved)))  # as if from disk
    train_step(model, opt, seed, rank, 3)
    assert all(torch.equal(a, b) for a, b in zip(first_run, model.parameters()))
    # ...and the residuals matter: from zero residuals the step differs.
    model.module.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)
    state.communicator.error_feedback.reset()
    train_step(model, opt, seed, rank, 3)
    assert not all(torch.equal(a, b) for a, b in zip(first_run, model.parameters()))
    # Step 5: a restart: a fresh DDP (first layout again) with the unpickled state.
    model2 = wrap(make_model(seed))
    model2.module.load_state_dict(model_sd)
    model2.register_comm_hook(restored, squinch_hook)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    opt2.load_state_dict(opt_sd)
    steps_before = {k: e["step"] for k, e in saved["residuals"].items()}
    train_step(model2, opt2, seed, rank, 3)  # first layout: restored residuals wait
    ef = restored.communicator.error_feedback.state
    assert all(ef[k]["step"] == s for k, s in steps_before.items()), "used too early"
    train_step(model2, opt2, seed, rank, 4)  # rebuilt layout: restored residuals apply
    assert all(ef[k]["step"] == s + 1 for k, s in steps_before.items()), "not used"
    digests = [None] * world
    dist.all_gather_object(digests, params_digest(model2.module))
    assert len(set(digests)) == 1, digests
    # Step 6: a state saved at another world size is refused with the fix named.
    wrong = dict(saved, world=world + 1)
    try:
        state.load_state_dict(wrong)
    except ValueError as exc:
        assert "skip load_state_dict" in str(exc), exc
    else:
        raise AssertionError("a state of another world size was accepted")
    if rank == 0:
        print(f"checkpoint: {len(saved['residuals'])} residuals restored bit-identically", flush=True)


def scenario_layouts(seed: int) -> None:
    """Three bias-free 16x16 layers in one bucket: DDP's first layout and its
    rebuilt one hold the same shapes in another order. A residual name must
    tell them apart (else the first layout's residual would be added to other
    parameters' gradients), be the same on every rank, and be the same again
    for a fresh state and a fresh DDP (a resumed process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

    rank = dist.get_rank()
    runs = []
    for _ in range(2):  # the run, then the "resumed process"
        torch.manual_seed(seed)
        model = DDP(torch.nn.Sequential(*(torch.nn.Linear(16, 16, bias=False) for _ in range(3))))
        state = SquinchHookState(error_feedback=True, min_compress_bytes=0, timeout=WAIT)
        log: list = []
        model.register_comm_hook(state, recording(squinch_hook, log))
        names, orders = [], []
        for step in range(2):
            log.clear()
            before = set(state._last_seen)
            model(torch.randn(4, 16)).sum().backward()
            names.append(sorted(set(state._last_seen) - before) or sorted(state._last_seen))
            index = {id(p): i for i, p in enumerate(model.parameters())}
            orders.append([index[id(p)] for _, _, _, ps in log for p in ps])
        assert orders[0] != orders[1], orders  # the premise: DDP reordered the bucket
        assert names[0] != names[1], names
        runs.append(names)
    assert runs[0] == runs[1], runs
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, runs[0])
    assert all(e == runs[0] for e in everyone), everyone
    if rank == 0:
        print(f"layouts: {runs[0][0]} then {runs[0][1]}", flush=True)


def scenario_policy(seed: int) -> None:
    """start_step=2 and the biases opted out: the first two iterations are
    DDP's exact average everywhere, later ones exact for the biases and
    compressed (within the bound, not exact) for the weights."""
    import torch.distributed as dist

    from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    ref = wrap(make_model(seed))
    model = wrap(make_model(seed))
    biases = [p for name, p in model.module.named_parameters() if name.endswith("bias")]
    state = SquinchHookState(error_feedback=False, min_compress_bytes=0, timeout=WAIT,
                             start_step=2, uncompressed_params=biases)
    model.register_comm_hook(state, squinch_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.0)
    for step in range(4):
        ref.module.load_state_dict(model.module.state_dict())
        train_step(ref, ref_opt, seed, rank, step)
        x, y = batch(seed, rank, step)
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for (name, p), q in zip(model.module.named_parameters(), ref.module.parameters()):
            err = float((p.grad.double() - q.grad.double()).abs().max())
            top = float(q.grad.abs().max())
            if step < 2 or name.endswith("bias"):
                assert err <= FP32_SLACK * top, (step, name, err, top)
            else:  # compressed: not exact, within twice the per-block bound of the max
                assert 0 < err <= SQUINCH_C * (2 + SQUINCH_C) * 2 * top, (step, name, err)
        opt.step()
    digests = [None] * world
    dist.all_gather_object(digests, params_digest(model.module))
    assert len(set(digests)) == 1, digests
    if rank == 0:
        print("policy: warm-up and opt-out as specified", flush=True)


def scenario_auto(seed: int) -> None:
    """compression="auto": over a stated 50 Mbit/s link every bucket is
    Squinch's, bit for bit; over 1 Tbit/s with a slow codec it is DDP's own
    average; without a stated link the first bucket probes, and every rank
    holds the same model and the same parameters after training."""
    import torch.distributed as dist

    from squinchcomm import LinkModel
    from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

    rank, world = dist.get_rank(), dist.get_world_size()

    def grads(**options):
        model = wrap(make_model(seed))
        state = SquinchHookState(error_feedback=False, min_compress_bytes=0, timeout=WAIT,
                                 **options)
        model.register_comm_hook(state, squinch_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(2):
            train_step(model, opt, seed, rank, step)
        return [p.grad.clone() for p in model.parameters()], model, state

    slow = grads(compression="auto", link_model=LinkModel.from_rates(world, 50e6))[0]
    fast = grads(compression="auto", link_model=LinkModel.from_rates(
        world, 1e12, squinch_gbps=0.1, bf16_gbps=0.1))[0]
    squinch = grads(compression="squinch")[0]
    none = grads(compression="none")[0]
    assert all(torch.equal(a, b) for a, b in zip(slow, squinch))
    assert all(torch.equal(a, b) for a, b in zip(fast, none))
    assert not all(torch.equal(a, b) for a, b in zip(squinch, none))
    _, model, state = grads(compression="auto")
    model_desc = repr(state.communicator.link_model.to_dict())
    assert state.communicator.link_model.source == "probe"
    for text in (model_desc, params_digest(model.module)):
        every = [None] * world
        dist.all_gather_object(every, text)
        assert len(set(every)) == 1, every
    if rank == 0:
        print(f"auto: {state.communicator.link_model.describe()}", flush=True)


def worker_main(scenario: str) -> None:
    """Run one scenario in a worker process; exit 0 on success."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    {"match": scenario_match, "checkpoint": scenario_checkpoint, "layouts": scenario_layouts,
     "policy": scenario_policy, "auto": scenario_auto}[scenario](
        int(os.environ["TEST_SEED"]))
    # Then exit through squinchcomm's exit handler (it takes the group down).
    dist.barrier()


# ---------------------------------------------------------------------------
# Harness (the pytest side)
# ---------------------------------------------------------------------------

def launch(scenario: str, size: int, seed: int, deadline: float = 45.0) -> str:
    """Run ``scenario`` on ``size`` workers; return rank 0's output, or fail with everyone's."""
    port = free_port()
    envs = [base_env(RANK=rank, WORLD_SIZE=size, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                     TEST_SEED=seed) for rank in range(size)]
    return run_workers(Path(__file__).resolve(), [scenario], envs, deadline,
                       f"{scenario} on {size} ranks")[0]


@pytest.mark.parametrize("size", [2, 3])
def test_hooks_match_exact_ddp_within_bounds(size):
    out = launch("match", size, seed=size * 7)
    for codec in ("squinch", "fp16", "bf16"):
        assert f"{codec}: 4 steps" in out, out


def test_warm_up_and_opted_out_parameters():
    assert "policy: warm-up and opt-out" in launch("policy", 2, seed=5)


def test_auto_follows_the_link_model():
    assert "auto: compression='auto' (probe, 2 ranks)" in launch("auto", 2, seed=6)


def test_state_checkpoint_and_pickle():
    out = launch("checkpoint", 2, seed=5)
    assert "restored bit-identically" in out, out


def test_residual_names_tell_bucket_layouts_apart():
    assert "layouts: " in launch("layouts", 2, seed=3)


def test_state_validates_early():
    from squinchcomm.torch.ddp_hooks import SquinchHookState

    with pytest.raises(ValueError, match="choose one of"):
        SquinchHookState(compression="int4")
    with pytest.raises(ValueError, match="choose one of"):
        SquinchHookState(rounding="down")
    with pytest.raises(ValueError, match="min_compress_bytes"):
        SquinchHookState(min_compress_bytes=-1)
    with pytest.raises(ValueError, match="state_dict"):
        SquinchHookState().load_state_dict({"residuals": {}})
    state = SquinchHookState(compression="bf16")
    assert pickle.loads(pickle.dumps(state)).compression == "bf16"


def test_hooks_pass_ddp_signature_check():
    """register_comm_hook compares the annotations as objects (strings fail)."""
    import inspect

    from squinchcomm.torch import ddp_hooks

    for hook in (ddp_hooks.squinch_hook, ddp_hooks.fp16_hook, ddp_hooks.bf16_hook):
        sig = inspect.signature(hook)
        assert sig.parameters["bucket"].annotation is torch.distributed.GradBucket
        assert sig.return_annotation == torch.futures.Future[torch.Tensor]


if __name__ == "__main__":
    exit_after(worker_main, sys.argv[1])
