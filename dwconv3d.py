"""Depthwise 3D convolution: the one place where the fast GPU kernels plug in."""
from torch import nn


class DepthwiseConv3d(nn.Conv3d):
    """Conv3d with groups == channels and no bias. Shapes: (N, C, D, H, W) -> (N, C, D', H', W')."""

    def __init__(self, channels, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(channels, channels, kernel_size, stride, padding, dilation,
                         groups=channels, bias=False)
