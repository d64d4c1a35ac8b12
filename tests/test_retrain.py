"""train_3D_continuation: run folder contents, k-fold tables, genotype lookup, resume equal to an uninterrupted
run, and the NaN guard. Tiny settings: C=4, 3 cells, 8^3 crops of 16^3 cubes, 2 nodules per fold."""
import csv
import json
import os

import pytest
import torch
from conftest import write_cube_set

import dwconv3d
import engine
import genotypes
import runfolder
import train_3D_continuation as retrain
import utils
from utils import UserError

TINY = dict(C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, DEVICE='cpu', SEED=0, FIGURES=False)  # figures: test_figures
STEPS = 5  # training steps per epoch: 18 training nodules in batches of 4


class Stop(Exception):
    """A simulated crash."""


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=1)


def run(cubes, runs, **settings):
    return retrain.main(DATA=cubes, RUNS=str(runs), **{**TINY, **settings})


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_text(path):
    with open(path) as f:
        return f.read()


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]


def crash_on_call(monkeypatch, n):
    """Make engine.train_step raise Stop at its n-th call (1-based); returns the list of the drop-path
    probabilities of the calls so far (its length counts the calls; clear it to count afresh)."""
    calls = []
    real = engine.train_step

    def step(model, *args):
        calls.append(model.drop_path_prob)
        if len(calls) == n:
            raise Stop
        return real(model, *args)
    monkeypatch.setattr(engine, 'train_step', step)
    return calls


@pytest.fixture(scope='module')
def straight(cubes, tmp_path_factory):
    """An uninterrupted 3-epoch run on test fold 8."""
    return run(cubes, tmp_path_factory.mktemp('runs'), FOLD=8, EPOCHS=3)


def test_single_fold_run_folder(straight):
    path = straight['run']
    assert {'config.json', 'log.txt', 'metrics_fold8.csv', 'result_fold8.json', 'results.json',
            'last_fold8.pt', 'model_fold8.pt'} <= set(os.listdir(path))
    cfg = read_json(os.path.join(path, 'config.json'))
    assert cfg['FOLD'] == '8' and cfg['EPOCHS'] == 3 and cfg['C'] == 4
    rows = read_csv(os.path.join(path, 'metrics_fold8.csv'))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert {'lr', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'test_auc'} <= set(rows[0])
    assert float(rows[0]['lr']) == pytest.approx(0.025) and float(rows[1]['lr']) < 0.025   # cosine
    (fold,) = straight['folds']
    assert fold['fold'] == 8 and set(utils.METRIC_NAMES) <= set(fold)
    assert all(0 <= fold[k] <= 100 for k in ('acc', 'spec')) and fold['acc'] in (0.0, 50.0, 100.0)
    model = retrain.NetworkLUNA(4, 2, 3, genotypes.NAS_HBO_PAPER)
    assert fold['params_M'] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    # the final epoch is reported; the best epoch separately
    assert fold['acc'] == pytest.approx(float(rows[-1]['test_acc']))
    accs = [float(r['test_acc']) for r in rows]
    assert fold['best']['acc'] == pytest.approx(max(accs)) and accs[fold['best']['epoch']] == max(accs)
    assert read_json(os.path.join(path, 'result_fold8.json')) == fold
    assert read_json(os.path.join(path, 'results.json')) == [fold]
    log = read_text(os.path.join(path, 'log.txt'))
    assert 'fold 8: train folds [0, 1, 2, 3, 4, 5, 6, 7, 9] 18 (9/9), test 2 (1/1)' in log
    assert 'EPOCHS = 3' in log and 'git ' in log and 'fold 8 epoch   2 lr' in log
    assert 'genotype NAS_HBO_PAPER: Genotype(normal=[(\'dil_conv_5x5x5\', 0)' in log
    model.load_state_dict(weights(os.path.join(path, 'model_fold8.pt')))


def test_resume_equals_an_uninterrupted_run(cubes, tmp_path, monkeypatch, straight):
    # The interrupted run has the same settings (the cosine schedule depends on EPOCHS). It dies while
    # saving epoch 2's checkpoint: epoch 2's metrics row is written, the checkpoint holds epoch 1, and the
    # global RNG has moved (drop path is on from epoch 1), so the resume must restore it.
    calls = crash_on_call(monkeypatch, 0)
    real_save, armed = engine.save_state, [True]

    def save_state(path, epoch, *args, **kwargs):
        if epoch == 2 and armed[0]:
            raise Stop
        real_save(path, epoch, *args, **kwargs)
    monkeypatch.setattr(engine, 'save_state', save_state)
    with pytest.raises(Stop):
        run(cubes, tmp_path, FOLD=8, EPOCHS=3)
    assert calls == [0.0] * STEPS + [pytest.approx(0.2 / 3)] * STEPS + [pytest.approx(0.4 / 3)] * STEPS
    (path,) = [os.path.join(tmp_path, p) for p in os.listdir(tmp_path)]
    assert weights(os.path.join(path, 'last_fold8.pt'))['epoch'] == 1
    assert len(read_csv(os.path.join(path, 'metrics_fold8.csv'))) == 3
    assert not os.path.exists(os.path.join(path, 'model_fold8.pt'))
    armed[0] = False
    calls.clear()
    # Recomputing cells in backward may be switched on when continuing: it changes memory, not results.
    resumed = retrain.main(RESUME=path, DEVICE='cpu', CHECKPOINT_CELLS=True)
    assert calls == [pytest.approx(0.4 / 3)] * STEPS          # only epoch 2 was trained again
    assert resumed['run'] == path
    assert resumed['folds'] == straight['folds']
    assert_same_weights(weights(os.path.join(path, 'model_fold8.pt')),
                        weights(os.path.join(straight['run'], 'model_fold8.pt')))
    assert without_seconds(read_csv(os.path.join(path, 'metrics_fold8.csv'))) == \
        without_seconds(read_csv(os.path.join(straight['run'], 'metrics_fold8.csv')))
    assert 'fold 8: continuing after epoch 1' in read_text(os.path.join(path, 'log.txt'))


def test_resume_after_the_last_epoch_only_evaluates(cubes, tmp_path, monkeypatch, straight):
    # killed after the last checkpoint, before the final model and result were written
    real = runfolder.save_atomic

    def save(obj, path):
        if path.endswith('model_fold8.pt'):
            raise Stop
        real(obj, path)
    monkeypatch.setattr(runfolder, 'save_atomic', save)
    with pytest.raises(Stop):
        run(cubes, tmp_path, FOLD=8, EPOCHS=3)
    monkeypatch.undo()
    (path,) = [os.path.join(tmp_path, p) for p in os.listdir(tmp_path)]
    calls = crash_on_call(monkeypatch, 1)                    # training again would crash
    assert retrain.main(RESUME=path, DEVICE='cpu')['folds'] == straight['folds']
    assert calls == []
    assert_same_weights(weights(os.path.join(path, 'model_fold8.pt')),
                        weights(os.path.join(straight['run'], 'model_fold8.pt')))


def test_all_folds_table_and_resume_skips_finished_folds(cubes, tmp_path, monkeypatch):
    settings = dict(FOLD='all', TEST_FOLDS=(8, 9), EPOCHS=2)
    full = run(cubes, tmp_path / 'full', **settings)
    assert [r['fold'] for r in full['folds']] == [8, 9]
    log = read_text(os.path.join(full['run'], 'log.txt'))
    assert 'final epoch on each test fold (our protocol):' in log
    assert 'best epoch on each test fold (published protocol; optimistic' in log
    means = [line for line in log.splitlines() if line.startswith('mean')]
    assert len(means) == 2 and all(line.count('±') == 6 for line in means)
    acc = [r['acc'] for r in full['folds']]
    assert f'{sum(acc) / 2:.2f} ± {abs(acc[0] - acc[1]) / 2:.2f}' in means[0]
    assert len(read_json(os.path.join(full['run'], 'results.json'))) == 2
    # crash in fold 9's second epoch; on resume fold 8 is read back, fold 9 continues
    calls = crash_on_call(monkeypatch, 3 * STEPS + 2)
    with pytest.raises(Stop):
        run(cubes, tmp_path / 'cut', **settings)
    (path,) = [os.path.join(tmp_path, 'cut', p) for p in os.listdir(tmp_path / 'cut')]
    assert os.path.exists(os.path.join(path, 'result_fold8.json'))
    calls.clear()                                            # the crash was at call 17: no more
    resumed = retrain.main(RESUME=path, DEVICE='cpu')
    assert len(calls) == STEPS                               # fold 9's epoch 1 only
    assert resumed['folds'] == full['folds']
    log = read_text(os.path.join(path, 'log.txt'))
    assert 'fold 8: finished earlier, result read from' in log and 'fold 9: continuing after epoch 0' in log
    for f in (8, 9):
        assert_same_weights(weights(os.path.join(path, f'model_fold{f}.pt')),
                            weights(os.path.join(full['run'], f'model_fold{f}.pt')))


def test_genotype_from_json_and_unknown_name(cubes, tmp_path):
    small = genotypes.Genotype(normal=[('skip_connect', 0), ('sep_conv_3x3x3', 1)] * 4, normal_concat=[2, 3, 4, 5],
                               reduce=[('max_pool_3x3x3', 0), ('skip_connect', 1)] * 4, reduce_concat=[2, 3, 4, 5])
    path = tmp_path / 'genotype.json'
    genotypes.save_genotype(small, path)
    out = run(cubes, tmp_path / 'runs', FOLD=9, EPOCHS=1, GENOTYPE=str(path), FAST_KERNELS=False)
    assert dwconv3d.FAST_KERNELS is False  # the setting drives the module-wide switch
    n_params = sum(p.numel() for p in retrain.NetworkLUNA(4, 2, 3, small).parameters())
    assert out['folds'][0]['params_M'] == pytest.approx(n_params / 1e6)
    assert 'sep_conv_3x3x3' in read_text(os.path.join(out['run'], 'log.txt'))
    with pytest.raises(UserError, match="unknown genotype 'DARTS_V9': give a genotype.json path or one of "
                                        "NAS_HBO_PAPER"):
        run(cubes, tmp_path / 'runs2', FOLD=9, EPOCHS=1, GENOTYPE='DARTS_V9')
    with pytest.raises(UserError, match="FOLD must be a fold number or 'all', not 'eight'"):
        run(cubes, tmp_path / 'runs2', FOLD='eight', EPOCHS=1)
    assert not os.path.exists(tmp_path / 'runs2')


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cubes, tmp_path):
    # epoch 0 runs at lr 0; the cosine schedule from LR=0 to LR_MIN=1e38 makes epoch 1's lr huge
    with pytest.raises(UserError, match=r'loss is (nan|inf) at fold 8 epoch 1.*last_fold8\.pt'):
        run(cubes, tmp_path, FOLD=8, EPOCHS=2, LR=0.0, LR_MIN=1e38)
    (path,) = [os.path.join(tmp_path, p) for p in os.listdir(tmp_path)]
    state = runfolder.load_checkpoint(os.path.join(path, 'last_fold8.pt'))
    assert state['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())
    assert len(read_csv(os.path.join(path, 'metrics_fold8.csv'))) == 1
    assert not os.path.exists(os.path.join(path, 'result_fold8.json'))


def test_check_finite(tmp_path):
    engine.check_finite(torch.tensor(3.0), 'epoch 0', str(tmp_path), 'last_fold5.pt')
    with pytest.raises(UserError, match='loss is inf at epoch 0; stopping: no checkpoint yet'):
        engine.check_finite(torch.tensor(float('inf')), 'epoch 0', str(tmp_path), 'last_fold5.pt')
    (tmp_path / 'last.pt').write_bytes(b'')
    with pytest.raises(UserError, match=f'loss is nan at epoch 3; stopping: the last good checkpoint is kept in '
                                        f'{tmp_path / "last.pt"}'):
        engine.check_finite(float('nan'), 'epoch 3', str(tmp_path))
