"""Candidate ops: output shapes for every op x stride on odd and even sizes, gradients, details."""
import math

import pytest
import torch
from torch import nn

from dwconv3d import DepthwiseConv3d
from genotypes import DARTS_BASE_PRIMITIVES, PRIMITIVES
from operations import OPS, FactorizedReduce, MBConv, ReLUConvBN, make_op
from utils import UserError

ALL_OPS = sorted(set(PRIMITIVES) | set(DARTS_BASE_PRIMITIVES))
SIZES = [(5, 6, 7), (4, 4, 4)]     # odd and even spatial sizes (D, H, W)
C = 4


@pytest.mark.parametrize('name', ALL_OPS)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', SIZES)
def test_op_shape(name, stride, size):
    op = make_op(name, C, stride, affine=False)
    out = op(torch.randn(2, C, *size))
    assert out.shape == (2, C) + tuple(math.ceil(s / stride) for s in size)


@pytest.mark.parametrize('name', ALL_OPS)
@pytest.mark.parametrize('stride', [1, 2])
def test_every_parameter_gets_gradient(name, stride):
    torch.manual_seed(0)
    op = make_op(name, C, stride, affine=True)
    x = torch.randn(2, C, 5, 6, 7, requires_grad=True)
    out = op(x)
    # A random projection: the plain sum of a BN output has zero gradient upstream.
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and (name == 'none' or x.grad.abs().sum() > 0)
    for pname, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'{name}: {pname} got no gradient'


@pytest.mark.parametrize('name, n_depthwise', [
    ('sep_conv_3x3x3', 2), ('sep_conv_5x5x5', 2), ('dil_conv_3x3x3', 1), ('dil_conv_5x5x5', 1),
    ('MBConv_5x5x5_3', 1), ('MBConv_5x5x5_6', 1)])
def test_depthwise_convs_use_dwconv3d(name, n_depthwise):
    op = make_op(name, C, 2, affine=True)
    grouped = [m for m in op.modules() if isinstance(m, nn.Conv3d) and m.groups > 1]
    assert len(grouped) == n_depthwise
    assert all(isinstance(m, DepthwiseConv3d) for m in grouped)
    # The first depthwise conv carries the stride; dil_conv uses dilation 2.
    assert grouped[0].stride == (2, 2, 2)
    assert all(m.dilation == ((2, 2, 2) if name.startswith('dil') else (1, 1, 1)) for m in grouped)


def test_no_conv_has_bias():
    for name in ALL_OPS:
        for m in make_op(name, C, 2, affine=True).modules():
            if isinstance(m, nn.Conv3d):
                assert m.bias is None, name


def test_mbconv_parameter_count_by_hand():
    # C=4, k=5, e=3: hidden 12; expand 4*12, BN 2*12, depthwise 12*125, BN 2*12, project 12*4, BN 2*4.
    op = make_op('MBConv_5x5x5_3', 4, 1, affine=True)
    assert isinstance(op, MBConv)
    assert sum(p.numel() for p in op.parameters()) == 48 + 24 + 1500 + 24 + 48 + 8
    assert sum(isinstance(m, nn.ReLU6) for m in op.modules()) == 2


def test_mbconv_any_kernel_and_expansion():
    op = make_op('MBConv_3x3x3_2', 3, 2, affine=False)
    assert op(torch.randn(1, 3, 7, 7, 7)).shape == (1, 3, 4, 4, 4)
    assert op[0].out_channels == 6


@pytest.mark.parametrize('bad', ['sep_conv_7x7x7', 'conv', 'MBConv_4x4x4_3', 'MBConv_3x5x3_3',
                                 'MBConv_3x3x3_0'])
def test_unknown_op_raises_user_error(bad):
    with pytest.raises(UserError) as err:
        make_op(bad, C, 1, affine=True)
    assert bad in str(err.value)


def test_unknown_op_error_lists_known_names():
    with pytest.raises(UserError) as err:
        make_op('conv_3x3x3', C, 1, affine=True)
    for name in OPS:
        assert name in str(err.value)
    assert 'MBConv_{k}x{k}x{k}_{e}' in str(err.value)


def test_skip_connect_is_identity_at_stride_1():
    x = torch.randn(2, C, 3, 3, 3)
    assert torch.equal(make_op('skip_connect', C, 1, affine=True)(x), x)
    assert isinstance(make_op('skip_connect', C, 2, affine=True), FactorizedReduce)


def test_zero_op_is_zero():
    out = make_op('none', C, 2, affine=False)(torch.randn(2, C, 5, 5, 5))
    assert out.shape == (2, C, 3, 3, 3) and not out.any()


def test_avg_pool_excludes_padding():
    # count_include_pad=False: a constant input stays constant at the borders too.
    out = make_op('avg_pool_3x3x3', C, 1, affine=False)(torch.full((1, C, 4, 4, 4), 3.0))
    assert torch.allclose(out, torch.full_like(out, 3.0))


def _reduce_worked_example(shift):
    """FactorizedReduce(1, 2) with both 1x1x1 weights 1, BN at its initial running statistics (eval), on a 4^3
    cube holding its own voxel index 16 d + 4 h + w: each output channel shows the voxels its conv read."""
    fr = FactorizedReduce(1, 2, affine=False, shift=shift).eval()
    with torch.no_grad():
        nn.init.constant_(fr.conv_1.weight, 1.0)
        nn.init.constant_(fr.conv_2.weight, 1.0)
        out = fr(torch.arange(64.0).view(1, 1, 4, 4, 4))
    return out * math.sqrt(1 + fr.bn.eps)  # undo BN's division by sqrt(running var 1 + eps)


def test_factorized_reduce_published_form_reads_the_same_voxels_twice():
    # the voxels at even (d, h, w): indices 0, 2, 8, 10, 32, 34, 40, 42, in both branches (the published form)
    even = torch.tensor([[[0., 2.], [8., 10.]], [[32., 34.], [40., 42.]]])
    out = _reduce_worked_example(shift=False)
    assert out.shape == (1, 2, 2, 2, 2)
    assert torch.allclose(out[0, 0], even) and torch.allclose(out[0, 1], even)


def test_factorized_reduce_shifted_form_reads_the_odd_voxels():
    # DARTS' form: the second branch reads the voxels at odd (d, h, w), each index + 21 = 16 + 4 + 1
    out = _reduce_worked_example(shift=True)
    assert torch.allclose(out[0, 0], out[0, 1] - 21)
    assert out[0, 1, 0, 0, 0] == 21 and out[0, 1, 1, 1, 1] == 63


def test_factorized_reduce_default_and_skip_connect_are_the_published_form():
    assert not FactorizedReduce(2, 4).shift and not make_op('skip_connect', 4, 2, affine=True).shift
    assert make_op('skip_connect', 4, 2, affine=True, reduce_shift=True).shift


@pytest.mark.parametrize('c_out', [1, 3, 6])
def test_factorized_reduce_channel_counts(c_out):
    out = FactorizedReduce(4, c_out, affine=True)(torch.randn(2, 4, 5, 6, 7))
    assert out.shape == (2, c_out, 3, 3, 4)


def test_relu_conv_bn_shape():
    out = ReLUConvBN(6, 4, 1, 1, 0, affine=False)(torch.randn(2, 6, 5, 6, 7))
    assert out.shape == (2, 4, 5, 6, 7)
