"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"): Runge-Kutta warm-up (PRK) and
linear multistep (PLMS) on the raw model outputs, each call one fused update whose row is built from
diffusers' float32 ``_get_prev_sample`` in alpha form.

The history is diffusers' own: ``ets`` (the raw outputs PLMS combines; assignable, as diffusers' tests do),
the stored ``cur_sample`` of a PRK group / of PLMS's first step, and the two inner PRK outputs. They live in
one ring of fixed slots: 0-3 the last four ``ets``, 4 ``cur_sample``, 5-6 the PRK stage outputs. A stage
that stores ``cur_sample`` copies the sample into slot 4 before its update (the one write the fused update
cannot also make).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff import samplers as S
from fastdiff.compat.diffusers.scheduling_base import (
    KARRAS_SCHEDULERS,
    SchedulerOutput,
    _vp_sigmas,
    _VPScheduler,
    check_inference_steps,
    register_to_config,
)

_ETS, _CUR, _PRK1, _PRK2 = (0, 1, 2, 3), 4, 5, 6
_SLOTS = 7


class PNDMScheduler(_VPScheduler):
    """diffusers' ``PNDMScheduler`` (the default of Stable Diffusion 1.x pipelines), PRK and PLMS."""

    _x0_output = False
    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, skip_prk_steps: bool = False,
                 set_alpha_to_one: bool = False, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise NotImplementedError(f"prediction_type given as {prediction_type} must be one of `epsilon` or "
                                      "`v_prediction`")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, False,
                            prediction_type)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._clear()

    def _clear(self) -> None:
        self.counter = 0
        self._ets_len = 0          # the logical length of diffusers' ets list
        self._has_cur = False
        self._hist: Optional[Tensor] = None
        self._rows_cache: dict = {}

    # -- diffusers' state, readable and assignable ------------------------------------------------------

    @property
    def ets(self) -> list:
        """The raw model outputs PLMS combines (the last four are kept)."""
        if self._hist is None:
            return []
        k = min(self._ets_len, 4)
        return [self._hist[self._ets_slot(j)] for j in range(self._ets_len - k, self._ets_len)]

    @ets.setter
    def ets(self, values) -> None:
        values = list(values)
        self._ets_len = 0
        if values:
            self._alloc(values[0])
        for v in values:
            self._hist[self._ets_slot(self._ets_len)].copy_(v)
            self._ets_len += 1

    @property
    def cur_sample(self) -> Optional[Tensor]:
        return self._hist[_CUR] if self._has_cur and self._hist is not None else None

    @staticmethod
    def _ets_slot(j: int) -> int:
        return _ETS[j % 4]

    def _alloc(self, like: Tensor) -> None:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if self._hist is None or self._hist.shape[1:] != like.shape or self._hist.device != like.device \
                or self._hist.dtype != dtype:
            old = self._hist
            self._hist = torch.zeros((_SLOTS, *like.shape), dtype=dtype, device=like.device)
            if old is not None and old.shape[1:] == like.shape:
                self._hist.copy_(old)

    # -- schedule ------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg = self.config
        n = cfg.num_train_timesteps
        self.num_inference_steps = check_inference_steps(num_inference_steps, n)
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, num_inference_steps).round().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, num_inference_steps) * (n // num_inference_steps)).round()
            ts += cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / num_inference_steps))[::-1].astype(np.int64) - 1
        else:
            raise ValueError(f"{cfg.timestep_spacing} is not supported. Please make sure to choose one of "
                             "'linspace', 'leading' or 'trailing'.")
        self._timesteps = ts
        if cfg.skip_prk_steps:
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            prk = np.array(ts[-self.pndm_order:]).repeat(2) + np.tile(
                np.array([0, n // num_inference_steps // 2]), self.pndm_order)
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = ts[:-3][::-1].copy()
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, self.plms_timesteps])
                                          .astype(np.int64)).to(device)
        self._clear()

    # -- rows ----------------------------------------------------------------------------------------------

    def _coefficients(self, t: int, prev: int):
        """``_get_prev_sample`` as ``src_coef * sample + m_coef * M`` (diffusers' float32 arithmetic)."""
        a_t = self.alphas_cumprod[t]
        a_p = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t, b_p = 1 - a_t, 1 - a_p
        sample_coeff = (a_p / a_t) ** 0.5
        denom = a_t * b_p ** 0.5 + (a_t * b_t * a_p) ** 0.5
        k = (a_p - a_t) / denom
        if self.config.prediction_type == "v_prediction":
            return float(sample_coeff - k * b_t ** 0.5), float(-k * a_t ** 0.5), float(a_t), float(a_p)
        return float(sample_coeff), float(-k), float(a_t), float(a_p)

    def _update(self, model_output: Tensor, sample: Tensor, t: int, prev: int, *, from_cur: bool,
                weights: dict, w_current: float, write: int, save_cur: bool) -> Tensor:
        """``_get_prev_sample(src, t, prev, w_current m + sum weights[s] slot_s)``, storing m in ``write``."""
        x = sample if sample.dtype in (torch.float32, torch.float64) else sample.float()
        self._alloc(x)
        if save_cur:
            self._hist[_CUR].copy_(x)
            self._has_cur = True
        key = (t, prev, from_cur, tuple(sorted(weights.items())), w_current, write)
        if key not in self._rows_cache:
            c_src, c_m, a_t, a_p = self._coefficients(t, prev)
            slots = {s: c_m * w for s, w in weights.items()}
            a = 0.0
            if from_cur:
                slots[_CUR] = slots.get(_CUR, 0.0) + c_src
            else:
                a = c_src
            sig = _vp_sigmas([a_t, a_p])
            rows = S._Rows("pndm", "x0", _SLOTS, np.array([1.0, 0.0]), None)
            rows.add(0, float(sig[0]), float(sig[1]), a=a, g_m=c_m * w_current, write=False, hist="model",
                     timestep=t)
            table = rows.build()
            table.frame = "vp"
            for s_, v in slots.items():
                table.b_slots[0, s_] += v
            table.write_slot[0] = write
            p, q = self._x0_pq(table.sigma)
            packed = S.pack_table(table, p, q, frame="vp", check=False)
            if not np.all(np.isfinite(packed)):
                raise ValueError(f"PNDMScheduler: the step at timestep {t} has non-finite coefficients")
            self._rows_cache[key] = packed
        coef = torch.tensor(self._rows_cache[key], dtype=torch.float64, device=x.device)
        rows = torch.zeros((x.shape[0],), dtype=torch.int32, device=x.device)
        prev_sample = ops.sampler_step(x, model_output, self._hist, coef, rows)
        return prev_sample.to(sample.dtype)

    @staticmethod
    def _out(prev: Tensor, return_dict: bool):
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        """PRK for the first ``len(prk_timesteps)`` calls (unless ``skip_prk_steps``), then PLMS."""
        self._require_timesteps()  # before prk_timesteps is read (None until set_timesteps)
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict=return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict=return_dict)

    def step_prk(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        """One Runge-Kutta stage: weights 1/6, 1/3, 1/3, 1/6 over a group of four calls."""
        self._require_timesteps()
        n, steps = self.config.num_train_timesteps, self.num_inference_steps
        diff = 0 if self.counter % 2 else n // steps // 2
        prev = int(timestep) - diff
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        from_cur = stage != 0 and self._has_cur
        if stage == 0:  # ets.append(m), cur_sample = sample
            write = self._ets_slot(self._ets_len)
            out = self._update(model_output, sample, t, prev, from_cur=True, weights={}, w_current=1.0,
                               write=write, save_cur=True)
            self._ets_len += 1
        elif stage in (1, 2):
            out = self._update(model_output, sample, t, prev, from_cur=from_cur, weights={}, w_current=1.0,
                               write=_PRK1 if stage == 1 else _PRK2, save_cur=False)
        else:  # m0 / 6 + m1 / 3 + m2 / 3 + m3 / 6
            weights = {self._ets_slot(self._ets_len - 1): 1 / 6, _PRK1: 1 / 3, _PRK2: 1 / 3}
            out = self._update(model_output, sample, t, prev, from_cur=from_cur, weights=weights,
                               w_current=1 / 6, write=-1, save_cur=False)
        self.counter += 1
        return self._out(out, return_dict)

    def step_plms(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        """One linear multistep step on the last (up to) four raw outputs."""
        self._require_timesteps()
        if not self.config.skip_prk_steps and self._ets_len < 3:
            raise ValueError(f"{type(self)} can only be run AFTER scheduler has been run in 'prk' mode for at "
                             "least 12 iterations See: https://github.com/huggingface/diffusers/blob/main/src/"
                             "diffusers/pipelines/pipeline_pndm.py for more information.")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        t, prev = int(timestep), int(timestep) - ratio
        write, appended = -1, 0
        if self.counter != 1:
            write, appended = self._ets_slot(self._ets_len), 1
        else:
            prev, t = t, t + ratio
        length = self._ets_len + appended  # len(ets) after diffusers' append (the branch only needs >= 4)
        save_cur, from_cur = False, False
        if length == 1 and self.counter == 0:
            terms = [(1, 1.0)]
            save_cur = True
        elif length == 1 and self.counter == 1:
            terms = [(0, 0.5), (1, 0.5)]  # (m + ets[-1]) / 2 from the stored sample
            from_cur = True
        elif length == 2:
            terms = [(1, 1.5), (2, -0.5)]
        elif length == 3:
            terms = [(1, 23 / 12), (2, -16 / 12), (3, 5 / 12)]
        else:
            terms = [(1, 55 / 24), (2, -59 / 24), (3, 37 / 24), (4, -9 / 24)]
        # ets[-back]: after an append, ets[-1] is this call's output and ets[-back] the stored (back - 1)-th
        w_cur, weights = 0.0, {}
        for back, w in terms:
            if back == 0 or (appended and back == 1):
                w_cur += w
            else:
                slot = self._ets_slot(self._ets_len - (back - appended))
                weights[slot] = weights.get(slot, 0.0) + w
        out = self._update(model_output, sample, t, prev, from_cur=from_cur and self._has_cur, weights=weights,
                           w_current=w_cur, write=write, save_cur=save_cur)
        if from_cur:
            self._has_cur = False
        self._ets_len += appended
        self.counter += 1
        return self._out(out, return_dict)
