"""An MPI job in which one rank never arrives at a collective (or dies, or
never creates its communicator).

    mpirun -n 3 python tests/mpi/fault_job.py {absent|dies|no_init|size_unchecked} TIMEOUT

The others must raise TransportError after about TIMEOUT seconds instead of
hanging. Every rank leaves with os._exit: MPI_Finalize with a collective
still pending could itself hang.
"""

import os
import sys
import time

import numpy as np
from mpi4py import MPI

from squinchcomm.collectives import Communicator
from squinchcomm.errors import TransportError

mode, timeout = sys.argv[1], float(sys.argv[2])
if mode == "no_init":
    # Rank 1 never creates a communicator; the others' construction (the
    # duplication of COMM_WORLD) must time out instead of waiting forever.
    if MPI.COMM_WORLD.Get_rank() == 1:
        time.sleep(3 * timeout)
        os._exit(0)
    t0 = time.monotonic()
    try:
        Communicator(timeout=timeout)
        print(f"rank {MPI.COMM_WORLD.Get_rank()}: constructed (unexpected)", flush=True)
    except TransportError as exc:
        print(f"rank {MPI.COMM_WORLD.Get_rank()}: TransportError after "
              f"{time.monotonic() - t0:.1f} s: {exc}", flush=True)
    os._exit(0)
if mode.startswith("size_unchecked"):
    # Different sizes with the metadata check off (100k vs 200k elements
    # crashed at a later free: Open MPI wrote past the receive buffer).
    compression = mode.split(":")[1] if ":" in mode else "squinch"
    comm = Communicator(MPI.COMM_WORLD.Dup(), timeout=timeout, check_metadata=False)
    try:
        comm.allreduce(np.ones(100_000 * (1 + comm.rank), np.float32), compression=compression)
        print(f"rank {comm.rank}: returned (unexpected)", flush=True)
    except Exception as exc:
        print(f"rank {comm.rank}: {type(exc).__name__} {exc}", flush=True)
    os._exit(0)
comm = Communicator(MPI.COMM_WORLD.Dup(), timeout=timeout, min_compress_bytes=0)
x = np.ones(10_000, np.float32)
comm.allreduce(x)  # everyone healthy once
if comm.rank == 1:
    if mode == "dies":
        os._exit(3)
    time.sleep(3 * timeout)
    print("rank 1: never arrived", flush=True)
    os._exit(0)
t0 = time.monotonic()
try:
    comm.allreduce(x)
    print(f"rank {comm.rank}: completed (unexpected)", flush=True)
except TransportError as exc:
    print(f"rank {comm.rank}: TransportError after {time.monotonic() - t0:.1f} s: {exc}",
          flush=True)
    # The group is out of step now: a retry must fail at once and say why
    # (it gave an UnpicklingError from the stale exchange).
    t0 = time.monotonic()
    try:
        comm.allreduce(x)
        print(f"retry {comm.rank}: completed (unexpected)", flush=True)
    except TransportError as exc2:
        print(f"retry {comm.rank}: TransportError after {time.monotonic() - t0:.1f} s: {exc2}",
              flush=True)
    except Exception as exc2:
        print(f"retry {comm.rank}: {type(exc2).__name__}: {exc2}", flush=True)
os._exit(0)
