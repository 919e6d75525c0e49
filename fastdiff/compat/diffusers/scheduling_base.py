"""The surface every drop-in shares: diffusers' config and output classes (or small local stand-ins when
diffusers is absent), the float32 betas, timestep and sigma layouts diffusers uses, and the table-backed base
class whose ``step`` is one fused ``fastdiff.ops.sampler_step`` call.

A scheduler builds :class:`fastdiff.samplers.SamplerTable` rows and the base packs them (float64) for the
frame the scheduler's sample lives in (``_state_frame``: diffusers' VP model frame, the sigma view, or the
flow frame), caches them per run, picks the row of the step, checks on the host that the row is finite and
runs the update. Two ways to get rows:

- stateful schedulers (Euler, DPM-Solver, ...) build one table for the whole run from ``self.sigmas`` /
  ``self.timesteps`` (the same float32 layout diffusers makes) and index it by ``step_index``;
- stateless ones (DDPM, DDIM, LCM, TCD) build the row of a timestep on demand from diffusers' own float32
  formulas ("alpha form", written in the VP frame), so any timestep can be stepped, in or out of the
  schedule.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff import samplers as S
from fastdiff.schedules import frame_scale

try:  # build on diffusers' base classes when it is installed
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput

    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False

    class _Config(dict):
        """The config as a dict whose keys also read as attributes (diffusers' FrozenDict)."""

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    class ConfigMixin:
        config_name = "scheduler_config.json"

        @property
        def config(self) -> _Config:
            return self._internal_dict

        def register_to_config(self, **kwargs) -> None:
            cfg = dict(getattr(self, "_internal_dict", {}))
            cfg.update(kwargs)
            self._internal_dict = _Config(cfg)

        @classmethod
        def from_config(cls, config=None, **kwargs):
            params = inspect.signature(cls.__init__).parameters
            cfg = dict(config or {})
            cfg.update(kwargs)
            return cls(**{k: v for k, v in cfg.items() if k in params and k != "self"})

    def register_to_config(init):
        @functools.wraps(init)
        def wrapper(self, *args, **kwargs):
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self.register_to_config(**{k: v for k, v in bound.arguments.items() if k != "self"})
            init(self, *args, **kwargs)

        return wrapper

    class SchedulerMixin:
        @property
        def compatibles(self):
            return self._get_compatibles()

    class BaseOutput:
        def to_tuple(self) -> tuple:
            return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

        def __getitem__(self, k):
            return self.to_tuple()[k] if isinstance(k, int) else getattr(self, k)


@dataclass
class SchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next timestep; ``pred_original_sample``: x0 (None for multistep)."""

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None


# diffusers' KarrasDiffusionSchedulers: the classes a Stable Diffusion-style pipeline can switch between
KARRAS_SCHEDULERS = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
]


def randn_tensor(shape, generator=None, device=None, dtype=None) -> Tensor:
    """diffusers' ``randn_tensor``: a CPU generator draws on the CPU; a list draws per-sample."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=generator[i], device=rand_device, dtype=dtype)
                          for i in range(shape[0])]).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------------
# Betas and layouts, in diffusers' float32 arithmetic
# ---------------------------------------------------------------------------------------------


def _alpha_bar_betas(n: int, kind: str, max_beta: float = 0.999) -> Tensor:
    if kind == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif kind == "exp":
        f = lambda t: math.exp(t * -12.0)
    else:  # laplace
        def f(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> Tensor:
    """diffusers' betas, float32, computed the way diffusers computes them."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        root = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32)
        return root ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(num_train_timesteps, "cosine")
    if beta_schedule in ("exp", "laplace"):
        return _alpha_bar_betas(num_train_timesteps, beta_schedule)
    if beta_schedule == "sigmoid":
        ramp = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps))
        return ramp * (beta_end - beta_start) + beta_start
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented")


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2023), Algorithm 1, in diffusers' float32 arithmetic (the last abar becomes 0)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root -= last
    root *= first / (first - last)
    abar = root ** 2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


def _spaced(spacing: str, n_train: int, steps: int, steps_offset: int, dtype, multistep: bool = False,
            last: Optional[int] = None) -> np.ndarray:
    """diffusers' timestep spacings (single-step form, or the multistep form of DPM-Solver / UniPC)."""
    last = n_train if last is None else last
    if spacing == "linspace":
        if multistep:
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if dtype == np.float32:
            return np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()
        return np.linspace(0, n_train - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        if multistep:
            ratio = last // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        else:
            ts = (np.arange(0, steps) * (n_train // steps)).round()[::-1].copy().astype(dtype)
        return ts + steps_offset
    if spacing == "trailing":
        ratio = n_train / steps
        ts = np.arange(last if multistep else n_train, 0, -ratio).round().copy().astype(dtype)
        return ts - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray, torch_math: bool = False) -> np.ndarray:
    """Fractional timestep of each sigma by interpolation of log sigma (diffusers' ``_sigma_to_t``).

    ``torch_math``: diffusers passed torch tensors (KDPM2), so a float32 input stays float32 at the end.
    """
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    if torch_math:
        low = low.astype(w.dtype)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def _ends(in_sigmas, sigma_min, sigma_max):
    lo = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(in_sigmas[0])
    return lo, hi


def _karras(in_sigmas, steps: int, sigma_min=None, sigma_max=None, rho: float = 7.0) -> np.ndarray:
    lo, hi = _ends(in_sigmas, sigma_min, sigma_max)
    ramp = np.linspace(0, 1, steps)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _exponential(in_sigmas, steps: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    lo, hi = _ends(in_sigmas, sigma_min, sigma_max)
    return np.exp(np.linspace(math.log(hi), math.log(lo), steps))


def _beta_spacing(in_sigmas, steps: int, sigma_min=None, sigma_max=None, alpha: float = 0.6,
                  beta: float = 0.6) -> np.ndarray:
    from scipy.stats import beta as beta_dist

    lo, hi = _ends(in_sigmas, sigma_min, sigma_max)
    return np.array([lo + ppf * (hi - lo) for ppf in beta_dist.ppf(1 - np.linspace(0, 1, steps), alpha, beta)])


def _lu_lambdas(in_lambdas: np.ndarray, steps: int) -> np.ndarray:
    """Lu et al. (2022): uniform in lambda = log(alpha / sigma) (rho = 1)."""
    return np.linspace(float(in_lambdas[0]), float(in_lambdas[-1]), steps)


def check_inference_steps(num_inference_steps, n: int) -> int:
    """``num_inference_steps`` as an int in [1, num_train_timesteps] (integer-timestep schedules)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if num_inference_steps > n:
        raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                         f"`self.config.train_timesteps`: {n} as the unet model trained with this scheduler can "
                         f"only handle maximal {n} timesteps.")
    return int(num_inference_steps)


def reject_integer_timestep(timestep, name: str, scalar_only: bool = False) -> None:
    """diffusers' error for a step index passed as the timestep (an int, or an integer tensor; with
    ``scalar_only``, only a 0-d one, as diffusers' Euler checks)."""
    integer = isinstance(timestep, Tensor) and not timestep.is_floating_point()
    if isinstance(timestep, int) or (integer and (timestep.dim() == 0 or not scalar_only)):
        raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                         f"`{name}.step()` is not supported. Make sure to pass one of the "
                         "`scheduler.timesteps` as a timestep.")


def _check_one_spacing(cfg) -> None:
    if sum(bool(getattr(cfg, k, False)) for k in ("use_beta_sigmas", "use_exponential_sigmas",
                                                   "use_karras_sigmas")) > 1:
        raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                         "`config.use_karras_sigmas` can be used.")


_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _host(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _vp_sigmas(abar) -> np.ndarray:
    abar = np.asarray(abar, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - abar) / abar)


def frame_row(name: str, sigma: float, sigma_next: float, frame: str, *, num_slots: int = 1,
              slots: Optional[dict] = None, write_slot: int = -1, **coefficients) -> S.SamplerTable:
    """A one-row table written in ``frame`` (diffusers' own formulas): the keywords of ``_Rows.add``, with
    ring slots named directly (``slots`` {slot: coefficient}, ``write_slot``), as a scheduler that keeps its
    own state across calls addresses them."""
    rows = S._Rows(name, "x0", num_slots, np.array([1.0, 0.0]), None)
    rows.add(0, float(sigma), float(sigma_next), write=False, **coefficients)
    table = rows.build(learned_range=tuple(coefficients.get("lv", (0.0, 0.0))) != (0.0, 0.0))
    table.frame = frame
    for k, v in (slots or {}).items():
        table.b_slots[0, k] = v
    table.write_slot[0] = write_slot
    return table


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------


class _TableScheduler(SchedulerMixin, ConfigMixin):
    """What every scheduler here shares: schedule, the packed rows, row lookup, history ring, the step."""

    config_name = "scheduler_config.json"
    _compatibles: list = []
    _deprecated_kwargs: list = []
    order = 1
    _frame = "vp"            # the frame diffusers carries the sample in: "vp", "sigma" or "flow"
    _stateless = False       # True: the row follows from the timestep alone (DDPM, DDIM, LCM, TCD)
    _x0_output = True        # whether diffusers' output has pred_original_sample
    _upcast = False          # diffusers computes in float32 and returns model_output's dtype
    _warmup = False          # multistep: the table starts where the run starts
    _needs_set_timesteps = False  # step before set_timesteps raises, as diffusers' multistep solvers do
    _rowwise = False         # True: the row of each call is built from the scheduler's state (LCM, KDPM2, ...)
    _unknown_timestep_last = False  # index_for_timestep of a timestep not in the schedule: the last step

    @classmethod
    def _get_compatibles(cls) -> list:
        """diffusers' compatible classes, as fastdiff's drop-ins where fastdiff has them."""
        names = list(dict.fromkeys([cls.__name__] + list(cls._compatibles)))
        here = importlib.import_module("fastdiff.compat.diffusers")
        try:
            theirs = importlib.import_module("diffusers")
        except ImportError:
            theirs = None
        out = []
        for n in names:
            c = getattr(here, n, None) or (getattr(theirs, n, None) if theirs is not None else None)
            if c is not None:
                out.append(c)
        return out

    # -- config -----------------------------------------------------------------------------------

    def _remap_config(self, key: str, value, supported: tuple, aliases: tuple, to, label: str = "") -> None:
        """diffusers' remapping of another solver's config value: one in ``supported`` stays, one in ``aliases``
        becomes ``to`` in the config, anything else is NotImplementedError."""
        if value in supported:
            return
        if value not in aliases:
            raise NotImplementedError(f"{label}{value} is not implemented for {type(self).__name__}")
        self.register_to_config(**{key: to})

    def _check_dpm_solver(self, algorithm_type: str, solver_type: str, final_sigmas_type: str,
                          algorithms: tuple) -> None:
        """The DPM-Solver family's config (multistep, singlestep, EDM): ``deis`` runs as ``dpmsolver++`` and
        another solver's type as ``midpoint``; the noise-prediction forms need a nonzero final sigma."""
        self._remap_config("algorithm_type", algorithm_type, algorithms, ("deis",), "dpmsolver++")
        self._remap_config("solver_type", solver_type, ("midpoint", "heun"), ("logrho", "bh1", "bh2"), "midpoint")
        if self.config.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(f"`final_sigmas_type` {final_sigmas_type} is not supported for `algorithm_type` "
                             f"{self.config.algorithm_type}. Please choose `sigma_min` instead.")

    # -- schedule ---------------------------------------------------------------------------------

    def _init_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr=False, prediction_type="epsilon", clamp_terminal: bool = False,
                       predictions=_PREDICTIONS[:3]):
        """betas / alphas / alphas_cumprod as diffusers makes them. Zero terminal SNR: abar[-1] = 0, or
        2^-24 with ``clamp_terminal`` (diffusers' Euler, Euler ancestral, DPM-Solver, UniPC, DEIS)."""
        if prediction_type not in predictions:
            raise NotImplementedError(f"prediction_type must be one of {predictions}, got {prediction_type!r}")
        self.betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = _rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr and clamp_terminal:
            self.alphas_cumprod[-1] = 2 ** -24  # diffusers: so that sigma is finite
        self.num_inference_steps = None
        self._start_run()

    def _train_sigmas(self) -> np.ndarray:
        """diffusers' ``((1 - abar) / abar) ** 0.5`` in float32, as a numpy array."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def _start_run(self) -> None:
        """A new run: no step or begin index yet, and none of the last run's tables or history."""
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._run_start = None
        self._tables: dict = {}
        self._history: Optional[Tensor] = None
        self._history_key = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self):
        """Index of the current timestep in ``timesteps`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]`` (pipelines call this for img2img)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Index of ``timestep`` in ``schedule_timesteps`` (the second match if it repeats). A timestep not in
        it is an error, or the last step where ``_unknown_timestep_last`` (diffusers' multistep solvers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        idx = (schedule_timesteps == timestep).nonzero()
        if len(idx) == 0:
            if self._unknown_timestep_last:
                return len(self.timesteps) - 1
            raise ValueError(f"timestep {timestep!r} is not one of scheduler.timesteps")
        return int(idx[1 if len(idx) > 1 else 0].item())

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            if isinstance(timestep, Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
        return sample

    # -- tables -----------------------------------------------------------------------------------

    @property
    def _state_frame(self) -> str:
        """The frame of the sample diffusers' scheduler carries (flow configs override)."""
        return self._frame

    def _build_table(self, **options) -> S.SamplerTable:  # pragma: no cover - stateful schedulers define it
        raise NotImplementedError

    def _row_table(self, timestep, **options) -> S.SamplerTable:  # pragma: no cover - stateless ones do
        raise NotImplementedError

    def _call_row(self, idx: int, timestep, **options):  # pragma: no cover - rowwise ones do
        """``(cache key, () -> one-row table)`` for the call at step index ``idx``."""
        raise NotImplementedError

    def _table_sigmas(self, table: S.SamplerTable) -> np.ndarray:
        return table.sigma

    def _x0_pq(self, sigma: np.ndarray):
        """``x0 = p x + q m`` in the sigma view for the configured prediction type."""
        from fastdiff.denoiser import x0_coefficients

        pred = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
        return x0_coefficients(pred[self.config.prediction_type], sigma)

    def _pack(self, table: S.SamplerTable):
        p, q = self._x0_pq(self._table_sigmas(table))
        return S.pack_table(table, p, q, frame=self._state_frame, check=False)

    def _cached(self, key, make, device):
        """``(host table, packed (R, C) numpy, packed tensor on device)``, built once per run and key."""
        if key not in self._tables:
            table = make()
            self._tables[key] = (table, self._pack(table), {})
        table, packed, on_device = self._tables[key]
        dev = torch.device(device)
        if dev not in on_device:
            on_device[dev] = torch.tensor(packed, dtype=torch.float64, device=dev)
        return table, packed, on_device[dev]

    def _table(self, device, **options):
        """The whole run's table for these step options."""
        key = ("run",) + tuple(sorted(options.items()))
        return self._cached(key, lambda: self._build_table(**options), device)

    def _orders(self, start: int, final_rule) -> list:
        """diffusers' per-step order of a multistep solver (``solver_order``, ``lower_order_final``): warm-up
        from the run's start, lower orders at the end (``final_rule``: the last step is first order)."""
        cfg, n = self.config, len(self.timesteps)
        out = []
        for i in range(start, n):
            done = min(i - start, cfg.solver_order)
            last = i == n - 1 and final_rule
            second = i == n - 2 and cfg.lower_order_final and n < 15
            if cfg.solver_order == 1 or done < 1 or last:
                out.append(1)
            elif cfg.solver_order == 2 or done < 2 or second:
                out.append(2)
            else:
                out.append(3)
        return out

    # -- rows -------------------------------------------------------------------------------------

    def _rows(self, timestep, n: int, device, options: dict):
        """``(table, packed host, packed device, rows (N,), scalar index or None, the rows used (host))``."""
        per_sample = isinstance(timestep, Tensor) and timestep.dim() > 0 and timestep.numel() > 1
        if per_sample and timestep.numel() != n:
            raise ValueError(f"timestep must be a scalar or hold one timestep per sample ({n}), got shape "
                             f"{tuple(timestep.shape)}")
        if self._stateless:
            # the run's timesteps share one table (moved to the device once); any other timestep gets its own
            ts = timestep.reshape(-1).tolist() if isinstance(timestep, Tensor) else [timestep]
            run = [float(t) for t in self.timesteps.tolist()]
            where = {t: k for k, t in reversed(list(enumerate(run)))}  # first match, as diffusers looks it up
            if all(float(t) in where for t in ts):
                uniq, key = run, ("rows-run",) + tuple(sorted(options.items()))
            else:
                uniq = list(dict.fromkeys(float(t) for t in ts))
                key = ("rows", tuple(uniq)) + tuple(sorted(options.items()))
                where = {t: k for k, t in enumerate(uniq)}
            table, packed, coef = self._cached(
                key, lambda: S.concat_tables([self._row_table(t, **options) for t in uniq]), device)
            idx = [where[float(t)] for t in ts]
            rows = torch.tensor(idx if per_sample else idx * n, dtype=torch.int32, device=device)
            return table, packed, coef, rows, None, sorted(set(idx))
        if self._rowwise:
            if per_sample:
                raise ValueError(f"{type(self).__name__}.step takes one timestep per call")
            if self._step_index is None:
                self._init_step_index(timestep)
            idx = self._step_index
            key, make = self._call_row(idx, timestep, **options)
            table, packed, coef = self._cached(("call",) + tuple(key), make, device)
            return table, packed, coef, torch.zeros((n,), dtype=torch.int32, device=device), idx, [0]
        if per_sample:
            if not self._per_sample_ok():
                raise ValueError(f"{type(self).__name__}.step takes one timestep per call: its timesteps "
                                 "repeat (two stages per step)")
            sched = self.timesteps.to(device)
            eq = sched.reshape(1, -1) == timestep.reshape(-1, 1).to(device=device, dtype=sched.dtype)
            if not bool(eq.any(1).all()):
                raise ValueError("every per-sample timestep must be one of scheduler.timesteps")
            rows, idx = eq.int().argmax(1), None
            used = sorted(set(rows.tolist()))
        else:
            if self._step_index is None:
                self._init_step_index(timestep)
            idx = self._step_index
            if not 0 <= idx < len(self.timesteps):
                raise ValueError(f"step index {idx} is past the end of the schedule ({len(self.timesteps)} "
                                 "timesteps): call set_timesteps to start a new run")
            rows = torch.full((n,), idx, dtype=torch.int32, device=device)
            used = [idx]
        if self._warmup:
            # multistep solvers warm up from the step a run starts at (img2img's begin_index): the table
            # covers timesteps[start:], its rows shifted by start
            if self._run_start is None:
                self._run_start = idx if idx is not None else 0
            options = dict(options, start=self._run_start)
            rows = rows - self._run_start
            used = [u - self._run_start for u in used]
        table, packed, coef = self._table(device, **options)
        return table, packed, coef, rows, idx, used

    def _per_sample_ok(self) -> bool:
        return True

    # -- the step ---------------------------------------------------------------------------------

    def _ring(self, table: S.SamplerTable, x: Tensor, idx) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (table.num_slots, tuple(x.shape), dtype, x.device)
        if self._history is None or self._history_key != key:
            if self._history is not None and idx not in (None, 0) and not self._stateless:
                raise ValueError(f"sample changed shape/dtype/device mid-run ({self._history_key[1:]} -> "
                                 f"{key[1:]}): call set_timesteps to start a new run")
            self._history = torch.zeros((table.num_slots, *x.shape), dtype=dtype, device=x.device)
            self._history_key = key
        return self._history

    def _clip(self, x: Tensor, m: Tensor, coef: Tensor, rows: Tensor) -> Optional[Tensor]:
        """Per-sample ``(bound, scale)`` for the update's x0 clip (diffusers' clip_sample / thresholding)."""
        cfg = self.config
        n = x.shape[0]
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        if getattr(cfg, "thresholding", False):
            cf = coef[rows.long()].to(cd)
            view = (n,) + (1,) * (x.dim() - 1)
            x0 = cf[:, S.COL_P].reshape(view) * x.to(cd) + cf[:, S.COL_Q].reshape(view) * m.to(cd)
            s = torch.quantile(x0.abs().reshape(n, -1), cfg.dynamic_thresholding_ratio, dim=1)
            s = s.clamp(min=1.0, max=cfg.sample_max_value)
            return torch.stack([s, 1.0 / s], dim=1)
        if getattr(cfg, "clip_sample", False):
            bounds = torch.ones((n, 2), dtype=cd, device=x.device)
            bounds[:, 0] = float(cfg.clip_sample_range)
            return bounds
        return None

    def _x0(self, x: Tensor, m: Tensor, coef: Tensor, rows: Tensor, clip: Optional[Tensor]) -> Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        view = (x.shape[0],) + (1,) * (x.dim() - 1)
        cf = coef[rows.long()].to(cd)
        x0 = cf[:, S.COL_P].reshape(view) * x.to(cd) + cf[:, S.COL_Q].reshape(view) * m.to(cd)
        if clip is not None:
            b = clip[:, 0].to(cd).reshape(view)
            x0 = torch.minimum(torch.maximum(x0, -b), b) * clip[:, 1].to(cd).reshape(view)
        return x0.to(x.dtype)

    def _require_timesteps(self) -> None:
        """diffusers' error for a step before ``set_timesteps``."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")

    def _check_ready(self) -> None:
        if self._needs_set_timesteps:
            self._require_timesteps()

    def _fused_step(self, model_output: Tensor, timestep, sample: Tensor, *, options=None, noise_fn=None,
                    variance: Optional[Tensor] = None, return_dict: bool = True, output_cls=SchedulerOutput):
        """Pick rows, build/reuse the table, draw noise (``noise_fn(idx, rows)``), one fused update."""
        if not isinstance(sample, Tensor) or sample.dim() < 1:
            raise ValueError("sample must be a tensor (N, ...)")
        if not isinstance(model_output, Tensor) or tuple(model_output.shape) != tuple(sample.shape):
            got = (tuple(model_output.shape) if isinstance(model_output, Tensor)
                   else type(model_output).__name__)
            raise ValueError(f"model_output must have sample's shape {tuple(sample.shape)}, got {got}")
        self._check_ready()
        table, packed, coef, rows, idx, used = self._rows(timestep, sample.shape[0], sample.device,
                                                          dict(options or {}))
        if not np.all(np.isfinite(packed[used])):
            raise ValueError(f"{type(self).__name__}: the step at timestep {timestep!r} has non-finite "
                             "coefficients (this schedule has no finite x0 or step there)")
        x = sample if sample.dtype in (torch.float32, torch.float64) else sample.float()
        hist = self._ring(table, x, idx)
        noise = noise_fn(idx, rows) if noise_fn is not None else None
        clip = self._clip(x, model_output, coef, rows)
        x0 = self._x0(x, model_output, coef, rows, clip) if self._x0_output else None
        prev = ops.sampler_step(x, model_output, hist, coef, rows, variance=variance,
                                noise=None if noise is None else noise.to(x.device), clip=clip)
        prev = prev.to(model_output.dtype if self._upcast else sample.dtype)
        if not self._stateless and self._step_index is not None:
            self._step_index += 1
        if not return_dict:
            return (prev, x0) if self._x0_output else (prev,)
        if self._x0_output:
            return output_cls(prev_sample=prev, pred_original_sample=x0)
        return output_cls(prev_sample=prev)

    # -- add_noise --------------------------------------------------------------------------------

    def _step_indices(self, timesteps: Tensor, device) -> list:
        sched = self.timesteps.to(device)
        timesteps = timesteps.to(device)
        if self._begin_index is None:
            return [self.index_for_timestep(t, sched) for t in timesteps]
        if self._step_index is not None:
            return [self._step_index] * timesteps.shape[0]
        return [self._begin_index] * timesteps.shape[0]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    while v.dim() < like.dim():
        v = v.unsqueeze(-1)
    return v


class _VPScheduler(_TableScheduler):
    """Schedulers whose sample is the model-frame state (DDPM, DDIM, PNDM, LCM, TCD, DPM-Solver, UniPC)."""

    init_noise_sigma = 1.0

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (diffusers' add_noise)."""
        abar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = timesteps.to(original_samples.device)
        a = _bcast(abar[timesteps].flatten() ** 0.5, original_samples)
        s = _bcast((1 - abar[timesteps]).flatten() ** 0.5, original_samples)
        return a * original_samples + s * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``sqrt(abar_t) noise - sqrt(1 - abar_t) sample`` (the v target of Salimans & Ho 2022)."""
        abar = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        timesteps = timesteps.to(sample.device)
        a = _bcast(abar[timesteps].flatten() ** 0.5, sample)
        s = _bcast((1 - abar[timesteps]).flatten() ** 0.5, sample)
        return a * noise - s * sample


class _CustomTimesteps:
    """Integer timesteps a caller may give itself (DDPM, LCM, TCD): diffusers' checks of them and its
    ``previous_timestep``."""

    def _custom_timesteps(self, timesteps) -> np.ndarray:
        """``timesteps`` as int64 after diffusers' checks (descending, below num_train_timesteps)."""
        n = self.config.num_train_timesteps
        for i in range(1, len(timesteps)):
            if timesteps[i] >= timesteps[i - 1]:
                raise ValueError("`custom_timesteps` must be in descending order.")
        if timesteps[0] >= n:
            raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {n}.")
        self.custom_timesteps = True
        return np.array(timesteps, dtype=np.int64)

    def previous_timestep(self, timestep):
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1


class _SigmaScheduler(_TableScheduler):
    """Schedulers whose sample is the sigma-view state x0 + sigma eps (Euler, Heun, LMS, KDPM2)."""

    _frame = "sigma"
    _upcast = True

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def _scale_index(self, timestep):
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._step_index

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """``sample / sqrt(sigma^2 + 1)``: the sigma view to the model frame (per sample for a tensor of
        per-sample timesteps)."""
        if isinstance(timestep, Tensor) and timestep.dim() > 0 and timestep.numel() > 1:
            sched = self.timesteps.to(sample.device)
            eq = sched.reshape(1, -1) == timestep.reshape(-1, 1).to(device=sample.device, dtype=sched.dtype)
            if not bool(eq.any(1).all()):
                raise ValueError("every per-sample timestep must be one of scheduler.timesteps")
            sigma = self.sigmas.to(sample.device)[eq.int().argmax(1)].reshape(-1, *[1] * (sample.dim() - 1))
            self.is_scale_input_called = True
            return sample / ((sigma ** 2 + 1) ** 0.5)
        sigma = self.sigmas[self._scale_index(timestep)]
        self.is_scale_input_called = True
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x0 + sigma noise`` at each timestep's sigma (diffusers' add_noise for sigma schedulers)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = _bcast(sigmas[self._step_indices(timesteps, original_samples.device)].flatten(), original_samples)
        return original_samples + noise * sigma

    def _sigma_layout(self, steps: int, timesteps: np.ndarray, karras: bool, exponential: bool, beta: bool,
                      interpolation: str = "linear"):
        """diffusers' sigmas at ``timesteps`` (linear interpolation) or Karras / exponential / beta ones."""
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        if interpolation == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        elif interpolation == "log_linear":
            sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), steps + 1).exp().numpy()
        else:
            raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {interpolation!r}")
        cfg = self.config
        lo, hi = getattr(cfg, "sigma_min", None), getattr(cfg, "sigma_max", None)
        convert = _karras if karras else _exponential if exponential else _beta_spacing if beta else None
        if convert is not None:
            sigmas = convert(sigmas, steps, lo, hi)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        return sigmas, timesteps


class _HeunStages:
    """Heun's method as diffusers' Heun schedulers call it (sigma and flow): two calls per step, so every
    timestep and sigma after the first repeats; the table is built on ``_step_sigmas``, one per step."""

    order = 2

    def _heun_layout(self, step_sigmas: Tensor, step_timesteps: Tensor, device) -> None:
        """``sigmas`` / ``timesteps`` per call from one sigma per step (with the final one) and one timestep
        per step."""
        self._step_sigmas = step_sigmas
        self.sigmas = torch.cat([step_sigmas[:1], step_sigmas[1:-1].repeat_interleave(2), step_sigmas[-1:]])
        ts = torch.cat([step_timesteps[:1], step_timesteps[1:].repeat_interleave(2)])
        self.timesteps = ts.to(device=device, dtype=torch.float32)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a step's first (Euler) stage."""
        if self._step_index is None or not self._tables:
            return True
        table = next(iter(self._tables.values()))[0]
        i = self._step_index
        return i >= table.num_rows or i == 0 or table.step[i] != table.step[i - 1]

    def _per_sample_ok(self) -> bool:
        return False  # a timestep names two calls of a step, not one row


def churn_gammas(sigmas: np.ndarray, s_churn: float, s_tmin: float, s_tmax: float) -> np.ndarray:
    """Karras et al. (2022), Algorithm 2's gamma per step, as diffusers computes it (``len(sigmas) - 1``)."""
    n = len(sigmas) - 1
    g = min(s_churn / n, 2 ** 0.5 - 1) if s_churn > 0 else 0.0
    return np.array([g if s_tmin <= sigmas[i] <= s_tmax else 0.0 for i in range(n)])


def churn_euler_table(sigmas: np.ndarray, gammas: np.ndarray, s_noise: float, x0_sigma, p_at) -> S.SamplerTable:
    """Euler steps with Karras churn (Algorithm 2, lines 4-8), one row per step in the sigma view.

    The churn noise ``k z``, ``k = s_noise sqrt(sigma_hat^2 - sigma^2)``, lands on x before the step
    (``x_hat = x + k z``) but after the model has seen x: the row takes it as its noise term. x0 is
    ``p x_hat + q m`` at ``x0_sigma(sigma, sigma_hat)`` (sigma_hat for eps and EDM, sigma for v), so that
    ``x' = (1 + dt/sigma_hat) x_hat - (dt/sigma_hat) x0 = a x + b x0_kernel + k (a + b p) z``.
    """
    rows = S._Rows("euler_churn", "x0", 1, np.array([1.0, 0.0]), None)
    for i in range(len(sigmas) - 1):
        s, sn, g = float(sigmas[i]), float(sigmas[i + 1]), float(gammas[i])
        sh = s * (g + 1)
        k = s_noise * math.sqrt(max(sh * sh - s * s, 0.0))
        s_x0 = x0_sigma(s, sh)
        dt = sn - sh
        a, b = 1 + dt / sh, -dt / sh
        rows.add(i, s_x0, sn, a=a, b_new=b, c=k * (a + b * float(p_at(s_x0))), write=False)
    return rows.build()


def flow_frame_sigmas(s: np.ndarray) -> np.ndarray:
    """Flow times (diffusers' ``sigmas`` of flow schedulers) to the sigma view ``s / (1 - s)``."""
    s = np.asarray(s, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s >= 1, np.inf, s / np.maximum(1 - s, 1e-300))


def model_frame_scale(sigma, frame: str):
    """``frame_scale`` for host arrays (the model frame's alpha at sigma-view sigmas)."""
    return frame_scale(np.asarray(sigma, dtype=np.float64), frame)
