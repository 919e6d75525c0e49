"""What every zoo model shares: counting its multiply-accumulates."""

from __future__ import annotations

import torch
from torch import nn

import fastdiff.ops  # noqa: F401  (registers torch.ops.fastdiff.*)


def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = q_shape
    skv, dv = k_shape[2], v_shape[3]
    return 2 * b * h * sq * skv * (d + dv)  # q k^T and p v, 2 FLOPs per multiply-add


_flop_formulas_registered = False


def _register_flop_formulas() -> None:
    """Teach FlopCounterMode fastdiff's attention op, on the first count: torch.utils.flop_counter
    imports Triton (0.15 s), so ``import fastdiff`` does not import it."""
    global _flop_formulas_registered
    if not _flop_formulas_registered:
        from torch.utils.flop_counter import register_flop_formula

        register_flop_formula(torch.ops.fastdiff.attention)(_attention_flops)
        _flop_formulas_registered = True


class ZooModule(nn.Module):
    """Base of the zoo's models: ``macs(batch)`` and ``flops(batch)`` (flops = 2 * macs; DiT's paper
    reports MACs as "Gflops"). A model defines ``example_inputs(batch) -> dict`` of forward kwargs."""

    def example_inputs(self, batch: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define example_inputs(batch)")

    @torch.no_grad()
    def flops(self, batch: int = 1) -> int:
        """Matmul, convolution and attention FLOPs of one forward at this batch size (counted by
        running it once on example inputs under torch's FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        _register_flop_formulas()
        inputs = self.example_inputs(batch)
        counter = FlopCounterMode(display=False)
        with counter:
            self(**inputs)
        return int(counter.get_total_flops())

    def macs(self, batch: int = 1) -> int:
        return self.flops(batch) // 2
