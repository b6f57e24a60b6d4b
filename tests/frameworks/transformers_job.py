"""A 2-process Hugging Face Trainer job on the CPU, under ``torchrun
--nproc-per-node 2``: ``transformers_job.py MODE OUT``.

MODE: ``plain`` (the Trainer), ``squinch`` (SquinchTrainer), ``dropped``
(a SquinchTrainer whose callback registers nothing: the first step must
raise), ``save`` / ``resume`` (a checkpoint at step 3; resumed from it, every
rank has its own residuals back). Each rank writes ``OUT/<mode>.rank<r>.pt``.
"""

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from job_common import finish, record_first_local_grads
from squinchcomm.integrations import CompressionNotActiveError
from squinchcomm.integrations import transformers as sq
from squinchcomm.torch.ddp_hooks import SquinchHookState

MODE, OUT = sys.argv[1], Path(sys.argv[2])


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(),
                                       torch.nn.Linear(256, 64))

    def forward(self, x, labels):
        return {"loss": ((self.net(x) - labels) ** 2).mean()}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(64, 32, generator=g), torch.randn(64, 64, generator=g)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


grads = []


class Grads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())


class NoRegistration(sq._SquinchCallback):
    def on_train_begin(self, *args, **kwargs):  # a framework change: the hook never lands
        pass


steps = 4 if MODE == "resume" else 3
args = TrainingArguments(output_dir=str(OUT / "run"), per_device_train_batch_size=8,
                         max_steps=steps, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                         use_cpu=True, report_to=[], logging_strategy="no",
                         save_strategy="steps" if MODE == "save" else "no", save_steps=3,
                         dataloader_drop_last=True, seed=0, disable_tqdm=True,
                         ddp_find_unused_parameters=False,
                         max_grad_norm=0.0)  # no clipping: the gradients seen are DDP's
state = SquinchHookState(error_feedback=True, min_compress_bytes=0)
model = Net()
local = record_first_local_grads(model.parameters())
if MODE == "plain":
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Grads()])
else:
    trainer = sq.SquinchTrainer(model=model, args=args, train_dataset=Data(), callbacks=[Grads()],
                                hook_state=state)
    if MODE == "dropped":
        trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                              if not isinstance(c, sq._SquinchCallback)]
        trainer.add_callback(NoRegistration(trainer))
result = {}
try:
    if MODE == "resume":
        checkpoint = str(OUT / "run" / "checkpoint-3")
        trainer.hook_state = state
        seen = {}

        class Peek(TrainerCallback):
            def on_train_begin(self, *a, **k):
                seen["state"] = state.state_dict()

        trainer.add_callback(Peek())
        trainer.train(resume_from_checkpoint=checkpoint)
        result["restored"] = seen["state"]
    else:
        trainer.train()
except CompressionNotActiveError as e:
    result["raised"] = str(e)
if MODE == "save":
    result["saved"] = state.state_dict()
finish(result, state, grads, [p.detach().clone() for p in model.parameters()],
       OUT / f"{MODE}.rank{trainer.args.process_index}.pt", local=local)
