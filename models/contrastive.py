"""CLIP-style image-spectrum network, its NT-Xent loss and retrieval metrics (SPEC section 2)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoders import ResNet, SpectrumEncoder


class ContrastiveModel(nn.Module):
    """An image encoder and a spectrum encoder mapping into one L2-normalised latent space."""

    def __init__(self, image_encoder: nn.Module, spectrum_encoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.spectrum_encoder = spectrum_encoder

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, 64, 64)`` -> unit vectors ``(B, D)``."""
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def embed_spectra(self, spectra: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L)`` -> unit vectors ``(B, D)``."""
        return F.normalize(self.spectrum_encoder(spectra).float(), dim=-1)

    def forward(self, images: torch.Tensor, spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_images(images), self.embed_spectra(spectra)


def build_contrastive(in_channels: int, image_depth: int = 50, image_width: int = 64, spectrum_width: int = 64,
                      spectrum_mults: tuple[int, ...] = (1, 2, 4, 8, 16), latent_dim: int = 128) -> ContrastiveModel:
    """The network of SPEC 2 (paper defaults)."""
    return ContrastiveModel(ResNet(image_depth, in_channels, latent_dim, image_width),
                            SpectrumEncoder(latent_dim, spectrum_width, tuple(spectrum_mults)))


def nt_xent(z_image: torch.Tensor, z_spectrum: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss over the 2B embeddings of a batch (Chen et al. 2020).

    ``z_image`` and ``z_spectrum`` are ``(B, D)`` unit vectors; item i of one modality is the
    positive of item i of the other, and the other 2B - 2 embeddings are its negatives. Computed
    as a cross-entropy over similarity logits (log-sum-exp), never exponentiating raw scores.
    """
    b = z_image.shape[0]
    z = torch.cat([z_image, z_spectrum]).float()
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, targets)


def true_ranks(z_image: torch.Tensor, z_spectrum: torch.Tensor) -> torch.Tensor:
    """For each image, the 0-based rank of its own spectrum among all spectra by cosine similarity.

    Ties count against the true spectrum (a constant embedding ranks last, not first), and so
    does a non-finite similarity (a NaN embedding ranks last, never first).
    """
    sims = z_image.float() @ z_spectrum.float().T  # (B, B)
    own = sims.diagonal()[:, None]
    others = sims > own
    ties = (sims == own) & ~torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    ranks = (others | ties).sum(1)
    return torch.where(torch.isfinite(sims).all(1), ranks, torch.full_like(ranks, len(sims) - 1))


def retrieval_metrics(z_image: torch.Tensor, z_spectrum: torch.Tensor, batch_size: int,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """In-batch top-k retrieval (groups of ``batch_size``) and the whole-set rank statistics.

    Returns ``top{k}_batch`` for each k, ``median_rank`` (1-based, over the whole set),
    ``top1_all`` and ``top10_all``.
    """
    out: dict[str, float] = {}
    n = len(z_image)
    batch_size = min(batch_size, n)
    hits = {k: 0 for k in ks}
    counted = 0
    for start in range(0, n - batch_size + 1, batch_size):  # full groups only
        ranks = true_ranks(z_image[start:start + batch_size], z_spectrum[start:start + batch_size])
        for k in ks:
            hits[k] += int((ranks < k).sum())
        counted += batch_size
    for k in ks:
        out[f"top{k}_batch"] = hits[k] / counted if counted else float("nan")
    ranks = true_ranks(z_image, z_spectrum).float()
    out["median_rank"] = float(ranks.median() + 1)
    out["top1_all"] = float((ranks < 1).float().mean())
    out["top10_all"] = float((ranks < 10).float().mean())
    return out
