"""Drop-in replacements for diffusers' schedulers, on fastdiff's coefficient tables and one fused update.

``DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, LMSDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler``
have diffusers' class names, constructor keywords (so ``X.from_config(diffusers_scheduler.config)`` works and
``scheduler.config.num_train_timesteps`` reads the config), ``set_timesteps``, ``scale_model_input``,
``step(model_output, timestep, sample, ..., generator=None, return_dict=True)`` (an object with
``prev_sample`` and, where diffusers has it, ``pred_original_sample``; a tuple with ``return_dict=False``),
``add_noise``, ``timesteps``, ``sigmas`` (sigma-view schedulers), ``init_noise_sigma``, ``order``,
``set_begin_index``, ``step_index`` and ``begin_index``. A diffusers pipeline runs with them:
``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.

How a step works: ``set_timesteps`` lays out diffusers' timesteps and sigmas (the same float32 arithmetic),
and the first ``step`` builds the sampler's table (:mod:`fastdiff.samplers`, float64 on the host) for the
whole run and moves it to the device once. Each ``step`` then picks the table row of its timestep and makes
one ``fastdiff.ops.sampler_step`` call (the fused Triton kernel on CUDA, its reference elsewhere). The
multistep history (DPM-Solver++, UniPC, LMS, Heun's first stage) lives in one explicit ring buffer per
scheduler instance, reset by ``set_timesteps``: as in diffusers, one scheduler instance drives one sampling
run at a time. ``pred_original_sample`` is recomputed from the row's x0 coefficients (one more elementwise
pass) because the fused update does not return it.

Noise: stochastic steps draw it from ``generator`` with diffusers' call (same shape, dtype, device and
order, through ``randn_tensor``), so equally seeded runs agree.

Per-sample timesteps (diffusers#1784): ``step`` also accepts a tensor with one timestep per sample (each
must be one of ``scheduler.timesteps``); every sample then takes its own row in the same fused call. For
the multistep schedulers each sample's ring entries are its own, so a sample must have gone through the
steps before its timestep. Such a step does not read ``step_index`` but advances it once started (so a
pipeline's loop stays in step), and ``scale_model_input`` takes the same tensor. Heun's timesteps repeat
(two stages per step), so it takes one timestep per call.

Not supported (NotImplementedError at construction or ``set_timesteps``): ``rescale_betas_zero_snr``,
``use_beta_sigmas``, flow-matching sigmas, ``use_lu_lambdas``, DPM-Solver (non-++) and SDE-DPM-Solver,
``solver_order=3`` for DPM-Solver++, UniPC with ``predict_x0=False`` or ``solver_p``, DDPM's
``fixed_large_log`` / ``learned`` variances, Euler with ``s_churn > 0``, and final-sigma layouts whose last
step does not lower sigma for the multistep solvers.

These classes build on diffusers' ``SchedulerMixin`` / ``ConfigMixin`` when diffusers is installed; without
it a small local config object gives the same ``config`` / ``from_config`` behaviour.
"""

from fastdiff.compat.diffusers.scheduling_base import HAVE_DIFFUSERS, SchedulerOutput
from fastdiff.compat.diffusers.scheduling_ddpm_ddim import DDIMScheduler, DDPMScheduler
from fastdiff.compat.diffusers.scheduling_multistep import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from fastdiff.compat.diffusers.scheduling_sigma import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
)

__all__ = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "SchedulerOutput",
    "HAVE_DIFFUSERS",
]
