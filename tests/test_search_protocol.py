"""The search protocol and the paper's defaults, pinned: normalization from search-train only, shuffled validation
batches, gradient clipping of the weights only, and the published constants (DESIGN section 1)."""
import numpy as np
import pytest
import torch
from conftest import write_cube_set

import architect
import data
import genotypes
import train_3D_continuation
import train_search
import zo
from operations import cell_layout

PRIMS = ('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3')
# As in test_search.py: 8 search-train nodules (3 weight steps per epoch at batch 3), 4 search-val nodules.
TINY = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
            PRIMITIVES=PRIMS, EPOCHS=1, WARMUP_EPOCHS=0, SEED=3, HYPERGRAD='first')


@pytest.fixture(scope='module')
def search_set(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('data') / 'cubes')


class Stop(Exception):
    pass


def test_normalization_statistics_come_from_search_train_only(search_set, tmp_path, monkeypatch):
    splits, made = [], []
    split_by_scan, cube_data = data.split_by_scan, data.CubeData

    def recording_split(table, *args):
        tr, va = split_by_scan(table, *args)
        splits.append((table, tr, va))
        return tr, va

    def recording_data(cubes, labels, mean, std, device):
        made.append((len(cubes), mean, std))
        return cube_data(cubes, labels, mean, std, device)

    def stop(cfg):
        raise Stop
    monkeypatch.setattr(data, 'split_by_scan', recording_split)
    monkeypatch.setattr(data, 'CubeData', recording_data)
    monkeypatch.setattr(train_search, 'build', stop)
    with pytest.raises(Stop):
        train_search.main(DATA=search_set, RUNS=str(tmp_path), **TINY)
    ((table, tr, va),) = splits
    cubes = data.load_cubes(search_set, table, TINY['CUBE'])  # (N, 8, 8, 8), centre crops of the 16^3 files
    train_cubes = cubes[tr].astype(np.float64)
    assert [n for n, _, _ in made] == [len(tr), len(va)]  # search-train, then search-val
    for _, mean, std in made:  # both normalized with the search-train statistics
        assert float(mean) == pytest.approx(train_cubes.mean(), rel=1e-12)
        assert float(std) == pytest.approx(train_cubes.std(), rel=1e-12)
    mixed = cubes.astype(np.float64)  # what search-train and search-val together would give: measurably different
    assert abs(mixed.mean() - train_cubes.mean()) > 1e-6 * train_cubes.mean()


class Positions:
    """A stand-in for CubeData: eval_batch returns the positions it is asked for."""
    device = 'cpu'

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def eval_batch(self, idx):
        return idx, None


def test_validation_stream_is_shuffled_every_pass():
    n, batch = 20, 3
    stream = train_search.ValStream(Positions(n), batch, torch.Generator().manual_seed(0))
    per_pass = -(-n // batch)
    passes = [torch.cat([stream.next()[0] for _ in range(per_pass)]) for _ in range(3)]
    for order in passes:  # each pass covers every validation nodule once ...
        assert sorted(order.tolist()) == list(range(n))
    assert all(not torch.equal(order, torch.arange(n)) for order in passes)  # ... in a shuffled order ...
    assert not torch.equal(passes[0], passes[1]) and not torch.equal(passes[1], passes[2])  # ... new each pass


def test_search_architecture_steps_draw_shuffled_validation_batches(search_set, tmp_path, monkeypatch):
    """In a run: the architecture steps' validation batches, as positions in search-val, are not the unshuffled
    stream's (0, 1, 2), (3), (0, 1, 2)."""
    made, seen = [], []
    cube_data, step = data.CubeData, architect.Architect.step

    def recording_data(*args):
        made.append(cube_data(*args))
        return made[-1]

    def recording_step(self, x_train, y_train, x_val, y_val, eta):
        seen.append(x_val)
        if len(seen) == 3:
            raise Stop
        return step(self, x_train, y_train, x_val, y_val, eta)
    monkeypatch.setattr(data, 'CubeData', recording_data)
    monkeypatch.setattr(architect.Architect, 'step', recording_step)
    with pytest.raises(Stop):
        train_search.main(DATA=search_set, RUNS=str(tmp_path), **{**TINY, 'HYPERGRAD': 'first', 'EPOCHS': 2})
    val_x, _ = made[1].eval_batch(torch.arange(len(made[1])))
    positions = [[next(i for i in range(len(val_x)) if torch.equal(val_x[i], x)) for x in xs] for xs in seen]
    assert len(positions) == 3 and len(val_x) == 4
    assert sorted(positions[0] + positions[1]) == [0, 1, 2, 3]  # one pass = every validation nodule once
    unshuffled = [[0, 1, 2], [3], [0, 1, 2]]
    assert positions != unshuffled


def recorded_clips(monkeypatch):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append(({id(p) for p in params}, len(params), max_norm))
        return clip(params, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', recording)
    return calls


def clipped_search(search_set, tmp_path, monkeypatch, **settings):
    """Run a tiny search with GRAD_CLIP 0.5; returns (its supernet, the clip_grad_norm_ calls)."""
    calls = recorded_clips(monkeypatch)
    models = []
    build = train_search.build

    def recording_build(cfg):
        built = build(cfg)
        models.append(built[0])
        return built
    monkeypatch.setattr(train_search, 'build', recording_build)
    monkeypatch.setattr(train_search, 'finish', lambda *args: None)  # no genotype files or plot needed
    train_search.main(DATA=search_set, RUNS=str(tmp_path), **{**TINY, 'GRAD_CLIP': 0.5, **settings})
    (model,) = models
    return model, calls


def test_search_clips_the_weight_gradients_only(search_set, tmp_path, monkeypatch):
    model, calls = clipped_search(search_set, tmp_path, monkeypatch, HYPERGRAD='second')
    weights = {id(p) for p in model.weight_parameters()}
    assert len(calls) == 3  # one per weight step; the architecture steps clip nothing
    for ids, _, max_norm in calls:
        assert ids == weights and max_norm == 0.5


def test_zeroth_order_search_clips_the_weight_gradients_only(search_set, tmp_path, monkeypatch):
    model, calls = clipped_search(search_set, tmp_path, monkeypatch, HYPERGRAD='zeroth', WEIGHTS='sparsemax', ZO_T=2)
    weights = {id(p) for p in model.weight_parameters()}
    arch = {id(p) for p in model.arch_parameters()}
    real = [c for c in calls if c[0] == weights]
    twin = [c for c in calls if c[0] != weights]
    assert len(real) == 3 and len(twin) == 3  # each weight step and its twin's (a period started at once)
    for ids, n, max_norm in twin:  # the twin's own weight tensors: as many as the weights, no alpha or beta
        assert not ids & arch and not ids & weights and n == len(weights) and max_norm == 0.5


def test_search_defaults_are_the_papers():
    d = train_search.DEFAULTS
    assert (d['C'], d['LAYERS'], d['PC_K'], d['CUBE'], d['BATCH_SIZE']) == (16, 8, 4, 32, 7)
    assert (d['EPOCHS'], d['WARMUP_EPOCHS'], d['LR'], d['LR_MIN'], d['MOMENTUM']) == (50, 23, 0.1, 0.0, 0.9)
    assert (d['WEIGHT_DECAY'], d['GRAD_CLIP']) == (3e-4, 5.0)
    assert (d['ARCH_LR'], d['ARCH_BETA1'], d['ARCH_WEIGHT_DECAY']) == (6e-4, 0.5, 1e-3)
    assert (d['WEIGHTS'], d['EDGE_WEIGHTS'], d['ZERO_ONE'], d['ZERO_ONE_WEIGHT']) == ('sigmoid', True, 'auto', 10.0)
    assert (d['HYPERGRAD'], d['HVP'], d['HVP_R'], d['PRIMITIVES']) == ('second', 'fd', 0.01, 'mrfc')
    assert d['SEARCH_FOLDS'] == (0, 1, 2, 3, 4)
    # ZO-DARTS+ (DESIGN section 5)
    assert (d['ZO_T'], d['ZO_MU'], d['ZO_ARCH_LR'], d['TAU0'], d['TAU_FACTOR'], d['TAU_EVERY']) == \
        (10, 0.005, 1.5e-2, 1.5, 0.75, 5)
    assert set(genotypes.mrfc()) == {'MBConv_5x5x5_3', 'MBConv_5x5x5_6', 'max_pool_3x3x3', 'avg_pool_3x3x3',
                                     'skip_connect', 'sep_conv_3x3x3', 'sep_conv_5x5x5', 'dil_conv_3x3x3',
                                     'dil_conv_5x5x5'} and len(genotypes.mrfc()) == 9
    assert (data.PAD_VALUE, data.SHIFT, data.CUTOUT) == (170, 2, 4)


def test_search_build_wires_the_defaults():
    """build() with the default settings (CPU): the optimizers, schedule, supernet and architect carry them."""
    model, w_opt, sched, a_opt, updater = train_search.build({**train_search.DEFAULTS, 'DEVICE': 'cpu'})
    w, a = w_opt.param_groups[0], a_opt.param_groups[0]
    assert isinstance(w_opt, torch.optim.SGD) and (w['lr'], w['momentum'], w['weight_decay']) == (0.1, 0.9, 3e-4)
    assert isinstance(a_opt, torch.optim.Adam)
    assert (a['lr'], a['betas'], a['weight_decay']) == (6e-4, (0.5, 0.999), 1e-3)
    assert (sched.T_max, sched.eta_min) == (50, 0.0)
    assert isinstance(updater, architect.Architect)
    assert (updater.order, updater.zero_one, updater.zero_one_weight, updater.hvp, updater.hvp_r) == \
        ('second', 'l2', 10.0, 'fd', 0.01)
    assert model.weighting == 'sigmoid' and model.use_edge_weights and model.primitives == genotypes.mrfc()
    assert [c.reduction for c in model.cells] == [i in (2, 5) for i in range(8)]
    assert model.stem[0].out_channels == 48 and all(c.k == 4 for c in model.cells)
    assert model.alphas_normal.shape == (14, 9) and model.betas_reduce.shape == (14,)
    _, _, _, a_opt, updater = train_search.build({**train_search.DEFAULTS, 'DEVICE': 'cpu', 'HYPERGRAD': 'zeroth',
                                                  'C': 4, 'LAYERS': 3})
    a = a_opt.param_groups[0]
    assert isinstance(updater, zo.ZerothOrder) and (updater.T, updater.mu_rel, updater.grad_clip) == (10, 0.005, 5.0)
    assert (a['lr'], a['betas'], a['weight_decay']) == (1.5e-2, (0.5, 0.999), 1e-3)


def test_retrain_defaults_are_the_papers():
    d = train_3D_continuation.DEFAULTS
    assert (d['C'], d['LAYERS'], d['DROP_PATH'], d['CUBE'], d['BATCH_SIZE']) == (36, 20, 0.2, 32, 4)
    assert (d['EPOCHS'], d['LR'], d['LR_MIN'], d['MOMENTUM'], d['WEIGHT_DECAY'], d['GRAD_CLIP']) == \
        (600, 0.025, 0.0, 0.9, 3e-4, 5.0)
    assert d['GENOTYPE'] == 'NAS_HBO_PAPER' and d['TEST_FOLDS'] == (5, 6, 7, 8, 9)
    plan, _ = cell_layout(d['C'], d['LAYERS'], 4)
    assert [i for i, cell in enumerate(plan) if cell[3]] == [6, 13]
