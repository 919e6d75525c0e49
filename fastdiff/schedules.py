"""Noise schedules and the sigma view every sampler runs on.

A schedule maps a model's time axis to a noise level. fastdiff's samplers never look at the time axis:
they work in the *sigma view* of Karras et al. (2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Sec. 2 and Table 1), where the state is ``x = x0 + sigma * eps``. A variance-preserving
(VP) model sees ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``, which is the sigma-view state scaled
by ``sqrt(abar_t)`` with

    sigma_t = sqrt((1 - abar_t) / abar_t),    abar_t = 1 / (1 + sigma_t^2).

So every sampler table built from a list of sigmas runs on every schedule here; the schedule only supplies
the model's input scale (``1 / sqrt(1 + sigma^2)`` for VP, 1 for VE) and the model's timestep for a sigma.

Schedules (all arithmetic in float64 on the host):

- :class:`VPSchedule`: discrete VP (DDPM, ADM, DiT, U-ViT, Stable Diffusion): ``linear``,
  ``scaled_linear``, ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, Eq. 17), or explicit ``betas`` /
  ``alphas_cumprod``.
- :class:`VPSDESchedule`: the continuous VP SDE of Song et al. (2021, "Score-Based Generative Modeling
  through SDEs", Eq. 11 and App. B): ``beta(t) = beta_min + (beta_max - beta_min) t``.
- :class:`VESDESchedule`: the continuous VE SDE (same paper, Eq. 9): geometric
  ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.
- :class:`FlowSchedule`: the rectified-flow path ``x_s = (1 - s) x0 + s eps`` (Liu et al. 2022, "Flow
  Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3), whose sigma view is
  ``sigma = s / (1 - s)`` and whose model frame is ``x_s = x / (1 + sigma)``. Shifts: static (SD3,
  ``s' = k s / (1 + (k - 1) s)``), dynamic from the image's token count (Flux: ``mu``, exponential or linear
  time shift), ``shift_terminal`` (LTX-Video). ``s = 1`` (pure noise) is ``sigma = inf``: a table row may
  start there (see :mod:`fastdiff.samplers`).

Spacings, each returning ``steps`` sigmas and a final 0 (k-diffusion's convention):
:func:`karras_sigmas` (Karras et al. 2022, Eq. 5), :func:`exponential_sigmas` (uniform in log sigma),
:func:`beta_sigmas` (Lee et al. 2024, "Beta Sampling is All You Need": Beta(0.6, 0.6) quantiles),
``schedule.sigmas(steps, "uniform")`` (uniform in the model's time). :func:`spaced_timesteps` gives
diffusers' ``leading`` / ``trailing`` / ``linspace`` integer timesteps (Lin et al. 2023, "Common Diffusion
Noise Schedules and Sample Steps are Flawed", Table 2) with ``steps_offset``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "BETA_SCHEDULES",
    "SPACINGS",
    "VPSchedule",
    "VPSDESchedule",
    "VESDESchedule",
    "FlowSchedule",
    "betas_for_schedule",
    "rescale_zero_terminal_snr",
    "karras_sigmas",
    "exponential_sigmas",
    "beta_sigmas",
    "flow_shift",
    "time_shift",
    "stretch_to_terminal",
    "dynamic_shift_mu",
    "spaced_timesteps",
    "sigma_to_alpha",
    "alphas_cumprod_to_sigmas",
    "sigmas_to_alphas_cumprod",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
SPACINGS = ("karras", "exponential", "beta", "uniform", "leading", "trailing", "linspace")
FLOW_SPACINGS = ("uniform", "trailing", "karras", "exponential", "beta")
TIME_SHIFTS = ("exponential", "linear")

ArrayLike = Union[np.ndarray, Sequence[float], torch.Tensor, float]


def _f64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _like(out: np.ndarray, ref):
    """``out`` as the kind of thing ``ref`` was: a float or a numpy array (tensors take torch paths)."""
    if np.ndim(ref) == 0 and not isinstance(ref, np.ndarray):
        return float(out)
    return out


def _interp_torch(x: torch.Tensor, xp: np.ndarray, fp: np.ndarray) -> torch.Tensor:
    """``np.interp`` on a tensor's device in float64 (xp increasing; clamps outside the range)."""
    xp_t = torch.as_tensor(xp, dtype=torch.float64, device=x.device)
    fp_t = torch.as_tensor(fp, dtype=torch.float64, device=x.device)
    xd = x.to(torch.float64)
    hi = torch.searchsorted(xp_t, xd.contiguous()).clamp(1, xp_t.numel() - 1)
    x0, x1, y0, y1 = xp_t[hi - 1], xp_t[hi], fp_t[hi - 1], fp_t[hi]
    w = ((xd - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + w * (y1 - y0)


def alphas_cumprod_to_sigmas(alphas_cumprod: ArrayLike) -> np.ndarray:
    """``sigma = sqrt((1 - abar) / abar)``, the sigma view of a VP schedule."""
    abar = _f64(alphas_cumprod)
    return np.sqrt((1.0 - abar) / abar)


def sigmas_to_alphas_cumprod(sigmas: ArrayLike) -> np.ndarray:
    """``abar = 1 / (1 + sigma^2)`` (sigma = 0 gives abar = 1)."""
    s = _f64(sigmas)
    return 1.0 / (1.0 + s * s)


def sigma_to_alpha(sigmas: ArrayLike) -> np.ndarray:
    """VP signal scale ``sqrt(abar) = 1 / sqrt(1 + sigma^2)``: the model frame is ``x_vp = alpha * x``."""
    s = _f64(sigmas)
    return 1.0 / np.sqrt(1.0 + s * s)


def _append_zero(sigmas: np.ndarray, append_zero: bool) -> np.ndarray:
    return np.concatenate([sigmas, [0.0]]) if append_zero else sigmas


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return int(steps)


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    if not (sigma_min > 0 and sigma_max >= sigma_min and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_min and sigma_max must satisfy 0 < sigma_min <= sigma_max < inf, got "
                         f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  append_zero: bool = True) -> np.ndarray:
    """Karras et al. (2022), Eq. 5: ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    Returns ``steps`` decreasing sigmas (float64) and, by default, a final 0.
    """
    steps = _check_steps(steps)
    _check_sigma_range(sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho, append_zero)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float,
                       append_zero: bool = True) -> np.ndarray:
    """Sigmas uniform in ``log sigma`` from ``sigma_max`` down to ``sigma_min`` (and a final 0)."""
    steps = _check_steps(steps)
    _check_sigma_range(sigma_min, sigma_max)
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)), append_zero)


def beta_sigmas(steps: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6,
                append_zero: bool = True) -> np.ndarray:
    """Lee et al. (2024), "Beta Sampling is All You Need": ``sigma_min + ppf(1 - i/(n-1)) (sigma_max - sigma_min)``
    with ``ppf`` the quantile function of Beta(alpha, beta) (scipy's ``beta.ppf``), and a final 0."""
    steps = _check_steps(steps)
    if not (0 <= sigma_min <= sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_min and sigma_max must satisfy 0 <= sigma_min <= sigma_max < inf, got "
                         f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as e:  # pragma: no cover - scipy comes with the dev extra
        raise ImportError("beta sigmas need scipy (pip install scipy)") from e
    ppf = beta_dist.ppf(1 - np.linspace(0, 1, steps), alpha, beta)
    return _append_zero(sigma_min + ppf * (sigma_max - sigma_min), append_zero)


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0,
                     multistep: bool = False, last_timestep: Optional[int] = None) -> np.ndarray:
    """diffusers' integer timestep spacings, decreasing, as int64.

    ``leading``: ``arange(steps) * (N // steps) + steps_offset``;
    ``trailing``: ``round(arange(N, 0, -N / steps)) - 1``;
    ``linspace``: ``round(linspace(0, N - 1, steps))`` (Lin et al. 2023, Table 2). This is the form of
    DDPMScheduler / DDIMScheduler. ``multistep=True`` gives the form of DPMSolverMultistepScheduler and
    UniPCMultistepScheduler, which lay out ``steps + 1`` points (up to ``last_timestep``, default N) and drop
    the last.
    """
    steps = _check_steps(steps)
    n = int(num_train_timesteps)
    if n < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps!r}")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    last = n if last_timestep is None else int(last_timestep)
    if not multistep:
        if steps > n:
            raise ValueError(f"steps={steps} must not exceed num_train_timesteps={n}")
        if spacing == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + int(steps_offset)
        elif spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    else:
        if spacing == "leading":
            ratio = last // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(steps_offset)
        elif spacing == "trailing":
            ts = np.arange(last, 0, -n / steps).round().astype(np.int64) - 1
        else:
            ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return np.ascontiguousarray(ts)


def betas_for_schedule(beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                       beta_start: float = 1e-4, beta_end: float = 0.02,
                       max_beta: float = 0.999) -> np.ndarray:
    """Named beta schedules in float64.

    ``linear`` (Ho et al. 2020): ``linspace(beta_start, beta_end, N)``; ``scaled_linear`` (Stable Diffusion):
    ``linspace(sqrt(beta_start), sqrt(beta_end), N)^2``; ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021,
    Eq. 17): ``beta_i = min(1 - abar((i+1)/N) / abar(i/N), max_beta)``,
    ``abar(t) = cos((t + 0.008) / 1.008 * pi/2)^2``.
    ``exp`` (diffusers' Heun): ``abar(t) = exp(-12 t)`` discretised like the cosine one.
    guided-diffusion's ``linear`` scales the endpoints by ``1000 / N``; pass them so scaled for other N.
    diffusers builds the same schedules in float32; pass its ``alphas_cumprod`` to :class:`VPSchedule` to
    reproduce it bit for bit.
    """
    n = _check_train_steps(num_train_timesteps)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    if beta_schedule in ("squaredcos_cap_v2", "exp"):
        if beta_schedule == "exp":
            f = lambda t: math.exp(-12.0 * t)
        else:
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=np.float64)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def _check_train_steps(num_train_timesteps) -> int:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
            or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    return int(num_train_timesteps)


def rescale_zero_terminal_snr(betas: ArrayLike) -> np.ndarray:
    """Lin et al. (2023), Algorithm 1: shift and scale ``sqrt(abar)`` so that the last timestep has
    ``abar = 0`` (zero terminal SNR) and the first keeps its value; returns the new betas (the last is 1)."""
    b = _f64(betas).reshape(-1)
    root = np.sqrt(np.cumprod(1.0 - b))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    abar = root * root
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def flow_shift(s: ArrayLike, shift: float):
    """SD3's static shift of flow time (Esser et al. 2024, Eq. 23): ``k s / (1 + (k - 1) s)``."""
    t = _f64(s)
    return _like(shift * t / (1 + (shift - 1) * t), s)


def time_shift(s: ArrayLike, mu: float, kind: str = "exponential", power: float = 1.0):
    """Flux's resolution-dependent shift of flow time: ``e^mu / (e^mu + (1/s - 1)^power)`` (exponential) or
    ``mu / (mu + (1/s - 1)^power)`` (linear). ``s = 0`` stays 0 and ``s = 1`` stays 1."""
    if kind not in TIME_SHIFTS:
        raise ValueError(f"time_shift_type must be one of {TIME_SHIFTS}, got {kind!r}")
    t = _f64(s)
    k = math.exp(mu) if kind == "exponential" else float(mu)
    with np.errstate(divide="ignore"):
        out = k / (k + (1 / t - 1) ** power)
    return _like(out, s)


def stretch_to_terminal(s: ArrayLike, shift_terminal: float) -> np.ndarray:
    """LTX-Video's ``shift_terminal``: stretch ``1 - s`` so that the last flow time is ``shift_terminal``."""
    t = _f64(s)
    one_minus = 1 - t
    return 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's ``mu``: linear in the image's token count, ``base_shift`` at ``base_seq_len`` tokens and
    ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


def frame_scale(sigma: ArrayLike, frame: str):
    """``alpha`` with ``x_frame = alpha x_sigma`` for a state frame: ``"sigma"`` 1, ``"vp"``
    ``1 / sqrt(1 + sigma^2)``, ``"flow"`` ``1 / (1 + sigma)`` (numpy float64 or a float64 tensor)."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if isinstance(sigma, torch.Tensor):
        sd = sigma.to(torch.float64)
        if frame == "vp":
            return torch.rsqrt(1 + sd * sd)
        return torch.ones_like(sd) if frame == "sigma" else 1 / (1 + sd)
    sd = _f64(sigma)
    if frame == "vp":
        out = sigma_to_alpha(sd)
    else:
        out = np.ones_like(sd) if frame == "sigma" else 1 / (1 + sd)
    return _like(out, sigma)


FRAMES = ("sigma", "vp", "flow")


class _SigmaSchedule:
    """What every schedule gives the samplers: sigma range, model input scale and model timestep.

    ``frame`` names the model's own frame (``"vp"``: ``x / sqrt(1 + sigma^2)``, ``"sigma"``: the sigma view
    itself (VE), ``"flow"``: ``x / (1 + sigma)``); ``default_spacing`` is what ``sigmas(steps)`` lays out.
    """

    frame = "vp"
    default_spacing = "karras"
    sigma_min: float
    sigma_max: float

    @property
    def variance_preserving(self) -> bool:
        return self.frame == "vp"

    def model_input_scale(self, sigma: ArrayLike):
        """Factor from the sigma-view state to the model's input: ``1 / sqrt(1 + sigma^2)`` (VP),
        ``1 / (1 + sigma)`` (flow) or 1 (VE). Tensors stay on their device (float64): no host read."""
        return frame_scale(sigma, self.frame)

    def initial_scale(self, sigma: float, frame: str = "sigma") -> float:
        """Std of the starting noise, in ``frame`` (the sigma view or the model's own frame), at ``sigma``.

        As diffusers starts its pipelines: the model-frame state is ``randn`` for VP and flow schedules
        (``sqrt(1 + sigma^2) randn`` in the sigma view for VP), ``sigma randn`` for VE.
        """
        sigma = float(sigma)
        if frame == self.frame or self.frame == "sigma":
            return 1.0 if self.frame != "sigma" else sigma
        if frame != "sigma":
            raise ValueError(f"frame must be 'sigma' or this schedule's frame {self.frame!r}, got {frame!r}")
        if not math.isfinite(sigma):
            raise ValueError("a run that starts at sigma = inf (flow time s = 1) needs the model's frame "
                             f"({self.frame!r}), not the sigma view")
        return 1.0 / float(frame_scale(sigma, self.frame))

    def alpha(self, sigma: ArrayLike):
        """Signal scale of the model frame for this sigma (``sqrt(abar)`` for VP, 1 for VE)."""
        return self.model_input_scale(sigma)

    def sigma_to_timestep(self, sigma: ArrayLike):  # pragma: no cover - each schedule defines it
        raise NotImplementedError

    def timestep_to_sigma(self, timestep: ArrayLike):  # pragma: no cover
        raise NotImplementedError

    def _uniform(self, steps: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def sigmas(self, steps: int, spacing: Optional[str] = None, rho: float = 7.0, final: str = "zero",
               steps_offset: int = 0, sigma_min: Optional[float] = None,
               sigma_max: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """Sampling sigmas and the model timesteps at them: ``(sigmas (steps + 1,), timesteps (steps,))``.

        ``spacing``: ``karras`` | ``exponential`` | ``beta`` (between this schedule's sigma_min and
        sigma_max, or the given ones), ``uniform`` (uniform in the schedule's time: k-diffusion's
        ``DiscreteSchedule.get_sigmas`` for discrete VP, ``get_sigmas_vp`` for the VP SDE, geometric for
        the VE SDE),
        or, for discrete schedules, diffusers' ``leading`` | ``trailing`` | ``linspace`` integer timesteps
        (with ``steps_offset``). ``final``: ``"zero"`` appends sigma 0 (denoise fully at the end),
        ``"sigma_min"`` appends the schedule's smallest sigma.
        """
        steps = _check_steps(steps)
        spacing = self.default_spacing if spacing is None else spacing
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
        lo = self.sigma_min if sigma_min is None else float(sigma_min)
        hi = self.sigma_max if sigma_max is None else float(sigma_max)
        if spacing == "karras":
            s = karras_sigmas(steps, lo, hi, rho, append_zero=False)
        elif spacing == "exponential":
            s = exponential_sigmas(steps, lo, hi, append_zero=False)
        elif spacing == "beta":
            s = beta_sigmas(steps, lo, hi, append_zero=False)
        elif spacing == "uniform":
            s = self._uniform(steps)
        else:
            ts = self._spaced(steps, spacing, steps_offset)
            s = _f64(self.timestep_to_sigma(ts.astype(np.float64)))
        t = _f64(self.sigma_to_timestep(s))
        if spacing in ("leading", "trailing", "linspace"):
            t = np.round(t)
        last = 0.0 if final == "zero" else self.sigma_min
        return np.concatenate([s, [last]]), t

    def _spaced(self, steps, spacing, steps_offset):
        raise ValueError(f"spacing {spacing!r} needs a discrete schedule (VPSchedule)")


class VPSchedule(_SigmaSchedule):
    """Discrete variance-preserving schedule over ``num_train_timesteps`` integer timesteps.

    Args:
        beta_schedule: ``"linear"`` | ``"scaled_linear"`` | ``"squaredcos_cap_v2"``
            (:func:`betas_for_schedule`).
        num_train_timesteps, beta_start, beta_end: as in diffusers' scheduler configs.
        betas: explicit betas (N,), overriding the name.
        alphas_cumprod: explicit ``abar`` (N,), overriding both.

    Attributes (float64 numpy): ``betas``, ``alphas_cumprod``, ``train_sigmas`` (sigma at t = 0..N-1,
    increasing), ``log_sigmas``; floats ``sigma_min = train_sigmas[0]``, ``sigma_max = train_sigmas[-1]``.

    Timesteps between integers map to sigma by linear interpolation of ``log sigma`` (k-diffusion's
    ``DiscreteSchedule``); ``interpolation="linear"`` interpolates sigma itself (diffusers' Euler schedulers).
    """

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, betas: Optional[ArrayLike] = None,
                 alphas_cumprod: Optional[ArrayLike] = None):
        if alphas_cumprod is not None:
            abar = _f64(alphas_cumprod).reshape(-1)
            if abar.size < 2:
                raise ValueError(f"alphas_cumprod must have at least 2 entries, got {abar.size}")
            if not np.all((abar > 0) & (abar <= 1)) or np.any(np.diff(abar) >= 0):
                raise ValueError("alphas_cumprod must be strictly decreasing values in (0, 1]")
            prev = np.concatenate([[1.0], abar[:-1]])
            self.betas = 1.0 - abar / prev
        else:
            if betas is not None:
                b = _f64(betas).reshape(-1)
                if b.size < 2:
                    raise ValueError(f"betas must have at least 2 entries, got {b.size}")
                if not np.all((b > 0) & (b < 1)):
                    raise ValueError(f"betas must lie in (0, 1), got values in [{b.min():.4g}, {b.max():.4g}]")
            else:
                _check_train_steps(num_train_timesteps)
                b = betas_for_schedule(beta_schedule, num_train_timesteps, beta_start, beta_end)
                if not np.all((b > 0) & (b < 1)):
                    raise ValueError(f"beta_start={beta_start!r} and beta_end={beta_end!r} give betas outside "
                                     f"(0, 1) for beta_schedule={beta_schedule!r}")
            self.betas = b
            abar = np.cumprod(1.0 - b)
        self.alphas_cumprod = abar
        self.num_train_timesteps = int(abar.size)
        self.train_sigmas = alphas_cumprod_to_sigmas(abar)
        self.log_sigmas = np.log(self.train_sigmas)
        self.sigma_min = float(self.train_sigmas[0])
        self.sigma_max = float(self.train_sigmas[-1])

    def __repr__(self) -> str:
        return (f"VPSchedule(num_train_timesteps={self.num_train_timesteps}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g})")

    def _uniform(self, steps):
        return _f64(self.timestep_to_sigma(np.linspace(self.num_train_timesteps - 1, 0, steps)))

    def _spaced(self, steps, spacing, steps_offset):
        return spaced_timesteps(self.num_train_timesteps, steps, spacing, steps_offset)

    def timestep_to_sigma(self, timestep: ArrayLike, interpolation: str = "log"):
        """Sigma at (possibly fractional) timesteps in [0, N-1]; exact at integers. Tensors stay on device."""
        if interpolation not in ("log", "linear"):
            raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")
        grid = np.arange(self.num_train_timesteps, dtype=np.float64)
        if isinstance(timestep, torch.Tensor):
            if interpolation == "log":
                return _interp_torch(timestep, grid, self.log_sigmas).exp()
            return _interp_torch(timestep, grid, self.train_sigmas)
        t = _f64(timestep)
        if np.any(~np.isfinite(t)) or np.any(t < 0) or np.any(t > self.num_train_timesteps - 1):
            raise ValueError(f"timestep must lie in [0, {self.num_train_timesteps - 1}]")
        if interpolation == "log":
            out = np.exp(np.interp(t, grid, self.log_sigmas))
        else:
            out = np.interp(t, grid, self.train_sigmas)
        return _like(out, timestep)

    def sigma_to_timestep(self, sigma: ArrayLike):
        """Fractional timestep whose log-sigma interpolation gives ``sigma`` (clamped to [0, N-1]).

        The inverse of :meth:`timestep_to_sigma` (k-diffusion ``DiscreteSchedule.sigma_to_t``, diffusers
        ``_sigma_to_t``); sigma 0 maps to timestep 0. Tensors stay on their device (float64).
        """
        grid = np.arange(self.num_train_timesteps, dtype=np.float64)
        if isinstance(sigma, torch.Tensor):
            return _interp_torch(sigma.to(torch.float64).clamp_min(1e-300).log(), self.log_sigmas, grid)
        s = _f64(sigma)
        if np.any(np.isnan(s)) or np.any(s < 0):
            raise ValueError("sigma must be >= 0")
        out = np.interp(np.log(np.maximum(s, 1e-300)), self.log_sigmas, grid)
        return _like(out, sigma)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` at integer timesteps (N,), in the model frame."""
        abar = torch.as_tensor(self.alphas_cumprod, device=x0.device)[timesteps.long()]
        abar = abar.reshape(-1, *([1] * (x0.dim() - 1)))
        return (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).to(x0.dtype)


class VPSDESchedule(_SigmaSchedule):
    """Continuous VP SDE, ``beta(t) = beta_min + (beta_max - beta_min) t`` on ``t in [eps, 1]``.

    ``abar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))`` (Song et al. 2021, Eq. 33), so
    ``sigma(t) = sqrt(expm1(beta_min t + (beta_max - beta_min) t^2 / 2))`` (k-diffusion ``get_sigmas_vp``).
    The model's timestep is ``t * time_scale`` (score_sde feeds ``999 t`` to DDPM-trained networks).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3,
                 time_scale: float = 1.0):
        if not (beta_max > beta_min >= 0):
            raise ValueError(f"need beta_max > beta_min >= 0, got beta_min={beta_min}, beta_max={beta_max}")
        if not (0 < eps < 1):
            raise ValueError(f"eps must lie in (0, 1), got {eps}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.eps, self.time_scale = float(eps), float(time_scale)
        self.sigma_min = float(self._sigma(self.eps))
        self.sigma_max = float(self._sigma(1.0))

    def __repr__(self) -> str:
        return f"VPSDESchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, eps={self.eps})"

    def _sigma(self, t):
        t = np.asarray(t, dtype=np.float64)
        return np.sqrt(np.expm1(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t))

    def _uniform(self, steps):
        return self._sigma(np.linspace(1.0, self.eps, steps))

    def timestep_to_sigma(self, timestep: ArrayLike):
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(torch.float64) / self.time_scale
            return torch.expm1(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t).sqrt()
        return _like(self._sigma(_f64(timestep) / self.time_scale), timestep)

    def sigma_to_timestep(self, sigma: ArrayLike):
        """Invert ``log(1 + sigma^2) = beta_min t + beta_d t^2 / 2`` for t (the positive root)."""
        bd = self.beta_max - self.beta_min
        if isinstance(sigma, torch.Tensor):
            sd = sigma.to(torch.float64)
            t = (torch.sqrt(self.beta_min ** 2 + 2 * bd * torch.log1p(sd * sd)) - self.beta_min) / bd
            return t * self.time_scale
        s = _f64(sigma)
        if np.any(np.isnan(s)) or np.any(s < 0):
            raise ValueError("sigma must be >= 0")
        t = (np.sqrt(self.beta_min ** 2 + 2 * bd * np.log1p(s * s)) - self.beta_min) / bd
        return _like(t * self.time_scale, sigma)


class VESDESchedule(_SigmaSchedule):
    """Continuous VE SDE, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` on ``t in [0, 1]``.

    The state is not scaled (model input scale 1). NCSN++ networks are conditioned on sigma itself, so the
    model timestep is sigma by default (``timestep="sigma"``); ``timestep="t"`` passes ``t`` instead.
    """

    frame = "sigma"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, timestep: str = "sigma"):
        _check_sigma_range(sigma_min, sigma_max)
        if timestep not in ("sigma", "t"):
            raise ValueError(f"timestep must be 'sigma' or 't', got {timestep!r}")
        self.sigma_min, self.sigma_max, self.timestep = float(sigma_min), float(sigma_max), timestep

    def __repr__(self) -> str:
        return f"VESDESchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"

    def _uniform(self, steps):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** np.linspace(1.0, 0.0, steps)

    def timestep_to_sigma(self, timestep: ArrayLike):
        if isinstance(timestep, torch.Tensor):
            td = timestep.to(torch.float64)
            if self.timestep == "sigma":
                return td
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** td
        t = _f64(timestep)
        if self.timestep == "sigma":
            return _like(t, timestep)
        return _like(self.sigma_min * (self.sigma_max / self.sigma_min) ** t, timestep)

    def sigma_to_timestep(self, sigma: ArrayLike):
        if isinstance(sigma, torch.Tensor):
            sd = sigma.to(torch.float64)
            if self.timestep == "sigma":
                return sd
            span = math.log(self.sigma_max / self.sigma_min)
            return torch.log(sd.clamp_min(1e-300) / self.sigma_min) / span
        s = _f64(sigma)
        if np.any(np.isnan(s)) or np.any(s < 0):
            raise ValueError("sigma must be >= 0")
        if self.timestep == "sigma":
            return _like(s, sigma)
        t = np.log(np.maximum(s, 1e-300) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return _like(t, sigma)


class FlowSchedule(_SigmaSchedule):
    """Rectified flow ``x_s = (1 - s) x0 + s eps``, flow time ``s`` in (0, 1], model timestep ``N s``.

    The sigma view is ``sigma = s / (1 - s)`` (so ``s = 1`` is ``sigma = inf``) and the model frame is
    ``x_s = x / (1 + sigma)``; a velocity model (``prediction="flow"``) predicts ``v = eps - x0``.

    Args (diffusers' ``FlowMatchEulerDiscreteScheduler`` names):
        num_train_timesteps: N; the model is called at ``N s``.
        shift: SD3's static shift (:func:`flow_shift`), applied when ``use_dynamic_shifting`` is off.
        use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type:
            Flux's shift from the token count (:func:`dynamic_shift_mu`, :func:`time_shift`).
        shift_terminal: stretch the schedule so that it ends at this flow time (:func:`stretch_to_terminal`).

    ``sigmas(steps, spacing, mu=None, image_seq_len=None)`` lays out the flow times as diffusers does:
    ``uniform`` (its default: uniform in the training grid from ``s = 1`` to the shifted ``1 / N``, then
    shifted), ``trailing`` (``1, 1 - 1/n, ..., 1/n``, then shifted: what the Flux and SD3 pipelines pass
    as ``sigmas``), or ``karras`` / ``exponential`` / ``beta`` spacings computed on the shifted flow times
    (not on sigma). Returned sigmas are in the sigma view (the first is ``inf`` when ``s = 1``).
    """

    frame = "flow"
    default_spacing = "uniform"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential",
                 shift_terminal: Optional[float] = None):
        self.num_train_timesteps = _check_train_steps(num_train_timesteps)
        if not (isinstance(shift, (int, float)) and shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        if time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFTS}, got {time_shift_type!r}")
        if shift_terminal is not None and not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in (0, 1) or be None, got {shift_terminal!r}")
        self.shift, self.use_dynamic_shifting = float(shift), bool(use_dynamic_shifting)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_image_seq_len, self.max_image_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        self.time_shift_type, self.shift_terminal = time_shift_type, shift_terminal
        n = self.num_train_timesteps
        # the training grid s = 1/N .. 1 (static shift applied, as diffusers lays it out at construction)
        grid = np.arange(1, n + 1, dtype=np.float64) / n
        self.train_flow_times = grid if self.use_dynamic_shifting else flow_shift(grid, self.shift)
        self.s_min, self.s_max = float(self.train_flow_times[0]), float(self.train_flow_times[-1])
        self.sigma_min = self.s_min / (1 - self.s_min)
        self.sigma_max = math.inf

    def __repr__(self) -> str:
        shift = "dynamic" if self.use_dynamic_shifting else f"{self.shift:g}"
        return f"FlowSchedule(num_train_timesteps={self.num_train_timesteps}, shift={shift})"

    # -- flow time <-> sigma <-> timestep --------------------------------------------------------------

    @staticmethod
    def flow_time(sigma: ArrayLike):
        """``s = sigma / (1 + sigma)`` (``inf`` -> 1). Tensors stay on their device."""
        if isinstance(sigma, torch.Tensor):
            sd = sigma.to(torch.float64)
            return torch.where(torch.isinf(sd), torch.ones_like(sd), sd / (1 + sd))
        sd = _f64(sigma)
        with np.errstate(invalid="ignore"):
            out = np.where(np.isinf(sd), 1.0, sd / (1 + sd))
        return _like(out, sigma)

    @staticmethod
    def flow_sigma(s: ArrayLike):
        """``sigma = s / (1 - s)`` (``s = 1`` -> inf)."""
        t = _f64(s)
        if np.any(np.isnan(t)) or np.any(t < 0) or np.any(t > 1):
            raise ValueError("flow times must lie in [0, 1]")
        with np.errstate(divide="ignore"):
            out = np.where(t >= 1, np.inf, t / np.maximum(1 - t, 1e-300))
        return _like(out, s)

    def sigma_to_timestep(self, sigma: ArrayLike):
        """The model timestep ``N s``."""
        return self.flow_time(sigma) * self.num_train_timesteps

    def timestep_to_sigma(self, timestep: ArrayLike):
        if isinstance(timestep, torch.Tensor):
            s = timestep.to(torch.float64) / self.num_train_timesteps
            return s / (1 - s)
        return self.flow_sigma(_f64(timestep) / self.num_train_timesteps) if np.ndim(timestep) else \
            float(self.flow_sigma(np.asarray([float(timestep) / self.num_train_timesteps]))[0])

    # -- shifts and layouts ----------------------------------------------------------------------------

    def mu(self, image_seq_len: int) -> float:
        """Flux's ``mu`` for an image of ``image_seq_len`` tokens."""
        return dynamic_shift_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                                self.base_shift, self.max_shift)

    def shift_times(self, s: ArrayLike, mu: Optional[float] = None) -> np.ndarray:
        """The configured shift (dynamic with ``mu``, else static) and ``shift_terminal``."""
        t = _f64(s)
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting needs mu (or image_seq_len)")
            t = time_shift(t, float(mu), self.time_shift_type)
        else:
            t = flow_shift(t, self.shift)
        if self.shift_terminal:
            t = stretch_to_terminal(t, self.shift_terminal)
        return t

    def flow_times(self, steps: int, spacing: Optional[str] = None, mu: Optional[float] = None,
                   image_seq_len: Optional[int] = None) -> np.ndarray:
        """``steps`` decreasing flow times (float64) for a spacing in ``FLOW_SPACINGS``."""
        steps = _check_steps(steps)
        spacing = self.default_spacing if spacing is None else spacing
        if spacing not in FLOW_SPACINGS:
            raise ValueError(f"spacing must be one of {FLOW_SPACINGS} for a flow schedule, got {spacing!r}")
        if mu is None and image_seq_len is not None and self.use_dynamic_shifting:
            mu = self.mu(image_seq_len)
        if spacing == "trailing":
            s = np.linspace(1.0, 1.0 / steps, steps)
        else:
            n = self.num_train_timesteps
            s = np.linspace(self.s_max * n, self.s_min * n, steps) / n
        s = self.shift_times(s, mu)
        if spacing in ("karras", "exponential", "beta"):
            lo, hi = float(s[-1]), float(s[0])
            if spacing == "karras":
                s = karras_sigmas(steps, lo, hi, append_zero=False)
            elif spacing == "exponential":
                s = exponential_sigmas(steps, lo, hi, append_zero=False)
            else:
                s = beta_sigmas(steps, lo, hi, append_zero=False)
        return s

    def sigmas(self, steps: int, spacing: Optional[str] = None, final: str = "zero", *,
               mu: Optional[float] = None, image_seq_len: Optional[int] = None,
               **unused) -> tuple[np.ndarray, np.ndarray]:
        """``(sigmas (steps + 1,), timesteps (steps,))``: sigma view (``inf`` where s = 1), final 0, and the
        model timesteps ``N s``. ``final="sigma_min"`` ends at the smallest training flow time instead."""
        s = self.flow_times(steps, spacing, mu, image_seq_len)
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
        last = 0.0 if final == "zero" else self.s_min
        return np.concatenate([self.flow_sigma(s), [self.flow_sigma(np.array([last]))[0]]]), \
            s * self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, s: ArrayLike) -> torch.Tensor:
        """``(1 - s) x0 + s noise`` at flow times (N,) (diffusers' ``scale_noise``), in the model frame."""
        st = torch.as_tensor(s, dtype=torch.float64, device=x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
        return ((1 - st) * x0.double() + st * noise.double()).to(x0.dtype)
