"""An MPI job in which one rank never arrives at a collective (or dies).

    mpirun -n 3 python tests/mpi/fault_job.py {absent|dies} TIMEOUT

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
os._exit(0)
