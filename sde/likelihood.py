"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

log p_0(x) = log p_T(z) + int_eps^T div f~(x_t, t) dt, with f~ the PF-ODE drift and z = x_T, solved
jointly for (x_t, delta log p) by an adaptive RK solver (FFJORD's instantaneous change of variables,
Grathwohl et al. 2019). div is exact (one backward pass per dimension) or the Hutchinson-Skilling
estimate v^T (df~/dx) v with a probe v fixed along the trajectory (Rademacher or Gaussian).
Bits/dim follow score-SDE's likelihood.py: -log p / (D ln 2), plus, for 8-bit images uniformly
dequantized to [0, 1] and mapped to model space by y = scale * x + shift, 8 - log2(scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffusion.samplers import as_generators

from .ode import ODE_METHODS, solve
from .samplers import _check_choice, _check_positive
from .sdes import as_sde, check_time

Tensor = torch.Tensor
DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


@dataclass
class Likelihood:
    """Per-sample results of log_likelihood; logp in nats, bpd in bits/dim."""
    logp: Tensor
    bpd: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    z: Tensor
    nfe: int


def probes(x: Tensor, kind: str = "rademacher", n: int = 1, generator=None) -> Tensor:
    """n Hutchinson probes per sample, (n, B, ...): Rademacher +-1 or standard normal;
    a list of generators (one per sample) makes each sample's probes depend on its seed only."""
    _check_choice("probe", kind, PROBES)
    gens = as_generators(generator, x.shape[0])
    out = []
    for _ in range(n):
        if isinstance(gens, (list, tuple)):
            if len(gens) != x.shape[0]:
                raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}: pass one per sample")
            v = torch.stack([_probe(x.shape[1:], kind, g, x.dtype) for g in gens])
        else:
            v = _probe(x.shape, kind, gens, x.dtype)
        out.append(v.to(x.device))
    return torch.stack(out)


def _probe(shape, kind, gen, dtype):
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randint(0, 2, shape, generator=gen).to(dtype) * 2 - 1


def divergence_exact(fx: Tensor, x: Tensor) -> Tensor:
    """Exact div f = sum_d df_d/dx_d by autograd, one backward pass per dimension: small D only."""
    flat = fx.reshape(fx.shape[0], -1)
    div = torch.zeros(fx.shape[0], dtype=fx.dtype, device=fx.device)
    for d in range(flat.shape[1]):
        grad = torch.autograd.grad(flat[:, d].sum(), x, retain_graph=True)[0]
        div = div + grad.reshape(grad.shape[0], -1)[:, d]
    return div


def divergence_hutchinson(fx: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """Hutchinson-Skilling estimate mean_k v_k^T (df/dx) v_k (Hutchinson 1989; Skilling 1989), v: (K, B, ...)."""
    div = torch.zeros(fx.shape[0], dtype=fx.dtype, device=fx.device)
    for vk in v:
        grad = torch.autograd.grad((fx * vk).sum(), x, retain_graph=True)[0]
        div = div + (grad * vk).reshape(grad.shape[0], -1).sum(1)
    return div / len(v)


def bits_per_dim(logp: Tensor, dim: int, image_scale: float | None = None) -> Tensor:
    """-log p / (D ln 2); for 8-bit data dequantized to [0, 1] and scaled by image_scale into model space
    add 8 - log2(image_scale) (score-SDE's offset 7 - inverse_scaler(-1): 7 for [-1, 1], 8 for [0, 1])."""
    bpd = -logp / (dim * math.log(2))
    if image_scale is not None:
        bpd = bpd + 8 - math.log2(_check_positive("image_scale", image_scale))
    return bpd


def dequantize(images: Tensor, generator=None) -> Tensor:
    """Uniform dequantization (Theis et al. 2016; score-SDE's datasets.py): integer pixels k in
    {0..255} -> (k + u) / 256 in [0, 1), u ~ U[0, 1); the continuous density then lower-bounds the
    discrete likelihood and bits_per_dim(..., image_scale) reports it."""
    k = images.double() if images.dtype == torch.uint8 else images
    if torch.any(k < 0) or torch.any(k > 255) or torch.any(k != torch.round(k)):
        raise ValueError("dequantize expects integer pixel values in [0, 255] (uint8 images)")
    gens = as_generators(generator, k.shape[0])
    if isinstance(gens, (list, tuple)):
        u = torch.stack([torch.rand(k.shape[1:], generator=g, dtype=torch.float64) for g in gens])
    else:
        u = torch.rand(k.shape, generator=gens, dtype=torch.float64)
    out = (k.double() + u.to(k.device)) / 256
    return out.float() if images.dtype == torch.uint8 else out.to(images.dtype)


def log_likelihood(model_fn: Callable, x: Tensor, schedule_or_sde, *, prediction: str | None = None,
                   cond: dict | None = None, divergence: str = "hutchinson", probe: str = "rademacher",
                   n_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                   eps: float = 1e-5, generator=None, image_scale: float | None = None,
                   prior_logp: Callable | None = None) -> Likelihood:
    """log p_0(x) through the probability-flow ODE from eps to t_max (score-SDE's likelihood.py:
    eps = 1e-5, rtol = atol = 1e-5, prior N(0, prior_std^2)); x is data in model space.

    divergence: 'exact' (D backward passes per evaluation) or 'hutchinson' with `n_probes` probes
    of kind `probe` (one draw per sample, fixed along the ODE). method: dopri5
    (in-repo, = scipy's RK45 algorithm), torchdiffeq_<name> or scipy's RK45, ...; image_scale: see
    bits_per_dim; prior_logp(z) -> (B,) replaces the default prior N(0, prior_std^2 I) (the true p_T,
    where known, removes the prior-mismatch error alpha_T-sized for data with a nonzero mean).
    Returns a Likelihood with the NFE."""
    sde = as_sde(schedule_or_sde)
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("ode method", method, ODE_METHODS)
    rtol, atol = _check_positive("rtol", rtol), _check_positive("atol", atol)
    eps = check_time("eps", eps)
    if eps >= sde.t_max:
        raise ValueError(f"eps = {eps} must be smaller than t_max = {sde.t_max}")
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or not torch.isfinite(x).all():
        raise ValueError("x must be a finite floating-point tensor of data in model space (B, ...)")
    if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    rsde = sde.reverse(model_fn, prediction, cond, probability_flow=True)
    v = probes(x, probe, n_probes, generator) if divergence == "hutchinson" else None
    shape, b = x.shape, x.shape[0]

    def rhs(t: float, y: Tensor) -> Tensor:
        with torch.enable_grad():
            xt = y[:-b].reshape(shape).detach().requires_grad_(True)
            fx = rsde.drift(xt, t)
            div = divergence_exact(fx, xt) if v is None else divergence_hutchinson(fx, xt, v)
        return torch.cat([fx.detach().reshape(-1), div.detach()])

    y0 = torch.cat([x.reshape(-1), torch.zeros(b, dtype=x.dtype, device=x.device)])
    y = solve(rhs, y0, eps, sde.t_max, rtol, atol, method)
    z, delta = y[:-b].reshape(shape), y[-b:]
    prior = sde.prior_logp(z) if prior_logp is None else prior_logp(z)
    logp = prior + delta
    return Likelihood(logp=logp, bpd=bits_per_dim(logp, x[0].numel(), image_scale), prior_logp=prior,
                      delta_logp=delta, z=z, nfe=rsde.nfe)
