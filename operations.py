"""Candidate operations of the 3D cells and the cell preprocessing blocks.

Every candidate op is built as OP(C, stride, affine) and maps (N, C, D, H, W) to
(N, C, ceil(D/stride), ceil(H/stride), ceil(W/stride)). All depthwise convolutions go through
dwconv3d.DepthwiseConv3d, the single place where the fast GPU kernels plug in.
"""
import contextlib
import re

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from dwconv3d import DepthwiseConv3d
from utils import UserError


def same_padding(kernel_size, dilation=1):
    """Padding that keeps the spatial size at stride 1 (odd kernels)."""
    return dilation * (kernel_size - 1) // 2


class ReLUConvBN(nn.Sequential):
    """ReLU, dense Conv3d (no bias), BN. Used for the 1x1x1 cell preprocessing."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv3d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm3d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, depthwise kxkxk conv (carries stride and dilation), pointwise 1x1x1 conv, BN.

    groups > 1 stacks `groups` independent copies side by side (the search supernet runs the same op of
    several edges at once): C_in and C_out are then the totals, and copy g maps input channels
    [g*C_in/groups, (g+1)*C_in/groups) to the same slice of the output. relu=False leaves out the leading ReLU
    (Identity in its place) for an input that is already rectified.
    """

    def __init__(self, C_in, C_out, kernel_size, stride, dilation, affine=True, groups=1, relu=True):
        super().__init__(
            nn.ReLU(inplace=False) if relu else nn.Identity(),
            DepthwiseConv3d(C_in, kernel_size, stride, same_padding(kernel_size, dilation), dilation),
            nn.Conv3d(C_in, C_out, 1, bias=False, groups=groups),
            nn.BatchNorm3d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked DilConv blocks with dilation 1; only the first carries the stride (groups, relu: as DilConv)."""

    def __init__(self, C_in, C_out, kernel_size, stride, affine=True, groups=1, relu=True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, 1, affine, groups, relu),
            DilConv(C_in, C_out, kernel_size, 1, 1, affine, groups),
        )


class MBConv(nn.Sequential):
    """Inverted bottleneck without residual: expand 1x1x1 + BN + ReLU6, depthwise kxkxk
    (carries the stride) + BN + ReLU6, project 1x1x1 + BN. Hidden width = C_in * expansion.

    edges > 1 runs `edges` independent copies on the same input: (N, C_in, ...) -> (N, edges * C_out, ...),
    copy e's output in channels [e*C_out, (e+1)*C_out).
    """

    def __init__(self, C_in, C_out, kernel_size, stride, expansion, affine=True, edges=1):
        hidden = edges * C_in * expansion
        super().__init__(
            nn.Conv3d(C_in, hidden, 1, bias=False),
            nn.BatchNorm3d(hidden, affine=affine),
            nn.ReLU6(inplace=False),
            DepthwiseConv3d(hidden, kernel_size, stride, same_padding(kernel_size)),
            nn.BatchNorm3d(hidden, affine=affine),
            nn.ReLU6(inplace=False),
            nn.Conv3d(hidden, edges * C_out, 1, bias=False, groups=edges),
            nn.BatchNorm3d(edges * C_out, affine=affine),
        )


class Zero(nn.Module):
    """The 'none' op: zeros of the output shape (subsampled by stride)."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        s = self.stride
        return x[:, :, ::s, ::s, ::s].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve D, H, W with two 1x1x1 stride-2 convs whose outputs are concatenated on channels, then BN.
    (N, C_in, D, H, W) -> (N, edges * C_out, ceil(D/2), ceil(H/2), ceil(W/2)).

    shift=False (the published NAS-HBO form): both convs read the same voxels, those at even (d, h, w).
    shift=True (DARTS): the second conv reads x shifted by one voxel on every spatial axis (the voxels at odd
    (d, h, w), the far end zero-padded), so together the two see every voxel.
    edges > 1 runs `edges` independent copies on the same input (copy e in output channels
    [e*C_out, (e+1)*C_out)); relu=False leaves out the leading ReLU for an already rectified input.
    """

    def __init__(self, C_in, C_out, affine=True, edges=1, relu=True, shift=False):
        super().__init__()
        # Odd C_out (e.g. PC-DARTS partial channels) gives the first conv the extra channel.
        c_second = C_out // 2
        self.edges, self.shift = edges, shift
        self.relu = nn.ReLU(inplace=False) if relu else nn.Identity()
        self.conv_1 = nn.Conv3d(C_in, edges * (C_out - c_second), 1, stride=2, bias=False)
        self.conv_2 = nn.Conv3d(C_in, edges * c_second, 1, stride=2, bias=False) if c_second else None
        self.bn = nn.BatchNorm3d(edges * C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        out = self.conv_1(x)
        if self.conv_2 is not None:
            # shift: one voxel on, the far end padded so odd sizes give the same output size
            second = self.conv_2(nn.functional.pad(x[:, :, 1:, 1:, 1:], (0, 1, 0, 1, 0, 1)) if self.shift else x)
            if self.edges == 1:
                out = torch.cat([out, second], dim=1)
            else:  # per copy: its conv_1 channels, then its conv_2 channels
                n, size = out.shape[0], out.shape[2:]
                out = torch.cat([out.view(n, self.edges, -1, *size), second.view(n, self.edges, -1, *size)],
                                dim=2).view(n, -1, *size)
        return self.bn(out)


class StatisticsFrozen:
    """Context in which BatchNorm layers of `module` normalize as usual but leave their running statistics as they
    were (momentum 0, batch count detached so it is not incremented): for recomputing a checkpointed block, whose
    statistics its first forward tracked. (Switching tracking off instead would change which tensors BatchNorm
    saves, which checkpoint forbids.) No tensor is copied. Reusable: a graph kept for a second backward
    recomputes again under the same one."""

    def __init__(self, module):
        self.layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked) for m in self.layers]
        for m in self.layers:
            m.momentum, m.num_batches_tracked = 0.0, None

    def __exit__(self, *exc):
        for m, (momentum, count) in zip(self.layers, self.saved):
            m.momentum, m.num_batches_tracked = momentum, count


def recomputed(module, *inputs):
    """module(*inputs), keeping only the inputs for backward and running the module again there (activation
    checkpointing). The module's current parameter tensors are inputs too, so the recomputation uses the same
    ones even under torch.func.functional_call (the search's virtual weights), which has restored the module's
    own by the time backward runs. Random draws are replayed (drop path); BatchNorm statistics move once."""
    named = list(module.named_parameters())
    names, params = [n for n, _ in named], [p for _, p in named]

    def run(*args):
        return functional_call(module, dict(zip(names, args[:len(names)])), args[len(names):])
    return checkpoint(run, *params, *inputs, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), StatisticsFrozen(module)))


def stem(C_out):
    """The network stem: (N, 1, D, H, W) -> (N, C_out, D, H, W)."""
    return nn.Sequential(nn.Conv3d(1, C_out, 3, padding=1, bias=False), nn.BatchNorm3d(C_out))


def cell_layout(C, layers, multiplier, stem_multiplier=3):
    """Channels of a DARTS cell stack: one (C_prev_prev, C_prev, C, reduction, reduction_prev) per cell, and
    the channels of the last cell's output. Reductions (stride 2, channels doubled) at layers//3 and
    2*layers//3; a cell outputs multiplier * C channels (multiplier: an int, or (normal, reduction))."""
    normal_mult, reduce_mult = multiplier if isinstance(multiplier, tuple) else (multiplier, multiplier)
    C_pp = C_p = stem_multiplier * C
    C_curr, reduction_prev, plan = C, False, []
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            C_curr *= 2
        plan.append((C_pp, C_p, C_curr, reduction, reduction_prev))
        reduction_prev = reduction
        C_pp, C_p = C_p, (reduce_mult if reduction else normal_mult) * C_curr
    return plan, C_p


def _skip(C, stride, affine, reduce_shift=False):
    return nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine, shift=reduce_shift)


# Fixed-name candidate ops: name -> constructor(C, stride, affine).
OPS = {
    'none': lambda C, stride, affine: Zero(stride),
    'max_pool_3x3x3': lambda C, stride, affine: nn.MaxPool3d(3, stride=stride, padding=1),
    'avg_pool_3x3x3': lambda C, stride, affine: nn.AvgPool3d(
        3, stride=stride, padding=1, count_include_pad=False),
    'skip_connect': _skip,
    # the convs also take groups= and relu= (the supernet's batched edges, see DilConv)
    'sep_conv_3x3x3': lambda C, stride, affine, **kw: SepConv(C, C, 3, stride, affine, **kw),
    'sep_conv_5x5x5': lambda C, stride, affine, **kw: SepConv(C, C, 5, stride, affine, **kw),
    'dil_conv_3x3x3': lambda C, stride, affine, **kw: DilConv(C, C, 3, stride, 2, affine, **kw),
    'dil_conv_5x5x5': lambda C, stride, affine, **kw: DilConv(C, C, 5, stride, 2, affine, **kw),
}

# MBConv_{k}x{k}x{k}_{e}: kernel k (same on all axes), expansion ratio e.
MBCONV_PATTERN = re.compile(r'MBConv_(\d+)x(\d+)x(\d+)_(\d+)')
MBCONV_FORMAT = 'MBConv_{k}x{k}x{k}_{e}'


def parse_mbconv(name):
    """Return (kernel, expansion) for a valid MBConv name, None for any other string.
    Raises UserError for an MBConv-shaped name with unequal or even kernels or zero expansion."""
    m = MBCONV_PATTERN.fullmatch(name)
    if m is None:
        return None
    k, k2, k3, e = (int(g) for g in m.groups())
    if not (k == k2 == k3 and k % 2 == 1 and e >= 1):
        raise UserError(f"op '{name}': MBConv needs one odd kernel size on all axes and "
                        f"expansion >= 1 (format {MBCONV_FORMAT})")
    return k, e


def known_op_names():
    """Human-readable list of accepted op names (for error messages)."""
    return sorted(OPS) + [MBCONV_FORMAT + ' (odd k, e >= 1)']


def check_op_name(name):
    """Raise UserError unless `name` is a fixed op name or a valid MBConv name."""
    if not isinstance(name, str) or (name not in OPS and parse_mbconv(name) is None):
        raise UserError(f"unknown op {name!r}; known ops: {', '.join(known_op_names())}")


def make_op(name, C, stride, affine, reduce_shift=False, **options):
    """Build candidate op `name` for C channels: (N, C, D, H, W) -> (N, C, D/stride, ...). reduce_shift: the
    FactorizedReduce form of skip_connect at stride 2 (see FactorizedReduce). options: the sep/dil convs' groups
    and relu, MBConv's edges (the search supernet's batched forms)."""
    check_op_name(name)
    if name == 'skip_connect':
        return _skip(C, stride, affine, reduce_shift)
    if name in OPS:
        return OPS[name](C, stride, affine, **options)
    k, e = parse_mbconv(name)
    return MBConv(C, C, k, stride, e, affine, **options)
