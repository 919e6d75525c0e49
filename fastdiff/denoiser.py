"""The model as a denoiser: raw output (eps | v | x0 | flow, learned sigma) -> x0, with guidance.

``Denoiser(model, schedule, prediction="eps", learned_sigma=False)`` wraps any ``nn.Module`` called as
``model(x, timesteps, y=None)`` (ADM, U-ViT, DiT's ``forward(x, t, y)``; diffusers models returning
``.sample`` also work) together with a schedule from :mod:`fastdiff.schedules`. diffusers' transformers
(``SD3Transformer2DModel``, ``FluxTransformer2DModel``, anything whose ``forward`` takes ``hidden_states``
and ``timestep``) are called with their own argument names by :func:`call_model`: prompt embeddings go in
as model keyword arguments (``encoder_hidden_states``, ``pooled_projections``, Flux's ``guidance``), and a
model that takes ``img_ids`` (Flux) gets its latents packed into 2x2 patches, the ids it needs and its
timestep in [0, 1] (``t / 1000``); the state stays (N, C, H, W).

In the sigma view (``x = x0 + sigma eps``; VP model frame ``x_vp = x / sqrt(1 + sigma^2)``, flow model frame
``x_s = x / (1 + sigma)`` with ``s = sigma / (1 + sigma)``) every parameterisation is linear,
``x0 = p x + q m`` (Karras et al. 2022, Table 1; Salimans & Ho 2022 for v; Liu et al. 2022 for flow):

    eps:   p = 1,                 q = -sigma
    v:     p = 1 / (1 + sigma^2), q = -sigma / sqrt(1 + sigma^2)     (VP only)
    x0:    p = 0,                 q = 1
    flow:  p = 1 / (1 + sigma),   q = -sigma / (1 + sigma)           (flow only: v = eps - x0, x0 = x_s - s v)

so the fused sampler update takes ``(p, q)`` per row from :meth:`Denoiser.x0_coefficients` and reads the
raw model output. At ``sigma = inf`` (flow time 1, or zero terminal SNR) ``p`` is the coefficient on the
unit-noise state ``x / sigma`` (see :mod:`fastdiff.samplers`): eps prediction has no finite x0 there.
Guidance:

- classifier-free (Ho & Salimans 2022): one model call on the doubled batch ``[cond; uncond]`` with the
  null label ``y_null`` (DiT/U-ViT: ``num_classes``), ``m = u + w (c - u)`` on the eps / v / x0 part;
  the learned variance is taken from the cond half.
- classifier (Dhariwal & Nichol 2021, Algorithm 2 in score form, guided-diffusion ``condition_score``):
  ``cond_fn(x_t, t, y)`` returns ``grad_x log p(y | x_t) * scale`` in the model frame, and the output is
  shifted so that ``eps' = eps - sqrt(1 - abar) grad`` (see :func:`classifier_cond_fn`).
- x0 clipping to ``[-clip_x0, clip_x0]`` and dynamic thresholding (Saharia et al. 2022, Sec. 2.3:
  ``s = max(1, min(quantile(|x0|, ratio), sample_max_value))``, ``x0 = clip(x0, -s, s) / s``).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["PREDICTIONS", "Denoiser", "call_model", "classifier_cond_fn", "x0_coefficients", "model_kind"]

PREDICTIONS = ("eps", "v", "x0", "flow")
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
_KINDS: dict = {}


def model_kind(model) -> str:
    """How :func:`call_model` calls a model: ``"plain"`` (``model(x, t, y=None, **kw)``), ``"transformer"``
    (a diffusers transformer: ``forward(hidden_states, timestep, ...)``) or ``"packed"`` (one that also takes
    ``img_ids``: Flux, with 2x2-packed latents and timesteps in [0, 1])."""
    base = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    key = type(base)
    if key not in _KINDS:
        import inspect

        try:
            params = inspect.signature(base.forward if hasattr(base, "forward") else base).parameters
        except (TypeError, ValueError):
            params = {}
        kind = "plain"
        if "hidden_states" in params and "timestep" in params:
            kind = "packed" if "img_ids" in params else "transformer"
        _KINDS[key] = kind
    return _KINDS[key]


def _pack(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H/2 * W/2, 4C): Flux's 2x2 patches, channels fastest within a patch."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def _unpack(out: Tensor, c: int, h: int, w: int) -> Tensor:
    n = out.shape[0]
    return out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Flux's latent image ids (H/2 * W/2, 3): (0, row, column) per patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def call_model(model: Callable, x: Tensor, t: Tensor, y: Optional[Tensor] = None, **kwargs) -> Tensor:
    """Call ``model`` at state ``x`` (model frame) and timesteps ``t`` (N,); unwraps ``.sample`` and tuples.

    Plain models: ``model(x, t, y=y, **kwargs)`` (without y when None). diffusers transformers
    (:func:`model_kind`): ``model(hidden_states=x, timestep=t, **kwargs, return_dict=False)``; a Flux-style
    model gets ``x`` packed (H and W even), ``timestep=t / 1000``, and ``img_ids`` / ``txt_ids`` made from
    the shapes unless given, and its output unpacked to x's shape.
    """
    kind = model_kind(model)
    if kind == "plain":
        out = model(x, t, y=y, **kwargs) if y is not None else model(x, t, **kwargs)
    else:
        if y is not None:
            raise ValueError("a diffusers transformer takes no class labels y: pass its conditioning "
                             "(encoder_hidden_states, pooled_projections, ...) in model_kwargs")
        if kind == "transformer":
            out = model(hidden_states=x, timestep=t, return_dict=False, **kwargs)
        else:
            if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
                raise ValueError(f"a Flux-style model packs 2x2 patches: x must be (N, C, H, W) with even H and "
                                 f"W, got {tuple(x.shape)}")
            n, c, h, w = x.shape
            kw = dict(kwargs)
            if kw.get("img_ids") is None:
                kw["img_ids"] = _image_ids(h, w, x.device, x.dtype)
            if kw.get("txt_ids") is None:
                ctx = kw.get("encoder_hidden_states")
                if ctx is None:
                    raise ValueError("a Flux-style model needs encoder_hidden_states in model_kwargs")
                kw["txt_ids"] = torch.zeros(ctx.shape[1], 3, device=x.device, dtype=x.dtype)
            out = model(hidden_states=_pack(x), timestep=t.to(x.dtype) / 1000, return_dict=False, **kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out = _unpack(out.sample if hasattr(out, "sample") else out, c, h, w)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def x0_coefficients(prediction: str, sigma):
    """``(p, q)`` with ``x0 = p x + q m`` in the sigma view for a prediction type (numpy or tensor, as given).

    Where sigma is inf, p is the coefficient on ``x / sigma`` (eps prediction then gives p = inf).
    """
    xp = torch if isinstance(sigma, Tensor) else np
    s = sigma.to(torch.float64) if isinstance(sigma, Tensor) else np.asarray(sigma, dtype=np.float64)
    inf = xp.isinf(s)
    fin = xp.where(inf, xp.ones_like(s), s)  # the finite formulas, evaluated away from inf
    if prediction == "eps":
        return xp.where(inf, xp.full_like(s, np.inf), xp.ones_like(s)), -s
    if prediction == "x0":
        return xp.zeros_like(s), xp.ones_like(s)
    if prediction == "v":
        p = xp.where(inf, xp.zeros_like(s), 1.0 / (1.0 + fin * fin))
        return p, xp.where(inf, -xp.ones_like(s), -fin / xp.sqrt(1.0 + fin * fin))
    if prediction == "flow":
        p = xp.where(inf, xp.ones_like(s), 1.0 / (1.0 + fin))
        return p, xp.where(inf, -xp.ones_like(s), -fin / (1.0 + fin))
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def classifier_cond_fn(classifier: Callable, scale: float = 1.0) -> Callable:
    """guided-diffusion's ``cond_fn``: ``scale * grad_x log softmax(classifier(x, t))[y]`` (model frame)."""

    def cond_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), y.long()]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


class Denoiser:
    """A model, its schedule and its parameterisation; gives x0 and eps and the raw guided output.

    Args:
        model: ``model(x, timesteps, y=None, **kwargs)``; its output has x's shape, or twice the channels
            with ``learned_sigma`` (eps | v | x0 first, the variance interpolation value v in [-1, 1] second).
        schedule: ``VPSchedule`` / ``VPSDESchedule`` / ``VESDESchedule`` (sigma <-> timestep, input scale).
        prediction: ``"eps"`` | ``"v"`` | ``"x0"`` | ``"flow"`` (or diffusers' ``epsilon``, ``v_prediction``,
            ``sample``, ``flow_prediction``); ``v`` needs a VP schedule, ``flow`` a :class:`FlowSchedule`.
        learned_sigma: the model also outputs the learned-range variance (ADM, DiT).
        clip_x0: clip x0 to ``[-clip_x0, clip_x0]`` (guided-diffusion ``clip_denoised``: 1.0), or None.
        dynamic_threshold: the quantile ratio of dynamic thresholding (e.g. 0.995), or None.
        sample_max_value: the upper bound of the dynamic threshold s.
        cond_fn: classifier guidance ``cond_fn(x_t, t, y) -> grad`` (:func:`classifier_cond_fn`), or None.
        model_fn: ``model_fn(model, x, t, y, **kwargs)`` adapter replacing :func:`call_model`.
        patch_size: the model's patch size p, for the token count ``(H / p) (W / p)`` that sets a dynamically
            shifted flow schedule (:meth:`sigmas`); None reads it from a diffusers model's config (Flux's
            packed latents: 2).
    """

    # What fastdiff.load fills in (a Denoiser built by hand keeps these defaults): the number of real
    # classes (None: unconditional or unknown), the null label of classifier-free guidance, the guidance
    # scale the model is meant to be sampled with, the shape (C, H, W) of one sample (the latent shape for
    # latent models), whether samples are latents, the scale of those latents, and a VAE that decodes them.
    num_classes: Optional[int] = None
    y_null: Optional[int] = None
    default_guidance_scale: float = 1.0
    sample_shape: Optional[tuple] = None
    latent: bool = False
    latent_scale: Optional[float] = None
    vae = None

    def __init__(self, model: Callable, schedule, prediction: str = "eps", learned_sigma: bool = False, *,
                 clip_x0: Optional[float] = None, dynamic_threshold: Optional[float] = None,
                 sample_max_value: float = 1.0, cond_fn: Optional[Callable] = None,
                 model_fn: Optional[Callable] = None, patch_size: Optional[int] = None):
        prediction = _ALIASES.get(prediction, prediction)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        frame = getattr(schedule, "frame", "vp")
        if prediction == "v" and frame != "vp":
            raise ValueError("prediction='v' needs a variance-preserving schedule")
        if prediction == "flow" and frame != "flow":
            raise ValueError("prediction='flow' needs a flow schedule (fastdiff.schedules.FlowSchedule)")
        if patch_size is not None and (isinstance(patch_size, bool) or int(patch_size) < 1):
            raise ValueError(f"patch_size must be an int >= 1 or None, got {patch_size!r}")
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0!r}")
        if dynamic_threshold is not None and not 0 < dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold must lie in (0, 1] or be None, got {dynamic_threshold!r}")
        if not sample_max_value >= 1:
            raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value!r}")
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.learned_sigma = bool(learned_sigma)
        self.clip_x0, self.dynamic_threshold = clip_x0, dynamic_threshold
        self.sample_max_value = float(sample_max_value)
        self.cond_fn = cond_fn
        self.model_fn = model_fn or call_model
        if patch_size is None:
            cfg = getattr(getattr(model, "_orig_mod", model), "config", None)
            p = getattr(cfg, "patch_size", None) if cfg is not None else None
            if isinstance(p, int):
                patch_size = p * (2 if model_kind(model) == "packed" else 1)
        self.patch_size = None if patch_size is None else int(patch_size)

    def __repr__(self) -> str:
        return (f"Denoiser(model={type(self.model).__name__}, schedule={self.schedule!r}, "
                f"prediction={self.prediction!r}, learned_sigma={self.learned_sigma})")

    # -- parameterisation ---------------------------------------------------------------------

    def x0_coefficients(self, sigma: Union[np.ndarray, Tensor, float]):
        """``(p, q)`` with ``x0 = p x + q m`` in the sigma view (numpy or tensor, as given); see
        :func:`x0_coefficients` for sigma = inf."""
        return x0_coefficients(self.prediction, sigma)

    def sigmas(self, steps: int, spacing: Optional[str] = None, shape=None, **kwargs):
        """``schedule.sigmas(steps, spacing)`` for a batch of ``shape`` (N, C, H, W): a dynamically shifted
        flow schedule gets ``image_seq_len = (H / p) (W / p)`` tokens for this model's patch size p."""
        if getattr(self.schedule, "use_dynamic_shifting", False) and "mu" not in kwargs:
            if shape is None or len(shape) < 4:
                raise ValueError("a dynamically shifted flow schedule needs the sample shape (N, C, H, W)")
            p = self.patch_size or 1
            kwargs["image_seq_len"] = (int(shape[-2]) // p) * (int(shape[-1]) // p)
        return self.schedule.sigmas(steps, spacing=spacing, **kwargs)

    # -- model call ---------------------------------------------------------------------------

    def model_output(self, x_in: Tensor, t: Tensor, y: Optional[Tensor] = None, *, y_null=None,
                     guidance_scale: float = 1.0, model_kwargs: Optional[dict] = None,
                     uncond_kwargs: Optional[dict] = None, sigma=None):
        """One model call (on the doubled batch when guided): ``(cond, uncond or None, variance or None)``.

        ``x_in`` is the model input (model frame), ``t`` (N,) its timesteps. The returned tensors are views
        of the one output (N, C, ...) each. With classifier guidance (``cond_fn``) the guided, shifted output
        comes back as ``cond`` with ``uncond=None``; ``sigma`` (float or (N,)) is then required.
        """
        n, ch = x_in.shape[0], x_in.shape[1]
        kw = dict(model_kwargs or {})
        guided = float(guidance_scale) != 1.0
        if guided:
            if y is None and not uncond_kwargs:
                raise ValueError("guidance_scale != 1 needs y with y_null (class labels) or uncond_kwargs")
            y2 = None
            if y is not None:
                if y_null is None:
                    raise ValueError("guidance_scale != 1 with y needs y_null (the null label, e.g. "
                                     "num_classes)")
                y_u = y_null if isinstance(y_null, Tensor) else torch.full_like(y, int(y_null))
                y2 = torch.cat([y, y_u.to(y.device, y.dtype).expand_as(y)])
            unc = uncond_kwargs or {}
            kw2 = {k: torch.cat([v, unc.get(k, v)]) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n
                   else v for k, v in kw.items()}
            out = self.model_fn(self.model, torch.cat([x_in, x_in]), torch.cat([t, t]), y2, **kw2)
            cond_all, uncond_all = out[:n], out[n:]
        else:
            out = self.model_fn(self.model, x_in, t, y, **kw)
            cond_all, uncond_all = out, None
        want = 2 * ch if self.learned_sigma else ch
        if out.dim() != x_in.dim() or out.shape[1] != want or out.shape[2:] != x_in.shape[2:]:
            raise ValueError(f"model output has shape {tuple(out.shape)}; expected {want} channels and the "
                             f"spatial shape of x {tuple(x_in.shape[2:])} "
                             f"(learned_sigma={self.learned_sigma})")
        var = None
        if self.learned_sigma:
            cond, var = cond_all[:, :ch], cond_all[:, ch:]
            uncond = uncond_all[:, :ch] if uncond_all is not None else None
        else:
            cond, uncond = cond_all, uncond_all
        if self.cond_fn is not None:
            if sigma is None:
                raise ValueError("classifier guidance needs sigma")
            m = cond if uncond is None else uncond + float(guidance_scale) * (cond - uncond)
            return self._classifier_shift(m, x_in, t, y, sigma), None, var
        return cond, uncond, var

    def _classifier_shift(self, m: Tensor, x_in: Tensor, t: Tensor, y, sigma) -> Tensor:
        """Shift the output so that ``eps' = eps - sqrt(1 - abar) g`` (guided-diffusion ``condition_score``).

        In the sigma view with ``alpha = 1/sqrt(1+s^2)``, ``sigma_vp = s alpha``: eps-output ``- sigma_vp g``,
        x0-output ``+ sigma_vp^2 / alpha g``, v-output ``- (sigma_vp / alpha) g``
        (VE: alpha = 1, sigma_vp = s).
        """
        g = self.cond_fn(x_in, t, y).to(torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=m.device).reshape(-1).expand(m.shape[0])
        alpha = self.schedule.model_input_scale(s)
        sig_vp = _bcast(s * alpha, m)
        alpha = _bcast(alpha, m)
        if self.prediction == "eps":
            shifted = m.double() - sig_vp * g
        elif self.prediction == "x0":
            shifted = m.double() + sig_vp * sig_vp / alpha * g
        else:
            shifted = m.double() - sig_vp / alpha * g
        return shifted.to(m.dtype)

    # -- x0 and eps ---------------------------------------------------------------------------

    def _combine(self, cond: Tensor, uncond: Optional[Tensor], guidance_scale: float, cd) -> Tensor:
        m = cond.to(cd)
        if uncond is not None:
            u = uncond.to(cd)
            m = u + float(guidance_scale) * (m - u)
        return m

    def _clip(self, x0: Tensor) -> Tensor:
        if self.dynamic_threshold is not None:
            n = x0.shape[0]
            s = torch.quantile(x0.abs().reshape(n, -1), self.dynamic_threshold, dim=1)
            s = _bcast(s.clamp(min=1.0, max=self.sample_max_value), x0)
            return torch.minimum(torch.maximum(x0, -s), s) / s
        if self.clip_x0 is not None:
            return x0.clamp(-self.clip_x0, self.clip_x0)
        return x0

    def __call__(self, x: Tensor, sigma, y: Optional[Tensor] = None, *, y_null=None,
                 guidance_scale: float = 1.0, model_kwargs: Optional[dict] = None,
                 uncond_kwargs: Optional[dict] = None) -> Tensor:
        """x0 for a sigma-view state ``x`` at ``sigma`` (float or (N,)): k-diffusion's ``model(x, sigma)``."""
        n = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(n)
        c_in = _bcast(self.schedule.model_input_scale(s), x)
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = self.schedule.sigma_to_timestep(s).to(t_dtype)
        cond, uncond, _ = self.model_output((x * c_in).to(x.dtype), t, y, y_null=y_null,
                                            guidance_scale=guidance_scale, model_kwargs=model_kwargs,
                                            uncond_kwargs=uncond_kwargs, sigma=s)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        m = self._combine(cond, uncond, guidance_scale, cd)
        p, q = self.x0_coefficients(s)
        x0 = _bcast(p.to(cd), x) * x.to(cd) + _bcast(q.to(cd), x) * m
        return self._clip(x0).to(x.dtype)

    def predict(self, x_t: Tensor, timesteps: Tensor, y: Optional[Tensor] = None,
                **kwargs) -> tuple[Tensor, Tensor]:
        """``(x0, eps)`` for a model-frame ``x_t`` at ``timesteps`` (N,) (guided-diffusion's convention).

        eps is recomputed from the (clipped) x0, as guided-diffusion's DDIM does. The model receives
        ``timesteps`` unchanged.
        """
        n = x_t.shape[0]
        ts = torch.as_tensor(timesteps, device=x_t.device)
        ts = ts.reshape(-1).expand(n) if ts.dim() == 0 or ts.numel() == 1 else ts
        s = self.schedule.timestep_to_sigma(ts)
        alpha = _bcast(self.schedule.model_input_scale(s), x_t)
        cd = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        guidance_scale = kwargs.pop("guidance_scale", 1.0)
        cond, uncond, _ = self.model_output(x_t, ts, y, guidance_scale=guidance_scale, sigma=s, **kwargs)
        m = self._combine(cond, uncond, guidance_scale, cd)
        x = x_t.to(cd) / alpha.to(cd)  # sigma view
        p, q = self.x0_coefficients(s)
        x0 = self._clip(_bcast(p.to(cd), x) * x + _bcast(q.to(cd), x) * m)
        eps = (x - x0) / _bcast(s.to(cd), x)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    # -- what the fused loop needs ------------------------------------------------------------

    def clip_bounds(self, x: Tensor, cond: Tensor, uncond: Optional[Tensor], guidance_scale: float,
                    coef: Tensor, rows: Tensor) -> Optional[Tensor]:
        """Per-sample ``(bound, scale)`` (N, 2) for the update's x0 clip, or None when there is no clipping.

        Static clipping is ``(clip_x0, 1)``. Dynamic thresholding needs the quantile of |x0|: a reduction
        pass over ``x0 = p x + q m`` (p, q read from the device table at ``rows``) before the fused update.
        """
        n = x.shape[0]
        if self.dynamic_threshold is None and self.clip_x0 is None:
            return None
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.dynamic_threshold is None:  # fills, not a host-to-device copy (which would synchronise)
            bounds = torch.full((n, 2), 1.0, dtype=cd, device=x.device)
            bounds[:, 0] = float(self.clip_x0)
            return bounds
        from fastdiff.samplers import COL_P, COL_Q

        cf = coef[rows.long()].to(cd)
        m = self._combine(cond, uncond, guidance_scale, cd)
        x0 = _bcast(cf[:, COL_P], x) * x.to(cd) + _bcast(cf[:, COL_Q], x) * m
        s = torch.quantile(x0.abs().reshape(n, -1), self.dynamic_threshold, dim=1)
        s = s.clamp(min=1.0, max=self.sample_max_value)
        return torch.stack([s, 1.0 / s], dim=1)

    # -- latents to images --------------------------------------------------------------------

    def can_decode(self) -> bool:
        """Whether :meth:`decode` gives images: a pixel model, or a latent model with a VAE."""
        return not self.latent or self.vae is not None

    @torch.no_grad()
    def decode(self, samples: Tensor, batch_size: int = 8) -> Tensor:
        """Images in [-1, 1] (float32, on ``samples``' device) from what :func:`fastdiff.sample` returned.

        A pixel model's samples come back unchanged. Latents go through ``self.vae`` (a diffusers
        ``AutoencoderKL`` or anything with ``decode(z)`` returning a tensor or ``.sample``) as
        ``vae.decode(z / scaling_factor + shift_factor)``, ``batch_size`` latents at a time, on the VAE's
        device and dtype; the factors are the VAE config's (``scaling_factor``, ``shift_factor``), else
        ``latent_scale`` and 0.
        """
        if not self.latent:
            return samples
        if self.vae is None:
            raise ValueError("decode: this latent model has no VAE; load it with fastdiff.load(..., vae=...) "
                             "(a diffusers AutoencoderKL or its folder)")
        config = getattr(self.vae, "config", None)
        scale = getattr(config, "scaling_factor", None) or self.latent_scale
        if scale is None:
            raise ValueError("decode: neither the VAE's config nor the denoiser gives the latent scale "
                             "(set denoiser.latent_scale)")
        shift = getattr(config, "shift_factor", None) or 0.0
        param = next(iter(self.vae.parameters()), None)
        device = param.device if param is not None else samples.device
        dtype = param.dtype if param is not None else torch.float32
        out = []
        for z in samples.split(max(1, int(batch_size))) if samples.shape[0] else ():
            img = self.vae.decode(z.to(device=device, dtype=dtype) / float(scale) + float(shift))
            img = getattr(img, "sample", img)
            out.append(img.float().clamp(-1, 1).to(samples.device))
        if not out:  # an empty batch: the image shape from the VAE's config (SD's VAE: x8, 3 channels)
            factor = 2 ** (len(getattr(config, "block_out_channels", (0,) * 4)) - 1)
            channels = getattr(config, "out_channels", 3)
            return samples.new_empty((0, channels, *(s * factor for s in samples.shape[2:])), dtype=torch.float32)
        return torch.cat(out)
