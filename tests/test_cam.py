"""3D LayerCAM: equal to the formula computed directly on a tiny retrain network, and peaking at the bright blob
that decides the class in a toy model trained for a few steps."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import genotypes
from figures import cam
from model import NetworkLUNA

# Cheap cells: a conv and a skip per node, pooling in the reduction cell.
SMALL = genotypes.Genotype(normal=[('sep_conv_3x3x3', 0), ('skip_connect', 1)] * 4, normal_concat=[2, 3, 4, 5],
                           reduce=[('max_pool_3x3x3', 0), ('sep_conv_3x3x3', 1)] * 4, reduce_concat=[2, 3, 4, 5])


def direct_maps(model, x, target):
    """Per cell (N, d, h, w): sum over channels of max(G, 0) * A, ReLU, with A each cell's output from a
    hand-written forward and G = d logit[target] / dA by autograd; loops over the channels."""
    model.eval()
    s0 = s1 = model.stem(x)
    outs = []
    for cell in model.cells:
        s0, s1 = s1, cell(s0, s1, 0.0)
        outs.append(s1)
    logits = model.classifier(model.global_pooling(s1).flatten(1))
    grads = torch.autograd.grad(logits[:, target].sum(), outs)
    maps = []
    for a, g in zip(outs, grads):
        total = torch.zeros(a.shape[0], *a.shape[2:], dtype=torch.float64)
        for c in range(a.shape[1]):
            total += (g[:, c].clamp(min=0) * a[:, c]).double()
        maps.append(total.clamp(min=0))
    return maps, logits


def scaled(m, size):
    up = F.interpolate(m[:, None].float(), size=(size,) * 3, mode='trilinear', align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = up.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (up - lo) / (hi - lo)


def test_layer_cam_equals_direct_computation():
    torch.manual_seed(0)
    model = NetworkLUNA(4, 2, 3, SMALL)
    model.train()
    with torch.no_grad():   # move BatchNorm running statistics away from their initial values
        model(torch.randn(4, 1, 16, 16, 16))
    x = torch.randn(2, 1, 16, 16, 16)
    maps, logits = direct_maps(model, x, target=1)
    model.train()
    got, prob, classes = cam.layer_cam(model, x, target=1)
    assert model.training                                   # its mode is restored
    assert all(p.grad is None for p in model.parameters())  # and no gradient is left behind
    assert got.shape == (2, 16, 16, 16) and classes.tolist() == [1, 1]
    assert torch.allclose(prob, F.softmax(logits.detach(), 1), atol=1e-6)
    assert torch.allclose(got, scaled(maps[-1], 16), atol=1e-5)               # default: the last cell
    assert got.amin().item() == 0 and got.flatten(1).amax(1).tolist() == [1.0, 1.0]
    fused, _, _ = cam.layer_cam(model, x, cells=(0, -1), target=1)
    assert torch.allclose(cam.layer_cam_maps(torch.ones(1, 2, 2, 2, 2), -torch.ones(1, 2, 2, 2, 2)),
                          torch.zeros(1, 2, 2, 2))                            # negative gradients count for nothing
    mean = (scaled(maps[0], 16) + scaled(maps[-1], 16)) / 2
    want = (mean - mean.flatten(1).min(1).values.view(-1, 1, 1, 1)) / \
        (mean.flatten(1).max(1).values - mean.flatten(1).min(1).values).view(-1, 1, 1, 1)
    assert torch.allclose(fused, want, atol=1e-5)
    predicted, _, classes = cam.layer_cam(model, x)                           # target: the predicted class
    assert classes.tolist() == logits.argmax(1).tolist()
    with pytest.raises(IndexError, match='cell 3 does not exist'):
        cam.layer_cam(model, x, cells=(3,))


def blob_set(n, seed, size=16):
    """Noise cubes; class 1 has a bright ball of radius 2 at a random place, class 0 none."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    x = rng.normal(0, 1, (n, size, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    centres = rng.integers(3, size - 3, (n, 3))
    for i in np.flatnonzero(y):
        c = centres[i]
        x[i] += 3.0 * (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= 4)
    return torch.tensor(x)[:, None], torch.tensor(y), centres


def test_layer_cam_peaks_at_the_blob_that_decides_the_class():
    torch.manual_seed(0)
    model = NetworkLUNA(4, 2, 3, SMALL)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y, _ = blob_set(64, 0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(0, 64, (8,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, centres = blob_set(16, 1)
    model.eval()
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() >= 0.9   # the toy model has learnt the rule
    malignant = np.flatnonzero(yt.numpy())
    for cells, tolerance in ((None, 4.5), ((0, 1, 2), 3.0)):      # the last cell is at 4^3: coarser
        maps, _, _ = cam.layer_cam(model, xt, cells, target=1)
        peaks = [np.unravel_index(int(maps[i].argmax()), maps[i].shape) for i in malignant]
        dist = np.array([np.linalg.norm(np.array(p) - centres[i]) for p, i in zip(peaks, malignant)])
        assert dist.max() <= tolerance and dist.mean() <= tolerance / 2, (cells, dist)
        # and not merely somewhere central: at the blob the map is in its top tenth, far from it lower
        for i in malignant:
            c = centres[i]
            far = tuple(int(v) for v in np.where(c < 8, 15, 0))
            top = torch.quantile(maps[i].flatten(), 0.9)
            assert maps[i][tuple(c)] >= top > maps[i][far], (cells, i)


def test_layer_cam_maps_worked_example_outer_relu():
    # 2 channels, 2 voxels. Voxel 0: A = (2, -3), G = (1, 1): 2 - 3 = -1, the outer ReLU makes it 0.
    # Voxel 1: A = (2, 1), G = (1, -1): the negative gradient counts for nothing (inner ReLU): 2
    a = torch.tensor([[2.0, 2.0], [-3.0, 1.0]]).view(1, 2, 1, 1, 2)
    g = torch.tensor([[1.0, 1.0], [1.0, -1.0]]).view(1, 2, 1, 1, 2)
    assert cam.layer_cam_maps(a, g).flatten().tolist() == [0.0, 2.0]


@pytest.mark.parametrize('bias', [(3.0, -3.0), (-3.0, 3.0)])
def test_layer_cam_is_of_the_predicted_class(bias):
    torch.manual_seed(0)
    model = NetworkLUNA(4, 2, 3, SMALL)
    with torch.no_grad():  # every cube is predicted as the favoured class
        model.classifier.bias.copy_(torch.tensor(bias))
    x = torch.randn(2, 1, 16, 16, 16)
    predicted = int(np.argmax(bias))
    got, prob, classes = cam.layer_cam(model, x)
    assert classes.tolist() == [predicted] * 2 and (prob.argmax(1) == predicted).all()
    maps, _ = direct_maps(model, x, target=predicted)  # the formula by hand, for the predicted class
    assert torch.allclose(got, scaled(maps[-1], 16), atol=1e-5)
    other, _, _ = cam.layer_cam(model, x, target=1 - predicted)
    assert not torch.allclose(got, other, atol=1e-3)  # (the other class's map differs: the check above can fail)
    assert got.min() >= 0
