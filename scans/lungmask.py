"""One LUNA16 scan -> a preprocessed uint8 volume (DeepLung lineage, DESIGN.md section 3).

Steps: per-slice lung binarization (Gaussian sigma 1, -600 HU, area and eccentricity filters), 3-D
component analysis, hole filling, two-lung split, per-lung per-slice convex hull, 3-D dilation (10
iterations); HU window [-1200, 600] -> 0..255; outside the dilated mask = 170, bright (> 210) voxels in the
dilation ring = 170 (bone); resampling to 1 mm (linear) of the lung bounding box (+ margin) only.
A scan's axes are first turned to +x, +y, +z (to_lps: a LUNA16 TransformMatrix
-1 0 0 0 -1 0 0 0 1 is mirrored in y and x). Arrays are (z, y, x).

Annotated nodules are protected: a sphere of the nodule's radius plus a margin (protect_mm) around each
annotation is never filled. Without it the bone rule erases dense nodules: the lung mask's holes are
filled, but a nodule that touches the pleura, or a vessel that reaches the chest wall, is not a hole, so
it lies in the ring, and its voxels above ~283 HU (uint8 210) become 170; calcification, one of the
strongest benign signs, is lost first. The published preprocessing has the same flaw.
"""
import os
import time

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage.draw import polygon

from scans.hu import HU_WINDOW, non_finite, not_hounsfield, sphere, window  # noqa: F401 - HU_WINDOW: its interface
from scans.labels import CENTRE_REMEDY, empty_centres
from scans.luna import ScanError, check_data_file, check_header, itk_message, read_header, save_npy_atomic, world_to_raw
from scans.series import check_series, nifti_non_finite
from utils import save_json_atomic

LUNG_HU = -600.0              # a smoothed voxel below this is air or lung
SMOOTH_SIGMA = 1.0            # Gaussian sigma (pixels) of the per-slice smoothing
MIN_SLICE_AREA_MM2 = 30.0     # per-slice air regions smaller than this are noise or vessels' gaps
MAX_ECCENTRICITY = 0.99       # per-slice regions more elongated than this are not lung (e.g. the table gap)
HULL_GROWTH = 1.5             # a slice's convex hull replaces its lung only if it adds at most 50 % area
DILATION = 10                 # iterations of the 3-D (6-neighbour) mask dilation, in raw voxels
PAD_VALUE = 170               # intensity outside the dilated lung mask
BONE_VALUE = 210              # in the dilation ring, brighter voxels (bone) are set to PAD_VALUE
RESOLUTION = 1.0              # mm per voxel of the saved volume
BOX_MARGIN_MM = 5             # margin around the lung bounding box, mm
MAX_SPLIT_EROSIONS = 10       # erosions (of SPLIT_MM blocks) tried to separate the two lungs where they touch
SPLIT_MM = 3.0                # block size (mm) of the coarse mask on which the lungs are split
SPLIT_RATIO = 0.1             # the smaller of two lungs must have at least this fraction of the larger
AXIS_TOL = 1e-3               # direction cosines within this of 0 or +-1 count as along the axes (not oblique)
LUNG_ML = (100.0, 8200.0)     # volume range (ml) of a 3-D air component inside the body that counts as lung
PROTECT_MM = 4.0              # margin (mm) beyond each annotated nodule's radius that masking never fills


def dicom_files(folder, series=''):
    """The files of one DICOM series in `folder`, in slice order (GDCM sorts them by position); ScanError when
    the folder holds none, or several and `series` does not choose one (the message lists them), or when the
    series is not a CT volume of evenly spaced slices (series.check_series)."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not ids:
        raise ScanError(f'{folder} holds no DICOM series (a scan is a .mhd, a .nii / .nii.gz or a DICOM folder)')
    if series and series not in ids:
        raise ScanError(f'{folder} has no DICOM series {series} (it holds {", ".join(ids)})')
    if len(ids) > 1 and not series:
        listed = ', '.join(f'{i} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, i))} files)'
                           for i in ids)
        raise ScanError(f'{folder} holds {len(ids)} DICOM series: {listed}; choose one with --SERIES=<id>')
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series or ids[0])
    check_series(files, folder, series or ids[0])
    return files


def read_image(path, series=''):
    """(sitk image, header of the file): a .mhd/.raw (checked against its data file first), a NIfTI or
    another single file ITK reads, or a folder holding a DICOM series (slope and intercept applied)."""
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_files(path, series))
            shown = reader.GetGlobalWarningDisplay()
            reader.SetGlobalWarningDisplay(False)  # its spacing warning (uneven slices) is checked by dicom_files
            try:
                image = reader.Execute()
            finally:
                reader.SetGlobalWarningDisplay(shown)
            return image, check_header(image, path)
        if not os.path.isfile(path):
            raise ScanError(f'no scan at {path}')
        if path.lower().endswith('.mhd'):
            check_data_file(path)
        if path.lower().endswith(('.nii', '.nii.gz')) and nifti_non_finite(path):  # ITK would read them as 0
            raise ScanError(f'{path}: {nifti_non_finite(path)}')
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        header = read_header(path, reader)
        return reader.Execute(), header
    except RuntimeError as e:
        raise ScanError(f'unreadable scan {path}: {itk_message(e)}') from None


def to_lps(image, header, path):
    """(image, header) with the voxel axes along +x, +y, +z (LPS: the direction cosines become identity) by
    flipping and permuting axes (DICOMOrient, exact); the file's direction is kept as file_direction. A LUNA16
    scan with TransformMatrix -1 0 0 0 -1 0 0 0 1 is mirrored in y and x, as the DeepLung lineage does; a NIfTI
    (stored in RAS, converted to LPS by ITK when read) or a DICOM series of any axis order comes out the same
    way. ScanError for an oblique scan (cosines not along the axes)."""
    direction = np.asarray(header['direction'], dtype=float)
    if np.allclose(direction, np.eye(3), atol=AXIS_TOL):
        return image, dict(header, direction=np.eye(3).tolist(), flip=False, file_direction=header['direction'])
    oriented = sitk.DICOMOrient(image, 'LPS')
    if not np.allclose(np.reshape(oriented.GetDirection(), (3, 3)), np.eye(3), atol=AXIS_TOL):
        raise ScanError(f'oblique scan: direction cosines {np.round(direction, 4).tolist()} are not along the axes '
                        f'({path}); resample it onto axis-aligned voxels first')
    return oriented, dict(check_header(oriented, path), direction=np.eye(3).tolist(), flip=False,
                          file_direction=header['direction'])


def read_scan(path, series=''):
    """(hu, header): int16 HU array (z, y, x) with its axes along +z, +y, +x (to_lps), and its geometry
    (spacing, origin, size in that order, direction identity). ScanError for NaN or infinite voxels, and for
    values that are not the HU of a CT (scans/hu.py)."""
    image, header = to_lps(*read_image(path, series), path)
    hu = sitk.GetArrayFromImage(image)
    if not np.issubdtype(hu.dtype, np.number) or hu.ndim != 3:
        raise ScanError(f'bad pixel data: {hu.dtype} array of shape {hu.shape}')
    if non_finite(hu):
        raise ScanError(f'{path}: {non_finite(hu)}')
    if np.issubdtype(hu.dtype, np.floating):  # DICOM with a fractional slope: round, not truncate
        hu = np.rint(hu)
    if not_hounsfield(hu):
        raise ScanError(f'{path}: {not_hounsfield(hu)}')
    return np.clip(hu, -32768, 32767).astype(np.int16, copy=False), header


def raw_centres(nodules, header):
    """Float (z, y, x) index in the array of read_scan of each nodule (dict with world (x, y, z) mm)."""
    return [world_to_raw(n['world'], header['origin'], header['spacing'], header['flip'], header['size'],
                         header['direction']) for n in nodules]


def binarize_slices(hu, spacing, chunk=32):
    """Per-slice candidate lung/air mask (z, y, x) bool: smoothed HU below LUNG_HU, keeping 2-D regions
    (8-connected) with area >= MIN_SLICE_AREA_MM2 and eccentricity < MAX_ECCENTRICITY. Slices are done
    `chunk` at a time, all regions of a chunk at once (labels that do not connect across slices)."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    out = np.zeros(hu.shape, dtype=bool)
    for z0 in range(0, hu.shape[0], chunk):
        smooth = ndimage.gaussian_filter(hu[z0:z0 + chunk].astype(np.float32), (0, SMOOTH_SIGMA, SMOOTH_SIGMA),
                                         truncate=2.0)
        labels, n = ndimage.label(smooth < LUNG_HU, structure=in_plane)  # (k, y, x) int
        if n == 0:
            continue
        area = np.bincount(labels.ravel(), minlength=n + 1) * (spacing[1] * spacing[2])
        keep = (area >= MIN_SLICE_AREA_MM2) & (eccentricity(labels, n) < MAX_ECCENTRICITY)
        keep[0] = False
        out[z0:z0 + chunk] = keep[labels]
    return out


def eccentricity(labels, n):
    """(n + 1,) eccentricity of each labelled 2-D region of labels (k, y, x), from its second moments:
    sqrt(1 - l2 / l1) with l1 >= l2 the eigenvalues of the (row, col) covariance (as skimage's regionprops)."""
    flat = labels.ravel()
    k, h, w = labels.shape
    count = np.maximum(np.bincount(flat, minlength=n + 1), 1).astype(float)
    rows = np.broadcast_to(np.arange(h, dtype=float)[None, :, None], labels.shape).ravel()
    cols = np.broadcast_to(np.arange(w, dtype=float)[None, None, :], labels.shape).ravel()

    def mean(weights):
        return np.bincount(flat, weights=weights, minlength=n + 1) / count
    mr, mc = mean(rows), mean(cols)
    vrr, vcc, vrc = mean(rows * rows) - mr ** 2, mean(cols * cols) - mc ** 2, mean(rows * cols) - mr * mc
    half_trace = (vrr + vcc) / 2
    root = np.sqrt(np.maximum(half_trace ** 2 - (vrr * vcc - vrc ** 2), 0))
    l1, l2 = half_trace + root, np.maximum(half_trace - root, 0)
    return np.sqrt(1 - np.divide(l2, l1, out=np.ones_like(l1), where=l1 > 1e-12))


def fill_holes(mask):
    """3-D hole filling: background components that do not reach the bounding box's border become mask."""
    box = bounding_box(mask, 1, mask.shape)
    sub = mask[box]
    background, _ = ndimage.label(~sub)
    outside = np.unique(np.concatenate([f.ravel() for f in
                                        (background[0], background[-1], background[:, 0], background[:, -1],
                                         background[:, :, 0], background[:, :, -1])]))
    out = mask.copy()
    out[box] |= ~np.isin(background, outside)
    return out


def bounding_box(mask, margin, shape):
    """Slices (z, y, x) of the bounding box of a non-empty mask, grown by margin voxels (clipped)."""
    box = []
    for a in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))
        box.append(slice(max(idx[0] - margin, 0), min(idx[-1] + margin + 1, shape[a])))
    return tuple(box)


def select_lungs(air, spacing, volume_ml):
    """(mask, ml): 3-D components of the per-slice air mask that may be lung: not touching the in-plane border
    (that is the air around the body) and with a volume within volume_ml = (min, max) millilitres, holes filled;
    ml: the volume of each component kept, largest first (millilitres)."""
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(air.shape, dtype=bool), []
    border = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    ml = np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod(spacing)) / 1000.0
    ok = (ml >= volume_ml[0]) & (ml <= volume_ml[1])
    ok[0] = False
    ok[border] = False
    lungs = ok[labels]
    kept = sorted((round(float(v), 1) for v in ml[ok]), reverse=True)
    # nodules and vessels inside the lung are bright holes of the air mask: fill them in 3-D
    return (fill_holes(lungs) if lungs.any() else lungs), kept


def split_lungs(lungs, spacing):
    """The lung mask as a list of masks: the two lungs if they can be told apart, else [lungs].

    Works on a coarse copy (blocks of ~SPLIT_MM, a block is lung if any voxel is): the two largest
    components, found after eroding until the lungs come apart where they touch, are grown back within
    the coarse mask; voxels reached by neither (other small components) form a third mask."""
    factor = np.maximum(np.round(SPLIT_MM / np.asarray(spacing)), 1).astype(int)
    coarse = _block_any(lungs, factor)
    cross = ndimage.generate_binary_structure(3, 1)
    mask = coarse
    for _ in range(MAX_SPLIT_EROSIONS + 1):
        labels, n = ndimage.label(mask)
        if n >= 2:
            size = np.bincount(labels.ravel())[1:]
            a, b = np.argsort(size)[::-1][:2] + 1
            if size[b - 1] >= SPLIT_RATIO * size[a - 1]:
                owner = _grow_seeds(np.where(labels == a, 1, np.where(labels == b, 2, 0)).astype(np.int8),
                                    coarse, cross)
                # back to full resolution: each voxel takes its block's owner
                full = owner[np.ix_(*[np.arange(s) // f for s, f in zip(lungs.shape, factor)])]
                parts = [lungs & (full == 1), lungs & (full == 2), lungs & (full == 0)]
                return [p for p in parts if p.any()]
        if n == 0:
            break
        mask = ndimage.binary_erosion(mask, structure=cross)
    return [lungs]


def _block_any(mask, factor):
    """Coarse mask: blocks of factor (z, y, x) voxels, True where any voxel of the block is."""
    pad = [(0, -s % f) for s, f in zip(mask.shape, factor)]
    m = np.pad(mask, pad)
    k = [s // f for s, f in zip(m.shape, factor)]
    return m.reshape(k[0], factor[0], k[1], factor[1], k[2], factor[2]).any(axis=(1, 3, 5))


def _grow_seeds(owner, mask, cross):
    """Grow seed labels 1 and 2 (int8 array) one voxel per step inside `mask` until nothing changes."""
    while True:
        grown = ndimage.grey_dilation(owner, footprint=cross)
        new = (owner == 0) & mask & (grown > 0)
        if not new.any():
            return owner
        owner[new] = grown[new]


def hull_mask(lung):
    """Per-slice convex hull of one lung, keeping the plain slice where the hull would grow it > HULL_GROWTH."""
    out = lung.copy()
    for z in np.flatnonzero(lung.any(axis=(1, 2))):
        hull = slice_hull(lung[z])
        if hull.sum() <= HULL_GROWTH * lung[z].sum():
            out[z] = hull
    return out


def slice_hull(mask):
    """Convex hull of a 2-D mask (pixel centres), including the mask itself. The hull of a pixel set is
    the hull of each row's first and last pixel, so only those (<= 2 per row) go to qhull."""
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    points = np.concatenate([np.c_[rows, first], np.c_[rows, last]]).astype(float)
    try:
        vertices = points[ConvexHull(points).vertices]
    except QhullError:  # all points on a line: the mask is its own hull
        return mask.copy()
    hull = mask.copy()
    rr, cc = polygon(vertices[:, 0], vertices[:, 1], shape=mask.shape)
    hull[rr, cc] = True
    return hull


def lung_box(lungs, spacing, shape):
    """Start and stop (z, y, x) in the RESOLUTION grid of the lung bounding box plus BOX_MARGIN_MM."""
    box = bounding_box(lungs, 0, shape)
    lo = np.array([b.start for b in box]) * spacing / RESOLUTION
    hi = np.array([b.stop - 1 for b in box]) * spacing / RESOLUTION
    last = np.floor((np.asarray(shape) - 1) * spacing / RESOLUTION).astype(int)
    start = np.maximum(np.floor(lo).astype(int) - BOX_MARGIN_MM, 0)
    stop = np.minimum(np.ceil(hi).astype(int) + BOX_MARGIN_MM, last) + 1
    return start, stop


def resample_box(image, spacing, start, stop):
    """Linear resampling of uint8 `image` onto the RESOLUTION grid points start..stop-1 (z, y, x).

    Grid point j lies at j * RESOLUTION mm, i.e. at raw index j * RESOLUTION / spacing."""
    step = RESOLUTION / np.asarray(spacing)
    first = np.floor(start * step).astype(int)
    last = np.minimum(np.ceil((stop - 1) * step).astype(int) + 1, np.asarray(image.shape) - 1)
    sub = image[first[0]:last[0] + 1, first[1]:last[1] + 1, first[2]:last[2] + 1].astype(np.float32)
    out = ndimage.affine_transform(sub, step, offset=start * step - first, output_shape=tuple(stop - start),
                                   order=1, mode='nearest')
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def changed_share(fill, image, ball):
    """Share of a sphere's voxels that `fill` turns into PAD_VALUE (voxels already at it do not change)."""
    if ball is None:
        return float('nan')
    box, inside = ball
    changed = fill[box] & (image[box] != PAD_VALUE) & inside
    return round(float(changed.sum() / inside.sum()), 4)


def protect_nodules(fill, image, spacing, nodules, protect_mm):
    """Clear `fill` (bool, voxels to set to PAD_VALUE) in a sphere of radius + protect_mm around each nodule.

    nodules: list of (centre (z, y, x) raw index, diameter mm). Returns per nodule the share of its sphere
    (its radius) that masking changes, with the protection and without it."""
    balls = [sphere(np.asarray(c, dtype=float), d / 2, spacing, fill.shape) for c, d in nodules]
    without = [changed_share(fill, image, b) for b in balls]
    for c, d in nodules:
        guard = sphere(np.asarray(c, dtype=float), max(d, 0) / 2 + protect_mm, spacing, fill.shape)
        if guard is not None:
            fill[guard[0]] &= ~guard[1]
    return [{'masked_frac': changed_share(fill, image, b), 'masked_frac_unprotected': w}
            for b, w in zip(balls, without)]


def preprocess(hu, spacing, volume_ml, nodules=(), protect_mm=0.0):
    """(volume uint8 (z, y, x) at RESOLUTION mm, box_start, per-nodule masking shares, ml of each air component
    taken as lung) of a HU array; ScanError if no lung is found. nodules, protect_mm: see protect_nodules."""
    spacing = np.asarray(spacing, dtype=float)
    lungs, lung_ml = select_lungs(binarize_slices(hu, spacing), spacing, volume_ml)
    if not lungs.any():
        raise ScanError(f'empty lung mask (no air region inside the body of lung size, LUNG_ML {volume_ml[0]:g}..'
                        f'{volume_ml[1]:g} ml)')
    # mask work happens in the lung bounding box, grown by the dilation reach
    box = bounding_box(lungs, DILATION + 1, lungs.shape)
    hull = np.zeros(lungs[box].shape, dtype=bool)
    for lung in split_lungs(lungs[box], spacing):
        hull |= hull_mask(lung)
    dilated = np.zeros_like(lungs)
    dilated[box] = ndimage.binary_dilation(hull, structure=ndimage.generate_binary_structure(3, 1),
                                           iterations=DILATION)
    image = window(hu)
    fill = ~dilated | (~lungs & (image > BONE_VALUE))  # outside the dilated mask, and bone in its ring
    shares = protect_nodules(fill, image, spacing, nodules, protect_mm)
    image[fill] = PAD_VALUE
    start, stop = lung_box(lungs, spacing, hu.shape)
    return resample_box(image, spacing, start, stop), start, shares, lung_ml


def scan_volume(hu, header, nodules, volume_ml, protect_mm, uid=''):
    """(volume, geometry) of a scan read by read_scan: the preprocessed volume and the geometry that maps a
    world point into it (luna.world_to_voxel). nodules: list of dict(world (x, y, z) mm, diameter_mm), the
    annotations to protect; the geometry lists them with the share of each nodule's sphere that masking
    changed (masked_frac) and would have changed unprotected (masked_frac_unprotected), and the volume (ml) of each
    air component taken as lung (lung_ml)."""
    centres = raw_centres(nodules, dict(header, size=list(hu.shape)))
    volume, start, shares, lung_ml = preprocess(hu, header['spacing'], volume_ml,
                                                [(c, n['diameter_mm']) for c, n in zip(centres, nodules)], protect_mm)
    protected = [{'world': list(n['world']), 'diameter_mm': n['diameter_mm'], **s} for n, s in zip(nodules, shares)]
    geometry = {'seriesuid': uid, 'spacing': header['spacing'], 'origin': header['origin'],
                'direction': header['direction'], 'flip': header['flip'], 'raw_shape': list(hu.shape),
                'file_direction': header.get('file_direction', header['direction']),
                'resolution': RESOLUTION, 'box_start': start.tolist(), 'shape': list(volume.shape),
                'protect_mm': protect_mm, 'nodules': protected, 'lung_ml': lung_ml}
    return volume, geometry


def process_scan(job):
    """Worker: preprocess job['path'] into job['out_dir']/<seriesuid>.npy and .json (geometry, written last).

    job: dict(seriesuid, path, out_dir, volume_ml, nodules, protect_mm, centre_check), see scan_volume;
    centre_check 'refuse' / 'warn' / '': a nodule with nothing denser than lung at its centre (labels.empty_centres)
    fails the scan / is listed in the result's empty_centres / is not looked for.
    Returns dict(seriesuid, shape, seconds, nodules, empty_centres)."""
    t0 = time.time()
    hu, header = read_scan(job['path'])
    empty = empty_centres(job.get('nodules', []), hu, header) if job.get('centre_check') else []
    if empty and job['centre_check'] == 'refuse':
        raise ScanError(f'{len(empty)} of its {len(job["nodules"])} nodules of the label table have nothing denser '
                        f'than lung at their centre ({CENTRE_REMEDY} CENTRE_CHECK=warn keeps them): '
                        + '; '.join(empty[:3]) + ('; ...' if len(empty) > 3 else ''))
    volume, geometry = scan_volume(hu, header, job.get('nodules', []), job['volume_ml'], job.get('protect_mm', 0.0),
                                   job['seriesuid'])
    base = os.path.join(job['out_dir'], job['seriesuid'])
    save_npy_atomic(base + '.npy', volume)
    save_json_atomic(base + '.json', geometry)
    return {'seriesuid': job['seriesuid'], 'shape': list(volume.shape), 'seconds': round(time.time() - t0, 2),
            'nodules': geometry['nodules'], 'empty_centres': empty}
