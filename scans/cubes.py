"""Cubes of given nodules straight from CT scans (predict.py --SCAN): a .mhd/.raw, a NIfTI (.nii / .nii.gz) or a
DICOM series folder, or a folder holding several of them, and a table of world-mm centres without labels.

The steps are those of prepare.py + nodclsgbt.py, through the same functions: lungmask.read_scan (the scan turned
to +x +y +z axes), lungmask.scan_volume (lung mask with the table's nodules protected, HU window, 1 mm
resampling of the lung box) and luna.crop_nodules (the cube around each centre), so that a scan scored here and
the same scan prepared for training give the same cubes.
"""
import os

import numpy as np

from scans import labels, luna, lungmask
from utils import UserError

SCAN_SUFFIXES = ('.mhd', '.nii.gz', '.nii')


def scan_name(path):
    """A scan's key in the table's seriesuid column: its file name without the suffix (a folder: its name)."""
    base = os.path.basename(os.path.normpath(path))
    for suffix in SCAN_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base


def is_dicom_folder(path):
    import SimpleITK as sitk
    return os.path.isdir(path) and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(path))


def find_scans(path):
    """{name: path}: the scan at `path` (a file or a DICOM folder), or each scan of a folder of scans."""
    if not os.path.exists(path):
        raise UserError(f'SCAN={path} does not exist')
    if os.path.isfile(path) or is_dicom_folder(path):
        return {scan_name(path): path}
    scans = {}
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if (os.path.isfile(full) and entry.lower().endswith(SCAN_SUFFIXES)) or is_dicom_folder(full):
            name = scan_name(full)
            if name in scans:
                raise UserError(f'SCAN={path}: two scans named {name}: {scans[name]} and {full}')
            scans[name] = full
    if not scans:
        raise UserError(f'SCAN={path} is neither a scan nor a folder of scans (.mhd, .nii, .nii.gz files or '
                        'DICOM series folders)')
    return scans


def read_table(path, scans):
    """The nodules to score: rows of labels.read_label_table (label optional, seriesuid or file optional with
    one scan; a file column's value may carry the scan's suffix)."""
    if not path:
        raise UserError('SCAN needs AT=<table.csv> with the nodules\' world centres (coordX, coordY, coordZ in mm, '
                        'diameter_mm; nodule_id optional; seriesuid or file when SCAN holds several scans)')
    by_name = dict(scans, **{os.path.basename(os.path.normpath(p)): p for p in scans.values()})
    rows, notes = labels.read_label_table(path, by_name, labelled=False)
    for r in rows:
        r['seriesuid'] = scan_name(by_name[r['seriesuid']])
    return rows, notes


def lung_warning(geometry, volume_ml):
    """'' or the warning for a scan whose lung mask holds an air region of a volume outside the default LUNG_ML
    (found only because LUNG_ML was widened: sinus air of a head CT, a bowel loop, a child's lung...)."""
    lo, hi = lungmask.LUNG_ML
    odd = [v for v in geometry.get('lung_ml', []) if not lo <= v <= hi]
    if not odd:
        return ''
    return (f'lung mask found only with LUNG_ML={tuple(volume_ml)}: air region(s) of '
            f'{", ".join(f"{v:g}" for v in odd)} ml, outside the default {lo:g}..{hi:g} ml of a lung; not a CT of '
            'the chest? check the scan before trusting its probabilities')


def scan_cubes(path, rows, size, volume_ml, protect_mm, series='', max_padded=0.5, centre_check='refuse'):
    """(cubes uint8 (N, size, size, size), voxel centres (N, 3), geometry) of the rows' nodules in one scan.

    UserError, before anything is written, for an unreadable scan, a nodule outside it or within its radius of
    its edge, a cube mostly (> max_padded) outside the preprocessed volume, or (centre_check 'refuse') a centre
    with nothing denser than lung around it (labels.empty_centres; with 'warn' listed in geometry['empty_centres'])."""
    try:
        hu, header = lungmask.read_scan(path, series)
    except luna.ScanError as e:  # most reasons begin with the scan's path
        raise UserError(f'SCAN {e}' if str(e).startswith(path) else f'SCAN {path}: {e}') from None
    header = dict(header, size=list(hu.shape))
    outside = labels.nodules_outside(rows, {rows[0]['seriesuid']: header})
    if outside:
        spacing = ' x '.join(f'{s:g}' for s in header['spacing'][::-1])
        span = ', '.join(f'{a} {o:g}..{o + (n - 1) * s:g}' for a, o, n, s in
                         zip('xyz', header['origin'][::-1], hu.shape[::-1], header['spacing'][::-1]))
        raise UserError(f'SCAN {path} ({hu.shape[2]} x {hu.shape[1]} x {hu.shape[0]} voxels of {spacing} mm, centres '
                        f'at {span} mm): '
                        f'{len(outside)} of {len(rows)} nodules outside the scan or within their radius of its edge: '
                        + '; '.join(outside[:3]) + ('; ...' if len(outside) > 3 else '')
                        + ' (world mm in LPS, as LUNA16: x grows to the patient\'s left, y to the back)')
    nodules = [{'world': [r['coordX'], r['coordY'], r['coordZ']], 'diameter_mm': r['diameter_mm'],
                'line': r['_line'], 'nodule_id': r['nodule_id']} for r in rows]
    empty = labels.empty_centres(nodules, hu, header)
    if empty and centre_check == 'refuse':
        raise UserError(f'SCAN {path}: {len(empty)} of {len(rows)} nodules of the table have nothing denser than lung '
                        'at their centre: ' + '; '.join(empty[:3]) + ('; ...' if len(empty) > 3 else '')
                        + f': {labels.CENTRE_REMEDY} (--CENTRE_CHECK=warn scores them anyway)')
    try:
        volume, geometry = lungmask.scan_volume(hu, header, nodules, volume_ml, protect_mm, rows[0]['seriesuid'])
    except luna.ScanError as e:
        raise UserError(f'SCAN {path}: {e}') from None
    geometry['empty_centres'] = empty
    world = np.array([n['world'] for n in nodules], dtype=float)
    cubes, centres, padded = luna.crop_nodules(volume, geometry, world, size, lungmask.PAD_VALUE)
    bad = [f'{r["nodule_id"]} (line {r["_line"]}, {p:.0%})' for r, p in zip(rows, padded) if p > max_padded]
    if bad:
        raise UserError(f'SCAN {path}: the cube of {len(bad)} nodules lies mostly outside the lungs\' box of the '
                        f'preprocessed scan: {", ".join(bad[:5])} (a nodule outside the lungs, or a wrong centre)')
    return cubes, centres, geometry


def nodule_cubes(scan, at, nodules, size, volume_ml, protect_mm, series='', centre_check='refuse'):
    """(table, cubes (N, size, size, size) uint8, {scan name: geometry}, notes for the log) of the nodules of the
    table `at` (those named in `nodules`; () = all) in the scans of `scan`, preprocessed as for training. The table
    has each nodule's scan, centre, voxel and scan_warning (lung_warning)."""
    import pandas as pd
    scans = find_scans(scan)
    rows, notes = read_table(at, scans)
    ids = [str(i) for i in nodules]
    if ids:
        unknown = sorted(set(ids) - {r['nodule_id'] for r in rows})
        if unknown:
            raise UserError(f'AT={at}: no nodule {", ".join(unknown[:5])}')
        rows = [r for r in rows if r['nodule_id'] in ids]
    parts, cubes, geometries = [], [], {}
    for name in sorted({r['seriesuid'] for r in rows}):
        mine = [r for r in rows if r['seriesuid'] == name]
        print(f'scan {scans[name]}: {len(mine)} nodules, preprocessing', flush=True)
        c, centres, geometries[name] = scan_cubes(scans[name], mine, size, volume_ml, protect_mm, series,
                                                  centre_check=centre_check)
        notes += [f'WARNING: scan {scans[name]}, {text}: scored (CENTRE_CHECK=warn)'
                  for text in geometries[name].pop('empty_centres')]
        cubes.append(c)
        warning = lung_warning(geometries[name], volume_ml)
        if warning:
            notes.append(f'WARNING: scan {scans[name]}: {warning} (column scan_warning of predictions.csv)')
        for r, centre in zip(mine, centres):
            parts.append({'nodule_id': r['nodule_id'], 'seriesuid': name, 'scan': scans[name],
                          **{k: r[k] for k in ('coordX', 'coordY', 'coordZ', 'diameter_mm')},
                          **({'label': r['label']} if r['label'] == r['label'] else {}),
                          **{f'voxel_{a}': round(float(v), 2) for a, v in zip('zyx', centre)},
                          'scan_warning': warning})
    table = pd.DataFrame(parts)
    if 'label' not in table.columns:
        table = table.assign(label=np.nan)
    return table, np.concatenate(cubes), geometries, notes
