"""A model whose gradients are exact on every device, for device-parity tests.

loss = sum_i <p_i, c_i> gives p_i.grad = c_i bit for bit on the CPU and on a
GPU, so the only thing that can differ between a CPU and a CUDA run is the
library's reduction of those gradients.
"""

SIZES = (5000, 3, 20000, 77)  # float32 parameters: several 40 kB buckets


def exact_model(torch, device):
    """A module with one parameter per entry of SIZES; ``forward(cs)`` = sum_i <p_i, c_i>."""

    class Exact(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(n)) for n in SIZES)

        def forward(self, cs):
            return sum((p * c).sum() for p, c in zip(self.ps, cs))

    return Exact().to(device)


def exact_grads(torch, step: int, rank: int, device):
    """The gradients of step ``step`` on rank ``rank`` (magnitudes 1e3 .. 1e0)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return [(torch.randn(n, generator=g) * 10.0 ** (3 - i)).to(device)
            for i, n in enumerate(SIZES)]
