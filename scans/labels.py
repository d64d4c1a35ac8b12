"""Nodule tables: LUNA16's annotations.csv, your own label table (checked against its scans: outside, near the
edge, duplicates, conflicting labels), and the matching of LIDC reader clusters to LUNA16 annotations."""
import collections
import csv
import os

import numpy as np

from scans import published
from scans.hu import CENTRE_HU, CENTRE_MIN_RADIUS_MM, densest_near
from scans.luna import edge_margin, world_to_raw
from utils import UserError

ANNOTATION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm')


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


def read_label_table(path, scans, reserved=(), labelled=True, annotations_csv=None):
    """Your own labels: a CSV in LUNA16's annotation format (seriesuid, coordX, coordY, coordZ in world mm,
    diameter_mm) plus label (0 benign, 1 malignant, empty: unlabelled, cropped but never trained on); optional
    nodule_id (unique), other columns are kept. labelled=False (predict.py's table): the label column may be
    missing, and so may seriesuid when `scans` holds one scan (a file column names the scan instead).
    The published NAS-HBO table (columns malignant instead of label, voxel coordinates) is read too, its nodules
    found in LUNA16's annotations.csv at `annotations_csv` (scans.published.as_label_table).
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
    if labelled and published.is_published_table(table.columns):
        if not annotations_csv:
            raise UserError(f'label table {path} is in the published NAS-HBO format (malignant, voxel coordinates): '
                            'reading it needs LUNA16\'s annotations.csv')
        table, problems = published.as_label_table(table, path, read_annotations(annotations_csv))
        if problems:
            raise UserError(f'{len(problems)} row(s) not found: ' + '; '.join(problems[:5])
                            + ('; ...' if len(problems) > 5 else ''))
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
    rows, notes = merge_duplicates(rows, problems, ('_line', 'nodule_id') if generated else ('_line',),
                                   scan_of=scans.__getitem__)  # a scan named two ways is one scan
    dup = sorted(n for n, k in collections.Counter(r['nodule_id'] for r in rows).items() if k > 1)
    if dup:
        problems.append(f'nodule_id(s) used twice: {", ".join(dup[:5])}')
    if problems:
        raise UserError(f'label table {path}: {len(problems)} bad row(s): ' + '; '.join(problems[:5])
                        + ('; ...' if len(problems) > 5 else ''))
    return rows, notes


DUPLICATE_MM = 2.0  # two rows of one scan whose centres are closer than this (mm) are the same nodule


def merge_duplicates(rows, problems, ignore=('_line',), scan_of=None):
    """(rows with each nodule once, notes): a row within DUPLICATE_MM of an earlier one of the same scan is
    merged into it when their labels agree (a note names both lines, 'exact duplicate' when every value is
    equal but those of `ignore`), else a problem naming both lines is appended to `problems`. scan_of: the scan
    of a row's seriesuid (default: the seriesuid itself), so that one scan named two ways is one scan."""
    scan_of = scan_of or (lambda name: name)
    kept, notes = [], []
    for r in rows:
        w = np.array([r['coordX'], r['coordY'], r['coordZ']])
        same = [k for k in kept if scan_of(k['seriesuid']) == scan_of(r['seriesuid'])
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


CENTRE_CHECKS = ('refuse', 'warn')  # what a labelled centre with nothing denser than lung around it does
CENTRE_REMEDY = ('are the coordinates LPS world mm, as LUNA16\'s (x growing to the patient\'s left, y to the back), '
                 'and of this scan?')


def empty_centres(nodules, hu, header):
    """Text per nodule with nothing denser than CENTRE_HU within its radius of its centre (a wrong coordinate
    convention, e.g. RAS instead of LPS, or the wrong scan). nodules: dicts with world (x, y, z) mm, diameter_mm and
    optionally line and nodule_id; hu, header: lungmask.read_scan's."""
    out = []
    for n in nodules:
        raw = world_to_raw(n['world'], header['origin'], header['spacing'], header['flip'], hu.shape,
                           header['direction'])
        densest = densest_near(hu, raw, n['diameter_mm'], header['spacing'])
        if densest < CENTRE_HU:
            name = ', '.join(f'{k} {n[k]}' for k in ('line', 'nodule_id') if k in n) or 'nodule'
            out.append(f'{name}: no nodule at ({", ".join(f"{v:g}" for v in n["world"])}) mm, nothing denser than '
                       f'{CENTRE_HU:g} HU within {max(n["diameter_mm"] / 2, CENTRE_MIN_RADIUS_MM):g} mm (densest '
                       f'{densest:.0f} HU)')
    return out


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


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
