"""Kills at the moments where resuming used to differ from an uninterrupted run, damaged run folders, and the NaN guard
at evaluation. A kill is simulated by raising from a patched function at that moment. Tiny first-order searches
(C=4, 3 cells, 8^3 crops, 2 epochs) and retrains."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_cube_set

import data
import engine
import runfolder
import train_3D_continuation as retrain
import train_search
import utils
from utils import UserError

SEARCH = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
              PRIMITIVES=('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3'), EPOCHS=2, WARMUP_EPOCHS=0, SEED=3,
              HYPERGRAD='first')
RETRAIN = dict(C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, DEVICE='cpu', SEED=0, FOLD=8, EPOCHS=2)


class Killed(Exception):
    """A simulated kill."""


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=2)


def only_folder(runs):
    (name,) = os.listdir(runs)
    return os.path.join(runs, name)


def kill_at_finish(monkeypatch):
    """train_search.finish records (model.tau, the genotype it would write, the last epoch), then the run is killed:
    all epochs and their checkpoint are done, genotype.json is not final yet."""
    seen = []

    def finish(run, model, best, epoch, *args, **kwargs):
        seen.append((model.tau, model.genotype(), epoch))
        raise Killed
    monkeypatch.setattr(train_search, 'finish', finish)
    return seen


def count_epochs(monkeypatch):
    calls = []
    real = train_search.search_epoch

    def search_epoch(epoch, *args, **kwargs):
        calls.append(epoch)
        return real(epoch, *args, **kwargs)
    monkeypatch.setattr(train_search, 'search_epoch', search_epoch)
    return calls


def read_genotype(folder):
    with open(os.path.join(folder, 'genotype.json')) as f:
        return json.load(f)


# ---------------------------------------------------------------- search: resume at the end

def test_finished_sparsemax_search_resumed_keeps_the_annealed_temperature(cubes, tmp_path, monkeypatch):
    settings = dict(SEARCH, DATA=cubes, RUNS=str(tmp_path), WEIGHTS='sparsemax', TAU_EVERY=1, TAU_FACTOR=0.5)
    with monkeypatch.context() as m:
        seen = kill_at_finish(m)
        with pytest.raises(Killed):
            train_search.main(**settings)
    ((tau, genotype, epoch),) = seen
    assert tau == pytest.approx(1.5 * 0.5) and epoch == 1   # the temperature of the last epoch (1)
    folder = only_folder(tmp_path)
    real_finish, seen = train_search.finish, []

    def finish(run, model, *args, **kwargs):
        seen.append(model.tau)
        return real_finish(run, model, *args, **kwargs)
    monkeypatch.setattr(train_search, 'finish', finish)
    calls = count_epochs(monkeypatch)
    result = train_search.main(RESUME=folder, DEVICE='cpu')
    assert calls == [] and seen == [tau]                     # no epoch trained, the final genotype at tau 0.75
    assert result['genotype'] == genotype
    assert read_genotype(folder)['normal'] == [list(e) for e in genotype.normal]


def test_search_resumed_after_its_early_stop_trains_no_more(cubes, tmp_path, monkeypatch):
    def evaluate(model, data, batch_size, *args, **kwargs):  # search-val accuracy never improves after epoch 0
        return {'loss': 0.5, 'acc': 50.0, 'auc': 50.0, 'prob': None}
    monkeypatch.setattr(engine, 'evaluate', evaluate)
    settings = dict(SEARCH, DATA=cubes, RUNS=str(tmp_path), EPOCHS=4, PATIENCE=1)
    with monkeypatch.context() as m:
        seen = kill_at_finish(m)
        with pytest.raises(Killed):
            train_search.main(**settings)
    ((_, genotype, epoch),) = seen
    assert epoch == 1                                        # stopped after epoch 1 of 4
    folder = only_folder(tmp_path)
    calls = count_epochs(monkeypatch)
    result = train_search.main(RESUME=folder, DEVICE='cpu')
    assert calls == [] and result['epochs_done'] == 2 and result['genotype'] == genotype
    assert pd.read_csv(os.path.join(folder, 'metrics.csv'))['epoch'].tolist() == [0, 1]
    with open(os.path.join(folder, 'log.txt')) as f:
        assert 'the run had stopped early after epoch 1' in f.read()


# ---------------------------------------------------------------- search: kills before the first checkpoint

@pytest.fixture(scope='module')
def straight(cubes, tmp_path_factory):
    return train_search.main(**SEARCH, DATA=cubes, RUNS=str(tmp_path_factory.mktemp('runs')))


def test_search_killed_before_its_first_checkpoint_and_while_writing_config(cubes, tmp_path, monkeypatch, straight):
    """Killed in epoch 0 (no last.pt yet), then killed again while a resume rewrites config.json: the folder stays
    resumable, and the resume starts epoch 0 over and equals an uninterrupted run. Then metrics.csv is deleted:
    resuming the finished run says which rows are lost."""
    def search_epoch(epoch, *args):
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(train_search, 'search_epoch', search_epoch)
        with pytest.raises(Killed):
            train_search.main(**SEARCH, DATA=cubes, RUNS=str(tmp_path))
    folder = only_folder(tmp_path)
    assert not os.path.exists(os.path.join(folder, 'last.pt'))
    config = os.path.join(folder, 'config.json')
    with open(config) as f:
        before = f.read()

    def dump(obj, f, **kwargs):  # killed half-way through writing
        text = json.dumps(obj, **kwargs)
        f.write(text[:len(text) // 2])
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(json, 'dump', dump)
        with pytest.raises(Killed):
            train_search.main(RESUME=folder, DEVICE='cpu')
    with open(config) as f:
        assert f.read() == before
    resumed = train_search.main(RESUME=folder, DEVICE='cpu')
    assert resumed['genotype'] == straight['genotype']
    a, b = (torch.load(os.path.join(r, 'last.pt'), weights_only=False) for r in (folder, straight['run']))
    assert a['epoch'] == b['epoch'] == 1
    for name in b['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    rows = [pd.read_csv(os.path.join(r, 'metrics.csv')).drop(columns='seconds') for r in (folder, straight['run'])]
    pd.testing.assert_frame_equal(*rows)
    with open(os.path.join(folder, 'log.txt')) as f:
        assert 'resumed before the first checkpoint' in f.read()

    os.remove(os.path.join(folder, 'metrics.csv'))
    train_search.main(RESUME=folder, DEVICE='cpu')
    with open(os.path.join(folder, 'log.txt')) as f:
        assert 'warning: metrics.csv is missing: rows of epoch(s) 0-1 (2) are lost' in f.read()


# ---------------------------------------------------------------- damaged or foreign run folders

def snapshot(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), 'rb') as f:
            out[name] = f.read()
    return out


def fake_folder(path, script, **changes):
    """A run folder as `script` writes it before its first checkpoint: config.json and a log."""
    os.makedirs(path)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump({**script.DEFAULTS, 'DEVICE': 'cpu', **changes}, f)
    with open(os.path.join(path, 'log.txt'), 'w') as f:
        f.write('run folder\n')
    return str(path)


@pytest.mark.parametrize('script, other', [(train_search, retrain), (retrain, train_search)],
                         ids=['search-resumes-retrain', 'retrain-resumes-search'])
def test_folder_of_the_other_script_is_rejected_untouched(tmp_path, script, other):
    folder = fake_folder(tmp_path / 'run', other)
    before = snapshot(folder)
    with pytest.raises(UserError, match=f'RESUME={folder}: not a run folder of this script: its config.json has '
                                        'setting'):
        script.main(RESUME=folder, DEVICE='cpu')
    assert snapshot(folder) == before


@pytest.mark.parametrize('script', [train_search, retrain], ids=['search', 'retrain'])
@pytest.mark.parametrize('damage, message', [
    ('', 'config.json is empty; the run cannot be continued'),
    ('{"EPOCHS": 2, "C"', r'config.json cannot be read \(Expecting'),
    ('[1, 2]', 'config.json holds no settings'),
    ('lacks', 'config.json lacks setting.s. EPOCHS'),
    ('type', "config.json: EPOCHS='two' is not a int"),
])
def test_damaged_config_is_one_line_and_nothing_is_touched(tmp_path, script, damage, message):
    folder = fake_folder(tmp_path / 'run', script)
    path = os.path.join(folder, 'config.json')
    saved = {**script.DEFAULTS, 'DEVICE': 'cpu'}
    if damage == 'lacks':
        damage = json.dumps({k: v for k, v in saved.items() if k != 'EPOCHS'})
    elif damage == 'type':
        damage = json.dumps({**saved, 'EPOCHS': 'two'})
    with open(path, 'w') as f:
        f.write(damage)
    before = snapshot(folder)
    with pytest.raises(UserError, match=f'RESUME={folder}: .*{message}'):
        script.main(RESUME=folder, DEVICE='cpu')
    assert snapshot(folder) == before


@pytest.mark.parametrize('text, message', [('{"fold": 8, "acc"', 'cannot be read'), ('{"fold": 8}', 'is not a result')])
def test_corrupt_fold_result_is_named_before_anything_is_touched(cubes, tmp_path, text, message):
    folder = fake_folder(tmp_path / 'run', retrain, **RETRAIN, DATA=cubes, RUNS=str(tmp_path))
    with open(os.path.join(folder, 'result_fold8.json'), 'w') as f:
        f.write(text)
    before = snapshot(folder)
    with pytest.raises(UserError, match=f'result_fold8.json {message}.*delete it to evaluate fold 8 again'):
        retrain.main(RESUME=folder, DEVICE='cpu')
    assert snapshot(folder) == before


# ---------------------------------------------------------------- NaN after the last checked step

def poison_last_step(monkeypatch, n):
    """engine.train_step's n-th call (1-based) leaves NaN weights after a finite loss: only evaluation sees them."""
    real, calls = engine.train_step, []

    def step(model, *args):
        out = real(model, *args)
        calls.append(1)
        if len(calls) == n:
            with torch.no_grad():
                model.classifier.weight.fill_(float('nan'))
        return out
    monkeypatch.setattr(engine, 'train_step', step)


def assert_good_checkpoint(path):
    state = runfolder.load_checkpoint(path)
    assert state['epoch'] == 0
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())


def test_nan_after_the_last_checked_search_step_stops_at_evaluation(cubes, tmp_path, monkeypatch):
    poison_last_step(monkeypatch, 6)                          # 3 weight steps per epoch: epoch 1's last
    with pytest.raises(UserError, match=r'loss is nan at search-val evaluation of epoch 1; stopping: the last good '
                                        r'checkpoint is kept in .*last\.pt'):
        train_search.main(**SEARCH, DATA=cubes, RUNS=str(tmp_path))
    assert_good_checkpoint(os.path.join(only_folder(tmp_path), 'last.pt'))


def test_nan_after_the_last_checked_retrain_step_stops_at_evaluation(cubes, tmp_path, monkeypatch):
    poison_last_step(monkeypatch, 2 * 9)                      # 36 training nodules in batches of 4: epoch 1's last
    with pytest.raises(UserError, match=r'loss is nan at fold 8 test evaluation of epoch 1; stopping: the last good '
                                        r'checkpoint is kept in .*last_fold8\.pt'):
        retrain.main(**RETRAIN, DATA=cubes, RUNS=str(tmp_path))
    folder = only_folder(tmp_path)
    assert_good_checkpoint(os.path.join(folder, 'last_fold8.pt'))
    assert not os.path.exists(os.path.join(folder, 'result_fold8.json'))


def test_evaluate_without_a_run_folder_names_the_outputs(cubes):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 ** 3, 2))
    with torch.no_grad():
        model[1].bias.fill_(float('nan'))
    table = data.read_table(cubes)
    test, _ = data.load_split(cubes, table, [8], 8, 'cpu')
    with pytest.raises(UserError, match='loss is nan at evaluation: the model gives non-finite outputs'):
        engine.evaluate(model, test, 4)


# ---------------------------------------------------------------- metrics rows on resume

def test_continue_metrics_keeps_whole_rows_of_checkpointed_epochs_and_says_what_is_lost(tmp_path):
    run = runfolder.Run('test', {}, path=str(tmp_path / 'run'))
    run.quiet = True
    run.metrics_rows([{'epoch': e, 'loss': 0.5 + e} for e in range(4)])
    with open(run.file('metrics.csv'), 'a') as f:
        f.write('4,0.')                                      # a row cut short by a kill
    assert run.continue_metrics(4) == []                     # epochs 0-3 are in the checkpoint: nothing lost
    assert pd.read_csv(run.file('metrics.csv'))['epoch'].tolist() == [0, 1, 2, 3]
    assert run.continue_metrics(2) == []
    assert pd.read_csv(run.file('metrics.csv'))['epoch'].tolist() == [0, 1]
    with open(run.file('metrics.csv')) as f:
        lines = f.read().splitlines()
    with open(run.file('metrics.csv'), 'w') as f:
        f.write('\n'.join([lines[0], lines[2]]) + '\n')       # epoch 0's row deleted by hand
    assert run.continue_metrics(2) == [0]
    os.remove(run.file('metrics.csv'))
    assert run.continue_metrics(3) == [0, 1, 2]
    run.metrics_row({'epoch': 3, 'loss': 3.5})
    assert pd.read_csv(run.file('metrics.csv'))['epoch'].tolist() == [3]
    with open(run.file('log.txt')) as f:
        log = f.read()
    assert 'warning: metrics.csv lacks their rows: rows of epoch(s) 0-0 (1) are lost' in log
    assert 'warning: metrics.csv is missing: rows of epoch(s) 0-2 (3) are lost (their numbers are in log.txt); ' \
        'rows from epoch 3 on are appended' in log


# ---------------------------------------------------------------- a resumed run keeps its own settings

def spy_fast_kernels(monkeypatch):
    import dwconv3d
    seen, real = [], dwconv3d.set_fast_kernels

    def set_fast_kernels(enabled):
        seen.append(enabled)
        real(enabled)
    monkeypatch.setattr(dwconv3d, 'set_fast_kernels', set_fast_kernels)
    return seen


def saved_config(folder):
    with open(os.path.join(folder, 'config.json')) as f:
        return json.load(f)


def log_lines(folder, start):
    with open(os.path.join(folder, 'log.txt')) as f:
        return [line.strip() for line in f if line.startswith(start)]


def pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith('.png'))


def test_resumed_search_keeps_the_run_settings_and_logs_the_given_changes(cubes, tmp_path, monkeypatch):
    """The run's FIGURES, CHECKPOINT_CELLS and FAST_KERNELS (not this script's defaults: True, False, False) hold on
    resume; only a given one changes, and the log says so."""
    mine = dict(FIGURES=False, CHECKPOINT_CELLS=True, FAST_KERNELS=True)
    train_search.main(**{**SEARCH, 'EPOCHS': 1}, DATA=cubes, RUNS=str(tmp_path), **mine)
    folder = only_folder(tmp_path)
    built, real_build = [], train_search.build

    def build(cfg):
        out = real_build(cfg)
        built.append(out[0].checkpoint_cells)
        return out
    monkeypatch.setattr(train_search, 'build', build)
    fast = spy_fast_kernels(monkeypatch)
    train_search.main(RESUME=folder)
    assert built == [True] and fast == [True] and pngs(folder) == []
    assert {k: saved_config(folder)[k] for k in mine} == mine
    assert log_lines(folder, 'resumed with') == ['resumed with the settings of its config.json (none changed)']
    train_search.main(RESUME=folder, CHECKPOINT_CELLS=False, DEVICE='cpu')
    assert built == [True, False] and saved_config(folder)['CHECKPOINT_CELLS'] is False
    assert log_lines(folder, 'resumed with')[-1] == \
        'resumed with the settings of its config.json, changed: CHECKPOINT_CELLS True -> False'


def test_resumed_retrain_keeps_the_run_settings(cubes, tmp_path, monkeypatch):
    """Killed in its second epoch; the resume trains with the run's CHECKPOINT_CELLS and FAST_KERNELS and draws no
    figures (this script's defaults: False, True, True)."""
    mine = dict(FIGURES=False, CHECKPOINT_CELLS=True, FAST_KERNELS=False)
    cells, real_step = [], engine.train_step

    def step(model, *args):
        cells.append(model.checkpoint_cells)
        if len(cells) == 10:                                 # 36 training nodules in batches of 4: epoch 1's first
            raise Killed
        return real_step(model, *args)
    monkeypatch.setattr(engine, 'train_step', step)
    with pytest.raises(Killed):
        retrain.main(**{**RETRAIN, 'EPOCHS': 2}, DATA=cubes, RUNS=str(tmp_path), **mine)
    folder = only_folder(tmp_path)
    cells.clear()
    fast = spy_fast_kernels(monkeypatch)
    result = retrain.main(RESUME=folder)
    assert cells == [True] * 9 and fast == [False] and pngs(folder) == []
    assert [r['fold'] for r in result['folds']] == [8]
    assert {k: saved_config(folder)[k] for k in mine} == mine
    assert log_lines(folder, 'resumed with') == ['resumed with the settings of its config.json (none changed)']


def fake_candidate(cfg, idx, genome, path):
    """A stand-in for training a candidate: its result file as train_candidate writes it."""
    from evolution import candidate
    params = candidate.gene_space(cfg).params(genome)
    result = {'index': idx, 'genome': [int(v) for v in genome], 'params': params, 'f1': (sum(genome) % 7) / 7,
              'f2': float(np.log(params)), 'e_best': 1, 'epochs': 1, 'diverged': False, 'm_train': 0.5, 'm_val': 0.5,
              'acc_val': 50.0, 'auc_val': 50.0, 'val_loss': 0.7, 'seconds': 0.0}
    if os.path.exists(path):
        return candidate.read_candidate(path, genome)
    utils.save_json_atomic(path, result)
    return result


EVOLVE = dict(DEVICE='cpu', CUBE=8, EPOCHS=1, LAST_EPOCHS=1, PRIMITIVES=('max_pool_3x3x3', 'skip_connect'),
              FILTERS=(4,), CELLS=(2, 3), POPULATION=2, NEIGHBOURS=2, GENERATIONS=2, LEARNING_GENERATIONS=1)


def test_resumed_evolutionary_search_keeps_its_parallel_mode(cubes, tmp_path, monkeypatch):
    import parallel
    import train_evolve
    from figures import search
    modes = []

    def map_jobs(fn, jobs, mode='off', names=None, log=print, gpus=None):
        modes.append(mode)
        return [fn(*args) for args in jobs]
    monkeypatch.setattr(train_evolve, 'train_candidate', fake_candidate)
    monkeypatch.setattr(parallel, 'map_jobs', map_jobs)
    monkeypatch.setattr(search, 'plot_pareto', lambda *a, **k: None)
    first = train_evolve.main(**EVOLVE, DATA=cubes, RUNS=str(tmp_path), PARALLEL='ray')
    assert set(modes) == {'ray'}
    modes.clear()
    again = train_evolve.main(RESUME=first['run'])                # PARALLEL's default is 'off'
    assert set(modes) == {'ray'} and again['evaluated'] == first['evaluated']
    assert saved_config(first['run'])['PARALLEL'] == 'ray'
