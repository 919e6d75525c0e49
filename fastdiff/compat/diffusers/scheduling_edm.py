"""EDM (Karras et al. 2022) schedulers: the sample is the sigma-view state, the model sees ``c_in x`` at
``c_noise = log(sigma) / 4``, and its output gives ``x0 = c_skip x + c_out m`` (the EDM preconditioning,
Table 1), a linear parameterisation like any other. EDMEuler is :func:`fastdiff.samplers.euler`, EDM
DPM-Solver :func:`fastdiff.samplers.dpm_multistep` (``dpmsolver++`` / ``sde-dpmsolver++``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import samplers as S
from fastdiff.compat.diffusers.scheduling_base import (
    BaseOutput,
    _host,
    _SigmaScheduler,
    churn_euler_table,
    churn_gammas,
    randn_tensor,
    register_to_config,
    reject_integer_timestep,
)


@dataclass
class EDMEulerSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None


class _EDMScheduler(_SigmaScheduler):
    _compatibles: list = []

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max ** 2 + 1) ** 0.5

    def _ramp_sigmas(self, ramp: Tensor) -> Tensor:
        cfg = self.config
        if cfg.sigma_schedule == "karras":
            lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
            return (hi + ramp * (lo - hi)) ** cfg.rho
        return torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), len(ramp)).exp().flip(0)

    def _get_conditioning_c_in(self, sigma):
        return 1 / ((sigma ** 2 + self.config.sigma_data ** 2) ** 0.5)

    def precondition_inputs(self, sample: Tensor, sigma) -> Tensor:
        return sample * self._get_conditioning_c_in(sigma)

    def precondition_noise(self, sigma) -> Tensor:
        if not isinstance(sigma, Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def precondition_outputs(self, sample: Tensor, model_output: Tensor, sigma) -> Tensor:
        p, q = self._edm_pq(sigma)
        return p * sample + q * model_output

    def _edm_pq(self, sigma):
        sd = self.config.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        if self.config.prediction_type == "epsilon":
            c_out = sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        elif self.config.prediction_type == "v_prediction":
            c_out = -sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        else:
            raise ValueError(f"Prediction type {self.config.prediction_type} is not supported.")
        return c_skip, c_out

    def _x0_pq(self, sigma):
        sigma = np.asarray(sigma, dtype=np.float64)
        return self._edm_pq(sigma)

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self.sigmas[self._step_index])

    def _final(self, sigmas: Tensor) -> float:
        kind = self.config.final_sigmas_type
        if kind == "sigma_min":
            return sigmas[-1]
        if kind == "zero":
            return 0
        raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {kind}")


class EDMEulerScheduler(_EDMScheduler):
    """diffusers' ``EDMEulerScheduler``: Euler steps (Karras et al. 2022, Algorithm 2 without churn) on the
    EDM schedule; a given ``pred_original_sample`` replaces the model's x0 (then the row takes x0 itself).

    ``s_churn`` (Karras' churn) is a table option too: its noise is the row's noise term.
    """

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 sigma_schedule: str = "karras", num_train_timesteps: int = 1000,
                 prediction_type: str = "epsilon", rho: float = 7.0, final_sigmas_type: str = "zero"):
        if sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"Wrong value for provided for `{sigma_schedule=}`.`")
        self.num_inference_steps = None
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        sigmas = self._ramp_sigmas(ramp).to(torch.float32)
        self.timesteps = self.precondition_noise(sigmas)
        self.sigmas = torch.cat([sigmas, torch.full((1,), fill_value=float(self._final(sigmas)))])
        self.is_scale_input_called = False
        self._start_run()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None):
        self.num_inference_steps = num_inference_steps
        if sigmas is None:
            if num_inference_steps is None or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
            ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
        elif isinstance(sigmas, float):
            ramp = torch.tensor(sigmas, dtype=torch.float64)
        else:
            ramp = torch.as_tensor(sigmas).to(torch.float64)
        sig = self._ramp_sigmas(ramp).to(dtype=torch.float32, device=device)
        self.timesteps = self.precondition_noise(sig)
        last = torch.full((1,), fill_value=float(self._final(sig)), device=sig.device)
        self.sigmas = torch.cat([sig, last]).to("cpu")
        self._start_run()

    def _build_table(self, given_x0: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
                     s_tmax: float = float("inf"), s_noise: float = 1.0) -> S.SamplerTable:
        sig = _host(self.sigmas)
        with S.lenient():
            if s_churn > 0:
                p_at = (lambda s: 0.0) if given_x0 else (lambda s: self._x0_pq(np.array([s]))[0][0])
                table = churn_euler_table(sig, churn_gammas(sig, s_churn, s_tmin, s_tmax), s_noise,
                                          lambda s, sh: sh, p_at)
                table.timestep = _host(self.timesteps)[:table.num_rows]
            else:
                table = S.euler(sig, timesteps=_host(self.timesteps))
        table.options["given_x0"] = given_x0
        return table

    def _pack(self, table):
        if table.options.get("given_x0"):
            return S.pack_table(table, 0.0, 1.0, frame="sigma", check=False)
        return super()._pack(table)

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True,
             pred_original_sample: Optional[Tensor] = None):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]`` (with ``s_churn``, Karras' churn noise from
        ``generator`` where the step's gamma > 0 is the row's noise term)."""
        reject_integer_timestep(timestep, "EDMEulerScheduler")
        given = pred_original_sample is not None
        opts = {"given_x0": given}
        if s_churn > 0:
            opts.update(s_churn=float(s_churn), s_tmin=float(s_tmin), s_tmax=float(s_tmax), s_noise=float(s_noise))
        drawn = []

        def noise_fn(idx, rows):
            if not s_churn > 0 or self._table(sample.device, **opts)[0].c[idx] == 0:
                return None
            drawn.append(randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                      generator=generator))
            return drawn[-1]

        m = pred_original_sample.to(model_output.dtype) if given else model_output
        out = self._fused_step(m, timestep, sample.to(torch.float32), options=opts, noise_fn=noise_fn,
                               return_dict=False)
        prev, x0 = out[0].to(model_output.dtype), out[1]
        if drawn and not given:  # x0 of the churned state x + k z
            i = self._step_index - 1
            s = float(self.sigmas[i])
            g = churn_gammas(_host(self.sigmas), s_churn, s_tmin, s_tmax)[i]
            sh = s * (g + 1)
            k = s_noise * math.sqrt(max(sh * sh - s * s, 0.0))
            x0 = x0 + float(self._x0_pq(np.array([sh]))[0][0]) * k * drawn[0].to(x0.dtype)
        if not return_dict:
            return (prev, x0)
        return EDMEulerSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EDMDPMSolverMultistepScheduler(_EDMScheduler):
    """diffusers' ``EDMDPMSolverMultistepScheduler``: multistep DPM-Solver++ (and its SDE form) on the EDM
    schedule (alpha = 1, lambda = -log sigma)."""

    _x0_output = False
    _warmup = True
    _needs_set_timesteps = True
    _unknown_timestep_last = True

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 sigma_schedule: str = "karras", num_train_timesteps: int = 1000,
                 prediction_type: str = "epsilon", rho: float = 7.0, solver_order: int = 2,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, algorithm_type: str = "dpmsolver++",
                 solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                 final_sigmas_type: str = "zero"):
        self._check_dpm_solver(algorithm_type, solver_type, final_sigmas_type, ("dpmsolver++", "sde-dpmsolver++"))
        ramp = torch.linspace(0, 1, num_train_timesteps)
        sigmas = self._ramp_sigmas(ramp)
        self.timesteps = self.precondition_noise(sigmas)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)]).to("cpu")
        self.num_inference_steps = None
        self.lower_order_nums = 0
        self._start_run()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None):
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        sig = self._ramp_sigmas(torch.linspace(0, 1, num_inference_steps)).to(dtype=torch.float32, device=device)
        self.timesteps = self.precondition_noise(sig)
        kind = self.config.final_sigmas_type
        if kind not in ("zero", "sigma_min"):
            raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {kind}")
        last = self.config.sigma_min if kind == "sigma_min" else 0
        self.sigmas = torch.cat([sig, torch.tensor([last], dtype=torch.float32, device=device)]).to("cpu")
        self.lower_order_nums = 0
        self._start_run()

    def _build_table(self, start: int = 0) -> S.SamplerTable:
        cfg, n = self.config, len(self.timesteps)
        final_rule = cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        with S.lenient():
            return S.dpm_multistep(_host(self.sigmas)[start:], orders=self._orders(start, final_rule),
                                   algorithm_type=cfg.algorithm_type, solver_type=cfg.solver_type,
                                   timesteps=_host(self.timesteps)[start:])

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """One multistep step; the SDE form draws noise from ``generator``."""
        sde = self.config.algorithm_type == "sde-dpmsolver++"

        def noise_fn(idx, rows):
            return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype) if sde else None

        out = self._fused_step(model_output, timestep, sample, noise_fn=noise_fn, return_dict=return_dict)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        return out
