"""The search supernet, the zero-one loss, the first/second-order architect, and train_search end to end."""
import copy
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import write_cube_set
from torch.func import functional_call

import data
import engine
import genotypes
import train_search
from architect import Architect
from model_search import EdgeGroup, SearchCell, SearchNetwork, channel_shuffle, edge_index, zero_one_loss
from operations import make_op, parse_mbconv
from utils import UserError

PRIMS = ['max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3']  # cheap set: a pool (+BN), skip/FactorizedReduce, a conv
# Tiny search: folds 0-2 = 6 scans / 12 nodules; VAL_FRACTION 0.34 -> 2 val scans (4 nodules), 8 train nodules:
# 3 weight steps per epoch but 2 validation batches per pass, so an epoch ends mid-way through a val pass.
TINY = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
            PRIMITIVES=tuple(PRIMS), EPOCHS=2, WARMUP_EPOCHS=0, SEED=3, FIGURES=False)  # straight_run draws them


def tiny_net(prims=PRIMS, seed=0, C=4, **kw):
    torch.manual_seed(seed)
    return SearchNetwork(C, 2, 3, prims, **kw)


def batch(n=2, size=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, size, generator=g, dtype=dtype), torch.arange(n) % 2


# ---------------------------------------------------------------- edge groups, cells and channel shuffle

def load_edge(batched, ref, e):
    """Copy edge e's slice of a batched op's weights and BN statistics into the per-edge op `ref`."""
    state = batched.state_dict()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if t.dim():
                t.copy_(state[name][e * len(t):(e + 1) * len(t)])


@pytest.mark.parametrize('form', [(False, True), (True, False)], ids=['published', 'darts_form'])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('prims', [genotypes.PRIMITIVES, genotypes.DARTS_BASE_PRIMITIVES], ids=['paper', 'darts'])
def test_edge_group_equals_separate_ops_per_edge(prims, stride, form):
    """Edge e of a group = sum_o w[e, o] * make_op(o, C/k, stride) holding edge e's weights: outputs, BN
    statistics, and gradients w.r.t. the input, the op weights and every conv and BN weight. form: (reduce_shift,
    mbconv_affine), the published one (MBConv BatchNorms affine, the others not) or DARTS'."""
    torch.manual_seed(0)
    C, k, m, part = 8, 4, 3, 2
    reduce_shift, mbconv_affine = form
    group = EdgeGroup(C, stride, prims, k, m, reduce_shift, mbconv_affine)
    refs = []  # per edge: the per-edge ops (None for ops the group shares between edges)
    for e in range(m):
        ops = [make_op(name, part, stride, affine=mbconv_affine and parse_mbconv(name) is not None,
                       reduce_shift=reduce_shift) if i not in group.shared_cols else None
               for i, name in enumerate(prims)]
        for i, op in zip(group.batched_cols, group.batched):
            load_edge(op, ops[i], e)
        refs.append(ops)
    x = torch.randn(2, C, 8, 8, 8, requires_grad=True)
    w = torch.rand(m, len(prims), requires_grad=True)
    mixed, bypass = group(x, w[:, group.batched_cols], w[:, group.shared_cols])
    assert mixed.shape == (2, m, part) + (8 // stride,) * 3
    assert torch.equal(bypass, F.max_pool3d(x[:, part:], 2) if stride == 2 else x[:, part:])
    g = torch.randn_like(mixed)
    grads = torch.autograd.grad((mixed * g).sum(), [x, w] + [p for op in group.batched for p in op.parameters()])

    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = 0
    for e in range(m):
        out = 0
        for i in range(len(prims)):
            op = refs[e][i] if refs[e][i] is not None else group.shared[group.shared_cols.index(i)]
            out = out + w_ref[e, i] * op(x_ref[:, :part])
        assert torch.allclose(mixed[:, e], out, atol=1e-5), e
        loss = loss + (out * g[:, e]).sum()
    assert torch.allclose(grads[0], torch.autograd.grad(loss, x_ref, retain_graph=True)[0], atol=1e-5)
    assert torch.allclose(grads[1], torch.autograd.grad(loss, w_ref, retain_graph=True)[0], atol=1e-4)
    per_edge = [[list(refs[e][i].parameters()) for i in group.batched_cols] for e in range(m)]  # [edge][op][param]
    flat = [p for ops in per_edge for params in ops for p in params]
    ref_grads = dict(zip(flat, torch.autograd.grad(loss, flat)))
    got = iter(grads[2:])
    for j, op in enumerate(group.batched):  # a batched weight's gradient = its edges' gradients stacked
        for q, p in enumerate(op.parameters()):
            want = torch.cat([ref_grads[per_edge[e][j][q]] for e in range(m)])
            assert want.shape == p.shape and torch.allclose(next(got), want, atol=1e-4), (j, q)
    for e in range(m):  # BN statistics moved as if each edge had its own op
        for i, op in zip(group.batched_cols, group.batched):
            ref = refs[e][i].state_dict()
            for name, t in op.state_dict().items():
                if 'running' in name:
                    n = len(ref[name])
                    assert torch.allclose(t[e * n:(e + 1) * n], ref[name], atol=1e-6), name


@pytest.mark.parametrize('reduction', [False, True])
def test_search_cell_sums_each_node_over_its_edges(reduction):
    """node j = sum over states i <= j+1 of beta_ij * shuffle(cat(sum_o w_ijo op_o(h_i[:, :C/k]), bypass of h_i)),
    edges numbered node by node (node j's from offset 2 + 3 + ... on, as derive_cell reads them); ops with weights
    (per-edge copies loaded from the group) and shared ones (pools, identity) mixed."""
    torch.manual_seed(0)
    C, k, part = 8, 4, 2
    prims = ['avg_pool_3x3x3', 'sep_conv_3x3x3', 'skip_connect', 'MBConv_3x3x3_2']
    cell = SearchCell(4, 4, C, C, C, reduction, False, prims, k)
    s0, s1 = torch.randn(2, C, 8, 8, 8), torch.randn(2, C, 8, 8, 8)
    weights, betas = torch.randn(14, len(prims)), torch.randn(14)
    out = cell(s0, s1, weights, betas)
    states, offset = [cell.preprocess0(s0), cell.preprocess1(s1)], 0
    for j in range(4):
        node = 0
        for i in range(j + 2):
            h, group, e = states[i], cell.groups[i], offset + i
            ops = 0
            for c, name in enumerate(prims):
                if c in group.shared_cols:
                    op = group.shared[group.shared_cols.index(c)]
                else:  # edge (i, j) is the group's (j - first node it feeds)-th edge
                    op = make_op(name, part, group.stride, affine=False)
                    load_edge(group.batched[group.batched_cols.index(c)], op, j - max(0, i - 1))
                ops = ops + weights[e, c] * op(h[:, :part])
            rest = F.max_pool3d(h[:, part:], 2) if group.stride == 2 else h[:, part:]
            node = node + betas[e] * channel_shuffle(torch.cat([ops, rest], 1), k)
        states.append(node)
        offset += 2 + j
    assert [g.stride for g in cell.groups] == ([2, 2, 1, 1, 1] if reduction else [1] * 5)
    assert [g.edges for g in cell.groups] == [4, 4, 3, 2, 1]
    # skip_connect is shared (identity) at stride 1 and a batched FactorizedReduce at stride 2
    assert [len(g.batched_cols) for g in cell.groups] == ([3, 3, 2, 2, 2] if reduction else [2] * 5)
    assert all(edge_index(i, j) == j * (j + 3) // 2 + i for j in range(4) for i in range(j + 2))
    assert torch.allclose(out, torch.cat(states[2:], 1), atol=1e-5)


def test_channel_shuffle_is_an_interleaving_permutation():
    x = torch.arange(8.0).view(1, 8, 1, 1, 1).expand(2, 8, 3, 3, 3).contiguous()
    out = channel_shuffle(x, 4)
    # 4 groups of 2 channels: output channel i takes group i % 4, member i // 4.
    assert out[0, :, 0, 0, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(channel_shuffle(out, 2), x)  # shuffling with C/groups groups undoes it
    y = torch.randn(2, 12, 2, 2, 2)
    assert torch.equal(channel_shuffle(channel_shuffle(y, 4), 3), y)


# ---------------------------------------------------------------- supernet

@pytest.fixture(scope='module')
def full_net():
    # C=8: 2 channels per candidate op. With 1 (C=4) a 1x1x1 conv followed by BN(affine=False) is a no-op up to
    # sign, so its weight would get an exactly zero gradient whatever the code does.
    return tiny_net(genotypes.PRIMITIVES, C=8)


def test_logits_shape_and_arch_parameters_in_state_dict(full_net):
    x, _ = batch(2, 16)
    assert full_net(x).shape == (2, 2)
    assert [c.reduction for c in full_net.cells] == [False, True, True]
    sd = full_net.state_dict()
    n_ops = len(genotypes.PRIMITIVES)
    for name, shape in [('alphas_normal', (14, n_ops)), ('alphas_reduce', (14, n_ops)),
                        ('betas_normal', (14,)), ('betas_reduce', (14,))]:
        p = getattr(full_net, name)
        assert isinstance(p, torch.nn.Parameter) and p.shape == shape and name in sd
    arch_ids = {id(p) for p in full_net.arch_parameters()}
    assert not arch_ids & {id(p) for p in full_net.weight_parameters()}
    assert len(arch_ids) + len(full_net.weight_parameters()) == len(list(full_net.parameters()))
    other = tiny_net(genotypes.PRIMITIVES, seed=1, C=8)
    other.load_state_dict(sd)
    assert torch.equal(other.alphas_reduce, full_net.alphas_reduce)


def test_supernet_weight_parameter_count_at_the_published_defaults():
    # C=16, 8 cells, the paper's 9 candidates: the published code's count, whose MBConv BatchNorms are affine
    # (44,800 scales and shifts more than the DARTS form)
    def count(**form):
        with torch.device('meta'):
            return sum(p.numel() for p in SearchNetwork(16, 2, 8, genotypes.mrfc(), k=4, **form).weight_parameters())
    assert count() == 2_248_786
    assert count(reduce_shift=True, mbconv_affine=False) == 2_203_986


def test_checkpoint_of_another_layout_is_a_user_error(tmp_path):
    """Resuming with a checkpoint whose supernet has other layers (another candidate set, an older version) names
    the file and what does not fit."""
    path = str(tmp_path / 'state.pt')
    gen = torch.Generator()
    engine.save_state(path, 0, {}, gen, {'model': tiny_net()})
    engine.load_state(path, gen, {'model': tiny_net()})  # the same layout loads
    with pytest.raises(UserError, match=r'state\.pt: its model does not fit this code .*start a new run'):
        engine.load_state(path, gen, {'model': tiny_net(genotypes.PRIMITIVES)})
    model = tiny_net()

    def out_of_memory(state):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory')
    model.load_state_dict = out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not a layout problem: the run stays resumable
        engine.load_state(path, gen, {'model': model})


def test_every_parameter_gets_gradient_from_validation_objective(full_net):
    x, y = batch(2, 16)
    full_net.zero_grad()
    F.cross_entropy(full_net(x), y).backward()
    for name, p in full_net.named_parameters():  # cross-entropy alone reaches every weight, alpha and beta
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ce_grads = [p.grad.clone() for p in full_net.arch_parameters()]
    full_net.zero_grad()
    (F.cross_entropy(full_net(x), y) + 10 * zero_one_loss(full_net, 'l2')).backward()
    for p, g in zip(full_net.arch_parameters(), ce_grads):
        assert not torch.allclose(p.grad, g)  # the zero-one term adds to every arch gradient


def test_op_weightings():
    n_ops = len(PRIMS)
    spread = torch.linspace(-3, 3, 14 * n_ops).view(14, n_ops)
    w = tiny_net(weighting='sigmoid').op_weights(spread)
    assert w.shape == (14, n_ops) and torch.allclose(w, torch.sigmoid(spread))
    w = tiny_net(weighting='softmax').op_weights(spread)
    assert w.shape == (14, n_ops) and (w > 0).all() and torch.allclose(w.sum(1), torch.ones(14))
    net = tiny_net(weighting='sparsemax')
    net.tau = 0.1
    w = net.op_weights(spread)
    assert w.shape == (14, n_ops) and torch.allclose(w.sum(1), torch.ones(14)) and (w >= 0).all()
    assert (w == 0).sum(1).min() == n_ops - 1  # low temperature: one op per edge
    net.tau = 100.0
    assert (net.op_weights(spread) > 0).all()  # high temperature: dense
    with pytest.raises(UserError, match='softermax.*sparsemax'):
        tiny_net(weighting='softermax')


def test_edge_weights_off_ignores_betas():
    x, _ = batch(2, 8)
    for on in (True, False):
        net = tiny_net(edge_weights=on).eval()
        before = net(x)
        assert torch.equal(net.edge_weights(net.betas_normal), torch.sigmoid(net.betas_normal) if on
                           else torch.ones(14))
        with torch.no_grad():
            net.betas_normal.fill_(-4.0)
            net.betas_reduce.fill_(3.0)
        assert torch.equal(net(x), before) != on


def test_genotype_follows_the_derivation_rule():
    """W = sigmoid(alpha) sigmoid(beta); per node the 2 edges with the largest max-op W, argmax op."""
    net = tiny_net()
    mp, sk, sc = range(3)  # columns of PRIMS
    a = torch.full((14, 3), -5.0)
    b = torch.zeros(14)
    # node 0 (edges 0-1, from states 0-1)
    a[0, sc], a[1, sk] = 3.0, 2.0
    # node 1 (edges 2-4, states 0-2): edge 2 has the largest alpha but its beta shuts it off
    a[2, mp], b[2] = 4.0, -6.0
    a[3, sk], a[4, sc] = 1.0, 0.0
    # node 2 (edges 5-8, states 0-3): beta reorders: edge 8 (alpha 0, beta 5) beats edge 5 (alpha 2.5, beta -1)
    a[5, sk], b[5] = 2.5, -1.0
    a[6, sc] = 2.0
    a[8, mp], b[8] = 0.0, 5.0
    # node 3 (edges 9-13, states 0-4)
    a[9, mp], a[9, sc] = 1.0, 1.5
    a[13, sk] = 3.0
    ar = torch.full((14, 3), -5.0)
    for e, (op, strength) in enumerate([(mp, 1), (sk, 2), (sc, 2), (sk, 1), (mp, 1), (mp, 3), (sc, 2), (sk, 1),
                                        (mp, 1), (sc, 3), (sk, 1), (sk, 1), (mp, 2), (sc, 1)]):
        ar[e, op] = strength
    with torch.no_grad():
        net.alphas_normal.copy_(a)
        net.betas_normal.copy_(b)
        net.alphas_reduce.copy_(ar)
        net.betas_reduce.zero_()
    g = net.genotype()
    assert g.normal == [('sep_conv_3x3x3', 0), ('skip_connect', 1),
                        ('skip_connect', 1), ('sep_conv_3x3x3', 2),
                        ('max_pool_3x3x3', 3), ('sep_conv_3x3x3', 1),
                        ('skip_connect', 4), ('sep_conv_3x3x3', 0)]
    assert g.reduce == [('skip_connect', 1), ('max_pool_3x3x3', 0),
                        ('sep_conv_3x3x3', 0), ('skip_connect', 1),  # edges 3 and 4 tie: the lower index wins
                        ('max_pool_3x3x3', 0), ('sep_conv_3x3x3', 1),
                        ('sep_conv_3x3x3', 0), ('max_pool_3x3x3', 3)]
    assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]


def test_zero_one_loss_worked_example():
    net = tiny_net()
    logit = torch.logit
    with torch.no_grad():
        net.alphas_normal.fill_(logit(torch.tensor(0.9)))   # 42 values, |s - 0.5| = 0.4
        net.alphas_reduce.fill_(logit(torch.tensor(0.1)))   # 42 values, 0.4
        net.betas_normal.fill_(0.0)                          # 14 values, 0
        net.betas_reduce.fill_(logit(torch.tensor(0.7)))    # 14 values, 0.2
    n = 42 + 42 + 14 + 14
    l2 = 0.25 - (84 * 0.16 + 14 * 0.04) / n
    l1 = -(84 * 0.4 + 14 * 0.2) / n
    assert zero_one_loss(net, 'l2').item() == pytest.approx(l2, abs=1e-6)
    assert zero_one_loss(net, 'l1').item() == pytest.approx(l1, abs=1e-6)
    assert zero_one_loss(net, 'off').item() == 0.0
    with pytest.raises(UserError, match="'l3'.*l2, l1, off"):
        zero_one_loss(net, 'l3')


# ---------------------------------------------------------------- architect

def make_architect(order='second', dtype=torch.float32, lr=0.1, momentum=0.9, wd=0.05):
    net = tiny_net().to(dtype)
    w_opt = torch.optim.SGD(net.weight_parameters(), lr, momentum=momentum, weight_decay=wd)
    a_opt = torch.optim.Adam(net.arch_parameters(), 1e-2, betas=(0.5, 0.999), weight_decay=1e-3)
    return net, w_opt, Architect(net, w_opt, a_opt, order, 'l2', 10.0)


def exact_hvp(net, arch, v, x, y):
    """d/d alpha (grad_w L_train . v) by double backward."""
    params = dict(net.named_parameters())
    w = [params[n] for n in arch.w_names]
    g = torch.autograd.grad(F.cross_entropy(net(x), y), w, create_graph=True)
    dot = sum((gi * v[n]).sum() for gi, n in zip(g, arch.w_names))
    return torch.autograd.grad(dot, net.arch_parameters())


def rel_err(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float((a - b).norm() / b.norm())


def test_finite_difference_hvp_matches_double_backward():
    """The central difference at w +/- (r/||v||) v, against autograd's exact mixed derivative.

    r is 1e-6 here, not DARTS' 1e-2: the supernet is piecewise smooth (ReLU, max-pool), and a step of norm 1e-2
    crosses kinks whose gradient jumps dominate the difference (measured: relative error 5 at r = 1e-2 on this
    model, 4-19 on C=8 / 16^3 ones), so only a step that crosses none checks the formula. v is scaled by 1e4 so
    that the step is r/||v|| v: a step of r v (no normalization) would be of norm ~1e4 r and miss.
    """
    net, _, arch = make_architect(dtype=torch.float64)
    x, y = batch(2, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    v = {n: 1e4 * torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in net.named_parameters()
         if n in arch.w_names}
    fd = arch.hessian_vector_product(v, x, y, r=1e-6)
    assert rel_err(fd, exact_hvp(net, arch, v, x, y)) < 1e-5


def test_virtual_step_is_one_sgd_step_with_momentum_and_weight_decay():
    net, w_opt, arch = make_architect(dtype=torch.float64)
    x, y = batch(2, 8, dtype=torch.float64)
    engine.train_step(net, w_opt, *batch(2, 8, seed=5, dtype=torch.float64), net.weight_parameters(), 5.0)
    before = copy.deepcopy(net.state_dict())
    eta = 0.07
    virtual = arch.virtual_weights(x, y, eta)
    params = dict(net.named_parameters())
    w = [params[n] for n in arch.w_names]
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), w)
    for n, p, g in zip(arch.w_names, w, grads):
        buf = w_opt.state[p]['momentum_buffer']
        assert buf.abs().sum() > 0
        expected = p - eta * (g + 0.05 * p + 0.9 * buf)
        assert torch.allclose(virtual[n], expected, rtol=0, atol=1e-12), n
    for n in arch.w_names:  # the real weights are untouched
        assert torch.equal(net.state_dict()[n], before[n])


def test_second_order_gradient_is_dval_minus_eta_hvp():
    net, w_opt, arch = make_architect(dtype=torch.float64)
    arch.hvp_r = 1e-6  # the HVP_R setting; see the test above for why not DARTS' 1e-2
    xt, yt = batch(2, 8, seed=1, dtype=torch.float64)
    xv, yv = batch(2, 8, seed=2, dtype=torch.float64)
    engine.train_step(net, w_opt, *batch(2, 8, seed=5, dtype=torch.float64), net.weight_parameters(), 5.0)
    eta = 0.5
    _, grads = arch.second_order_grads(xt, yt, xv, yv, eta)
    virtual = {n: t.requires_grad_() for n, t in arch.virtual_weights(xt, yt, eta).items()}
    loss = F.cross_entropy(functional_call(net, virtual, (xv,)), yv) + 10 * zero_one_loss(net, 'l2')
    out = torch.autograd.grad(loss, net.arch_parameters() + list(virtual.values()))
    d_val, v = out[:4], dict(zip(virtual, out[4:]))
    implicit = [eta * h for h in exact_hvp(net, arch, v, xt, yt)]
    expected = [d - h for d, h in zip(d_val, implicit)]
    err = rel_err(grads, expected)
    assert err < 1e-5
    assert rel_err(d_val, expected) > 100 * err  # the implicit term is far above the tolerance


@pytest.mark.parametrize('order', ['first', 'second'])
def test_architecture_step_changes_only_alphas_and_betas(order):
    net, w_opt, arch = make_architect(order)
    engine.train_step(net, w_opt, *batch(3, 8, seed=5), net.weight_parameters(), 5.0)
    before = copy.deepcopy(net.state_dict())
    opt_before = copy.deepcopy(w_opt.state_dict())
    arch.step(*batch(3, 8, seed=1), *batch(3, 8, seed=2), eta=0.1)
    after = net.state_dict()
    for name in before:
        if name in net.ARCH_NAMES:
            assert not torch.equal(after[name], before[name]), name
        else:  # weights and BatchNorm running statistics
            assert torch.equal(after[name], before[name]), name
    for k, s in opt_before['state'].items():
        assert torch.equal(w_opt.state_dict()['state'][k]['momentum_buffer'], s['momentum_buffer'])
    # and the weight steps track BatchNorm statistics again
    engine.train_step(net, w_opt, *batch(3, 8, seed=5), net.weight_parameters(), 5.0)
    assert all(not torch.equal(t, before[n]) for n, t in net.state_dict().items() if 'running_mean' in n)


@pytest.mark.parametrize('recompute', [False, True], ids=['', 'checkpoint_cells'])
@pytest.mark.parametrize('order, hvp, forwards', [('first', 'fd', 1), ('second', 'fd', 3), ('second', 'exact', 2)])
def test_architecture_step_tracking_batchnorm_statistics_as_published(order, hvp, forwards, recompute):
    """track_bn (ARCH_BN_STATS): every forward of the step at the network's own weights moves each BatchNorm's
    running statistics: first order the validation forward; second order the virtual step's forward and the two at
    w +/- eps v (exact: one at w), never the validation forward at w' (the published code runs it on a copy). With
    checkpointed cells too (recomputed in backward, statistics moved once)."""
    net, w_opt, _ = make_architect(order)
    net.checkpoint_cells = recompute
    a_opt = torch.optim.Adam(net.arch_parameters(), 1e-2)
    arch = Architect(net, w_opt, a_opt, order, 'l2', 10.0, hvp=hvp, track_bn=True)
    engine.train_step(net, w_opt, *batch(3, 8, seed=5), net.weight_parameters(), 5.0)
    before = copy.deepcopy(net.state_dict())
    arch.step(*batch(3, 8, seed=1), *batch(3, 8, seed=2), eta=0.1)
    after = net.state_dict()
    counts = [n for n in after if n.endswith('num_batches_tracked')]
    assert counts and all(after[n] - before[n] == forwards for n in counts)
    assert all(not torch.equal(after[n], before[n]) for n in after if n.endswith('running_mean'))
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))


@pytest.mark.parametrize('order', ['first', 'second'])
def test_recomputed_cells_give_the_same_search_steps(order):
    """checkpoint_cells, also under functional_call (the second-order step's virtual weights w' and w +/- eps v,
    which are no longer in the modules when backward recomputes a cell): the same hypergradient, and after a
    weight step, an architecture step and a weight step the same weights, alphas and BatchNorm statistics."""
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        net, w_opt, arch = make_architect(order)
        net.checkpoint_cells = on
        engine.train_step(net, w_opt, *batch(3, 8, seed=5), net.weight_parameters(), 5.0)
        xt, xv = batch(3, 8, seed=1), batch(3, 8, seed=2)
        hyper = arch.second_order_grads(*xt, *xv, 0.1)[1] if order == 'second' else None
        arch.step(*xt, *xv, eta=0.1)
        engine.train_step(net, w_opt, *batch(3, 8, seed=6), net.weight_parameters(), 5.0)
        results.append((hyper, net.state_dict()))
    (hyper_off, off), (hyper_on, on) = results
    if order == 'second':
        assert all(torch.equal(a, b) for a, b in zip(hyper_on, hyper_off))
    assert off.keys() == on.keys() and all(torch.equal(off[n], on[n]) for n in off)


# ---------------------------------------------------------------- train_search end to end

class Interrupted(Exception):
    pass


def run_interrupted(monkeypatch, stop_epoch, **settings):
    """train_search.main stopped (as by a crash) at the start of epoch stop_epoch; returns the run folder."""
    original = train_search.search_epoch

    def search_epoch(epoch, *args):
        if epoch == stop_epoch:
            raise Interrupted
        return original(epoch, *args)
    with monkeypatch.context() as m:
        m.setattr(train_search, 'search_epoch', search_epoch)
        with pytest.raises(Interrupted):
            train_search.main(**settings)
    (folder,) = os.listdir(settings['RUNS'])
    return os.path.join(settings['RUNS'], folder)


@pytest.fixture(scope='module')
def search_set(tmp_path_factory):
    """Cube set whose non-search folds (3-9) have no cube files: reading any of them would fail."""
    root = write_cube_set(tmp_path_factory.mktemp('data') / 'cubes')
    for name in os.listdir(os.path.join(root, 'cubes')):
        if int(name[1]) not in TINY['SEARCH_FOLDS']:
            os.remove(os.path.join(root, 'cubes', name))
    return root


@pytest.fixture(scope='module')
def straight_run(search_set, tmp_path_factory):
    """A 2-epoch second-order search; records the search-train / search-val split it used."""
    splits = []
    original = data.split_by_scan

    def split_by_scan(table, *args):
        tr, va = original(table, *args)
        splits.append((table, tr, va))
        return tr, va
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, 'split_by_scan', split_by_scan)
        result = train_search.main(DATA=search_set, RUNS=str(tmp_path_factory.mktemp('runs')),
                                   **{**TINY, 'FIGURES': True})
    return result, splits


def test_search_writes_its_outputs_and_reads_only_search_folds(straight_run):
    result, splits = straight_run
    run = result['run']
    for name in ('config.json', 'log.txt', 'metrics.csv', 'weights.csv', 'weights.png', 'genotype.json', 'last.pt'):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    assert pd.read_csv(os.path.join(run, 'metrics.csv'))['epoch'].tolist() == [0, 1]
    weights = pd.read_csv(os.path.join(run, 'weights.csv'))
    assert len(weights) == TINY['EPOCHS'] * 2 * 14 * len(PRIMS)
    assert weights.groupby(['epoch', 'cell', 'edge'])['op'].apply(list).map(lambda ops: ops == PRIMS).all()
    with open(os.path.join(run, 'weights.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert genotypes.get_genotype(os.path.join(run, 'genotype.json')) == result['genotype']
    state = torch.load(os.path.join(run, 'last.pt'), weights_only=False)
    assert state['epoch'] == TINY['EPOCHS'] - 1 and 'alphas_normal' in state['model']
    ((table, tr, va),) = splits
    assert sorted(table['fold'].unique()) == [0, 1, 2]
    assert len(tr) == 8 and len(va) == 4
    assert not set(table['seriesuid'][tr]) & set(table['seriesuid'][va])


def final_state(run):
    return torch.load(os.path.join(run, 'last.pt'), weights_only=False)


def test_resume_equals_uninterrupted_run(straight_run, search_set, tmp_path, monkeypatch):
    """2 epochs straight == epoch 0, a crash at the start of epoch 1, then RESUME. Epoch 0 ends part-way
    through a pass over the validation batches, so that pass must be resumed too."""
    result, _ = straight_run
    folder = run_interrupted(monkeypatch, 1, DATA=search_set, RUNS=str(tmp_path), **TINY)
    assert final_state(folder)['epoch'] == 0
    with pytest.raises(UserError, match='EPOCHS'):  # the saved cosine schedule was built for 2 epochs
        train_search.main(RESUME=folder, EPOCHS=3, DEVICE='cpu')
    resumed = train_search.main(RESUME=folder, EPOCHS=2, DEVICE='cpu')
    assert resumed['genotype'] == result['genotype']
    a, b = final_state(folder), final_state(result['run'])
    for name in b['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    for sa, sb in zip(a['w_opt']['state'].values(), b['w_opt']['state'].values()):
        assert torch.equal(sa['momentum_buffer'], sb['momentum_buffer'])
    resumed_rows, straight_rows = (pd.read_csv(os.path.join(r, 'metrics.csv')).drop(columns='seconds')
                                   for r in (folder, result['run']))
    pd.testing.assert_frame_equal(resumed_rows, straight_rows)


def test_nan_loss_stops_with_the_last_good_checkpoint(search_set, tmp_path, monkeypatch):
    original = engine.train_step
    calls = []

    def train_step(model, optimizer, x, *args):
        calls.append(1)
        if len(calls) > 3:  # epoch 1 (3 steps per epoch): the weights blow up
            with torch.no_grad():
                model.classifier.weight.fill_(float('nan'))
        return original(model, optimizer, x, *args)
    monkeypatch.setattr(engine, 'train_step', train_step)
    with pytest.raises(UserError, match='last.pt') as err:
        train_search.main(DATA=search_set, RUNS=str(tmp_path), **{**TINY, 'HYPERGRAD': 'first'})
    (folder,) = os.listdir(tmp_path)
    assert os.path.join(tmp_path, folder, 'last.pt') in str(err.value)
    state = final_state(os.path.join(tmp_path, folder))
    assert state['epoch'] == 0
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())


@pytest.mark.parametrize('setting,value,pattern', [
    ('PRIMITIVES', ('skip_connect', 'fancy_conv_3x3x3'), "'fancy_conv_3x3x3'.*sep_conv_3x3x3"),
    ('WEIGHTS', 'softermax', "'softermax'.*sigmoid, softmax, sparsemax"),
    ('HYPERGRAD', 'third', "HYPERGRAD 'third'.*second, first, zeroth"),
    ('ZERO_ONE', 'l3', "'l3'.*l2, l1, off"),
    ('SEARCH_FOLDS', (0, 12), 'SEARCH_FOLDS.*fold 12'),
])
def test_bad_settings_give_clear_errors(search_set, tmp_path, setting, value, pattern):
    # WARMUP_EPOCHS = EPOCHS: an error that only surfaces at the first architecture step would never be raised
    settings = {**TINY, 'EPOCHS': 1, 'WARMUP_EPOCHS': 1, setting: value}
    with pytest.raises(UserError, match=pattern):
        train_search.main(DATA=search_set, RUNS=str(tmp_path), **settings)
