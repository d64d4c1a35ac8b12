"""Worked examples of decisions where a one-line slip (a flipped sign, a wrong split, an off-by-one, a wrong axis, a
value not updated in place) once passed every test (issue 29): each number here is computed by hand in a comment."""
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import write_cube_set

import data
import engine
import genotypes
import graphs
import nodclsgbt
import runfolder
import settings
import train_3D_continuation
import train_evolve
import train_search
import utils
from evolution import candidate
from evolution import samea as sm
from evolution.records import Outputs
from scans import labels
from zo import ZerothOrder

# ---------------------------------------------------------------- evolution/: the pool, the surrogate, f1, the front


def test_pool_choice_lowest_predicted_f1_then_largest_std():
    # #0 = (0.1, 0.1) dominates #1..#3 and is not dominated by the front (0.2, 0.2): chosen first. Of {1, 2, 3} the
    # lowest predicted f1 is #1 (0.3; the highest would be #3); of {2, 3} the largest std is #2 (0.5; the smallest #3)
    pool = [[0.1, 0.1], [0.3, 0.5], [0.6, 0.4], [0.9, 0.2]]
    assert sm.pool_choice(pool, [0.0, 0.0, 0.5, 0.1], [[0.2, 0.2]]) == [0, 1, 2]
    # equal in one objective, worse in the other is dominated: #1 (0.2, 0.6) and #2 (0.5, 0.4) by #0 (0.2, 0.4), so
    # only #0 is non-dominated; then #1 (lowest f1 of the rest) and #4 (largest std)
    pool = [[0.2, 0.4], [0.2, 0.6], [0.5, 0.4], [0.7, 0.7], [0.8, 0.8]]
    assert sm.pool_choice(pool, [0.0, 0.0, 0.0, 0.1, 0.9], []) == [0, 1, 4]


def test_credit_adds_to_the_counts():
    # counts (1, 0, 2); children #5 (subproblem 0) and #7 (subproblem 2) entered the best set, #6 did not: (2, 0, 3)
    assert sm.credit([1, 0, 2], [5, 6, 7], [5, 7], {5: 0, 6: 2, 7: 2}).tolist() == [2.0, 0.0, 3.0]


def test_best_set_cuts_the_last_front_by_crowding_distance():
    # one front A (0, 1), B (0.1, 0.8), C (0.5, 0.3), D (1, 0) and E (1, 1) behind it. Crowding (pymoo: per objective
    # the neighbours' gap over the range, averaged): A and D inf, B (0.5 + 0.7) / 2 = 0.6, C (0.9 + 0.8) / 2 = 0.85
    F = [[0, 1], [0.1, 0.8], [0.5, 0.3], [1, 0], [1, 1]]
    assert sm.best_set(F, 3) == [0, 2, 3] and sm.best_set(F, 4) == [0, 1, 2, 3]
    assert sm.best_set(F, 5) == [0, 1, 2, 3, 4]
    # 20 evenly spaced points of one front: the ends, then equal distances taken in index order (a stable sort)
    assert sm.best_set([[i / 16, 1 - i / 16] for i in range(20)], 5) == [0, 1, 2, 3, 19]


def test_hypervolume_worked_example():
    # boxes up to the reference (1, 1): (0.5, 0.5) 0.25, (0.75, 0.25) 0.1875, overlapping in 0.125: 0.3125; the
    # point (0.25, 1.5) lies beyond the reference and adds nothing; nothing inside: 0
    assert sm.hypervolume([[0.5, 0.5], [0.25, 1.5], [0.75, 0.25]], (1.0, 1.0)) == pytest.approx(0.3125)
    assert sm.hypervolume([[2.0, 2.0]], (1.0, 1.0)) == 0.0


def test_surrogate_sees_every_gene_and_the_size():
    # the features of genome (1, 2) with ln params 5 are (1, 2, 5): every gene, then f2
    assert sm.Surrogate.features([[1, 2], [3, 4]], [5.0, 6.0]).tolist() == [[1, 2, 5], [3, 4, 6]]
    # a target that depends on the last gene only: the forest must see it to predict it (1.0 vs 0.0)
    genomes = np.array([[a, b] for a in range(3) for b in range(2) for _ in range(4)])
    target = genomes[:, 1].astype(float)
    mean, _ = sm.Surrogate().fit(genomes, np.zeros(len(genomes)), target).predict([[0, 1], [2, 0]], [0.0, 0.0])
    assert mean == pytest.approx([1.0, 0.0], abs=0.05)


class Split:
    """A stand-in for a search split: its length; evaluate() below gives it the metrics of each epoch."""

    def __init__(self, name, acc, loss):
        self.name, self.acc, self.loss, self.epoch, self.device = name, acc, loss, 0, 'cpu'

    def __len__(self):
        return 4


def stub_training(monkeypatch, train, val):
    """candidate.fit without training: no steps, and engine.evaluate returns each split's next epoch's numbers."""
    monkeypatch.setattr(candidate, 'search_data', lambda cfg: (train, val))
    monkeypatch.setattr(data, 'batches', lambda *a, **k: [])
    monkeypatch.setattr(engine, 'run_epoch', lambda *a, **k: (0.0, 0.0))

    def evaluate(model, split, batch_size):
        e = split.epoch
        split.epoch += 1
        return {'acc': split.acc[e], 'auc': 50.0, 'loss': split.loss[e], 'prob': np.array([0.2, 0.7])}
    monkeypatch.setattr(engine, 'evaluate', evaluate)


EVOLVE = dict(DEVICE='cpu', CUBE=8, PRIMITIVES=('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3'), FILTERS=(4,),
              CELLS=(2,), LRS=(0.01,), ALPHA=0.25, BETA=0.25, LAST_EPOCHS=2, METRIC='acc')


@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler')  # no optimizer steps here
def test_f1_terms_come_from_their_splits(tmp_path, monkeypatch):
    # search-train acc 50, 60, 70 %; search-val acc 10, 20, 30 % with losses 0.9, 0.8, 0.7 (best: epoch 3 of E = 3).
    # f1 = 0.25 (1 - mean(0.6, 0.7)) + (1 - mean(0.2, 0.3)) + 0.25 (3 - 3) / 3 = 0.0875 + 0.75 = 0.8375
    train = Split('train', [50.0, 60.0, 70.0], [5.0, 4.0, 6.0])  # its losses would give another best epoch
    val = Split('val', [10.0, 20.0, 30.0], [0.9, 0.8, 0.7])
    stub_training(monkeypatch, train, val)
    cfg = {**train_evolve.DEFAULTS, **EVOLVE, 'EPOCHS': 3, 'PATIENCE': 0}
    result = candidate.train_candidate(cfg, 0, (0,) * len(candidate.gene_space(cfg)), str(tmp_path / '0000.json'))
    assert result['m_train'] == pytest.approx(0.65) and result['m_val'] == pytest.approx(0.25)
    assert result['e_best'] == 3 and result['f1'] == pytest.approx(0.8375)


@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler')
@pytest.mark.parametrize('patience, epochs_run', [(2, 4), (1, 3), (0, 6)])
def test_early_stopping_counts_patience_exactly(patience, epochs_run, monkeypatch):
    # search-val losses 0.5, 0.4, 0.4, 0.4, 0.3, 0.2: best at epoch 2; epochs 3 and 4 tie it (no improvement), so
    # PATIENCE 2 stops after epoch 4, PATIENCE 1 after epoch 3, 0 (off) runs all 6
    val = Split('val', [50.0] * 6, [0.5, 0.4, 0.4, 0.4, 0.3, 0.2])
    stub_training(monkeypatch, Split('train', [50.0] * 6, [1.0] * 6), val)
    cfg = {**train_evolve.DEFAULTS, **EVOLVE, 'EPOCHS': 6, 'PATIENCE': patience}
    hist, diverged = candidate.fit(cfg, torch.nn.Linear(1, 1), 0.01, 0, 'c', '')
    assert not diverged and hist['val_loss'] == [0.5, 0.4, 0.4, 0.4, 0.3, 0.2][:epochs_run]


def archive_row(idx, f1, params):
    return {'index': idx, 'generation': 0, 'phase': 'init', 'subproblem': '', 'genome': (idx,),
            'genotype': genotypes.NAS_HBO_PAPER, 'C': 4, 'cells': 2, 'lr': 0.01, 'params': params, 'f1': f1,
            'f2': math.log(params), 'm_val': 0.5, 'epochs': 1, 'diverged': False, 'seconds': 0.0}


def test_output_front_minimizes_both_objectives(tmp_path):
    # (f1, params): #0 (0.3, 1000), #1 (0.2, 4000), #2 (0.5, 500) are non-dominated; #3 (0.4, 3000) is dominated by
    # #0 and #4 (0.6, 800) by #2. pareto.csv lists the front by size: #2, #0, #1
    run = runfolder.Run('train_evolve', {'METRIC': 'acc'}, str(tmp_path))
    out = Outputs(run, {'METRIC': 'acc', 'LAST_EPOCHS': 1})
    archive = []
    for idx, (f1, params) in enumerate([(0.3, 1000), (0.2, 4000), (0.5, 500), (0.4, 3000), (0.6, 800)]):
        archive.append(archive_row(idx, f1, params))
        out.evaluated(archive)
    with open(run.file('pareto.csv')) as f:
        assert [line.split(',')[0] for line in f.read().splitlines()[1:]] == ['2', '0', '1']
    assert sorted(os.listdir(run.file('front'))) == [f'candidate_{i:04d}.json' for i in (0, 1, 2)]


# ---------------------------------------------------------------- train_search.py: the kept genotype


def test_kept_genotype_comes_from_an_epoch_after_the_warm_up(tmp_path, monkeypatch):
    # search-val acc 90, 30, 20 % at epochs 0 (warm-up: weights only), 1, 2 with WARMUP_EPOCHS 1: the best epoch that
    # may give the genotype is 1 (epoch 0 is not an architecture; counting it or skipping epoch 1 gives 0 or 2)
    cubes = write_cube_set(tmp_path / 'cubes', n_folds=3, size=8)
    real = engine.evaluate

    def evaluate(model, split, batch_size, desc='', *a, **k):
        ev = real(model, split, batch_size, desc, *a, **k)
        return {**ev, 'acc': {0: 90.0, 1: 30.0, 2: 20.0}[int(desc.split()[-1])]}
    monkeypatch.setattr(engine, 'evaluate', evaluate)
    out = train_search.main(DATA=cubes, RUNS=str(tmp_path / 'runs'), DEVICE='cpu', C=4, LAYERS=3, CUBE=8,
                            BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
                            PRIMITIVES=('max_pool_3x3x3', 'skip_connect'), EPOCHS=3, WARMUP_EPOCHS=1, SEED=3,
                            FIGURES=False)
    assert out['best_epoch'] == 1


# ---------------------------------------------------------------- zo.py: the perturbation scale


class ArchPair(torch.nn.Module):
    """Architecture parameters (3, 0) and (0, 4): ||alpha|| = 5 over both (25 squared, 3 for the first alone)."""

    def __init__(self):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor([3.0, 0.0]))
        self.beta = torch.nn.Parameter(torch.tensor([[0.0, 4.0]]))
        self.w = torch.nn.Parameter(torch.ones(2))

    def arch_parameters(self):
        return [self.alpha, self.beta]


def test_zeroth_order_perturbation_is_relative_to_the_norm():
    # mu = MU ||alpha|| = 0.1 x 5 = 0.5 (0.1 x 25 = 2.5 with the squared norm)
    model = ArchPair()
    updater = ZerothOrder(model, torch.optim.SGD([model.w], 0.1), None, 2, 0.1, 5.0)
    updater._start_period()
    assert float(updater.twin['mu']) == pytest.approx(0.5)
    assert float(torch.cat([d.flatten() for d in updater.twin['u']]).norm()) == pytest.approx(1.0)


# ---------------------------------------------------------------- settings.py: what a resume may change

RESUMABLE = {'DEVICE', 'FAST_KERNELS', 'CUDA_GRAPHS', 'CHECKPOINT_CELLS', 'FIGURES', 'PARALLEL', 'TENSORBOARD'}


def another_value(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + 'x'
    return tuple(v) + tuple(v[:1]) if v else (1,)


@pytest.mark.parametrize('script', [train_search, train_3D_continuation, train_evolve])
def test_a_resume_may_change_exactly_the_machine_settings(script, tmp_path):
    # each setting given with another value on resume: refused unless it says how to run, not what is computed
    defaults = script.DEFAULTS
    with open(tmp_path / 'config.json', 'w') as f:
        json.dump(defaults, f)
    changed = set()
    for k, v in defaults.items():
        if k == 'RESUME':
            continue
        try:
            settings.resumed_settings(str(tmp_path), {k: another_value(v)}, defaults)
            changed.add(k)
        except utils.UserError as e:
            assert 'cannot change when resuming' in str(e), (k, e)
    assert changed == RESUMABLE & set(defaults)


# ---------------------------------------------------------------- scans/labels.py: the duplicate radius


def test_duplicates_are_centres_closer_than_2_mm():
    # (0, 0, 0) and (1.2, 1.2, 0.8): 1.876 mm apart, merged; (10, 0, 0) and (11.5, 1.5, 0): 2.121 mm (1.5 along each
    # of two axes), kept; (20, 0, 0) and (22, 0, 0): exactly 2 mm, kept; the same point in another scan, kept
    points = [('a', 0, 0, 0), ('a', 1.2, 1.2, 0.8), ('a', 10, 0, 0), ('a', 11.5, 1.5, 0), ('a', 20, 0, 0),
              ('a', 22, 0, 0), ('b', 0, 0, 0)]
    rows = [{'seriesuid': s, 'coordX': float(x), 'coordY': float(y), 'coordZ': float(z), 'diameter_mm': 6.0,
             'label': 0, '_line': i + 2} for i, (s, x, y, z) in enumerate(points)]
    problems = []
    kept, notes = labels.merge_duplicates(rows, problems)
    assert [r['_line'] for r in kept] == [2, 4, 5, 6, 7, 8] and problems == []
    assert notes == ['line 3 merged into line 2: the same nodule (1.9 mm apart, same label)']


# ---------------------------------------------------------------- nodclsgbt.py: the block means


def test_gradient_boosting_features_average_each_block():
    # voxel (z, y, x) = 16 z + 4 y + x in a 4^3 cube; the 2^3 block (bz, by, bx) averages to
    # 16 (2 bz + 0.5) + 4 (2 by + 0.5) + (2 bx + 0.5) = 32 bz + 8 by + 2 bx + 10.5, flattened z, y, x
    cube = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)
    expected = [10.5, 12.5, 18.5, 20.5, 42.5, 44.5, 50.5, 52.5]
    assert nodclsgbt.features(cube[None], 2).tolist() == [expected]
    odd = np.full((5, 5, 5), 255, np.uint8)  # an odd edge: the last plane of each axis is cropped
    odd[:4, :4, :4] = cube
    assert nodclsgbt.features(np.stack([odd, odd]), 2).tolist() == [expected, expected]


# ---------------------------------------------------------------- utils.py: Ctrl-C during an atomic write


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / 'r.json')
    utils.save_json_atomic(path, {'old': 1})

    def interrupted(obj):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        utils.save_json_atomic(path, {'new': object()}, default=interrupted)
    assert os.listdir(tmp_path) == ['r.json'] and json.load(open(path)) == {'old': 1}


# ---------------------------------------------------------------- train_3D_continuation.py: drop path in place


def test_drop_path_tensor_of_a_graphed_retrain_is_updated_in_place(tmp_path, monkeypatch):
    # With CUDA_GRAPHS the captured step reads the drop-path tensor graphs.graph_ready_values made: each epoch
    # must write its new value (DROP_PATH e / E = 0, 0.1, 0.2) into that tensor, not bind a new one. On the CPU the
    # graphed step is the eager one over the same graph-ready model.
    cubes = write_cube_set(tmp_path / 'cubes', size=8)
    seen, ready = [], {}  # per epoch: (the graph-ready tensor itself?, its value); the model and its tensor
    eager, real_epoch = graphs.retrain_step, engine.run_epoch

    def graph_ready(model, opt, params, grad_clip, cuda_graphs=False, **kw):
        ready['model'], ready['tensor'] = model, graphs.graph_ready_values(model).drop_path_prob
        return eager(model, opt, params, grad_clip, False, **kw)

    def run_epoch(*a, **k):
        prob = ready['model'].drop_path_prob
        seen.append((prob is ready['tensor'], float(prob)))
        return real_epoch(*a, **k)
    monkeypatch.setattr(graphs, 'retrain_step', graph_ready)
    monkeypatch.setattr(engine, 'run_epoch', run_epoch)
    train_3D_continuation.main(DATA=cubes, RUNS=str(tmp_path / 'runs'), C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4,
                               DEVICE='cpu', SEED=0, FIGURES=False, EPOCHS=3, DROP_PATH=0.3, FOLD=5)
    assert seen == [(True, 0.0), (True, pytest.approx(0.1)), (True, pytest.approx(0.2))]
