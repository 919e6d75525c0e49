"""KDPM2 and KDPM2 ancestral (k-diffusion's DPM-Solver-2 samplers as diffusers lays them out): two calls per
step, the second at the geometric midpoint; the step's end is built on the first call's stored state, as
diffusers keeps it. Rows are written in the sigma view, one per call, from diffusers' own sigma arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff.compat.diffusers.scheduling_base import (
    KARRAS_SCHEDULERS,
    BaseOutput,
    _check_one_spacing,
    _sigma_to_t,
    _SigmaScheduler,
    _spaced,
    frame_row,
    randn_tensor,
    register_to_config,
)


@dataclass
class KDPM2DiscreteSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None


@dataclass
class KDPM2AncestralDiscreteSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None


class _KDPM2Base(_SigmaScheduler):
    order = 2
    _rowwise = True
    _compatibles = KARRAS_SCHEDULERS
    _output_cls = KDPM2DiscreteSchedulerOutput

    def _init_kdpm2(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                    prediction_type):
        _check_one_spacing(self.config)
        if prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, False,
                            prediction_type)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def _layout(self, num_inference_steps, num_train_timesteps):
        """diffusers' step sigmas (with the final 0) and their timesteps."""
        cfg = self.config
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        n_train = num_train_timesteps or cfg.num_train_timesteps
        ts = _spaced(cfg.timestep_spacing, n_train, num_inference_steps, cfg.steps_offset, np.float32)
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        sig, ts = self._sigma_layout(num_inference_steps, ts, cfg.use_karras_sigmas, cfg.use_exponential_sigmas,
                                     cfg.use_beta_sigmas)
        if cfg.use_karras_sigmas:
            ts = np.asarray(ts).round()
        self.log_sigmas = torch.from_numpy(log_sigmas)
        sig = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        return sig, torch.from_numpy(np.asarray(ts)), log_sigmas

    @staticmethod
    def _twice(v: Tensor) -> Tensor:
        return torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])

    def _lay_out_calls(self, sig: Tensor, interpol: Tensor, ts: Tensor, log_sigmas: np.ndarray, device) -> None:
        """The per-call arrays from the step sigmas (with the final 0), their midpoints and the step timesteps:
        each step after the first is called at its midpoint's timestep, then at its own; a new run."""
        self.sigmas = self._twice(sig)
        self.sigmas_interpol = self._twice(interpol)
        ts_interpol = torch.from_numpy(np.array([_sigma_to_t(s, log_sigmas, torch_math=True)
                                                 for s in interpol.numpy()]))
        ts_interpol = ts_interpol.to(dtype=ts.dtype)
        first = self._interpol_index(1)  # the ancestral variant's midpoints sit one place earlier
        mid = ts_interpol[first:first + len(ts) - 1, None]
        self.timesteps = torch.cat([ts[:1], torch.stack((mid, ts[1:, None]), dim=-1).flatten()]).to(device)
        self.sample = None
        self._start_run()

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """``sample / sqrt(sigma^2 + 1)`` at the call's sigma (the midpoint in a step's second call)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[self._interpol_index(i)]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def _interpol_index(self, i: int) -> int:
        return i

    def _call_row(self, idx: int, timestep, **options):
        first = self.state_in_first_order
        return (idx, first), lambda: self._row(idx, first)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """One of the two calls of a DPM-Solver-2 step (diffusers calls ``step`` twice per step)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        first, idx = self.state_in_first_order, self._step_index
        noisy = not first and self._noisy

        def noise_fn(i, rows):
            return randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                generator=generator) if noisy else None

        self._ring_keep = first
        prev = self._fused_step(model_output, timestep, sample, noise_fn=noise_fn, return_dict=False)[0]
        table = self._tables[("call", idx, first)][0]
        sigma_in = float(table.sigma[0])
        x0 = self._x0_of(model_output, sample.to(torch.float32), sigma_in).to(prev.dtype)
        self.sample = sample if first else None
        if not return_dict:
            return (prev, x0)
        return self._output_cls(prev_sample=prev, pred_original_sample=x0)

    _noisy = False

    def _x0_of(self, m: Tensor, x: Tensor, sigma: float) -> Tensor:
        if self.config.prediction_type == "epsilon":
            return x - sigma * m
        return m * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)

    def _ring(self, table, x, idx):
        # the first call of a step starts a new step: the stored state is its own, whatever came before
        return super()._ring(table, x, None if self._ring_keep else idx)


class KDPM2DiscreteScheduler(_KDPM2Base):
    """diffusers' ``KDPM2DiscreteScheduler``: DPM-Solver-2 (Lu et al. 2022, r = 1/2) in sigma, k-diffusion's
    ``sample_dpm_2``, with the midpoint model call at ``sigmas_interpol``."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0):
        self._init_kdpm2(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      num_train_timesteps: Optional[int] = None):
        sig, ts, log_sigmas = self._layout(num_inference_steps, num_train_timesteps)
        interpol = sig.log().lerp(sig.roll(1).log(), 0.5).exp()
        self._lay_out_calls(sig, interpol, ts, log_sigmas, device)

    def _row(self, i: int, first: bool):
        sig, mid = self.sigmas.double().numpy(), self.sigmas_interpol.double().numpy()
        if first:  # x2 = x + (sigma_mid - sigma) eps at sigma; keep x
            s, s_mid = sig[i], mid[i + 1]
            return frame_row("kdpm2", s, s_mid, "sigma", a=1.0, g_eps=s_mid - s, hist="state", write_slot=0,
                             timestep=float(self.timesteps[i]))
        s, s_mid, s_next = sig[i - 1], mid[i], sig[i]
        k = (s_next - s) / s_mid  # x' = kept + (sigma' - sigma) (x2 - x0_2) / sigma_mid
        return frame_row("kdpm2", s_mid, s_next, "sigma", a=k, b_new=-k, slots={0: 1.0},
                         timestep=float(self.timesteps[i]))


class KDPM2AncestralDiscreteScheduler(_KDPM2Base):
    """diffusers' ``KDPM2AncestralDiscreteScheduler``: k-diffusion's ``sample_dpm_2_ancestral``
    (DPM-Solver-2 to sigma_down, then noise of std sigma_up), on diffusers' sigma arrays."""

    _noisy = True
    _output_cls = KDPM2AncestralDiscreteSchedulerOutput

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0):
        self._init_kdpm2(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      num_train_timesteps: Optional[int] = None):
        sig, ts, log_sigmas = self._layout(num_inference_steps, num_train_timesteps)
        nxt = sig.roll(-1)
        nxt[-1] = 0.0
        up = (nxt ** 2 * (sig ** 2 - nxt ** 2) / sig ** 2) ** 0.5
        down = (nxt ** 2 - up ** 2) ** 0.5
        down[-1] = 0.0
        interpol = sig.log().lerp(down.log(), 0.5).exp()
        interpol[-2:] = 0.0
        self.sigmas_up = self._twice(up)
        self.sigmas_down = self._twice(down)
        self._lay_out_calls(sig, interpol, ts, log_sigmas, device)

    def _interpol_index(self, i: int) -> int:
        return i - 1  # diffusers' ancestral variant reads the midpoint one place earlier

    def _row(self, i: int, first: bool):
        sig, mid = self.sigmas.double().numpy(), self.sigmas_interpol.double().numpy()
        up, down = self.sigmas_up.double().numpy(), self.sigmas_down.double().numpy()
        if first:
            s, s_mid = sig[i], mid[i]
            return frame_row("kdpm2_ancestral", s, s_mid, "sigma", a=1.0, g_eps=s_mid - s, hist="state",
                             write_slot=0, timestep=float(self.timesteps[i]))
        s, s_mid, s_down, s_up = sig[i - 1], mid[i - 1], down[i - 1], up[i - 1]
        k = (s_down - s) / s_mid
        return frame_row("kdpm2_ancestral", s_mid, sig[i], "sigma", a=k, b_new=-k, slots={0: 1.0}, c=s_up,
                         timestep=float(self.timesteps[i]))
