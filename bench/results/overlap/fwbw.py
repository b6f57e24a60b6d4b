"""The compute bound of the overlap measurement: forward and backward time of
the train benchmark's model (TinyGPT 2x512, seq 128) on one thread, as each
rank runs it.  python bench/results/overlap/fwbw.py"""
import statistics
import time

import torch

from squinchcomm.models.tinygpt import GPTConfig, TinyGPT

torch.set_num_threads(1)
for batch in (4, 8):
    model = TinyGPT(GPTConfig(n_layer=2, n_embd=512, n_head=8, block_size=128))
    x = torch.randint(0, 256, (batch, 128), generator=torch.Generator().manual_seed(0))
    forward, backward = [], []
    for i in range(8):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        model.zero_grad()
        if i >= 2:  # two warm-up passes
            forward.append(t1 - t0)
            backward.append(t2 - t1)
    print(f"batch {batch}: forward {1e3 * statistics.median(forward):.0f} ms  "
          f"backward {1e3 * statistics.median(backward):.0f} ms (1 thread, median of 6)")
