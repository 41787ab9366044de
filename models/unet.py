"""Conditional 1D UNet denoiser (SPEC section 3).

Conditioning modes:
- ``'x-attention'``: a ResNet-18 image encoder's last feature map (C x 2 x 2 for 64 x 64
  images) becomes 4 context tokens; transformer blocks (self-attention, cross-attention to the
  tokens, gated-GELU feed-forward) follow the down and up blocks of ``attn_levels`` and sit in
  the bottleneck;
- ``'concat'``: a projection of the image embedding to the spectrum length is a second input
  channel (the transformer blocks then use self-attention only);
- ``'none'``: unconditional.
The image encoder is part of the module and trained jointly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.encoders import ResNet

CONDITIONINGS = ("x-attention", "concat", "none")
NORM_GROUPS = 8


class SinusoidalEmbedding(nn.Module):
    """Standard sinusoidal embedding of integer timesteps, log-spaced frequencies from 1 to
    1/10000 (Vaswani et al. 2017; Ho et al. 2020). ``(B,)`` -> ``(B, dim)``."""

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ResBlock(nn.Module):
    """conv3-GroupNorm-ReLU, add the projected time embedding, conv3-GroupNorm-ReLU, residual."""

    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(c_in, c_out, 3, padding=1), nn.GroupNorm(NORM_GROUPS, c_out), nn.ReLU())
        self.time = nn.Linear(t_dim, c_out)
        self.conv2 = nn.Sequential(nn.Conv1d(c_out, c_out, 3, padding=1), nn.GroupNorm(NORM_GROUPS, c_out), nn.ReLU())
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) + self.time(temb)[:, :, None]
        return self.conv2(h) + self.skip(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, context_dim: int | None, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        k, v = self.kv(x if context is None else context).chunk(2, dim=-1)
        split = lambda a: a.reshape(b, a.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(k), split(v))
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    """Gated-GELU feed-forward: Linear(d, 8d) -> a * gelu(b) -> Linear(4d, d) (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to context tokens, GEGLU; on ``(B, C, L)``.

    The output projection starts at zero, so a new block is the identity.
    """

    def __init__(self, dim: int, context_dim: int | None, head_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(NORM_GROUPS, dim)
        self.proj_in = nn.Conv1d(dim, dim, 1)
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, None, head_dim)
        self.cross = context_dim is not None
        if self.cross:
            self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, context_dim, head_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)
        self.proj_out = nn.Conv1d(dim, dim, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj_in(self.norm_in(x)).transpose(1, 2)  # (B, L, C)
        h = h + self.self_attn(self.norm1(h))
        if self.cross:
            h = h + self.cross_attn(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h.transpose(1, 2))


class ConditionalUNet1D(nn.Module):
    """Noise predictor for ``(B, 1, L)`` spectra of any length, conditioned on images.

    Parameters
    ----------
    length : spectrum length L (needed by 'concat' only; other modes take any length).
    image_channels : 3 (gri) or 5 (ugriz).
    width, mults : channels ``width * mults[i]`` at level i; L halves between levels.
    attn_levels : 1-based levels with a transformer block after their down and up blocks.
    head_dim : channels per attention head.
    conditioning : 'x-attention', 'concat' or 'none'.
    image_depth, image_width : the condition encoder's ResNet.
    grad_checkpoint : recompute blocks in the backward pass (saves activation memory).
    cond_drop : in training, the share of items whose context is replaced by a learned null
        context, so that the same network also predicts unconditionally (classifier-free
        guidance, Ho & Salimans 2022; not in the paper: 0 reproduces it).
    """

    def __init__(self, length: int, image_channels: int = 3, width: int = 64,
                 mults: tuple[int, ...] = (1, 2, 4, 8, 16), attn_levels: tuple[int, ...] = (3, 4),
                 head_dim: int = 32, conditioning: str = "x-attention", image_depth: int = 18,
                 image_width: int = 64, grad_checkpoint: bool = False,
                 cond_drop: float = 0.0) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.length = length
        self.conditioning = conditioning
        self.grad_checkpoint = grad_checkpoint
        self.cond_drop = cond_drop
        dims = [width * m for m in mults]
        t_dim = 4 * width
        self.time_embed = nn.Sequential(SinusoidalEmbedding(width), nn.Linear(width, t_dim), nn.ReLU(),
                                        nn.Linear(t_dim, t_dim))
        context_dim = None
        in_channels = 1
        if conditioning == "x-attention":
            self.image_encoder = ResNet(image_depth, image_channels, out_dim=0, width=image_width)
            context_dim = self.image_encoder.feature_dim
            self.token_pos = nn.Parameter(torch.zeros(1, 4, context_dim))
            if cond_drop > 0:
                self.null_context = nn.Parameter(torch.zeros(1, 4, context_dim))
        elif conditioning == "concat":
            self.image_encoder = ResNet(image_depth, image_channels, out_dim=128, width=image_width)
            self.to_channel = nn.Linear(128, length)
            if cond_drop > 0:
                self.null_context = nn.Parameter(torch.zeros(1, 1, length))
            in_channels = 2
        self.init_conv = nn.Conv1d(in_channels, dims[0], 3, padding=1)
        attn = set(attn_levels)
        self.down_blocks, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_prev = dims[0]
        for i, c in enumerate(dims):
            self.down_blocks.append(ResBlock(c_prev, c, t_dim))
            self.down_attn.append(TransformerBlock(c, context_dim, head_dim) if i + 1 in attn else nn.Identity())
            self.downsample.append(nn.Conv1d(c, c, 3, stride=2) if i + 1 < len(dims) else nn.Identity())
            c_prev = c
        self.mid1 = ResBlock(dims[-1], dims[-1], t_dim)
        self.mid_attn = TransformerBlock(dims[-1], context_dim, head_dim)
        self.mid2 = ResBlock(dims[-1], dims[-1], t_dim)
        self.upsample, self.up_blocks, self.up_attn = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(dims) - 1)):
            self.upsample.append(nn.ConvTranspose1d(dims[i + 1], dims[i], 4, stride=2, padding=1))
            self.up_blocks.append(ResBlock(2 * dims[i], dims[i], t_dim))
            self.up_attn.append(TransformerBlock(dims[i], context_dim, head_dim) if i + 1 in attn else nn.Identity())
        self.out = nn.Conv1d(dims[0], 1, 1)

    # conditioning -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor | None) -> torch.Tensor | None:
        """Context from images ``(B, C, 64, 64)``: tokens ``(B, 4, C')`` for 'x-attention',
        a channel ``(B, 1, L)`` for 'concat', None for 'none'. Compute once per galaxy."""
        if self.conditioning == "none" or images is None:
            return None
        if self.conditioning == "x-attention":
            features = self.image_encoder.features(images)  # (B, C', 2, 2)
            tokens = features.flatten(2).transpose(1, 2)
            return tokens + self.token_pos[:, : tokens.shape[1]]
        return self.to_channel(self.image_encoder(images))[:, None]

    def unconditional(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """The learned null context, shaped like ``context`` (for classifier-free guidance)."""
        if context is None:
            return None
        if not hasattr(self, "null_context"):
            raise ValueError("guidance needs a model trained with cond_drop > 0 (it has no null context)")
        return self.null_context.expand(context.shape[0], *context.shape[1:]).to(context.dtype)

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise ``(B, 1, L)`` for ``x`` ``(B, 1, L)`` at timesteps ``t`` ``(B,)``.

        Pass a precomputed ``context`` (sampling) or the ``images`` (training, so that the
        encoder runs inside forward and data-parallel wrappers see it).
        """
        if context is None and images is not None:
            context = self.encode(images)
            if self.training and self.cond_drop > 0 and context is not None:
                drop = torch.rand(context.shape[0], device=context.device) < self.cond_drop
                context = torch.where(drop[:, None, None], self.unconditional(context), context)
        if self.conditioning == "concat":
            x = torch.cat([x, context.to(x.dtype)], dim=1)
        tokens = context if self.conditioning == "x-attention" else None
        temb = self.time_embed(t)
        h = self.init_conv(x)
        skips = []
        for block, attn, down in zip(self.down_blocks, self.down_attn, self.downsample):
            h = self._run(block, h, temb)
            h = self._run(attn, h, tokens) if isinstance(attn, TransformerBlock) else h
            skips.append(h)
            h = down(h)
        h = self._run(self.mid1, h, temb)
        h = self._run(self.mid_attn, h, tokens)
        h = self._run(self.mid2, h, temb)
        skips.pop()  # the deepest level feeds the bottleneck directly
        for up, block, attn in zip(self.upsample, self.up_blocks, self.up_attn):
            skip = skips.pop()
            h = up(h)
            h = F.pad(h, (0, skip.shape[-1] - h.shape[-1])) if h.shape[-1] < skip.shape[-1] else h[..., : skip.shape[-1]]
            h = self._run(block, torch.cat([h, skip], dim=1), temb)
            h = self._run(attn, h, tokens) if isinstance(attn, TransformerBlock) else h
        return self.out(h)
