"""nodclsgbt.py: cube cropping (borders, dtype, centring) and the gradient-boosting baseline end to end."""
import csv
import json
import os

import numpy as np
import pytest

import nodclsgbt
from scans import luna
from utils import UserError

TINY = dict(CUBE_SIZE=16, DOWNSAMPLE=2, MAX_ITER=30, MAX_LEAF_NODES=7, LEARNING_RATE=0.2, MIN_SAMPLES_LEAF=3,
            THREADS=1)


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_crop_cube_pads_borders_with_170_and_keeps_uint8():
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 170, size=(20, 24, 28), dtype=np.uint8)  # never 170 inside
    cube = luna.crop_cube(volume, (1.2, 22.6, 10.4), 8, 170)  # voxel (1, 23, 10): start (-3, 19, 6)
    assert cube.dtype == np.uint8 and cube.shape == (8, 8, 8)
    inside = np.zeros(cube.shape, dtype=bool)
    inside[3:, :5, :] = True  # z 0..4 and y 19..23 exist; x 6..13 all exist
    assert (cube[~inside] == 170).all()
    assert np.array_equal(cube[3:, :5, :], volume[0:5, 19:24, 6:14])
    assert cube[4, 4, 4] == volume[1, 23, 10]  # the centre voxel is voxel size // 2 of the cube
    far = luna.crop_cube(volume, (-50, 0, 0), 8, 170)
    assert far.dtype == np.uint8 and (far == 170).all()


def make_cube_set(root, n_per_fold=12, folds=(0, 1, 2), size=16, seed=0):
    """Cube set where malignant cubes hold a large bright sphere, benign ones a small dim one."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'cubes'))
    g = np.indices((size,) * 3) - size // 2
    r2 = (g ** 2).sum(0)
    rows = []
    for f in folds:
        for i in range(n_per_fold):
            label = i % 2
            cube = rng.normal(60, 15, (size,) * 3)
            cube[r2 <= (25 if label else 6)] = 200 if label else 140
            np.save(os.path.join(root, 'cubes', f'n{f}_{i}.npy'), np.clip(cube, 0, 255).astype(np.uint8))
            rows.append({'nodule_id': f'n{f}_{i}', 'seriesuid': f'scan{f}_{i // 4}', 'fold': f,
                         'diameter_mm': 10.0 if label else 5.0, 'label': label})
    luna.write_csv_atomic(os.path.join(root, 'nodules.csv'), rows, list(rows[0]))


def test_gbt_on_cube_set_end_to_end(tmp_path):
    make_cube_set(str(tmp_path / 'set'))
    out = nodclsgbt.main(CROP=False, CUBE_SET=str(tmp_path / 'set'), TEST_FOLDS=(0, 1, 2),
                         RUNS=str(tmp_path / 'runs'), **TINY)
    assert [r['fold'] for r in out['folds']] == [0, 1, 2]
    preds = read_csv(os.path.join(out['run'], 'predictions.csv'))
    assert len(preds) == 36
    for row in out['folds']:
        p = [(int(q['label']), float(q['prob_malignant'])) for q in preds if int(q['fold']) == row['fold']]
        y, prob = np.array(p).T
        assert row['n_test'] == len(y) == 12
        assert row['acc'] == pytest.approx(100 * np.mean((prob >= 0.5) == y), abs=1e-6)
        assert 0 <= row['auc'] <= 100 and row['acc'] >= 90  # the classes are separable
    for k in ('acc', 'sens', 'spec', 'f1', 'auc'):
        assert out['mean'][k] == pytest.approx(np.mean([r[k] for r in out['folds']]))
    assert len(read_csv(os.path.join(out['run'], 'metrics.csv'))) == 3
    assert os.path.exists(os.path.join(out['run'], 'config.json'))
    log = open(os.path.join(out['run'], 'log.txt')).read().splitlines()
    starts = [line for line in log if ' trees on 24 cubes' in line]  # a line before each fold's fit
    assert [line.split(':')[0] for line in starts] == ['fold 0 (1 of 3)', 'fold 1 (2 of 3)', 'fold 2 (3 of 3)']
    assert starts[1].endswith(f'about {out["folds"][0]["seconds"]:.0f} s as the first fold')
    assert log.index(starts[0]) < log.index(next(x for x in log if x.startswith('fold 0: acc')))
    assert log[-1].startswith('mean ')  # three folds: a mean and spread


def test_missing_test_fold_is_named(tmp_path):
    make_cube_set(str(tmp_path / 'set'), folds=(0, 1))
    with pytest.raises(UserError, match='fold 7'):
        nodclsgbt.main(CROP=False, CUBE_SET=str(tmp_path / 'set'), TEST_FOLDS=(0, 7),
                       RUNS=str(tmp_path / 'runs'), **TINY)


def write_prepared(root):
    """prepare.py-like output: two flipped/plain volumes with bright blobs at known world centres."""
    os.makedirs(os.path.join(root, 'volumes'))
    labels = []
    for s, flip in enumerate((False, True)):
        volume = np.full((30, 40, 50), 50, dtype=np.uint8)
        g = {'seriesuid': f's{s}', 'origin': [-100.0, 20.0, 30.0], 'spacing': [2.0, 0.5, 0.5], 'flip': flip,
             'raw_shape': [16, 90, 110], 'resolution': 1.0, 'box_start': [1, 2, 3], 'shape': list(volume.shape)}
        for k, (z, y, x, label) in enumerate([(15, 20, 25, 1), (1, 38, 2, 0), (10, 10, 10, -1)]):
            volume[z, y, x] = 250  # marks the nodule voxel
            # invert world_to_voxel: saved voxel -> raw index -> world (x, y, z)
            raw = (np.array([z, y, x]) + g['box_start']) * g['resolution'] / np.array(g['spacing'])
            if flip:  # LUNA16's TransformMatrix -1 0 0 0 -1 0 0 0 1: x and y shrink as their index grows
                raw[1:] = np.array(g['raw_shape'][1:]) - 1 - raw[1:]
            world = np.array(g['origin']) + raw * np.array(g['spacing']) * ([1, -1, -1] if flip else 1)
            labels.append({'nodule_id': f'luna{s}{k}', 'seriesuid': f's{s}', 'coordX': world[2],
                           'coordY': world[1], 'coordZ': world[0], 'diameter_mm': 6.0, 'label': label,
                           'fold': s, 'voxel': (z, y, x)})
        np.save(os.path.join(root, 'volumes', f's{s}.npy'), volume)
        with open(os.path.join(root, 'volumes', f's{s}.json'), 'w') as f:
            json.dump(g, f)
    labels.append({'nodule_id': 'luna99', 'seriesuid': 'novolume', 'coordX': 0, 'coordY': 0, 'coordZ': 0,
                   'diameter_mm': 6.0, 'label': 1, 'fold': 0, 'voxel': None})
    luna.write_csv_atomic(os.path.join(root, 'labels.csv'), labels, list(labels[0]))
    return labels


def test_crop_from_prepared_volumes(tmp_path):
    labels = write_prepared(str(tmp_path / 'prep'))
    logged = []
    n, missing = nodclsgbt.crop_cube_set(str(tmp_path / 'prep'), str(tmp_path / 'set'), 8, logged.append)
    assert n == 2 and missing == ['luna99']  # the corner nodules' cubes are mostly padding (1 - 5*6*6/8**3): refused
    assert '2 nodules refused, their cube mostly padding' in logged[0] and 'luna01 (scan s0, 65% outside' in logged[0]
    assert not os.path.exists(str(tmp_path / 'set' / 'cubes' / 'luna01.npy'))
    n, missing = nodclsgbt.crop_cube_set(str(tmp_path / 'prep'), str(tmp_path / 'set'), 8, print, max_padded=0.7)
    assert n == 4 and missing == ['luna99']  # label -1 rows are left out; a scan without volume is skipped
    rows = read_csv(str(tmp_path / 'set' / 'nodules.csv'))
    assert {'nodule_id', 'seriesuid', 'fold', 'diameter_mm', 'label'} <= set(rows[0])
    for r in rows:
        cube = np.load(str(tmp_path / 'set' / 'cubes' / f'{r["nodule_id"]}.npy'))
        assert cube.dtype == np.uint8 and cube.shape == (8, 8, 8)
        assert cube[4, 4, 4] == 250  # the nodule voxel is at the cube centre
        truth = next(lab for lab in labels if lab['nodule_id'] == r['nodule_id'])
        assert int(r['label']) == truth['label']
        if truth['voxel'][0] == 1:  # near the volume's corner: the outside is padded
            assert (cube[:1] == 170).all() and (cube[:, :, :2] == 170).all()


def test_no_labelled_nodule_is_named(tmp_path):
    """Volumes exist but every nodule has label -1: the message says the labels are missing, not volumes."""
    labels = write_prepared(str(tmp_path / 'prep'))
    for row in labels:
        row['label'] = -1
    luna.write_csv_atomic(str(tmp_path / 'prep' / 'labels.csv'), labels, list(labels[0]))
    with pytest.raises(UserError, match=r'no nodule is labelled 0 \(benign\) or 1 \(malignant\).*7 rows: 7 with '
                                        r'label -1'):
        nodclsgbt.crop_cube_set(str(tmp_path / 'prep'), str(tmp_path / 'set'), 8, print)
    labels = write_prepared(str(tmp_path / 'prep2'))
    for s in ('s0', 's1'):
        os.remove(str(tmp_path / 'prep2' / 'volumes' / f'{s}.npy'))
    with pytest.raises(UserError, match='no labelled cube could be cropped: of the 5 nodules to crop in 3 scans, '
                                        '5 have no volume'):
        nodclsgbt.crop_cube_set(str(tmp_path / 'prep2'), str(tmp_path / 'set2'), 8, print)
