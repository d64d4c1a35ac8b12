"""ZO-DARTS+ zeroth-order hypergradient: directions, the estimate, the twin trajectory, and search runs."""
import copy
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import write_cube_set
from torch import nn
from torch.func import functional_call

import engine
import genotypes
import train_search
import zo
from model_search import SearchNetwork

PRIMS = ['max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3']
# As in test_search.py: 8 search-train nodules, batch 3 -> 3 weight steps per epoch; ZO_T=2 so that a period
# (and the twin trajectory) spans the end of epoch 0.
TINY = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
            PRIMITIVES=tuple(PRIMS), EPOCHS=2, WARMUP_EPOCHS=0, SEED=3, HYPERGRAD='zeroth', WEIGHTS='sparsemax',
            ZO_T=2, FIGURES=False)


def test_random_direction_is_unit_and_shaped():
    shapes = [(14, 3), (14, 3), (14,), (14,)]
    g = torch.Generator().manual_seed(0)
    parts, flat = zo.random_direction(shapes, gen=g)
    assert [tuple(p.shape) for p in parts] == shapes
    assert torch.equal(torch.cat([p.flatten() for p in parts]), flat)
    assert float(flat.norm()) == pytest.approx(1.0, abs=1e-6)
    parts64, _ = zo.random_direction(shapes, gen=g, dtype=torch.float64)
    assert parts64[0].dtype == torch.float64
    # Uniform on the sphere: E[u] = 0 and E[u u^T] = I / d.
    u = torch.stack([zo.random_direction([(5,)], gen=g, dtype=torch.float64)[1] for _ in range(4000)])
    assert u.mean(0).abs().max() < 0.03
    assert torch.allclose(u.T @ u / len(u), torch.eye(5, dtype=torch.float64) / 5, atol=0.02)


def test_estimate_worked_example():
    g_arch = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    u = [torch.tensor([0.6, 0.0]), torch.tensor([0.8])]
    g_w, w, w_twin = [torch.tensor([1.0, -1.0])], [torch.tensor([0.0, 0.0])], [torch.tensor([0.02, 0.01])]
    # g_a . u = 0.6 + 2.4 = 3; g_w . (w_twin - w) / mu = (0.02 - 0.01) / 0.01 = 1; h = 4 u
    h = zo.estimate(g_arch, g_w, w, w_twin, u, mu=0.01)
    assert torch.allclose(h[0], torch.tensor([2.4, 0.0])) and torch.allclose(h[1], torch.tensor([3.2]))


class Toy(nn.Module):
    """logits = W (x * sigmoid(alpha)) + b + beta: weights W, b; architecture alpha (4,), beta (2,)."""
    ARCH_NAMES = ('alpha', 'beta')

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.alpha = nn.Parameter(torch.tensor([0.5, -1.0, 1.5, 0.2]))
        self.beta = nn.Parameter(torch.tensor([0.3, -0.4]))

    def arch_parameters(self):
        return [self.alpha, self.beta]

    def weight_parameters(self):
        return list(self.lin.parameters())

    def forward(self, x):
        return self.lin(x * torch.sigmoid(self.alpha)) + self.beta


class FixedStream:
    def __init__(self, x, y):
        self.batch = (x, y)

    def next(self):
        return self.batch


LR, MOMENTUM, WD, T = 0.5, 0.9, 0.01, 5


def toy_problem():
    torch.manual_seed(0)
    model = Toy().double()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(T, 8, 4, generator=g, dtype=torch.float64)
    ys = (xs[:, :, 0] + xs[:, :, 2] > 0).long()
    xv = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return model, xs, ys, xv, (xv[:, 0] + xv[:, 2] > 0).long()


def true_hypergradient(model, xs, ys, xv, yv):
    """d/d arch of L_val(w_T(arch), arch), differentiating through T unrolled SGD steps (momentum, weight decay)."""
    arch = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if n in Toy.ARCH_NAMES}
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if n not in Toy.ARCH_NAMES}
    bufs = {}
    for x, y in zip(xs, ys):
        loss = F.cross_entropy(functional_call(model, {**w, **arch}, (x,)), y)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        for (n, p), g in zip(list(w.items()), grads):
            d = g + WD * p
            bufs[n] = d if n not in bufs else MOMENTUM * bufs[n] + d  # torch SGD: the first buffer is d itself
            w[n] = p - LR * bufs[n]
    loss = F.cross_entropy(functional_call(model, {**w, **arch}, (xv,)), yv)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(arch.values()))])


def test_zeroth_order_estimate_points_along_the_true_hypergradient(monkeypatch):
    model, xs, ys, xv, yv = toy_problem()
    truth = true_hypergradient(model, xs, ys, xv, yv)
    start = copy.deepcopy(model.state_dict())
    directions = []
    draw = zo.random_direction

    def recording(*args, **kwargs):
        parts, flat = draw(*args, **kwargs)
        directions.append(flat)
        return parts, flat
    monkeypatch.setattr(zo, 'random_direction', recording)
    torch.manual_seed(0)
    estimates = []
    for _ in range(300):
        model.load_state_dict(start)  # every trial starts from the same weights, alpha and (empty) momentum
        w_opt = torch.optim.SGD(model.weight_parameters(), LR, momentum=MOMENTUM, weight_decay=WD)
        a_opt = torch.optim.SGD(model.arch_parameters(), lr=0.0)  # keeps alpha; the estimate stays in .grad
        updater = zo.ZerothOrder(model, w_opt, a_opt, T, mu_rel=1e-4, grad_clip=1e9)
        for x, y in zip(xs, ys):
            updater.weight_step(x, y, True, FixedStream(xv, yv))
        estimates.append(torch.cat([p.grad.flatten() for p in model.arch_parameters()]))
    # Each estimate is (u . g) u up to O(mu): its directional derivative matches the true one ...
    for u, h in zip(directions, estimates):
        assert float(h @ u) == pytest.approx(float(u @ truth), abs=1e-4 * float(truth.norm()))
    # ... and on average, E[u u^T] = I/d makes it point along the true hypergradient (magnitude 1/d).
    mean = torch.stack(estimates).mean(0)
    assert float(F.cosine_similarity(mean, truth, dim=0)) > 0.95


def tiny_supernet():
    torch.manual_seed(0)
    net = SearchNetwork(4, 2, 3, PRIMS)
    w_opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    engine.train_step(net, w_opt, *batches(1, seed=9)[0], net.weight_parameters(), 5.0)  # momentum buffers exist
    return net, w_opt


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 1, 8, 8, 8, generator=g), torch.tensor([0, 1, 1])) for _ in range(n)]


def test_twin_without_perturbation_follows_the_weights_exactly(monkeypatch):
    net, w_opt = tiny_supernet()
    monkeypatch.setattr(zo, 'random_direction', lambda shapes, **kw: ([torch.zeros(s) for s in shapes], None))
    updater = zo.ZerothOrder(net, w_opt, torch.optim.Adam(net.arch_parameters()), T=10, mu_rel=0.005,
                             grad_clip=0.5)  # a clip that acts
    for i, (x, y) in enumerate(batches(3)):
        if i == 2:
            w_opt.param_groups[0]['lr'] = 0.03  # the twin takes the weight optimizer's current rate
        updater.weight_step(x, y, True, None)
        for n, p, t in zip(updater.w_names, updater.params, updater.twin['weights']):
            assert torch.equal(p, t), (i, n)


def test_recomputed_cells_give_the_same_twin_trajectory():
    """checkpoint_cells under the twin's functional_call (its weights and alpha + mu u are not the module's when
    backward recomputes a cell): the same twin weights, and the same BatchNorm statistics, twin's and real."""
    twins = []
    for on in (False, True):
        net, w_opt = tiny_supernet()
        net.checkpoint_cells = on
        torch.manual_seed(3)  # the same direction u
        updater = zo.ZerothOrder(net, w_opt, torch.optim.Adam(net.arch_parameters()), T=10, mu_rel=0.5,
                                 grad_clip=5.0)
        for x, y in batches(3):
            updater.weight_step(x, y, True, None)
        twins.append(([w.detach().clone() for w in updater.twin['weights']], updater.twin['buffers'],
                      net.state_dict()))
    (weights_off, buffers_off, net_off), (weights_on, buffers_on, net_on) = twins
    assert all(torch.equal(a, b) for a, b in zip(weights_off, weights_on))
    for off, on in ((buffers_off, buffers_on), (net_off, net_on)):  # BatchNorm statistics, twin's and real
        assert off.keys() == on.keys() and all(torch.equal(off[n], on[n]) for n in off)


def test_weights_follow_plain_sgd_while_the_twin_runs():
    """The twin's updates must not leak into the real weights or their momentum (e.g. through shared buffers)."""
    net, w_opt = tiny_supernet()
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD(ref.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    ref_opt.load_state_dict(copy.deepcopy(w_opt.state_dict()))
    updater = zo.ZerothOrder(net, w_opt, torch.optim.Adam(net.arch_parameters()), T=10, mu_rel=0.005,
                             grad_clip=5.0)
    for x, y in batches(3):
        updater.weight_step(x, y, True, None)
        engine.train_step(ref, ref_opt, x, y, ref.weight_parameters(), 5.0)
    assert updater.twin is not None and updater.count == 3
    for (n, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n
    # The architecture step then changes alphas/betas only (not weights, not BN running statistics).
    before = copy.deepcopy(net.state_dict())
    updater.arch_step(*batches(1, seed=5)[0])
    for n, t in net.state_dict().items():
        assert torch.equal(t, before[n]) != (n in net.ARCH_NAMES), n


def test_architecture_step_every_T_weight_steps_after_warmup(monkeypatch):
    model, xs, ys, xv, yv = toy_problem()
    w_opt = torch.optim.SGD(model.weight_parameters(), LR, momentum=MOMENTUM)
    updater = zo.ZerothOrder(model, w_opt, torch.optim.Adam(model.arch_parameters()), T=2, mu_rel=1e-3,
                             grad_clip=5.0)
    log = []
    monkeypatch.setattr(updater, 'arch_step', lambda *a: log.append('a'))
    for i in range(8):
        log.append('w')
        updater.weight_step(xs[i % T], ys[i % T], i >= 3, FixedStream(xv, yv))  # warm-up: steps 0-2
    assert ''.join(log) == 'www' + 'wwa' + 'wwa' + 'w'
    assert updater.twin is not None and updater.count == 1


def record_steps(monkeypatch, log):
    weight_step, arch_step = zo.ZerothOrder.weight_step, zo.ZerothOrder.arch_step

    def counted_weight_step(self, *args):
        log.append('w')
        return weight_step(self, *args)

    def counted_arch_step(self, *args):
        log.append('a')
        return arch_step(self, *args)
    monkeypatch.setattr(zo.ZerothOrder, 'weight_step', counted_weight_step)
    monkeypatch.setattr(zo.ZerothOrder, 'arch_step', counted_arch_step)


@pytest.fixture(scope='module')
def search_set(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('data') / 'cubes')


@pytest.fixture(scope='module')
def zo_run(search_set, tmp_path_factory):
    log = []
    with pytest.MonkeyPatch.context() as m:
        record_steps(m, log)
        result = train_search.main(DATA=search_set, RUNS=str(tmp_path_factory.mktemp('runs')), **TINY)
    return result, ''.join(log)


def test_zeroth_order_sparsemax_search_end_to_end(zo_run):
    result, log = zo_run
    # 3 weight steps per epoch, ZO_T=2: the second period straddles the epochs.
    assert log == 'wwaw' + 'wawwa'
    run = result['run']
    assert genotypes.get_genotype(os.path.join(run, 'genotype.json')) == result['genotype']
    weights = pd.read_csv(os.path.join(run, 'weights.csv'))
    sums = weights.groupby(['epoch', 'cell', 'edge'])['weight'].sum()
    assert len(sums) == 2 * 2 * 14 and ((sums - 1).abs() < 1e-5).all()  # sparsemax rows lie on the simplex


class Interrupted(Exception):
    pass


def test_zeroth_order_resume_equals_uninterrupted_run(zo_run, search_set, tmp_path, monkeypatch):
    result, _ = zo_run
    original = train_search.search_epoch

    def search_epoch(epoch, *args):
        if epoch == 1:
            raise Interrupted
        return original(epoch, *args)
    with monkeypatch.context() as m:
        m.setattr(train_search, 'search_epoch', search_epoch)
        with pytest.raises(Interrupted):
            train_search.main(DATA=search_set, RUNS=str(tmp_path), **TINY)
    (folder,) = os.listdir(tmp_path)
    folder = os.path.join(tmp_path, folder)
    saved = torch.load(os.path.join(folder, 'last.pt'), weights_only=False)
    assert saved['updater']['count'] == 1 and saved['updater']['twin'] is not None  # mid-period checkpoint
    resumed = train_search.main(RESUME=folder, DEVICE='cpu')
    assert resumed['genotype'] == result['genotype']
    a = torch.load(os.path.join(folder, 'last.pt'), weights_only=False)
    b = torch.load(os.path.join(result['run'], 'last.pt'), weights_only=False)
    for name in b['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    for sa, sb in zip(a['a_opt']['state'].values(), b['a_opt']['state'].values()):
        assert torch.equal(sa['exp_avg'], sb['exp_avg']) and torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])
