"""LUNA16 files and geometry: scans and headers, world <-> voxel, cube crops, atomic writes (the nodule tables:
scans/labels.py).

Arrays are (z, y, x); spacing and origin are kept in the same (z, y, x) order, in mm, while LUNA16's world
coordinates (annotations.csv) are (x, y, z). A preprocessed volume (see scans/lungmask.py) comes with a geometry
dict: spacing, origin, flip and raw_shape of the scan, resolution (mm) of the saved volume and box_start
(its first voxel in the resampled scan), so that world_to_voxel() maps a world point into it.
"""
import csv
import glob
import os
import re

import numpy as np
import SimpleITK as sitk

from utils import UserError, atomic_path

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
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        size = image.GetSize()
        what = (f'a {image.GetDimension()}-D image of {" x ".join(map(str, size))} pixels' if len(size) != 3 else
                f'a single 2-D slice of {size[0]} x {size[1]} pixels' if size[2] == 1 else
                f'{size[2]} slices of {size[0]} x {size[1]} pixels')
        raise ScanError(f'{path} is {what}: a 3-D CT volume (a series of slices) is needed')
    spacing = np.array(image.GetSpacing()[::-1], dtype=float)
    size = np.array(image.GetSize()[::-1], dtype=int)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0) and np.all(spacing < 50)):
        raise ScanError(f'bad header: element spacing {spacing[::-1].tolist()} ({path})')
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
