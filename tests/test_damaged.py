"""A damaged file of a run folder being resumed (a metrics CSV of binary content, a truncated checkpoint, a cut or
foreign candidate result) is one line naming it and what to do, found before anything in the folder is written:
every file of the folder is byte-identical afterwards. Then what the line says to do works. Tiny runs (C=4, 8^3)."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import write_cube_set
from test_resume import EVOLVE, RETRAIN, SEARCH, Killed, fake_candidate, only_folder

import train_3D_continuation as retrain
import train_evolve
import train_search
from utils import UserError

BINARY = np.random.default_rng(0).bytes(3000)  # e.g. a file overwritten by a disk error


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=2)


@pytest.fixture(scope='module')
def search_run(cubes, tmp_path_factory):
    """A finished one-epoch search."""
    return train_search.main(**{**SEARCH, 'EPOCHS': 1}, DATA=cubes, RUNS=str(tmp_path_factory.mktemp('search')),
                             FIGURES=False)['run']


@pytest.fixture(scope='module')
def retrain_run(cubes, tmp_path_factory):
    """A retrain of fold 8 killed in its second epoch: last_fold8.pt holds epoch 0."""
    runs = tmp_path_factory.mktemp('retrain')
    with pytest.MonkeyPatch.context() as m:
        import engine
        calls, real = [], engine.train_step

        def step(*args):
            calls.append(1)
            if len(calls) == 10:
                raise Killed
            return real(*args)
        m.setattr(engine, 'train_step', step)
        with pytest.raises(Killed):
            retrain.main(**{**RETRAIN, 'EPOCHS': 2}, DATA=cubes, RUNS=str(runs), FIGURES=False)
    return only_folder(runs)


def evolve_patches(m):
    import parallel
    from figures import search
    m.setattr(train_evolve, 'train_candidate', fake_candidate)
    m.setattr(parallel, 'map_jobs', lambda fn, jobs, *a, **k: [fn(*args) for args in jobs])
    m.setattr(search, 'plot_pareto', lambda *a, **k: None)


@pytest.fixture(scope='module')
def evolve_run(cubes, tmp_path_factory):
    """A finished evolutionary search: candidates/, evaluations.csv, pareto.csv, front/."""
    with pytest.MonkeyPatch.context() as m:
        evolve_patches(m)
        return train_evolve.main(**EVOLVE, DATA=cubes, RUNS=str(tmp_path_factory.mktemp('evolve')))['run']


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / 'run')


def snapshot(folder):
    """Every file under `folder` (subfolders too), as bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def damage(path, how):
    """Overwrite a file with binary content, its first half ('cut': a kill mid-write), or the text `how`."""
    with open(path, 'rb') as f:
        body = f.read()
    with open(path, 'wb') as f:
        f.write({'binary': BINARY, 'cut': body[:len(body) // 2]}.get(how) or how.encode())


def assert_refused_untouched(script, folder, message):
    before = snapshot(folder)
    with pytest.raises(UserError, match=message) as error:
        script.main(RESUME=str(folder))
    assert '\n' not in str(error.value)
    assert snapshot(folder) == before


def log_of(folder):
    with open(os.path.join(folder, 'log.txt')) as f:
        return f.read()


# ---------------------------------------------------------------- metrics CSVs

@pytest.mark.parametrize('name, how, message', [
    ('metrics.csv', 'binary', r'cannot be read as a CSV table \(.*codec can.t decode'),
    ('weights.csv', 'binary', r'cannot be read as a CSV table \(.*codec can.t decode'),
    ('metrics.csv', 'a,b\n1,2\n', 'has no epoch column'),
])
def test_damaged_search_csv(search_run, tmp_path, name, how, message):
    folder = copy_of(search_run, tmp_path)
    damage(folder / name, how)
    assert_refused_untouched(train_search, folder, f'^{re.escape(str(folder / name))} {message}.*: delete it to '
                                                   r'continue the run \(the rows of its finished epochs are then lost')
    os.remove(folder / name)                                 # what the line says to do
    train_search.main(RESUME=str(folder))
    assert f'warning: {name} is missing: rows of epoch(s) 0-0 (1) are lost' in log_of(folder)


def test_damaged_retrain_csv_then_deleted(retrain_run, tmp_path):
    folder = copy_of(retrain_run, tmp_path)
    damage(folder / 'metrics_fold8.csv', 'binary')
    assert_refused_untouched(retrain, folder, f'^{re.escape(str(folder / "metrics_fold8.csv"))} cannot be read as a '
                                              'CSV table .*: delete it to continue the run')
    os.remove(folder / 'metrics_fold8.csv')
    result = retrain.main(RESUME=str(folder))
    assert [r['fold'] for r in result['folds']] == [8]
    assert 'warning: metrics_fold8.csv is missing: rows of epoch(s) 0-0 (1) are lost' in log_of(folder)


# ---------------------------------------------------------------- checkpoints

def edited_checkpoint(path, edit):
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize('how, message', [
    ('cut', r'cannot be read \(.*\)'),
    ('binary', r'cannot be read \(.*\)'),
    (lambda state: state.pop('gen'), r'lacks gen \(damaged\?\)'),
    (lambda state: state['model'].pop('classifier.weight'), r"holds a model that does not fit the network of the run's "
                                                            r'settings \(1 weight\(s\) differ, e.g. classifier.weight; '
                                                            r'from another version\?\)'),
])
def test_damaged_retrain_checkpoint_then_deleted(retrain_run, tmp_path, how, message):
    folder = copy_of(retrain_run, tmp_path)
    path = folder / 'last_fold8.pt'
    edited_checkpoint(path, how) if callable(how) else damage(path, how)
    assert_refused_untouched(retrain, folder, f'^checkpoint {re.escape(str(path))} {message}: delete it to train '
                                              'fold 8 again from its first epoch$')
    os.remove(path)
    assert [r['fold'] for r in retrain.main(RESUME=str(folder))['folds']] == [8]


@pytest.mark.parametrize('how, message', [
    ('cut', r'cannot be read \(.*\)'),
    (lambda state: state.pop('best'), r'lacks best \(damaged\?\)'),
])
def test_damaged_search_checkpoint_then_deleted(search_run, tmp_path, how, message):
    folder = copy_of(search_run, tmp_path)
    path = folder / 'last.pt'
    edited_checkpoint(path, how) if callable(how) else damage(path, how)
    assert_refused_untouched(train_search, folder, f'^checkpoint {re.escape(str(path))} {message}: delete it to start '
                                                   'the search again from epoch 0$')
    os.remove(path)
    assert train_search.main(RESUME=str(folder))['epochs_done'] == 1
    assert 'resumed before the first checkpoint' in log_of(folder)


# ---------------------------------------------------------------- evolutionary search: candidates/<n>.json

@pytest.mark.parametrize('how, message', [
    ('cut', r'cannot be read \(Expecting .*\)'),
    ('[1, 2]', r'is not a result of candidate 1 \(damaged\?\)'),
    ('{"index": 1, "genome": [0, 1]}', r'is not a result of candidate 1 \(damaged\?\)'),
    ('binary', r"cannot be read \('utf-8' codec can't decode .*\)"),
])
def test_damaged_candidate_result_then_deleted(evolve_run, tmp_path, monkeypatch, how, message):
    folder = copy_of(evolve_run, tmp_path)
    path = folder / 'candidates' / '0001.json'
    damage(path, how)
    assert {'evaluations.csv', 'pareto.csv', 'front'} <= set(os.listdir(folder))
    assert_refused_untouched(train_evolve, folder, f'^{re.escape(str(path))} {message}: delete it to train candidate 1 '
                                                   r'again \(the search is replayed from its seed\)$')
    os.remove(path)
    evolve_patches(monkeypatch)
    assert train_evolve.main(RESUME=str(folder))['evaluated'] == len(os.listdir(folder / 'candidates'))
    with open(folder / 'evaluations.csv') as f, open(os.path.join(evolve_run, 'evaluations.csv')) as g:
        assert f.read() == g.read()                          # candidate 1 trained again: the same search


def test_damaged_config_names_log_and_the_command_of_a_new_run(retrain_run, tmp_path):
    """config.json cut short: the line says the run cannot be continued, that log.txt holds the settings it ran with,
    and gives the command of a new run with them; that command's settings are the run's own."""
    import json
    import shlex

    import settings
    folder = copy_of(retrain_run, tmp_path)
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
        saved = json.load(f)
    with open(path, 'w') as f:
        f.write(json.dumps(saved)[:40])
    before = snapshot(folder)
    with pytest.raises(UserError) as info:
        retrain.main(RESUME=str(folder), DEVICE='cpu')
    message = str(info.value)
    assert snapshot(folder) == before and '\n' not in message
    log = os.path.join(folder, 'log.txt')
    head, sep, command = message.partition(f'; the run cannot be continued; {log} holds the settings it ran with '
                                           '(its lines "  NAME = value"): start a new run with them: ')
    assert head.startswith(f'RESUME={folder}: {path} cannot be read') and sep, message
    words = shlex.split(command)
    assert words[:2] == ['python', '<script>.py'] and '--RESUME' not in command
    assert f'--DATA={saved["DATA"]}' in words  # a string as typed, not quoted
    given = settings.parse_overrides(retrain.DEFAULTS, words[2:])
    assert {'C', 'LAYERS', 'CUBE', 'EPOCHS', 'DATA'} <= set(given)
    new = {**retrain.DEFAULTS, **given}
    for k, v in saved.items():
        if k not in settings.RESUMABLE_CHANGES:
            assert json.loads(json.dumps(new[k])) == v, k
