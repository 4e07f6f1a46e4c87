"""Gaussian-mixture data whose denoiser E[x0 | x_t] is exact, so all error is the sampler's.

With isotropic components N(mu_k, s_k^2 I), x_t | k ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and
E[x0 | x_t, k] = mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k): the posterior mean is a softmax-
weighted sum over components. A single component is the Gaussian case with an exact likelihood.
"""
from __future__ import annotations

import math

import torch

from .schedule import Schedule, append_dims


class GaussianMixture:
    """Isotropic Gaussian mixture in D dimensions with exact marginals at every noise level."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()  # (K,)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.dim = self.means.shape[1]

    # --- data ---------------------------------------------------------------------------------------
    def sample(self, n: int, generator=None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * noise

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        centered = self.means - mu
        second = (self.weights[:, None, None] * centered[:, :, None] * centered[:, None, :]).sum(0)
        return second + (self.weights * self.stds ** 2).sum() * torch.eye(self.dim, dtype=torch.float64)

    # --- exact quantities at noise level (alpha, sigma) -----------------------------------------------
    def _log_joint(self, x, a, s):
        """log pi_k + log N(x; a mu_k, v_k I) for every component: (B, K), and v: (B, K)."""
        v = a ** 2 * self.stds.to(x) ** 2 + s ** 2  # (B, K) with a, s of shape (B, 1)
        mu = self.means.to(x)
        d2 = (x ** 2).sum(1, keepdim=True) - 2 * a * (x @ mu.T) + a ** 2 * (mu ** 2).sum(1)[None]
        logp = torch.log(self.weights.to(x)) - 0.5 * self.dim * torch.log(2 * math.pi * v) - d2 / (2 * v)
        return logp, v

    def log_prob(self, x: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """log p_t(x) of the noised data alpha x0 + sigma eps; (B, D) -> (B,)."""
        a = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return torch.logsumexp(self._log_joint(x, a, s)[0], dim=1)

    def posterior_mean(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x] = sum_k w_k (mu_k + g_k (x - a mu_k)), g_k = a s_k^2 / v_k, in matmul form
        (w @ mu + (w g) x - a (w g) @ mu: no (B, K, D) tensor) for per-sample alpha, sigma (B,)."""
        a, s = torch.as_tensor(alpha).reshape(-1, 1).to(x), torch.as_tensor(sigma).reshape(-1, 1).to(x)
        a, s = a.expand(x.shape[0], 1), s.expand(x.shape[0], 1)
        logp, v = self._log_joint(x, a, s)
        w = torch.softmax(logp, dim=1)  # (B, K)
        wg = w * (a * self.stds.to(x) ** 2 / v)
        mu = self.means.to(x)
        return w @ mu + wg.sum(1, keepdim=True) * x - a * (wg @ mu)

    def denoiser(self, schedule: Schedule):
        """Exact model_fn(x_t, t) -> (x0, eps) for x of shape (B, D) or (B, C, H, W) with C*H*W = D."""
        def model_fn(x, t, **_):
            flat = x.reshape(x.shape[0], -1)
            a, s = schedule.alpha(t).to(flat), schedule.sigma(t).to(flat)
            x0 = self.posterior_mean(flat, a, s)
            eps = (flat - a[:, None] * x0) / s[:, None]
            return x0.reshape(x.shape), eps.reshape(x.shape)
        model_fn.schedule, model_fn.prediction = schedule, "x0"
        return model_fn

    def score(self, x: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """grad log p_t(x) = -(x - alpha E[x0|x]) / sigma^2."""
        a, s = schedule.alpha(t).to(x), schedule.sigma(t).to(x)
        x0 = self.posterior_mean(x, a, s)
        return -(x - append_dims(a, x) * x0) / append_dims(s, x) ** 2

    # --- distribution distance -------------------------------------------------------------------------
    def projected_quantiles(self, directions: torch.Tensor, probs: torch.Tensor, grid: int = 4096,
                            newton: int = 3) -> torch.Tensor:
        """Exact quantiles of u . x0 (a 1-D mixture) for unit directions (P, D) at probs (m,): invert
        the CDF tabulated on a fine grid, then polish with Newton steps. Returns (P, m)."""
        mu, sd, w = directions @ self.means.T, self.stds, self.weights  # (P, K), (K,), (K,)
        comp = torch.distributions.Normal(mu[:, None, :], sd)

        def cdf_pdf(x):  # (P, L) -> mixture cdf and pdf, (P, L)
            return (w * comp.cdf(x[..., None])).sum(-1), (w * comp.log_prob(x[..., None]).exp()).sum(-1)

        lo, hi = (mu - 8 * sd).min(1).values, (mu + 8 * sd).max(1).values
        xs = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, grid, dtype=torch.float64)
        cdf, _ = cdf_pdf(xs)
        p = probs.expand(len(mu), -1).contiguous()
        idx = torch.searchsorted(cdf, p).clamp(1, grid - 1)
        c0, c1, x0, x1 = cdf.gather(1, idx - 1), cdf.gather(1, idx), xs.gather(1, idx - 1), xs.gather(1, idx)
        q = x0 + (p - c0) / (c1 - c0).clamp_min(1e-300) * (x1 - x0)
        for _ in range(newton):
            f, dens = cdf_pdf(q)
            q = q - (f - p) / dens.clamp_min(1e-300)
        return q

    def sliced_w2(self, samples: torch.Tensor, n_proj: int = 64, seed: int = 0) -> float:
        """Sliced Wasserstein-2 between samples and the exact mixture (exact projected quantiles)."""
        return SlicedW2(self, n_proj=n_proj, levels=samples.shape[0], seed=seed)(samples)


class SlicedW2:
    """Sliced W2 to a mixture with its exact projected quantiles computed once, at `levels` midpoint
    probabilities, for reuse on many sample sets."""

    def __init__(self, mixture: GaussianMixture, n_proj: int = 64, levels: int = 1000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_proj, mixture.dim, generator=g, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=1, keepdim=True)
        self.probs = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
        self.q = mixture.projected_quantiles(self.dirs, self.probs)  # (P, m)

    def __call__(self, samples: torch.Tensor) -> float:
        x = samples.reshape(samples.shape[0], -1).double()
        proj = torch.sort(self.dirs @ x.T, dim=1).values  # (P, n)
        idx = (self.probs * x.shape[0]).long()  # empirical quantile at each level
        return math.sqrt(float(((proj[:, idx] - self.q) ** 2).mean()))


def ring_2d(k: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """k components evenly spaced on a circle: a 2-D benchmark with well-separated modes."""
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return GaussianMixture(radius * torch.stack([ang.cos(), ang.sin()], 1), std)


def random_mixture(dim: int = 32, k: int = 16, seed: int = 0, spread: float = 1.0,
                   std_range=(0.1, 0.4)) -> GaussianMixture:
    """k random components in dim dimensions with random isotropic stds and weights."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    stds = std_range[0] + (std_range[1] - std_range[0]) * torch.rand(k, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)
