"""Shared fixtures: tiny synthetic cube sets built in tmp_path."""
import os

import numpy as np
import pandas as pd
import pytest
import torch


def write_cube_set(root, n_folds=10, scans_per_fold=2, nodules_per_scan=2, size=16, seed=0):
    """A cube set whose malignant nodules are larger bright spheres; returns root."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'cubes'), exist_ok=True)
    zz, yy, xx = np.mgrid[:size, :size, :size] - (size - 1) / 2
    r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
    rows = []
    for fold in range(n_folds):
        for s in range(scans_per_fold):
            for k in range(nodules_per_scan):
                label = (s + k) % 2
                radius = (4.5 if label else 2.0) + rng.uniform(-0.5, 0.5)
                cube = rng.normal(40, 10, (size,) * 3) + 150 * (r < radius)
                nid = f'f{fold}s{s}n{k}'
                np.save(os.path.join(root, 'cubes', nid + '.npy'), np.clip(cube, 0, 255).astype(np.uint8))
                rows.append({'nodule_id': nid, 'seriesuid': f'scan{fold}.{s}', 'fold': fold,
                             'diameter_mm': 2 * radius, 'label': label})
    pd.DataFrame(rows).to_csv(os.path.join(root, 'nodules.csv'), index=False)
    return str(root)


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """The tests' convolutions are tiny: extra threads only add synchronisation (about 10x slower on a
    loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fast_kernels_on():
    """The scripts set dwconv3d's module-wide switch from their FAST_KERNELS setting: reset it after each test."""
    yield
    import dwconv3d
    dwconv3d.set_fast_kernels(True)


@pytest.fixture
def cube_set(tmp_path):
    return write_cube_set(tmp_path / 'cubes16')
