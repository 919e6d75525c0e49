"""k-diffusion's ``sample_*`` functions, on fastdiff's coefficient tables and its one fused update.

Each function has the signature of ``k_diffusion.sampling.sample_NAME`` (crowsonkb/k-diffusion 0.1.1) and
returns the same result: ``model(x, sigma * s_in, **extra_args)`` is k-diffusion's denoiser (it returns
x0, the "denoised" image, for a state ``x = x0 + sigma * eps``) and ``sigmas`` the decreasing noise levels,
usually ending in 0. Underneath, a table from :mod:`fastdiff.samplers` is built once on the host (from
``sigmas``, read once), and each model call is followed by one ``fastdiff.ops.sampler_step`` (the fused
Triton kernel on CUDA, its reference elsewhere; float64 states always take the float64 reference).

What is the same as k-diffusion:

- the model is called at the same states and sigmas, in the same order, with ``extra_args``;
- ``callback`` receives k-diffusion's dict ``{x, i, sigma, sigma_hat, denoised}`` once per step, after the
  step's first model call, with x the state that call saw;
- stochastic samplers call ``noise_sampler(sigma, sigma_next)`` (tensors, ``sigmas[i]`` and
  ``sigmas[i + 1]``) exactly when k-diffusion does, once per step, and scale the noise as it does;
  the default noise sampler is ``torch.randn_like(x)`` (k-diffusion's ``default_noise_sampler``);
- ``s_churn`` (Karras et al. 2022, Algorithm 2) in ``sample_euler``, ``sample_heun`` and ``sample_dpm_2``:
  the step from ``sigma_hat = sigma (1 + gamma)`` is a table row; the churn noise
  ``torch.randn_like(x) * s_noise`` is drawn only where ``gamma > 0`` (as current k-diffusion does; some
  older releases drew, and discarded, one ``randn_like`` per step also with ``s_churn = 0``, which moves the
  global RNG without changing the result).

What differs:

- ``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde`` with ``noise_sampler=None``:
  k-diffusion draws from a
  ``BrownianTreeNoiseSampler`` (needs ``torchsde``); here the default is ``torch.randn_like(x)`` per step.
  Both give independent standard normal increments per step, so the samples have the same distribution,
  but not the same numbers. Pass k-diffusion's ``BrownianTreeNoiseSampler`` (or any
  ``noise_sampler(sigma, sigma_next)``) to get its numbers exactly.
- ``disable=None`` shows no progress bar (fastdiff's default); pass ``disable=False`` for one.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff import samplers as S

__all__ = [
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_fast",
    "sample_lms",
    "sample_dpmpp_2m",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
]


def _host_sigmas(sigmas) -> np.ndarray:
    if isinstance(sigmas, Tensor):
        return sigmas.detach().cpu().double().numpy().reshape(-1)
    return np.asarray(sigmas, dtype=np.float64).reshape(-1)


def _check_x(x) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor (N, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")


def _churned_table(builder: Callable, sig: np.ndarray, s_churn: float, s_tmin: float, s_tmax: float):
    """One table for euler/heun/dpm_2 with churn: step i runs from ``sigma_hat_i`` to ``sigma_{i+1}``.

    These samplers keep no history across steps, so the table is the concatenation of the one-step tables
    ``builder([sigma_hat_i, sigma_{i+1}])``. Returns ``(table, sigma_hat (steps,), gamma (steps,))``.
    """
    steps = sig.shape[0] - 1
    gammas = np.array([min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
                       for i in range(steps)]) if s_churn > 0 else np.zeros(steps)
    sigma_hat = sig[:-1] * (gammas + 1)
    if not np.any(gammas > 0):
        return builder(sig), sigma_hat, gammas
    parts = [builder(np.array([sigma_hat[i], sig[i + 1]])) for i in range(steps)]
    return S.concat_tables(parts), sigma_hat, gammas


def _run(model, x: Tensor, sigmas, table: S.SamplerTable, *, extra_args=None, callback=None, disable=None,
         noise_sampler=None, noise_steps=(), noise_rows=None, sigma_hat=None, churn=None,
         churn_noise: float = 1.0, info=None) -> Tensor:
    """Walk ``table`` with a k-diffusion denoiser: per row one model call, one fused update.

    ``noise_steps``: the steps whose last row takes ``noise_sampler(sigmas[i], sigmas[i + 1])``;
    ``noise_rows``: instead, the rows that take ``noise_sampler(sigmas[i], table.sigma_next[row])``.
    ``info(i) -> dict``: extra entries of the callback's dict for step i.
    ``churn`` (steps,): ``sqrt(sigma_hat^2 - sigma^2)`` added with ``randn_like(x) * churn_noise`` before the
    step's first model call where > 0 (outside the linear form: it comes before the model sees x).
    """
    extra_args = {} if extra_args is None else extra_args
    sig_t = sigmas if isinstance(sigmas, Tensor) else torch.as_tensor(np.asarray(sigmas), device=x.device)
    n = x.shape[0]
    s_in = x.new_ones([n])
    coef = torch.tensor(S.pack_table(table, 0.0, 1.0), dtype=torch.float64, device=x.device)
    hdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    hist = torch.zeros((table.num_slots, *x.shape), dtype=hdt, device=x.device)
    row_sigma = torch.as_tensor(table.sigma, dtype=torch.float64, device=x.device).to(x.dtype)
    row_ids = torch.arange(table.num_rows, dtype=torch.int32, device=x.device)
    steps = table.num_steps
    first_row = np.searchsorted(table.step, np.arange(steps + 1))
    noise_steps = set(noise_steps)
    noise_rows = set(noise_rows or ())
    if noise_sampler is None and (noise_steps or noise_rows):
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)
    rng = range(steps)
    if disable is not None and not disable:
        from tqdm.auto import trange

        rng = trange(steps)
    for i in rng:
        if churn is not None and churn[i] > 0:
            x = x + torch.randn_like(x) * churn_noise * float(churn[i])
        for r in range(first_row[i], first_row[i + 1]):
            denoised = model(x, row_sigma[r] * s_in, **extra_args)
            if r == first_row[i] and callback is not None:
                hat = sig_t[i] if sigma_hat is None else torch.as_tensor(sigma_hat[i], dtype=sig_t.dtype)
                callback({"x": x, "i": i, "sigma": sig_t[i], "sigma_hat": hat, "denoised": denoised,
                          **(info(i) if info is not None else {})})
            noise = None
            if r in noise_rows:
                nxt = torch.as_tensor(table.sigma_next[r], dtype=sig_t.dtype, device=sig_t.device)
                noise = noise_sampler(sig_t[i], nxt).to(x.dtype)
            elif r == first_row[i + 1] - 1 and i in noise_steps:
                noise = noise_sampler(sig_t[i], sig_t[i + 1]).to(x.dtype)
            x = ops.sampler_step(x, denoised.to(x.dtype), hist, coef, row_ids[r].expand(n), noise=noise)
    return x


def _churn_sampler(builder, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                   s_noise):
    _check_x(x)
    sig = _host_sigmas(sigmas)
    table, sigma_hat, gammas = _churned_table(builder, sig, float(s_churn), float(s_tmin), float(s_tmax))
    churn = np.sqrt(np.maximum(sigma_hat ** 2 - sig[:-1] ** 2, 0.0)) * (gammas > 0)
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable,
                sigma_hat=sigma_hat, churn=churn if np.any(gammas > 0) else None, churn_noise=s_noise)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Euler steps, Karras et al. (2022), Algorithm 2 (with churn); table :func:`fastdiff.samplers.euler`."""
    return _churn_sampler(S.euler, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                          s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Heun's method, Karras et al. (2022), Algorithm 2 (with churn); table :func:`fastdiff.samplers.heun`."""
    return _churn_sampler(S.heun, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                          s_noise)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r = 1/2) in sigma; table :func:`fastdiff.samplers.dpm_2`."""
    return _churn_sampler(S.dpm_2, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                          s_noise)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep in sigma of the given order; table :func:`fastdiff.samplers.lms`."""
    _check_x(x)
    table = S.lms(_host_sigmas(sigmas), order=order)
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), Lu et al. (2022b), Algorithm 2; table :func:`fastdiff.samplers.dpmpp_2m`."""
    _check_x(x)
    table = S.dpmpp_2m(_host_sigmas(sigmas))
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable)


def _noisy_steps(sig: np.ndarray, eta: float = 1.0) -> list:
    """Steps where k-diffusion's ancestral and SDE samplers draw noise: into sigma > 0 (if eta)."""
    return [i for i in range(sig.shape[0] - 1) if sig[i + 1] > 0 and eta]


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                           s_noise=1.0, noise_sampler=None):
    """Ancestral Euler (k-diffusion); table :func:`fastdiff.samplers.euler_ancestral`."""
    _check_x(x)
    sig = _host_sigmas(sigmas)
    table = S.euler_ancestral(sig, eta=eta, s_noise=s_noise)
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable,
                noise_sampler=noise_sampler, noise_steps=_noisy_steps(sig))


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) ancestral, Lu et al. (2022b), Algorithm 1; table
    :func:`fastdiff.samplers.dpmpp_2s_ancestral`."""
    _check_x(x)
    sig = _host_sigmas(sigmas)
    table = S.dpmpp_2s_ancestral(sig, eta=eta, s_noise=s_noise)
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable,
                noise_sampler=noise_sampler, noise_steps=_noisy_steps(sig))


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE; table :func:`fastdiff.samplers.dpmpp_2m_sde`.

    ``noise_sampler=None`` draws ``randn_like(x)`` per step instead of k-diffusion's Brownian tree (see the
    module docstring).
    """
    _check_x(x)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    sig = _host_sigmas(sigmas)
    table = S.dpmpp_2m_sde(sig, eta=eta, s_noise=s_noise, solver_type=solver_type)
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable,
                noise_sampler=noise_sampler, noise_steps=_noisy_steps(sig, eta))


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE; table :func:`fastdiff.samplers.dpmpp_3m_sde`.

    ``noise_sampler=None`` draws ``randn_like(x)`` per step instead of k-diffusion's Brownian tree (see the
    module docstring).
    """
    _check_x(x)
    sig = _host_sigmas(sigmas)
    table = S.dpmpp_3m_sde(sig, eta=eta, s_noise=s_noise)
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable,
                noise_sampler=noise_sampler, noise_steps=_noisy_steps(sig, eta))



@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Ancestral DPM-Solver-2 (k-diffusion); table :func:`fastdiff.samplers.dpm_2_ancestral`."""
    _check_x(x)
    sig = _host_sigmas(sigmas)
    table = S.dpm_2_ancestral(sig, eta=eta, s_noise=s_noise)
    steps = [i for i in range(sig.shape[0] - 1) if ancestral_down(sig, i, eta) > 0]
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable,
                noise_sampler=noise_sampler, noise_steps=steps)


def ancestral_down(sig: np.ndarray, i: int, eta: float) -> float:
    return S.ancestral_step(float(sig[i]), float(sig[i + 1]), eta)[0]


def _fast_orders(nfe: int) -> list:
    """k-diffusion's ``dpm_solver_fast`` orders for ``nfe`` model calls: third order, ending in 2 and 1."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver-Fast (Lu et al. 2022, fixed steps uniform in ``t = -log sigma``, orders 3, ..., 3, 2, 1 for
    ``n`` model calls); table :func:`fastdiff.samplers.dpm_solver`. The callback receives k-diffusion's dict
    (with ``t`` and ``t_up``) once per step."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    _check_x(x)
    if isinstance(n, bool) or int(n) < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    orders = _fast_orders(int(n))
    t_start, t_end = -math.log(float(sigma_max)), -math.log(float(sigma_min))
    ts = torch.linspace(t_start, t_end, len(orders) + 1, dtype=torch.float32)
    sig = (-ts).exp()
    table = S.dpm_solver(sig.double().numpy(), orders=orders, eta=eta, s_noise=s_noise)
    sig_x = sig.to(device=x.device)

    def info(i):
        return {"t": ts[i], "t_up": ts[i]}

    return _run(model, x, sig_x, table, extra_args=extra_args, callback=callback, disable=disable,
                noise_sampler=noise_sampler, noise_steps=range(len(orders)), info=info)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic, two stages per step); table :func:`fastdiff.samplers.dpmpp_sde`.

    ``noise_sampler=None`` draws ``randn_like(x)`` twice per step instead of k-diffusion's Brownian tree (see
    the module docstring).
    """
    _check_x(x)
    sig = _host_sigmas(sigmas)
    table = S.dpmpp_sde(sig, eta=eta, s_noise=s_noise, r=r)
    rows = [k for k in range(table.num_rows) if sig[table.step[k] + 1] > 0]
    return _run(model, x, sigmas, table, extra_args=extra_args, callback=callback, disable=disable,
                noise_sampler=noise_sampler, noise_rows=rows)
