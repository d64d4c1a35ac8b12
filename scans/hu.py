"""Hounsfield units: the window that turns HU into the uint8 of every cube (prepare.py, predict.py --SCAN and the
demo set alike), and the checks that an array read from a file holds the HU of a CT (finite numbers, air near
-1000 HU) and that a labelled centre has something denser than lung around it. numpy only (the scan workers')."""
import numpy as np

HU_WINDOW = (-1200.0, 600.0)  # HU mapped linearly onto 0..255 (clipped)
AIR_HU = -900.0               # a voxel at or below this is air or aerated lung
MIN_AIR_SHARE = 0.01          # a CT of the chest has at least this share of its voxels at or below AIR_HU
# a labelled nodule has a voxel above this within its radius: the faintest of the demo set's 1010 nodules reaches
# -614 HU there, the faintest the demo generator draws (3 mm of pure ground glass with the poorest margin, 150 draws)
# -748 HU, a test phantom's nodule 400 HU; the demo set's empty lung reaches -790 HU (median), a phantom's -800 HU
CENTRE_HU = -760.0
CENTRE_MIN_RADIUS_MM = 2.0    # the sphere searched around a labelled centre has at least this radius


def window(hu):
    """HU -> uint8 0..255 over HU_WINDOW, rounded to the nearest grey level (computed in float32, clipped: no
    wrap-around)."""
    lo, hi = HU_WINDOW
    scaled = (np.asarray(hu).astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def non_finite(values):
    """Text naming the NaN and infinite voxels of a float array ('' when there are none)."""
    if not np.issubdtype(values.dtype, np.floating):
        return ''
    bad = ~np.isfinite(values)
    count = int(bad.sum())
    if not count:
        return ''
    nan = int(np.isnan(values).sum())
    first = np.argwhere(bad)[0].tolist()
    return (f'{count} of {values.size} voxels are not finite numbers ({nan} NaN, {count - nan} infinite; the first '
            f'at voxel (z, y, x) {first}): replace them (e.g. with -1000 HU, air) and rerun')


def not_hounsfield(hu):
    """Text saying why an array is not the HU of a chest CT ('' when it may be): too few voxels of air or aerated
    lung (an MR, a CT stored without its rescale slope and intercept, a crop of soft tissue)."""
    air = float(np.mean(hu <= AIR_HU))
    if air >= MIN_AIR_SHARE:
        return ''
    lo, hi = (float(v) for v in np.percentile(hu, (1, 99)))
    return (f'its values are not the Hounsfield units of a CT: {air:.1%} of its voxels are at or below {AIR_HU:g} HU '
            f'(air and lung; a chest CT has at least {MIN_AIR_SHARE:.0%}), 98% of them lie in {lo:g}..{hi:g} '
            '(an MR, or a CT stored without its rescale slope and intercept?); give a CT of the chest in HU')


def sphere(centre, radius_mm, spacing, shape):
    """(box slices, bool mask of the box): the voxels of `shape` whose centres lie within radius_mm of the
    float (z, y, x) index `centre`; None when the sphere misses the array."""
    reach = radius_mm / spacing
    lo = np.maximum(np.ceil(centre - reach).astype(int), 0)
    hi = np.minimum(np.floor(centre + reach).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    inside = d2 <= radius_mm ** 2
    return (tuple(slice(a, b) for a, b in zip(lo, hi)), inside) if inside.any() else None


def densest_near(hu, centre, diameter_mm, spacing):
    """The highest HU within a labelled nodule's radius (at least CENTRE_MIN_RADIUS_MM) of its float (z, y, x)
    centre in `hu`; nan when the sphere misses the array. Below CENTRE_HU: nothing there denser than lung."""
    spacing = np.asarray(spacing, dtype=float)
    ball = sphere(np.asarray(centre, dtype=float), max(diameter_mm / 2, CENTRE_MIN_RADIUS_MM), spacing, hu.shape)
    return float('nan') if ball is None else float(hu[ball[0]][ball[1]].max())
