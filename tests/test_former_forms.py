"""Run folders written before REDUCE_SHIFT and MBCONV_AFFINE existed (their config.json lacks them, as main wrote it
then) resume, and predict.py loads their models, in the form they were trained with: DARTS' shifted FactorizedReduce
and a supernet without affine MBConv BatchNorms (settings.FORMER_VALUES). Tiny runs: C=4, 3 cells, 8^3 cubes."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_cube_set
from test_resume import Killed, only_folder

import architect
import data
import engine
import predict
import settings
import train_3D_continuation as retrain
import train_search
from model_search import SearchNetwork
from operations import FactorizedReduce, MBConv
from utils import UserError

RETRAIN = dict(C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, DEVICE='cpu', SEED=0, TEST_FOLDS=(8,), EPOCHS=2, FIGURES=False)
# an MBConv candidate, so that the two supernet forms have different state dicts
SEARCH = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
              PRIMITIVES=('max_pool_3x3x3', 'skip_connect', 'MBConv_3x3x3_2'), EPOCHS=2, WARMUP_EPOCHS=0, SEED=3,
              HYPERGRAD='first', FIGURES=False)
FORMER = dict(REDUCE_SHIFT=True, MBCONV_AFFINE=False)  # the forms of main before this change


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=1)


def as_written_before(folder, names):
    """Drop `names` from the folder's config.json: what main wrote before those settings existed."""
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
        cfg = json.load(f)
    with open(path, 'w') as f:
        json.dump({k: v for k, v in cfg.items() if k not in names}, f)


def shifts(model):
    return {m.shift for m in model.modules() if isinstance(m, FactorizedReduce)}


def test_former_values_are_what_main_computed_before_the_settings():
    assert settings.trained_with({'C': 16}, 'REDUCE_SHIFT') is True
    assert settings.trained_with({'REDUCE_SHIFT': False}, 'REDUCE_SHIFT') is False
    assert settings.FORMER_VALUES == {**FORMER, 'ONE_SIDED_SHIFT': False, 'ARCH_BN_STATS': False}
    # the published forms are the defaults now; the published crop and BatchNorm tracking are settings
    assert {k: train_search.DEFAULTS[k] for k in FORMER} == {k: not v for k, v in FORMER.items()}
    assert (train_search.DEFAULTS['ONE_SIDED_SHIFT'], train_search.DEFAULTS['ARCH_BN_STATS']) == (False, False)


def test_scripts_pass_the_published_crop_and_batchnorm_settings(cubes, tmp_path, monkeypatch):
    seen, real_batch, real_step = [], data.CubeData.train_batch, architect.Architect.step

    def train_batch(self, idx, gen):
        seen.append(('shift', self.one_sided_shift))
        return real_batch(self, idx, gen)

    def step(self, *args, **kwargs):
        seen.append(('track', self.track_bn))
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(data.CubeData, 'train_batch', train_batch)
    monkeypatch.setattr(architect.Architect, 'step', step)
    train_search.main(**{**SEARCH, 'EPOCHS': 1}, DATA=cubes, RUNS=str(tmp_path / 's'), ONE_SIDED_SHIFT=True,
                      ARCH_BN_STATS=True)
    assert seen and set(seen) == {('shift', True), ('track', True)}
    seen.clear()
    retrain.main(**{**RETRAIN, 'EPOCHS': 1}, DATA=cubes, RUNS=str(tmp_path / 'r'), ONE_SIDED_SHIFT=True)
    assert seen and set(seen) == {('shift', True)}


def test_retrain_folder_older_than_reduce_shift_resumes_and_predicts_in_its_form(cubes, tmp_path, monkeypatch):
    built, real_step = [], engine.train_step

    def step(model, *args):
        built.append(shifts(model))
        if len(built) == 10:  # 36 training nodules in batches of 4: the first step of epoch 1
            raise Killed
        return real_step(model, *args)
    with monkeypatch.context() as m:
        m.setattr(engine, 'train_step', step)
        with pytest.raises(Killed):
            retrain.main(**RETRAIN, DATA=cubes, RUNS=str(tmp_path), REDUCE_SHIFT=True)
        folder = only_folder(tmp_path)
        as_written_before(folder, ['REDUCE_SHIFT'])
        built.clear()
        with pytest.raises(UserError, match='REDUCE_SHIFT cannot change'):
            retrain.main(RESUME=folder, REDUCE_SHIFT=False)
        retrain.main(RESUME=folder)
    assert built and all(s == {True} for s in built)
    with open(os.path.join(folder, 'config.json')) as f:
        assert json.load(f)['REDUCE_SHIFT'] is True  # the resumed run's config.json names its form
    # a run finished before the change: predict.py reproduces the run's own test-fold probabilities only with the
    # form the run was trained with (with today's default they differ by about 0.01)
    as_written_before(folder, ['REDUCE_SHIFT'])
    own = pd.read_csv(os.path.join(folder, 'probs_fold8.csv'), dtype={'nodule_id': str})
    pred = predict.main(RUN=folder, DEVICE='cpu')['predictions'].set_index('nodule_id')
    np.testing.assert_allclose(pred.loc[own['nodule_id'], 'prob_fold8'], own['prob'], rtol=1e-5, atol=1e-7)


def test_search_folder_older_than_the_form_settings_resumes_in_its_form(cubes, tmp_path, monkeypatch):
    real_epoch, real_build = train_search.search_epoch, train_search.build
    forms = []

    def build(cfg):
        out = real_build(cfg)
        bns = [bn.affine for m in out[0].modules() if isinstance(m, MBConv) for bn in m
               if isinstance(bn, torch.nn.BatchNorm3d)]
        forms.append((shifts(out[0]), set(bns)))
        return out

    def search_epoch(epoch, *args, **kwargs):
        if epoch == 1:
            raise Killed
        return real_epoch(epoch, *args, **kwargs)
    monkeypatch.setattr(train_search, 'build', build)
    with monkeypatch.context() as m:
        m.setattr(train_search, 'search_epoch', search_epoch)
        with pytest.raises(Killed):
            train_search.main(**SEARCH, **FORMER, DATA=cubes, RUNS=str(tmp_path))
    folder = only_folder(tmp_path)
    as_written_before(folder, list(settings.FORMER_VALUES))  # main wrote none of them
    train_search.main(RESUME=folder)
    assert forms == [({True}, {False})] * 2
    state = torch.load(os.path.join(folder, 'last.pt'), weights_only=False)
    assert state['epoch'] == 1
    with torch.device('meta'):  # the checkpoint is the former supernet's: no MBConv BatchNorm weights
        former = SearchNetwork(4, 2, 3, SEARCH['PRIMITIVES'], mbconv_affine=False)
    assert set(state['model']) == set(former.state_dict())
