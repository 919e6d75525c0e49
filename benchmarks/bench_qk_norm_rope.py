"""QK-RMSNorm + RoPE (fastdiff.ops.qk_norm_rope) against diffusers' unfused code, eager and torch.compile.

    python benchmarks/bench_qk_norm_rope.py [--quick] [--no-compile] [--device cuda|cpu] [--jsonl FILE]
        [--out DIR | --save]

Cases, each on q and k in the layout of diffusers' attention processors ((B, S, H, D) memory; the fused op
reads it through a (B, H, S, D) transposed view, without a copy):

- ``flux``: one stream of Flux-dev at 1024x1024 (B=1, 24 heads of 128, S = 4096 image + 512 text tokens,
  bf16): RMSNorm of q and k, then the rotary embedding of ``FluxPosEmbed``;
- ``flux-joint``: Flux's double block: text and image streams normalised with their own weights, joined
  along the sequence and rotated over it; diffusers concatenates, fastdiff writes both streams into the
  joint buffer (``out=``) in two calls;
- ``sd35``: SD3.5-medium at 1024x1024 with classifier-free guidance (B=2, 24 heads of 64, S = 4096 + 333),
  the RMSNorm alone.

Baselines: diffusers' ``RMSNorm`` + ``apply_rotary_emb`` where diffusers is installed, else the same
operations written out here (``baseline`` in each row says which), eager and under ``torch.compile``.
One row per (case, dtype, implementation: ``fastdiff`` the fused op, ``eager`` and ``compiled`` the
baseline): milliseconds, GB/s over the fewest bytes the op must move (q and k read once, the outputs written
once, cos/sin and the weights read once), the floor (those bytes over the copy bandwidth measured in the same
run) as ``frac_floor``, and the output's relative L2 error against float64; every row goes to ``--jsonl`` as
it is measured, ``--out DIR`` / ``--save`` write ``qk_norm_rope-{device}.json`` (nothing by default). On a
CPU the shapes are small, the fused op runs its native CPU path (``auto``) and the numbers are labelled CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RowWriter, add_output_args, copy_bandwidth_gbs, print_table, time_ms  # noqa: E402

from fastdiff import ops  # noqa: E402

EPS = 1e-6
# (case, B, H, S_text, S_image, D, rope)
GPU_CASES = [("flux", 1, 24, 512, 4096, 128, True), ("flux-joint", 1, 24, 512, 4096, 128, True),
             ("sd35", 2, 24, 333, 4096, 64, False)]
CPU_CASES = [("flux", 1, 12, 128, 1024, 64, True), ("flux-joint", 1, 12, 128, 1024, 64, True),
             ("sd35", 2, 12, 77, 1024, 64, False)]


# ---------------------------------------------------------------------------------------------
# the unfused baseline: diffusers' own functions, or the same operations where diffusers is absent
# ---------------------------------------------------------------------------------------------


def _rms_norm_as_diffusers(x, weight):
    """diffusers' RMSNorm.forward with a weight: float32 statistics, rounded to a half weight's dtype."""
    h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + EPS)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return h * weight


def _rope_as_diffusers(x, cos, sin):
    """apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)."""
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    turned = torch.stack([-im, re], dim=-1).flatten(3)
    return (x.float() * cos[None, :, None] + turned.float() * sin[None, :, None]).to(x.dtype)


def baseline_functions():
    """(rms_norm(x, weight), rope(x, cos, sin), name) on (B, S, H, D) tensors."""
    try:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.normalization import RMSNorm
    except ImportError:
        return _rms_norm_as_diffusers, _rope_as_diffusers, "diffusers-ops-written-out"
    norms = {}

    def rms_norm(x, weight):
        key = (weight.data_ptr(), weight.dtype)
        if key not in norms:  # module built once, outside the timed calls
            norm = RMSNorm(weight.shape[0], eps=EPS).to(weight.device, weight.dtype).requires_grad_(False)
            norm.weight.copy_(weight)
            norms[key] = norm
        return norms[key](x)

    def rope(x, cos, sin):
        return apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)

    return rms_norm, rope, "diffusers"


def unfused_stream(norm, rope, q, k, qw, kw, cos, sin):
    q, k = norm(q, qw), norm(k, kw)
    return (rope(q, cos, sin), rope(k, cos, sin)) if cos is not None else (q, k)


def unfused_joint(norm, rope, tq, tk, iq, ik, tqw, tkw, iqw, ikw, cos, sin):
    """Flux's double-block processor: per-stream norms, concatenation, rotation of the joint sequence."""
    q = torch.cat([norm(tq, tqw), norm(iq, iqw)], dim=1)
    k = torch.cat([norm(tk, tkw), norm(ik, ikw)], dim=1)
    return rope(q, cos, sin), rope(k, cos, sin)


def fused_stream(backend, q, k, qw, kw, cos, sin):
    return ops.qk_norm_rope(q.transpose(1, 2), k.transpose(1, 2), qw, kw, cos, sin, backend=backend)


def fused_joint(backend, tq, tk, iq, ik, tqw, tkw, iqw, ikw, cos, sin):
    st = tq.shape[1]
    jq = torch.empty(tq.shape[0], st + iq.shape[1], *tq.shape[2:], device=tq.device, dtype=tq.dtype)
    jk = torch.empty_like(jq)
    jqt, jkt = jq.transpose(1, 2), jk.transpose(1, 2)
    ops.qk_norm_rope(tq.transpose(1, 2), tk.transpose(1, 2), tqw, tkw, cos[:st], sin[:st],
                     out=(jqt[:, :, :st], jkt[:, :, :st]), backend=backend)
    ops.qk_norm_rope(iq.transpose(1, 2), ik.transpose(1, 2), iqw, ikw, cos[st:], sin[st:],
                     out=(jqt[:, :, st:], jkt[:, :, st:]), backend=backend)
    return jqt, jkt


def float64_reference(q, k, qw, kw, cos, sin):
    """(B, H, S, D) float64 outputs of one stream (the op's reference path run in float64)."""
    d = lambda t: None if t is None else t.double()
    return ops.qk_norm_rope(d(q).transpose(1, 2), d(k).transpose(1, 2), d(qw), d(kw), d(cos), d(sin),
                            backend="reference")


def rope_tables(s, d, device):
    """Flux-like tables: per-pair angles, each repeated for both features of its pair, float32."""
    pos = torch.arange(s, dtype=torch.float64, device=device)[:, None]
    angles = pos / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    return angles.cos().repeat_interleave(2, -1).float(), angles.sin().repeat_interleave(2, -1).float()


def rel_l2(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def bench_case(case, dtype, device, copy_gbs, backend, baseline, rec: RowWriter, compile_baseline: bool = True):
    name, b, h, s_txt, s_img, d, rope = case
    norm, rope_fn, baseline_name = baseline
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    s = s_txt + s_img
    cos, sin = rope_tables(s, d, device) if rope else (None, None)
    weights = [(1 + 0.1 * rnd(d)) for _ in range(4)]
    if name == "flux-joint":
        streams = [rnd(b, s_txt, h, d), rnd(b, s_txt, h, d), rnd(b, s_img, h, d), rnd(b, s_img, h, d)]
        args = (*streams, *weights, cos, sin)
        impls = {"fastdiff": partial(fused_joint, backend, *args),
                 "eager": partial(unfused_joint, norm, rope_fn, *args)}
        if compile_baseline:
            impls["compiled"] = partial(torch.compile(partial(unfused_joint, norm, rope_fn), dynamic=False), *args)
        ref_t = float64_reference(streams[0], streams[1], weights[0], weights[1], cos[:s_txt], sin[:s_txt])
        ref_i = float64_reference(streams[2], streams[3], weights[2], weights[3], cos[s_txt:], sin[s_txt:])
        refs = [torch.cat([ref_t[i], ref_i[i]], dim=2) for i in range(2)]
    else:
        q, k = rnd(b, s, h, d), rnd(b, s, h, d)
        args = (q, k, weights[0], weights[1], cos, sin)
        impls = {"fastdiff": partial(fused_stream, backend, *args),
                 "eager": partial(unfused_stream, norm, rope_fn, *args)}
        if compile_baseline:
            impls["compiled"] = partial(torch.compile(partial(unfused_stream, norm, rope_fn), dynamic=False), *args)
        refs = float64_reference(*args)
    el = b * h * s * d
    nbytes = 4 * el * torch.finfo(dtype).bits // 8 + (2 * s * d * 4 if rope else 0) + 4 * d * weights[0].element_size()
    base = dict(op="qk_norm_rope", case=name, shape=f"B{b} H{h} S{s_txt}+{s_img} D{d}",
                dtype=str(dtype).replace("torch.", ""), bytes=nbytes, baseline=baseline_name,
                fused_backend=backend or "auto")
    floor_ms = nbytes / (copy_gbs * 1e9) * 1e3
    for impl, fn in impls.items():
        try:
            outs = fn()
            bhsd = [o if o.shape[1] == h else o.transpose(1, 2) for o in outs]  # baselines are (B, S, H, D)
            err = max(rel_l2(o, r) for o, r in zip(bhsd, refs, strict=True))
            ms = time_ms(fn, device)
        except Exception as e:  # an alternative that cannot run here is reported; the fused op failing is a failure
            rec.skip(f"{name} {base['dtype']} {impl}", f"{type(e).__name__}: {str(e)[:160]}", **base,
                     failed=impl == "fastdiff")
            continue
        rec.row(**base, impl=impl, ms=ms, gbs=nbytes / (ms * 1e-3) / 1e9, floor_ms=floor_ms, frac_floor=floor_ms / ms,
                err=err)


def run(device: torch.device, args, rec: RowWriter) -> None:
    gpu = device.type == "cuda"
    copy_gbs = rec.floor("copy_gbs", copy_bandwidth_gbs(device), "GB/s")
    print(f"device {rec.device_record['name']}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    cases = GPU_CASES if gpu else CPU_CASES
    dtypes = [torch.bfloat16, torch.float16] if gpu else [torch.float32, torch.bfloat16]
    if args.quick:
        cases, dtypes = cases[:1], dtypes[:1]
    backend = "triton" if gpu else "auto"  # on a CPU the op's native path (the interpreter times nothing useful)
    baseline = baseline_functions()
    for dtype in dtypes:
        for case in cases:
            bench_case(case, dtype, device, copy_gbs, backend, baseline, rec, not args.no_compile)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the Flux case in one dtype")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_output_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rec = RowWriter("qk_norm_rope", device, args,
                    meta={"note": "" if device.type == "cuda" else
                          "CPU numbers: the op's native CPU path against diffusers on a CPU, not a GPU result",
                          "target": "flux bf16 (B=1, H=24, S=4608, D=128): fused >= 0.85 of the copy floor"})
    run(device, args, rec)
    print_table(rec.rows, ["case", "shape", "dtype", "impl", "ms", "gbs", "frac_floor", "err"])
    rec.finish()
    return rec.exit_status


if __name__ == "__main__":
    sys.exit(main())
