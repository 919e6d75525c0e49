"""Consistency-style samplers: LCM and TCD. Each step denoises (with a boundary condition or to an
intermediate level) and noises the estimate back to the next timestep: :func:`fastdiff.samplers.lcm` in
alpha form, one row per call built from diffusers' float32 formulas (abar = 0 is a finite row)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff.compat.diffusers.scheduling_base import (
    BaseOutput,
    _CustomTimesteps,
    _vp_sigmas,
    _VPScheduler,
    frame_row,
    randn_tensor,
    register_to_config,
)

logger = logging.getLogger(__name__)


@dataclass
class LCMSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    denoised: Optional[Tensor] = None


@dataclass
class TCDSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    pred_noised_sample: Optional[Tensor] = None


class _ConsistencyScheduler(_CustomTimesteps, _VPScheduler):
    """LCM and TCD share diffusers' schedule: the distillation grid of ``original_inference_steps`` points."""

    _rowwise = True
    _x0_output = False
    _needs_set_timesteps = True
    _compatibles: list = []

    def _init_consistency(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          prediction_type, set_alpha_to_one, rescale_betas_zero_snr):
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.custom_timesteps = False

    def _origin_timesteps(self, original_steps, strength: float) -> np.ndarray:
        n = self.config.num_train_timesteps
        if original_steps > n:
            raise ValueError(f"`original_steps`: {original_steps} cannot be larger than "
                             f"`self.config.train_timesteps`: {n} as the unet model trained with this scheduler "
                             f"can only handle maximal {n} timesteps.")
        k = n // original_steps
        return np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1

    def _layout(self, num_inference_steps, timesteps, origin: np.ndarray, original_steps, strength, device):
        n = self.config.num_train_timesteps
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = self._custom_timesteps(timesteps)
            self.num_inference_steps = len(ts)
            init = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            ts = ts[max(self.num_inference_steps - init, 0) * self.order:]
        else:
            if num_inference_steps > n:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                                 f"`self.config.train_timesteps`: {n} as the unet model trained with this "
                                 f"scheduler can only handle maximal {n} timesteps.")
            if original_steps is not None:
                if len(origin) // num_inference_steps < 1:
                    raise ValueError(f"The combination of `original_steps x strength`: {original_steps} x "
                                     f"{strength} is smaller than `num_inference_steps`: {num_inference_steps}. "
                                     "Make sure to either reduce `num_inference_steps` or increase `strength`.")
                if num_inference_steps > original_steps:
                    raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                                     f"`original_inference_steps`: {original_steps} because the final timestep "
                                     "schedule will be a subset of the `original_inference_steps`-sized initial "
                                     "timestep schedule.")
            self.num_inference_steps = num_inference_steps
            origin = origin[::-1].copy()
            idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            ts = origin[idx]
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.long)
        self._start_run()

    def _abar(self, t) -> Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _eps_and_x0(self, model_output: Tensor, sample: Tensor, t: int):
        """diffusers' x0 and eps of a step, elementwise (for the second output these schedulers return)."""
        abar = self.alphas_cumprod[t]
        beta = 1 - abar
        pred = self.config.prediction_type
        if pred == "epsilon":
            return model_output, (sample - beta.sqrt() * model_output) / abar.sqrt()
        if pred == "sample":
            return (sample - abar ** 0.5 * model_output) / beta ** 0.5, model_output
        return abar ** 0.5 * model_output + beta ** 0.5 * sample, abar.sqrt() * sample - beta.sqrt() * model_output


class LCMScheduler(_ConsistencyScheduler):
    """diffusers' ``LCMScheduler`` (Luo et al. 2023, latent consistency models): ``denoised = c_skip x +
    c_out x0`` (the consistency boundary condition at the scaled timestep), then ``sqrt(abar') denoised +
    sqrt(1 - abar') noise`` to the next timestep (no noise after the last)."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False):
        self._init_consistency(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               prediction_type, set_alpha_to_one, rescale_betas_zero_snr)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      original_inference_steps: Optional[int] = None, timesteps=None, strength: float = 1.0):
        steps = original_inference_steps if original_inference_steps is not None \
            else self.config.original_inference_steps
        origin = self._origin_timesteps(steps, strength)
        self._layout(num_inference_steps, timesteps, origin, steps, strength, device)

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        self.sigma_data = 0.5
        scaled = timestep * self.config.timestep_scaling
        c_skip = self.sigma_data ** 2 / (scaled ** 2 + self.sigma_data ** 2)
        c_out = scaled / (scaled ** 2 + self.sigma_data ** 2) ** 0.5
        return c_skip, c_out

    def _call_row(self, idx: int, timestep):
        t = int(timestep)
        prev = int(self.timesteps[idx + 1]) if idx + 1 < len(self.timesteps) else t
        last = idx == self.num_inference_steps - 1
        key = (t, prev, last)

        def make():
            abar_t, abar_prev = self.alphas_cumprod[t], self._abar(prev)
            c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
            keep = 1.0 if last else float(abar_prev.sqrt())
            noise = 0.0 if last else float((1 - abar_prev).sqrt())
            sig = _vp_sigmas([float(abar_t), float(abar_prev)])
            return frame_row("lcm", sig[0], sig[1], "vp", a=keep * float(c_skip), b_new=keep * float(c_out),
                             c=noise, timestep=t)

        return key, make

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """One LCM step; the noise is ``randn_tensor(shape, generator)`` except after the last step."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        idx, t = self._step_index, int(timestep)
        last = idx == self.num_inference_steps - 1

        def noise_fn(i, rows):
            return None if last else randn_tensor(model_output.shape, generator=generator,
                                                  device=model_output.device, dtype=model_output.dtype)

        prev = self._fused_step(model_output, timestep, sample, noise_fn=noise_fn, return_dict=False)[0]
        _, x0 = self._eps_and_x0(model_output, sample, t)
        x0 = self._clip_like_diffusers(x0)
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        denoised = c_out * x0 + c_skip * sample
        if not return_dict:
            return (prev, denoised)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    def _clip_like_diffusers(self, x0: Tensor) -> Tensor:
        cfg = self.config
        if cfg.thresholding:
            n = x0.shape[0]
            flat = x0.float().reshape(n, -1)
            s = torch.quantile(flat.abs(), cfg.dynamic_thresholding_ratio, dim=1)
            s = s.clamp(min=1, max=cfg.sample_max_value).unsqueeze(1)
            return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)
        if cfg.clip_sample:
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0


class TCDScheduler(_ConsistencyScheduler):
    """diffusers' ``TCDScheduler`` (Zheng et al. 2024, trajectory consistency distillation): the step goes to
    the intermediate timestep ``floor((1 - eta) t')`` with x0 and eps (``pred_noised_sample``), then noises
    to ``t'`` (gamma = eta; no noise after the last step or with eta = 0)."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False):
        self._init_consistency(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               prediction_type, set_alpha_to_one, rescale_betas_zero_snr)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      original_inference_steps: Optional[int] = None, timesteps=None, strength: float = 1.0):
        steps = original_inference_steps if original_inference_steps is not None \
            else self.config.original_inference_steps
        if original_inference_steps is None:
            origin = self._origin_timesteps(steps, strength)
        else:
            origin = np.asarray(list(range(0, int(self.config.num_train_timesteps * strength))))
        self._layout(num_inference_steps, timesteps, origin, steps, strength, device)

    def _get_variance(self, timestep, prev_timestep):
        abar_t, abar_prev = self.alphas_cumprod[timestep], self._abar(prev_timestep)
        return (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)

    def _clip(self, x, m, coef, rows):
        return None  # diffusers' TCD step neither clips nor thresholds

    def _targets(self, idx: int, eta: float):
        prev = self.timesteps[idx + 1] if idx + 1 < len(self.timesteps) else torch.tensor(0)
        t_s = torch.floor((1 - eta) * prev).to(dtype=torch.long)
        return int(prev), int(t_s)

    def _call_row(self, idx: int, timestep, eta: float = 0.3):
        t = int(timestep)
        prev, t_s = self._targets(idx, eta)
        last = idx == self.num_inference_steps - 1
        key = (t, prev, t_s, last, float(eta))

        def make():
            abar_t, abar_prev, abar_s = self.alphas_cumprod[t], self._abar(prev), self.alphas_cumprod[t_s]
            to_prev = float((abar_prev / abar_s).sqrt()) if eta > 0 and not last else 1.0
            noise = float((1 - abar_prev / abar_s).sqrt()) if eta > 0 and not last else 0.0
            sig = _vp_sigmas([float(abar_t), float(abar_prev)])
            return frame_row("tcd", sig[0], sig[1], "vp", b_new=to_prev * float(abar_s.sqrt()),
                             g_eps=to_prev * float((1 - abar_s).sqrt()), c=noise, timestep=t)

        return key, make

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.3, generator=None,
             return_dict: bool = True):
        """One TCD step (gamma = eta)."""
        self._require_timesteps()
        if not 0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
        if self._step_index is None:
            self._init_step_index(timestep)
        idx, t = self._step_index, int(timestep)
        noisy = eta > 0 and idx != self.num_inference_steps - 1
        _, t_s = self._targets(idx, eta)

        def noise_fn(i, rows):
            return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype) if noisy else None

        prev = self._fused_step(model_output, timestep, sample, options={"eta": float(eta)}, noise_fn=noise_fn,
                                return_dict=False)[0]
        eps, x0 = self._eps_and_x0(model_output, sample, t)
        abar_s = self.alphas_cumprod[t_s]
        noised = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps
        if not return_dict:
            return (prev, noised)
        return TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=noised)
