"""Gaussian diffusion maths (Ho et al. 2020), kept apart from the network.

:class:`GaussianDiffusion` is not an ``nn.Module``: the denoiser is passed to it. Schedules are
computed in float64 and stored as float32 tensors; coefficients carry their textbook names and
are read through :func:`extract`.

The network predicts the noise (``prediction='eps'``, the paper's) or the velocity
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (``prediction='v'``, Salimans & Ho 2022), whose
loss keeps weight on the data estimate at high noise levels. Samplers read the network output
through :meth:`GaussianDiffusion.split_output`, so they serve both.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

#: the cosine schedule's offset s (Nichol & Dhariwal 2021) and its beta ceiling
COSINE_S = 0.008
MAX_BETA = 0.999
#: what the network predicts
PREDICTIONS = ("eps", "v")
#: noise schedules (make_betas)
SCHEDULES = ("cosine", "linear")

#: a denoiser: (x_t (B, C, L), t (B,) long, context) -> predicted noise or velocity (B, C, L)
Denoiser = Callable[..., torch.Tensor]


def cosine_betas(timesteps: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> np.ndarray:
    """Cosine schedule: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2).

    betas_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped at ``max_beta``; float64 ``(T,)``.
    """
    t = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, max_beta)


def linear_betas(timesteps: int) -> np.ndarray:
    """Linear schedule of Ho et al. (1e-4 .. 0.02 for T = 1000), rescaled for other T."""
    scale = 1000.0 / timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def make_betas(schedule: str, timesteps: int) -> np.ndarray:
    """The ``schedule``'s betas for ``timesteps`` steps."""
    if schedule == "cosine":
        return cosine_betas(timesteps)
    if schedule == "linear":
        return linear_betas(timesteps)
    raise ValueError(f"unknown noise schedule '{schedule}': expected 'cosine' or 'linear'")


def extract(a: torch.Tensor, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``a[t]`` for a batch of timesteps ``t`` ``(B,)``, shaped to broadcast against ``shape``."""
    return a.to(t.device)[t].reshape(-1, *([1] * (len(shape) - 1)))


class GaussianDiffusion:
    """The forward process q, its posterior, and the noise-prediction loss.

    Parameters
    ----------
    betas : ``(T,)`` noise schedule (float64 numpy array).
    prediction : 'eps' (the network predicts the noise) or 'v' (the velocity).
    """

    def __init__(self, betas: np.ndarray, prediction: str = "eps") -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("betas must be a 1-D array in (0, 1)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction '{prediction}': expected one of {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        coefficients = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            # the variance is 0 at t = 0: log-clip it with the next value
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        self.float64 = coefficients
        for name, value in coefficients.items():
            setattr(self, name, torch.tensor(value, dtype=torch.float32))

    @classmethod
    def from_schedule(cls, schedule: str, timesteps: int, prediction: str = "eps") -> "GaussianDiffusion":
        """The diffusion of a named schedule (:func:`make_betas`)."""
        return cls(make_betas(schedule, timesteps), prediction)

    # forward process --------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (extract(self.posterior_mean_coef1, t, xt.shape) * x0
                + extract(self.posterior_mean_coef2, t, xt.shape) * xt)
        return (mean, extract(self.posterior_variance, t, xt.shape),
                extract(self.posterior_log_variance_clipped, t, xt.shape))

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 implied by x_t and a noise prediction."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt
                - extract(self.sqrt_recipm1_alphas_cumprod, t, xt.shape) * eps)

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Noise implied by x_t and an x_0 estimate."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, xt.shape))

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the 'v' target."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)

    def split_output(self, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_0, eps)`` implied by x_t and the network output (noise or velocity)."""
        if self.prediction == "eps":
            return self.predict_x0(xt, t, output), output
        a = extract(self.sqrt_alphas_cumprod, t, xt.shape)
        s = extract(self.sqrt_one_minus_alphas_cumprod, t, xt.shape)
        return a * xt - s * output, s * xt + a * output

    # training ---------------------------------------------------------------------------------
    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
        """Timesteps drawn uniformly from {0, ..., T - 1} (never a fixed t: SPEC 6)."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device)

    def training_loss(self, model: Denoiser, x0: torch.Tensor, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        """MSE between the network output and its target (the noise, or the velocity) at
        uniformly drawn t (a scalar)."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        target = noise if self.prediction == "eps" else self.velocity(x0, t, noise)
        output = model(self.q_sample(x0, t, noise), t, **model_kwargs)
        return ((output.float() - target.float()) ** 2).mean()
