"""Horovod-style compression choices: ``hvd.Compression.none | fp16 | bf16 | squinch | auto``.

Unlike Horovod's compressors, which cast the tensor before an uncompressed
allreduce, these only *name* the wire format: the collective encodes on the
wire and accumulates in fp32 (see :mod:`squinchcomm.collectives`), so the
result keeps the input's dtype and the sum never happens in fp16.

Example:
    >>> import squinchcomm.torch as hvd                            # doctest: +SKIP
    >>> hvd.allreduce(t, compression=hvd.Compression.squinch)      # doctest: +SKIP
    >>> c = hvd.Compression.squinch_with(error_feedback=True, rounding="stochastic")
"""

from __future__ import annotations

from dataclasses import dataclass

from squinchcomm.collectives import CHOICES

__all__ = ["Compression", "WireCompression", "as_compression"]

_ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class WireCompression:
    """A wire format plus the Squinch options that go with it.

    Attributes:
        name: "none", "fp16", "bf16" or "squinch".
        error_feedback: keep per-tensor residuals (None: the communicator's default).
        rounding: "nearest" | "stochastic" (None: the communicator's default).
        hierarchical: reduce uncompressed inside a node first (None: default).
        start_step: optimizer steps that reduce uncompressed before compression
            starts (a warm-up, as PowerSGD's ``start_powerSGD_iter``; 0: from
            the first step).
    """

    name: str
    error_feedback: bool | None = None
    rounding: str | None = None
    hierarchical: bool | None = None
    start_step: int = 0

    def __post_init__(self):
        if self.name not in CHOICES:
            raise ValueError(f"compression {self.name!r}: choose one of {', '.join(CHOICES)}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) \
                or self.start_step < 0:
            raise ValueError(f"start_step={self.start_step!r}: pass the number of uncompressed "
                             "steps before compression starts (an int >= 0)")
        if self.rounding is not None and self.rounding not in _ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r}: choose 'nearest' or 'stochastic'")

    # Horovod's Compressor interface, for code that calls it directly.
    def compress(self, tensor):
        """Horovod's ``Compressor.compress``: return ``(tensor, ctx)``.

        ``fp16``/``bf16`` cast a floating-point tensor to float16/bfloat16
        (``ctx`` is its dtype), as Horovod's ``FP16Compressor`` does; other
        tensors, and ``none``/``squinch`` (whose compression happens on the
        wire, inside the collective), pass through with ``ctx`` None.
        """
        import torch

        wire = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.name)
        if wire is None or not tensor.dtype.is_floating_point:
            return tensor, None
        return tensor.to(wire), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        """Horovod's ``Compressor.decompress``: cast back to ``ctx`` (a dtype from
        :meth:`compress`; None: unchanged)."""
        return tensor if ctx is None else tensor.to(ctx)

    def __repr__(self):
        opts = [f"{k}={getattr(self, k)!r}" for k in ("error_feedback", "rounding", "hierarchical")
                if getattr(self, k) is not None]
        opts += [f"start_step={self.start_step}"] if self.start_step else []
        return f"Compression.{self.name}" + (f"_with({', '.join(opts)})" if opts else "")


class Compression:
    """The compression choices, named like Horovod's ``hvd.Compression``.

    ``none`` uses the engine's own fp32 allreduce; ``fp16``/``bf16`` send 2
    bytes per element and sum in fp32; ``squinch`` sends 0.75 bytes per
    element (6-bit blocks). Tensors smaller than the communicator's
    ``min_compress_bytes`` (64 KiB by default) always go uncompressed.
    ``auto`` sends each message in the fastest of none, bf16 and squinch for
    its size, from the communicator's measured link model
    (:meth:`squinchcomm.Communicator.measure_link`, probed at the first
    ``auto`` call).
    """

    none = WireCompression("none")
    fp16 = WireCompression("fp16")
    bf16 = WireCompression("bf16")
    squinch = WireCompression("squinch")
    auto = WireCompression("auto")

    @staticmethod
    def squinch_with(error_feedback: bool | None = None, rounding: str | None = None,
                     hierarchical: bool | None = None, start_step: int = 0) -> WireCompression:
        """Return Squinch compression with explicit options.

        Args:
            error_feedback: carry each tensor's quantization error into its
                next allreduce (needs ``name=``; the optimizer names its buckets).
            rounding: "nearest" or "stochastic" (unbiased).
            hierarchical: sum inside a node uncompressed, compress across nodes.
            start_step: reduce uncompressed for this many optimizer steps
                first (a warm-up while gradients change fast).

        Returns:
            A :class:`WireCompression` to pass as ``compression=``.

        Example:
            >>> Compression.squinch_with(error_feedback=True, rounding="stochastic")
            Compression.squinch_with(error_feedback=True, rounding='stochastic')
        """
        return WireCompression("squinch", error_feedback, rounding, hierarchical, start_step)

    @staticmethod
    def auto_with(error_feedback: bool | None = None, rounding: str | None = None,
                  hierarchical: bool | None = None, start_step: int = 0) -> WireCompression:
        """``auto`` with the options of :meth:`squinch_with` (they apply to the
        messages ``auto`` sends in Squinch)."""
        return WireCompression("auto", error_feedback, rounding, hierarchical, start_step)


def as_compression(compression) -> WireCompression:
    """Return ``compression`` as a :class:`WireCompression` (also accepts the
    strings "none", "fp16", "bf16", "squinch", "auto" and None for none)."""
    if compression is None:
        return Compression.none
    if isinstance(compression, WireCompression):
        return compression
    if isinstance(compression, str):
        return WireCompression(compression)
    raise ValueError(f"compression={compression!r} is not supported: pass hvd.Compression.none, "
                     ".fp16, .bf16, .squinch, .auto or Compression.squinch_with(...) (custom Horovod "
                     "Compressor classes are not supported)")
