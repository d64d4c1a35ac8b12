"""LUNA16 files and geometry: scans and headers, annotations, world <-> voxel, label matching, atomic writes.

Arrays are (z, y, x); spacing and origin are kept in the same (z, y, x) order, in mm, while LUNA16's world
coordinates (annotations.csv) are (x, y, z). A preprocessed volume (see scans/lungmask.py) comes with a geometry
dict: spacing, origin, flip and raw_shape of the scan, resolution (mm) of the saved volume and box_start
(its first voxel in the resampled scan), so that world_to_voxel() maps a world point into it.
"""
import collections
import csv
import glob
import os
import re

import numpy as np
import SimpleITK as sitk

from utils import UserError, atomic_path

ANNOTATION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm')
# bytes per value of the MetaImage element types (MET_LONG is 4 bytes in MetaIO, as ITK reads it)
MET_BYTES = {'MET_CHAR': 1, 'MET_UCHAR': 1, 'MET_SHORT': 2, 'MET_USHORT': 2, 'MET_INT': 4, 'MET_UINT': 4,
             'MET_LONG': 4, 'MET_ULONG': 4, 'MET_LONG_LONG': 8, 'MET_ULONG_LONG': 8, 'MET_FLOAT': 4,
             'MET_DOUBLE': 8}


class ScanError(Exception):
    """A scan that cannot be processed; the message is the reason listed in the failures file."""


# ---------------------------------------------------------------- files

def find_scans(root):
    """{seriesuid: (fold, .mhd path)} for root/subset<k>/*.mhd; fold = k, the LUNA16 subset index."""
    if not os.path.isdir(root):
        raise UserError(f'LUNA16 folder {root} does not exist (expected subset0..subset9 and annotations.csv)')
    scans = {}
    for folder in sorted(glob.glob(os.path.join(root, 'subset*'))):
        m = re.fullmatch(r'subset(\d+)', os.path.basename(folder))
        if not (m and os.path.isdir(folder)):
            continue
        for path in sorted(glob.glob(os.path.join(folder, '*.mhd'))):
            uid = os.path.basename(path)[:-4]
            if uid in scans:
                raise UserError(f'scan {uid} is in two subsets: {scans[uid][1]} and {path}')
            scans[uid] = (int(m.group(1)), path)
    if not scans:
        raise UserError(f'LUNA16 folder {root} has no subset<k>/*.mhd scans')
    return scans


def read_header(path, reader=None):
    """Geometry of a .mhd scan without its pixels: spacing, origin, size (z, y, x), direction (3x3, x y z)."""
    if reader is None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ScanError(f'bad header: {itk_message(e)}') from None
    return check_header(reader, path)


def check_header(image, path):
    """Header dict of an sitk image or reader, or ScanError naming what is wrong."""
    if image.GetDimension() != 3:
        raise ScanError(f'bad header: {image.GetDimension()}-D image, expected 3-D ({path})')
    spacing = np.array(image.GetSpacing()[::-1], dtype=float)
    size = np.array(image.GetSize()[::-1], dtype=int)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0) and np.all(spacing < 50)):
        raise ScanError(f'bad header: element spacing {spacing[::-1].tolist()} ({path})')
    if np.any(size < 2):
        raise ScanError(f'bad header: size {size[::-1].tolist()} ({path})')
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return {'spacing': spacing.tolist(), 'origin': list(image.GetOrigin()[::-1]), 'size': size.tolist(),
            'direction': direction.tolist(), 'flip': bool(not np.allclose(direction, np.eye(3)))}


def mhd_fields(path):
    """The `Key = value` lines of a .mhd header as {lower-case key: value string}, up to ElementDataFile
    (the last header field), and the byte offset just after that line (where LOCAL data starts)."""
    fields, offset = {}, 0
    try:
        with open(path, 'rb') as f:
            for raw in f:
                offset += len(raw)
                key, sep, value = raw.decode('latin-1').partition('=')
                if sep:
                    fields[key.strip().lower()] = value.strip()
                if key.strip().lower() == 'elementdatafile':
                    break
    except OSError as e:
        raise ScanError(f'unreadable header {path}: {e.strerror}') from None
    return fields, offset


def check_data_file(path):
    """Check a .mhd header against its data file before ITK reads it; ScanError naming what is wrong.

    Expected bytes = product of DimSize x ElementNumberOfChannels x bytes of ElementType (+ HeaderSize);
    the data file must have exactly that many (ITK reads a longer file's first bytes silently and
    reports a short one as a missing file). Compressed or ASCII data is left to ITK, except that a
    given CompressedDataSize must match. Returns the data file's path (None for a list of files)."""
    fields, offset = mhd_fields(path)

    def field(name, cast=str, count=None):
        if name.lower() not in fields:
            raise ScanError(f'bad header: no {name} in {path}')
        words = fields[name.lower()].split()
        try:
            values = [cast(w) for w in words]
        except ValueError:
            raise ScanError(f'bad header: {name} = {fields[name.lower()]} in {path}') from None
        if count is not None and len(values) != count:
            raise ScanError(f'bad header: {name} = {fields[name.lower()]} in {path} (expected {count} values)')
        return values
    ndims = field('NDims', int, 1)[0]
    dims = field('DimSize', int, ndims)
    etype = field('ElementType', str, 1)[0].upper()
    channels = field('ElementNumberOfChannels', int, 1)[0] if 'elementnumberofchannels' in fields else 1
    datafile = fields.get('elementdatafile', '')
    if not datafile:
        raise ScanError(f'bad header: no ElementDataFile in {path}')
    if etype not in MET_BYTES:
        raise ScanError(f'bad header: ElementType {etype} in {path} (known: {", ".join(MET_BYTES)})')
    if min(dims) < 1 or channels < 1:
        raise ScanError(f'bad header: DimSize {" ".join(map(str, dims))}, {channels} channel(s) in {path}')
    if datafile.split()[0].upper() == 'LIST' or '%' in datafile:
        return None  # a file per slice: left to ITK
    local = datafile.upper() == 'LOCAL'
    data = path if local else os.path.join(os.path.dirname(path), datafile)
    if os.path.isdir(data):
        raise ScanError(f'data file {data} is a directory, not a file (ElementDataFile of {path})')
    if not os.path.isfile(data):
        raise ScanError(f'missing data file {data} (ElementDataFile of {path})')
    actual = os.path.getsize(data) - (offset if local else 0)
    compressed = fields.get('compresseddata', 'false').lower() == 'true'
    if compressed:
        size = fields.get('compresseddatasize')
        if size is not None and size.isdigit() and int(size) != actual:
            raise ScanError(f'data file {data} has {actual} bytes of compressed data, its header '
                            f'CompressedDataSize says {size} ({path})')
        return data
    if fields.get('binarydata', 'true').lower() != 'true':
        return data
    skip = field('HeaderSize', int, 1)[0] if 'headersize' in fields else 0
    expected = int(np.prod(dims, dtype=np.int64)) * channels * MET_BYTES[etype]
    what = (f'DimSize {" x ".join(map(str, dims))}' + (f' x {channels} channels' if channels > 1 else '')
            + f' x {MET_BYTES[etype]} bytes ({etype})')
    if skip == -1:  # the data are the file's last bytes
        if actual < expected:
            raise ScanError(f'truncated data file {data}: {actual} bytes, the header needs {expected} ({what})')
        return data
    actual -= max(skip, 0)
    if actual < expected:
        raise ScanError(f'truncated data file {data}: {actual} bytes, the header needs {expected} ({what})')
    if actual > expected:
        raise ScanError(f'data file {data} has {actual} bytes, more than the {expected} its header describes '
                        f'({what}): wrong DimSize or ElementType?')
    return data


def read_annotations(path):
    """LUNA16 annotations.csv as a list of dicts (seriesuid str, coordX/Y/Z and diameter_mm floats)."""
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist (LUNA16 annotations.csv)')
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        missing = [c for c in ANNOTATION_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise UserError(f'{path} lacks column(s) {", ".join(missing)}')
        try:
            return [{'seriesuid': r['seriesuid'], **{k: float(r[k]) for k in ANNOTATION_COLUMNS[1:]}}
                    for r in reader]
        except ValueError as e:
            raise UserError(f'{path}, line {reader.line_num}: {e}') from None


def read_label_table(path, scans, reserved=(), labelled=True):
    """Your own labels: a CSV in LUNA16's annotation format (seriesuid, coordX, coordY, coordZ in world mm,
    diameter_mm) plus label (0 benign, 1 malignant, empty: unlabelled, cropped but never trained on); optional
    nodule_id (unique), other columns are kept. labelled=False (predict.py's table): the label column may be
    missing, and so may seriesuid when `scans` holds one scan (a file column names the scan instead).
    Every seriesuid must be one of `scans`. The same nodule twice (same scan, centres within DUPLICATE_MM) is
    merged when its labels agree and refused when they do not.
    Returns (rows: dicts with '_line', the file line (the header being line 1, blank lines counted), notes);
    UserError naming the file and the lines of a bad table."""
    import pandas as pd
    if not os.path.isfile(path):
        raise UserError(f'label table {path} does not exist' if not os.path.isdir(path) else
                        f'label table {path} is a directory, not a CSV file')
    try:  # blank lines are kept as rows (then dropped) so that row i is file line i + 2
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, skip_blank_lines=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f'label table {path} is not a readable CSV: {str(e).strip()[:200]}') from None
    table.columns = [str(c).strip() for c in table.columns]
    if 'seriesuid' not in table.columns and not labelled:
        if 'file' in table.columns:
            table['seriesuid'] = table['file']
        elif len(set(map(str, scans.values()))) == 1:
            table['seriesuid'] = next(iter(scans))
    if 'label' not in table.columns and not labelled:
        table['label'] = ''
    missing = [c for c in ANNOTATION_COLUMNS + ('label',) if c not in table.columns]
    if missing:
        raise UserError(f'label table {path} lacks column(s) {", ".join(missing)} (needs '
                        f'{", ".join(ANNOTATION_COLUMNS)}' + (', label' if labelled else '')
                        + f'; found {", ".join(table.columns)})')
    clash = [c for c in reserved if c in table.columns]
    if clash:
        raise UserError(f'label table {path}: column(s) {", ".join(clash)} are written by prepare.py; rename them')
    table['_line'] = np.arange(len(table)) + 2
    table = table[table.drop(columns='_line').apply(lambda c: c.astype(str).str.strip() != '').any(axis=1)]
    if table.empty:
        raise UserError(f'label table {path} has no rows')
    generated = 'nodule_id' not in table.columns
    if generated:
        table.insert(0, 'nodule_id', [f'own{i:05d}' for i in range(len(table))])
    rows, problems = [], []
    for r in table.to_dict('records'):
        where = f'line {r["_line"]}'
        given = [k for k in ANNOTATION_COLUMNS[1:] + ('label',) if k != 'label' or r[k].strip()]
        bad = [k for k in given if not _is_number(r[k])]
        if bad:
            problems.append(f'{where}: not a number in {", ".join(f"{k}={r[k]!r}" for k in bad)}')
            continue
        values = {k: float(r[k]) if k in given else float('nan') for k in ANNOTATION_COLUMNS[1:] + ('label',)}
        if not all(np.isfinite(values[k]) for k in ANNOTATION_COLUMNS[1:]) or values['diameter_mm'] <= 0:
            problems.append(f'{where}: coordinates must be finite and diameter_mm > 0 '
                            f'({", ".join(f"{k}={r[k]}" for k in ANNOTATION_COLUMNS[1:])})')
        elif 'label' in given and values['label'] not in (0.0, 1.0):
            problems.append(f'{where}: label {r["label"]!r} is not 0 (benign), 1 (malignant) or empty (unlabelled)')
        elif r['seriesuid'].strip() not in scans:
            problems.append(f'{where}: seriesuid {r["seriesuid"]!r} has no scan'
                            + (' (no subset*/{r["seriesuid"]}.mhd)' if labelled else ''))
        elif not str(r['nodule_id']).strip():
            problems.append(f'{where}: empty nodule_id')
        else:
            label = int(values['label']) if 'label' in given else float('nan')
            rows.append({**r, **values, 'seriesuid': r['seriesuid'].strip(), 'label': label,
                         'nodule_id': str(r['nodule_id']).strip()})
    rows, notes = merge_duplicates(rows, problems, ('_line', 'nodule_id') if generated else ('_line',))
    dup = sorted(n for n, k in collections.Counter(r['nodule_id'] for r in rows).items() if k > 1)
    if dup:
        problems.append(f'nodule_id(s) used twice: {", ".join(dup[:5])}')
    if problems:
        raise UserError(f'label table {path}: {len(problems)} bad row(s): ' + '; '.join(problems[:5])
                        + ('; ...' if len(problems) > 5 else ''))
    return rows, notes


DUPLICATE_MM = 2.0  # two rows of one scan whose centres are closer than this (mm) are the same nodule


def merge_duplicates(rows, problems, ignore=('_line',)):
    """(rows with each nodule once, notes): a row within DUPLICATE_MM of an earlier one of the same scan is
    merged into it when their labels agree (a note names both lines, 'exact duplicate' when every value is
    equal but those of `ignore`), else a problem naming both lines is appended to `problems`."""
    kept, notes = [], []
    for r in rows:
        w = np.array([r['coordX'], r['coordY'], r['coordZ']])
        same = [k for k in kept if k['seriesuid'] == r['seriesuid']
                and np.linalg.norm(w - [k['coordX'], k['coordY'], k['coordZ']]) < DUPLICATE_MM]
        if not same:
            kept.append(r)
            continue
        k = same[0]
        dist = float(np.linalg.norm(w - [k['coordX'], k['coordY'], k['coordZ']]))
        both = f'lines {k["_line"]} and {r["_line"]} (scan {r["seriesuid"]}, {dist:.1f} mm apart)'
        if str(k['label']) != str(r['label']):
            problems.append(f'{both}: the same nodule with conflicting labels {k["label"]} and {r["label"]}')
        else:
            exact = all(str(k[a]) == str(r.get(a)) for a in k if a not in ignore)
            notes.append(f'line {r["_line"]} merged into line {k["_line"]}: '
                         + ('exact duplicate' if exact else f'the same nodule ({dist:.1f} mm apart, same label)'))
    return kept, notes


def nodules_outside(rows, headers):
    """Lines (text) of the rows whose nodule lies outside its scan or within its radius of the scan's edge.
    headers: {seriesuid: header of read_header}; rows of scans without a header are not checked."""
    out = []
    for r in rows:
        h = headers.get(r['seriesuid'])
        if h is None:
            continue
        raw = world_to_raw([r['coordX'], r['coordY'], r['coordZ']], h['origin'], h['spacing'], False, h['size'],
                           h['direction'])
        margin = edge_margin(raw, r['diameter_mm'] / 2, h['spacing'], h['size'])
        if margin < 0:
            where = 'outside the scan' if edge_margin(raw, 0.0, h['spacing'], h['size']) < 0 else \
                'within its radius of the edge'
            out.append(f'line {r["_line"]} (nodule {r["nodule_id"]}, scan {r["seriesuid"]}): centre '
                       f'({r["coordX"]:g}, {r["coordY"]:g}, {r["coordZ"]:g}) mm is {where} (voxel (z, y, x) '
                       f'{np.round(raw, 1).tolist()} of {h["size"]})')
    return out


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def itk_message(error):
    """The useful part of a SimpleITK exception: its lines after the location line, without ITK's prefix."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    text = ' '.join(lines[1:] if len(lines) > 1 else lines)
    return re.sub(r'^(ITK ERROR: \S+: |sitk::ERROR: )', '', text)[:300] or type(error).__name__


# ---------------------------------------------------------------- geometry

def world_to_raw(world_xyz, origin, spacing, flip, raw_shape, direction=None):
    """World (x, y, z) mm, shape (3,) or (N, 3) -> float (z, y, x) index of the scan array as read_scan
    returns it: the file's index D^T (world - origin) / spacing (D: direction cosines, columns = index axes),
    then mirrored in y and x (index n-1-i) when `flip` (volumes of older versions, which mirrored a scan
    with LUNA16's TransformMatrix -1 0 0 0 -1 0 0 0 1 and kept its header; direction None: that matrix
    when flip, else identity). A point outside the scan gets an index outside 0..n-1 (never mirrored in)."""
    if direction is None:
        direction = np.diag([-1.0, -1.0, 1.0]) if flip else np.eye(3)
    w = np.asarray(world_xyz, dtype=float) - np.asarray(origin, dtype=float)[::-1]  # (..., 3) x y z
    raw = (w @ np.asarray(direction, dtype=float))[..., ::-1] / np.asarray(spacing, dtype=float)
    if flip:
        n = np.asarray(raw_shape, dtype=float)
        raw[..., 1:] = n[1:] - 1 - raw[..., 1:]
    return raw


def world_to_voxel(world_xyz, geometry):
    """World (x, y, z) mm, shape (3,) or (N, 3) -> float (z, y, x) voxel of the saved volume.

    The raw scan index (world_to_raw) resampled to `resolution` mm and cropped at box_start."""
    raw = world_to_raw(world_xyz, geometry['origin'], geometry['spacing'], geometry['flip'], geometry['raw_shape'],
                       geometry.get('direction'))
    return raw * np.asarray(geometry['spacing']) / geometry['resolution'] - np.asarray(geometry['box_start'])


def edge_margin(raw_zyx, radius_mm, spacing, raw_shape):
    """How far (mm) a nodule's sphere stays inside the scan: the smallest distance from its centre (float raw
    index (z, y, x)) to the scan's outer voxel faces, minus its radius; < 0: outside the scan or within its
    radius of an edge."""
    c, s = np.asarray(raw_zyx, dtype=float), np.asarray(spacing, dtype=float)
    n = np.asarray(raw_shape, dtype=float)
    return float(np.min(np.minimum(c + 0.5, n - 0.5 - c) * s)) - radius_mm


def pixel_to_world(row, col, z, header):
    """World (x, y, z) of a point given as pixel (row, col) of the scan and world z (LIDC's convention),
    using the scan's origin, spacing and direction: world = origin + direction @ (index * spacing)."""
    sz, sy, sx = header['spacing']
    d = np.asarray(header['direction'])
    oz, oy, ox = header['origin']
    return (ox + d[0, 0] * col * sx + d[0, 1] * row * sy, oy + d[1, 0] * col * sx + d[1, 1] * row * sy, z)


def match_nodules(clusters, annotations, tolerance_mm):
    """Pair reader clusters with annotations of the same scan, nearest first, one to one, within tolerance.

    clusters, annotations: lists of dicts with 'seriesuid' and 'world' ((x, y, z) mm).
    Returns [(cluster index, annotation index, distance mm)]."""
    by_scan = {}
    for j, a in enumerate(annotations):
        by_scan.setdefault(a['seriesuid'], []).append(j)
    pairs = []
    for uid, idx_a in by_scan.items():
        idx_c = [i for i, c in enumerate(clusters) if c['seriesuid'] == uid]
        if not idx_c:
            continue
        wc = np.array([clusters[i]['world'] for i in idx_c], dtype=float)
        wa = np.array([annotations[j]['world'] for j in idx_a], dtype=float)
        dist = np.linalg.norm(wc[:, None] - wa[None], axis=2)  # (clusters, annotations) of this scan
        used_c, used_a = set(), set()
        for flat in np.argsort(dist, axis=None, kind='stable'):
            i, j = np.unravel_index(flat, dist.shape)
            if dist[i, j] > tolerance_mm:
                break
            if i not in used_c and j not in used_a:
                used_c.add(i)
                used_a.add(j)
                pairs.append((idx_c[i], idx_a[j], float(dist[i, j])))
    return sorted(pairs, key=lambda p: p[1])


# ---------------------------------------------------------------- cubes

def crop_cube(volume, centre_zyx, size, pad_value):
    """size^3 cube of `volume` centred on the voxel nearest centre_zyx (voxel size//2 of the cube);
    voxels outside the volume are pad_value. Keeps the volume's dtype."""
    cube = np.full((size,) * 3, pad_value, dtype=volume.dtype)
    start = np.round(np.asarray(centre_zyx, dtype=float)).astype(int) - size // 2
    src, dst = [], []
    for a in range(3):
        lo, hi = max(start[a], 0), min(start[a] + size, volume.shape[a])
        if hi <= lo:
            return cube
        src.append(slice(lo, hi))
        dst.append(slice(lo - start[a], hi - start[a]))
    cube[tuple(dst)] = volume[tuple(src)]
    return cube


def padded_share(volume_shape, centre_zyx, size):
    """Share of the voxels of crop_cube's cube that lie outside the volume (filled with the pad value)."""
    start = np.round(np.asarray(centre_zyx, dtype=float)).astype(int) - size // 2
    inside = [max(min(start[a] + size, volume_shape[a]) - max(start[a], 0), 0) for a in range(3)]
    return 1.0 - float(np.prod(inside)) / size ** 3


def crop_nodules(volume, geometry, world_xyz, size, pad_value):
    """Cubes of the nodules at world (x, y, z) mm (N, 3) in a preprocessed volume and its geometry:
    (cubes (N, size, size, size), voxel centres (N, 3) float (z, y, x), padded shares (N,))."""
    centres = np.atleast_2d(world_to_voxel(np.atleast_2d(world_xyz), geometry))
    cubes = np.stack([crop_cube(volume, c, size, pad_value) for c in centres]) if len(centres) else \
        np.empty((0,) + (size,) * 3, dtype=volume.dtype)
    return cubes, centres, np.array([padded_share(volume.shape, c, size) for c in centres])


# ---------------------------------------------------------------- atomic writes

def save_npy_atomic(path, array):
    """np.save atomically (through a file object: np.save would add .npy to the temporary name)."""
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, array)


def write_csv_atomic(path, rows, fieldnames):
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
