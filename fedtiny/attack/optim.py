"""Optimizers that solve many independent reconstruction problems as one vectorized problem.

Each target has its own objective ``f_i(x_i)``; ``f_and_grad(x) -> (f [B], grad [B, ...])``
evaluates all of them at once (one batched forward/backward). The L-BFGS keeps a
history per target and takes its own step per target (backtracking Armijo line
search), so targets do not disturb each other; they only share the arithmetic.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["batched_lbfgs", "batched_signed_adam"]

# f_and_grad(x, idx): objectives and gradients of the targets ``idx`` (None = all) at ``x`` (their rows)
FandG = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def batched_lbfgs(
    f_and_grad: FandG,
    x0: torch.Tensor,
    *,
    iterations: int = 300,
    history: int = 10,
    lr: float = 1.0,
    max_line_search: int = 12,
    tol: float = 1e-12,
    progress: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize every target's objective with L-BFGS; return ``(x, f)``."""
    x = x0.detach().clone()
    f, g = f_and_grad(x, None)
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    for it in range(iterations):
        if bool((f < tol).all()):
            break
        q = g.clone()
        stack = []
        for s, y in zip(reversed(S), reversed(Y)):
            ys = _dot(y, s)
            rho = torch.where(ys > 1e-20, 1.0 / ys.clamp_min(1e-20), torch.zeros_like(ys))
            a = rho * _dot(s, q)
            q = q - _bcast(a, q) * y
            stack.append((a, rho, s, y))
        if S:
            yy = _dot(Y[-1], Y[-1])
            gamma = torch.where(yy > 0, _dot(S[-1], Y[-1]) / yy.clamp_min(1e-30), torch.ones_like(yy))
            r = _bcast(gamma.clamp_min(0), q) * q
        else:
            r = q / _bcast(g.flatten(1).abs().sum(1).clamp_min(1.0), q)  # a cautious first step, as torch's LBFGS
        for a, rho, s, y in reversed(stack):
            b = rho * _dot(y, r)
            r = r + _bcast(a - b, r) * s
        d = -r
        gd = _dot(g, d)
        uphill = gd >= 0
        if bool(uphill.any()):
            d = torch.where(_bcast(uphill, d), -g, d)
            gd = _dot(g, d)
        t = torch.full_like(f, lr)
        x_try = x + _bcast(t, x) * d
        f_try, g_try = f_and_grad(x_try, None)
        ok = f_try <= f + 1e-4 * t * gd
        for _ in range(max_line_search - 1):
            if bool(ok.all()):
                break
            todo = torch.nonzero(~ok).flatten()  # only the targets whose step was too long are evaluated again
            t[todo] *= 0.5
            x_try[todo] = x[todo] + _bcast(t[todo], d[todo]) * d[todo]
            f_sub, g_sub = f_and_grad(x_try[todo], todo)
            f_try[todo], g_try[todo] = f_sub, g_sub
            ok[todo] = f_sub <= f[todo] + 1e-4 * t[todo] * gd[todo]
        okb = _bcast(ok, x)
        s_new = torch.where(okb, x_try - x, torch.zeros_like(x))
        y_new = torch.where(okb, g_try - g, torch.zeros_like(g))
        x = torch.where(okb, x_try, x)
        f = torch.where(ok, f_try, f)
        g = torch.where(okb, g_try, g)
        S.append(s_new)
        Y.append(y_new)
        if len(S) > history:
            S.pop(0)
            Y.pop(0)
        if progress is not None:
            progress(it, f)
    return x, f


def batched_signed_adam(
    f_and_grad: FandG,
    x0: torch.Tensor,
    *,
    iterations: int = 500,
    lr: float = 0.1,
    box: tuple[float, float] = (0.0, 1.0),
    progress: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverting Gradients' optimizer: Adam on the sign of the gradient, step decay, box constraint.

    Returns the iterate with each target's lowest objective.
    """
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(iterations * m) for m in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    best_x, best_f = x.detach().clone(), torch.full((x.shape[0],), float("inf"))
    for it in range(iterations):
        f, g = f_and_grad(x.detach(), None)
        better = f < best_f
        best_f = torch.where(better, f, best_f)
        best_x = torch.where(_bcast(better, x), x.detach(), best_x)
        opt.zero_grad()
        x.grad = g.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(*box)
        if progress is not None:
            progress(it, best_f)
    f, _ = f_and_grad(x.detach(), None)
    better = f < best_f
    return torch.where(_bcast(better, x), x.detach(), best_x), torch.where(better, f, best_f)
