"""sparsemax against hand-worked cases, an independent simplex projection, gradcheck, and the temperature."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from sparsemax import sparsemax, temperature


def project_bisection(z, iters=200):
    """Reference projection onto the simplex: bisect on tau so that sum(max(z - tau, 0)) = 1."""
    lo, hi = z.min() - 1.0, z.max()  # the clipped mass is >= 1 at lo (each term >= 1) and 0 at hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if np.maximum(z - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(z - (lo + hi) / 2, 0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape,dim', [((7,), -1), ((5, 9), 1), ((5, 9), 0), ((3, 4, 6), 1), ((2, 3, 4, 5), -2)])
def test_output_on_simplex(shape, dim, dtype):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3
    p = sparsemax(z, dim=dim)
    assert p.shape == z.shape and p.dtype == dtype
    assert (p >= 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(p.sum(dim), torch.ones((), dtype=dtype), atol=tol, rtol=0)


@pytest.mark.parametrize('z,expected', [
    ([1.0, 0.5, -2.0], [0.75, 0.25, 0.0]),
    ([1.0, 1.0, -1.0], [0.5, 0.5, 0.0]),         # tie inside the support
    ([3.0, 1.0, 1.0], [1.0, 0.0, 0.0]),          # tie outside the support
    ([0.5, 0.4, 0.4, -1.0], [0.4, 0.3, 0.3, 0.0]),
    ([0.2, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]),  # all tied
    ([-5.0, 2.0, -5.0], [0.0, 1.0, 0.0]),
    ([42.0], [1.0]),
])
def test_hand_worked(z, expected):
    p = sparsemax(torch.tensor(z, dtype=torch.float64))
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # Exact zeros, not just small numbers, where the projection leaves an op out.
    assert ((p == 0) == (torch.tensor(expected) == 0)).all()


def test_matches_bisection_projection():
    rng = np.random.default_rng(1)
    for _ in range(200):
        k = int(rng.integers(1, 12))
        z = rng.normal(scale=float(rng.choice([0.1, 1.0, 10.0])), size=k)
        p = sparsemax(torch.from_numpy(z)).numpy()
        np.testing.assert_allclose(p, project_bisection(z), atol=1e-10)


def test_matches_qp_solver():
    # Solve min ||p - z||^2 on the simplex with a general-purpose constrained solver.
    rng = np.random.default_rng(2)
    for _ in range(10):
        z = rng.normal(size=6)
        res = minimize(lambda p, z=z: ((p - z) ** 2).sum(), np.full(6, 1 / 6), jac=lambda p, z=z: 2 * (p - z),
                       method='SLSQP', bounds=[(0, None)] * 6,
                       constraints=[{'type': 'eq', 'fun': lambda p: p.sum() - 1}], options={'ftol': 1e-12})
        assert res.success
        np.testing.assert_allclose(sparsemax(torch.from_numpy(z)).numpy(), res.x, atol=1e-6)


def test_batched_equals_rowwise_along_any_dim():
    z = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = sparsemax(z, dim=1)
    for i in range(4):
        for j in range(5):
            assert torch.equal(p[i, :, j], sparsemax(z[i, :, j]))


def test_shift_invariant_and_large_inputs():
    z = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float32)
    for shift in (-1e4, 0.0, 1e4):
        assert torch.allclose(sparsemax(z + shift), torch.tensor([0.75, 0.25, 0.0]), atol=1e-3)
    # near float32's largest value (3.4e38): shifted by the max, not by minus it, the sum overflows to inf
    assert sparsemax(torch.tensor([3e38, 0.0])).tolist() == [1.0, 0.0]


def _away_from_support_change(z, margin=1e-3):
    """True if no element of z is within margin of the threshold (where the Jacobian jumps)."""
    p = sparsemax(z)
    tau = (z - p)[p > 0][0]
    return bool(((z - tau).abs() > margin).all())


def test_gradcheck():
    g = torch.Generator().manual_seed(4)
    checked = 0
    while checked < 10:
        z = torch.randn(3, 7, generator=g, dtype=torch.float64)
        if not all(_away_from_support_change(row) for row in z):
            continue
        assert torch.autograd.gradcheck(lambda x: sparsemax(x, dim=-1), (z.requires_grad_(),))
        assert torch.autograd.gradcheck(lambda x: sparsemax(x.t(), dim=0), (z.detach().requires_grad_(),))
        checked += 1


def test_gradient_closed_form_on_hand_case():
    # Support {0, 1}: gradient = v - mean(v over support) there, zero at the dropped element.
    z = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([3.0, -1.0, 7.0], dtype=torch.float64)
    (sparsemax(z) * v).sum().backward()
    assert torch.allclose(z.grad, torch.tensor([2.0, -2.0, 0.0], dtype=torch.float64))


def test_temperature_limits():
    z = torch.tensor([[0.3, 0.1, 0.29, -0.2], [-1.0, -0.5, -0.51, -3.0]], dtype=torch.float64)
    hot = sparsemax(z / 1e-3)
    assert torch.equal(hot, torch.nn.functional.one_hot(z.argmax(-1), 4).to(hot.dtype))
    flat = sparsemax(z / 1e4)
    assert torch.allclose(flat, torch.full_like(flat, 0.25), atol=1e-3)
    assert (flat > 0).all()
    # Lowering the temperature never adds ops to the support.
    sizes = [int((sparsemax(z[0] / t) > 0).sum()) for t in (10.0, 1.0, 0.1, 0.01)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 4 and sizes[-1] == 1


def test_temperature_schedule():
    assert [temperature(e) for e in (0, 4, 5, 9, 10, 49)] == [1.5, 1.5, 1.125, 1.125, 0.84375, 1.5 * 0.75 ** 9]
    assert temperature(7, tau0=2.0, factor=0.5, every=2) == 0.25
    assert temperature(100, factor=1.0) == 1.5
    assert temperature(3, every=1) == 1.5 * 0.75 ** 3  # every epoch: the smallest period allowed
    with pytest.raises(ValueError, match='temperature: every must be >= 1 epoch, got 0'):
        temperature(3, every=0)
    with pytest.raises(ValueError, match='temperature: epoch must be >= 0, got -1'):
        temperature(-1)


def test_bad_inputs():
    with pytest.raises(TypeError, match='sparsemax needs a floating-point tensor, got torch.int64'):
        sparsemax(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r'sparsemax needs at least one element along dim -1, got shape \(3, 0\)'):
        sparsemax(torch.zeros(3, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    z = torch.randn(64, 9, generator=torch.Generator().manual_seed(5), dtype=dtype)
    v = torch.randn(64, 9, generator=torch.Generator().manual_seed(6), dtype=dtype)
    grads = []
    for device in ('cpu', 'cuda'):
        x = z.clone().to(device).requires_grad_()  # a fresh leaf on each device
        p = sparsemax(x, dim=1)
        (p * v.to(device)).sum().backward()
        grads.append((p.detach().cpu(), x.grad.cpu()))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(grads[0][0], grads[1][0], atol=tol)
    assert torch.allclose(grads[0][1], grads[1][1], atol=tol)
