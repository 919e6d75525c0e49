"""The surface every drop-in shares: diffusers' config and output classes (or small local stand-ins
when diffusers is absent), the float32 timestep/sigma layouts diffusers uses, and the table-backed base
classes whose ``step`` is one fused ``fastdiff.ops.sampler_step`` call."""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff import samplers as S

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
        pass

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


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> Tensor:
    """diffusers' betas, float32, computed the way diffusers computes them."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        root = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32)
        return root ** 2
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / num_train_timesteps) / f(i / num_train_timesteps), 0.999)
                             for i in range(num_train_timesteps)], dtype=torch.float32)
    if beta_schedule == "sigmoid":
        ramp = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps))
        return ramp * (beta_end - beta_start) + beta_start
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented")


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


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma by interpolation of log sigma (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def _karras(in_sigmas: np.ndarray, steps: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    lo = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(in_sigmas[0])
    ramp = np.linspace(0, 1, steps)
    return (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0


def _exponential(in_sigmas: np.ndarray, steps: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    lo = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(in_sigmas[0])
    return np.exp(np.linspace(math.log(hi), math.log(lo), steps))


_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class _TableScheduler(SchedulerMixin, ConfigMixin):
    """What every scheduler here shares: schedule, the packed table, row lookup, history ring, the step."""

    config_name = "scheduler_config.json"
    _compatibles: list = []
    order = 1
    _frame = "vp"            # the frame diffusers carries the sample in: "vp" (model frame) or "sigma"
    _stateless = False       # True: the row follows from the timestep alone (DDPM, DDIM)
    _x0_output = True        # whether diffusers' output has pred_original_sample
    _upcast = False          # diffusers computes in float32 and returns model_output's dtype
    _warmup = False          # multistep: the table starts where the run starts

    # -- schedule ---------------------------------------------------------------------------------

    def _init_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr=False, prediction_type="epsilon"):
        if rescale_betas_zero_snr:
            raise NotImplementedError("rescale_betas_zero_snr=True (sigma = inf at the last timestep) is not "
                                      "supported by fastdiff's tables")
        if prediction_type not in _PREDICTIONS:
            raise NotImplementedError(f"prediction_type must be one of {_PREDICTIONS}, got "
                                      f"{prediction_type!r}")
        self.betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def _train_sigmas(self) -> np.ndarray:
        """diffusers' ``((1 - abar) / abar) ** 0.5`` in float32, as a numpy array."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

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
        """Index of ``timestep`` in ``schedule_timesteps`` (the second match; 2nd match if repeated)"""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        idx = (schedule_timesteps == timestep).nonzero()
        if len(idx) == 0:
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

    def _build_table(self, **options) -> S.SamplerTable:  # pragma: no cover - each scheduler defines it
        raise NotImplementedError

    def _x0_pq(self, sigma: np.ndarray):
        """``x0 = p x + q m`` in the sigma view for the configured prediction type."""
        pred = self.config.prediction_type
        if pred == "epsilon":
            return np.ones_like(sigma), -sigma
        if pred == "sample":
            return np.zeros_like(sigma), np.ones_like(sigma)
        return 1.0 / (1.0 + sigma * sigma), -sigma / np.sqrt(1.0 + sigma * sigma)

    def _table(self, device, **options):
        """``(host table, packed coef on device)`` for these step options, built once per run."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        key = tuple(sorted(options.items()))
        if key not in self._tables:
            table = self._build_table(**options)
            p, q = self._x0_pq(table.sigma)
            self._tables[key] = (table, S.pack_table(table, p, q, frame=self._frame), {})
        table, packed, on_device = self._tables[key]
        dev = torch.device(device)
        if dev not in on_device:
            on_device[dev] = torch.tensor(packed, dtype=torch.float64, device=dev)
        return table, on_device[dev]

    # -- rows -------------------------------------------------------------------------------------

    def _rows(self, timestep, n: int, device):
        """``(rows (N,) on device, scalar index or None)`` for a timestep or a per-sample timestep tensor."""
        per_sample = isinstance(timestep, Tensor) and timestep.dim() > 0 and timestep.numel() > 1
        if per_sample:
            if timestep.numel() != n:
                raise ValueError(f"timestep must be a scalar or hold one timestep per sample ({n}), got "
                                 f"shape {tuple(timestep.shape)}")
            if not self._per_sample_ok():
                raise ValueError(f"{type(self).__name__}.step takes one timestep per call: its timesteps "
                                 "repeat (two stages per step)")
            sched = self.timesteps.to(device)
            eq = sched.reshape(1, -1) == timestep.reshape(-1, 1).to(device=device, dtype=sched.dtype)
            if not bool(eq.any(1).all()):
                raise ValueError("every per-sample timestep must be one of scheduler.timesteps")
            return eq.int().argmax(1), None
        if self._stateless:
            idx = self._stateless_index(timestep)
        else:
            if self._step_index is None:
                self._init_step_index(timestep)
            idx = self._step_index
        if not 0 <= idx < len(self.timesteps):
            raise ValueError(f"step index {idx} is past the end of the schedule ({len(self.timesteps)} "
                             "timesteps): call set_timesteps to start a new run")
        return torch.full((n,), idx, dtype=torch.int32, device=device), idx

    def _per_sample_ok(self) -> bool:
        return True

    def _stateless_index(self, timestep) -> int:
        t = timestep.reshape(-1)[0] if isinstance(timestep, Tensor) else timestep
        idx = (self.timesteps == t).nonzero()
        if len(idx) == 0:
            raise ValueError(f"timestep {timestep!r} is not one of scheduler.timesteps")
        return int(idx[0].item())

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

    def _fused_step(self, model_output: Tensor, timestep, sample: Tensor, *, options=None, noise_fn=None,
                    variance: Optional[Tensor] = None, return_dict: bool = True):
        """Pick rows, build/reuse the table, draw noise (``noise_fn(idx, rows)``), one fused update."""
        if not isinstance(sample, Tensor) or sample.dim() < 1:
            raise ValueError("sample must be a tensor (N, ...)")
        if not isinstance(model_output, Tensor) or tuple(model_output.shape) != tuple(sample.shape):
            got = (tuple(model_output.shape) if isinstance(model_output, Tensor)
                   else type(model_output).__name__)
            raise ValueError(f"model_output must have sample's shape {tuple(sample.shape)}, got {got}")
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        rows, idx = self._rows(timestep, sample.shape[0], sample.device)
        options = dict(options or {})
        if self._warmup:
            # multistep solvers warm up from the step a run starts at (img2img's begin_index): the table
            # covers timesteps[start:], its rows shifted by start
            if self._run_start is None:
                self._run_start = idx if idx is not None else 0
            options["start"] = self._run_start
            rows = rows - self._run_start
        table, coef = self._table(sample.device, **options)
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
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # -- add_noise --------------------------------------------------------------------------------

    def _step_indices(self, timesteps: Tensor, device) -> list:
        sched = self.timesteps.to(device)
        timesteps = timesteps.to(device)
        if self._begin_index is None:
            return [self.index_for_timestep(t, sched) for t in timesteps]
        if self._step_index is not None:
            return [self._step_index] * timesteps.shape[0]
        return [self._begin_index] * timesteps.shape[0]


class _VPScheduler(_TableScheduler):
    """Schedulers whose sample is the model-frame state (DDPM, DDIM, DPM-Solver++, UniPC)."""

    init_noise_sigma = 1.0

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (diffusers' add_noise)."""
        abar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = timesteps.to(original_samples.device)
        a = abar[timesteps].flatten() ** 0.5
        s = (1 - abar[timesteps]).flatten() ** 0.5
        while a.dim() < original_samples.dim():
            a, s = a.unsqueeze(-1), s.unsqueeze(-1)
        return a * original_samples + s * noise


class _SigmaScheduler(_TableScheduler):
    """Schedulers whose sample is the sigma-view state x0 + sigma eps (Euler, Euler ancestral, Heun, LMS)."""

    _frame = "sigma"
    _upcast = True

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """``sample / sqrt(sigma^2 + 1)``: the sigma view to the model frame (per sample for a tensor of
        per-sample timesteps)."""
        if isinstance(timestep, Tensor) and timestep.dim() > 0 and timestep.numel() > 1:
            rows, _ = self._rows(timestep, sample.shape[0], sample.device)
            sigma = self.sigmas.to(sample.device)[rows.long()].reshape(-1, *[1] * (sample.dim() - 1))
            self.is_scale_input_called = True
            return sample / ((sigma ** 2 + 1) ** 0.5)
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x0 + sigma noise`` at each timestep's sigma (diffusers' add_noise for sigma schedulers)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._step_indices(timesteps, original_samples.device)].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        return original_samples + noise * sigma

    def _sigma_layout(self, steps: int, timesteps: np.ndarray, karras: bool, exponential: bool, beta: bool,
                      interpolation: str = "linear"):
        """diffusers' sigmas at ``timesteps`` (linear interpolation) or Karras / exponential ones."""
        if beta:
            raise NotImplementedError("use_beta_sigmas=True is not supported")
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
        if karras:
            sigmas = _karras(sigmas, steps, lo, hi)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        elif exponential:
            sigmas = _exponential(sigmas, steps, lo, hi)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        return sigmas, timesteps


def _host(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _vp_sigmas(abar: np.ndarray) -> np.ndarray:
    return np.sqrt((1.0 - abar) / abar)
