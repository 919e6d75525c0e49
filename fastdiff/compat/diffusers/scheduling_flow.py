"""Flow matching: FlowMatchEuler and FlowMatchHeun (SD3, Flux, Wan, ...), rows written in the flow frame.

The sample is ``x_s = (1 - s) x0 + s eps`` and the model output the velocity ``v = eps - x0``; diffusers'
``sigmas`` are the flow times s. The rows take diffusers' own form (``x' = x + (s' - s) v``, the stochastic
``x' = (1 - s') (x - s v) + s' noise``, Heun's average of two velocities), so they hold at every s, from 1
(pure noise) to 0 and back (``invert_sigmas``).
"""

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
    _bcast,
    _beta_spacing,
    _check_one_spacing,
    _exponential,
    _HeunStages,
    _host,
    _karras,
    _TableScheduler,
    flow_frame_sigmas,
    randn_tensor,
    register_to_config,
    reject_integer_timestep,
)
from fastdiff.denoiser import x0_coefficients


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    prev_sample: Tensor


@dataclass
class FlowMatchHeunDiscreteSchedulerOutput(BaseOutput):
    prev_sample: Tensor


class _FlowScheduler(_TableScheduler):
    _frame = "flow"
    _x0_output = False
    init_noise_sigma = 1.0

    def _init_flow(self, num_train_timesteps: int, shift: Optional[float]) -> None:
        """diffusers' training layout: flow times t / N for t = N .. 1, shifted by ``shift`` (None: unshifted,
        the dynamic shift comes with set_timesteps)."""
        ts = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps,
                                          dtype=np.float32)[::-1].copy()).to(torch.float32)
        sigmas = ts / num_train_timesteps
        if shift is not None:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas.to("cpu")
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.num_inference_steps = None
        self._start_run()

    def _x0_pq(self, sigma):
        return x0_coefficients("flow", sigma)

    def scale_noise(self, sample: Tensor, timestep, noise: Optional[Tensor] = None) -> Tensor:
        """The forward process ``(1 - s) sample + s noise`` at the timestep's flow time."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        idx = self._step_indices(torch.as_tensor(timestep).reshape(-1), sample.device)
        sigma = _bcast(sigmas[idx].flatten(), sample)
        return sigma * noise + (1.0 - sigma) * sample

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps


class FlowMatchEulerDiscreteScheduler(_FlowScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler``: the Euler step of flow matching (and its
    ``stochastic_sampling`` form, :func:`fastdiff.samplers.lcm` in flow time), with static (SD3) or dynamic
    (Flux: ``mu`` in ``set_timesteps``) shifts, ``shift_terminal``, Karras / exponential / beta sigmas and
    ``invert_sigmas``.

    ``per_token_timesteps`` (a step size per token inside a sample) is the one option left out: a table row
    is per sample.
    """

    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: Optional[float] = 0.5, max_shift: Optional[float] = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, invert_sigmas: bool = False,
                 shift_terminal: Optional[float] = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False):
        _check_one_spacing(self.config)
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError("`time_shift_type` must either be 'exponential' or 'linear'.")
        self._shift = shift
        self._init_flow(num_train_timesteps, None if use_dynamic_shifting else shift)

    @property
    def shift(self):
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def time_shift(self, mu: float, sigma: float, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t):
        one_minus = 1 - t
        return 1 - one_minus / (one_minus[-1] / (1 - self.config.shift_terminal))

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None,
                      mu: Optional[float] = None, timesteps=None):
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or \
                    (timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps, "
                                 "if `num_inference_steps` is provided")
        else:
            if sigmas is None and timesteps is None:
                raise ValueError("Must pass one of `num_inference_steps`, `sigmas` or `timesteps`.")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        given_ts = timesteps is not None
        if given_ts:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min),
                                        num_inference_steps)
            sigmas = timesteps / cfg.num_train_timesteps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)
        if cfg.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if cfg.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        if cfg.use_karras_sigmas:
            sigmas = _karras(sigmas, num_inference_steps)
        elif cfg.use_exponential_sigmas:
            sigmas = _exponential(sigmas, num_inference_steps)
        elif cfg.use_beta_sigmas:
            sigmas = _beta_spacing(sigmas, num_inference_steps)
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
        if given_ts:
            timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device)
        else:
            timesteps = sigmas * cfg.num_train_timesteps
        if cfg.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps = sigmas * cfg.num_train_timesteps
            sigmas = torch.cat([sigmas, torch.ones(1, device=sigmas.device)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        self.timesteps = timesteps
        self.sigmas = sigmas
        self._start_run()

    def _build_table(self, stochastic: bool = False) -> S.SamplerTable:
        s = _host(self.sigmas)
        rows = S._Rows("flow_euler", "x0", 1, np.array([1.0, 0.0]), None)
        for i in range(len(s) - 1):
            sig, sig_next = flow_frame_sigmas(s[i:i + 2])
            if stochastic:  # x0 = x - s v, then noise to s'
                rows.add(i, sig, sig_next, a=1 - s[i + 1], g_m=-(1 - s[i + 1]) * s[i], c=s[i + 1], write=False)
            else:
                rows.add(i, sig, sig_next, a=1.0, g_m=s[i + 1] - s[i], write=False)
        table = rows.build()
        table.frame = "flow"
        table.timestep = np.concatenate([_host(self.timesteps), [np.nan] * (table.num_rows - len(self.timesteps))])
        return table

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True):
        """One flow-matching Euler step (``s_churn`` and friends are accepted and unused, as in diffusers)."""
        reject_integer_timestep(timestep, "FlowMatchEulerDiscreteScheduler")
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps (a step size per token inside a sample) is not a "
                                      "per-sample table row")
        stochastic = bool(self.config.stochastic_sampling)

        def noise_fn(idx, rows):
            if not stochastic:
                return None
            return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)

        prev = self._fused_step(model_output, timestep, sample.to(torch.float32),
                                options={"stochastic": stochastic}, noise_fn=noise_fn, return_dict=False)[0]
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


class FlowMatchHeunDiscreteScheduler(_HeunStages, _FlowScheduler):
    """diffusers' ``FlowMatchHeunDiscreteScheduler``: Heun's method on the velocity, in flow time; the second
    stage is built on the first stage's stored state and velocity, as diffusers keeps them (churn included)."""

    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self._init_flow(num_train_timesteps, shift)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        ts = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min), num_inference_steps)
        sigmas = ts / cfg.num_train_timesteps
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        ts = sigmas * cfg.num_train_timesteps
        self._heun_layout(torch.cat([sigmas, torch.zeros(1, device=sigmas.device)]), ts, device)
        self._start_run()

    def _build_table(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                     s_noise: float = 1.0) -> S.SamplerTable:
        s = _host(self._step_sigmas)
        n_all = len(self.sigmas) - 1  # diffusers' gamma divides by the repeated array's length
        rows = S._Rows("flow_heun", "x0", 1, np.array([1.0, 0.0]), None)
        for i in range(len(s) - 1):
            sig, sig_next = flow_frame_sigmas(s[i:i + 2])
            g = min(s_churn / n_all, 2 ** 0.5 - 1) if s_churn > 0 and s_tmin <= s[i] <= s_tmax else 0.0
            s_hat = s[i] * (g + 1)
            k = s_noise * float(np.sqrt(max(s_hat ** 2 - s[i] ** 2, 0.0)))  # churn noise, in flow units
            dt = s[i + 1] - s_hat
            v1 = dt * s[i] / s_hat  # diffusers' first derivative is v sigma / sigma_hat
            if s[i + 1] == 0:
                rows.add(i, sig, sig_next, a=1.0, g_m=v1, c=k, write=False)
                continue
            # stage 1: x2 = x + k z + dt v1, keeping x + dt/2 v1; stage 2: x' = kept + k z + dt/2 v2 (same z)
            rows.add(i, sig, sig_next, a=1.0, g_m=v1, c=k, hist=(1.0, 0.0, v1 / 2))
            rows.add(i, sig_next, sig_next, a=0.0, g_m=dt / 2, c=k, lags={1: 1.0}, write=False)
        table = rows.build()
        table.frame = "flow"
        table.timestep = _host(self.timesteps)
        return table

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True):
        """One stage of Heun's method on the velocity (diffusers calls ``step`` twice per step). With
        ``s_churn``, the churn noise of the first stage is the noise term of both stages' rows (diffusers
        draws a second one in the second stage, whose effect cancels; it is drawn here too, unused)."""
        reject_integer_timestep(timestep, "FlowMatchHeunDiscreteScheduler")
        opts = {}
        if s_churn > 0:
            opts = {"s_churn": float(s_churn), "s_tmin": float(s_tmin), "s_tmax": float(s_tmax),
                    "s_noise": float(s_noise)}
        first = self.state_in_first_order

        def noise_fn(idx, rows):
            if not s_churn > 0 or self._table(sample.device, **opts)[0].c[idx] == 0:
                return None
            z = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
            if first:
                self._churn_noise = z
            return self._churn_noise

        prev = self._fused_step(model_output, timestep, sample.to(torch.float32), options=opts, noise_fn=noise_fn,
                                return_dict=False)[0]
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return FlowMatchHeunDiscreteSchedulerOutput(prev_sample=prev)
