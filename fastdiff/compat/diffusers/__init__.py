"""Drop-in replacements for diffusers' schedulers, on fastdiff's coefficient tables and one fused update.

Classes (diffusers' names, constructor config, ``set_timesteps`` / ``scale_model_input`` / ``step`` /
``add_noise``; ``X.from_config(diffusers_scheduler.config)`` works, with diffusers' remapping of other
schedulers' options, and ``compatibles`` names these classes):

- VP model frame: ``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``, ``LCMScheduler``, ``TCDScheduler``,
  ``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``, ``UniPCMultistepScheduler``,
  ``DEISMultistepScheduler`` (the last four also on flow sigmas, ``use_flow_sigmas``);
- sigma view: ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``HeunDiscreteScheduler``,
  ``LMSDiscreteScheduler``, ``KDPM2DiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler``,
  ``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``;
- flow frame: ``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``.

How a step works: ``set_timesteps`` lays out diffusers' timesteps and sigmas (the same float32 arithmetic).
A step's row comes from a table built once per run (stateful schedulers, from those sigmas), or from
diffusers' own float32 formulas for that call (DDPM, DDIM, LCM, TCD, PNDM, KDPM2, singlestep DPM-Solver:
"alpha form", so any timestep can be stepped and abar = 0 is a finite row). The row is checked on the host,
then one ``fastdiff.ops.sampler_step`` call (the fused Triton kernel on CUDA, its reference elsewhere) makes
the update. History (multistep outputs, a stage's stored sample) lives in one ring per scheduler instance,
reset by ``set_timesteps``: as in diffusers, one instance drives one sampling run at a time. Second outputs
(``pred_original_sample``, LCM's ``denoised``, TCD's ``pred_noised_sample``) are one more elementwise pass.

Noise: stochastic steps draw it from ``generator`` with diffusers' call (same shape, dtype, device and
order, through ``randn_tensor``), so equally seeded runs agree.

Per-sample timesteps (diffusers#1784): ``step`` also accepts a tensor with one timestep per sample (each
must be one of ``scheduler.timesteps``, or any timestep for DDPM/DDIM); every sample then takes its own row in
the same fused call. For the multistep schedulers each sample's ring entries are its own, so a sample must
have gone through the steps before its timestep. Schedulers with two calls per step (Heun, KDPM2) and the
call-state ones (LCM, TCD, PNDM, singlestep) take one timestep per call.

Left out, each because it is not a table row (README, "Drop-in APIs"): DDPM ``variance_type="learned"`` (the
noise std is the square root of a model output), UniPC ``solver_p`` (another scheduler as the predictor),
FlowMatchEuler ``per_token_timesteps`` (a step size per token inside a sample), and ``s_churn > 0`` in the
diffusers Euler / EDM Euler / FlowMatchHeun drop-ins (k-diffusion's ``sample_euler`` / ``sample_heun``
drop-ins have churn).

These classes build on diffusers' ``SchedulerMixin`` / ``ConfigMixin`` when diffusers is installed; without
it a small local config object gives the same ``config`` / ``from_config`` behaviour.

``accelerate(pipe)`` (:mod:`fastdiff.compat.diffusers.accelerate`) speeds up a diffusers pipeline or model in
place: fused U-Net / VAE blocks (:mod:`patches_unet`, :mod:`patches_vae`), these schedulers, CUDA graphs per
input shape (:mod:`cuda_graph`), the dtype / layout policy; ``report.undo()`` restores it exactly.
"""

from fastdiff.compat.diffusers.accelerate import AccelerateError, AccelerateReport, accelerate
from fastdiff.compat.diffusers.scheduling_base import HAVE_DIFFUSERS, SchedulerOutput
from fastdiff.compat.diffusers.scheduling_ddpm_ddim import DDIMScheduler, DDPMScheduler
from fastdiff.compat.diffusers.scheduling_edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from fastdiff.compat.diffusers.scheduling_flow import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from fastdiff.compat.diffusers.scheduling_kdpm2 import (
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
)
from fastdiff.compat.diffusers.scheduling_lcm_tcd import LCMScheduler, TCDScheduler
from fastdiff.compat.diffusers.scheduling_multistep import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from fastdiff.compat.diffusers.scheduling_pndm import PNDMScheduler
from fastdiff.compat.diffusers.scheduling_sigma import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
)
from fastdiff.compat.diffusers.scheduling_singlestep import DPMSolverSinglestepScheduler

__all__ = [
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "SchedulerOutput",
    "HAVE_DIFFUSERS",
    "accelerate",
    "AccelerateReport",
    "AccelerateError",
]
