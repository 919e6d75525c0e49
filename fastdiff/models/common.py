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


# ---------------------------------------------------------------------------------------------
# input checks shared by the zoo's forwards (cheap: shapes and dtypes; one host read of the labels' range)
# ---------------------------------------------------------------------------------------------


def _values_readable(t: torch.Tensor) -> bool:
    """Whether reading values of ``t`` on the host is allowed now: not while tracing, compiling, exporting
    or capturing a CUDA graph, nor on meta or fake tensors."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or t.device.type == "meta":
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(t, FakeTensor)


def label_table_size(model: nn.Module) -> int | None:
    """The number of rows of a zoo model's label embedding (valid labels are ``0 .. rows - 1``, the null
    label of classifier-free guidance included), or None for an unconditional model."""
    for attr in ("label_emb", "class_embedding"):
        emb = getattr(model, attr, None)
        if isinstance(emb, nn.Embedding):
            return emb.num_embeddings
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    return table.num_embeddings if isinstance(table, nn.Embedding) else None


def check_labels(y, n: int, rows: int, name: str = "y", null_label: int | None = None) -> torch.Tensor:
    """Class labels as an int64 tensor of shape (n,) with values in [0, rows); ValueError naming ``name``
    otherwise. The range needs one host read of (min, max), skipped while tracing, compiling or capturing
    a CUDA graph (where an out-of-range index would fail inside the embedding)."""
    null = f", {null_label} being the null label" if null_label is not None else ""
    allowed = f"integers in [0, {rows - 1}]{null}"
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor of shape ({n},) holding class labels ({allowed}), "
                         f"got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must be an integer tensor of class labels ({allowed}), got dtype {y.dtype}")
    if tuple(y.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one class label per sample), got {tuple(y.shape)}")
    if n and _values_readable(y):
        lo, hi = torch.stack(torch.aminmax(y.detach())).tolist()  # one host read
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must hold class labels in [0, {rows - 1}]{null}; got {bad}")
    return y if y.dtype == torch.int64 else y.to(torch.int64)


def check_image(x, name: str, channels: int, dims: int = 2, multiple: int = 1,
                size: tuple | None = None) -> None:
    """``x`` must be a floating tensor (N, channels, *spatial) with ``dims`` spatial sizes, each a multiple
    of ``multiple`` (a U-Net's downsamplings) or equal to ``size``; ValueError naming ``name`` otherwise."""
    spatial = ", ".join(("H", "W") if dims == 2 else [f"S{i}" for i in range(dims)])
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (N, {channels}, {spatial}), got {type(x).__name__}")
    if x.dim() != dims + 2 or x.shape[1] != channels:
        want = f"(N, {channels}, {', '.join(map(str, size))})" if size else f"(N, {channels}, {spatial})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    got = tuple(x.shape[2:])
    halved = got if dims < 3 else got[1:]  # 3-D U-Nets (guided-diffusion) keep the first axis whole
    if size is not None and got != tuple(size):
        raise ValueError(f"{name} must have shape (N, {channels}, {', '.join(map(str, size))}) (this model's "
                         f"resolution), got {tuple(x.shape)}")
    if multiple > 1 and any(s % multiple for s in halved):
        raise ValueError(f"{name} must have spatial sizes that are multiples of {multiple} (the model "
                         f"downsamples by {multiple}), got {tuple(x.shape)}")
