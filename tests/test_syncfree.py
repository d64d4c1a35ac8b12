"""The training steps never wait for the device: no host sync inside a retrain step, a first- or second-order search
step, a zeroth-order weight step (with its period start and architecture step), or between run_epoch's reads of its
NaN guard.

On a GPU a host sync (reading a tensor's value: .item(), float(), int(), bool(), indexing a list with a tensor;
.cpu(), .tolist(), .numpy(); an op whose output size depends on the values: boolean masks, nonzero, unique) makes the
host wait until every queued kernel has run, so it cannot queue the next ones meanwhile. These tests run on the CPU,
where nothing waits; `no_host_syncs` rejects the same calls there, so a sync added to a step fails here. Exempt: the
optimizers' step counters, which torch keeps on the host in a CUDA run too (Adam reads them every step)."""
import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import data
import engine
import train_search
from genotypes import NAS_HBO_PAPER
from model import NetworkLUNA
from utils import UserError

aten = torch.ops.aten
# Ops that read a value to the host, or whose output size depends on the values (the host needs it to allocate).
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
            aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.repeat_interleave.Tensor}
MASKED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}  # syncs with boolean indices
METHODS = ('cpu', 'tolist', 'numpy', '__array__')  # host copies that dispatch no op when already on the CPU


class HostSync(AssertionError):
    pass


class _RejectSyncs(TorchDispatchMode):
    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        exempt = func is aten._local_scalar_dense.default and any(args[0] is t for t in self.allowed)
        masked = func in MASKED and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if (func in SYNC_OPS and not exempt) or masked:
            raise HostSync(f'host sync in a training step: {func}')
        return func(*args, **(kwargs or {}))


class Guard:
    """Inside `with guard:` every host sync raises HostSync, except reads of the tensors in `allowed` and anything
    inside `with guard.paused():`."""

    def __init__(self, allowed=()):
        self.allowed = list(allowed)
        self.saved = {name: getattr(torch.Tensor, name) for name in METHODS}
        self.stack = None

    def _reject(self, name):
        def method(tensor, *args, **kwargs):
            if any(tensor is t for t in self.allowed):
                return self.saved[name](tensor, *args, **kwargs)
            raise HostSync(f'host sync in a training step: Tensor.{name}()')
        return method

    def _restore(self):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.callback(self._restore)
        for name in METHODS:
            setattr(torch.Tensor, name, self._reject(name))
        self.stack.enter_context(_RejectSyncs(self.allowed))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    @contextlib.contextmanager
    def paused(self):
        self._restore()
        try:
            with _disable_current_modes():
                yield
        finally:
            for name in METHODS:
                setattr(torch.Tensor, name, self._reject(name))


def step_counters(*optimizers):
    """The optimizers' step tensors (on the host in a CUDA run too)."""
    return [s['step'] for opt in optimizers for s in opt.state.values() if isinstance(s.get('step'), torch.Tensor)]


def cube_data(n=8, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return data.CubeData(rng.integers(0, 256, (n, size, size, size), dtype=np.uint8), np.arange(n) % 2, 100.0, 50.0,
                         'cpu')


SEARCH = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, PRIMITIVES=('max_pool_3x3x3', 'skip_connect',
                                                                             'sep_conv_3x3x3'), ZO_T=2)


def retrain_step(train_step=None, checkpoint_cells=False):
    """A function running train_3D_continuation's step (augmented batch, SGD step with drop path) on a tiny net."""
    torch.manual_seed(0)
    model = NetworkLUNA(4, 2, 3, NAS_HBO_PAPER)
    model.drop_path_prob = 0.1
    model.checkpoint_cells = checkpoint_cells
    params = list(model.parameters())
    opt = torch.optim.SGD(params, 0.025, momentum=0.9, weight_decay=3e-4)
    train, gen = cube_data(), data.make_generator('cpu', 0)
    idx = torch.arange(4)
    return lambda i=idx: (train_step or engine.train_step)(model, opt, *train.train_batch(i, gen), params, 5.0)


def search_step(hypergrad, weights='sigmoid', checkpoint_cells=False):
    """(step, architecture optimizer): train_search.search_epoch's step after warm-up, on tiny data."""
    torch.manual_seed(0)
    cfg = {**train_search.DEFAULTS, **SEARCH, 'HYPERGRAD': hypergrad, 'WEIGHTS': weights,
           'CHECKPOINT_CELLS': checkpoint_cells}
    model, w_opt, _, a_opt, updater = train_search.build(cfg)
    train, val, gen = cube_data(), cube_data(seed=1), data.make_generator('cpu', 0)
    val_stream = train_search.ValStream(val, 3, gen)
    keep, idx = [], torch.arange(3)

    def step():
        x, y = train.train_batch(idx, gen)
        if hypergrad == 'zeroth':
            return updater.weight_step(x, y, True, val_stream, keep)
        updater.step(x, y, *val_stream.next(), w_opt.param_groups[0]['lr'])
        return engine.train_step(model, w_opt, x, y, model.weight_parameters(), cfg['GRAD_CLIP'], keep)
    return step, a_opt


@pytest.mark.parametrize('sync', ['item', 'float', 'int', 'bool', 'cpu', 'tolist', 'numpy', 'mask', 'nonzero',
                                  'index'])
def test_the_guard_rejects_each_kind_of_host_sync(sync):
    x = torch.randn(4)
    calls = {'item': lambda: x.sum().item(), 'float': lambda: float(x.sum()), 'int': lambda: int(x.argmax()),
             'bool': lambda: bool(x.sum() > 0), 'cpu': lambda: x.cpu(), 'tolist': lambda: x.tolist(),
             'numpy': lambda: np.asarray(x), 'mask': lambda: x[x > 0], 'nonzero': lambda: torch.nonzero(x),
             'index': lambda: [1, 2, 3, 4][x.argmax()]}
    with pytest.raises(HostSync), Guard():
        calls[sync]()
    calls[sync]()  # allowed again outside
    y = torch.tensor(2.0)
    with Guard(allowed=[y]) as guard:
        assert y.item() == 2.0 and (x * 2 + x.exp()).shape == (4,)
        with guard.paused():
            assert float(x.sum()) == pytest.approx(float(x.numpy().sum()))


@pytest.mark.parametrize('checkpoint_cells', [False, True])
def test_retrain_step_is_sync_free(checkpoint_cells):
    step = retrain_step(checkpoint_cells=checkpoint_cells)
    step()  # the first step creates the optimizer state
    with Guard():
        loss, hits = step()
        step()
    assert torch.isfinite(loss) and 0 <= int(hits) <= 4


def test_a_float_of_the_loss_in_the_step_is_caught():
    """The guard is not blind to the step: the same step with one float(loss) added fails."""
    def train_step(*args):
        loss, hits = engine.train_step(*args)
        float(loss)
        return loss, hits
    step = retrain_step(train_step)
    step()
    with pytest.raises(HostSync, match='_local_scalar_dense'), Guard():
        step()


@pytest.mark.parametrize('hypergrad, checkpoint_cells', [('second', False), ('first', False), ('second', True)])
def test_search_step_is_sync_free(hypergrad, checkpoint_cells):
    """An architecture step (Adam on alphas/betas, validation batch) then a weight step, as in search_epoch."""
    step, a_opt = search_step(hypergrad, checkpoint_cells=checkpoint_cells)
    step()
    with Guard(allowed=step_counters(a_opt)):
        for _ in range(3):  # the third draws the second pass of validation batches (a new permutation)
            step()


def test_zeroth_order_weight_steps_are_sync_free():
    """ZO_T=2: the period's start (direction, mu, the twin), twin and weight steps, and the architecture step."""
    step, a_opt = search_step('zeroth', 'sparsemax')
    step()
    step()  # the period's architecture step creates Adam's state
    with Guard(allowed=step_counters(a_opt)):
        for _ in range(6):  # three more periods; the third architecture step starts a new pass of validation batches
            step()


def reads_of_the_guard(monkeypatch, guard):
    """Record the steps at which run_epoch reads its NaN guard; the reads (and the end of the epoch) may sync."""
    real_read, real_means, reads = engine.stop_if_non_finite, engine.epoch_means, []

    def read(losses, first, *args):
        if losses:
            reads.append(first + len(losses) - 1)
        with guard.paused():
            return real_read(losses, first, *args)

    def means(*args):
        reads.append('end')
        with guard.paused():
            return real_means(*args)
    monkeypatch.setattr(engine, 'stop_if_non_finite', read)
    monkeypatch.setattr(engine, 'epoch_means', means)
    return reads


def test_run_epoch_syncs_only_when_it_reads_the_nan_guard(monkeypatch):
    monkeypatch.setattr(engine, 'CHECK_EVERY', 5)
    step = retrain_step()
    step()
    guard = Guard()
    reads = reads_of_the_guard(monkeypatch, guard)
    with guard:
        loss, acc = engine.run_epoch(lambda idx: step(idx), [torch.arange(4)] * 12, 48, 'epoch 0', None)
    assert reads == [0, 5, 10, 11, 'end']  # the first step, every CHECK_EVERY steps, and the end
    assert np.isfinite(loss) and 0 <= acc <= 100


@pytest.mark.parametrize('bad, stopped_after, where', [(7, 10, 'step 7'), (11, 11, 'step 11'), (0, 0, 'step 0')])
def test_run_epoch_stops_at_the_next_read_naming_the_first_non_finite_step(monkeypatch, tmp_path, bad, stopped_after,
                                                                           where):
    """The NaN guard is read every CHECK_EVERY steps and at the end; the error names the first non-finite loss's step
    and the kept checkpoint, as check_finite does."""
    monkeypatch.setattr(engine, 'CHECK_EVERY', 5)
    ran = []

    def step(idx):
        ran.append(len(ran))
        return torch.tensor(float('nan') if ran[-1] >= bad else 0.5), torch.tensor(2)
    with pytest.raises(UserError, match=f'loss is nan at epoch 3 {where}; stopping: no checkpoint yet'):
        engine.run_epoch(step, [torch.arange(4)] * 12, 48, 'epoch 3', str(tmp_path))
    assert ran[-1] == stopped_after
    (tmp_path / 'last.pt').write_bytes(b'')
    with pytest.raises(UserError, match=r'loss is inf at epoch 3 step 0; stopping: the last good checkpoint is kept'):
        engine.run_epoch(lambda idx: (torch.tensor(float('inf')), torch.tensor(0)), [torch.arange(4)], 4, 'epoch 3',
                         str(tmp_path))
