"""Cube sets: loading and checking them, fold selection, and batched augmentation on the training device.

A cube set is a folder with nodules.csv (columns nodule_id, seriesuid, fold, diameter_mm, label) and
cubes/<nodule_id>.npy (uint8, S^3 with S >= the network input, nodule at the centre).
"""
import os

import numpy as np
import torch

from utils import UserError

DEMO_DIR = os.path.join('data', 'demo')  # the built-in demo set, built on first use
REQUIRED_COLUMNS = ('nodule_id', 'seriesuid', 'fold', 'diameter_mm', 'label')
PAD_VALUE = 170  # intensity of the padding around a cube (the lung-mask exterior value of prepare.py)
SHIFT = 2  # random crop: shift of up to this many voxels per axis
CUTOUT = 4  # edge of the zeroed block


def read_table(root):
    """nodules.csv of a cube set, checked; builds the demo set first when root is the demo folder."""
    path = os.path.join(root, 'nodules.csv')
    if not os.path.exists(path) and os.path.normpath(root) == DEMO_DIR:
        from scans import demo
        demo.ensure_demo_set(root)
    if not os.path.isdir(root):
        raise UserError(f'cube set {root} does not exist (expected a folder with nodules.csv and cubes/)')
    if not os.path.exists(path):
        raise UserError(f'cube set {root}: {path} is missing')
    import pandas as pd  # here, not at the top: the speed benchmarks run where pandas is not installed
    try:
        table = pd.read_csv(path, dtype={'nodule_id': str, 'seriesuid': str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f'{path} cannot be parsed: {e}') from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f'{path} lacks column(s) {", ".join(missing)}')
    # compared as numbers: one text label makes pandas read the whole column as strings
    bad = table[~pd.to_numeric(table['label'], errors='coerce').isin([0, 1])]
    if len(bad):
        first = bad.iloc[0]
        raise UserError(f'{path}: label must be 0 or 1; nodule {first["nodule_id"]} has {first["label"]}')
    if table['nodule_id'].duplicated().any():
        raise UserError(f'{path}: nodule_id {table["nodule_id"][table["nodule_id"].duplicated()].iloc[0]} repeats')
    return table


def select_folds(table, folds, root='', what='folds'):
    """Rows of the given folds; a fold without rows is an error (it names the fold)."""
    folds = [int(f) for f in folds]
    for f in folds:
        if not (table['fold'] == f).any():
            known = sorted(table['fold'].unique().tolist())
            raise UserError(f'cube set {root}: {what} include fold {f}, which has no nodules (folds present: {known})')
    return table[table['fold'].isin(folds)].reset_index(drop=True)


def load_cubes(root, table, size):
    """The table's cubes as one uint8 array (N, size, size, size), centre-cropped from larger cubes."""
    out = np.empty((len(table), size, size, size), dtype=np.uint8)
    for i, nid in enumerate(table['nodule_id']):
        path = os.path.join(root, 'cubes', f'{nid}.npy')
        if not os.path.exists(path):
            raise UserError(f'cube set {root}: {path} is missing (listed in nodules.csv)')
        try:
            cube = np.load(path)
        except (ValueError, OSError) as e:
            raise UserError(f'{path} cannot be read: {e}') from None
        if cube.dtype != np.uint8:
            raise UserError(f'{path}: dtype {cube.dtype}, expected uint8')
        if cube.ndim != 3 or min(cube.shape) < size or len(set(cube.shape)) != 1:
            raise UserError(f'{path}: shape {cube.shape}, expected a cube of at least {size}^3')
        o = (cube.shape[0] - size) // 2
        out[i] = cube[o:o + size, o:o + size, o:o + size]
    return out


def check_cube_size(size, op_names):
    """The networks reduce twice: CUBE/4 voxels per axis must remain, at least 3 where avg_pool_3x3x3 is used
    (torch's average pool without padding counts rejects inputs smaller than its kernel)."""
    smallest = 12 if any(name.startswith('avg_pool') for name in op_names) else 8
    if size % 4 or size < smallest:
        raise UserError(f'CUBE={size}: must be a multiple of 4 and at least {smallest} for these ops '
                        '(two stride-2 reductions leave CUBE/4 voxels per axis)')


def split_by_scan(table, val_fraction, seed):
    """Split rows into two index arrays by scan, so that no scan's nodules straddle the split."""
    scans = np.array(sorted(table['seriesuid'].unique()))
    rng = np.random.default_rng(seed)
    rng.shuffle(scans)
    n_val = int(round(len(scans) * val_fraction))
    if n_val == 0 or n_val == len(scans):
        raise UserError(f'cannot split {len(scans)} scans into train and val with fraction {val_fraction}')
    val = table['seriesuid'].isin(set(scans[:n_val])).to_numpy()
    return np.flatnonzero(~val), np.flatnonzero(val)


def search_split(root, folds, val_fraction, seed, cube, device):
    """(search-train, search-val) CubeData of the search folds, split by scan (no scan in both), normalized by the
    statistics of search-train only. The search scripts read nothing else (the test folds are never loaded)."""
    table = select_folds(read_table(root), folds, root, 'SEARCH_FOLDS')
    tr_idx, va_idx = split_by_scan(table, val_fraction, seed)
    cubes = load_cubes(root, table, cube)
    stats = cube_stats(cubes[tr_idx])
    labels = table['label'].to_numpy()
    return (CubeData(cubes[tr_idx], labels[tr_idx], *stats, device),
            CubeData(cubes[va_idx], labels[va_idx], *stats, device))


class CubeData:
    """Cubes and labels held on the training device, with seeded batched augmentation.

    cubes: uint8 (N, S, S, S); mean/std: normalization statistics (from training cubes only).
    one_sided_shift (set by the scripts): the random crop moves the content 0..+SHIFT voxels per axis before the
    flip (the published code pads the low side only) instead of -SHIFT..+SHIFT.
    """

    def __init__(self, cubes, labels, mean, std, device):
        self.cubes = torch.as_tensor(cubes).to(device)
        # a copy: arrays from pandas may be read-only, which torch warns about
        self.labels = torch.tensor(np.array(labels), dtype=torch.long, device=device)
        self.mean, self.std = float(mean), float(std)
        self.device = torch.device(device)
        self.size = self.cubes.shape[-1]
        self.one_sided_shift = False

    def __len__(self):
        return len(self.labels)

    def eval_batch(self, idx):
        """(B, 1, S, S, S) float32 normalized, and labels (B,)."""
        x = self.cubes[idx].float().unsqueeze(1)
        return (x - self.mean) / self.std, self.labels[idx]

    def train_batch(self, idx, gen):
        """Random shift (pad 170), flips on each axis, a zeroed 4^3 block; then normalization."""
        s, b, dev = self.size, len(idx), self.device
        padded = torch.nn.functional.pad(self.cubes[idx], (SHIFT,) * 6, value=PAD_VALUE)  # (B, S+4, S+4, S+4)
        # content voxel = padded index - SHIFT: an offset of 0..2 SHIFT moves it -SHIFT..+SHIFT, 0..SHIFT 0..+SHIFT
        offset = torch.randint(0, (1 if self.one_sided_shift else 2) * SHIFT + 1, (b, 3), generator=gen, device=dev)
        flip = torch.rand(b, 3, generator=gen, device=dev) < 0.5
        ar = torch.arange(s, device=dev)
        # per-sample index along each axis: (B, S), flipped where drawn, then shifted
        axes = [torch.where(flip[:, a:a + 1], s - 1 - ar, ar) + offset[:, a:a + 1] for a in range(3)]
        n = torch.arange(b, device=dev)[:, None, None, None]
        x = padded[n, axes[0][:, :, None, None], axes[1][:, None, :, None], axes[2][:, None, None, :]]
        corner = torch.randint(0, s - CUTOUT + 1, (b, 3), generator=gen, device=dev)
        inside = [(ar >= corner[:, a:a + 1]) & (ar < corner[:, a:a + 1] + CUTOUT) for a in range(3)]
        block = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
        x = x.masked_fill(block, 0).float().unsqueeze(1)
        return (x - self.mean) / self.std, self.labels[idx]


def cube_stats(cubes):
    """Mean and std of uint8 cubes (N, S, S, S), computed in float64."""
    x = np.asarray(cubes, dtype=np.float64)
    return x.mean(), max(x.std(), 1e-6)


def load_split(root, table, folds, size, device, mean_std=None, what='folds'):
    """CubeData of the given folds; normalization from these cubes unless mean_std is given."""
    table = select_folds(table, folds, root, what)
    cubes = load_cubes(root, table, size)
    mean, std = mean_std if mean_std is not None else cube_stats(cubes)
    return CubeData(cubes, table['label'].to_numpy(), mean, std, device), table


def batches(n, batch_size, shuffle, gen=None, device='cpu'):
    """Index tensors of consecutive batches over n items (a seeded permutation when shuffling)."""
    order = torch.randperm(n, generator=gen, device=device) if shuffle else torch.arange(n, device=device)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def make_generator(device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
