"""Adaptive ODE solvers for the probability-flow ODE: an in-repo Dormand-Prince 5(4) in torch, or
torchdiffeq / scipy.integrate.solve_ivp by name. rhs(t: float, y: Tensor) -> Tensor.

dopri5 is Dormand & Prince (1980) with FSAL and Hairer's step control (Hairer, Norsett & Wanner,
"Solving ODEs I", Sec. II.4, and their DOPRI5 code): initial step from Sec. II.4, the error
||err / (atol + rtol max(|y0|, |y1|))||_rms, step factor 0.9 err^(-1/5) in [0.2, 10], no growth
right after a rejection, last step clipped at the end time. With beta = 0 (default) this is the
algorithm of scipy's RK45, so both spend the same NFE; beta > 0 adds Hairer's PI ("Lund")
stabilisation. torchdiffeq's dopri5 never shrinks the step after an accepted one and so spends
more evaluations on the PF-ODE (benchmarks/sde_samplers.py).
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor

SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
TORCHDIFFEQ_METHODS = ("torchdiffeq_dopri5", "torchdiffeq_dopri8", "torchdiffeq_bosh3", "torchdiffeq_adaptive_heun")
ODE_METHODS = ("dopri5",) + TORCHDIFFEQ_METHODS + SCIPY_METHODS

# Dormand-Prince 5(4) tableau: nodes C, stages A, 5th-order weights B (= the last stage row, FSAL),
# and E = B - B_hat (5th minus embedded 4th order weights) for the error estimate
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _rms(v: Tensor) -> float:
    return float(v.pow(2).mean().sqrt())


def initial_step(rhs: Callable, t0: float, y0: Tensor, f0: Tensor, t1: float, rtol: float, atol: float,
                 order: int = 4) -> float:
    """Starting step (Hairer et al., Sec. II.4), capped by the interval as scipy does; one evaluation."""
    length, direction = abs(t1 - t0), (1.0 if t1 > t0 else -1.0)
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, length)
    f1 = rhs(t0 + direction * h0, y0 + (direction * h0) * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, length)


def dopri5(rhs: Callable, y0: Tensor, t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
           max_steps: int = 100_000, beta: float = 0.0, safety: float = 0.9) -> Tensor:
    """y(t1) for dy/dt = rhs(t, y), y(t0) = y0, by Dormand-Prince 5(4) with Hairer's step control."""
    direction = 1.0 if t1 > t0 else -1.0
    f = rhs(t0, y0)
    h = initial_step(rhs, t0, y0, f, t1, rtol, atol)
    t, y = t0, y0
    fac_old, rejected = 1e-4, False
    for _ in range(max_steps):
        if direction * (t1 - t) <= 0:
            return y
        h = min(h, abs(t1 - t))
        dt = direction * h
        k = [f]
        for c, a in zip(_C[1:], _A[1:]):
            yi = y + dt * sum(aj * kj for aj, kj in zip(a, k) if aj != 0.0)
            k.append(rhs(t + c * dt, yi))
        y_new = y + dt * sum(bj * kj for bj, kj in zip(_B, k) if bj != 0.0)
        t_new = t1 if h == abs(t1 - t) else t + dt
        k.append(rhs(t_new, y_new))  # FSAL: the derivative at the new point starts the next step
        err_vec = dt * sum(ej * kj for ej, kj in zip(_E, k) if ej != 0.0)
        err = _rms(err_vec / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if err != err:
            raise FloatingPointError(f"ODE error estimate is NaN at t = {t:.4g}")
        fac11 = err ** (0.2 - 0.75 * beta)
        if err <= 1.0:
            fac = min(5.0, max(0.1, fac11 / fac_old ** beta / safety))  # h_new = h / fac, h_new/h in [0.2, 10]
            h_new = h / fac
            if rejected:
                h_new = min(h_new, h)
            fac_old, rejected = max(err, 1e-4), False
            t, y, f, h = t_new, y_new, k[-1], h_new
        else:
            h, rejected = h / min(5.0, fac11 / safety), True
        if h < 1e-14 * max(abs(t), 1.0):
            raise RuntimeError(f"dopri5 step size underflow at t = {t:.6g}")
    raise RuntimeError(f"dopri5 exceeded max_steps = {max_steps}")


def solve(rhs: Callable, y0: Tensor, t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
          method: str = "dopri5") -> Tensor:
    """y(t1) with the named adaptive solver: dopri5 (in-repo), torchdiffeq_<name> or scipy's <name>."""
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ode method {method!r}; valid: {list(ODE_METHODS)}")
    if method == "dopri5":
        return dopri5(rhs, y0, t0, t1, rtol, atol)
    if method in SCIPY_METHODS:
        from scipy.integrate import solve_ivp
        shape, dtype = y0.shape, y0.dtype

        def f(t, y):
            return rhs(float(t), torch.from_numpy(y).to(dtype).reshape(shape)).reshape(-1).double().numpy()
        sol = solve_ivp(f, (t0, t1), y0.reshape(-1).double().numpy(), rtol=rtol, atol=atol, method=method)
        if not sol.success:
            raise RuntimeError(f"scipy {method} failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1]).to(dtype).reshape(shape)
    from torchdiffeq import odeint
    name = method[len("torchdiffeq_"):]
    f0 = rhs(t0, y0)
    first = initial_step(rhs, t0, y0, f0, t1, rtol, atol, {"dopri5": 4, "dopri8": 7, "bosh3": 2}.get(name, 1))

    def func(t, y):  # torchdiffeq evaluates f(t0, y0) first: reuse it
        return f0 if (y is y0 and float(t) == t0) else rhs(float(t), y)
    ts = torch.tensor([t0, t1], dtype=torch.float64)
    # step_t clips the last step at t1 (torchdiffeq would step past it, where the schedule is undefined)
    return odeint(func, y0, ts, rtol=rtol, atol=atol, method=name, options={"step_t": ts[1:], "first_step": first})[-1]
