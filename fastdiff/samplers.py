"""Every fixed-step sampler as a table of coefficients, and the one loop that walks a table.

The form (../shared/DESIGN.md, "Samplers as coefficient tables"). The state ``x`` lives in the sigma view
``x = x0 + sigma * eps`` (:mod:`fastdiff.schedules`). A table is a list of *rows*; each row is one model
evaluation at ``sigma[r]`` followed by one linear update:

    m      = u + w (c - u)                       guided model output (eps | v | x0 | flow)
    x0     = clip(p x + q m)                     p, q: the parameterisation at sigma[r] (from the Denoiser)
    h_new  = h_x x + h_x0 x0 + h_m m             what the row keeps: x0, d = (x - x0)/sigma, the flow
                                                 velocity (x - (1 + sigma) x0)/sigma, the state, the raw
                                                 output, or any mix (diffusers' stored first-stage state)
    x_next = a x + g m + b0 h_new + sum_s b_s H[s] + c noise

``H`` is a ring of ``num_slots`` earlier history entries; each row may store ``h_new`` in one slot.
Multi-stage steps (Heun, DPM-2, DPM-Solver++(2S), singlestep DPM-Solver) are extra rows. The coefficient
``g`` carries an *unclipped* eps direction (diffusers' DDIM). Everything is built in float64 on the host.

Frames. :func:`pack_table` turns the sigma-view rows into the frame the state is carried in: the sigma view
(k-diffusion, Euler), the VP model frame ``x / sqrt(1 + sigma^2)`` (diffusers' DDPM/DDIM/DPM-Solver/UniPC)
or the flow model frame ``x / (1 + sigma)`` (flow matching). A flow run starts at flow time 1, which is
``sigma = inf``: the first row of a table may have ``sigma = inf``, and on such a row ``a`` and ``h_x`` (and
the Denoiser's ``p``) are coefficients on the unit-noise state ``x / sigma``, which is what the VP and flow
frames hold there (the sigma view cannot start at inf). Builders that need a finite start say so.

The sampler builders, one short function per sampler citing its paper and equation, live in
:mod:`fastdiff.sampler_builders` (its docstring lists them with their references); the table type and the
row collector in :mod:`fastdiff.sampler_table`. This module keeps the public surface (every name stays
importable from here), the registry :data:`SAMPLERS` and :func:`build_table`, the packing into the kernel's
table, the per-sample noise and the loop.

The loop :func:`sample_loop` walks a table: per row one batched model call (cond and uncond halves), the
noise for that row from a generator per sample, and one fused update ``fastdiff.ops.sampler_step``. The
table, the timesteps and the row index live on the device; the loop reads no tensor value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.sampler_builders import (
    DDPM_VARIANCES,
    DPM_ALGORITHMS,
    HEUN_TIMES,
    ancestral_step,
    ddim,
    ddpm,
    deis,
    dpm_2,
    dpm_2_ancestral,
    dpm_multistep,
    dpm_solver,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_2s_ancestral,
    dpmpp_3m_sde,
    dpmpp_sde,
    euler,
    euler_ancestral,
    heun,
    lcm,
    lms,
    unipc,
)
from fastdiff.sampler_table import (  # _Rows: the diffusers drop-ins build their own rows
    HISTORY_FORMS,
    SamplerTable,
    _Rows,  # noqa: F401
    concat_tables,
    lenient,
)
from fastdiff.schedules import frame_scale

__all__ = [
    "SAMPLERS",
    "SamplerTable",
    "DeviceTable",
    "COLUMNS",
    "ancestral_step",
    "build_table",
    "ddpm",
    "ddim",
    "euler",
    "euler_ancestral",
    "lcm",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "dpm_solver",
    "dpmpp_sde",
    "dpm_multistep",
    "deis",
    "concat_tables",
    "lenient",
    "lms",
    "dpmpp_2m",
    "dpmpp_2s_ancestral",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "unipc",
    "pack_table",
    "to_device",
    "make_generators",
    "randn_per_sample",
    "sample_loop",
    "state_frame",
    "COL_P", "COL_Q", "COL_E", "COL_F", "COL_A", "COL_G", "COL_B0", "COL_C", "COL_LV_LO", "COL_LV_HI",
    "COL_WRITE", "COL_SLOTS", "HISTORY_FORMS", "DPM_ALGORITHMS", "DDPM_VARIANCES", "HEUN_TIMES",
]

# Columns of a packed table, the layout the fused update kernel and its reference read.
COL_P, COL_Q, COL_E, COL_F, COL_A, COL_G, COL_B0, COL_C, COL_LV_LO, COL_LV_HI, COL_WRITE = range(11)
COL_SLOTS = 11
COLUMNS = ("p", "q", "e", "f", "a", "g", "b0", "c", "lv_lo", "lv_hi", "write")


SAMPLERS: Dict[str, Callable[..., SamplerTable]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "lcm": lcm,
    "heun": heun,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "dpm_solver": dpm_solver,
    "lms": lms,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "unipc": unipc,
    "dpm_multistep": dpm_multistep,
    "deis": deis,
}


def build_table(sampler: str, sigmas, schedule=None, **options) -> SamplerTable:
    """``SAMPLERS[sampler](sigmas, **options)`` with a clear error for an unknown name.

    ``schedule``: the run's schedule; a flow schedule makes ``heun`` step in flow time (``time="flow"``,
    as diffusers' FlowMatchHeun) unless ``time`` is given.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if sampler == "heun" and getattr(schedule, "frame", None) == "flow":
        options.setdefault("time", "flow")
    return SAMPLERS[sampler](sigmas, **options)


# ---------------------------------------------------------------------------------------------
# Packing: sampler coefficients + parameterisation -> the kernel's table.
# ---------------------------------------------------------------------------------------------


def pack_table(table: SamplerTable, p: np.ndarray, q: np.ndarray, frame: str = "sigma",
               check: bool = True) -> np.ndarray:
    """The (R, 11 + S) float64 table the update reads, columns ``COLUMNS`` then one per ring slot.

    ``p, q`` (R,): ``x0 = p x + q m`` at each row's sigma in the sigma view (``Denoiser.x0_coefficients``;
    at sigma = inf, p on ``x / sigma``). The history entry ``h_x x + h_x0 x0 + h_m m`` becomes ``e x + f x0``
    through ``m = (x0 - p x) / q``; the unclipped-eps coefficient folds into a and g through
    ``eps = ((1 - p) x - q m) / sigma`` (the unit-noise state itself at sigma = inf).
    ``frame`` is the state the rows read and write (:func:`fastdiff.schedules.frame_scale`): ``"sigma"`` (the
    sigma view: k-diffusion, Euler), ``"vp"`` (``x / sqrt(1 + sigma^2)``: diffusers' DDPM/DDIM/DPM-Solver/
    UniPC) or ``"flow"`` (``x / (1 + sigma)``: flow matching). A row at sigma = inf needs the vp or flow
    frame, where the state is the unit noise. History entries keep the units of the table's own frame
    (``table.frame``); a table packed into its own frame keeps its coefficients as they are, so rows built
    from diffusers' float32 formulas stay what diffusers computes. ``check=False`` leaves non-finite rows
    in place (the drop-ins check the row they use, as a diffusers schedule may hold rows it never reaches).
    """
    if frame not in ("sigma", "vp", "flow"):
        raise ValueError(f"frame must be 'sigma', 'vp' or 'flow', got {frame!r}")
    r, s = table.num_rows, table.num_slots
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), (r,)).copy()
    q = np.broadcast_to(np.asarray(q, dtype=np.float64), (r,)).copy()
    sig = table.sigma
    inf = np.isinf(sig)
    if check and inf.any() and frame == "sigma":
        raise ValueError(f"table for {table.name!r} starts at sigma = inf: the sigma-view state is not finite "
                         "there; carry the state in the model's frame (frame='vp' or 'flow')")
    fin = np.where(inf, 1.0, sig)
    with np.errstate(divide="ignore", invalid="ignore"):
        # frame scales in and out (at inf both model frames hold x / sigma: scale 1)
        f_in = np.where(inf, 1.0, frame_scale(fin, frame))
        t_in = np.where(inf, 1.0, frame_scale(fin, table.frame))
        if frame == table.frame:  # exact, also where a frame scale is 0 or inf
            k_in = k_out = np.ones(r)
        else:
            k_in = t_in / f_in  # table-frame state = k_in * target-frame state
            k_out = frame_scale(table.sigma_next, frame) / frame_scale(table.sigma_next, table.frame)
        uses_m = table.h_m != 0
        if np.any(uses_m & (q == 0)):
            raise ValueError(f"table for {table.name!r} keeps the raw model output, which x0-prediction "
                             "with q = 0 cannot give back")
        qq = np.where(uses_m, q, 1.0)
        e = (table.h_x - table.h_m * (p / t_in) / qq) * k_in
        f = table.h_x0 + table.h_m / qq
        eps = table.g_eps != 0  # fold eps = ((1 - p) x - q m) / sigma only where a row uses it
        a = table.a * k_in * k_out + np.where(eps, table.g_eps * k_out * np.where(inf, 1.0, (1 - p) / (f_in * fin)),
                                              0.0)
        g = (table.g_m - np.where(eps, table.g_eps * np.where(inf, 0.0, q / fin), 0.0)) * k_out
        p = p / f_in
    b0, c, bs = table.b_new * k_out, table.c * k_out, table.b_slots * k_out[:, None]
    out = np.zeros((r, COL_SLOTS + s))
    out[:, COL_P], out[:, COL_Q], out[:, COL_E], out[:, COL_F] = p, q, e, f
    out[:, COL_A], out[:, COL_G], out[:, COL_B0], out[:, COL_C] = a, g, b0, c
    out[:, COL_LV_LO], out[:, COL_LV_HI] = table.lv_lo, table.lv_hi
    out[:, COL_WRITE] = table.write_slot
    out[:, COL_SLOTS:] = bs
    if check and not np.all(np.isfinite(out)):
        raise ValueError(f"table for {table.name!r} has non-finite coefficients (check sigmas and prediction: "
                         "eps prediction has no x0 at sigma = inf)")
    return out


@dataclass
class DeviceTable:
    """A packed table on the device with what the loop needs per row, all as tensors (no host reads).

    ``coef`` (R, 11 + S) float64; ``c_in`` (R,) model input scale; ``timestep`` (R,) model timesteps (float32,
    float64 for a float64 state);
    ``row_ids`` (R,) int32 so that ``row_ids[r].expand(N)`` is the per-sample row index of row r.
    """

    table: SamplerTable
    coef: Tensor
    c_in: Tensor
    timestep: Tensor
    row_ids: Tensor
    frame: str = "sigma"


def state_frame(schedule) -> str:
    """The frame :func:`fastdiff.sample` (and the ONNX Runtime loop) carries the state in: the schedule's
    flow frame for a flow schedule, whose run starts at sigma = inf where the sigma view is not finite, else
    the sigma view."""
    return "flow" if getattr(schedule, "frame", None) == "flow" else "sigma"


def to_device(table: SamplerTable, denoiser, device, dtype: torch.dtype = torch.float32,
              frame: str = "sigma") -> DeviceTable:
    """Pack ``table`` for ``denoiser`` (its prediction and schedule) and move it to ``device`` once.

    ``frame``: ``"sigma"`` (the state in the sigma view; the model input is scaled by the schedule's
    ``model_input_scale``) or the schedule's own frame (``"vp"``, ``"flow"``: the state is the model input).
    """
    sch_frame = getattr(denoiser.schedule, "frame", "vp")
    if frame != "sigma" and frame != sch_frame:
        raise ValueError(f"frame must be 'sigma' or the schedule's frame {sch_frame!r}, got {frame!r}")
    p, q = denoiser.x0_coefficients(table.sigma)
    coef = pack_table(table, p, q, frame=frame)
    t = table.timestep.copy()
    missing = np.isnan(t)
    if missing.any():
        t[missing] = np.asarray(denoiser.schedule.sigma_to_timestep(table.sigma[missing]), dtype=np.float64)
    c_in = denoiser.schedule.model_input_scale(table.sigma) if frame == "sigma" else np.ones(table.num_rows)
    return DeviceTable(
        table=table,
        coef=torch.tensor(coef, dtype=torch.float64, device=device),
        c_in=torch.tensor(np.asarray(c_in), dtype=dtype, device=device),
        timestep=torch.tensor(t, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                              device=device),
        row_ids=torch.arange(table.num_rows, dtype=torch.int32, device=device),
        frame=frame,
    )


# ---------------------------------------------------------------------------------------------
# Noise: one generator per sample, so a sample does not depend on the batch it is drawn in.
# ---------------------------------------------------------------------------------------------


def make_generators(seeds: Sequence[int], device="cpu") -> list:
    """One ``torch.Generator`` per seed on ``device`` (CPU generators: the same numbers on every machine).

    Seeds are ints in [0, 2^63) (torch would wrap negative and larger ones onto other seeds)."""
    gens = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"seeds must be integers, got {s!r}")
        if not 0 <= int(s) < 2**63:
            raise ValueError(f"seeds must be integers in [0, 2**63), got {int(s)}")
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int], device=None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """(len(generators), *shape) standard normal, sample i drawn (in float32) from ``generators[i]`` alone."""
    out = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    x = torch.stack(out) if out else torch.empty((0, *shape))
    return x.to(device=device if device is not None else x.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def sample_loop(denoiser, x: Tensor, table, *, y: Optional[Tensor] = None, y_null=None,
                guidance_scale: float = 1.0, model_kwargs: Optional[dict] = None,
                uncond_kwargs: Optional[dict] = None, generators: Optional[Sequence[torch.Generator]] = None,
                noise_fn: Optional[Callable[[int, int], Tensor]] = None, callback: Optional[Callable] = None,
                history_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None,
                frame: str = "sigma", disable: bool = True) -> Tensor:
    """Walk a table: per row one model call, one fused update. Returns the final state.

    Args:
        denoiser: a :class:`fastdiff.denoiser.Denoiser` (model, schedule, prediction, guidance options).
        x: (N, ...) initial state at ``table.sigma[0]`` in ``frame`` (sigma view: ``sigma_max * randn`` or,
            to match a VP sampler started from ``randn``, ``sqrt(1 + sigma_max^2) * randn``).
        table: a :class:`SamplerTable` or a :class:`DeviceTable` made by :func:`to_device`.
        y, y_null, guidance_scale, model_kwargs, uncond_kwargs: conditioning; with ``guidance_scale != 1``
            the model runs once on the doubled batch (cond half first), see ``Denoiser.model_output``.
        generators: one ``torch.Generator`` per sample for the per-row noise (:func:`make_generators`).
        noise_fn: instead of generators, ``noise_fn(k, row) -> (N, ...)`` gives the k-th noise draw
            (k counts the rows that add noise, like k-diffusion's ``noise_sampler``).
        callback: called after each row with a dict ``i`` (step), ``row``, ``x``, ``sigma`` (float),
            ``sigma_next``, ``history`` (the slot just written, or None).
        history_dtype: dtype of the history ring (default: float32, or float64 for float64 x).
        backend: the op's backend word (None follows the switch).
        frame: ``"sigma"`` or ``"vp"``, the frame of x (see :func:`pack_table`).
        disable: hide the tqdm bar (default).
    The row loop is plain Python over host-known rows; it never reads a tensor value, so it can be captured
    in a CUDA graph (the engine's job) and runs on the ``meta`` device.
    """
    from fastdiff import ops

    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor (N, ...)")
    if isinstance(table, SamplerTable):
        table = to_device(table, denoiser, x.device, dtype=x.dtype, frame=frame)
    if not isinstance(table, DeviceTable):
        raise ValueError(f"table must be a SamplerTable or DeviceTable, got {type(table).__name__}")
    host = table.table
    if table.frame != frame:
        raise ValueError(f"table was packed for frame {table.frame!r} but frame={frame!r}")
    n = x.shape[0]
    if generators is not None and len(generators) != n:
        raise ValueError(f"generators must hold one generator per sample ({n}), got {len(generators)}")
    if host.needs_noise.any() and generators is None and noise_fn is None:
        raise ValueError(f"sampler {host.name!r} adds noise: pass generators (one per sample) or noise_fn")
    hdt = history_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    hist = torch.zeros((host.num_slots, *x.shape), dtype=hdt, device=x.device)
    draws = 0
    rng = range(host.num_rows)
    if not disable:
        from tqdm.auto import tqdm

        rng = tqdm(rng, total=host.num_rows)
    for r in rng:
        rows = table.row_ids[r].expand(n)
        t = table.timestep[r].expand(n)
        cond, uncond, var = denoiser.model_output(
            x * table.c_in[r], t, y=y, y_null=y_null, guidance_scale=guidance_scale,
            model_kwargs=model_kwargs, uncond_kwargs=uncond_kwargs, sigma=float(host.sigma[r]))
        if host.learned_range and var is None:
            raise ValueError("this DDPM table uses learned-range variance: the Denoiser needs "
                             "learned_sigma=True")
        noise = None
        if host.needs_noise[r]:
            if noise_fn is not None:
                noise = noise_fn(draws, r)
            else:
                noise = randn_per_sample(generators, x.shape[1:], device=x.device, dtype=x.dtype)
            draws += 1
        clip = denoiser.clip_bounds(x, cond, uncond, guidance_scale, table.coef, rows)
        x = ops.sampler_step(x, cond, hist, table.coef, rows, uncond=uncond,
                             guidance_scale=float(guidance_scale) if uncond is not None else 1.0,
                             variance=var if host.learned_range else None, noise=noise, clip=clip,
                             backend=backend)
        if callback is not None:
            ws = int(host.write_slot[r])
            callback({"i": int(host.step[r]), "row": r, "x": x, "sigma": float(host.sigma[r]),
                      "sigma_next": float(host.sigma_next[r]), "history": hist[ws] if ws >= 0 else None})
    return x
