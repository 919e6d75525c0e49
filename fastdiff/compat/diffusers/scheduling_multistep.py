"""Multistep solvers on the model-frame state: DPM-Solver++ (2M, 2M SDE) and UniPC."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import samplers as S
from fastdiff.compat.diffusers.scheduling_base import (
    _exponential,
    _host,
    _karras,
    _sigma_to_t,
    _spaced,
    _VPScheduler,
    randn_tensor,
    register_to_config,
)


class _MultistepScheduler(_VPScheduler):
    _x0_output = False
    _upcast = True
    _warmup = True

    def _multistep_layout(self, num_inference_steps: int, last_timestep: int, karras: bool, exponential: bool,
                          timesteps=None):
        """diffusers' multistep timesteps and sigmas (before the final sigma is appended)."""
        cfg = self.config
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
        else:
            ts = _spaced(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset,
                         np.int64, multistep=True, last=last_timestep)
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        if karras:
            sig = _karras(np.flip(train).copy(), num_inference_steps, getattr(cfg, "sigma_min", None),
                          getattr(cfg, "sigma_max", None))
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
            if cfg.beta_schedule != "squaredcos_cap_v2" or type(self) is UniPCMultistepScheduler:
                ts = ts.round()
        elif exponential:
            sig = _exponential(np.flip(train).copy(), num_inference_steps, getattr(cfg, "sigma_min", None),
                               getattr(cfg, "sigma_max", None))
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
        else:
            sig = np.interp(ts, np.arange(0, len(train)), train)
        return sig, ts

    def _final_sigma(self, sig: np.ndarray) -> float:
        kind = self.config.final_sigmas_type
        if kind == "zero":
            return 0.0
        if kind == "sigma_min":
            return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {kind}")

    def _finish_layout(self, sig: np.ndarray, ts: np.ndarray, device) -> None:
        sig = np.asarray(sig).astype(np.float32)
        if sig[-1] > 0 and sig[-1] >= sig[-2]:
            raise NotImplementedError("the last step would not lower sigma (final_sigmas_type='sigma_min' "
                                      "with Karras/exponential sigmas); use final_sigmas_type='zero'")
        self.sigmas = torch.from_numpy(sig)
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha_t x0 + sigma_t noise`` at the sigma of each timestep's step (diffusers' add_noise)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._step_indices(timesteps, original_samples.device)].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha * original_samples + sigma * alpha * noise

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """As diffusers' multistep schedulers: a timestep not in the schedule maps to the last step."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        idx = (schedule_timesteps == timestep).nonzero()
        if len(idx) == 0:
            return len(self.timesteps) - 1
        return int(idx[1 if len(idx) > 1 else 0].item())

    def _model_x0_output(self, model_output: Tensor, sample: Tensor) -> Tensor:
        if getattr(self.config, "variance_type", None) in ("learned", "learned_range"):
            model_output = model_output[:, :sample.shape[1]]
        return model_output


class DPMSolverMultistepScheduler(_MultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++, Lu et al. 2022b) on
    :func:`fastdiff.samplers.dpmpp_2m` (``dpmsolver++``) and :func:`fastdiff.samplers.dpmpp_2m_sde`
    (``sde-dpmsolver++``), solver orders 1 and 2."""

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
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise NotImplementedError(f"algorithm_type {algorithm_type!r} is not supported; use "
                                      "'dpmsolver++' or 'sde-dpmsolver++'")
        if solver_order not in (1, 2) or (algorithm_type == "sde-dpmsolver++" and solver_order != 2):
            raise NotImplementedError(f"solver_order={solver_order} is not supported for {algorithm_type} "
                                      "(dpmsolver++: 1 or 2; sde-dpmsolver++: 2)")
        if solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"solver_type {solver_type!r} is not supported")
        if use_beta_sigmas or use_lu_lambdas or use_flow_sigmas or use_dynamic_shifting:
            raise NotImplementedError("beta, Lu-lambda, flow and dynamically shifted sigmas are not "
                                      "supported")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32)[::-1].copy())
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu=None, timesteps=None):
        cfg = self.config
        if mu is not None:
            raise NotImplementedError("mu (dynamic shifting) is not supported")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError("Cannot use `timesteps` with `config.use_karras_sigmas` or "
                             "`config.use_exponential_sigmas`.")
        if timesteps is None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
        last_timestep = int((cfg.num_train_timesteps - clipped_idx).numpy().item())
        steps = num_inference_steps if timesteps is None else len(timesteps)
        sig, ts = self._multistep_layout(steps, last_timestep, cfg.use_karras_sigmas,
                                         cfg.use_exponential_sigmas, timesteps)
        self._finish_layout(np.concatenate([sig, [self._final_sigma(sig)]]), ts, device)

    def _build_table(self, start: int = 0) -> S.SamplerTable:
        cfg = self.config
        sig, ts = _host(self.sigmas), _host(self.timesteps)
        n = len(ts)  # diffusers' lower_order_final looks at the whole schedule's length
        sig, ts = sig[start:], ts[start:]
        if cfg.algorithm_type == "sde-dpmsolver++":
            if cfg.final_sigmas_type != "zero" and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)):
                raise NotImplementedError("sde-dpmsolver++ with a first-order last step into sigma_min "
                                          "is not supported")
            return S.dpmpp_2m_sde(sig, solver_type=cfg.solver_type, timesteps=ts)
        m = len(ts)
        orders = [1] + [2] * (m - 1) if cfg.solver_order == 2 else [1] * m
        if cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero":
            orders[-1] = 1
        return S.dpmpp_2m(sig, solver_type=cfg.solver_type, orders=orders, timesteps=ts)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None,
             variance_noise: Optional[Tensor] = None, return_dict: bool = True):
        """One multistep DPM-Solver++ step; the SDE variant draws float32 noise from ``generator``."""
        model_output = self._model_x0_output(model_output, sample)
        sde = self.config.algorithm_type == "sde-dpmsolver++"

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
    """diffusers' ``UniPCMultistepScheduler`` (Zhao et al. 2023, UniP + UniC, x0 prediction) on
    :func:`fastdiff.samplers.unipc`."""

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
        if not predict_x0 or solver_p is not None:
            raise NotImplementedError("UniPC with predict_x0=False or a solver_p is not supported")
        if solver_type not in ("bh1", "bh2"):
            raise NotImplementedError(f"solver_type {solver_type!r} is not supported")
        if use_beta_sigmas or use_flow_sigmas or use_dynamic_shifting or shift_terminal:
            raise NotImplementedError("beta, flow and shifted sigmas are not supported")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr, prediction_type)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32)[::-1].copy())
        self.lower_order_nums = 0
        self.solver_p = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, mu=None):
        cfg = self.config
        if sigmas is not None:
            raise ValueError("Passing `sigmas` is only supported when `use_flow_sigmas=True`, which fastdiff "
                             "does not support.")
        if mu is not None:
            raise NotImplementedError("mu (dynamic shifting) is not supported")
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        sig, ts = self._multistep_layout(num_inference_steps, cfg.num_train_timesteps, cfg.use_karras_sigmas,
                                         cfg.use_exponential_sigmas)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            last = float(sig[-1]) if cfg.final_sigmas_type == "sigma_min" else self._final_sigma(sig)
        else:
            last = self._final_sigma(sig)
        self._finish_layout(np.concatenate([sig, [last]]), ts, device)

    def _build_table(self, start: int = 0) -> S.SamplerTable:
        cfg = self.config
        off = tuple(d - start for d in cfg.disable_corrector if d >= start)
        return S.unipc(_host(self.sigmas)[start:], order=cfg.solver_order, solver_type=cfg.solver_type,
                       lower_order_final=cfg.lower_order_final, disable_corrector=off,
                       timesteps=_host(self.timesteps)[start:])

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        """UniC correction of this step's state, then UniP prediction of the next, in one fused update."""
        out = self._fused_step(self._model_x0_output(model_output, sample), timestep, sample,
                               return_dict=return_dict)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        return out
