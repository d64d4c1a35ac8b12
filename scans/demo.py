"""Built-in demo cube set: every labelled LIDC nodule rendered into a CT-like cube (no scans needed).

Each cube holds one real nodule: its readers' consensus shape at 1 mm (lidc.nodule_table), real size and
real label, drawn into synthetic lung (parenchyma with texture, vessels, sometimes a chest wall). The
nodule's density follows its texture rating (ground glass, part-solid, solid), its edge sharpness the
margin rating, spicules the spiculation rating, and calcification the readers' calcification pattern.
The cube (z, y, x at 1 mm, nodule centroid at voxel size // 2) is blurred, gets noise, and is windowed by
prepare.py's own function (scans/hu.py: HU clipped to [-1200, 600], mapped linearly to uint8 0..255, rounded).

Layout: out_dir/nodules.csv (nodule_id, seriesuid, patient_id, fold, label, diameter_mm, ratings, ...)
and out_dir/cubes/<nodule_id>.npy. Folds 0-9 are assigned by patient (so no scan straddles folds).
"""
import hashlib
import os
import shutil
import sys
import time

import numpy as np
from scipy import ndimage

from scans import lidc
from scans.hu import window  # the HU window of prepare.py (one function for both)
from utils import UserError, progress

PAD_VALUE = 170                   # uint8 value prepare.py writes outside the (dilated) lung mask
N_FOLDS = 10
DEFAULT_DIR = os.path.join('data', 'demo')


def stable_int(text):
    """A 63-bit integer from a string, the same in every process and Python version."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def assign_folds(table, n_folds=N_FOLDS):
    """Fold per row, by patient: patients in hash order each go to the fold with the fewest nodules."""
    sizes = table.groupby('patient_id').size()
    counts = np.zeros(n_folds, dtype=int)
    fold_of = {}
    for pid in sorted(sizes.index, key=stable_int):
        f = int(np.argmin(counts))
        fold_of[pid] = f
        counts[f] += sizes[pid]
    return table.patient_id.map(fold_of).astype(int)


# ---------------------------------------------------------------- rendering (all in HU, float32)

def _segment_occupancy(coords, p0, direction, length, radius):
    """Partial-volume occupancy (0..1) of a capsule from p0 along a unit direction; coords: (3, n)."""
    v = coords - p0[:, None]
    t = np.clip(direction @ v, 0, length)
    dist = np.linalg.norm(v - direction[:, None] * t, axis=0)
    # radius tapers to 60 % along the segment, like branching vessels and spicules
    r = radius * (1 - 0.4 * t / max(length, 1e-6))
    return np.clip(r + 0.5 - dist, 0, 1)


def _unit(rng):
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _lung(rng, size, coords):
    """Parenchyma with fine and coarse texture, plus a few vessels: (size,) * 3 HU."""
    fine = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 1.0) * 60
    coarse = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 4.0) * 120
    hu = (rng.uniform(-900, -800) + fine + coarse).astype(np.float32).ravel()
    for _ in range(rng.integers(2, 7)):   # vessels: capsules through a random point of the cube
        direction, length = _unit(rng), rng.uniform(size * 0.5, size * 1.5)
        p0 = rng.uniform(0, size, size=3) - direction * length / 2
        occ = _segment_occupancy(coords, p0, direction, length, rng.uniform(0.5, 2.5))
        hu += occ * (rng.uniform(-40, 80) - hu)
    return hu.reshape((size,) * 3)


def _paste(mask, size):
    """The mask moved so its centroid sits at voxel size // 2, cropped to the cube: (size,) * 3 bool."""
    shift = np.round(size // 2 - np.argwhere(mask).mean(0)).astype(int)
    out = np.zeros((size,) * 3, dtype=bool)
    src, dst = [], []
    for n, s in zip(mask.shape, shift):
        lo, hi = max(0, s), min(size, n + s)
        src.append(slice(lo - s, hi - s))
        dst.append(slice(lo, hi))
    if all(d.stop > d.start for d in dst):
        out[tuple(dst)] = mask[tuple(src)]
    return out


def _calcification(rng, inside, depth, code, radius):
    """Bool region of calcification inside the nodule for an LIDC pattern code (1-5)."""
    deep = depth / max(depth.max(), 1e-6)   # 0 at the edge .. 1 at the deepest voxel
    if code == 3:   # solid: the whole nodule
        return inside
    if code == 5:   # central
        return inside & (deep > 0.5)
    if code == 2:   # laminated: concentric shells
        return inside & (((deep > 0.25) & (deep < 0.4)) | (deep > 0.65))
    cand = np.argwhere(inside)
    n_blobs = 1 if code == 4 else int(rng.integers(3, 7))   # 4 non-central: one blob, 1 popcorn: several
    blob_r = max(1.0, radius * (0.45 if code == 4 else 0.3))
    out = np.zeros_like(inside)
    grid = np.indices(inside.shape)
    for c in cand[rng.integers(0, len(cand), size=n_blobs)]:
        out |= (((grid - c[:, None, None, None]) ** 2).sum(0) <= blob_r ** 2)
    return out & inside


def render_cube(mask, nodule, rng, size=32):
    """One uint8 cube (size,) * 3: the nodule mask (1 mm, z y x) with the ratings of `nodule` (a row of
    the nodule table) drawn into synthetic lung with rng."""
    coords = np.indices((size,) * 3, dtype=np.float32).reshape(3, -1)
    hu = _lung(rng, size, coords)
    inside = _paste(mask, size)
    radius = nodule['diameter_mm'] / 2
    centre = np.full(3, size // 2, dtype=np.float32)
    wall = None
    if rng.random() < 0.3:   # chest wall beyond a plane: tissue, then prepare.py's constant pad
        normal, gap = _unit(rng), max(radius + 3, 8) + rng.uniform(0, 6)
        depth = ((coords - centre[:, None]).T @ normal - gap).reshape((size,) * 3)
        hu = np.where(depth > 0, rng.uniform(-20, 60), hu)
        wall = depth > rng.uniform(2, 6)
    # texture 1 (ground glass) .. 5 (solid): solid core grows from the deepest voxels outwards
    depth = ndimage.distance_transform_edt(inside)
    solid_fraction = np.clip((nodule['texture'] - 1) / 4, 0, 1)
    solid = inside & (depth > (1 - solid_fraction) * depth.max() - 1e-6)
    solid_hu, glass_hu = rng.uniform(0, 60), rng.uniform(-680, -420)
    occ = inside.astype(np.float32)
    n_spicules = int(round(max(nodule['spiculation'] - 1.5, 0) * 2))
    surface = np.argwhere(inside & (depth <= 1))
    for p in surface[rng.integers(0, len(surface), size=n_spicules)] if len(surface) else []:
        out = (p - centre) / max(np.linalg.norm(p - centre), 1e-6) + 0.4 * _unit(rng)
        occ = np.maximum(occ, _segment_occupancy(coords, p.astype(np.float32), out / np.linalg.norm(out),
                                                 rng.uniform(3, 6 + radius / 2),
                                                 rng.uniform(0.5, 0.9)).reshape(occ.shape))
    # margin 1 (poorly defined) .. 5 (sharp): a softer edge for a poorer margin
    occ = ndimage.gaussian_filter(occ, 0.3 + 0.25 * (5 - nodule['margin']))
    value = np.where(solid | ~inside, solid_hu, glass_hu) + rng.normal(0, 15, size=occ.shape)
    hu = hu + np.clip(occ * 1.2, 0, 1) * (value - hu)
    if nodule['calcified']:
        calc = _calcification(rng, inside, depth, nodule['calcification_type'], radius)
        hu = np.where(calc, rng.uniform(300, 1000), hu)
    hu = ndimage.gaussian_filter(hu, rng.uniform(0.5, 0.9))   # scanner blur
    noise = ndimage.gaussian_filter(rng.normal(size=hu.shape), 0.6)
    hu = hu + noise / noise.std() * rng.uniform(10, 35)
    cube = window(hu)
    if wall is not None:
        cube[wall] = PAD_VALUE
    return cube


# ---------------------------------------------------------------- building the set

def demo_table(db=None, limit=None):
    """(table, masks) of the labelled nodules with their folds; limit: a deterministic subset of that
    many nodules (spread over patients by hash), folds unchanged."""
    table = lidc.nodule_clusters(db=db)
    table = table[table.label >= 0].reset_index(drop=True)
    table.insert(3, 'fold', assign_folds(table))
    if limit is not None:
        pick = sorted(sorted(range(len(table)), key=lambda i: stable_int(table.nodule_id[i]))[:limit])
        table = table.iloc[pick].reset_index(drop=True)
    return lidc.add_consensus(table, db=db)


def _replace_dir(tmp, out_dir):
    """Move the finished tmp folder to out_dir; an old complete set there is replaced."""
    if os.path.isdir(out_dir):
        if os.path.exists(os.path.join(out_dir, 'nodules.csv')) or not os.listdir(out_dir):
            old = f'{out_dir}.old-{os.getpid()}'
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
            return
        raise UserError(f'{out_dir} exists and is not a demo set (no nodules.csv): move it away first')
    os.rename(tmp, out_dir)


def build_demo_set(out_dir, seed=0, size=32, limit=None, db=None):
    """Render the demo set into out_dir (built in a temporary folder, renamed at the end). Returns the
    table written to nodules.csv. Deterministic for a seed: each cube's random stream depends only on
    (seed, nodule_id)."""
    table, masks = demo_table(db=db, limit=limit)
    out_dir = os.path.normpath(out_dir)
    os.makedirs(os.path.dirname(out_dir) or '.', exist_ok=True)
    tmp = f'{out_dir}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, 'cubes'))
    try:
        rows = table.to_dict('records')
        for row, mask in progress(zip(rows, masks), total=len(rows), desc='demo cubes'):
            rng = np.random.default_rng([seed, stable_int(row['nodule_id'])])
            np.save(os.path.join(tmp, 'cubes', f'{row["nodule_id"]}.npy'), render_cube(mask, row, rng, size))
        table.to_csv(os.path.join(tmp, 'nodules.csv'), index=False, float_format='%.6g')
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return table


def ensure_demo_set(path=DEFAULT_DIR, **kw):
    """Build the demo set at path unless path/nodules.csv exists; returns path."""
    if not os.path.exists(os.path.join(path, 'nodules.csv')):
        print(f'building the demo cube set in {path} (once, about a minute)', flush=True)
        build_demo_set(path, **kw)
    return path


def main(out_dir=DEFAULT_DIR):
    t0 = time.time()
    table = build_demo_set(out_dir)
    counts = table.label.value_counts()
    print(f'{out_dir}: {len(table)} cubes ({counts.get(0, 0)} benign, {counts.get(1, 0)} malignant), '
          f'{time.time() - t0:.0f} s; nodules per fold {table.fold.value_counts().sort_index().tolist()}')


if __name__ == '__main__':
    try:
        main(*sys.argv[1:2])
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
