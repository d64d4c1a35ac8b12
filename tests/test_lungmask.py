"""scans/lungmask.py's masking keeps annotated nodules: the bone rule no longer erases dense nodules."""
import os

import numpy as np

from scans import lungmask

SPACING = np.array([2.5, 1.4, 1.4])  # (z, y, x) mm
SHAPE = (40, 100, 100)
RIB_HU = 700.0


def offsets_mm():
    """(z, y, x) grids of mm offsets from the volume centre."""
    return np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE, SPACING)], indexing='ij')


def phantom():
    """Body (30 HU), two lungs (-850 HU), ribs (700 HU tubes along z in the chest wall), and two dense
    nodules (500 HU, radius 4 mm): A in the right lung, joined to the chest wall by a vessel (40 HU, radius
    1.5 mm), so it is no hole of the lung mask; B in the left lung on the pleura, over a rib.
    Returns (hu, nodules as (centre (z, y, x) raw index, diameter mm), ribs as (x, y) mm)."""
    z, y, x = offsets_mm()
    hu = np.full(SHAPE, -1000.0)
    hu[(x / 62) ** 2 + (y / 48) ** 2 <= 1] = 30.0
    ribs = [(-54.0, -3.0), (55.0, -20.0)]  # the first lies under nodule B
    for rx, ry in ribs:
        hu[(x - rx) ** 2 + (y - ry) ** 2 <= 9.0] = RIB_HU
    for cx in (-28.0, 28.0):
        hu[((x - cx) / 21) ** 2 + ((y + 3) / 31) ** 2 + (z / 44) ** 2 <= 1] = -850.0
    centres = {'A': (1.25, 10.0, 36.0), 'B': (1.25, -3.0, -46.0)}  # (z, y, x) mm; B reaches x = -50, the wall at -49
    hu[(np.abs(y - 10.0) <= 1.5) & (np.abs(z - 1.25) <= 1.5) & (x >= 36.0) & (x <= 56.0)] = 40.0  # A's vessel
    for c in centres.values():
        hu[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 16.0] = 500.0
    hu += np.random.default_rng(0).normal(0, 15, SHAPE)
    index = {k: np.asarray(c) / SPACING + (np.asarray(SHAPE) - 1) / 2 for k, c in centres.items()}
    return hu.astype(np.int16), {k: (i, 8.0) for k, i in index.items()}, ribs


def to_volume(raw_index, start):
    """Raw (z, y, x) index -> index of the 1 mm volume that starts at `start`."""
    return np.asarray(raw_index) * SPACING / lungmask.RESOLUTION - start


def region(volume, start, mask_raw):
    """Values of the 1 mm volume at the (rounded) positions of the raw voxels in mask_raw."""
    idx = np.round(to_volume(np.argwhere(mask_raw), start)).astype(int)
    ok = np.all((idx >= 0) & (idx < volume.shape), axis=1)
    return volume[tuple(idx[ok].T)]


def test_dense_nodules_kept_ribs_removed():
    hu, nodules, ribs = phantom()
    z, y, x = offsets_mm()
    before, start0, shares0, _ = lungmask.preprocess(hu, SPACING, (20.0, 8200.0))
    after, start, shares, _ = lungmask.preprocess(hu, SPACING, (20.0, 8200.0), list(nodules.values()), 4.0)
    assert np.array_equal(start, start0) and before.shape == after.shape and shares0 == []
    core = {k: ((z - (c[0] - 19.5) * 2.5) ** 2 + (y - (c[1] - 49.5) * 1.4) ** 2 + (x - (c[2] - 49.5) * 1.4) ** 2
                <= 1.5 ** 2) for k, (c, _) in nodules.items()}  # within 1.5 mm of each nodule's centre
    # the flaw, without the protection: the vessel-joined nodule A lies in the ring and most of it becomes 170
    assert (region(before, start0, core['A']) == lungmask.PAD_VALUE).mean() > 0.5
    for k in 'AB':  # protected: 500 HU -> 241, every core voxel stays bright
        assert region(after, start, core[k]).min() > 225, k
    # the whole sphere keeps its intensities: equal to the scan windowed and resampled without any masking
    plain = lungmask.resample_box(lungmask.window(hu), SPACING, start, start + np.asarray(after.shape))
    grid = np.indices(after.shape).reshape(3, -1).T.astype(float)  # 1 mm voxels (z, y, x)
    for c, d in nodules.values():
        ball = np.linalg.norm(grid - to_volume(c, start), axis=1) <= d / 2
        assert ball.sum() > 200 and np.array_equal(after.ravel()[ball], plain.ravel()[ball])
        assert (before.ravel()[ball] != plain.ravel()[ball]).mean() > 0.5  # without protection: mostly lost
    assert shares[0]['masked_frac'] == 0.0 and shares[1]['masked_frac'] == 0.0
    assert shares[0]['masked_frac_unprotected'] > 0.5  # what the rule alone did to A's sphere
    # ribs in the ring are still removed, away from the nodules; under B (within 4 mm of its surface) kept. The
    # ribs' cores lie beyond the saved box (lung box + 5 mm): their inner edges (radius 3 mm) are what it holds
    far_rib = ((x - ribs[1][0]) ** 2 + (y - ribs[1][1]) ** 2 <= 9.0) & (np.abs(z) < 30)
    assert len(region(after, start, far_rib)) > 20 and (region(after, start, far_rib) == lungmask.PAD_VALUE).all()
    rib_b = (x - ribs[0][0]) ** 2 + (y - ribs[0][1]) ** 2 <= 9.0
    away = region(after, start, rib_b & (np.abs(z - 1.25) > 12) & (np.abs(z) < 30))
    assert len(away) > 20 and (away <= lungmask.PAD_VALUE + 5).all()  # (+ 5: resampling beside the bright rim)
    near = rib_b & (np.abs(z - 1.25) < 1)
    assert len(region(after, start, near)) >= 5 and (region(after, start, near) > 220).all()
    assert (region(before, start0, near) <= lungmask.PAD_VALUE + 5).all()
    # nothing else changes: beyond the protected spheres (4 + 4 mm, + 2 mm for the resampling) both are equal
    near = np.zeros(len(grid), dtype=bool)
    for c, _ in nodules.values():
        near |= np.linalg.norm(grid - to_volume(c, start), axis=1) <= 10.0
    assert np.array_equal(after.ravel()[~near], before.ravel()[~near])
    assert (after.ravel()[near] != before.ravel()[near]).sum() > 100


def test_sphere_share_worked_example():
    """A 3 x 3 x 3 block at 1 mm: the radius-1 sphere around the centre holds the centre and its 6
    neighbours; filling 2 of them (one already at the fill value) changes 1 of 7."""
    image = np.full((3, 3, 3), 100, dtype=np.uint8)
    fill = np.zeros((3, 3, 3), dtype=bool)
    fill[1, 1, 0] = fill[1, 1, 2] = fill[0, 0, 0] = True
    image[1, 1, 2] = lungmask.PAD_VALUE
    ball = lungmask.sphere(np.array([1.0, 1.0, 1.0]), 1.0, np.ones(3), image.shape)
    assert ball[1].sum() == 7
    assert lungmask.changed_share(fill, image, ball) == round(1 / 7, 4)
    shares = lungmask.protect_nodules(fill, image, np.ones(3), [((1.0, 1.0, 1.0), 2.0)], 0.5)
    assert shares == [{'masked_frac': 0.0, 'masked_frac_unprotected': round(1 / 7, 4)}]
    assert fill[0, 0, 0] and not fill[1, 1, 0]  # the corner is 1.73 mm away: beyond radius 1 + 0.5
    assert lungmask.sphere(np.array([10.0, 1.0, 1.0]), 1.0, np.ones(3), image.shape) is None


def test_the_margin_keeps_a_rim_beyond_the_annotated_radius():
    """A row of 9 voxels at 1 mm, all to be filled (outside the lung mask); a dense nodule spans voxels 1..7
    (radius 3 mm) but is annotated with diameter 4 mm (radius 2) at voxel 4: only the margin keeps its rim."""
    image = np.full((1, 1, 9), 200, dtype=np.uint8)
    centre = [((0.0, 0.0, 4.0), 4.0)]
    for protect_mm, kept in ((1.0, range(1, 8)), (0.0, range(2, 7))):
        fill = np.ones_like(image, dtype=bool)
        shares = lungmask.protect_nodules(fill, image, np.ones(3), centre, protect_mm)
        assert np.flatnonzero(~fill[0, 0]).tolist() == list(kept), protect_mm
        # the annotated sphere (radius 2: voxels 2..6) is kept either way; 5 of 5 would have changed
        assert shares == [{'masked_frac': 0.0, 'masked_frac_unprotected': 1.0}]


def test_process_scan_applies_the_jobs_margin(tmp_path):
    """Through a scan file: nodule B (radius 4 mm, on the pleura, its outer part beyond the lung) annotated with
    diameter 4 mm, as an annotation that underestimates it. protect_mm=5 keeps all of B as in the unmasked scan;
    with protect_mm=0 nearly all of it changes (its rim is filled and the resampling blends that into the rest)."""
    import json

    import SimpleITK as sitk
    hu, nodules, _ = phantom()
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(tuple(float(s) for s in SPACING[::-1]))  # (x, y, z), origin 0, no flip
    sitk.WriteImage(image, str(tmp_path / 'scan.mhd'))
    annotated = {'A': 8.0, 'B': 4.0}
    for protect_mm in (5.0, 0.0):
        out = tmp_path / str(protect_mm)
        os.makedirs(out)
        lungmask.process_scan({'seriesuid': 's', 'path': str(tmp_path / 'scan.mhd'), 'out_dir': str(out),
                               'volume_ml': (20.0, 8200.0), 'protect_mm': protect_mm,
                               'nodules': [{'world': list(c[::-1] * SPACING[::-1]), 'diameter_mm': annotated[k]}
                                           for k, (c, _) in nodules.items()]})
        geometry = json.load(open(out / 's.json'))
        volume, start = np.load(out / 's.npy'), np.asarray(geometry['box_start'])
        assert geometry['protect_mm'] == protect_mm
        plain = lungmask.resample_box(lungmask.window(hu), SPACING, start, start + np.asarray(volume.shape))
        grid = np.indices(volume.shape).reshape(3, -1).T.astype(float)
        ball = np.linalg.norm(grid - to_volume(nodules['B'][0], start), axis=1) <= 4.0  # B's true extent
        changed = (volume.ravel()[ball] != plain.ravel()[ball]).mean()
        assert ball.sum() > 200 and (changed == 0 if protect_mm else changed > 0.9), (protect_mm, changed)
