"""Singlestep DPM-Solver (Lu et al. 2022, Algorithms 1-3; Lu et al. 2022b for the data-prediction form):
each group of 1-3 calls starts from the sample stored at its first call and combines the group's model
outputs; rows in diffusers' own alpha form, in the VP (or flow) frame.

Ring slots: 0 holds the group's starting sample (copied in at a group's first call, the one write the fused
update cannot also make), 1-2 the group's first two model outputs (x0, or eps for ``dpmsolver``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import samplers as S
from fastdiff.compat.diffusers.scheduling_base import (
    _host,
    check_inference_steps,
    frame_row,
    randn_tensor,
    register_to_config,
)
from fastdiff.compat.diffusers.scheduling_multistep import _MultistepScheduler

_START = 0


class DPMSolverSinglestepScheduler(_MultistepScheduler):
    """diffusers' ``DPMSolverSinglestepScheduler`` (``dpmsolver++``, ``dpmsolver``, ``sde-dpmsolver++``;
    orders 1-3 by diffusers' order list)."""

    _warmup = False

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = False, use_karras_sigmas: Optional[bool] = False,
                 use_exponential_sigmas: Optional[bool] = False, use_beta_sigmas: Optional[bool] = False,
                 use_flow_sigmas: Optional[bool] = False, flow_shift: Optional[float] = 1.0,
                 final_sigmas_type: Optional[str] = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: Optional[str] = None, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        self._init_multistep(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type)
        self._check_dpm_solver(algorithm_type, solver_type, final_sigmas_type,
                               ("dpmsolver", "dpmsolver++", "sde-dpmsolver++"))
        self.sample = None
        self.order_list = self.get_order_list(num_train_timesteps)

    def get_order_list(self, num_inference_steps: int) -> list:
        steps, order, cfg = num_inference_steps, self.config.solver_order, self.config
        if order > 3:
            raise ValueError("Order > 3 is not supported by this scheduler")
        if cfg.lower_order_final:
            if order == 3:
                if steps % 3 == 0:
                    orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
                elif steps % 3 == 1:
                    orders = [1, 2, 3] * (steps // 3) + [1]
                else:
                    orders = [1, 2, 3] * (steps // 3) + [1, 2]
            elif order == 2:
                orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
            else:
                orders = [1] * steps
        else:
            orders = [1, 2, 3] * (steps // 3) if order == 3 else [1, 2] * (steps // 2) if order == 2 \
                else [1] * steps
        if cfg.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu=None, timesteps=None):
        cfg = self.config
        self._dynamic_shift(mu)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Must pass exactly one of  `num_inference_steps` or `timesteps`.")
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and getattr(cfg, flag):
                raise ValueError(f"Cannot set `timesteps` with `config.{flag} = True`.")
        if timesteps is None:
            check_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        num_inference_steps = num_inference_steps or len(timesteps)
        self.num_inference_steps = num_inference_steps
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
        else:
            clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped).item())
            ts = np.linspace(0, cfg.num_train_timesteps - 1 - clipped, num_inference_steps + 1) \
                .round()[::-1][:-1].copy().astype(np.int64)
        if cfg.use_flow_sigmas and not (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            sig, ts = self._flow_layout(num_inference_steps)
        else:
            sig, ts = self._vp_layout(num_inference_steps, ts)
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f" `final_sigmas_type` must be one of `sigma_min` or `zero`, but got "
                             f"{cfg.final_sigmas_type}")
        self._finish_layout(np.concatenate([sig, [self._final_sigma()]]), ts, device)
        self.sample = None
        if not cfg.lower_order_final and num_inference_steps % cfg.solver_order != 0:
            self.register_to_config(lower_order_final=True)
        if not cfg.lower_order_final and cfg.final_sigmas_type == "zero":
            self.register_to_config(lower_order_final=True)
        self.order_list = self.get_order_list(num_inference_steps)

    # -- rows ------------------------------------------------------------------------------------------------

    def _model_sigmas(self, sig):
        """(alpha, sigma_model, lambda) of diffusers' sigmas in the sample's frame."""
        sig = np.asarray(sig, dtype=np.float64)
        alpha, sm = self._sigma_to_alpha_sigma_t(sig)
        alpha, sm = np.asarray(alpha, dtype=np.float64), np.asarray(sm, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return alpha, sm, np.log(alpha) - np.log(sm)

    def _row(self, i: int, order: int) -> S.SamplerTable:
        """The call at step i with this order: x_t from the group's start (slot 0) and its outputs."""
        cfg = self.config
        sig = _host(self.sigmas)
        alpha, sm, lam = self._model_sigmas(sig)
        t, s0 = i + 1, i
        start = i - order + 1
        h = lam[t] - lam[start]
        a_t, sm_t = alpha[t], sm[t]
        data = cfg.algorithm_type != "dpmsolver"
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if data:
                em = np.expm1(-h)
                e2 = -np.expm1(-2.0 * h)
                a = sm_t / sm[start] * (np.exp(-h) if sde else 1.0)
                c0 = a_t * e2 if sde else -a_t * em
                c1_mid = 0.5 * c0
                c1_heun = a_t * (e2 / (-2.0 * h) + 1.0) if sde else a_t * (em / h + 1.0)
                c2 = a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if sde else -a_t * ((em + h) / h ** 2 - 0.5)
                noise = sm_t * np.sqrt(e2) if sde else 0.0
            else:
                ep = np.expm1(h)
                a = a_t / alpha[start]
                c0 = -sm_t * ep
                c1_mid = -0.5 * sm_t * ep
                c1_heun = -sm_t * (ep / h - 1.0)
                c2 = -sm_t * ((ep - h) / h ** 2 - 0.5)
                noise = 0.0
            if order == 1:
                vec = {0: c0}  # 0: this call's output
            elif order == 2:
                r0 = (lam[s0] - lam[start]) / h
                d1 = {0: 1 / r0, 1: -1 / r0}  # (m0 - m1) / r0 with m1 the group's first output
                k = c1_mid if cfg.solver_type == "midpoint" else c1_heun
                vec = {1: c0 + k * d1[1], 0: k * d1[0]}
            else:
                r0 = (lam[s0] - lam[start]) / h
                r1 = (lam[i - 1] - lam[start]) / h
                # D0 = m2 (first), D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0 (0: current, 1: first, 2: second)
                d1_0 = {2: 1 / r1, 1: -1 / r1}
                d1_1 = {0: 1 / r0, 1: -1 / r0}
                vec = {1: c0}
                if cfg.solver_type == "midpoint":
                    for k_, v in d1_1.items():
                        vec[k_] = vec.get(k_, 0.0) + c1_heun * v
                else:
                    for k_ in (0, 1, 2):
                        d1 = (r0 * d1_0.get(k_, 0.0) - r1 * d1_1.get(k_, 0.0)) / (r0 - r1)
                        d2 = 2.0 * (d1_1.get(k_, 0.0) - d1_0.get(k_, 0.0)) / (r0 - r1)
                        vec[k_] = vec.get(k_, 0.0) + c1_heun * d1 + c2 * d2
        if not data:  # the entries are eps = (x - alpha x0) / sigma_model at each call's level
            hist = (1.0 / sm[s0], -alpha[s0] / sm[s0], 0.0)
        else:
            hist = "x0"
        slots = {_START: float(a)}
        for k_, v in vec.items():
            if k_ > 0:
                slots[k_] = slots.get(k_, 0.0) + float(v)
        write = order if order < 3 else -1  # the group's first output -> slot 1, second -> slot 2
        sig_view = self._sigma_view()
        return frame_row("dpm_singlestep", sig_view[s0], sig_view[t], self._state_frame, num_slots=3,
                         b_new=float(vec.get(0, 0.0)), slots=slots, write_slot=write, c=float(noise),
                         hist=hist, timestep=float(self.timesteps[i]))

    _rowwise = True

    def _order(self, i: int) -> int:
        order = self.order_list[i]
        done = i - (self._run_first if self._run_first is not None else i)
        return min(order, done + 1)

    def _call_row(self, idx: int, timestep, **options):
        order = self._order(idx)
        return (idx, order), lambda: self._row(idx, order)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._run_first = None

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """One call of the group: the first stores the sample, the last gives the group's end."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._run_first is None:
            self._run_first = self._step_index
        order = self._order(self._step_index)
        x = sample if sample.dtype in (torch.float32, torch.float64) else sample.float()
        model_output = self._model_x0_output(model_output, sample)
        sde = self.config.algorithm_type == "sde-dpmsolver++"

        def noise_fn(idx, rows):
            return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype) if sde else None

        self._ring_start = order == 1  # the group's start: _ring copies x into slot 0 before the update
        out = self._fused_step(model_output, timestep, x, noise_fn=noise_fn, return_dict=return_dict)
        self.sample = sample if order == 1 else self.sample
        return out

    def _ring(self, table, x, idx):
        hist = super()._ring(table, x, None)
        if getattr(self, "_ring_start", False):
            hist[_START].copy_(x)
            self._ring_start = False
        return hist
