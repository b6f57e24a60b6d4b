"""A 2-process Lightning job on the CPU (Lightning's own launcher re-runs this
script for rank 1): ``python lightning_job.py MODE OUT``.

MODE: ``plain`` (Lightning's DDPStrategy, no hook), ``squinch``
(SquinchDDPStrategy), ``dropped`` (a SquinchDDPStrategy whose registration is
Lightning's own CUDA-only one: the first step must raise), ``save`` /
``resume`` (a checkpoint after 3 steps; resumed, every rank gets its own
residuals back), ``torchrun`` (``squinch``, started by torchrun instead),
``spawn`` (``squinch`` with ``start_method="spawn"``: the launching process
does not train, so each worker saves from a callback), ``fsdp2``
(ModelParallelStrategy, fully_shard in configure_model, SquinchFSDP),
``fsdp2_save`` / ``fsdp2_resume`` (its checkpoint and the residuals back).
Each rank writes ``OUT/<mode>.rank<r>.pt``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from job_common import finish, record_first_local_grads
from squinchcomm.integrations import CompressionNotActiveError
from squinchcomm.integrations.lightning import SquinchDDPStrategy, SquinchFSDP
from squinchcomm.torch.ddp_hooks import SquinchHookState

MODE, OUT = sys.argv[1], Path(sys.argv[2])


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(),
                                       torch.nn.Linear(256, 64))
        self.grads, self.local = [], None

    def on_train_start(self):  # in the process that trains (a spawn worker has its own copy)
        if not MODE.startswith("fsdp2"):
            self.local = record_first_local_grads(self.parameters())

    def training_step(self, batch, _):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def on_after_backward(self):  # DDP has reduced every bucket by now
        if not MODE.startswith("fsdp2"):  # (FSDP2's gradients are sharded DTensors)
            self.grads.append(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_model(self):
        if MODE.startswith("fsdp2"):  # Lightning's FSDP2 recipe: each layer, then the model
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)


def data():
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 32, generator=g),
                                        torch.randn(64, 64, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


class CudaOnly(SquinchDDPStrategy):
    _register_ddp_hooks = DDPStrategy._register_ddp_hooks  # Lightning's: CUDA only


class SaveFromWorker(L.Callback):
    def on_train_end(self, trainer, pl_module):
        st = trainer.strategy.hook_state
        torch.save({"buckets_reduced": st.buckets_reduced, "wire_bytes": st.wire_bytes,
                    "uncompressed_bytes": st.uncompressed_bytes, "grads": pl_module.grads,
                    "local": pl_module.local,
                    "params": [p.detach().clone() for p in pl_module.parameters()]},
                   OUT / f"{MODE}.rank{trainer.global_rank}.pt")


def trainer(strategy, steps):
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)


def main():
    state = SquinchHookState(error_feedback=True, min_compress_bytes=0)
    module = Net()
    result = {}
    if MODE == "spawn":
        t = trainer(SquinchDDPStrategy(hook_state=state, start_method="spawn"), 3)
        t.callbacks.append(SaveFromWorker())
        t.fit(module, data())
        return
    if MODE.startswith("fsdp2"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        callback = SquinchFSDP(error_feedback=True, min_compress_bytes=0)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        t = trainer(strategy, 4 if MODE == "fsdp2_resume" else 3)
        t.callbacks.append(callback)
        seen = {}

        class Peek(L.Callback):
            def on_train_start(self, trainer, pl_module):  # after the checkpoint is loaded
                seen["state"] = callback.state.state_dict()

        t.callbacks.append(Peek())
        t.fit(module, data(), ckpt_path=str(OUT / "fsdp_ckpt") if MODE == "fsdp2_resume" else None)
        if MODE == "fsdp2_save":
            t.save_checkpoint(str(OUT / "fsdp_ckpt"))
            result["saved"] = callback.state.state_dict()
        result["restored"] = seen["state"]
        state = callback.state
        result["units"] = list(state.units)
    else:
        strategy = {"plain": lambda: DDPStrategy(),
                    "dropped": lambda: CudaOnly(hook_state=state)}.get(
            MODE, lambda: SquinchDDPStrategy(hook_state=state))()
        if MODE == "dropped":
            try:
                trainer(strategy, 2).fit(module, data())
                result["raised"] = None
            except CompressionNotActiveError as e:
                result["raised"] = str(e)
        elif MODE == "resume":
            t = trainer(strategy, 4)
            seen = {}

            class Peek(L.Callback):
                def on_train_start(self, trainer, pl_module):  # after the checkpoint is loaded
                    seen["state"] = state.state_dict()

            t.callbacks.append(Peek())
            t.fit(module, data(), ckpt_path=str(OUT / "ckpt.ckpt"))
            result["restored"] = seen["state"]
        else:
            t = trainer(strategy, 3)
            t.fit(module, data())
            if MODE == "save":
                t.save_checkpoint(str(OUT / "ckpt.ckpt"))
                result["saved"] = state.state_dict()
    params = [getattr(p, "full_tensor", p.detach)().detach().clone() for p in module.parameters()]
    finish(result, state, module.grads, params, OUT / f"{MODE}.rank{strategy.global_rank}.pt",
           local=module.local, children=getattr(strategy.launcher, "procs", ()))


if __name__ == "__main__":
    main()
