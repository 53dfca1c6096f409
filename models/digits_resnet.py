"""The built-in default model: a small residual CNN for the 1x8x8 digits images.

It is deliberately built from the structures that make channel stripping hard — identity residual
adds, a channel concatenation, a strided block with a projection shortcut and a flatten into an MLP
(one conv channel becomes a block of 4 features) — while staying small enough that a forward pass
on the whole test split takes milliseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, BN supplies the shift) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the input (identity shortcut), then relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels, 3)
        self.conv2 = _conv_bn(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + x)


class ConcatBlock(nn.Module):
    """Two parallel branches (3x3 and 1x1) whose outputs are concatenated along channels."""

    def __init__(self, c_in: int, c_branch: int) -> None:
        super().__init__()
        self.branch3 = _conv_bn(c_in, c_branch, 3)
        self.branch1 = _conv_bn(c_in, c_branch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(self.branch3(x)), F.relu(self.branch1(x))], dim=1)


class DownBlock(nn.Module):
    """Strided residual block whose shortcut is a strided 1x1 conv + BN projection."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, 3, stride=2)
        self.conv2 = _conv_bn(c_out, c_out, 3)
        self.shortcut = _conv_bn(c_in, c_out, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Residual CNN for [N, 1, 8, 8] digits -> [N, 10] logits.

    stem 1->32 (8x8), residual 32, concat 2x32 -> 64, strided residual 64->64 (4x4),
    pool to 2x2, flatten 256, linear 256->64, relu, linear 64->10.
    """

    def __init__(self, width: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width, 3)
        self.res = ResidualBlock(width)
        self.concat = ConcatBlock(width, width)
        self.down = DownBlock(2 * width, 2 * width)
        self.fc1 = nn.Linear(2 * width * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.res(x)
        x = self.concat(x)
        x = self.down(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)
        return self.fc2(F.relu(self.fc1(x)))
