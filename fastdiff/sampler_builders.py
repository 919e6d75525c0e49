"""Every fixed-step sampler as a function that builds its :class:`~fastdiff.sampler_table.SamplerTable`.

Each builder is ``builder(sigmas, *, timesteps=None, **options) -> SamplerTable``: ``sigmas`` is a
decreasing float array of length steps + 1 whose last entry may be 0 (and first may be inf where noted);
``timesteps`` optionally gives the model timestep at ``sigmas[k]``, else the Denoiser's schedule maps sigma to
timestep. The rows are in the sigma view (the row form: :mod:`fastdiff.samplers`), in float64.

=========================  ===================================================================
``ddpm``                   Ho et al. 2020, Eq. 6-7 (ancestral posterior); variance as guided-diffusion (inf)
``ddim``                   Song et al. 2021 (DDIM), Eq. 12 with eta (inf)
``euler``                  Karras et al. 2022, Algorithm 2 without churn; flow matching's Euler (inf)
``euler_ancestral``        k-diffusion ``sample_euler_ancestral`` (inf)
``lcm``                    x0 re-noised to the next level (Song et al. 2023, consistency models, Alg. 1;
                           diffusers' FlowMatchEuler ``stochastic_sampling``; k-diffusion ``sample_lcm``) (inf)
``heun``                   Karras et al. 2022, Algorithm 2; ``time="flow"``: Heun in flow time (inf)
``dpm_2``                  k-diffusion ``sample_dpm_2`` (DPM-Solver-2, Lu et al. 2022, Alg. 1, r = 1/2)
``dpm_2_ancestral``        k-diffusion ``sample_dpm_2_ancestral``
``dpm_solver``             singlestep DPM-Solver of orders 1-3 (Lu et al. 2022, Alg. 1-2; k-diffusion
                           ``DPMSolver.dpm_solver_fast``)
``lms``                    linear multistep in sigma (k-diffusion ``sample_lms``), order 4
``dpmpp_2m``               Lu et al. 2022b (DPM-Solver++), Algorithm 2 (inf)
``dpmpp_2s_ancestral``     Lu et al. 2022b, Algorithm 1 (r = 1/2) with ancestral noise
``dpmpp_sde``              DPM-Solver++ (stochastic, two stages; k-diffusion ``sample_dpmpp_sde``)
``dpmpp_2m_sde``           DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``) (inf)
``dpmpp_3m_sde``           DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``)
``unipc``                  Zhao et al. 2023 (UniPC), Algorithm 2/3, B(h) = expm1(h) ("bh2") (inf)
``dpm_multistep``          diffusers' multistep DPM-Solver(++), orders 1-3, ODE and SDE forms (inf for ++)
``deis``                   Zhang & Chen 2023 (DEIS), log-rho multistep, orders 1-3
=========================  ===================================================================


(inf): the first sigma may be inf (a flow run from pure noise, or a zero-terminal-SNR VP schedule).

The registry of names (``SAMPLERS``) and :func:`~fastdiff.samplers.build_table` live in
:mod:`fastdiff.samplers`, with the packing and the loop.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from fastdiff.sampler_table import SamplerTable, _ratio, _Rows
from fastdiff.schedules import sigma_to_alpha

__all__ = ["ancestral_step", "ddpm", "ddim", "euler", "euler_ancestral", "lcm", "heun", "dpm_2", "dpm_2_ancestral",
           "dpm_solver", "lms", "dpmpp_2m", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde",
           "unipc", "dpm_multistep", "deis", "DPM_ALGORITHMS", "DDPM_VARIANCES", "HEUN_TIMES"]


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``).

    ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))`` is the DDPM
    posterior std in the sigma view (for eta = 1), ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``.
    """
    if not eta:
        return sigma_next, 0.0
    if math.isinf(sigma):
        var = sigma_next ** 2
    else:
        var = max(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2, 0.0)
    up = min(sigma_next, eta * math.sqrt(var))
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


def euler(sigmas, *, timesteps=None) -> SamplerTable:
    """Euler steps, Karras et al. (2022), Algorithm 2 with S_churn = 0 (lines 5-8).

    ``x' = x + (sigma' - sigma) d`` with ``d = (x - x0) / sigma``,
    i.e. ``(sigma'/sigma) x + (1 - sigma'/sigma) x0``. In a flow frame this is flow matching's Euler step
    ``x_s' = x_s + (s' - s) v`` (the same step), and it may start at sigma = inf (s = 1).
    """
    rb = _Rows("euler", "x0", 1, sigmas, timesteps)
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        rb.add(i, s, sn, a=_ratio(sn, s), b_new=1 - sn / s, timestep=rb.t(i))
    return rb.build()


def euler_ancestral(sigmas, *, eta: float = 1.0, s_noise: float = 1.0, timesteps=None) -> SamplerTable:
    """Euler to sigma_down, then noise of std sigma_up (k-diffusion ``sample_euler_ancestral``).

    In the sigma view this is DDPM's ancestral step (Ho et al. 2020, Eq. 6) for eta = 1.
    No noise into sigma 0.
    """
    rb = _Rows("euler_ancestral", "x0", 1, sigmas, timesteps, eta=eta, s_noise=s_noise)
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        sd, su = ancestral_step(s, sn, eta)
        rb.add(i, s, sn, a=_ratio(sd, s), b_new=1 - sd / s, c=su * s_noise if sn > 0 else 0.0,
               timestep=rb.t(i))
    return rb.build()


def lcm(sigmas, *, s_noise: float = 1.0, timesteps=None) -> SamplerTable:
    """Each step denoises and noises the estimate back to the next level: ``x' = x0 + sigma' noise``.

    Song et al. (2023), "Consistency Models", Algorithm 1 (multistep sampling), as latent consistency models
    sample (k-diffusion ``sample_lcm``); in a flow frame it is diffusers' FlowMatchEuler with
    ``stochastic_sampling`` (``x_s' = (1 - s') x0 + s' noise``). No noise into sigma 0.
    """
    rb = _Rows("lcm", "x0", 1, sigmas, timesteps, s_noise=s_noise)
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        rb.add(i, s, sn, a=0.0, b_new=1.0, c=sn * s_noise, write=False, timestep=rb.t(i))
    return rb.build()


HEUN_TIMES = ("sigma", "flow")


def heun(sigmas, *, time: str = "sigma", timesteps=None) -> SamplerTable:
    """Heun's second-order method, Karras et al. (2022), Algorithm 2 (lines 9-11), S_churn = 0.

    ``time="sigma"``: the derivative is ``d = (x - x0) / sigma`` in the sigma view (k-diffusion, diffusers'
    HeunDiscrete). ``time="flow"``: the derivative is the flow velocity ``v = (x_s - x0) / s`` in flow time
    ``s = sigma / (1 + sigma)`` (diffusers' FlowMatchHeun); this one may start at s = 1.
    Row 1 keeps ``H = x + dt/2 d1`` (what the step's end needs of its start) and gives ``x2 = x + dt d1 =
    2H - x``; row 2 (at sigma') gives ``x' = H + dt/2 d2``. Built on the kept H, the second stage uses the
    first stage's own state even if the caller passes another one (as diffusers does). The last step into
    sigma = 0 is an Euler step (x0).
    """
    if time not in HEUN_TIMES:
        raise ValueError(f"time must be one of {HEUN_TIMES}, got {time!r}")
    rb = _Rows("heun", "mixed", 1, sigmas, timesteps, time=time)
    if time == "sigma":
        rb.finite_start()
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        if sn == 0:
            rb.add(i, s, sn, a=0.0, b_new=1.0, write=False, hist="x0", timestep=rb.t(i))
            continue
        if time == "flow":  # state in flow time: x_tau = x / u, tau = sigma / u, u = 1 + sigma
            u_n, tau_n = 1 + sn, sn / (1 + sn)
            tau = 1.0 if math.isinf(s) else s / (1 + s)
            x_in = 1.0 if math.isinf(s) else 1 / (1 + s)  # x_tau per x (per x / sigma at inf)
        else:
            u_n, tau, tau_n, x_in = 1.0, s, sn, 1.0
        dt = tau_n - tau
        k = dt / (2 * tau)
        rb.add(i, s, sn, a=-u_n * x_in, b_new=2.0, hist=(u_n * (1 + k) * x_in, -u_n * k, 0.0), timestep=rb.t(i))
        k2 = dt / (2 * tau_n)
        rb.add(i, sn, sn, a=k2, b_new=-u_n * k2, lags={1: 1.0}, write=False, hist="x0", timestep=rb.t(i + 1))
    return rb.build()


def dpm_2(sigmas, *, timesteps=None) -> SamplerTable:
    """DPM-Solver-2 in the sigma view (Lu et al. 2022, Alg. 1, r1 = 1/2; k-diffusion ``sample_dpm_2``).

    The midpoint is the geometric mean ``sigma_mid = exp(lerp(log sigma, log sigma', 1/2))``. Row 1:
    ``x2 = x + (sigma_mid - sigma) d1``; row 2: ``x' = x + (sigma' - sigma) d2 = x2 - dt1 d1 + dt2 d2``.
    The last step into sigma = 0 is an Euler step. History form d.
    """
    rb = _Rows("dpm_2", "d", 1, sigmas, timesteps)
    rb.finite_start()
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        if sn == 0:
            rb.add(i, s, sn, a=1.0, b_new=sn - s, write=False, timestep=rb.t(i))
            continue
        _dpm_2_rows(rb, i, s, sn, sn)
    return rb.build()


def _dpm_2_rows(rb, i: int, s: float, target: float, sigma_next: float, c: float = 0.0) -> None:
    """DPM-Solver-2 from s to target (geometric midpoint), landing at sigma_next after noise c."""
    ls = math.log(s)
    s_mid = math.exp(ls + 0.5 * (math.log(target) - ls))
    dt1, dt2 = s_mid - s, target - s
    rb.add(i, s, s_mid, a=1.0, b_new=dt1, timestep=rb.t(i))
    rb.add(i, s_mid, sigma_next, a=1.0, b_new=dt2, lags={1: -dt1}, write=False, c=c)


def dpm_2_ancestral(sigmas, *, eta: float = 1.0, s_noise: float = 1.0, timesteps=None) -> SamplerTable:
    """k-diffusion's ``sample_dpm_2_ancestral``: DPM-Solver-2 to sigma_down, then noise of std sigma_up.

    Into sigma_down = 0 (the last step) an Euler step without noise.
    """
    rb = _Rows("dpm_2_ancestral", "d", 1, sigmas, timesteps, eta=eta, s_noise=s_noise)
    rb.finite_start()
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        sd, su = ancestral_step(s, sn, eta)
        if sd == 0:
            rb.add(i, s, sn, a=1.0, b_new=-s, write=False, timestep=rb.t(i))
            continue
        _dpm_2_rows(rb, i, s, sd, sn, c=su * s_noise)
    return rb.build()


def dpm_solver(sigmas, *, orders: Optional[Sequence[int]] = None, eta: float = 0.0, s_noise: float = 1.0,
               target_sigmas=None, timesteps=None) -> SamplerTable:
    """Singlestep DPM-Solver (Lu et al. 2022, Algorithm 1 (r1 = 1/2) and 2 (r1 = 1/3, r2 = 2/3)) on eps.

    Step i goes from ``sigmas[i]`` to ``sigmas[i + 1]`` with ``orders[i]`` (1-3; default 3, and 1 into
    sigma = 0, an Euler step) model calls at ``t + r h`` in ``t = -log sigma``; with ``eta`` each step lands
    on sigma_down (no lower than the last sigma) and adds noise up to sigma' (k-diffusion
    ``DPMSolver.dpm_solver_fast``). Rows: the first keeps eps, the second its own eps, so that the step's
    end is a combination of its input, the step's calls and its start.
    """
    rb = _Rows("dpm_solver", "d", 2, sigmas, timesteps, eta=eta, s_noise=s_noise)
    rb.finite_start()
    orders = _check_orders(orders, rb.steps, 3) or [3 if sn > 0 else 1 for sn in rb.sig[1:]]
    last = rb.sig[-1]
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        c, tgt = 0.0, sn
        if eta:
            sd, _ = ancestral_step(s, sn, eta)
            tgt = max(last, sd)
            c = math.sqrt(max(sn * sn - tgt * tgt, 0.0)) * s_noise
        order = orders[i]
        if tgt == 0 and order > 1:
            raise ValueError("dpm_solver: a step of order 2 or 3 cannot end at sigma = 0; use order 1 there")
        if order == 1:
            rb.add(i, s, sn, a=1.0, b_new=-(s - tgt), write=False, c=c, timestep=rb.t(i))
            continue
        h = math.log(s) - math.log(tgt)
        if order == 2:
            r1 = 0.5
            s1 = s ** (1 - r1) * tgt ** r1
            rb.add(i, s, s1, a=1.0, b_new=-(s - s1), timestep=rb.t(i))
            k = (s - tgt) / (2 * r1)
            rb.add(i, s1, sn, a=1.0, b_new=-k, lags={1: (tgt - s1) + k}, write=False, c=c)
            continue
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = s ** (1 - r1) * tgt ** r1, s ** (1 - r2) * tgt ** r2
        c2 = s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
        c3 = tgt / r2 * (math.expm1(h) / h - 1)
        rb.add(i, s, s1, a=1.0, b_new=-(s - s1), timestep=rb.t(i))                  # keeps eps0
        rb.add(i, s1, s2, a=1.0, b_new=-c2, lags={1: (s2 - s1) + c2})            # keeps eps_r1
        rb.add(i, s2, sn, a=1.0, b_new=-c3, lags={1: c2, 2: (tgt - s2) - c2 + c3}, write=False, c=c)
    return rb.build()


DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


def dpm_multistep(sigmas, *, orders: Optional[Sequence[int]] = None, algorithm_type: str = "dpmsolver++",
                  solver_type: str = "midpoint", timesteps=None) -> SamplerTable:
    """Multistep DPM-Solver of orders 1-3 as diffusers' DPMSolverMultistepScheduler computes it, in the sigma
    view (lambda = -log sigma, h = lambda' - lambda): Lu et al. (2022b), Algorithms 2-3 (``dpmsolver++``:
    the history is x0, ``x' = (sigma'/sigma) x + ...``), Lu et al. (2022), Sec. 3.3 (``dpmsolver``: the history
    is eps = d, ``x' = x - (sigma - sigma') eps + ...``), and their SDE forms (Lu et al. 2022b, Sec. 5; Gonzalez
    et al. 2023) with noise ``sigma' sqrt(1 - e^{-2h})`` (``sde-dpmsolver++``) or ``sqrt(sigma^2 - sigma'^2)``
    (``sde-dpmsolver``). ``orders`` gives each step's order (the warm-up and final-step rules are the
    caller's; default: second order after the first step, first order into sigma = 0); ``solver_type``
    ("midpoint" | "heun") picks the second-order correction.
    """
    if algorithm_type not in DPM_ALGORITHMS:
        raise ValueError(f"algorithm_type must be one of {DPM_ALGORITHMS}, got {algorithm_type!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    data = algorithm_type.endswith("++")
    sde = algorithm_type.startswith("sde")
    rb = _Rows("dpm_multistep", "x0" if data else "d", 2, sigmas, timesteps, algorithm_type=algorithm_type,
               solver_type=solver_type)
    if orders is None:
        orders = [1 if i == 0 or rb.sig[i + 1] == 0 else 2 for i in range(rb.steps)]
    orders = _check_orders(orders, rb.steps, 2 if sde and not data else 3)
    if not data:
        rb.finite_start()
    sig = rb.sig
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = -np.log(sig)
    for i in range(rb.steps):
        s, sn, k = sig[i], sig[i + 1], orders[i]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            row = _dpm_multistep_row(lam, i, s, sn, k, data, sde, solver_type)
        rb.add(i, s, sn, **row, timestep=rb.t(i))
    return rb.build()


def _dpm_multistep_row(lam, i, s, sn, k, data, sde, solver_type) -> dict:
    """One row of :func:`dpm_multistep` (numpy scalars: a repeated sigma gives inf, not an error)."""
    h = lam[i + 1] - lam[i]
    if data:
        em = np.expm1(-h)                       # e^{-h} - 1
        e2 = -np.expm1(-2.0 * h)                # 1 - e^{-2h}
        a = _ratio(sn, s) * (np.exp(-h) if sde else 1.0)
        c0 = e2 if sde else -em
        c1_mid = 0.5 * c0
        c1_heun = e2 / (-2.0 * h) + 1.0 if sde else em / h + 1.0
        c2 = ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if sde else -((em + h) / h ** 2 - 0.5)
        noise = sn * np.sqrt(e2) if sde else 0.0
    else:  # sigma' (e^h - 1) = sigma - sigma': finite into sigma' = 0
        d = s - sn
        a = 1.0
        c0 = -2.0 * d if sde else -d
        c1_mid = -d if sde else -0.5 * d
        c1_heun = -2.0 * (d / h - sn) if sde else -(d / h - sn)
        c2 = -((d - sn * h) / h ** 2 - 0.5 * sn)
        noise = np.sqrt(max(s * s - sn * sn, 0.0)) if sde else 0.0
    vec = np.array([c0, 0.0, 0.0])  # on (m0, m1, m2): the entries of steps i, i-1, i-2
    if k >= 2:
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        if k == 2:
            vec = vec + (c1_mid if solver_type == "midpoint" else c1_heun) * d1_0
        else:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            vec = vec + c1_heun * d1 + c2 * d2
    return dict(a=float(a), b_new=float(vec[0]), lags={1: float(vec[1]), 2: float(vec[2])}, c=float(noise))


def deis(sigmas, *, orders: Optional[Sequence[int]] = None, timesteps=None) -> SamplerTable:
    """DEIS multistep (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"),
    the log-rho variant diffusers' DEISMultistepScheduler implements: in the sigma view (rho = sigma) with
    history eps = d, ``x' = x + sum_j C_j eps_{i-j}``, ``C_j`` the integral over [rho, rho'] of the Lagrange
    basis polynomial in log rho through the last ``orders[i]`` rhos (default: third order after the warm-up,
    first order into sigma = 0). First order is DDIM.
    """
    rb = _Rows("deis", "d", 2, sigmas, timesteps)
    if orders is None:
        orders = [1 if rb.sig[i + 1] == 0 else min(i + 1, 3) for i in range(rb.steps)]
    orders = _check_orders(orders, rb.steps, 3)
    rb.finite_start()
    sig = rb.sig
    for i in range(rb.steps):
        k = orders[i]
        t, b = sig[i + 1], sig[i]
        if k == 1:
            vec = [-(b - t), 0.0, 0.0]
        elif k == 2:
            c = sig[i - 1]
            ind = lambda x, p, q: x * (-np.log(q) + np.log(x) - 1) / (np.log(p) - np.log(q))
            vec = [ind(t, b, c) - ind(b, b, c), ind(t, c, b) - ind(b, c, b), 0.0]
        else:
            c, d = sig[i - 1], sig[i - 2]

            def ind(x, p, q, r):
                lx, lq, lr = np.log(x), np.log(q), np.log(r)
                return x * (lq * (lr - lx + 1) - lr * lx + lr + lx ** 2 - 2 * lx + 2) / \
                    ((np.log(p) - lq) * (np.log(p) - lr))

            vec = [ind(t, b, c, d) - ind(b, b, c, d), ind(t, c, d, b) - ind(b, c, d, b),
                   ind(t, d, b, c) - ind(b, d, b, c)]
        rb.add(i, b, t, a=1.0, b_new=float(vec[0]), lags={1: float(vec[1]), 2: float(vec[2])}, timestep=rb.t(i))
    return rb.build()


def _lms_coefficients(sig: np.ndarray, i: int, order: int) -> list:
    """``int_{sigma_i}^{sigma_{i+1}} L_j(tau) dtau``, Lagrange basis on sigma_i, ..., sigma_{i-order+1}.

    Exact polynomial integration (k-diffusion integrates the same cubic with ``scipy.integrate.quad``).
    """
    nodes = [sig[i - k] for k in range(order)]
    out = []
    for j in range(order):
        poly = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                poly = poly * np.polynomial.Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
        anti = poly.integ()
        out.append(float(anti(sig[i + 1]) - anti(sig[i])))
    return out


def lms(sigmas, *, order: int = 4, timesteps=None) -> SamplerTable:
    """Linear multistep (Adams-Bashforth in sigma) of the given order (k-diffusion ``sample_lms``).

    ``x' = x + sum_j c_j d_{i-j}``, ``c_j`` the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis
    polynomial through the last ``min(i + 1, order)`` sigmas. History form d.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    rb = _Rows("lms", "d", order - 1, sigmas, timesteps, order=order)
    rb.finite_start()
    for i in range(rb.steps):
        cur = min(i + 1, order)
        co = _lms_coefficients(rb.sig, i, cur)
        rb.add(i, rb.sig[i], rb.sig[i + 1], a=1.0, b_new=co[0], lags={j: co[j] for j in range(1, cur)},
               write=order > 1, timestep=rb.t(i))
    return rb.build()


def dpmpp_2m(sigmas, *, solver_type: str = "midpoint", orders: Optional[Sequence[int]] = None,
             timesteps=None) -> SamplerTable:
    """DPM-Solver++(2M), Lu et al. (2022b), Algorithm 2, in the sigma view (lambda = -log sigma).

    ``x' = (sigma'/sigma) x - expm1(-h) D``, ``h = lambda' - lambda``; ``D = x0`` at first order, else
    ``(1 + 1/(2r)) x0 - 1/(2r) x0_prev`` ("midpoint", k-diffusion) with ``r = h_prev / h``; diffusers'
    ``solver_type="heun"`` adds ``(expm1(-h)/h + 1) (x0 - x0_prev) / r`` to ``-expm1(-h) x0`` instead.
    ``orders`` (per step, 1 or 2) overrides the default: first order at the first step and into sigma = 0.
    From sigma = inf the first step is x0 plus sigma' times the unit noise, and the second step is first
    order (its r is infinite).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    rb = _Rows("dpmpp_2m", "x0", 1, sigmas, timesteps, solver_type=solver_type)
    orders = _check_orders(orders, rb.steps, 2)
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        order = 2 if i > 0 else 1
        if orders is not None:
            order = min(order, orders[i])
        if sn == 0:
            rb.add(i, s, sn, a=0.0, b_new=1.0, timestep=rb.t(i))
            continue
        h = np.log(s) - np.log(sn)
        phi = -math.expm1(-h)
        if order == 1:
            rb.add(i, s, sn, a=_ratio(sn, s), b_new=phi, timestep=rb.t(i))
            continue
        r = (np.log(rb.sig[i - 1]) - np.log(s)) / h
        k = 0.5 * phi / r if solver_type == "midpoint" else (math.expm1(-h) / h + 1.0) / r
        rb.add(i, s, sn, a=sn / s, b_new=phi + k, lags={1: -k}, timestep=rb.t(i))
    return rb.build()


def _check_orders(orders, steps: int, max_order: int):
    if orders is None:
        return None
    orders = [int(o) for o in orders]
    if len(orders) != steps or any(o < 1 or o > max_order for o in orders):
        raise ValueError(f"orders must list {steps} integers in [1, {max_order}], got {orders}")
    return orders


def dpmpp_2s_ancestral(sigmas, *, eta: float = 1.0, s_noise: float = 1.0, timesteps=None) -> SamplerTable:
    """DPM-Solver++(2S) with ancestral noise, Lu et al. (2022b), Algorithm 1 (r = 1/2); k-diffusion's sampler.

    Step to sigma_down by two stages in lambda = -log sigma: row 1 ``x2 = (s_mid/s) x - expm1(-h/2) x0``,
    row 2 ``x' = (sd/s) x - expm1(-h) x0_2 + su noise``, with x written through x2 and x0 of row 1.
    """
    rb = _Rows("dpmpp_2s_ancestral", "x0", 1, sigmas, timesteps, eta=eta, s_noise=s_noise)
    rb.finite_start()
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        sd, su = ancestral_step(s, sn, eta)
        c = su * s_noise if sn > 0 else 0.0
        if sd == 0:
            rb.add(i, s, sn, a=0.0, b_new=1.0, c=c, timestep=rb.t(i))
            continue
        h = math.log(s) - math.log(sd)
        s_mid = math.exp(-(-math.log(s) + 0.5 * h))
        e_half = math.expm1(-0.5 * h)
        rb.add(i, s, s_mid, a=s_mid / s, b_new=-e_half, timestep=rb.t(i))
        rb.add(i, s_mid, sn, a=sd / s_mid, b_new=-math.expm1(-h), lags={1: sd / s_mid * e_half}, c=c,
               write=False)
    return rb.build()


def dpmpp_sde(sigmas, *, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, timesteps=None) -> SamplerTable:
    """DPM-Solver++ (stochastic), k-diffusion ``sample_dpmpp_sde`` (Lu et al. 2022b with ancestral noise).

    Per step, in ``t = -log sigma``: stage 1 goes to the ancestral sigma_down of ``t + r h`` with x0 and adds
    noise (row 1, on the unclipped eps); stage 2 goes from the step's start to the sigma_down of sigma' with
    ``(1 - 1/(2r)) x0 + 1/(2r) x0_2`` and adds noise (row 2, built on what row 1 kept of the start). Into
    sigma = 0 an Euler step. Two noise draws per step: rows 1 and 2.
    """
    if not r > 0:
        raise ValueError(f"r must be > 0, got {r!r}")
    rb = _Rows("dpmpp_sde", "mixed", 1, sigmas, timesteps, eta=eta, s_noise=s_noise, r=r)
    rb.finite_start()
    fac = 1 / (2 * r)
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        if sn == 0:
            rb.add(i, s, sn, a=0.0, b_new=1.0, write=False, hist="x0", timestep=rb.t(i))
            continue
        s_mid = math.exp(math.log(s) + r * (math.log(sn) - math.log(s)))
        sd1, su1 = ancestral_step(s, s_mid, eta)
        sd2, su2 = ancestral_step(s, sn, eta)
        keep = (sd2 / s, (1 - sd2 / s) * (1 - fac), 0.0)  # the start's share of the step's end
        rb.add(i, s, s_mid, a=1.0, g_eps=-(s - sd1), c=su1 * s_noise, hist=keep, timestep=rb.t(i))
        rb.add(i, s_mid, sn, a=0.0, b_new=(1 - sd2 / s) * fac, lags={1: 1.0}, c=su2 * s_noise, write=False,
               hist="x0")
    return rb.build()


def dpmpp_2m_sde(sigmas, *, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
                 timesteps=None) -> SamplerTable:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5 SDE variant; k-diffusion ``sample_dpmpp_2m_sde``).

    ``x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) x0 + [2nd-order term]
    + sigma' sqrt(1 - e^{-2 eta h}) noise``; into sigma = 0 the step returns x0.
    diffusers' ``sde-dpmsolver++`` is the eta = 1 case.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    rb = _Rows("dpmpp_2m_sde", "x0", 1, sigmas, timesteps, eta=eta, s_noise=s_noise, solver_type=solver_type)
    h_last = None
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        if sn == 0:
            rb.add(i, s, sn, a=0.0, b_new=1.0, timestep=rb.t(i))
            continue
        h = np.log(s) - np.log(sn)
        eta_h = eta * h if eta else 0.0
        base = -math.expm1(-h - eta_h)
        lags, b_new = {}, base
        if i > 0 and h_last is not None:
            r = h_last / h
            k = 0.5 * base / r if solver_type == "midpoint" else (base / (-h - eta_h) + 1) / r
            b_new, lags = base + k, {1: -k}
        c = sn * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise if eta else 0.0
        rb.add(i, s, sn, a=_ratio(sn, s) * math.exp(-eta_h), b_new=b_new, lags=lags, c=c, timestep=rb.t(i))
        h_last = h
    return rb.build()


def dpmpp_3m_sde(sigmas, *, eta: float = 1.0, s_noise: float = 1.0, timesteps=None) -> SamplerTable:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): 3rd-order multistep in -log sigma.

    ``x' = e^{-(1+eta) h} x + (1 - e^{-(1+eta) h}) x0 + phi_2 D1 - phi_3 D2
    + sigma' sqrt(1 - e^{-2 eta h}) noise``
    with D1, D2 the divided differences of the last three x0 (second order at step 1, first at step 0).
    """
    rb = _Rows("dpmpp_3m_sde", "x0", 2, sigmas, timesteps, eta=eta, s_noise=s_noise)
    rb.finite_start()
    h1 = h2 = None
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        if sn == 0:
            rb.add(i, s, sn, a=0.0, b_new=1.0, timestep=rb.t(i))
            h1, h2 = h1, h1  # k-diffusion shifts a stale h here; only the last step reaches sigma 0
            continue
        h = math.log(s) - math.log(sn)
        h_eta = h * (eta + 1)
        vec = np.array([-math.expm1(-h_eta), 0.0, 0.0])  # coefficients on (x0, x0_1, x0_2)
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h2 is not None:
            r0, r1 = h1 / h, h2 / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            vec = vec + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif h1 is not None:
            vec = vec + phi_2 * np.array([1.0, -1.0, 0.0]) / (h1 / h)
        c = sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise if eta else 0.0
        rb.add(i, s, sn, a=math.exp(-h_eta), b_new=vec[0], lags={1: vec[1], 2: vec[2]}, c=c, timestep=rb.t(i))
        h1, h2 = h, h1
    return rb.build()


def ddim(sigmas, *, eta: float = 0.0, eps_from: str = "raw", target_sigmas=None,
         timesteps=None) -> SamplerTable:
    """DDIM, Song et al. (2021), Eq. 12, in the sigma view.

    ``x' = x0 + sqrt(sigma'^2 - su^2) eps + su noise``, ``su = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma``
    (Eq. 16's sigma_t(eta) divided by sqrt(abar')): DDIM(eta) is :func:`euler_ancestral` with eta in the
    sigma view. ``eps_from="raw"`` takes eps from the model output before x0 clipping (diffusers' default),
    ``"x0"`` recomputes it from the clipped x0 (guided-diffusion, diffusers ``use_clipped_model_output``).
    ``target_sigmas`` (steps,) is the sigma each step lands on when that differs from the next step's sigma
    (diffusers' DDIM steps to ``t - N // steps``); the model-frame state ``sqrt(abar) x`` is carried over.
    From sigma = inf (zero terminal SNR) eps is the unit-noise state itself.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eps_from not in ("raw", "x0"):
        raise ValueError(f"eps_from must be 'raw' or 'x0', got {eps_from!r}")
    rb = _Rows("ddim", "x0", 1, sigmas, timesteps, eta=eta, eps_from=eps_from)
    tgt = rb.sig[1:] if target_sigmas is None else np.asarray(target_sigmas, dtype=np.float64).reshape(-1)
    if tgt.shape[0] != rb.steps or np.any(tgt < 0) or np.any(tgt >= rb.sig[:-1]):
        raise ValueError(f"target_sigmas must hold {rb.steps} values with 0 <= target < sigma of the step")
    for i in range(rb.steps):
        s, sn, nxt = rb.sig[i], tgt[i], rb.sig[i + 1]
        sd, su = ancestral_step(s, sn, eta)
        k = float(sigma_to_alpha(sn) / sigma_to_alpha(nxt))  # carry sqrt(abar) x from sn over to nxt
        if eps_from == "raw":
            rb.add(i, s, nxt, a=0.0, b_new=k, g_eps=k * sd, c=k * su, timestep=rb.t(i))
        else:
            rb.add(i, s, nxt, a=k * _ratio(sd, s), b_new=k * (1 - sd / s), c=k * su, timestep=rb.t(i))
    return rb.build()


DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def ddpm(sigmas, *, variance: str = "fixed_small", final_noise: bool = False, timesteps=None) -> SamplerTable:
    """Ancestral DDPM, Ho et al. (2020), Eq. 6-7, on any subsequence of timesteps (guided-diffusion respacing)

    Per step, with ``abar = 1/(1+sigma^2)`` and the effective ``beta = 1 - abar/abar'``, the posterior
    ``x'_vp = sqrt(abar') beta/(1-abar) x0 + sqrt(1-beta) (1-abar')/(1-abar) x_vp + std z`` in the sigma view.
    Variance (guided-diffusion / diffusers ``variance_type``): ``fixed_small`` = posterior variance
    ``beta (1-abar')/(1-abar)``, ``fixed_large`` = beta, ``learned_range`` (Nichol & Dhariwal 2021, Eq. 15)
    = ``exp(v' log beta + (1-v') log posterior)`` with ``v' = (v + 1)/2`` from the model's second output half.
    No noise into sigma = 0 (guided-diffusion), unless ``final_noise``: diffusers' DDPMScheduler adds the
    step's variance whenever the timestep is > 0, which with trailing spacing or ``steps_offset`` includes
    the last step (``fixed_large`` then adds noise of variance ``1 - abar`` at the end). From sigma = inf
    (abar = 0, zero terminal SNR) beta is 1 and the step keeps none of x.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance must be one of {DDPM_VARIANCES}, got {variance!r}")
    rb = _Rows("ddpm", "x0", 1, sigmas, timesteps, variance=variance, final_noise=final_noise)
    for i in range(rb.steps):
        s, sn = rb.sig[i], rb.sig[i + 1]
        one_m_abar_n = sn * sn / (1 + sn * sn)
        to_frame = math.sqrt(1 + sn * sn)  # 1 / sqrt(abar'): model frame -> sigma view at sn
        if math.isinf(s):
            beta, one_m_abar, a = 1.0, 1.0, 0.0
        else:
            beta = (s * s - sn * sn) / (1 + s * s)  # 1 - abar/abar'
            one_m_abar = s * s / (1 + s * s)
            a = math.sqrt(1 - beta) * one_m_abar_n / one_m_abar * to_frame / math.sqrt(1 + s * s)
        b_new = beta / one_m_abar  # sqrt(abar') beta / (1 - abar), over sqrt(abar')
        post_var = max(beta * one_m_abar_n / one_m_abar, 1e-20)
        lv = (0.0, 0.0)
        if sn == 0 and not final_noise:
            c = 0.0
        elif variance == "fixed_small":
            c = math.sqrt(post_var) * to_frame
        elif variance == "fixed_large":
            c = math.sqrt(beta) * to_frame
        else:
            c, lv = to_frame, (math.log(post_var), math.log(beta))
        rb.add(i, s, sn, a=a, b_new=b_new, c=c, timestep=rb.t(i), lv=lv)
    return rb.build(learned_range=variance == "learned_range")


def _unipc_rhos(rks: np.ndarray, hh: float, order: int, solver_type: str, predictor: bool):
    """UniPC's B(h), h*phi_1 and rho coefficients (Zhao et al. 2023, Eq. 8-9 and Algorithm 2/3).

    An infinite ratio r_k (a history point at sigma = inf) contributes nothing: its rho is 0 and the
    others solve the leading equations of the reduced system (the limit r_k -> -inf).
    """
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    fact, rmat, bvec = 1, [], []
    for k in range(1, order + 1):
        rmat.append(rks ** (k - 1))
        bvec.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    rmat, bvec = np.stack(rmat), np.asarray(bvec)
    n = order if not predictor else order - 1  # unknowns: corrector all r_k, predictor all but the last
    if predictor and order == 2:
        return b_h, h_phi_1, np.array([0.5])
    if (predictor and order < 2) or (not predictor and order == 1):
        return b_h, h_phi_1, (np.array([0.5]) if not predictor else None)
    fin = np.isfinite(rks[:n])
    rhos = np.zeros(n)
    m = int(fin.sum())
    if m:
        rhos[fin] = np.linalg.solve(rmat[:m][:, :n][:, fin], bvec[:m])
    return b_h, h_phi_1, rhos


def unipc(sigmas, *, order: int = 2, solver_type: str = "bh2", lower_order_final: bool = True,
          disable_corrector: Sequence[int] = (), predict_x0: bool = True, timesteps=None) -> SamplerTable:
    """UniPC, Zhao et al. (2023), Algorithm 2 (UniP-p) + 3 (UniC-p), in the sigma view.

    Step i corrects the state the model was evaluated at (UniC) and predicts the next (UniP). Both start from
    the corrected state of step i-1 with the same factor, so the corrector adds ``C_i . h - P_{i-1} . h`` to
    the predicted state and no extra state is kept: the ring holds the last ``order`` entries. With
    ``predict_x0`` (diffusers' default) the entries are x0 and the state factor is sigma'/sigma (lambda =
    -log sigma); without, they are eps (d) and the factor is 1. Orders follow diffusers'
    UniPCMultistepScheduler (warm-up, ``lower_order_final``, ``disable_corrector``); the step into sigma = 0 is
    first order. With predict_x0 the run may start at sigma = inf.
    """
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    form = "x0" if predict_x0 else "d"
    rb = _Rows("unipc", form, order, sigmas, timesteps, order=order, solver_type=solver_type,
               lower_order_final=lower_order_final, disable_corrector=tuple(disable_corrector),
               predict_x0=predict_x0)
    if not predict_x0 or solver_type == "bh1":
        rb.finite_start()
    sig, n = rb.sig, rb.steps
    sign = -1.0 if predict_x0 else 1.0
    with np.errstate(divide="ignore"):
        lam = -np.log(sig)  # log(alpha / sigma_model) in any frame; -inf at sigma = inf, inf at 0
    scale = np.ones_like(sig) if predict_x0 else sig  # the entries' factor at each level (eps: sigma)
    p_orders, prev_p = [], None
    for i in range(n):
        k_p = min(order, n - i) if lower_order_final else order
        k_p = min(k_p, i + 1)
        if sig[i + 1] == 0:
            k_p = 1
        vec = np.zeros(order + 2)  # sigma-view coefficients on the entries h_{i-j}, index j
        if i > 0 and (i - 1) not in disable_corrector:  # corrector (UniC) at step i
            k_c = p_orders[i - 1]
            h = lam[i] - lam[i - 1]
            rks = np.array([(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, k_c)] + [1.0])
            b_h, h_phi_1, rhos = _unipc_rhos(rks, sign * h, k_c, solver_type, predictor=False)
            corr = np.zeros(order + 2)
            corr[1] -= scale[i] * h_phi_1
            for k in range(1, k_c):
                if np.isfinite(rks[k - 1]):
                    corr[k + 1] -= scale[i] * b_h * rhos[k - 1] / rks[k - 1]
                    corr[1] += scale[i] * b_h * rhos[k - 1] / rks[k - 1]
            corr[0] -= scale[i] * b_h * rhos[-1]
            corr[1] += scale[i] * b_h * rhos[-1]
            vec += corr
            vec[1:] -= prev_p[:-1]  # remove the previous predictor's terms (shifted one lag)
        ratio = sig[i + 1] / sig[i] if predict_x0 else 1.0
        vec *= ratio  # (zero at an inf start, where there is nothing to correct)
        pred = np.zeros(order + 2)
        if k_p == 1 and sig[i + 1] == 0:
            pred[0] = 1.0 if predict_x0 else -sig[i]  # x0; h is infinite
        else:
            h = lam[i + 1] - lam[i]
            rks = np.array([(lam[i - k] - lam[i]) / h for k in range(1, k_p)] + [1.0])
            b_h, h_phi_1, rhos = _unipc_rhos(rks, sign * h, k_p, solver_type, predictor=True)
            pred[0] -= scale[i + 1] * h_phi_1
            for k in range(1, k_p):
                if np.isfinite(rks[k - 1]):
                    pred[k] -= scale[i + 1] * b_h * rhos[k - 1] / rks[k - 1]
                    pred[0] += scale[i + 1] * b_h * rhos[k - 1] / rks[k - 1]
        vec += pred
        p_orders.append(k_p)
        prev_p = pred
        if np.any(vec[order + 1:] != 0):
            raise AssertionError("unipc: history deeper than the ring")
        a = _ratio(sig[i + 1], sig[i]) if predict_x0 else 1.0
        rb.add(i, sig[i], sig[i + 1], a=a, b_new=vec[0], lags={j: vec[j] for j in range(1, order + 1)},
               timestep=rb.t(i))
    return rb.build()

