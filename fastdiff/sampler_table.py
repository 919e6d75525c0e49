"""The sampler table: the type every sampler builder returns, and the row collector they share.

A :class:`SamplerTable` holds one entry per *row* (one model evaluation followed by one linear update; the
row form and the frames are described in :mod:`fastdiff.samplers`), built in float64 on the host.
:class:`_Rows` collects rows for a builder (:mod:`fastdiff.sampler_builders`) and turns history lags into
ring slots; :func:`concat_tables` joins tables; :func:`lenient` relaxes the sigma checks for the diffusers
drop-ins.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence

import numpy as np
from torch import Tensor

__all__ = ["SamplerTable", "HISTORY_FORMS", "concat_tables", "lenient"]

@dataclass
class SamplerTable:
    """The sampler part of a table, independent of the model's parameterisation; one entry per row.

    Attributes:
        name: sampler name.
        history: the usual history form (``"x0"``, ``"d"``, ``"velocity"``, ``"state"``, ``"model"``, or
            ``"mixed"``); the per-row truth is ``h_x, h_x0, h_m``.
        num_slots: ring size S of the history buffer (>= 1).
        sigma: (R,) sigma the model is evaluated at (also the sigma of the row's input state).
        sigma_next: (R,) sigma of the row's output state.
        timestep: (R,) model timestep, NaN where the Denoiser's schedule is to map sigma to timestep.
        step: (R,) the sampling step a row belongs to (several rows per step for multi-stage samplers).
        a, g_eps, b_new, c: (R,) coefficients on x, on the unclipped eps, on h_new and on the noise.
        b_slots: (R, S) coefficients on the ring slots.
        write_slot: (R,) slot that receives h_new, -1 for none.
        lv_lo, lv_hi: (R,) learned-range log-variance bounds (``ddpm(variance="learned_range")``), else 0:
            the noise coefficient is then ``c * exp((lv_lo + (v + 1) / 2 (lv_hi - lv_lo)) / 2)``.
        learned_range: whether the table expects the model's variance output.
        h_x, h_x0, h_m: (R,) the history entry ``h_new = h_x x + h_x0 x0 + h_m m`` (sigma view; on a row at
            sigma = inf, ``h_x`` multiplies ``x / sigma``). None: from ``history``.
        g_m: (R,) coefficient on the raw model output m in x_next (0 for most samplers).
        frame: the state frame the coefficients on x (``a``, ``h_x``) and into x_next (``b_new``, ``b_slots``,
            ``c``, ``g_eps``, ``g_m``) are written in: ``"sigma"`` (every builder here), or ``"vp"`` / ``"flow"`` for
            rows built in a model frame (diffusers' own formulas, "alpha form"; see :func:`pack_table`).
    """

    name: str
    history: str
    num_slots: int
    sigma: np.ndarray
    sigma_next: np.ndarray
    timestep: np.ndarray
    step: np.ndarray
    a: np.ndarray
    g_eps: np.ndarray
    b_new: np.ndarray
    c: np.ndarray
    b_slots: np.ndarray
    write_slot: np.ndarray
    lv_lo: np.ndarray
    lv_hi: np.ndarray
    learned_range: bool = False
    options: dict = field(default_factory=dict)
    h_x: Optional[np.ndarray] = None
    h_x0: Optional[np.ndarray] = None
    h_m: Optional[np.ndarray] = None
    g_m: Optional[np.ndarray] = None
    frame: str = "sigma"

    def __post_init__(self):
        if self.g_m is None:
            self.g_m = np.zeros(self.num_rows)
        if self.h_x is None:
            forms = [_history_coefficients(self.history, float(s)) for s in self.sigma]
            self.h_x, self.h_x0, self.h_m = (np.asarray([f[k] for f in forms], dtype=np.float64)
                                             for k in range(3))

    @property
    def num_rows(self) -> int:
        return int(self.sigma.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.step[-1]) + 1 if self.num_rows else 0

    @property
    def needs_noise(self) -> np.ndarray:
        """(R,) bool: rows whose update adds noise (the loop draws noise only for these)."""
        return self.c != 0

    def with_timesteps(self, timestep: np.ndarray) -> "SamplerTable":
        return replace(self, timestep=np.asarray(timestep, dtype=np.float64))


HISTORY_FORMS = ("x0", "d", "velocity", "state", "model")


def _history_coefficients(form: str, sigma: float) -> tuple:
    """``(h_x, h_x0, h_m)`` of a history form at sigma (``h_x`` on ``x / sigma`` where sigma is inf)."""
    inf = math.isinf(sigma)
    if form == "x0":
        return 0.0, 1.0, 0.0
    if form == "d":  # (x - x0) / sigma: Karras' ODE derivative, the eps of the row
        return (1.0, 0.0, 0.0) if inf else (1.0 / sigma, -1.0 / sigma, 0.0)
    if form == "velocity":  # flow velocity in flow time: (x_s - x0) / s in the flow frame
        return (1.0, -1.0, 0.0) if inf else (1.0 / sigma, -(1.0 + sigma) / sigma, 0.0)
    if form == "state":
        if inf:
            raise ValueError("the state at sigma = inf is not finite in the sigma view")
        return 1.0, 0.0, 0.0
    if form == "model":
        return 0.0, 0.0, 1.0
    raise ValueError(f"history form must be one of {HISTORY_FORMS}, got {form!r}")


def _ratio(num: float, sigma: float) -> float:
    """``num / sigma``, or ``num`` where sigma is inf (the coefficient then multiplies ``x / sigma``)."""
    return num if math.isinf(sigma) else num / sigma


_LENIENT = contextvars.ContextVar("fastdiff_lenient_sigmas", default=False)


@contextlib.contextmanager
def lenient():
    """Inside, sigmas need not decrease (a repeated sigma is a step that does not lower it) and a degenerate
    row comes out non-finite instead of raising: for the diffusers drop-ins, whose schedules may hold rows a
    run never reaches (repeated integer timesteps, a zero-terminal-SNR training grid); they check each row
    they use."""
    token = _LENIENT.set(True)
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        _LENIENT.reset(token)


def _check_sigmas(sigmas) -> np.ndarray:
    if isinstance(sigmas, Tensor):
        sigmas = sigmas.detach().cpu().double().numpy()
    s = np.asarray(sigmas, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D array of length steps + 1 >= 2, got shape {s.shape}")
    if np.any(np.isnan(s)) or np.any(np.isinf(s[1:])) or np.any(s < 0):
        raise ValueError("sigmas must be finite (the first may be inf) and >= 0")
    if np.any(s[:-1] <= 0):
        raise ValueError("only the last entry of sigmas may be 0")
    if not _LENIENT.get() and (np.any(np.diff(s[1:]) >= 0) or not s[0] > s[1]):
        raise ValueError("sigmas must be strictly decreasing")
    return s


def _check_timesteps(timesteps, n_sigmas: int) -> np.ndarray:
    if timesteps is None:
        return np.full(n_sigmas, np.nan)
    if isinstance(timesteps, Tensor):
        timesteps = timesteps.detach().cpu().double().numpy()
    t = np.asarray(timesteps, dtype=np.float64).reshape(-1)
    if t.shape[0] == n_sigmas - 1:
        t = np.concatenate([t, [np.nan]])
    if t.shape[0] != n_sigmas:
        raise ValueError(f"timesteps must have len(sigmas) - 1 = {n_sigmas - 1} or len(sigmas) entries, "
                         f"got {t.shape[0]}")
    return t


class _Rows:
    """Collects rows; history lags (1 = the entry written most recently) become ring slots."""

    def __init__(self, name: str, history: str, num_slots: int, sigmas, timesteps, **options):
        self.name, self.history, self.num_slots = name, history, max(1, int(num_slots))
        self.sig = _check_sigmas(sigmas)
        self.ts = _check_timesteps(timesteps, self.sig.shape[0])
        self.options = options
        self.rows: list = []
        self.hists: list = []
        self.written = 0

    @property
    def steps(self) -> int:
        return self.sig.shape[0] - 1

    def t(self, k: int) -> float:
        return float(self.ts[k])

    def finite_start(self) -> None:
        """For builders whose rows need a finite first sigma."""
        if math.isinf(self.sig[0]):
            raise ValueError(f"sampler {self.name!r} cannot start at sigma = inf (flow time 1, zero terminal "
                             "SNR); use euler, euler_ancestral, lcm, heun, ddim, ddpm, dpmpp_2m, dpmpp_2m_sde "
                             "or unipc, or a schedule that starts below inf")

    def add(self, step: int, sigma: float, sigma_next: float, *, a: float = 0.0, b_new: float = 0.0,
            lags: Optional[Dict[int, float]] = None, g_eps: float = 0.0, c: float = 0.0, write: bool = True,
            timestep: float = math.nan, lv=(0.0, 0.0), hist=None, g_m: float = 0.0) -> None:
        """One row. ``hist``: the entry's form name or ``(h_x, h_x0, h_m)`` (default: the table's form)."""
        if hist is None or isinstance(hist, str):
            hist = _history_coefficients(hist or self.history, float(sigma))
        self.hists.append(tuple(float(v) for v in hist) + (float(g_m),))
        b_slots = np.zeros(self.num_slots)
        for lag, coef in (lags or {}).items():
            if coef == 0:
                continue
            if not 1 <= lag <= min(self.num_slots, self.written):
                raise AssertionError(f"{self.name}: lag {lag} not available at row {len(self.rows)}")
            b_slots[(self.written - lag) % self.num_slots] += coef
        slot = -1
        if write:
            slot = self.written % self.num_slots
            self.written += 1
        self.rows.append((sigma, sigma_next, timestep, step, a, g_eps, b_new, c, b_slots, slot, lv[0], lv[1]))

    def build(self, learned_range: bool = False) -> SamplerTable:
        cols = list(zip(*self.rows, strict=True))
        f64 = lambda k: np.asarray(cols[k], dtype=np.float64)
        return SamplerTable(
            name=self.name, history=self.history, num_slots=self.num_slots, sigma=f64(0), sigma_next=f64(1),
            timestep=f64(2), step=np.asarray(cols[3], dtype=np.int64), a=f64(4), g_eps=f64(5), b_new=f64(6),
            c=f64(7), b_slots=np.stack(cols[8]).astype(np.float64), write_slot=np.asarray(cols[9], np.int64),
            lv_lo=f64(10), lv_hi=f64(11), learned_range=learned_range, options=dict(self.options),
            h_x=np.asarray([h[0] for h in self.hists]), h_x0=np.asarray([h[1] for h in self.hists]),
            h_m=np.asarray([h[2] for h in self.hists]), g_m=np.asarray([h[3] for h in self.hists]))


def concat_tables(parts: Sequence[SamplerTable]) -> SamplerTable:
    """Join tables (one history form and ring size) into one; the steps of ``parts[k]`` follow those of
    ``parts[k - 1]``. For samplers with no history across the joints (k-diffusion's churn, identity rows)."""
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
    first = parts[0]
    steps, offset = [], 0
    for p in parts:
        steps.append(p.step + offset)
        offset += p.num_steps
    return SamplerTable(
        name=first.name, history=first.history, num_slots=first.num_slots, sigma=cat("sigma"),
        sigma_next=cat("sigma_next"), timestep=cat("timestep"), step=np.concatenate(steps), a=cat("a"),
        g_eps=cat("g_eps"), b_new=cat("b_new"), c=cat("c"), b_slots=np.concatenate([p.b_slots for p in parts]),
        write_slot=cat("write_slot"), lv_lo=cat("lv_lo"), lv_hi=cat("lv_hi"), learned_range=first.learned_range,
        options=dict(first.options), h_x=cat("h_x"), h_x0=cat("h_x0"), h_m=cat("h_m"), g_m=cat("g_m"),
        frame=first.frame)
