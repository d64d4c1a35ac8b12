"""Exact second-order hypergradients (HVP='exact'): the Hessian-vector product by double backward, against an
independent forward-over-reverse reference, with recomputed cells, under autocast and through the Triton
depthwise kernels; the full hypergradient against autograd through the virtual step; bench.py --BENCH=hypergrad.
"""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp
from torch.nn.modules.batchnorm import _BatchNorm

import bench
import dwconv3d
import engine
import train_search
from architect import Architect, keep_buffers
from model_search import SearchNetwork, zero_one_loss
from utils import UserError

PRIMS = ['max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3']
HAVE_TRITON = importlib.util.find_spec('triton') is not None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepared(dtype=torch.float64, hvp='exact', seed=0, lr=0.1, momentum=0.9, wd=0.05):
    """A tiny supernet after one weight step (so momentum buffers exist) and its architect."""
    torch.manual_seed(seed)
    net = SearchNetwork(4, 2, 3, PRIMS).to(dtype)
    w_opt = torch.optim.SGD(net.weight_parameters(), lr, momentum=momentum, weight_decay=wd)
    a_opt = torch.optim.Adam(net.arch_parameters(), 1e-2, betas=(0.5, 0.999), weight_decay=1e-3)
    engine.train_step(net, w_opt, *batch(seed=5, dtype=dtype), net.weight_parameters(), 5.0)
    return net, w_opt, Architect(net, w_opt, a_opt, 'second', 'l2', 10.0, hvp=hvp)


def batch(n=3, size=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, size, generator=g, dtype=dtype), torch.arange(n) % 2


def random_v(net, arch, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    params = dict(net.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g, dtype=dtype) for n in arch.w_names}


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def rel_err(a, b):
    a, b = flat(a).double(), flat(b).double()
    return float((a - b).norm() / b.norm())


def forward_over_reverse(net, v, x, y):
    """d/dt grad_alpha L_train(w + t v, alpha) at t = 0 by torch.func (jvp of grad): the same mixed derivative as
    the architect's double backward, by another route. BatchNorm in train mode on batch statistics, untracked."""
    ref = copy.deepcopy(net)
    ref.checkpoint_cells = ref.amp = False  # torch.func cannot trace through checkpoint's saved-tensor hooks
    for m in ref.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
    arch = {n: p.detach() for n, p in ref.named_parameters() if n in ref.ARCH_NAMES}
    w = {n: p.detach() for n, p in ref.named_parameters() if n not in ref.ARCH_NAMES}

    def grad_arch(weights):
        return grad(lambda a: F.cross_entropy(functional_call(ref, {**a, **weights}, (x,)), y))(arch)
    _, out = jvp(grad_arch, (w,), ({n: v[n] for n in w},))
    return [out[n] for n in ref.ARCH_NAMES]


@pytest.mark.parametrize('checkpoint_cells', [False, True])
def test_exact_hvp_equals_forward_over_reverse(checkpoint_cells):
    net, _, arch = prepared()
    net.checkpoint_cells = checkpoint_cells
    x, y = batch(seed=2)
    v = random_v(net, arch)
    before = copy.deepcopy(net.state_dict())
    with keep_buffers(net):
        got = arch.exact_hessian_vector_product(v, x, y)
    want = forward_over_reverse(net, v, x, y)
    assert rel_err(got, want) < 1e-10
    assert all(torch.equal(t, before[n]) for n, t in net.state_dict().items())  # nor weights, nor BN statistics
    # DARTS' finite difference at its radius crosses ReLU / max-pool kinks on this net: far from exact
    with keep_buffers(net):
        assert rel_err(arch.hessian_vector_product(v, x, y, 1e-2), want) > 0.1


def test_exact_hvp_under_autocast_is_taken_in_fp32():
    net, _, arch = prepared(dtype=torch.float32)
    x, y = batch(seed=2, dtype=torch.float32)
    v = random_v(net, arch, dtype=torch.float32)
    with keep_buffers(net):
        fp32 = arch.exact_hessian_vector_product(v, x, y)
    net.amp = True
    modes = []
    hook = net.register_forward_pre_hook(lambda m, i: modes.append(m.amp))
    with keep_buffers(net):
        amp = arch.exact_hessian_vector_product(v, x, y)
    hook.remove()
    assert modes == [False] and net.amp  # autocast off inside the product, restored after
    assert all(g.dtype == torch.float32 for g in amp)
    assert rel_err(amp, fp32) < 1e-6
    net64 = copy.deepcopy(net).double()
    assert rel_err(amp, forward_over_reverse(net64, {n: t.double() for n, t in v.items()}, x.double(), y)) < 1e-4


def test_exact_second_order_hypergradient_equals_autograd_through_the_virtual_step():
    """d/d alpha L_val(w - eta (grad_w L_train(w, alpha) + wd w + momentum buf), alpha), differentiated by autograd
    through the virtual step (float64), equals the architect's dL_val/d alpha - eta H v with the exact product."""
    net, w_opt, arch = prepared(wd=0.05)
    xt, yt = batch(seed=1)
    xv, yv = batch(seed=2)
    eta = 0.5
    with keep_buffers(net):
        loss, got = arch.second_order_grads(xt, yt, xv, yv, eta)

    alphas = net.arch_parameters()
    params = dict(net.named_parameters())
    with keep_buffers(net):
        w = [params[n] for n in arch.w_names]
        g = torch.autograd.grad(F.cross_entropy(net(xt), yt), w, create_graph=True)  # depends on alpha
        virtual = {n: p - eta * (gi + 0.05 * p + 0.9 * w_opt.state[p]['momentum_buffer'])
                   for n, p, gi in zip(arch.w_names, w, g)}
        val = F.cross_entropy(functional_call(net, virtual, (xv,)), yv) + 10 * zero_one_loss(net, 'l2')
        want = torch.autograd.grad(val, alphas)
    assert float(loss.detach()) == pytest.approx(float(val.detach()), rel=1e-12)
    assert all(w_opt.state[p]['momentum_buffer'].abs().sum() > 0 for p in w)
    assert rel_err(got, want) < 1e-10
    direct = torch.autograd.grad(arch.arch_loss(functional_call(net, {n: t.detach() for n, t in virtual.items()},
                                                                (xv,)), yv), alphas)
    assert rel_err(direct, want) > 1e-3  # the implicit term matters at this eta: the check above can fail


@pytest.mark.parametrize('checkpoint_cells', [False, True])
def test_exact_architecture_step_changes_only_alphas_and_betas(checkpoint_cells):
    net, w_opt, arch = prepared(dtype=torch.float32)
    net.checkpoint_cells = checkpoint_cells
    before = copy.deepcopy(net.state_dict())
    opt_before = copy.deepcopy(w_opt.state_dict())
    arch.step(*batch(seed=1, dtype=torch.float32), *batch(seed=2, dtype=torch.float32), eta=0.1)
    for name, t in net.state_dict().items():
        # alphas/betas move; weights and BatchNorm running statistics (and batch counts) do not
        assert torch.equal(t, before[name]) != (name in net.ARCH_NAMES), name
    for k, s in opt_before['state'].items():
        assert torch.equal(w_opt.state_dict()['state'][k]['momentum_buffer'], s['momentum_buffer'])
    assert all(not m.training or m.track_running_stats for m in net.modules() if isinstance(m, _BatchNorm))


def test_unknown_hvp_is_a_user_error(tmp_path):
    net, w_opt, _ = prepared()
    with pytest.raises(UserError, match="HVP 'exactly'.*fd, exact"):
        Architect(net, w_opt, torch.optim.Adam(net.arch_parameters()), hvp='exactly')
    cfg = {**train_search.DEFAULTS, 'DEVICE': 'cpu', 'C': 4, 'LAYERS': 3, 'PRIMITIVES': tuple(PRIMS), 'CUBE': 8,
           'HVP': 'exactly'}
    with pytest.raises(UserError, match="HVP 'exactly'"):
        train_search.build(cfg)
    assert train_search.build({**cfg, 'HVP': 'exact'})[-1].hvp == 'exact'


# ---------------------------------------------------------------- the Triton depthwise Function, twice differentiated

def torch_launchers(monkeypatch):
    """Replace the three Triton launchers by torch's convolution and its gradients (float64 on CPU), computed
    without a graph like the kernels: any differentiability must come from the autograd Functions around them."""
    def pad(k, dilation):
        return dilation * (k - 1) // 2

    def forward(x, w, stride=1, dilation=1):
        return F.conv3d(x, w, stride=stride, padding=pad(w.shape[-1], dilation), dilation=dilation, groups=x.shape[1])

    def grad_input(gy, w, x_shape, stride=1, dilation=1):
        return torch.nn.grad.conv3d_input(x_shape, w, gy, stride, pad(w.shape[-1], dilation), dilation, x_shape[1])

    def grad_weight(x, gy, k, stride=1, dilation=1):
        return torch.nn.grad.conv3d_weight(x, (x.shape[1], 1, k, k, k), gy, stride, pad(k, dilation), dilation,
                                           x.shape[1])
    for name, fn in (('dwconv3d_forward', forward), ('dwconv3d_grad_input', grad_input),
                     ('dwconv3d_grad_weight', grad_weight)):
        monkeypatch.setattr(dwconv3d, name, torch.no_grad()(fn))


@pytest.mark.parametrize('k,stride,dilation', [(3, 2, 1), (5, 1, 2)])
def test_depthwise_function_backward_is_differentiable(monkeypatch, k, stride, dilation):
    """The autograd structure of the fast path (its backward expressed through its own launchers, which are
    differentiable again), with the launchers computed by torch: second derivatives by gradcheck, also w.r.t. the
    incoming gradient."""
    torch_launchers(monkeypatch)
    g = torch.Generator().manual_seed(k + stride + dilation)
    x = torch.randn(1, 2, 4, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, k, k, k, generator=g, dtype=torch.float64, requires_grad=True)

    def conv(x, w):
        return dwconv3d._DepthwiseConv3dFunction.apply(x, w, stride, dilation)
    assert torch.autograd.gradgradcheck(conv, (x, w))
    y = conv(x, w)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64, requires_grad=True)

    def first(x, w, gy):  # the backward as a function of all three: its own gradient is checked numerically
        return torch.autograd.grad(conv(x, w), (x, w), gy, create_graph=True)
    assert torch.autograd.gradcheck(first, (x, w, gy))


def _double_backward(cases, device='cpu'):
    """{name: d/d(x, w, gy) of <grad_x, a> + <grad_w, b>} through the Triton kernels (interpreter or CUDA)."""
    out = {}
    for name, (x, w, gy, a, b, stride, dilation) in cases.items():
        x, w, gy = (t.to(device).clone().requires_grad_() for t in (x, w, gy))
        y = dwconv3d._DepthwiseConv3dFunction.apply(x, w, stride, dilation)
        gx, gw = torch.autograd.grad(y, (x, w), gy, create_graph=True)
        out[name] = tuple(g.cpu() for g in torch.autograd.grad((gx * a.to(device)).sum() + (gw * b.to(device)).sum(),
                                                               (x, w, gy)))
    return out


def _double_backward_child(path):
    """In a TRITON_INTERPRET=1 child: _double_backward of the saved cases."""
    torch.save(_double_backward(torch.load(path)), path + '.out')


def _twice_cases():
    cases = {}
    g = torch.Generator().manual_seed(0)
    for k, stride, dilation, c in ((3, 2, 1, 2), (5, 1, 2, 1)):
        x = torch.randn(1, c, 5, 5, 5, generator=g)
        w = torch.randn(c, 1, k, k, k, generator=g)
        n = (5 - 1) // stride + 1
        gy, a, b = torch.randn(1, c, n, n, n, generator=g), torch.randn_like(x), torch.randn_like(w)
        cases[f'k{k}s{stride}d{dilation}'] = (x, w, gy, a, b, stride, dilation)
    return cases


def _check_twice(cases, results):
    """results (from _double_backward) against float64 conv3d double backward."""
    for name, (x, w, gy, a, b, stride, dilation) in cases.items():
        x64, w64, gy64 = (t.double().requires_grad_() for t in (x, w, gy))
        k = w.shape[-1]
        y = F.conv3d(x64, w64, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation, groups=x.shape[1])
        gx, gw = torch.autograd.grad(y, (x64, w64), gy64, create_graph=True)
        want = torch.autograd.grad((gx * a.double()).sum() + (gw * b.double()).sum(), (x64, w64, gy64))
        for got, ref in zip(results[name], want):
            assert got.shape == ref.shape
            assert float((got.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), name


@pytest.mark.skipif(not HAVE_TRITON, reason='triton is not installed')
def test_triton_kernels_twice_differentiated_match_conv3d(tmp_path):
    """The real kernels (Triton interpreter, child process as in test_dwconv3d.py): d/d(x, w, gy) of
    <grad_x, a> + <grad_w, b> against float64 conv3d double backward."""
    cases = _twice_cases()
    path = str(tmp_path / 'cases.pt')
    torch.save(cases, path)
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, (REPO, os.environ.get('PYTHONPATH')))))  # (a side-folder triton)
    child = subprocess.run([sys.executable, os.path.abspath(__file__), path], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    _check_twice(cases, torch.load(path + '.out'))


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason='needs CUDA and triton')
def test_triton_kernels_twice_differentiated_on_cuda():
    """The same check with the compiled kernels on CUDA tensors (where the GPU machine runs them)."""
    cases = _twice_cases()
    _check_twice(cases, _double_backward(cases, 'cuda'))


# ---------------------------------------------------------------- bench.py --BENCH=hypergrad

def test_hypergrad_benchmark_runs_on_cpu(capsys):
    out = bench.main(BENCH='hypergrad', DEVICE='cpu', HG_PRIMITIVES=tuple(PRIMS), HG_C=4, HG_LAYERS=3, HG_CUBE=8,
                     HG_BATCH=2, HG_SEEDS=1, HG_BATCHES=1, HG_RADII=(1e-2, 1e-7), HG_MUS=(5e-3, 1e-7),
                     HG_DIRECTIONS=(1, 3), HG_ZO_T=2, HG_WARMUP_STEPS=2, HG_TIME_STEPS=1)['hypergrad']
    rows = {r['estimator']: r for r in out}
    assert list(rows) == ['first order', 'fd r=0.01', 'fd r=1e-07', 'exact', 'zo mu=0.005 x1', 'zo mu=0.005 x3',
                          'zo mu=1e-07 x1', 'zo mu=1e-07 x3']
    assert rows['exact']['rel_err'] < 1e-10 and rows['exact']['cos'] == pytest.approx(1.0)
    assert rows['fd r=1e-07']['rel_err'] < 1e-4
    assert rows['exact']['hvp_err'] < 1e-10 and rows['fd r=1e-07']['hvp_err'] < 1e-4  # relative to eta H v
    assert rows['first order']['rel_err'] > 1e-3  # the implicit term is not negligible here
    # zeroth order at a tiny mu: each direction's derivative is exact; the estimate is its projection
    assert rows['zo mu=1e-07 x1']['dir_err'] < 1e-4 and rows['zo mu=1e-07 x3']['dir_err'] < 1e-4
    for r in out:
        assert r['n'] == 1 and r['ms'] > 0 and r['peak_mb'] >= 0
    text = capsys.readouterr().out
    assert '| exact |' in text and 'rel. error' in text


def test_hypergrad_benchmark_times_only_without_errors():
    """HG_ERRORS=False (the GPU measurement at the paper's size): one row per kind, timed with AMP and recomputed
    cells as the search would run them."""
    rows = bench.main(BENCH='hypergrad', DEVICE='cpu', HG_PRIMITIVES=tuple(PRIMS), HG_C=4, HG_LAYERS=3, HG_CUBE=8,
                      HG_BATCH=2, HG_ERRORS=False, HG_DIRECTIONS=(1,), HG_ZO_T=2, HG_WARMUP_STEPS=1, HG_TIME_STEPS=1,
                      AMP=True, HG_CHECKPOINT_CELLS=True)['hypergrad']
    assert [r['estimator'] for r in rows] == ['first order', 'fd', 'exact', 'zo x1']
    assert all(r['ms'] > 0 and r['n'] == 0 for r in rows)


if __name__ == '__main__':
    _double_backward_child(sys.argv[1])
