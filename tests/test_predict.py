"""predict.py on a tiny finished retrain run: it reproduces the run's own test-fold probabilities (with the saved
normalization and with it recomputed for older runs), writes LayerCAM volumes and figures, and refuses bad input."""
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import write_cube_set
from test_plots import assert_real_image

import predict
import train_3D_continuation as retrain
import utils
from figures import evaluation
from figures import runs as run_figures
from utils import UserError

RETRAIN = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, TEST_FOLDS=(8, 9), EPOCHS=1, SEED=0, FIGURES=False)


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=1)


@pytest.fixture(scope='module')
def finished(cubes, tmp_path_factory):
    return retrain.main(DATA=cubes, RUNS=str(tmp_path_factory.mktemp('runs')), **RETRAIN)['run']


def run_probs(run, fold):
    return pd.read_csv(os.path.join(run, f'probs_fold{fold}.csv'), dtype={'nodule_id': str})


def read_log(run):
    with open(os.path.join(run, 'log.txt')) as f:
        return f.read()


def assert_reproduces(pred, run):
    for fold in (8, 9):
        own = run_probs(run, fold)
        got = pred.set_index('nodule_id').loc[own['nodule_id'], f'prob_fold{fold}'].to_numpy()
        np.testing.assert_allclose(got, own['prob'].to_numpy(), rtol=1e-5, atol=1e-7)


def test_predict_reproduces_the_runs_test_fold_probabilities(finished, cubes):
    out = predict.main(RUN=finished, DEVICE='cpu')
    pred = out['predictions']
    assert len(pred) == 20 and list(pred.columns) == ['nodule_id', 'fold', 'label', 'prob_fold8', 'prob_fold9',
                                                      'prob_mean', 'prob_std', 'prob_heldout']
    assert_reproduces(pred, finished)
    for fold in (8, 9):  # held out: the test-fold probability of the run; other folds have no held-out model
        own = run_probs(finished, fold)
        got = pred.set_index('nodule_id').loc[own['nodule_id'], 'prob_heldout'].to_numpy()
        np.testing.assert_allclose(got, own['prob'].to_numpy(), rtol=1e-5, atol=1e-7)
    assert pred.loc[~pred['fold'].isin((8, 9)), 'prob_heldout'].isna().all()
    np.testing.assert_allclose(pred['prob_mean'], (pred['prob_fold8'] + pred['prob_fold9']) / 2, rtol=1e-6)
    np.testing.assert_allclose(pred['prob_std'], (pred['prob_fold8'] - pred['prob_fold9']).abs() / 2, rtol=1e-5)
    written = pd.read_csv(os.path.join(out['run'], 'predictions.csv'), dtype={'nodule_id': str})
    pd.testing.assert_frame_equal(written, pred, check_dtype=False)
    assert os.path.dirname(out['run']) == finished
    assert 'held-out prediction only for the nodules of fold f' in read_log(out['run'])
    with open(os.path.join(out['run'], 'predictions.csv')) as f:  # every probability with float32's digits
        cells = [dict(zip(header, line.split(','))) for header in [f.readline().strip().split(',')] for line in f]
    digits = {c: max(len(r[c].strip().partition('e')[0].partition('.')[2].lstrip('0')) for r in cells)  # significant
              for c in cells[0] if c.startswith('prob_')}
    assert max(digits.values()) <= 9 and digits['prob_heldout'] <= digits['prob_fold8'] + 1, digits


def test_predict_prints_a_table_of_what_it_wrote(finished, capsys):
    out = predict.main(RUN=finished, DEVICE='cpu', NODULES=('f8s0n0', 'f9s1n0'))
    printed = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(printed) if line.startswith('nodule '))
    assert printed[head].split() == ['nodule', 'P(malignant)', 'spread', 'predicted', 'label', 'prob_heldout']
    pred = out['predictions']
    for line, (_, r) in zip(printed[head + 1:head + 3], pred.iterrows()):
        cells = line.split()
        assert cells[:4] == [r['nodule_id'], f'{r["prob_mean"]:.4f}', f'{r["prob_std"]:.4f}',
                             'malignant' if r['prob_mean'] >= 0.5 else 'benign']


def test_older_run_without_saved_normalization(finished, tmp_path):
    old = shutil.copytree(finished, tmp_path / 'old')
    for fold in (8, 9):
        os.remove(old / f'norm_fold{fold}.json')
    out = predict.main(RUN=str(old), DEVICE='cpu', NODULES=('f8s0n0', 'f9s1n0'))
    assert out['predictions']['nodule_id'].tolist() == ['f8s0n0', 'f9s1n0']
    for fold, nid in ((8, 'f8s0n0'), (9, 'f9s1n0')):
        own = run_probs(finished, fold).set_index('nodule_id')['prob'][nid]
        got = out['predictions'].set_index('nodule_id')[f'prob_fold{fold}'][nid]
        assert got == pytest.approx(own, rel=1e-5, abs=1e-7)
    assert 'normalization recomputed from' in read_log(out['run'])


def test_cam_volumes_and_figures_of_a_new_cube_set_without_labels(finished, tmp_path):
    new = write_cube_set(tmp_path / 'new', n_folds=1, scans_per_fold=1, nodules_per_scan=2, size=12, seed=5)
    os.remove(os.path.join(new, 'nodules.csv'))                  # unlabelled cubes only
    out = predict.main(RUN=finished, DATA=new, DEVICE='cpu', CAM=True, CAM_CELLS=(0, -1))
    pred = out['predictions']
    assert pred['nodule_id'].tolist() == ['f0s0n0', 'f0s0n1'] and 'label' not in pred.columns
    for nid in pred['nodule_id']:
        volume = np.load(os.path.join(out['run'], 'cam', f'{nid}.npy'))
        assert volume.shape == (8, 8, 8) and volume.dtype == np.float32
        assert volume.min() == 0 and volume.max() == pytest.approx(1)
        assert_real_image(os.path.join(out['run'], 'cam', f'{nid}.png'))


def test_clear_refusals(finished, cubes, tmp_path):
    with pytest.raises(UserError, match='no nodule nope, f99 '):
        predict.main(RUN=finished, DEVICE='cpu', NODULES=('f8s0n0', 'nope', 'f99'))
    small = write_cube_set(tmp_path / 'small', n_folds=1, scans_per_fold=1, size=6)
    with pytest.raises(UserError, match=r"its cubes are 6x6x6 voxels; the run's models take 8\^3 cubes"):
        predict.main(RUN=finished, DATA=small, DEVICE='cpu')
    (tmp_path / 'empty' / 'cubes').mkdir(parents=True)                # no tables, no cubes
    with pytest.raises(UserError, match=r'DATA=.*empty: no nodules'):
        predict.main(RUN=finished, DATA=str(tmp_path / 'empty'), DEVICE='cpu')
    unfinished = tmp_path / 'unfinished'
    unfinished.mkdir()
    shutil.copy(os.path.join(finished, 'config.json'), unfinished)
    shutil.copy(os.path.join(finished, 'model_fold8.pt'), unfinished)   # a model without its result: not finished
    with pytest.raises(UserError, match='no finished fold'):
        predict.main(RUN=str(unfinished), DEVICE='cpu')
    with pytest.raises(UserError, match='give a train_3D_continuation run folder'):
        predict.main(RUN=str(tmp_path), DEVICE='cpu')
    with pytest.raises(UserError, match=r'CAM_CELLS \[5\]'):
        predict.main(RUN=finished, DEVICE='cpu', CAM=True, CAM_CELLS=(5,))
    damaged = shutil.copytree(finished, tmp_path / 'damaged')
    (damaged / 'norm_fold8.json').write_text('{"mean": 1')             # cut short by a crash
    with pytest.raises(UserError, match=r'norm_fold8.json cannot be read .*delete it to recompute the normalization'):
        predict.main(RUN=str(damaged), DEVICE='cpu', NODULES=('f8s0n0',))
    (damaged / 'norm_fold8.json').write_text('{"mean": 1}')           # valid JSON without the std
    with pytest.raises(UserError, match=r"norm_fold8.json is damaged \(KeyError: 'std'\)"):
        predict.main(RUN=str(damaged), DEVICE='cpu', NODULES=('f8s0n0',))


def predict_folders(run):
    return sorted(f for f in os.listdir(run) if f.startswith('predict-'))


def test_damaged_run_files_are_one_line_before_anything_is_written(finished, tmp_path):
    damaged = shutil.copytree(finished, tmp_path / 'damaged')
    before = predict_folders(damaged)
    (damaged / 'norm_fold8.json').write_text('{"mean": 90.0, "std": 0.0}')  # would make every probability NaN
    with pytest.raises(UserError, match=r'norm_fold8.json is damaged \(mean 90.0, std 0.0: std must be a finite '
                                        r'number > 0\)'):
        predict.main(RUN=str(damaged), DEVICE='cpu', NODULES=('f8s0n0',))
    shutil.copy(os.path.join(finished, 'norm_fold8.json'), damaged)
    (damaged / 'model_fold9.pt').write_bytes(np.random.default_rng(0).bytes(4096))  # random bytes
    with pytest.raises(UserError, match=r'model_fold9.pt is not a readable model file \(UnpicklingError'):
        predict.main(RUN=str(damaged), DEVICE='cpu', NODULES=('f8s0n0',))
    (damaged / 'model_fold9.pt').write_bytes(b'')  # cut to nothing
    with pytest.raises(UserError, match=r'model_fold9.pt is not a readable model file \(EOFError'):
        predict.main(RUN=str(damaged), DEVICE='cpu', NODULES=('f8s0n0',))
    assert predict_folders(damaged) == before  # the models are loaded and checked before the output folder is made


def test_damaged_probs_file_is_one_line_before_any_figure(finished, tmp_path):
    damaged = shutil.copytree(finished, tmp_path / 'damaged')
    path = damaged / 'probs_fold9.csv'
    text = path.read_text()
    for bad, line in ((text[:text.rindex(',')], text.count('\n')),  # the last row cut mid-row
                      (text.replace(',1,', ',one,', 1), None)):     # a label that is not a number
        path.write_text(bad)
        with pytest.raises(UserError, match=rf'probs_fold9.csv, line {line or "[0-9]+"}: label .* the file is damaged'):
            evaluation.read_probs(str(damaged))
        out = tmp_path / f'figures{line}'
        out.mkdir()
        with pytest.raises(UserError, match='probs_fold9.csv, line'):
            run_figures.draw_run(str(damaged), out_dir=str(out))
        assert os.listdir(out) == []  # not one figure drawn


def test_interrupted_prediction_is_marked_incomplete(finished, monkeypatch, capsys):
    calls = []

    def interrupt(*args, **kw):
        calls.append(args)
        if len(calls) == 2:  # Ctrl-C while the second map is drawn
            raise KeyboardInterrupt
        return real(*args, **kw)
    real = evaluation.plot_cam
    monkeypatch.setattr(evaluation, 'plot_cam', interrupt)
    with pytest.raises(KeyboardInterrupt):
        predict.main(RUN=finished, DEVICE='cpu', CAM=True, NODULES=('f8s0n0', 'f9s1n0', 'f0s0n0'))
    folder = os.path.join(finished, predict_folders(finished)[-1])
    assert f'{folder} is incomplete: it holds the file INCOMPLETE' in capsys.readouterr().err
    assert os.path.exists(os.path.join(folder, predict.INCOMPLETE))
    assert sorted(os.listdir(os.path.join(folder, 'cam'))) == ['f8s0n0.npy', 'f8s0n0.png', 'f9s1n0.npy']
    written = pd.read_csv(os.path.join(folder, 'predictions.csv'))
    assert len(written) == 3  # written whole before the maps
    with open(os.path.join(folder, 'log.txt')) as f:
        assert 'LayerCAM: 3 maps to make (one per nodule, each from 2 fold models' in f.read()


def test_cam_progress_with_time_left(finished, monkeypatch, capsys):
    monkeypatch.setattr(predict, 'CAM_EVERY_S', 0.0)
    monkeypatch.setattr(utils.sys.stderr, 'isatty', lambda: False)
    out = predict.main(RUN=finished, DEVICE='cpu', CAM=True, NODULES=('f8s0n0', 'f9s1n0', 'f0s0n0'))
    text = capsys.readouterr().out
    assert 'LayerCAM maps: 1/3, ' in text and 'LayerCAM maps: 2/3, ' in text and 's left' in text
    assert not os.path.exists(os.path.join(out['run'], predict.INCOMPLETE))
