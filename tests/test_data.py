"""data: augmentation (checked against a brute-force search), splits, cropping, normalization statistics,
and clear errors for bad cube sets, also from the command line."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_cube_set

import data
import train_3D_continuation as retrain
from utils import REPO, UserError


def make_data(cubes, mean=0.0, std=1.0):
    return data.CubeData(cubes, np.arange(len(cubes)) % 2, mean, std, 'cpu')


def no_zero_cubes(n, size, seed=0):
    """Random uint8 cubes without the value 0, so that zeros in a sample can only come from the cutout."""
    return np.random.default_rng(seed).integers(1, 256, (n, size, size, size), dtype=np.uint8)


def candidates(cube):
    """Every shift (0..4 per axis in the 170-padded cube) x flip combination of a cube: {(shift, flip): array}."""
    s = cube.shape[0]
    padded = np.pad(cube, 2, constant_values=170)
    out = {}
    for shift in itertools.product(range(5), repeat=3):
        crop = padded[shift[0]:shift[0] + s, shift[1]:shift[1] + s, shift[2]:shift[2] + s]
        for flip in itertools.product((False, True), repeat=3):
            axes = [a for a in range(3) if flip[a]]
            out[shift, flip] = np.flip(crop, axes) if axes else crop
    return out


def cutout_box(sample):
    """Corner of the zeroed block; asserts the zeros form exactly one 4x4x4 box."""
    zeros = np.argwhere(sample == 0)
    assert len(zeros) == 64, f'{len(zeros)} zeroed voxels, expected one 4^3 block'
    lo, hi = zeros.min(0), zeros.max(0)
    assert (hi - lo).tolist() == [3, 3, 3]
    return tuple(lo)


# ---------------------------------------------------------------- augmentation

def test_train_batch_shape_dtype_labels_and_seeding():
    d = make_data(no_zero_cubes(5, 8), mean=100.0, std=50.0)
    idx = torch.tensor([3, 0, 4])
    x, y = d.train_batch(idx, data.make_generator('cpu', 1))
    assert x.shape == (3, 1, 8, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [1, 0, 0] and y.dtype == torch.long
    again, _ = d.train_batch(idx, data.make_generator('cpu', 1))
    other, _ = d.train_batch(idx, data.make_generator('cpu', 2))
    assert torch.equal(x, again)
    assert not torch.equal(x, other)
    gen = data.make_generator('cpu', 1)
    first, _ = d.train_batch(idx, gen)
    second, _ = d.train_batch(idx, gen)                       # the generator advances between batches
    assert not torch.equal(first, second)


def test_train_batch_is_a_shift_flip_and_cutout_of_the_cube():
    cubes = no_zero_cubes(6, 8, seed=3)
    d = make_data(cubes)                                     # mean 0, std 1: the raw intensities
    gen = data.make_generator('cpu', 0)
    for _ in range(2):
        idx = torch.tensor([5, 2, 0, 1, 3, 4])
        x = d.train_batch(idx, gen)[0][:, 0].numpy()
        for sample, i in zip(x, idx.tolist()):
            lo = cutout_box(sample)
            keep = np.ones(sample.shape, bool)
            keep[lo[0]:lo[0] + 4, lo[1]:lo[1] + 4, lo[2]:lo[2] + 4] = False
            matches = [key for key, c in candidates(cubes[i]).items() if np.array_equal(c[keep], sample[keep])]
            assert len(matches) == 1, f'sample of cube {i} matches {len(matches)} shift/flip combinations'


def ramp(s, axis):
    """A cube whose values 10, 20, ..., 10 s give the voxel's position along one axis."""
    shape = [1, 1, 1]
    shape[axis] = s
    return np.broadcast_to(10 * np.arange(1, s + 1).reshape(shape), (s, s, s)).astype(np.uint8)


def decode(x, axis):
    """Shift (0..4) and flip along `axis` of samples x (B, s, s, s) of the cube ramp(s, axis) -> (B,), (B,)."""
    s = x.shape[-1]
    v = x.round().long()
    valid = (v != 0) & (v != 170)                            # cutout and padding carry no position
    o = v // 10 - 1                                          # position in the original cube
    i = torch.arange(s).view([s if a == axis else 1 for a in range(3)])

    def spread(t):
        hi = torch.where(valid, t, -10 ** 6).flatten(1).amax(1)
        lo = torch.where(valid, t, 10 ** 6).flatten(1).amin(1)
        return hi - lo, hi
    d_minus, a = spread(o - i)                               # constant when not flipped: o = i + shift - 2
    d_plus, b = spread(o + i)                                # constant when flipped: o = s - 1 - i + shift - 2
    assert ((d_minus == 0) ^ (d_plus == 0)).all()
    flip = d_plus == 0
    return torch.where(flip, b - s + 3, a + 2), flip


def test_shifts_and_flips_are_uniform_over_many_draws():
    s, n = 8, 4000
    idx = torch.zeros(n, dtype=torch.long)
    # the draws do not depend on the cube: the same seed gives the same transforms for each axis's ramp
    xs = [make_data(ramp(s, a)[None]).train_batch(idx, data.make_generator('cpu', 0))[0][:, 0] for a in range(3)]
    shifts, flips = (torch.stack(t, 1) for t in zip(*(decode(x, a) for a, x in enumerate(xs))))
    assert ((shifts >= 0) & (shifts <= 4)).all()
    p_flip = flips.float().mean(0)
    assert ((p_flip > 0.45) & (p_flip < 0.55)).all(), p_flip   # p = 0.5 per axis; 4000 draws: sd 0.008
    combos = flips.long() @ torch.tensor([4, 2, 1])
    assert torch.bincount(combos, minlength=8).min() > n / 8 * 0.8
    for a in range(3):                                       # 5 shifts per axis, about uniform
        assert torch.bincount(shifts[:, a], minlength=5).min() > n / 5 * 0.8
    assert len(set((shifts @ torch.tensor([25, 5, 1])).tolist())) == 125
    # flips and shifts of different axes are independent draws
    assert 0.2 < (flips[:, 0] & flips[:, 1]).float().mean() < 0.3


def test_cutout_lies_anywhere_inside_the_cube():
    d = make_data(no_zero_cubes(1, 8))
    x = d.train_batch(torch.zeros(600, dtype=torch.long), data.make_generator('cpu', 0))[0][:, 0].numpy()
    corners = np.array([cutout_box(sample) for sample in x])
    assert corners.min() == 0 and corners.max() == 8 - 4
    assert len({tuple(c) for c in corners}) == 125           # all 5^3 corners occur


def test_normalization_and_eval_batch_without_augmentation():
    cubes = no_zero_cubes(4, 8)
    idx = torch.tensor([2, 1])
    raw = make_data(cubes).train_batch(idx, data.make_generator('cpu', 5))[0]
    norm = make_data(cubes, 120.0, 40.0).train_batch(idx, data.make_generator('cpu', 5))[0]
    torch.testing.assert_close(norm, (raw - 120.0) / 40.0)
    x, y = make_data(cubes, 120.0, 40.0).eval_batch(idx)
    expected = (torch.from_numpy(cubes[[2, 1]]).float()[:, None] - 120.0) / 40.0
    assert x.dtype == torch.float32 and torch.equal(x, expected) and y.tolist() == [0, 1]


def test_cube_stats():
    cubes = np.array([np.zeros((2, 2, 2)), np.full((2, 2, 2), 10)], dtype=np.uint8)
    assert data.cube_stats(cubes) == (5.0, 5.0)
    assert data.cube_stats(np.full((1, 2, 2, 2), 7, np.uint8))[1] > 0     # a constant set cannot divide by 0


def test_batches_cover_every_index_once():
    gen = data.make_generator('cpu', 0)
    parts = data.batches(10, 4, True, gen)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert torch.cat(data.batches(10, 4, False)).tolist() == list(range(10))


# ---------------------------------------------------------------- splits, crops, statistics

def scan_table(n_scans=30, seed=0):
    counts = np.random.default_rng(seed).integers(1, 5, n_scans)           # 1-4 nodules per scan
    uids = [f'1.2.{i}' for i, c in enumerate(counts) for _ in range(c)]
    return pd.DataFrame({'nodule_id': [f'n{i}' for i in range(len(uids))], 'seriesuid': uids})


def test_split_by_scan():
    table = scan_table()
    train, val = data.split_by_scan(table, 0.3, seed=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(table)))
    assert not set(table['seriesuid'][train]) & set(table['seriesuid'][val])
    assert table['seriesuid'][val].nunique() == 9                          # round(30 * 0.3) scans
    again = data.split_by_scan(table, 0.3, seed=1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(data.split_by_scan(table, 0.3, seed=2)[1], val)
    with pytest.raises(UserError, match='cannot split 30 scans'):
        data.split_by_scan(table, 0.01, seed=1)


def test_load_cubes_centre_crops(tmp_path):
    os.makedirs(tmp_path / 'cubes')
    big = np.random.default_rng(0).integers(0, 256, (20, 20, 20), dtype=np.uint8)
    big[10, 9, 2] = 255
    big[12, 17, 2] = 0
    np.save(tmp_path / 'cubes' / 'a.npy', big)
    np.save(tmp_path / 'cubes' / 'b.npy', big[:16, :16, :16])
    out = data.load_cubes(str(tmp_path), pd.DataFrame({'nodule_id': ['a', 'b']}), 16)
    assert out.shape == (2, 16, 16, 16) and out.dtype == np.uint8
    assert np.array_equal(out[0], big[2:18, 2:18, 2:18])
    assert out[0][8, 7, 0] == 255 and out[0][10, 15, 0] == 0               # markers moved by (2, 2, 2)
    assert np.array_equal(out[1], big[:16, :16, :16])                      # right size: unchanged


def test_retrain_statistics_come_from_training_folds_only(tmp_path):
    root = write_cube_set(tmp_path / 'set', scans_per_fold=1)
    table = data.read_table(root)
    cfg = {**retrain.DEFAULTS, 'DATA': root, 'CUBE': 8, 'DEVICE': 'cpu', 'TRAIN_FOLDS': ()}
    train, test, folds = retrain.fold_data(cfg, table, 8)
    assert folds == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert len(train) == 18 and len(test) == 2
    train_cubes = data.load_cubes(root, table[table['fold'] != 8], 8)
    assert (train.mean, train.std) == pytest.approx(data.cube_stats(train_cubes))
    assert (test.mean, test.std) == (train.mean, train.std)
    # brighten the test fold's cubes: the statistics must not move; brighten a training cube: they must
    for nid in table['nodule_id'][table['fold'] == 8]:
        np.save(os.path.join(root, 'cubes', nid + '.npy'), np.full((16,) * 3, 255, np.uint8))
    train2, test2, _ = retrain.fold_data(cfg, table, 8)
    assert (train2.mean, train2.std) == (train.mean, train.std) == (test2.mean, test2.std)
    assert test2.cubes.min() == 255
    np.save(os.path.join(root, 'cubes', 'f0s0n0.npy'), np.full((16,) * 3, 255, np.uint8))
    assert retrain.fold_data(cfg, table, 8)[0].mean > train.mean
    # explicit training folds: only those
    train3, _, folds3 = retrain.fold_data({**cfg, 'TRAIN_FOLDS': (1, 2)}, table, 8)
    assert folds3 == [1, 2] and len(train3) == 4
    with pytest.raises(UserError, match='test fold 8 is also in TRAIN_FOLDS'):
        retrain.fold_data({**cfg, 'TRAIN_FOLDS': (1, 8)}, table, 8)


# ---------------------------------------------------------------- bad input

@pytest.fixture
def small_set(tmp_path):
    return write_cube_set(tmp_path / 'set', n_folds=2, scans_per_fold=1)


def edit_csv(root, change):
    path = os.path.join(root, 'nodules.csv')
    table = pd.read_csv(path, dtype={'nodule_id': str, 'seriesuid': str})
    change(table).to_csv(path, index=False)
    return path


def test_missing_folder_and_table(tmp_path):
    with pytest.raises(UserError, match=f'cube set {tmp_path / "nope"} does not exist'):
        data.read_table(str(tmp_path / 'nope'))
    with pytest.raises(UserError, match=f'{tmp_path / "nodules.csv"} is missing'):
        data.read_table(str(tmp_path))


def test_malformed_table(small_set):
    path = edit_csv(small_set, lambda t: t.drop(columns=['label', 'fold']))
    with pytest.raises(UserError, match=f'{path} lacks column\\(s\\) fold, label'):
        data.read_table(small_set)
    with open(path, 'w') as f:
        f.write('nodule_id,seriesuid,fold,diameter_mm,label\n"a,b\n')
    with pytest.raises(UserError, match=f'{path} cannot be parsed'):
        data.read_table(small_set)


@pytest.mark.parametrize('value', [2, -1, 0.5, 'malignant'])
def test_label_outside_0_1(small_set, value):
    edit_csv(small_set, lambda t: t.assign(label=t['label'].astype(object).where(t.index != 2, value)))
    with pytest.raises(UserError, match=f'label must be 0 or 1; nodule f1s0n0 has {value}'):
        data.read_table(small_set)


def test_duplicate_nodule_id(small_set):
    edit_csv(small_set, lambda t: t.assign(nodule_id=t['nodule_id'].where(t.index != 3, 'f0s0n1')))
    with pytest.raises(UserError, match='nodule_id f0s0n1 repeats'):
        data.read_table(small_set)


@pytest.mark.parametrize('cube, message', [
    (None, 'f1s0n1.npy is missing'),
    (np.zeros((16, 16, 16), np.float32), 'f1s0n1.npy: dtype float32, expected uint8'),
    (np.zeros((16, 16, 16), np.int16), 'f1s0n1.npy: dtype int16, expected uint8'),
    (np.zeros((12, 12, 12), np.uint8), r'f1s0n1.npy: shape \(12, 12, 12\), expected a cube of at least 16'),
    (np.zeros((16, 16, 20), np.uint8), r'f1s0n1.npy: shape \(16, 16, 20\)'),
    (np.zeros((16, 16), np.uint8), r'f1s0n1.npy: shape \(16, 16\)'),
    (b'garbage', 'f1s0n1.npy cannot be read'),
])
def test_bad_cube_file(small_set, cube, message):
    path = os.path.join(small_set, 'cubes', 'f1s0n1.npy')
    os.remove(path)
    if isinstance(cube, bytes):
        with open(path, 'wb') as f:
            f.write(cube)
    elif cube is not None:
        np.save(path, cube)
    with pytest.raises(UserError, match=message):
        data.load_split(small_set, data.read_table(small_set), [0, 1], 16, 'cpu')
    data.load_split(small_set, data.read_table(small_set), [0], 16, 'cpu')  # the other fold's cubes are fine


def test_fold_without_nodules(small_set):
    message = r'TRAIN_FOLDS include fold 7, which has no nodules \(folds present: \[0, 1\]\)'
    with pytest.raises(UserError, match=message):
        data.load_split(small_set, data.read_table(small_set), [0, 7], 16, 'cpu', what='TRAIN_FOLDS')
    with pytest.raises(UserError, match='test folds include fold 5'):
        retrain.main(DATA=small_set, FOLD=5, DEVICE='cpu', RUNS=os.path.join(small_set, 'runs'))
    assert not os.path.exists(os.path.join(small_set, 'runs'))        # nothing written for a bad setting


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('args, message', [
    (('train_3D_continuation.py', '--DATA={missing}'), 'error: cube set {missing} does not exist'),
    (('train_3D_continuation.py', '--DATA={set}', '--FOLD=7'), 'error: cube set {set}: test folds include fold 7'),
    (('train_search.py', '--NOPE=1'), 'error: unknown setting --NOPE (known: AMP, ARCH_BETA1'),
])
def test_command_line_errors_are_one_line(small_set, tmp_path, args, message):
    names = {'missing': str(tmp_path / 'missing'), 'set': small_set}
    out = run_script(*(a.format(**names) for a in args))
    assert out.returncode == 2
    assert 'Traceback' not in out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(message.format(**names)), out.stderr


@pytest.mark.parametrize('size, ops, ok', [
    (8, ['sep_conv_3x3x3'], True), (8, ['max_pool_3x3x3'], True), (8, ['avg_pool_3x3x3'], False),
    (12, ['avg_pool_3x3x3'], True),
    (10, ['sep_conv_3x3x3'], False), (4, ['skip_connect'], False), (32, ['avg_pool_3x3x3'], True)])
def test_cube_size_check(size, ops, ok):
    if ok:
        data.check_cube_size(size, ops)
    else:
        with pytest.raises(UserError, match=f'CUBE={size}: must be a multiple of 4'):
            data.check_cube_size(size, ops)


def test_search_rejects_a_cube_too_small_for_its_pools(cube_set, tmp_path):
    import train_search
    with pytest.raises(UserError, match='CUBE=8'):
        train_search.main(DATA=cube_set, RUNS=str(tmp_path), DEVICE='cpu', C=4, LAYERS=3, CUBE=8, EPOCHS=1)


@pytest.mark.parametrize('one_sided, expected', [(False, [0.1, 0.2, 0.2, 0.2, 0.2, 0.1]), (True, [1 / 6] * 6)])
def test_where_the_random_crop_puts_the_cube_centre(one_sided, expected):
    """A marked voxel at the centre (8, 8, 8) of a 16^3 cube lands at 5..10 on each axis. Shift -2..+2 then the
    flip (ours): 0.1 / 0.2 x 4 / 0.1; the published low-side padding, content moved 0..+2 then the flip: 1/6 each."""
    cube = np.full((1, 16, 16, 16), 100, dtype=np.uint8)
    cube[0, 8, 8, 8] = 255
    d = make_data(cube)
    d.one_sided_shift = one_sided
    n = 6000
    x = d.train_batch(torch.zeros(n, dtype=torch.long), data.make_generator('cpu', 0))[0][:, 0]
    found = x.flatten(1).max(1).values == 255  # the cutout erased the mark in the others
    where = np.array(np.unravel_index(x.flatten(1).argmax(1).numpy(), (16, 16, 16))).T[found.numpy()]
    for a in range(3):
        p = np.bincount(where[:, a], minlength=16) / len(where)
        assert p[[0, 1, 2, 3, 4, 11, 12, 13, 14, 15]].sum() == 0
        np.testing.assert_allclose(p[5:11], expected, atol=0.025)  # ~5600 draws: sd <= 0.006
