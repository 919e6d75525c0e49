"""Sigma-view schedulers: Euler, Euler ancestral, Heun, LMS."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import samplers as S
from fastdiff.compat.diffusers.scheduling_base import (
    KARRAS_SCHEDULERS,
    SchedulerOutput,
    _check_one_spacing,
    _HeunStages,
    _host,
    _sigma_to_t,
    _SigmaScheduler,
    _spaced,
    churn_euler_table,
    churn_gammas,
    randn_tensor,
    register_to_config,
    reject_integer_timestep,
)


class EulerDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``EulerDiscreteScheduler`` on :func:`fastdiff.samplers.euler` (the full schedule is laid out
    at construction, as diffusers does, so ``step`` works before ``set_timesteps``)."""

    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: Optional[bool] = False,
                 use_exponential_sigmas: Optional[bool] = False, use_beta_sigmas: Optional[bool] = False,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 timestep_spacing: str = "linspace", timestep_type: str = "discrete", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):
        _check_one_spacing(self.config)
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type, clamp_terminal=True)
        train = self._train_sigmas()[::-1].copy()
        self.sigmas = torch.cat([torch.from_numpy(train), torch.zeros(1)])
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            self.timesteps = torch.Tensor([0.25 * s.log() for s in self.sigmas[:-1]])
        else:
            self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                          dtype=float)[::-1].copy().astype(np.float32))
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None,
                      sigmas=None):
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            raise ValueError("Cannot set `timesteps` with `config.use_karras_sigmas`, "
                             "`config.use_exponential_sigmas` or `config.use_beta_sigmas`.")
        if timesteps is not None and cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        train = self._train_sigmas()
        if sigmas is not None:
            sig = np.array(sigmas).astype(np.float32)
            ts = np.array([_sigma_to_t(s, np.log(train)) for s in sig[:-1]])
        else:
            if timesteps is not None:
                ts = np.array(timesteps).astype(np.float32)
            else:
                ts = _spaced(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps,
                             cfg.steps_offset, np.float32)
            sig, ts = self._sigma_layout(num_inference_steps, ts, cfg.use_karras_sigmas,
                                         cfg.use_exponential_sigmas, cfg.use_beta_sigmas,
                                         cfg.interpolation_type)
            if cfg.final_sigmas_type == "sigma_min":
                last = float(train[0])
            elif cfg.final_sigmas_type == "zero":
                last = 0.0
            else:
                raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got "
                                 f"{cfg.final_sigmas_type}")
            sig = np.concatenate([sig, [last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sig).to(dtype=torch.float32)
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            self.timesteps = torch.Tensor([0.25 * s.log() for s in self.sigmas[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(np.asarray(ts).astype(np.float32)).to(device=device)
        self._start_run()

    def _build_table(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                     s_noise: float = 1.0) -> S.SamplerTable:
        sig = _host(self.sigmas)
        if s_churn > 0:
            pred = self.config.prediction_type
            x0_sigma = (lambda s, sh: sh) if pred == "epsilon" else (lambda s, sh: s)
            p_at = lambda s: self._x0_pq(np.array([s]))[0][0]
            gammas = churn_gammas(_host(self.sigmas), s_churn, s_tmin, s_tmax)
            with S.lenient():
                return churn_euler_table(sig, gammas, s_noise, x0_sigma, p_at)
        # final_sigmas_type="sigma_min" with Karras / exponential sigmas ends in a step from sigma_min to
        # sigma_min: an identity row
        with S.lenient():
            return S.euler(sig)

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``; with ``s_churn`` the Karras churn noise
        (drawn from ``generator`` where the step's gamma > 0) is the row's noise term."""
        reject_integer_timestep(timestep, "EulerDiscreteScheduler", scalar_only=True)
        if not s_churn > 0:
            return self._fused_step(model_output, timestep, sample, return_dict=return_dict)
        opts = {"s_churn": float(s_churn), "s_tmin": float(s_tmin), "s_tmax": float(s_tmax),
                "s_noise": float(s_noise)}
        drawn = []

        def noise_fn(idx, rows):
            table = self._table(sample.device, **opts)[0]
            if not np.any(table.c[[idx] if idx is not None else rows.tolist()] != 0):
                return None
            drawn.append(randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                      generator=generator))
            return drawn[-1]

        prev, x0 = self._fused_step(model_output, timestep, sample, options=opts, noise_fn=noise_fn,
                                    return_dict=False)
        if drawn:  # x0 of the churned state x + k z
            i = self._step_index - 1
            s = float(self.sigmas[i])
            g = churn_gammas(_host(self.sigmas), s_churn, s_tmin, s_tmax)[i]
            k = s_noise * math.sqrt(max((s * (g + 1)) ** 2 - s * s, 0.0))
            table = self._table(sample.device, **opts)[0]
            p = float(self._x0_pq(table.sigma[i:i + 1])[0][0])
            x0 = x0 + (p * k) * drawn[0].to(x0.dtype)
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` on :func:`fastdiff.samplers.euler_ancestral`."""

    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type, clamp_terminal=True)
        train = self._train_sigmas()[::-1].copy()
        self.sigmas = torch.cat([torch.from_numpy(train), torch.zeros(1)])
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=float)[::-1].copy().astype(np.float32))
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg = self.config
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        ts = _spaced(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset,
                     np.float32)
        sig, ts = self._sigma_layout(num_inference_steps, ts, False, False, False)
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts).to(device=device)
        self._start_run()

    def _build_table(self) -> S.SamplerTable:
        with S.lenient():
            return S.euler_ancestral(_host(self.sigmas))

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """Euler to sigma_down, plus ``sigma_up * randn_tensor(shape, generator)`` each step."""
        reject_integer_timestep(timestep, "EulerAncestralDiscreteScheduler", scalar_only=True)

        def noise_fn(idx, rows):
            return randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                generator=generator)

        return self._fused_step(model_output, timestep, sample, noise_fn=noise_fn, return_dict=return_dict)


class HeunDiscreteScheduler(_HeunStages, _SigmaScheduler):
    """diffusers' ``HeunDiscreteScheduler`` (Karras et al. 2022, Alg. 2) on :func:`fastdiff.samplers.heun`.

    ``timesteps`` repeat each inner timestep (two model calls per step): one table row per call.
    """

    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0):
        _check_one_spacing(self.config)
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            False, prediction_type)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      num_train_timesteps: Optional[int] = None, timesteps=None):
        cfg = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            raise ValueError("Cannot use `timesteps` with `config.use_karras_sigmas`, "
                             "`config.use_exponential_sigmas` or `config.use_beta_sigmas`.")
        num_inference_steps = num_inference_steps or len(timesteps)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        n_train = num_train_timesteps or cfg.num_train_timesteps
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.float32)
        else:
            ts = _spaced(cfg.timestep_spacing, n_train, num_inference_steps, cfg.steps_offset, np.float32)
        sig, ts = self._sigma_layout(num_inference_steps, ts, cfg.use_karras_sigmas,
                                     cfg.use_exponential_sigmas, cfg.use_beta_sigmas)
        sig = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self._heun_layout(sig, torch.from_numpy(np.asarray(ts)), device)
        self._start_run()

    def _build_table(self) -> S.SamplerTable:
        with S.lenient():
            return S.heun(_host(self._step_sigmas))

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        """One stage of Heun's method (diffusers calls ``step`` twice per step)."""
        return self._fused_step(model_output, timestep, sample, return_dict=return_dict)


class LMSDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``LMSDiscreteScheduler`` (linear multistep in sigma) on :func:`fastdiff.samplers.lms`."""

    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0):
        _check_one_spacing(self.config)
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            False, prediction_type)
        self.set_timesteps(num_train_timesteps)
        self.is_scale_input_called = False
        self._order_used = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg = self.config
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        ts = _spaced(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset,
                     np.float32)
        sig, ts = self._sigma_layout(num_inference_steps, ts, cfg.use_karras_sigmas,
                                     cfg.use_exponential_sigmas, cfg.use_beta_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.float32)
        self._order_used = None
        self._start_run()

    def _build_table(self, order: int = 4) -> S.SamplerTable:
        with S.lenient():
            return S.lms(_host(self.sigmas), order=order)

    def step(self, model_output: Tensor, timestep, sample: Tensor, order: int = 4, return_dict: bool = True):
        """One linear multistep step of the given order (one order per run)."""
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an int >= 1, got {order!r}")
        if self._order_used is not None and order != self._order_used:
            raise NotImplementedError(f"order changed mid-run ({self._order_used} -> {order}); call "
                                      "set_timesteps to start a new run")
        out = self._fused_step(model_output, timestep, sample, options={"order": order},
                               return_dict=return_dict)
        self._order_used = order
        return out
