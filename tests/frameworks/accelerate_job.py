"""A 2-process Accelerate job on the CPU, under ``torchrun --nproc-per-node 2``:
``accelerate_job.py MODE OUT``.

MODE: ``plain`` (no hook), ``squinch`` (``register`` after ``prepare``),
``unprepared`` (``register`` given the model before ``prepare``: refused),
``dropped`` (the hook registered on a DDP that does not train: the first step
must raise), ``save`` / ``resume`` (``save_state`` after 3 steps; after
``load_state`` every rank has its own residuals back). Each rank writes
``OUT/<mode>.rank<r>.pt``.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from job_common import finish, record_first_local_grads
from squinchcomm.integrations import CompressionNotActiveError
from squinchcomm.integrations.accelerate import register
from squinchcomm.torch.ddp_hooks import SquinchHookState

MODE, OUT = sys.argv[1], Path(sys.argv[2])
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
local = record_first_local_grads(model.parameters())
g = torch.Generator().manual_seed(1)
ds = torch.utils.data.TensorDataset(torch.randn(64, 32, generator=g), torch.randn(64, 64, generator=g))
loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
state = SquinchHookState(error_feedback=True, min_compress_bytes=0)
result = {}
if MODE == "unprepared":
    try:
        register(accelerator, model, optimizer, state)
        result["raised"] = None
    except ValueError as e:
        result["raised"] = str(e)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
if MODE == "dropped":  # the hook on another DDP: the trained one reduces uncompressed
    other = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    register(accelerator, other, optimizer, state)
elif MODE not in ("plain", "unprepared"):
    register(accelerator, model, optimizer, state)
if MODE == "resume":
    accelerator.load_state(str(OUT / "state"))
    result["restored"] = state.state_dict()
grads = []
try:
    for step, (x, y) in enumerate(loader):
        if step == (1 if MODE == "resume" else 3):
            break
        optimizer.zero_grad()
        accelerator.backward(((model(x) - y) ** 2).mean())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        optimizer.step()
except CompressionNotActiveError as e:
    result["raised"] = str(e)
if MODE == "save":
    accelerator.save_state(str(OUT / "state"))
    result["saved"] = state.state_dict()
finish(result, state, grads, [p.detach().clone() for p in model.parameters()],
       OUT / f"{MODE}.rank{accelerator.process_index}.pt", local=local)
