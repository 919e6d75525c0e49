"""Multistep solvers on the VP (or flow) model frame: DPM-Solver(++), UniPC, DEIS.

All three lay out diffusers' timesteps and sigmas (VP sigmas, Karras / exponential / beta / Lu spacings, or
flow times with a static or dynamic shift) in float32 as diffusers does, and build one table for the run from
them; the sigma view of a flow time s is s / (1 - s), and the table is packed for the flow frame then.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import samplers as S
from fastdiff.compat.diffusers.scheduling_base import (
    KARRAS_SCHEDULERS,
    _bcast,
    _beta_spacing,
    _check_one_spacing,
    _exponential,
    _host,
    _karras,
    _sigma_to_t,
    _spaced,
    _VPScheduler,
    check_inference_steps,
    flow_frame_sigmas,
    randn_tensor,
    register_to_config,
)


def _flow_times(cfg, steps: int, mu=None, sigmas=None) -> np.ndarray:
    """diffusers' flow sigmas of the multistep solvers: ``linspace(1, 1/N)`` (or given), shifted."""
    if sigmas is None:
        sigmas = np.linspace(1, 1 / cfg.num_train_timesteps, steps + 1)[:-1]
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if getattr(cfg, "use_dynamic_shifting", False) and mu is not None and \
            getattr(cfg, "time_shift_type", "exponential") == "linear":
        return mu / (mu + (1 / sigmas - 1))
    if getattr(cfg, "use_dynamic_shifting", False) and mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return cfg.flow_shift * sigmas / (1 + (cfg.flow_shift - 1) * sigmas)


class _MultistepScheduler(_VPScheduler):
    _x0_output = False
    _upcast = True
    _warmup = True
    _needs_set_timesteps = True
    _unknown_timestep_last = True  # as diffusers' multistep schedulers
    _compatibles = KARRAS_SCHEDULERS

    @property
    def _state_frame(self) -> str:
        return "flow" if getattr(self.config, "use_flow_sigmas", False) else "vp"

    def _sigma_view(self) -> np.ndarray:
        sig = _host(self.sigmas)
        return flow_frame_sigmas(sig) if self._state_frame == "flow" else sig

    def _sigma_to_alpha_sigma_t(self, sigma):
        if getattr(self.config, "use_flow_sigmas", False):
            return 1 - sigma, sigma
        alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def _init_multistep(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                        prediction_type, rescale_betas_zero_snr=False):
        _check_one_spacing(self.config)
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type, clamp_terminal=True,
                            predictions=("epsilon", "v_prediction", "sample", "flow_prediction"))
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32)[::-1].copy())
        self.lower_order_nums = 0

    def _vp_layout(self, steps: int, ts: np.ndarray, karras_round: bool = True):
        """VP sigmas at ``ts``, or Karras / exponential / beta sigmas with their timesteps (no final sigma)."""
        cfg = self.config
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        lo, hi = getattr(cfg, "sigma_min", None), getattr(cfg, "sigma_max", None)
        if cfg.use_karras_sigmas:
            sig = _karras(np.flip(train).copy(), steps, lo, hi)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
            if karras_round:
                ts = ts.round()
        elif cfg.use_exponential_sigmas:
            sig = _exponential(np.flip(train).copy(), steps, lo, hi)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
        elif cfg.use_beta_sigmas:
            sig = _beta_spacing(np.flip(train).copy(), steps, lo, hi)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
        else:
            sig = np.interp(ts, np.arange(0, len(train)), train)
        return sig, ts

    def _flow_layout(self, steps: int):
        """Flow times ``1 - linspace(1, 1/N)`` shifted by ``flow_shift`` (no final sigma), and their timesteps."""
        cfg = self.config
        alphas = np.linspace(1, 1 / cfg.num_train_timesteps, steps + 1)
        s = 1.0 - alphas
        sig = np.flip(cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s))[:-1].copy()
        return sig, (sig * cfg.num_train_timesteps).copy()

    def _vp_sigma_min(self) -> float:
        return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)

    def _final_sigma(self) -> float:
        kind = self.config.final_sigmas_type
        if kind == "zero":
            return 0.0
        if kind == "sigma_min":
            return self._vp_sigma_min()
        raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {kind}")

    def _finish_layout(self, sig: np.ndarray, ts: np.ndarray, device) -> None:
        self.sigmas = torch.from_numpy(np.asarray(sig).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self.lower_order_nums = 0
        self._start_run()

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha_t x0 + sigma_t noise`` at the sigma of each timestep's step (diffusers' add_noise)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = _bcast(sigmas[self._step_indices(timesteps, original_samples.device)].flatten(), original_samples)
        alpha, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha * original_samples + sigma_t * noise

    def _model_x0_output(self, model_output: Tensor, sample: Tensor) -> Tensor:
        if getattr(self.config, "variance_type", None) in ("learned", "learned_range"):
            model_output = model_output[:, :sample.shape[1]]
        return model_output

    def _dynamic_shift(self, mu) -> None:
        if mu is not None:
            if not (self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"):
                raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type='exponential'")
            self.config.flow_shift = float(np.exp(mu))  # as diffusers: the shift of this and later runs


class DPMSolverMultistepScheduler(_MultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler``: :func:`fastdiff.samplers.dpm_multistep` (all four
    algorithm types, orders 1-3) on diffusers' layouts (VP, Karras, exponential, beta, Lu lambdas, flow)."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: Optional[str] = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        self._init_multistep(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type, rescale_betas_zero_snr)
        self._check_dpm_solver(algorithm_type, solver_type, final_sigmas_type, S.DPM_ALGORITHMS)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu=None, timesteps=None):
        cfg = self.config
        self._dynamic_shift(mu)
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and getattr(cfg, flag):
                raise ValueError(f"Cannot use `timesteps` with `config.{flag} = True`")
        if timesteps is None:
            check_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
        else:
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last_timestep = int((cfg.num_train_timesteps - clipped_idx).numpy().item())
            ts = _spaced(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset,
                         np.int64, multistep=True, last=last_timestep)
        steps = len(ts)
        if cfg.use_lu_lambdas:
            train = self._train_sigmas()
            log_sigmas = np.log(train)
            sig = np.exp(np.linspace(float(np.flip(log_sigmas)[0]), float(np.flip(log_sigmas)[-1]), steps))
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif cfg.use_flow_sigmas and not (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or
                                          cfg.use_beta_sigmas):
            sig, ts = self._flow_layout(steps)
        else:
            sig, ts = self._vp_layout(steps, ts, karras_round=cfg.beta_schedule != "squaredcos_cap_v2")
        self._finish_layout(np.concatenate([sig, [self._final_sigma()]]), ts, device)

    def _build_table(self, start: int = 0) -> S.SamplerTable:
        cfg = self.config
        final_rule = cfg.euler_at_final or (cfg.lower_order_final and len(self.timesteps) < 15) or \
            cfg.final_sigmas_type == "zero"
        orders = self._orders(start, final_rule)
        with S.lenient():
            return S.dpm_multistep(self._sigma_view()[start:], orders=orders, algorithm_type=cfg.algorithm_type,
                                   solver_type=cfg.solver_type, timesteps=_host(self.timesteps)[start:])

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None,
             variance_noise: Optional[Tensor] = None, return_dict: bool = True):
        """One multistep DPM-Solver step; the SDE variants draw float32 noise from ``generator``."""
        model_output = self._model_x0_output(model_output, sample)
        sde = self.config.algorithm_type.startswith("sde")

        def noise_fn(idx, rows):
            if not sde:
                return None
            if variance_noise is not None:
                return variance_noise.to(device=model_output.device, dtype=torch.float32)
            return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                dtype=torch.float32)

        out = self._fused_step(model_output, timestep, sample, noise_fn=noise_fn, return_dict=return_dict)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        return out


class UniPCMultistepScheduler(_MultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` (Zhao et al. 2023, UniP + UniC, x0 or eps form) on
    :func:`fastdiff.samplers.unipc`.

    ``solver_p`` (another scheduler object as the predictor) is the one option left out: its steps are that
    scheduler's, not a UniPC table.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 predict_x0: bool = True, solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector: list = [],  # noqa: B006 - diffusers' default, never mutated
                 solver_p=None, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero",
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None, shift_terminal: Optional[float] = None):
        if solver_p is not None:
            raise NotImplementedError("UniPC with a solver_p (another scheduler as the predictor) is not a "
                                      "table: its steps are that scheduler's")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("`shift_terminal` is only supported when `use_flow_sigmas=True`.")
        self._init_multistep(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type, rescale_betas_zero_snr)
        self._remap_config("solver_type", solver_type, ("bh1", "bh2"), ("midpoint", "heun", "logrho"), "bh2")
        self.predict_x0 = predict_x0
        self.disable_corrector = disable_corrector
        self.solver_p = None
        self.last_sample = None

    def time_shift(self, mu, sigma, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, mu=None):
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError("Passing `sigmas` is only supported when `use_flow_sigmas=True`. Please set "
                                 "`use_flow_sigmas=True` during scheduler initialization.")
            num_inference_steps = len(sigmas)
        else:
            check_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        ts = _spaced(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset,
                     np.int64, multistep=True)
        spaced = cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas
        if spaced:
            train = np.asarray(sigmas, dtype=np.float64) if sigmas is not None else self._train_sigmas()
            log_sigmas = np.log(train)
            lo, hi = cfg.sigma_min, cfg.sigma_max
            convert = _karras if cfg.use_karras_sigmas else _exponential if cfg.use_exponential_sigmas \
                else _beta_spacing
            sig = convert(np.flip(train).copy(), num_inference_steps, lo, hi)
            if cfg.use_karras_sigmas and cfg.use_flow_sigmas:
                sig = sig / (sig + 1)
                ts = (sig * cfg.num_train_timesteps).copy()
            else:
                ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
                if cfg.use_karras_sigmas:
                    ts = ts.round()
            last = float(sig[-1]) if cfg.final_sigmas_type == "sigma_min" else self._final_sigma()
        elif cfg.use_flow_sigmas:
            sig = _flow_times(cfg, num_inference_steps, mu if cfg.use_dynamic_shifting else None, sigmas)
            if cfg.shift_terminal:
                one_minus = 1 - sig
                sig = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
            if abs(sig[0] - 1) < 1e-6:
                sig[0] -= 1e-6
            ts = (sig * cfg.num_train_timesteps).copy()
            last = float(sig[-1]) if cfg.final_sigmas_type == "sigma_min" else self._final_sigma()
        else:
            train = np.asarray(sigmas, dtype=np.float64) if sigmas is not None else self._train_sigmas()
            sig = np.interp(ts, np.arange(0, len(train)), train)
            last = self._final_sigma()
        self._finish_layout(np.concatenate([sig, [last]]), ts, device)
        self.last_sample = None

    def _clip(self, x, m, coef, rows):
        return super()._clip(x, m, coef, rows) if self.predict_x0 else None  # diffusers thresholds x0 only

    def _build_table(self, start: int = 0) -> S.SamplerTable:
        cfg = self.config
        off = tuple(d - start for d in cfg.disable_corrector if d >= start)
        with S.lenient():
            return S.unipc(self._sigma_view()[start:], order=cfg.solver_order, solver_type=cfg.solver_type,
                           lower_order_final=cfg.lower_order_final, disable_corrector=off,
                           predict_x0=self.predict_x0, timesteps=_host(self.timesteps)[start:])

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        """UniC correction of this step's state, then UniP prediction of the next, in one fused update."""
        out = self._fused_step(self._model_x0_output(model_output, sample), timestep, sample,
                               return_dict=return_dict)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        return out


class DEISMultistepScheduler(_MultistepScheduler):
    """diffusers' ``DEISMultistepScheduler`` (Zhang & Chen 2023, log-rho DEIS, orders 1-3) on
    :func:`fastdiff.samplers.deis`."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "deis", solver_type: str = "logrho", lower_order_final: bool = True,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        self._init_multistep(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type)
        self._remap_config("algorithm_type", algorithm_type, ("deis",), ("dpmsolver", "dpmsolver++"), "deis")
        self._remap_config("solver_type", solver_type, ("logrho",), ("midpoint", "heun", "bh1", "bh2"), "logrho",
                           label="solver type ")

    def set_timesteps(self, num_inference_steps: int, device=None, mu=None):
        cfg = self.config
        self._dynamic_shift(mu)
        check_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        ts = _spaced(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset,
                     np.int64, multistep=True)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            sig, ts = self._vp_layout(num_inference_steps, ts)
            last = float(sig[-1])
        elif cfg.use_flow_sigmas:
            sig, ts = self._flow_layout(num_inference_steps)
            last = float(sig[-1])
        else:
            sig, ts = self._vp_layout(num_inference_steps, ts)
            last = self._vp_sigma_min()
        self._finish_layout(np.concatenate([sig, [last]]), ts, device)

    def _build_table(self, start: int = 0) -> S.SamplerTable:
        cfg = self.config
        orders = self._orders(start, cfg.lower_order_final and len(self.timesteps) < 15)
        with S.lenient():
            return S.deis(self._sigma_view()[start:], orders=orders, timesteps=_host(self.timesteps)[start:])

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        """One multistep DEIS step."""
        out = self._fused_step(model_output, timestep, sample, return_dict=return_dict)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        return out
