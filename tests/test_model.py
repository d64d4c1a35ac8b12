"""The retrain network: shapes, gradients, drop path, and the paper's parameter count."""
import pytest
import torch

from genotypes import NAS_HBO_PAPER, Genotype
from model import Cell, NetworkLUNA, drop_path
from operations import FactorizedReduce, recomputed


def tiny(drop_path_prob=0.0):
    torch.manual_seed(0)
    return NetworkLUNA(4, 2, 3, NAS_HBO_PAPER, drop_path_prob)


def test_forward_shapes():
    model = tiny()
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 2)
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2)
    # 3 cells: reductions at 1 and 2; cell 2 follows a reduction (FactorizedReduce preprocess0).
    assert [c.reduction for c in model.cells] == [False, True, True]
    assert model.classifier.in_features == 4 * 4 * 4


def test_every_parameter_gets_gradient():
    model = tiny()
    model(torch.randn(2, 1, 16, 16, 16)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_drop_path_only_in_training():
    x = torch.randn(4, 1, 16, 16, 16)
    model = tiny(drop_path_prob=0.5)
    base = tiny(drop_path_prob=0.0)                          # same seed: same weights
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base.eval()(x))  # eval: drop path off
        model.train()
        base.train()
        ref = base(x)
        assert torch.equal(base(x), ref)                     # no drop path: deterministic
        assert not torch.allclose(model(x), ref)             # same weights, paths dropped
        model.drop_path_prob = 0.0                           # settable per epoch
        assert torch.allclose(model(x), ref)


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while fn() runs, and fn's result."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16-autocast'])
def test_checkpointed_cells_give_the_same_step_with_less_memory_kept(amp):
    """checkpoint_cells: the same loss, gradients (drop path on: the recomputation redraws the same paths) and
    BatchNorm running statistics (tracked once, not again in the recomputation); under half the saved bytes."""
    x = torch.randn(2, 1, 16, 16, 16)
    results = []
    for on in (False, True):
        model = tiny(drop_path_prob=0.3)
        model.checkpoint_cells, model.amp = on, amp  # the recomputation runs under the forward's autocast
        torch.manual_seed(1)
        kept, loss = saved_bytes(lambda m=model: m(x).square().sum())
        loss.backward()
        results.append((kept, loss.detach(), [p.grad for p in model.parameters()],
                        [b.clone() for b in model.buffers()]))
    (kept_off, loss_off, grads_off, bufs_off), (kept_on, loss_on, grads_on, bufs_on) = results
    assert torch.equal(loss_on, loss_off)
    for a, b in zip(grads_on, grads_off):
        assert torch.equal(a, b)  # the recomputed activations are the kept ones, bit for bit
    for a, b in zip(bufs_on, bufs_off):
        assert torch.equal(a, b)  # running means/variances and num_batches_tracked: updated once
    assert kept_on < kept_off / 2


def test_a_recomputed_block_can_be_differentiated_twice():
    """A graph kept (retain_graph / create_graph) recomputes again on the next backward, statistics still frozen."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 3, padding=1), torch.nn.BatchNorm3d(2), torch.nn.ReLU())
    x = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    y = recomputed(block, x).square().sum()
    stats = [b.clone() for b in block.buffers()]
    first = torch.autograd.grad(y, x, retain_graph=True)[0]
    second = torch.autograd.grad(y, x)[0]
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(stats, block.buffers()))


def test_drop_path_is_per_sample_and_rescaled():
    torch.manual_seed(0)
    out = drop_path(torch.ones(2000, 3, 2, 2, 2), 0.25)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs(per_sample[:, 0].mean().item() - 1.0) < 0.05


def test_identity_edges_are_not_dropped():
    skip_only = Genotype([('skip_connect', 0), ('skip_connect', 1)] * 4, [2, 3, 4, 5],
                         [('skip_connect', 0), ('skip_connect', 1)] * 4, [2, 3, 4, 5])
    cell = Cell(skip_only, 4, 4, 4, reduction=False, reduction_prev=False).train()
    s0, s1 = torch.randn(3, 4, 4, 4, 4), torch.randn(3, 4, 4, 4, 4)
    assert torch.equal(cell(s0, s1, 0.9), cell(s0, s1, 0.0))


@pytest.fixture(scope='module')
def paper_model():
    return NetworkLUNA(36, 2, 20, NAS_HBO_PAPER)


def test_paper_parameter_count(paper_model):
    # the published code's network of this genotype counts exactly this (the same in both FactorizedReduce forms)
    assert sum(p.numel() for p in paper_model.parameters()) == 12_791_702
    assert [i for i, c in enumerate(paper_model.cells) if c.reduction] == [6, 13]


def _reduce_inputs(model, x):
    """(conv_1 input, conv_2 input) of every FactorizedReduce the forward of x runs."""
    seen = []
    for m in model.modules():
        if isinstance(m, FactorizedReduce):
            pair = []
            seen.append(pair)
            m.conv_1.register_forward_hook(lambda mod, inp, out, pair=pair: pair.append(inp[0]))
            m.conv_2.register_forward_hook(lambda mod, inp, out, pair=pair: pair.append(inp[0]))
    model(x)
    return seen


@pytest.mark.parametrize('reduce_shift', [False, True])
def test_paper_network_reduces_in_the_form_asked(reduce_shift):
    # default (published): both branches of every FactorizedReduce (the cell after a reduction, the reduction
    # cells' skip_connect) read the same tensor; reduce_shift=True: the second reads it shifted by one voxel
    torch.manual_seed(0)
    model = NetworkLUNA(4, 2, 3, NAS_HBO_PAPER, reduce_shift=reduce_shift) if reduce_shift else tiny()
    pairs = _reduce_inputs(model.eval(), torch.randn(1, 1, 16, 16, 16))
    assert len(pairs) == 5  # cell 2's preprocess0, two skip_connect edges in each of the reduction cells 1 and 2
    for first, second in pairs:
        if reduce_shift:
            assert torch.equal(second[:, :, :-1, :-1, :-1], first[:, :, 1:, 1:, 1:])
        else:
            assert torch.equal(first, second)
