"""ONNX export of the zoo models and of one whole sampling step, in standard ONNX only.

``to_onnx(model_or_denoiser, path, example_batch=2, dynamic_batch=True, opset=DEFAULT_OPSET)`` exports a
model's forward ``(x, timesteps[, y]) -> out`` through ``torch.onnx.export(..., dynamo=True,
custom_translation_table=...)``: each fastdiff op is written out as default-domain ONNX ops by an
onnxscript function (:func:`translation_table`), so any execution provider runs the graph (no contrib
``GroupNorm``, onnxruntime#20661).

``step_to_onnx(denoiser, sampler, path, ...)`` exports one row of a sampler table as a single graph:
``(x, timestep, c_in, coef, history, noise[, y, guidance_scale]) -> (x_next, history_next)``, that is the
model call (on the doubled batch ``[cond; uncond]`` under classifier-free guidance), the guidance and the
fused update of :func:`fastdiff.ops.sampler_step_reference`, written functionally (the ring comes back as
a new tensor instead of being written in place). A whole sampling loop in ONNX Runtime is then one
session run per table row (:mod:`fastdiff.export.ort`).

Lowerings, chosen by timing ONNX Runtime 1.31 on the CPU (2 shared cores, interleaved runs, median of 6):

- ``group_norm_modulate``: ``InstanceNormalization`` over ``(N, G, C/G * spatial)``, then the affine,
  the per-sample modulation and SiLU as Mul/Add/Sigmoid. DDPM-CIFAR10 U-Net, batch 8: 3.83 s per forward,
  against 3.95 s for ReduceMean/Sub/Sqrt basic ops and 3.96 s for GroupNormalization-21 (within noise of
  each other; all three are standard ONNX and selectable with ``group_norm=``). onnxscript's pattern
  rewriter gave nothing (4.19 s) and took half of the export time, so it is not run.
- ``layer_norm_modulate``: ``LayerNormalization`` (opset 17) then ``* (1 + scale) + shift``;
- ``qk_norm_rope``: ``ReduceMean`` of the squares, ``Sqrt``, ``Div`` and the weight in float32, then the pair
  rotation as Reshape to (..., D/2, 2), two Slices, Neg, Concat and two Mul-Adds with cos/sin (under
  export the ``out=`` form is the functional op and a copy into the caller's views);
- ``attention``: ``MatMul -> Softmax -> MatMul`` with the scale split as ``sqrt(scale)`` on q and k. DiT-S/2
  at 256 px, batch 4: 1.585 s against 1.579 s for the opset-23 ``Attention`` op (``attention="attention"``),
  a tie, so the lowering that every opset >= 17 and every execution provider runs is the default.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from fastdiff import ops
from fastdiff.io import check_output_path
from fastdiff.model_cache import run_copy
from fastdiff.models.common import label_table_size
from fastdiff.samplers import (
    COL_A,
    COL_B0,
    COL_C,
    COL_E,
    COL_F,
    COL_G,
    COL_LV_HI,
    COL_LV_LO,
    COL_P,
    COL_Q,
    COL_SLOTS,
    COL_WRITE,
)

__all__ = ["DEFAULT_OPSET", "translation_table", "to_onnx", "step_to_onnx", "check_standard_onnx",
           "read_metadata"]

DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization
_LABEL_KEYS = ("y", "class_labels")


# ---------------------------------------------------------------------------------------------
# fastdiff ops -> standard ONNX (onnxscript functions for torch.onnx's custom_translation_table)
# ---------------------------------------------------------------------------------------------


def translation_table(opset: int = DEFAULT_OPSET, group_norm: str = "instance_norm",
                      attention: str = "matmul") -> dict:
    """``{torch.ops.fastdiff.NAME.default: onnxscript function}`` writing each op as default-domain ops.

    ``group_norm``: ``"instance_norm"`` (InstanceNormalization over (N, G, -1)), ``"basic"`` (ReduceMean,
    Sub, Mul, Sqrt) or ``"group_norm"`` (GroupNormalization, opset >= 21). ``attention``: ``"matmul"``
    (MatMul, Softmax, MatMul) or ``"attention"`` (the Attention op, opset >= 23).
    """
    import onnxscript

    if group_norm not in ("instance_norm", "basic", "group_norm"):
        raise ValueError(f"group_norm must be 'instance_norm', 'basic' or 'group_norm', got {group_norm!r}")
    if attention not in ("matmul", "attention"):
        raise ValueError(f"attention must be 'matmul' or 'attention', got {attention!r}")
    if group_norm == "group_norm" and opset < 21:
        raise ValueError(f"group_norm='group_norm' needs opset >= 21 (GroupNormalization-18 fails the "
                         f"checker), got opset={opset}")
    if attention == "attention" and opset < 23:
        raise ValueError(f"attention='attention' needs opset >= 23, got opset={opset}")
    op = getattr(onnxscript, f"opset{opset}")

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def group_norm_modulate(x, num_groups: int, weight=None, bias=None, scale=None, shift=None, pre_shift=None,
                            eps: float = 1e-5, activation: Optional[str] = None,
                            backend: Optional[str] = None):
        flat = op.Concat(op.Shape(x, start=0, end=2), op.Constant(value_ints=[-1]), axis=0)  # [N, C, -1]
        out_shape = op.Shape(x)
        if pre_shift is not None:  # x + pre_shift[n, c] before the statistics, as (N, C, S)
            x = op.Add(op.Reshape(x, flat), op.Reshape(pre_shift, op.Constant(value_ints=[0, 0, 1])))
        if group_norm == "group_norm":
            c = op.Shape(x, start=1, end=2)
            w = weight if weight is not None else op.Expand(op.CastLike(1.0, x), c)
            b = bias if bias is not None else op.Expand(op.CastLike(0.0, x), c)
            z = op.Reshape(first(op.GroupNormalization(x, op.CastLike(w, x), op.CastLike(b, x), epsilon=eps,
                                                       num_groups=num_groups, stash_type=1)), flat)
        else:
            xg = op.Reshape(x, op.Constant(value_ints=[0, num_groups, -1]))  # (N, G, C/G * S)
            if group_norm == "instance_norm":
                ones = op.Expand(op.CastLike(1.0, x), op.Constant(value_ints=[num_groups]))
                zeros = op.Expand(op.CastLike(0.0, x), op.Constant(value_ints=[num_groups]))
                xhat = op.InstanceNormalization(xg, ones, zeros, epsilon=eps)
            else:
                axes = op.Constant(value_ints=[2])
                d = op.Sub(xg, op.ReduceMean(xg, axes, keepdims=1))
                var = op.ReduceMean(op.Mul(d, d), axes, keepdims=1)
                xhat = op.Div(d, op.Sqrt(op.Add(var, op.CastLike(eps, x))))
            z = op.Reshape(xhat, flat)  # (N, C, S)
            col = op.Constant(value_ints=[-1, 1])
            if weight is not None:
                z = op.Mul(z, op.Reshape(op.CastLike(weight, x), col))
            if bias is not None:
                z = op.Add(z, op.Reshape(op.CastLike(bias, x), col))
        per_sample = op.Constant(value_ints=[0, 0, 1])
        if scale is not None:
            z = op.Mul(z, op.Add(op.Reshape(scale, per_sample), op.CastLike(1.0, x)))
        if shift is not None:
            z = op.Add(z, op.Reshape(shift, per_sample))
        if activation == "silu":
            z = op.Mul(z, op.Sigmoid(z))
        return op.Reshape(z, out_shape)

    def layer_norm_modulate(x, scale=None, shift=None, weight=None, bias=None, eps: float = 1e-6,
                            backend: Optional[str] = None):
        if weight is not None:
            w = op.CastLike(weight, x)
        else:
            w = op.Expand(op.CastLike(1.0, x), op.Shape(x, start=-1))
        if bias is not None:
            z = op.LayerNormalization(x, w, op.CastLike(bias, x), axis=-1, epsilon=eps, stash_type=1)
        else:
            z = op.LayerNormalization(x, w, axis=-1, epsilon=eps, stash_type=1)
        z = first(z)  # traced multi-output ops return (Y, Mean, InvStdDev)
        axis1 = op.Constant(value_ints=[1])
        if scale is not None:
            z = op.Mul(z, op.Add(op.Unsqueeze(scale, axis1), op.CastLike(1.0, x)))
        if shift is not None:
            z = op.Add(z, op.Unsqueeze(shift, axis1))
        return z

    def attention_fn(q, k, v, scale: float, backend: str, bias=None):
        # ORT 1.31's Attention-23 kernel takes only scale > 0 and a mask with the full query length:
        # other cases take the MatMul lowering
        if attention == "attention" and scale > 0 and bias is None:
            out = first(op.Attention(q, k, v, scale=scale))
        else:
            kt = op.Transpose(k, perm=[0, 1, 3, 2])
            if scale > 0:  # split as sqrt(scale) on q and k, so neither product grows by the full scale
                root = op.CastLike(math.sqrt(scale), q)
                s = op.MatMul(op.Mul(q, root), op.Mul(kt, root))
            else:
                s = op.Mul(op.MatMul(q, kt), op.CastLike(scale, q))
            if bias is not None:
                s = op.Add(s, op.CastLike(bias, s))
            p = op.Softmax(s, axis=-1)
            if bias is not None:  # a row with every key masked (-inf) is 0 in fastdiff, NaN in Softmax
                p = op.Where(op.IsNaN(p), op.CastLike(0.0, p), p)
            out = op.MatMul(p, v)
        lse = op.ConstantOfShape(op.Constant(value_ints=[0]))  # the (0,) float32 placeholder of the op
        return out, lse

    def qk_norm_rope(q, k, q_weight=None, k_weight=None, cos=None, sin=None, eps: float = 1e-6,
                     backend: Optional[str] = None):
        float32 = 1  # onnx.TensorProto.FLOAT: statistics and rotation in float32, as the op

        def norm_rope(x, weight):
            xf = op.Cast(x, to=float32)
            sq = op.Mul(xf, xf)
            if opset >= 18:
                ms = op.ReduceMean(sq, op.Constant(value_ints=[-1]), keepdims=1)
            else:
                ms = op.ReduceMean(sq, axes=[-1], keepdims=1)
            y = op.Div(xf, op.Sqrt(op.Add(ms, op.Constant(value_float=eps))))
            if weight is not None:
                y = op.Mul(y, op.Cast(weight, to=float32))
            if cos is not None:  # pairs (y0, y1) -> (y0 c - y1 s, y1 c + y0 s)
                pairs = op.Reshape(y, op.Constant(value_ints=[0, 0, 0, -1, 2]))
                even = op.Slice(pairs, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]),
                                op.Constant(value_ints=[4]))
                odd = op.Slice(pairs, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]),
                               op.Constant(value_ints=[4]))
                rotated = op.Reshape(op.Concat(op.Neg(odd), even, axis=4), op.Shape(y))
                y = op.Add(op.Mul(y, op.Cast(cos, to=float32)), op.Mul(rotated, op.Cast(sin, to=float32)))
            return op.CastLike(y, x)

        return norm_rope(q, q_weight), norm_rope(k, k_weight)

    return {
        torch.ops.fastdiff.group_norm_modulate.default: group_norm_modulate,
        torch.ops.fastdiff.layer_norm_modulate.default: layer_norm_modulate,
        torch.ops.fastdiff.attention.default: attention_fn,
        torch.ops.fastdiff.qk_norm_rope.default: qk_norm_rope,
    }


# ---------------------------------------------------------------------------------------------
# What is exported: the model's forward with fixed input names, and one sampling step
# ---------------------------------------------------------------------------------------------


def _unwrap(out):
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _split(model_or_denoiser):
    """(model, denoiser or None) from a zoo model, any nn.Module, or a fastdiff Denoiser."""
    from fastdiff.denoiser import Denoiser

    if isinstance(model_or_denoiser, Denoiser):
        model = model_or_denoiser.model
        if not isinstance(model, nn.Module):
            raise ValueError(f"the Denoiser's model must be an nn.Module to export, got "
                             f"{type(model).__name__}")
        return _exportable(model), model_or_denoiser
    if isinstance(model_or_denoiser, nn.Module):
        return _exportable(model_or_denoiser), None
    raise ValueError(f"model_or_denoiser must be an nn.Module or a fastdiff Denoiser, got "
                     f"{type(model_or_denoiser).__name__}")


def _exportable(model: nn.Module) -> nn.Module:
    """``model``, after checking that ONNX's default domain can hold its weights: bfloat16 weights cannot be
    ``Conv`` inputs there (its types are float16, float32, float64), so the export would fail in the checker
    after all its work."""
    found = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.bfloat16 in found:
        raise ValueError("model_or_denoiser: the model's weights are bfloat16, which ONNX's standard Conv does "
                         "not take (float16, float32 or float64); export a float32 copy (copy.deepcopy(model)"
                         ".float()), and run it in ONNX Runtime in float32 or float16")
    return model


def _example_inputs(model: nn.Module, batch: int, input_shape: Optional[Sequence[int]]) -> tuple:
    """(x, timesteps float32, label key or None, labels or None) for an example batch; ``input_shape``
    (C, ...) replaces the model's own example size."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if hasattr(model, "example_inputs"):
        inputs = dict(model.example_inputs(batch))
        x = inputs.pop("x")
        t = next(v for k, v in inputs.items() if k not in _LABEL_KEYS)
        label_key = next((k for k in _LABEL_KEYS if k in inputs), None)
        y = inputs.get(label_key) if label_key is not None else None
    elif input_shape is None:
        raise ValueError(f"{type(model).__name__} has no example_inputs(batch): pass input_shape=(C, H, W)")
    else:
        x, t, label_key, y = None, torch.full((batch,), 500.0, device=device), None, None
        if _num_classes(model) is not None:
            label_key = "class_labels" if hasattr(model, "class_embedding") else "y"
            y = torch.zeros(batch, dtype=torch.int64, device=device)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if x is not None and len(shape) != x.dim() - 1:
            raise ValueError(f"input_shape must be (C, ...) of rank {x.dim() - 1} for this model, "
                             f"got {shape}")
        x = torch.randn(batch, *shape, dtype=dtype, device=device)
    return x, t.to(torch.float32), label_key, y


def _num_classes(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_classes", None)
    if n is None and getattr(model, "class_embedding", None) is not None:
        n = model.config.get("num_class_embeds") if isinstance(getattr(model, "config", None), dict) else None
    if n is None or (isinstance(n, int) and n <= 0):
        return None
    return int(n)


def default_y_null(model: nn.Module, denoiser=None) -> Optional[int]:
    """The null label of classifier-free guidance: a ``y_null`` attribute of the denoiser or the model,
    else DiT's extra embedding row (``num_classes``) or U-ViT's last class (``num_classes - 1``), else
    None (ADM and DDPM as released have none)."""
    from fastdiff.models import DiT, UViT

    for owner in (denoiser, model):
        value = getattr(owner, "y_null", None) if owner is not None else None
        if value is not None:
            return int(value)
    if isinstance(model, DiT):  # DiT appends its null row after the classes
        return _num_classes(model)
    if isinstance(model, UViT) and _num_classes(model):  # U-ViT's configs count the null class: 1001, null 1000
        return _num_classes(model) - 1
    return None


class _ModelGraph(nn.Module):
    """``(x, timesteps[, y]) -> out``: the zoo model's forward with the graph's input names."""

    def __init__(self, model: nn.Module, label_key: Optional[str]):
        super().__init__()
        self.model, self.label_key = model, label_key

    def forward(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if self.label_key is None or y is None:
            return _unwrap(self.model(x, timesteps))
        return _unwrap(self.model(x, timesteps, **{self.label_key: y}))


class _StepGraph(nn.Module):
    """One row of a sampler table, functionally: the model, guidance and the update in one graph.

    Inputs: ``x`` (N, ...) state; ``timestep`` () model timestep; ``c_in`` () model input scale; ``coef``
    (11 + S,) the packed row (fastdiff.samplers.pack_table); ``history`` (S, N, ...); ``noise`` (N, ...);
    ``y`` (N,) labels; ``guidance_scale`` (). Outputs ``(x_next, history_next)``. The math is
    :func:`fastdiff.ops.sampler_step_reference` with one row for the whole batch.
    """

    def __init__(self, model: nn.Module, label_key: Optional[str], num_slots: int, *, guided: bool,
                 y_null: Optional[int], learned_sigma: bool, learned_range: bool, clip_x0: Optional[float],
                 timestep_offset: int = 0):
        super().__init__()
        self.model = _ModelGraph(model, label_key)
        self.timestep_offset = timestep_offset  # the network's timestep minus the table's (U-ViT latent: 1)
        self.num_slots, self.guided, self.y_null = num_slots, guided, y_null
        self.learned_sigma, self.learned_range, self.clip_x0 = learned_sigma, learned_range, clip_x0

    def forward(self, x: Tensor, timestep: Tensor, c_in: Tensor, coef: Tensor, history: Tensor, noise: Tensor,
                y: Optional[Tensor] = None, guidance_scale: Optional[Tensor] = None):
        n, ch = x.shape[0], x.shape[1]
        x_in = x * c_in.to(x.dtype)
        t = timestep.to(torch.float32).reshape(1).expand(n) + self.timestep_offset
        if self.guided:
            y2 = None
            if y is not None:
                y2 = torch.cat([y, torch.full_like(y, self.y_null)])
            out = self.model(torch.cat([x_in, x_in]), torch.cat([t, t]), y2)
            cond_all, uncond_all = out[:n], out[n:]
        else:
            cond_all, uncond_all = self.model(x_in, t, y), None
        var = cond_all[:, ch:] if self.learned_sigma else None
        m = (cond_all[:, :ch] if self.learned_sigma else cond_all).to(torch.float32)
        if uncond_all is not None:
            u = (uncond_all[:, :ch] if self.learned_sigma else uncond_all).to(torch.float32)
            m = u + guidance_scale.to(torch.float32) * (m - u)
        cf = coef.to(torch.float32)
        xf = x.to(torch.float32)
        x0 = cf[COL_P] * xf + cf[COL_Q] * m
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        h = cf[COL_E] * xf + cf[COL_F] * x0
        out = cf[COL_A] * xf + cf[COL_G] * m + cf[COL_B0] * h
        for s in range(self.num_slots):
            out = out + cf[COL_SLOTS + s] * history[s].to(torch.float32)
        c = cf[COL_C]
        if self.learned_range and var is not None:
            frac = (var.to(torch.float32) + 1) * 0.5
            c = c * torch.exp(0.5 * (cf[COL_LV_LO] + frac * (cf[COL_LV_HI] - cf[COL_LV_LO])))
        out = out + c * noise.to(torch.float32)
        write = cf[COL_WRITE]
        slots = torch.arange(self.num_slots, device=x.device, dtype=torch.float32)
        keep = (slots != write).reshape((self.num_slots,) + (1,) * x.dim())
        history_next = torch.where(keep, history, h.to(history.dtype).unsqueeze(0))
        return out.to(x.dtype), history_next


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= 23:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, 23] (LayerNormalization needs 17), "
                         f"got {opset!r}")
    return opset


def _check_batch(example_batch) -> int:
    if isinstance(example_batch, bool) or not isinstance(example_batch, int) or example_batch < 1:
        raise ValueError(f"example_batch must be a positive int, got {example_batch!r}")
    return example_batch


def _export(module: nn.Module, args: tuple, kwargs: dict, path, *, input_names, output_names, dynamic_shapes,
            opset: int, metadata: dict, group_norm: str, attention: str, external_data: Optional[bool]):
    import onnx

    from fastdiff.io import atomic_files

    path = check_output_path(path, "path")
    table = translation_table(opset, group_norm=group_norm, attention=attention)
    with torch.no_grad(), ops.backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, custom_translation_table=table,
                                    optimize=False, verbose=False, report=False)
        _optimize(program.model)
    for key, value in metadata.items():
        program.model.metadata_props[f"fastdiff.{key}"] = json.dumps(value)
    # the graph is checked before anything is written; weights above ~2 GB (protobuf's limit) or when
    # asked go to path + ".data" (the exporter's own large-model rule decides when external_data is None)
    check_standard_onnx(_graph_only_proto(program.model))
    # written and checked in a staging folder under the final names (the graph names its data file
    # relative to itself), then moved into place: a failed save or check leaves the old files intact
    with atomic_files(path, argument="path") as staged:
        program.save(staged, external_data=bool(external_data))
        onnx.checker.check_model(staged, full_check=True)
    return path


def _graph_only_proto(model):
    """The model as a ModelProto without its weights (for the domain check of a model of any size)."""
    import onnx_ir as ir

    saved = dict(model.graph.initializers)
    model.graph.initializers.clear()
    try:
        return ir.serde.serialize_model(model)
    finally:
        model.graph.initializers.update(saved)


def _optimize(model) -> None:
    """The exporter's clean-up passes (inline, constant folding, dead code, CSE) without onnxscript's
    pattern rewriter, which took half of the export time of a small U-Net and gave ONNX Runtime nothing it
    does not do itself at session creation (measured: same CPU run time)."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import _constant_folding

    ir.passes.Sequential(
        common.InlinePass(),
        _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                            output_size_limit=262144),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def check_standard_onnx(model) -> None:
    """Raise ValueError if any node (or function) of ``model`` lies outside the default ONNX domain."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    bad = set()

    def walk(graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                bad.add(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        bad.add(f"function {fn.domain}::{fn.name}")
    if bad:
        raise ValueError(f"the exported graph holds nodes outside the default ONNX domain: {sorted(bad)}")


def read_metadata(path_or_model) -> dict:
    """The ``fastdiff.*`` metadata of an exported graph as a dict (keys without the prefix)."""
    import onnx

    model = path_or_model
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    return {p.key[len("fastdiff."):]: json.loads(p.value) for p in model.metadata_props
            if p.key.startswith("fastdiff.")}


def _model_metadata(model: nn.Module, denoiser, x: Tensor, label_key, batch, dynamic_batch) -> dict:
    meta: dict[str, Any] = {
        "model": type(model).__name__,
        "input_shape": list(x.shape[1:]),
        "dtype": str(x.dtype).replace("torch.", ""),
        "batch": None if dynamic_batch else batch,
        "conditional": label_key is not None,
        "num_classes": _num_classes(model),
        "num_labels": label_table_size(model) if label_key is not None else None,  # valid labels: 0 .. n - 1
        "y_null": default_y_null(model, denoiser),
    }
    if denoiser is not None:
        meta.update(prediction=denoiser.prediction, learned_sigma=denoiser.learned_sigma)
        # what fastdiff.load needs to rebuild the Denoiser from the graph alone
        meta.update(schedule=_schedule_metadata(denoiser.schedule), classes=getattr(denoiser, "num_classes", None),
                    default_guidance_scale=getattr(denoiser, "default_guidance_scale", 1.0),
                    latent_scale=getattr(denoiser, "latent_scale", None),
                    timestep_offset=int(getattr(denoiser.model_fn, "timestep_offset", 0)))
    return meta


def to_onnx(model_or_denoiser, path, example_batch: int = 2, dynamic_batch: bool = True,
            opset: int = DEFAULT_OPSET, *, input_shape: Optional[Sequence[int]] = None,
            group_norm: str = "instance_norm", attention: str = "matmul",
            external_data: Optional[bool] = None) -> str:
    """Export a model's forward to ONNX: inputs ``x`` (N, C, ...), ``timesteps`` (N,) float32 and, for a
    class-conditional model, ``y`` (N,) int64; output ``out``. Returns the path.

    Args:
        model_or_denoiser: a zoo model (ADMUNet, DDPMUNet, DiT, UViT), any module called as
            ``model(x, timesteps[, y])``, or a fastdiff Denoiser (its model is exported; its
            prediction and learned_sigma are stored in the metadata).
        path: the .onnx file; models with weights above protobuf's 2 GB limit store them in
            ``path + ".data"`` (external data).
        example_batch: the batch traced (and the only batch the graph takes when not dynamic_batch).
        dynamic_batch: leave the batch dimension symbolic.
        opset: ONNX opset, 17 to 23.
        input_shape: (C, H, W) when the model has no ``example_inputs``.
        group_norm, attention: lowerings (see :func:`translation_table`).
        external_data: True writes the weights to ``path + ".data"``; False or None keep them in the
            file unless they pass the exporter's large-model threshold (protobuf's 2 GB limit).
    The graph holds only default-domain ops and passes ``onnx.checker.check_model(full_check=True)``.
    """
    opset = _check_opset(opset)
    batch = _check_batch(example_batch)
    path = check_output_path(path, "path")  # a missing folder fails here, before the export's work
    model, denoiser = _split(model_or_denoiser)
    model = run_copy(model, eval=True)  # tracing runs in eval mode: a cached eval copy if yours is not
    x, t, label_key, y = _example_inputs(model, batch, input_shape)
    module = _ModelGraph(model, label_key)
    names = ["x", "timesteps"] + (["y"] if label_key is not None else [])
    args = (x, t) if label_key is None else (x, t, y)
    dynamic_shapes = None
    if dynamic_batch:
        b = torch.export.Dim("batch", min=1, max=65536)
        dynamic_shapes = tuple({0: b} for _ in args)
    meta = _model_metadata(model, denoiser, x, label_key, batch, dynamic_batch)
    meta["kind"] = "model"
    return _export(module, args, {}, path, input_names=names, output_names=["out"],
                   dynamic_shapes=dynamic_shapes, opset=opset, metadata=meta, group_norm=group_norm,
                   attention=attention, external_data=external_data)


def _step_table(denoiser, sampler, steps: int, sampler_options: dict, shape: Sequence[int]):
    """The table of ``sampler`` for ``denoiser`` at ``steps`` (its ring size and learned range are what the
    graph bakes in), laid out as the engine lays it out for a batch of ``shape``."""
    from fastdiff.samplers import SamplerTable, build_table

    if isinstance(sampler, SamplerTable):
        return sampler
    if not isinstance(sampler, str):
        raise ValueError(f"sampler must be a sampler name or a SamplerTable, got {type(sampler).__name__}")
    sigmas, timesteps = denoiser.sigmas(steps, shape=shape)
    return build_table(sampler, sigmas, schedule=denoiser.schedule, timesteps=timesteps, **sampler_options)


def step_to_onnx(denoiser, sampler, path, *, guidance: Optional[bool] = None, y_null: Optional[int] = None,
                 example_batch: int = 2, dynamic_batch: bool = True, opset: int = DEFAULT_OPSET,
                 steps: int = 10, sampler_options: Optional[dict] = None, frame: Optional[str] = None,
                 input_shape: Optional[Sequence[int]] = None, group_norm: str = "instance_norm",
                 attention: str = "matmul", external_data: Optional[bool] = None) -> str:
    """Export one sampling step (model + guidance + fused update) of ``sampler`` for ``denoiser``.

    The graph: inputs ``x`` (N, C, ...) state in ``frame`` (``"sigma"``, or the schedule's own frame:
    ``"vp"``, ``"flow"``; None: the frame ``fastdiff.sample`` carries the state in,
    :func:`fastdiff.samplers.state_frame`: ``"flow"`` for a flow schedule, whose run starts at sigma = inf,
    else ``"sigma"``); ``timestep`` () float32 model timestep;
    ``c_in`` () model input scale; ``coef`` (11 + S,) float32 packed table row
    (:func:`fastdiff.samplers.to_device` ``.coef[r]``); ``history`` (S, N, C, ...) float32 ring;
    ``noise`` (N, C, ...) (zeros for rows without noise); ``y`` (N,) int64 labels (class-conditional
    models); ``guidance_scale`` () float32 (guided graphs). Outputs ``x_next`` and ``history_next``.

    Args:
        denoiser: a fastdiff Denoiser over an exportable model (no classifier guidance, no dynamic
            thresholding; static ``clip_x0`` is fused).
        sampler: a name of ``fastdiff.samplers.SAMPLERS`` (the table is built with ``steps`` only to read
            its ring size) or a SamplerTable. The graph serves every row and any number of steps.
        guidance: export classifier-free guidance (the model runs on ``[cond; uncond]``); default: when
            the model has a null label (``y_null``).
        y_null: the null label (default: ``num_classes`` for DiT/U-ViT).
        sampler_options: keyword options of the sampler builder (e.g. ``eta`` for ddim, ``order``).
        other arguments: as :func:`to_onnx`.
    """
    from fastdiff.denoiser import Denoiser

    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"denoiser must be a fastdiff Denoiser, got {type(denoiser).__name__}")
    if denoiser.cond_fn is not None:
        raise ValueError("classifier guidance (cond_fn) needs gradients: it cannot run in an ONNX step graph")
    if denoiser.dynamic_threshold is not None:
        raise ValueError("dynamic thresholding needs a per-sample quantile: not supported in the step graph "
                         "(use clip_x0, or the PyTorch runtime)")
    from fastdiff.samplers import state_frame

    own = getattr(denoiser.schedule, "frame", "vp")
    frame = state_frame(denoiser.schedule) if frame is None else frame
    if frame not in ("sigma", own):
        raise ValueError(f"frame must be 'sigma' or the schedule's frame {own!r}, got {frame!r}")
    opset = _check_opset(opset)
    batch = _check_batch(example_batch)
    path = check_output_path(path, "path")  # a missing folder fails here, before the export's work
    model, _ = _split(denoiser)
    model = run_copy(model, eval=True)  # tracing runs in eval mode: a cached eval copy if yours is not
    options = dict(sampler_options or {})
    x, _, label_key, y = _example_inputs(model, batch, input_shape)
    table = _step_table(denoiser, sampler, steps, options, tuple(x.shape))
    if frame == "sigma" and math.isinf(float(table.sigma[0])):
        raise ValueError(f"frame='sigma': a run of this schedule starts at sigma = inf, where the sigma-view "
                         f"state is not finite; export with frame={own!r}")
    if y_null is None:
        y_null = default_y_null(model, denoiser)
    if guidance is None:
        guidance = label_key is not None and y_null is not None
    if guidance and label_key is not None and y_null is None:
        raise ValueError("guidance=True with a class-conditional model needs y_null (the null label)")
    if guidance and label_key is None:
        raise ValueError("guidance=True needs a class-conditional model (the null label replaces y)")
    s = table.num_slots
    module = _StepGraph(model, label_key, s, guided=bool(guidance), y_null=y_null,
                        learned_sigma=denoiser.learned_sigma, learned_range=bool(table.learned_range),
                        clip_x0=denoiser.clip_x0,
                        timestep_offset=int(getattr(denoiser.model_fn, "timestep_offset", 0)))
    args = [x.float() if x.dtype == torch.float64 else x, torch.tensor(500.0), torch.tensor(0.5),
            torch.full((COL_SLOTS + s,), 0.5), torch.zeros((s, *x.shape)), torch.zeros_like(x)]
    names = ["x", "timestep", "c_in", "coef", "history", "noise"]
    dyn: dict = {}
    if label_key is not None:
        args.append(y)
        names.append("y")
    if guidance:
        args.append(torch.tensor(1.5))
        names.append("guidance_scale")
    if dynamic_batch:
        b = torch.export.Dim("batch", min=1, max=65536)
        by_name = {"x": {0: b}, "history": {1: b}, "noise": {0: b}, "y": {0: b}}
        dyn = tuple(by_name.get(name) for name in names)
    meta = _model_metadata(model, denoiser, x, label_key, batch, dynamic_batch)
    meta.update(kind="step", sampler=table.name, sampler_options=_jsonable(table.options or options),
                num_slots=s, guided=bool(guidance), y_null=y_null, frame=frame,
                learned_range=bool(table.learned_range), clip_x0=denoiser.clip_x0,
                schedule=_schedule_metadata(denoiser.schedule), patch_size=denoiser.patch_size)
    if not dynamic_batch:
        dyn = None
    return _export(module, tuple(args), {}, path, input_names=names, output_names=["x_next", "history_next"],
                   dynamic_shapes=dyn, opset=opset, metadata=meta, group_norm=group_norm,
                   attention=attention, external_data=external_data)


def _jsonable(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _schedule_metadata(schedule) -> Optional[dict]:
    """Enough to rebuild the schedule from the graph alone (a VPSchedule's alphas_cumprod, an SDE's or a flow
    schedule's parameters), else None."""
    from fastdiff.schedules import FlowSchedule, VESDESchedule, VPSchedule, VPSDESchedule

    if isinstance(schedule, VPSchedule):
        return {"type": "VPSchedule", "alphas_cumprod": [float(a) for a in schedule.alphas_cumprod]}
    if isinstance(schedule, VPSDESchedule):
        return {"type": "VPSDESchedule", "beta_min": schedule.beta_min, "beta_max": schedule.beta_max,
                "eps": schedule.eps, "time_scale": schedule.time_scale}
    if isinstance(schedule, VESDESchedule):
        return {"type": "VESDESchedule", "sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max,
                "timestep": schedule.timestep}
    if isinstance(schedule, FlowSchedule):
        return {"type": "FlowSchedule", **{k: getattr(schedule, k) for k in (
            "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
            "max_image_seq_len", "time_shift_type", "shift_terminal")}}
    return None
