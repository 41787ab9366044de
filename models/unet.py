"""Conditional 1D UNet denoiser, built to the published NeurIPS 2022 layout (SPEC section 3).

With ``width`` w and ``mults`` (m_1, ..., m_K) the UNet has K - 1 levels of ``w * m_i``
channels; the last multiplier is never a width (it only sets the middle of the 'concat'
bottleneck). The paper configuration (w = 64, mults [1, 2, 4, 8, 16], ``attn_levels`` [4]) has
23.66M parameters without its image encoder and costs 15.5 GFLOP per forward pass on 3,598
pixels (tests/test_diffusion.py pins both)::

    down level i:  Block(c_prev -> c_i) = skip_i;  conv3 stride 2, no padding;  [transformer]
    bottleneck:    Block(c_K-1), transformer, Block(c_K-1)     ('concat': one Block c -> w m_K -> c)
    up level i:    tconv4/2 (c_i -> c_i), pad to skip_i, concat -> Block(2 c_i -> c_i -> c_i-1)  [transformer]
    out:           1x1 conv c_1 -> 1

A transformer follows the *downsampled* output of every level in ``attn_levels`` and the up
block of the same level; the bottleneck always has one ('x-attention' and 'none').

Conditioning modes:
- ``'x-attention'``: a ResNet-18 image encoder's last feature map (512 x 2 x 2 for 64 x 64
  images) becomes 4 context tokens for the cross-attention of every transformer block;
- ``'concat'``: a linear map of the encoder's pooled feature to the spectrum length is a second
  input channel; no transformer blocks;
- ``'none'``: unconditional; the transformer blocks keep their self-attention only.
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
#: GroupNorm groups of the convolution blocks, and of the transformer's input norm (SPEC 3)
NORM_GROUPS = 8
ATTN_NORM_GROUPS = 32
#: image-encoder feature map cells that become context tokens (2 x 2 for 64 x 64 images)
CONTEXT_TOKENS = 4
#: channels per attention head (SPEC 3: heads of 32 channels)
HEAD_DIM = 32


def down_length(length: int) -> int:
    """Length after a stride-2, kernel-3 convolution without padding: 3598 -> 1798."""
    return (length - 3) // 2 + 1


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


def _conv_norm_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 3, padding=1), nn.GroupNorm(NORM_GROUPS, c_out), nn.ReLU())


class Block(nn.Module):
    """conv3(in -> mid)-GN-ReLU, + ReLU-Linear(temb) (-> mid), conv3(mid -> out)-GN-ReLU,
    + 1x1 conv of the input (identity when in == out). ``(B, in, L)`` -> ``(B, out, L)``."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.conv1 = _conv_norm_relu(c_in, c_mid)
        self.time = nn.Sequential(nn.ReLU(), nn.Linear(t_dim, c_mid))
        self.conv2 = _conv_norm_relu(c_mid, c_out)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) + self.time(temb)[:, :, None]
        return self.conv2(h) + self.skip(x)


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``: query, key and value
    projections without bias, output projection with bias; ``dim / head_dim`` heads.
    Self-attention when ``context_dim`` is None (one fused q/k/v projection)."""

    def __init__(self, dim: int, context_dim: int | None, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.self_attention = context_dim is None
        if self.self_attention:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        else:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, N, dim)``, ``context`` ``(B, M, context_dim)`` -> ``(B, N, dim)``."""
        b, n, d = x.shape
        if self.self_attention:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
        split = lambda a: a.reshape(b, a.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    """Gated-GELU feed-forward: Linear(d, 8d) -> value * gelu(gate) -> Linear(4d, d) (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """GroupNorm - 1x1 conv - tokens; pre-LayerNorm self-attention, cross-attention to the
    context (when ``context_dim``), GEGLU; 1x1 conv initialised to zero; plus the input.
    ``(B, C, L)`` -> ``(B, C, L)``; a new block is the identity."""

    def __init__(self, dim: int, context_dim: int | None, head_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(math.gcd(ATTN_NORM_GROUPS, dim), dim, eps=1e-6)
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
    """Noise (or velocity) predictor for ``(B, 1, L)`` spectra, conditioned on images.

    Parameters
    ----------
    length : spectrum length L; it must survive ``len(mults) - 1`` halvings.
    image_channels : 3 (gri) or 5 (ugriz).
    width, mults : level i has ``width * mults[i]`` channels, for all but the last multiplier,
        which is the middle width of the 'concat' bottleneck.
    attn_levels : 1-based levels whose downsampled output and up block are followed by a
        transformer block (the paper: the deepest level, 4).
    head_dim : channels per attention head.
    conditioning : 'x-attention', 'concat' or 'none'.
    image_depth, image_width : the condition encoder's ResNet.
    context_pos : add a learned position to each of the 4 context tokens (not in the paper,
        whose tokens carry no position).
    grad_checkpoint : recompute blocks in the backward pass (saves activation memory).
    cond_drop : in training, the share of items whose context is replaced by a learned null
        context, so that the same network also predicts unconditionally (classifier-free
        guidance, Ho & Salimans 2022; not in the paper: 0 reproduces it).
    low_channel : the super stage of the cascade (SPEC 5): a second input channel holds a
        low-resolution spectrum interpolated onto the full grid (``forward``'s ``low``).
    noise_level : with ``low_channel``, the step of the noise that augments that input
        (``forward``'s ``level``, Ho et al. 2021) is embedded like the timestep and added to it.
    """

    def __init__(self, length: int, image_channels: int = 3, width: int = 64,
                 mults: tuple[int, ...] = (1, 2, 4, 8, 16), attn_levels: tuple[int, ...] = (4,),
                 head_dim: int = HEAD_DIM, conditioning: str = "x-attention", image_depth: int = 18,
                 image_width: int = 64, context_pos: bool = False, grad_checkpoint: bool = False,
                 cond_drop: float = 0.0, low_channel: bool = False, noise_level: bool = False) -> None:
        super().__init__()
        dims = check_layout(length, width, mults, attn_levels, conditioning)
        self.length = length
        self.conditioning = conditioning
        self.grad_checkpoint = grad_checkpoint
        self.cond_drop = cond_drop
        self.low_channel = low_channel
        self.time_embed = nn.Sequential(SinusoidalEmbedding(width), nn.Linear(width, 4 * width), nn.ReLU(),
                                        nn.Linear(4 * width, width))
        if noise_level:
            self.level_embed = nn.Sequential(SinusoidalEmbedding(width), nn.Linear(width, 4 * width), nn.ReLU(),
                                             nn.Linear(4 * width, width))
        context_dim, in_channels = self._build_conditioning(length, image_channels, image_depth, image_width,
                                                            context_pos, cond_drop)
        in_channels += int(low_channel)
        attn = set(attn_levels) if conditioning != "concat" else set()
        self._build_levels(dims, in_channels, width, width * mults[-1], attn, context_dim, head_dim)

    def _build_conditioning(self, length: int, image_channels: int, depth: int, width: int, context_pos: bool,
                            cond_drop: float) -> tuple[int | None, int]:
        """The image encoder and what turns its features into context; returns the context
        tokens' width (None without cross-attention) and the UNet's input channels."""
        if self.conditioning == "none":
            return None, 1
        self.image_encoder = ResNet(depth, image_channels, out_dim=0, width=width)
        feature_dim = self.image_encoder.feature_dim
        if self.conditioning == "x-attention":
            if context_pos:
                self.token_pos = nn.Parameter(torch.zeros(1, CONTEXT_TOKENS, feature_dim))
            null_shape, context_dim, in_channels = (1, CONTEXT_TOKENS, feature_dim), feature_dim, 1
        else:  # concat: the pooled feature mapped to a second input channel
            self.to_channel = nn.Linear(feature_dim, length)
            null_shape, context_dim, in_channels = (1, 1, length), None, 2
        if cond_drop > 0:
            self.null_context = nn.Parameter(torch.zeros(null_shape))
        return context_dim, in_channels

    def _build_levels(self, dims: list[int], in_channels: int, t_dim: int, mid_width: int, attn: set[int],
                      context_dim: int | None, head_dim: int) -> None:
        """Down path, bottleneck and up path (see the module docstring's layout)."""
        def transformer(c: int) -> nn.Module:
            return TransformerBlock(c, context_dim, head_dim)

        self.down_blocks, self.downsample, self.down_attn = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_prev = in_channels
        for i, c in enumerate(dims, start=1):
            self.down_blocks.append(Block(c_prev, c, c, t_dim))
            self.downsample.append(nn.Conv1d(c, c, 3, stride=2))
            self.down_attn.append(transformer(c) if i in attn else nn.Identity())
            c_prev = c
        c = dims[-1]
        if self.conditioning != "concat":
            self.mid = nn.ModuleList([Block(c, c, c, t_dim), transformer(c), Block(c, c, c, t_dim)])
        else:
            self.mid = nn.ModuleList([Block(c, mid_width, c, t_dim)])
        self.upsample, self.up_blocks, self.up_attn = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(len(dims), 0, -1):
            c, c_out = dims[i - 1], dims[max(i - 2, 0)]
            self.upsample.append(nn.ConvTranspose1d(c, c, 4, stride=2, padding=1))
            self.up_blocks.append(Block(2 * c, c, c_out, t_dim))
            self.up_attn.append(transformer(c_out) if i in attn else nn.Identity())
        self.out = nn.Conv1d(dims[0], 1, 1)

    # conditioning -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor | None) -> torch.Tensor | None:
        """Context from images ``(B, C, 64, 64)``: tokens ``(B, 4, 512)`` for 'x-attention', a
        channel ``(B, 1, L)`` for 'concat', None for 'none'. Compute once per galaxy."""
        if self.conditioning == "none" or images is None:
            return None
        features = self.image_encoder.features(images)  # (B, 512, 2, 2)
        if self.conditioning == "x-attention":
            tokens = features.flatten(2).transpose(1, 2)
            pos = getattr(self, "token_pos", None)
            return tokens if pos is None else tokens + pos[:, : tokens.shape[1]]
        return self.to_channel(features.mean((2, 3)))[:, None]

    def unconditional(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """The learned null context, shaped like ``context`` (for classifier-free guidance)."""
        if context is None:
            return None
        if not hasattr(self, "null_context"):
            raise ValueError("guidance needs a model trained with cond_drop > 0 (it has no null context)")
        return self.null_context.expand(context.shape[0], *context.shape[1:]).to(context.dtype)

    def _run(self, block: nn.Module, *args):
        if isinstance(block, nn.Identity):
            return args[0]
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                images: torch.Tensor | None = None, low: torch.Tensor | None = None,
                level: torch.Tensor | None = None) -> torch.Tensor:
        """Network output ``(B, 1, L)`` for ``x`` ``(B, 1, L)`` at timesteps ``t`` ``(B,)``.

        Pass a precomputed ``context`` (sampling) or the ``images`` (training, so that the encoder
        runs inside forward and data-parallel wrappers see it). In training mode with
        ``cond_drop > 0`` each item's context is replaced by the null context with that
        probability. A super-stage network also takes ``low`` ``(B, 1, L)``, the low-resolution
        spectrum on the full grid, and with ``noise_level`` its noise step ``level`` ``(B,)``.
        """
        if self.low_channel:
            if low is None:
                raise ValueError("a super-stage network needs its low-resolution input (low)")
            x = torch.cat([x, low.to(x.dtype)], dim=1)
        if context is None and images is not None:
            context = self.encode(images)
            if self.training and self.cond_drop > 0 and context is not None:
                drop = torch.rand(context.shape[0], device=context.device) < self.cond_drop
                context = torch.where(drop[:, None, None], self.unconditional(context), context)
        if self.conditioning == "concat":
            x = torch.cat([x, context.to(x.dtype)], dim=1)
        tokens = context if self.conditioning == "x-attention" else None
        temb = self.time_embed(t)
        if hasattr(self, "level_embed"):
            if level is None:
                raise ValueError("this network was trained with noisy low-resolution inputs: pass their level")
            temb = temb + self.level_embed(level)
        h, skips = x, []
        for block, down, attn in zip(self.down_blocks, self.downsample, self.down_attn):
            h = self._run(block, h, temb)
            skips.append(h)
            h = self._run(attn, down(h), tokens)
        for layer in self.mid:
            h = self._run(layer, h, tokens if isinstance(layer, TransformerBlock) else temb)
        for up, block, attn in zip(self.upsample, self.up_blocks, self.up_attn):
            skip = skips.pop()
            h = up(h)
            extra = skip.shape[-1] - h.shape[-1]  # 1 or 2: split it, the odd pixel at the end
            h = F.pad(h, (extra // 2, extra - extra // 2))
            h = self._run(block, torch.cat([h, skip], dim=1), temb)
            h = self._run(attn, h, tokens)
        return self.out(h)


def check_layout(length: int, width: int, mults: tuple[int, ...], attn_levels: tuple[int, ...],
                 conditioning: str) -> list[int]:
    """The channels of the UNet's levels, after checking that the layout can be built (a
    ``ValueError`` naming what cannot)."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    if len(mults) < 2:
        raise ValueError(f"mults needs at least 2 entries (levels, then the bottleneck multiplier), got {mults}")
    dims = [width * m for m in mults[:-1]]
    if any(d % NORM_GROUPS for d in dims) or width * mults[-1] % NORM_GROUPS:
        raise ValueError(f"every width * mult must be a multiple of {NORM_GROUPS} (GroupNorm groups), "
                         f"got width {width}, mults {mults}")
    bad = [a for a in attn_levels if not 1 <= a <= len(dims)]
    if bad:
        raise ValueError(f"attn_levels {list(attn_levels)} must lie in 1..{len(dims)} (the UNet's levels)")
    deepest = length
    for _ in dims:
        deepest = down_length(deepest)
    if deepest < 1:
        raise ValueError(f"a spectrum of {length} pixels is too short for {len(dims)} downsampling levels")
    return dims
