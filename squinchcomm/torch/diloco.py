"""DiLoCo and Streaming DiLoCo: communicate every H steps instead of every step.

``hvd.DiLoCo(model, inner_optimizer, sync_every=H)`` lets every rank train
on its own data for H inner steps, then averages the *pseudo-gradient* (how
far the shared parameters moved on this rank) through the library's
allreduce, in any compression (Squinch by default, optionally with error
feedback across syncs), and applies an *outer* optimizer to the shared
("global") parameters: Nesterov momentum SGD (lr 0.7, momentum 0.9) by
default, as in DiLoCo (Douillard et al., 2023). With ``fragments=P`` the
parameters are cut into P fragments synced on staggered schedules, and
``fragment_sync_delay=tau`` lets a fragment's exchange run under the next tau
inner steps (Streaming DiLoCo, arXiv 2501.18512).

How a step runs (``DiLoCo.step()``), step by step:

1. At construction every trainable parameter gets an fp32 global copy, the
   parameters are cut into fragments (contiguous in model order, of about
   equal size, or as given by name), and the ranks agree on the options, the
   fragments and the parameters themselves (one ``allgather_object``): a
   difference raises the same error on every rank.
2. ``step()`` runs the inner optimizer and counts the step ``t``.
3. Launch: every fragment ``p`` due at ``t`` (``t % H == ((p + 1) * H // P) % H``)
   checks its parameters' shapes, computes its pseudo-gradient
   ``global - local`` in fp32 as one flat buffer and starts an averaging
   allreduce of it on the engine's thread (named ``<name>.fragment<p>``, so
   its error-feedback residual carries from one sync to the next; the
   metadata check is always on, so a parameter that changed shape on some
   ranks only raises on every rank).
4. Apply: every exchange launched at ``t - tau`` is waited for; its average
   becomes the gradient of the fragment's global copies and the outer
   optimizer steps on them (the other fragments' gradients are None, so it
   leaves them and their state alone).
5. Merge: the fragment's local parameters become the global ones
   (``mixing`` 0, the default without a delay), or ``mixing * local + (1 -
   mixing) * global`` (0.5 by default with a delay: the local parameters
   have taken tau steps since the launch).

The global parameters are bit-identical on every rank after every sync (the
allreduce's result is, and the outer step is the same arithmetic on the same
numbers); so are the local ones wherever ``mixing`` is 0. Buffers (e.g.
BatchNorm statistics) are not synchronized. The exchanges run on a group of
their own over the same ranks (built at construction, a collective), so the
training loop may issue its own collectives on the default group while an
exchange is in flight.
"""

from __future__ import annotations

import hashlib
import time
import warnings

import torch

from squinchcomm import collectives
from squinchcomm.collectives import ErrorFeedback
from squinchcomm.torch import _ops
from squinchcomm.torch.compression import Compression, as_compression
from squinchcomm.torch.optimizer import residuals_from_torch, residuals_to_torch

__all__ = ["DiLoCo"]


def _nesterov(params):
    """DiLoCo's outer optimizer: Nesterov momentum SGD, lr 0.7, momentum 0.9."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class _Fragment:
    """One fragment: its parameters' names, the local and global tensors, its offset."""

    def __init__(self, index, names, params, globals_, offset):
        self.index, self.names, self.params, self.globals, self.offset = (
            index, names, params, globals_, offset)
        self.numel = sum(p.numel() for p in params)
        self.shapes = [tuple(p.shape) for p in params]


class _Exchange:
    """An exchange in flight: its fragment, launch step, handle (or result)."""

    def __init__(self, fragment, launched, handle, result=None):
        self.fragment, self.launched, self.handle, self.result = fragment, launched, handle, result
        self.started, self.finished = time.perf_counter(), None


class DiLoCo:
    """DiLoCo (and Streaming DiLoCo) around a model and its inner optimizer.

    Args:
        model: the ``torch.nn.Module`` trained on every rank; its trainable
            parameters must be equal on every rank at construction (call
            ``hvd.broadcast_parameters(model.state_dict(), root_rank=0)`` first).
        inner_optimizer: the optimizer of the local steps (AdamW in the paper)
            over the model's parameters; call ``diloco.step()`` instead of its
            ``step()``.
        sync_every: H, the inner steps between two syncs of a fragment.
        outer_optimizer: a callable ``params -> torch.optim.Optimizer`` building
            the outer optimizer over the global copies (default: SGD lr 0.7,
            momentum 0.9, Nesterov), e.g. ``functools.partial(torch.optim.SGD, lr=1.0)``.
        compression: of the pseudo-gradient: ``hvd.Compression.none``, ``.bf16``,
            ``.squinch`` (default), ``.auto`` or ``Compression.squinch_with(
            error_feedback=True, ...)``; ``start_step=k`` sends the syncs
            launched in the first k inner steps uncompressed.
        fragments: P, the number of fragments (contiguous in model order, of
            about equal size; 1 = plain DiLoCo), or a list of lists of
            parameter names covering every trainable parameter exactly once.
        fragment_sync_delay: tau, the inner steps a fragment's exchange runs
            under before it is applied (0 <= tau < H; 0 = wait at once).
        mixing: weight of the local parameters when a fragment is merged
            (default 0 without a delay, 0.5 with one).
        process_set: the ranks that train together (default: all).
        name: prefix of the exchanges' names (error-feedback residuals are
            kept under them).

    Example::

        model = GPT(...)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        inner = torch.optim.AdamW(model.parameters(), lr=3e-4)
        diloco = hvd.DiLoCo(model, inner, sync_every=50, compression=hvd.Compression.squinch)
        for x, y in data:
            inner.zero_grad()
            loss_fn(model(x), y).backward()
            diloco.step()
    """

    def __init__(self, model, inner_optimizer, *, sync_every: int, outer_optimizer=None,
                 compression=Compression.squinch, fragments=1, fragment_sync_delay: int = 0,
                 mixing: float | None = None, process_set=None, name: str = "diloco"):
        # Step 1: global copies, fragments, schedule; agreement across ranks.
        # The exchanges get a group of their own (the same ranks, its own
        # connections and engine): a streaming exchange is in flight during the
        # inner steps, and a collective the training loop issues meanwhile on
        # the default group (a loss all_reduce, say) must not meet it there in
        # a different order on different ranks.
        base = _ops._check_process_set(process_set)
        self._comm = base.subset(range(base.size))
        # A refusal is raised on every rank (one rank's bad option must not
        # leave the others waiting in the agreement's collective).
        try:
            self._setup(model, inner_optimizer, sync_every, outer_optimizer, compression,
                        fragments, fragment_sync_delay, mixing, name)
            problem = None
        except ValueError as e:
            problem = str(e)
        self._agree(problem)

    def _setup(self, model, inner_optimizer, sync_every, outer_optimizer, compression,
               fragments, delay, mixing, name):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model is a {type(model).__name__}: pass the torch.nn.Module you train")
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise ValueError(f"inner_optimizer is a {type(inner_optimizer).__name__}: pass a "
                             "torch.optim.Optimizer over the model's parameters")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every={sync_every!r}: pass the inner steps between syncs "
                             "(an int >= 1)")
        if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < sync_every:
            raise ValueError(f"fragment_sync_delay={delay!r}: pass an int with 0 <= delay < "
                             f"sync_every ({sync_every}): an exchange must be applied before its "
                             "fragment's next sync starts")
        if mixing is None:
            mixing = 0.5 if delay else 0.0
        if not 0.0 <= float(mixing) < 1.0:
            raise ValueError(f"mixing={mixing!r}: the local parameters' weight in a merge, "
                             "0 <= mixing < 1 (0: take the global parameters)")
        self.model, self.inner_optimizer = model, inner_optimizer
        self.sync_every, self.fragment_sync_delay, self.mixing = sync_every, delay, float(mixing)
        self.compression, self.name = as_compression(compression), str(name)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        groups = self._split(named, fragments)
        if len(groups) > sync_every:
            raise ValueError(f"{len(groups)} fragments cannot be staggered over sync_every="
                             f"{sync_every} steps: use at most sync_every fragments")
        params = dict(named)
        with torch.no_grad():
            self._globals = {n: p.detach().to(torch.float32, copy=True) for n, p in named}
        self.fragments = [
            _Fragment(i, g, [params[n] for n in g], [self._globals[n] for n in g],
                      (i + 1) * sync_every // len(groups) % sync_every)
            for i, g in enumerate(groups)]
        for f in self.fragments:
            if len({p.device for p in f.params}) > 1:
                raise ValueError(f"fragment {f.index} spans devices "
                                 f"{sorted({str(p.device) for p in f.params})}: give each "
                                 "device's parameters fragments of their own (fragments=[[names], ...])")
        factory = _nesterov if outer_optimizer is None else outer_optimizer
        self.outer_optimizer = factory([self._globals[n] for n, _ in named])
        if not isinstance(self.outer_optimizer, torch.optim.Optimizer):
            raise ValueError("outer_optimizer must build a torch.optim.Optimizer from a list of "
                             f"parameters (it returned a {type(self.outer_optimizer).__name__})")
        self._ef = ErrorFeedback()
        comp = self.compression
        ef_on = self._comm.error_feedback_default if comp.error_feedback is None else comp.error_feedback
        self._options = {"compression": comp.name, "rounding": comp.rounding,
                         "hierarchical": comp.hierarchical,
                         "error_feedback": self._ef if ef_on else False}
        self.step_count = 0
        self.syncs = [0] * len(self.fragments)  # completed syncs per fragment
        self.wire_bytes = 0.0  # bytes this rank has sent (the ring model of wire_bytes)
        self.exchange_seconds = 0.0  # launch to result, summed over the exchanges
        self.exposed_seconds = 0.0  # of which the training thread waited
        self._pending: list[_Exchange] = []

    # ------------------------------------------------------------------ public
    def step(self, closure=None):
        """One inner step, then the syncs due at it; returns the closure's loss."""
        # Step 2: the inner step.
        loss = self.inner_optimizer.step() if closure is None else self.inner_optimizer.step(closure)
        self.step_count += 1
        t = self.step_count
        for f in self.fragments:
            if t % self.sync_every == f.offset:
                self._launch(f, t)
        due = [x for x in self._pending if x.launched + self.fragment_sync_delay <= t]
        for x in due:
            self._apply(x)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        """The inner optimizer's ``zero_grad``."""
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    def synchronize(self):
        """Apply every exchange in flight now (e.g. at the end of training)."""
        for x in list(self._pending):
            self._apply(x)

    def global_parameters(self) -> dict[str, torch.Tensor]:
        """The shared fp32 parameters by name (identical on every rank)."""
        return dict(self._globals)

    @property
    def error_feedback(self) -> ErrorFeedback:
        """This DiLoCo's error-feedback residuals (one per fragment)."""
        return self._ef

    def state_dict(self) -> dict:
        """The outer state: global parameters, outer optimizer, the step count,
        exchanges in flight (waited for; their averages are kept) and this
        rank's error-feedback residuals. Save it with the model's and the
        inner optimizer's ``state_dict()``, one file per rank."""
        for x in self._pending:
            self._wait(x)
        ef = self._ef.state_dict()
        return {
            "config": self._config(), "rank": self._comm.rank, "size": self._comm.size,
            "step": self.step_count, "syncs": list(self.syncs), "wire_bytes": self.wire_bytes,
            "globals": {n: g.detach().clone() for n, g in self._globals.items()},
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "pending": [{"fragment": x.fragment.index, "launched": x.launched,
                         "average": x.result.detach().clone()} for x in self._pending],
            "error_feedback": residuals_to_torch(ef),
        }

    def load_state_dict(self, state: dict):
        """Restore :meth:`state_dict` (saved with the same options and model)."""
        mine = self._config()
        diff = [k for k in mine if repr(mine[k]) != repr(state["config"].get(k))]
        if diff:
            raise ValueError(f"DiLoCo.load_state_dict: the checkpoint was saved with other "
                             f"{', '.join(diff)} ({', '.join(repr(state['config'].get(k)) for k in diff)}"
                             f"; this DiLoCo has {', '.join(repr(mine[k]) for k in diff)}): "
                             "build it with the options of the saved run")
        for x in self._pending:  # this run's exchanges in flight end before they are replaced
            self._wait(x)
        with torch.no_grad():
            for n, g in self._globals.items():
                g.copy_(state["globals"][n])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.step_count, self.syncs = int(state["step"]), list(state["syncs"])
        self.wire_bytes = float(state["wire_bytes"])
        device = self.fragments[0].params[0].device
        self._pending = [_Exchange(self.fragments[x["fragment"]], int(x["launched"]), None,
                                   x["average"].to(device)) for x in state["pending"]]
        self._ef.reset()
        if state["rank"] != self._comm.rank or state["size"] != self._comm.size:
            warnings.warn(f"DiLoCo error-feedback residuals were saved by rank {state['rank']} of "
                          f"{state['size']}, this is rank {self._comm.rank} of {self._comm.size}: "
                          "they restart from zero (save one state per rank to resume exactly)",
                          stacklevel=2)
            return
        self._ef.load_state_dict(residuals_from_torch(state["error_feedback"]),
                                 world=self._comm.size)

    # ------------------------------------------------------------------ private
    @staticmethod
    def _split(named, fragments) -> list[list[str]]:
        """The fragments as lists of names: P contiguous groups of about equal
        size, or the user's lists checked to cover every parameter once."""
        names = [n for n, _ in named]
        if isinstance(fragments, bool) or not isinstance(fragments, (int, list, tuple)):
            raise ValueError(f"fragments={fragments!r}: pass a count or a list of lists of "
                             "parameter names")
        if isinstance(fragments, int):
            if not 1 <= fragments <= len(names):
                raise ValueError(f"fragments={fragments}: pass 1 to {len(names)} (the model's "
                                 "trainable parameters)")
            # Contiguous groups: a new group opens once the elements so far reach
            # its share of the total, or when each later group needs one of the
            # parameters that are left.
            total = sum(p.numel() for _, p in named)
            groups, done = [[]], 0
            for i, (n, p) in enumerate(named):
                opening = fragments - len(groups)
                if groups[-1] and opening and (len(names) - i <= opening
                                               or done * fragments >= len(groups) * total):
                    groups.append([])
                groups[-1].append(n)
                done += p.numel()
            return groups
        groups = [list(g) for g in fragments]
        seen: dict[str, int] = {}
        for k, g in enumerate(groups):
            if not g:
                raise ValueError(f"fragment {k} is empty: every fragment needs a parameter")
            for n in g:
                if n not in names:
                    raise ValueError(f"fragment {k} names '{n}', which is not a trainable "
                                     "parameter of the model (see model.named_parameters())")
                if n in seen:
                    raise ValueError(f"parameter '{n}' is in fragments {seen[n]} and {k}: "
                                     "each parameter belongs to exactly one fragment")
                seen[n] = k
        missing = [n for n in names if n not in seen]
        if missing:
            raise ValueError(f"the fragments do not cover {len(missing)} trainable parameter(s) "
                             f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                             "each parameter belongs to exactly one fragment")
        return groups

    def _config(self) -> dict:
        return {"sync_every": self.sync_every, "fragment_sync_delay": self.fragment_sync_delay,
                "mixing": self.mixing, "compression": repr(self.compression),
                "fragments": [list(zip(f.names, f.shapes)) for f in self.fragments],
                "outer_optimizer": type(self.outer_optimizer).__name__,
                "outer_defaults": sorted((k, repr(v)) for k, v in self.outer_optimizer.defaults.items())}

    def _agree(self, problem: str | None):
        """Every rank built the same DiLoCo over the same parameters (one
        allgather_object; the same error on every rank otherwise, including
        when some rank refused its own arguments: ``problem``)."""
        mine = {"collective": "DiLoCo", "problem": problem}
        if problem is None:
            digest = hashlib.sha256()
            for f in self.fragments:
                for p in f.params:
                    digest.update(p.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
            mine.update(self._config(), parameters=digest.hexdigest()[:16])
        metas = self._comm.allgather_object(mine)
        refused = [(r, m["problem"]) for r, m in enumerate(metas) if m["problem"] is not None]
        if refused:
            raise ValueError("DiLoCo: " + "; ".join(f"rank {r}: {msg}" for r, msg in refused))
        keys = [k for k in mine if k not in ("collective", "problem", "parameters")]
        collectives.check_agreement("DiLoCo", metas, keys,
                                    "; build DiLoCo with the same model and options on every rank")
        collectives.check_agreement("DiLoCo", metas, ["parameters"],
                                    " (a digest of the trainable parameters); call hvd."
                                    "broadcast_parameters(model.state_dict(), root_rank=0) "
                                    "before DiLoCo(...)")

    def _launch(self, f: _Fragment, t: int):
        # Step 3: the pseudo-gradient global - local, one flat fp32 buffer.
        name = f"{self.name}.fragment{f.index}"
        options = dict(self._options, check_metadata=True)
        if t <= self.compression.start_step:
            options.update(compression="none", error_feedback=False)
        now = [tuple(p.shape) for p in f.params]
        if now != f.shapes:
            self._refuse_reshaped(f, now, name, options)
        with torch.no_grad():
            flat = torch.cat([(g - p.detach().float()).reshape(-1)
                              for g, p in zip(f.globals, f.params)])
        handle = self._comm.allreduce_async(flat, op="average", name=name, out=flat, **options)
        x = _Exchange(f, t, handle)
        handle.add_done_callback(lambda _h, x=x: setattr(x, "finished", time.perf_counter()))
        self._pending.append(x)
        self.wire_bytes += self._comm.bytes_sent(flat, options["compression"])[0]

    def _refuse_reshaped(self, f: _Fragment, now, name: str, options: dict):
        """A parameter changed shape on this rank: its exchange still runs,
        with zeros under a name that says so, so that every rank whose
        parameters did not change raises the metadata check's error naming
        each rank's call instead of waiting for this one; then this rank
        raises (its own error when every rank changed alike)."""
        n, was, new = next((n, a, b) for n, a, b in zip(f.names, f.shapes, now) if a != b)
        error = (f"DiLoCo: parameter '{n}' changed shape from {was} to {new} since DiLoCo was "
                 "built: build a new DiLoCo for the changed model")
        flat = torch.zeros(f.numel, dtype=torch.float32)
        self._comm.allreduce_async(flat, op="average", name=f"{name} ({error})", out=flat,
                                   **options).wait()
        raise ValueError(error)

    def _wait(self, x: _Exchange):
        if x.result is None:
            t0 = time.perf_counter()
            x.result = x.handle.wait()
            done = time.perf_counter()
            self.exposed_seconds += done - t0
            self.exchange_seconds += (x.finished or done) - x.started
            x.handle = None

    def _apply(self, x: _Exchange):
        # Step 4: the outer step on this fragment's global copies.
        self._wait(x)
        self._pending.remove(x)
        f = x.fragment
        with torch.no_grad():
            offset = 0
            for g in f.globals:
                g.grad = x.result[offset:offset + g.numel()].view_as(g)
                offset += g.numel()
            self.outer_optimizer.step()
            for g in f.globals:
                g.grad = None
            # Step 5: merge the local parameters with the global ones.
            for g, p in zip(f.globals, f.params):
                if self.mixing:
                    p.copy_(self.mixing * p.float() + (1.0 - self.mixing) * g)
                else:
                    p.copy_(g)
        self.syncs[f.index] += 1
