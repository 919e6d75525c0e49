"""DDPM and DDIM: the row follows from the timestep; the sample is the model-frame state."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import samplers as S
from fastdiff.compat.diffusers.scheduling_base import (
    _host,
    _spaced,
    _vp_sigmas,
    _VPScheduler,
    randn_tensor,
    register_to_config,
)

_DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                   "fixed_large": "fixed_large", "learned_range": "learned_range"}


class DDPMScheduler(_VPScheduler):
    """diffusers' ``DDPMScheduler`` (Ho et al. 2020) on :func:`fastdiff.samplers.ddpm`."""

    _stateless = True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type not in _DDPM_VARIANCES:
            raise NotImplementedError(f"variance_type {variance_type!r} is not supported; use one of "
                                      f"{sorted(_DDPM_VARIANCES)}")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type)
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self.num_inference_steps = num_train_timesteps  # diffusers steps every timestep until set_timesteps

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None):
        n = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.int64)
            if np.any(np.diff(ts) >= 0):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if ts[0] >= n:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {n}.")
            self.custom_timesteps = True
        else:
            if num_inference_steps is None or num_inference_steps < 1 or num_inference_steps > n:
                raise ValueError(f"num_inference_steps must lie in [1, {n}], got {num_inference_steps!r}")
            ts = _spaced(self.config.timestep_spacing, n, num_inference_steps, self.config.steps_offset,
                         np.int64)
            self.custom_timesteps = False
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(ts).to(device)
        self._reset_state()

    def previous_timestep(self, timestep):
        idx = self._stateless_index(timestep)
        return self.timesteps[idx + 1] if idx + 1 < len(self.timesteps) else torch.tensor(-1)

    def _build_table(self) -> S.SamplerTable:
        ts = _host(self.timesteps).astype(np.int64)
        abar = _host(self.alphas_cumprod)
        sigmas = np.concatenate([_vp_sigmas(abar[ts]), [0.0]])
        return S.ddpm(sigmas, variance=_DDPM_VARIANCES[self.variance_type], final_noise=bool(ts[-1] > 0),
                      timesteps=ts)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """One ancestral DDPM step; noise ``randn_tensor(model_output.shape, generator)`` where t > 0."""
        variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type == "learned_range":
            model_output, variance = torch.split(model_output, sample.shape[1], dim=1)
        elif self.variance_type == "learned_range":
            raise ValueError("variance_type='learned_range' needs a model_output with twice sample's "
                             "channels")

        def noise_fn(idx, rows):
            t = self.timesteps.to(rows.device)[rows.long()]
            if not bool((t > 0).any()):
                return None
            return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype)

        return self._fused_step(model_output, timestep, sample, noise_fn=noise_fn, variance=variance,
                                return_dict=return_dict)


class DDIMScheduler(_VPScheduler):
    """diffusers' ``DDIMScheduler`` (Song et al. 2021, Eq. 12) on :func:`fastdiff.samplers.ddim`."""

    _stateless = True

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
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device=None):
        n = self.config.num_train_timesteps
        if num_inference_steps is None or num_inference_steps < 1 or num_inference_steps > n:
            raise ValueError(f"num_inference_steps must lie in [1, {n}], got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        ts = _spaced(self.config.timestep_spacing, n, num_inference_steps, self.config.steps_offset, np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)
        self._reset_state()

    def _build_table(self, eta: float = 0.0, use_clipped_model_output: bool = False) -> S.SamplerTable:
        ts = _host(self.timesteps).astype(np.int64)
        abar = _host(self.alphas_cumprod)
        final = float(self.final_alpha_cumprod)
        prev = ts - self.config.num_train_timesteps // self.num_inference_steps
        target = _vp_sigmas(np.where(prev >= 0, abar[np.clip(prev, 0, None)], final))
        sigmas = np.concatenate([_vp_sigmas(abar[ts]), _vp_sigmas(np.array([final]))])
        if np.any(target >= sigmas[:-1]) or np.any(np.diff(sigmas) >= 0):
            raise NotImplementedError("a DDIM step here would not lower the noise level (timestep 0 with "
                                      "set_alpha_to_one=False): use steps_offset=1 or set_alpha_to_one=True")
        return S.ddim(sigmas, eta=eta, eps_from="x0" if use_clipped_model_output else "raw",
                      target_sigmas=target, timesteps=ts)

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[Tensor] = None,
             return_dict: bool = True):
        """One DDIM(eta) step; noise from ``variance_noise`` or ``generator`` when eta > 0, as diffusers."""
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
