"""Image and spectrum encoders, written in plain torch (no torchvision, nothing downloaded).

The 2D ResNet follows He et al. (2016) with the usual layer names (``conv1``, ``bn1``,
``layer1`` .. ``layer4``, ``fc``), so a state_dict saved from a standard ResNet of the same
depth loads into it. The 1D ResNet encodes spectra as in SPEC section 2.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

#: blocks per stage and block type for each supported depth
RESNET_LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """ResNet-18/34/50 for ``(B, C, 64, 64)`` images.

    Parameters
    ----------
    depth : 18, 34 or 50.
    in_channels : 3 for gri colour images, 5 for ugriz.
    out_dim : size of the linear head; 0 for no head (feature maps only).
    width : channels of the stem (64 for the standard network).
    """

    def __init__(self, depth: int = 50, in_channels: int = 3, out_dim: int = 128, width: int = 64) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        kind, counts = RESNET_LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = width
        for i, n in enumerate(counts):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, width * 2 ** i, stride=2 if (j == 0 and i > 0) else 1))
                c_in = width * 2 ** i * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.feature_dim = c_in
        self.fc = nn.Linear(c_in, out_dim) if out_dim else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> last feature map ``(B, feature_dim, H / 32, W / 32)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, out_dim)``."""
        pooled = self.features(x).mean((2, 3))
        return pooled if self.fc is None else self.fc(pooled)

    def load_weights(self, path: str | Path) -> list[str]:
        """Load a local state_dict, skipping tensors whose shape differs (e.g. another head).

        Returns the names that were not loaded. Raises ``ValueError`` when nothing matches.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        own = self.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise ValueError(f"'{path}' has no tensor matching this ResNet")
        self.load_state_dict(usable, strict=False)
        return sorted(set(own) - set(usable))


class ResBlock1D(nn.Module):
    """Two (conv3 - GroupNorm(8) - SiLU) layers with a residual (1x1 projection on channel change)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
            nn.Conv1d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class SpectrumEncoder(nn.Module):
    """1D ResNet for ``(B, 1, L)`` spectra of any length (SPEC 2).

    Per level: two :class:`ResBlock1D` then a stride-2 conv3; then a mean over length and a
    linear layer to ``out_dim``. Channels are ``width * mults[i]``.
    """

    def __init__(self, out_dim: int = 128, width: int = 64, mults: tuple[int, ...] = (1, 2, 4, 8, 16),
                 in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(in_channels, width, 3, padding=1)]
        c_in = width
        for m in mults:
            c = width * m
            layers += [ResBlock1D(c_in, c), ResBlock1D(c, c), nn.Conv1d(c, c, 3, stride=2, padding=1)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L)`` -> ``(B, out_dim)``."""
        return self.head(self.body(x).mean(-1))
