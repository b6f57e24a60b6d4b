"""Horovod's process sets: collectives over a subset of the ranks.

    import squinchcomm.torch as hvd
    hvd.init()
    evens = hvd.add_process_set([0, 2])          # every rank calls it
    if evens.included():
        hvd.allreduce(t, process_set=evens, compression=hvd.Compression.squinch)

How it maps onto the engines:

1. ``add_process_set`` is collective over all ranks (Horovod's dynamic
   process sets): the ranks agree on the member list, then the default
   communicator's transport is split (an MPI sub-communicator, a
   torch.distributed ``new_group``) on its engine, in order with the
   collectives already queued there.
2. The members get a :class:`~squinchcomm.collectives.Communicator` of
   their own over that group, with the default communicator's settings
   (compression, thresholds, timeout): every collective of this package,
   compressed ones included, and ``DistributedOptimizer`` run inside the set
   through ``process_set=``.
3. Ranks are global everywhere in this API, as in Horovod: ``root_rank`` of a
   broadcast in a set is the root's global rank. A rank outside the set
   that passes it gets a ValueError.
4. ``remove_process_set`` forgets the set on every rank (the engine group
   stays until exit); ``hvd.init`` starts afresh with ``global_process_set``.
"""

from __future__ import annotations

from squinchcomm.collectives import Communicator, check_agreement

__all__ = ["ProcessSet", "global_process_set", "add_process_set", "remove_process_set",
           "communicator_of", "set_rank_of"]


class ProcessSet:
    """A set of global ranks (Horovod's ``hvd.ProcessSet``).

    Args:
        ranks: the global ranks of the set (any order, no duplicates).
    """

    def __init__(self, ranks):
        self.ranks = sorted({int(r) for r in ranks})
        self.process_set_id: int | None = None
        self.communicator: Communicator | None = None
        self._global_rank: int | None = None

    def size(self) -> int:
        """Number of ranks in the set."""
        return len(self.ranks)

    def included(self) -> bool:
        """Whether this process belongs to the set."""
        return self._global_rank in self.ranks

    def rank(self) -> int | None:
        """This process's rank within the set (None when not included)."""
        return self.ranks.index(self._global_rank) if self.included() else None

    def __eq__(self, other):
        return isinstance(other, ProcessSet) and self.ranks == other.ranks

    def __hash__(self):
        return hash(tuple(self.ranks))

    def __repr__(self):
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


#: The set of all ranks (``process_set=None`` means it too).
global_process_set = ProcessSet([])
global_process_set.process_set_id = 0
_SETS: dict[int, ProcessSet] = {}


def _reset(comm: Communicator | None):
    """(hvd.init / hvd.shutdown) The global set becomes ``comm``'s ranks."""
    _SETS.clear()
    if comm is None:
        global_process_set.ranks, global_process_set.communicator = [], None
        global_process_set._global_rank = None
        return
    global_process_set.ranks = list(range(comm.size))
    global_process_set.communicator, global_process_set._global_rank = comm, comm.rank
    _SETS[0] = global_process_set


def _default() -> Communicator:
    from squinchcomm.torch import _ops

    return _ops.communicator()


def add_process_set(process_set) -> ProcessSet:
    """Register a process set on every rank (collective over all ranks).

    Args:
        process_set: a :class:`ProcessSet` or a list of global ranks.

    Returns:
        The registered ProcessSet (its ``process_set_id`` is set).
    """
    # Step 1: agree on the members and split on the default engine.
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    comm = _default()
    # The members first: a rank-local refusal below must be the same everywhere.
    check_agreement("add_process_set", comm.allgather_object({"ranks": ps.ranks}), ["ranks"],
                    ". Every rank must add the same process sets in the same order")
    if ps.process_set_id is not None and _SETS.get(ps.process_set_id) is ps:
        raise ValueError(f"{ps} is already registered")
    if any(other == ps for other in _SETS.values()):
        raise ValueError(f"a process set with ranks {ps.ranks} is already registered: use it "
                         "(or remove_process_set it first)")
    # Step 2: the members' communicator.
    ps.communicator = comm.subset(ps.ranks)
    ps._global_rank = comm.rank
    ps.process_set_id = max(_SETS, default=0) + 1
    _SETS[ps.process_set_id] = ps
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Forget ``process_set`` on every rank; returns whether it was registered."""
    if process_set is global_process_set:
        raise ValueError("the global process set cannot be removed")
    found = _SETS.pop(process_set.process_set_id, None) is process_set
    if found:
        process_set.communicator = None
        process_set.process_set_id = None
    return found


def communicator_of(process_set) -> Communicator:
    """The communicator a collective with ``process_set=`` runs on (step 2)."""
    if process_set is None or process_set is global_process_set:
        return _default()
    if not isinstance(process_set, ProcessSet):
        raise ValueError(f"process_set={process_set!r}: pass an hvd.ProcessSet registered "
                         "with hvd.add_process_set (or None for all ranks)")
    if _SETS.get(process_set.process_set_id) is not process_set:
        raise ValueError(f"{process_set} is not registered: call hvd.add_process_set(...) "
                         "on every rank first")
    if process_set.communicator is None:
        raise ValueError(f"rank {process_set._global_rank} is not in {process_set}: only its "
                         "members may call collectives with it")
    return process_set.communicator


def set_rank_of(process_set, global_rank: int) -> int:
    """The rank within ``process_set`` of ``global_rank`` (step 3)."""
    if process_set is None or process_set is global_process_set:
        return int(global_rank)
    if int(global_rank) not in process_set.ranks:
        raise ValueError(f"root_rank={global_rank} is not in {process_set}: pass the global "
                         "rank of one of its members")
    return process_set.ranks.index(int(global_rank))
