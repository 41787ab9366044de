"""Samplers: pure functions with one signature.

    sample_x(model, x, diffusion, context, generator=None, steps=None, eta=0.0, clip=None,
             progress=False) -> x_0

``model(x_t, t, context)`` predicts the noise or the velocity (``diffusion.prediction``);
``x`` ``(B, C, L)`` is the starting Gaussian noise; ``context`` is computed once (e.g. one
galaxy's image tokens repeated for its N samples); ``generator`` makes the draws reproducible:
one ``torch.Generator`` for the whole batch, or a sequence of them, one per equal group of
consecutive rows (a galaxy's samples), so that a group's draws do not depend on the others;
``clip`` bounds the x_0 estimates (1.0 for the 'scale' preprocessing, whose spectra lie in
[-1, 1]). Adding a sampler means adding a function
here and an entry in :data:`SAMPLERS`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from models.diffusion import GaussianDiffusion

Generators = torch.Generator | Sequence[torch.Generator] | None


def noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x``: from ``generator``, or with a sequence of
    generators, rows ``[i * B / k, (i + 1) * B / k)`` from the i-th of the k generators."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    rows, rest = divmod(x.shape[0], len(generator))
    if rest:
        raise ValueError(f"{x.shape[0]} rows cannot be split among {len(generator)} generators")
    return torch.cat([torch.randn((rows, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype)
                      for g in generator]).to(x.device)


def _x0(model, x, t, diffusion, context, clip):
    x0, eps = diffusion.split_output(x, t, model(x, t, context).float())
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = diffusion.predict_eps(x, t, x0)
    return x0, eps


def timestep_subset(num_timesteps: int, steps: int | None) -> list[int]:
    """``steps`` timesteps from T - 1 down to 0, evenly spaced (all T when None or >= T)."""
    if steps is None or steps >= num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return sorted({int(round(v)) for v in np.linspace(0, num_timesteps - 1, steps)}, reverse=True)


@torch.no_grad()
def ddpm(model, x: torch.Tensor, diffusion: GaussianDiffusion, context: Any = None,
         generator: Generators = None, steps: int | None = None, eta: float = 1.0,
         clip: float | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2); ``steps``/``eta`` unused."""
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress, desc="ddpm", leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0, _ = _x0(model, x, t, diffusion, context, clip)
        mean, _, log_var = diffusion.q_posterior(x0, x, t)
        x = mean + (torch.exp(0.5 * log_var) * noise_like(x, generator) if i > 0 else 0.0)
    return x


@torch.no_grad()
def ddim(model, x: torch.Tensor, diffusion: GaussianDiffusion, context: Any = None,
         generator: Generators = None, steps: int | None = 50, eta: float = 0.0,
         clip: float | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM over a subset of timesteps (Song et al. 2021, eq. 12); eta = 0 is deterministic."""
    times = timestep_subset(diffusion.num_timesteps, steps)
    abar = diffusion.alphas_cumprod.to(x.device)
    for k, i in enumerate(tqdm(times, disable=not progress, desc="ddim", leave=False)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0, eps = _x0(model, x, t, diffusion, context, clip)
        a_t = abar[i]
        a_prev = abar[times[k + 1]] if k + 1 < len(times) else torch.ones((), device=x.device)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
        x = torch.sqrt(a_prev) * x0 + torch.sqrt((1 - a_prev - sigma ** 2).clamp(min=0)) * eps
        if eta > 0 and k + 1 < len(times):
            x = x + sigma * noise_like(x, generator)
    return x


@torch.no_grad()
def dpmpp2m(model, x: torch.Tensor, diffusion: GaussianDiffusion, context: Any = None,
            generator: Generators = None, steps: int | None = 20, eta: float = 0.0,
            clip: float | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), the second-order multistep data-prediction solver (Lu et al. 2022)."""
    times = timestep_subset(diffusion.num_timesteps, steps)
    abar = diffusion.alphas_cumprod.to(x.device).double()
    alpha = torch.sqrt(abar)
    sigma = torch.sqrt(1 - abar)
    lam = torch.log(alpha / sigma)
    previous = None
    for k, i in enumerate(tqdm(times, disable=not progress, desc="dpm-solver++", leave=False)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0, _ = _x0(model, x, t, diffusion, context, clip)
        if k + 1 == len(times):  # last step: to the data (sigma = 0), first order
            return x0
        j = times[k + 1]
        h = lam[j] - lam[i]
        if previous is None:
            d = x0
        else:
            r = (lam[i] - lam[previous[1]]) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
        x = (sigma[j] / sigma[i]).float() * x - (alpha[j] * torch.expm1(-h)).float() * d
        previous = (x0, i)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim, "dpmpp2m": dpmpp2m}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}': expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
