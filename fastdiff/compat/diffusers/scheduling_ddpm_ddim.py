"""DDPM and DDIM: the row of a timestep is built from diffusers' own float32 formulas in the VP frame ("alpha
form"), on demand, so any timestep steps (in the schedule or not) and abar = 0 (zero terminal SNR) is a
finite row."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff.compat.diffusers.scheduling_base import (
    KARRAS_SCHEDULERS,
    _CustomTimesteps,
    _spaced,
    _vp_sigmas,
    _VPScheduler,
    check_inference_steps,
    frame_row,
    randn_tensor,
    register_to_config,
)

_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                   "learned_range")


class DDPMScheduler(_CustomTimesteps, _VPScheduler):
    """diffusers' ``DDPMScheduler`` (Ho et al. 2020): the ancestral posterior step of
    :func:`fastdiff.samplers.ddpm`, one row per timestep in diffusers' float32 arithmetic.

    ``variance_type="learned"`` is the one option without a row: its noise std is the square root of the
    model's variance output, elementwise, not a coefficient (``learned_range`` interpolates log variances and
    is one).
    """

    _stateless = True
    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type == "learned":
            raise NotImplementedError("variance_type='learned' takes the square root of the model's variance "
                                      "output elementwise: not a table coefficient (use learned_range)")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None):
        n = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = self._custom_timesteps(timesteps)
        else:
            self.num_inference_steps = check_inference_steps(num_inference_steps, n)
            ts = _spaced(self.config.timestep_spacing, n, num_inference_steps, self.config.steps_offset,
                         np.int64)
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(ts).to(device)
        self._reset_state()

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """diffusers' DDPM variance at t (float32, the same arithmetic)."""
        prev_t = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_t = 1 - abar_t / abar_prev
        variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
        variance_type = variance_type or self.config.variance_type
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if variance_type == "fixed_large":
            return beta_t
        if variance_type == "fixed_large_log":
            return torch.log(beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta_t) + (1 - frac) * torch.log(variance)
        return variance

    def _row_table(self, timestep):
        t = int(timestep)
        prev_t = int(self.previous_timestep(torch.tensor(t)))
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t, beta_prod_prev = 1 - abar_t, 1 - abar_prev
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        x0_coef = float(abar_prev ** 0.5 * beta_t / beta_prod_t)
        x_coef = float(alpha_t ** 0.5 * beta_prod_prev / beta_prod_t)
        c, lv = 0.0, (0.0, 0.0)
        if t > 0:
            kind = self.variance_type
            if kind == "learned_range":
                posterior = torch.clamp(beta_prod_prev / beta_prod_t * beta_t, min=1e-20)
                c, lv = 1.0, (float(torch.log(posterior)), float(torch.log(beta_t)))
            elif kind == "fixed_small_log":
                c = float(self._get_variance(t))
            else:
                c = float(self._get_variance(t) ** 0.5)
        sig = _vp_sigmas([float(abar_t), float(abar_prev)])
        return frame_row("ddpm", sig[0], sig[1], "vp", a=x_coef, b_new=x0_coef, c=c, lv=lv,
                         timestep=t)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """One ancestral DDPM step; noise ``randn_tensor(model_output.shape, generator)`` where t > 0."""
        variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type == "learned_range":
            model_output, variance = torch.split(model_output, sample.shape[1], dim=1)
        elif self.variance_type == "learned_range":
            raise ValueError("variance_type='learned_range' needs a model_output with twice sample's "
                             "channels")

        def noise_fn(idx, rows):
            ts = timestep.reshape(-1) if isinstance(timestep, Tensor) else torch.tensor([timestep])
            if not bool((ts > 0).any()):
                return None
            return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype)

        return self._fused_step(model_output, timestep, sample, noise_fn=noise_fn, variance=variance,
                                return_dict=return_dict)


class DDIMScheduler(_VPScheduler):
    """diffusers' ``DDIMScheduler`` (Song et al. 2021, Eq. 12): the step of :func:`fastdiff.samplers.ddim`,
    one row per timestep in diffusers' float32 arithmetic (it steps to ``t - N // steps``)."""

    _stateless = True
    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device=None):
        n = self.config.num_train_timesteps
        self.num_inference_steps = check_inference_steps(num_inference_steps, n)
        ts = _spaced(self.config.timestep_spacing, n, num_inference_steps, self.config.steps_offset, np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)
        self._reset_state()

    def _get_variance(self, timestep, prev_timestep):
        abar_t = self.alphas_cumprod[timestep]
        abar_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)

    def _row_table(self, timestep, eta: float = 0.0, use_clipped_model_output: bool = False):
        t = int(timestep)
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - abar_t
        std = eta * self._get_variance(t, prev) ** 0.5
        direction = float((1 - abar_prev - std ** 2) ** 0.5)
        a, b_new, g_eps = 0.0, float(abar_prev ** 0.5), direction
        if use_clipped_model_output:  # eps recomputed from the clipped x0
            a, b_new, g_eps = direction / float(beta_prod_t ** 0.5), \
                b_new - direction * float(abar_t ** 0.5 / beta_prod_t ** 0.5), 0.0
        sig = _vp_sigmas([float(abar_t), float(abar_prev)])
        return frame_row("ddim", sig[0], sig[1], "vp", a=a, b_new=b_new, g_eps=g_eps,
                         c=float(std) if eta > 0 else 0.0, timestep=t)

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[Tensor] = None,
             return_dict: bool = True):
        """One DDIM(eta) step; noise from ``variance_noise`` or ``generator`` when eta > 0, as diffusers."""
        self._require_timesteps()
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")

        def noise_fn(idx, rows):
            if not eta > 0:
                return None
            if variance_noise is not None:
                return variance_noise
            return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype)

        opts = {"eta": float(eta), "use_clipped_model_output": bool(use_clipped_model_output)}
        return self._fused_step(model_output, timestep, sample, options=opts, noise_fn=noise_fn,
                                return_dict=return_dict)
