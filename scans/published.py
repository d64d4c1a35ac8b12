"""The published NAS-HBO label set (its repository's data/annotationdetclsconvfnl_v3.csv, DeepLung's table: 1004
LUNA16 nodules in 544 scans, 554 benign, 450 malignant): the rule that reproduces it from the LIDC reader
annotations, and its table read as a LABEL_TABLE.

The rule. The published code labels a LUNA16 annotation by the mean malignancy of the readings whose reader
noduleID (a string in the LIDC XML) equals one listed for the nodule in LIDC's nodule size list (list3.2). That
list writes numeric ids without their leading zeros ('0796' as '796'), so a reading whose id is a number with a
leading zero never counts. It also skips two scans by name (list3.2 has no row for their patients). Applied to our
reader clusters (scans.lidc, labelling='published') this gives 554 benign and 450 malignant.
"""
import re

import numpy as np

SKIPPED_SCANS = (
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.174692377730646477496286081479',  # LIDC-IDRI-0610
    '1.3.6.1.4.1.14519.5.2.1.6279.6001.300246184547502297539521283806',  # LIDC-IDRI-0906
)
LEADING_ZERO_ID = re.compile(r'0[0-9]+')  # a reader's noduleID the published labelling never finds


def counted_malignancy(annotation_ids, malignancy, reader_ids):
    """Per cluster, the mean malignancy over the readings the published labelling counts (nan when none).
    annotation_ids: per cluster 'id;id;...'; malignancy, reader_ids: mappings from an annotation id to its rating and
    to the reader's noduleID."""
    out = np.full(len(annotation_ids), np.nan)
    for n, ids in enumerate(annotation_ids):
        kept = [malignancy[int(i)] for i in str(ids).split(';')
                if not LEADING_ZERO_ID.fullmatch(str(reader_ids[int(i)]))]
        if kept:
            out[n] = float(np.mean(kept))
    return out


# ---------------------------------------------------------------- the published table as a LABEL_TABLE

TABLE_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm', 'malignant')
SUFFIX = re.compile(r'(.+?)((?:-[0-9]+)+)')  # '<uid>-<n>-<n>-...': the published row id after the scan's uid
DIAMETER_MM = 1e-4  # a published row and its LUNA16 annotation have the same diameter_mm (to this, mm)


def is_published_table(columns):
    """A label table in the published format: its columns, malignant instead of label."""
    return all(c in columns for c in TABLE_COLUMNS) and 'label' not in columns


def as_label_table(table, path, annotations):
    """The published table (a DataFrame of strings, blank rows kept: row i is file line i + 2) as LABEL_TABLE columns
    in world mm. Its coordinates are voxel positions in the published preprocessing's 1 mm crop, so each row is
    found among LUNA16's annotations instead: the annotation of the same scan with the same diameter_mm (one and
    only one). The row keeps its published coordinates as published_coordX/Y/Z; nodule_id is 'published<n>' (n the
    row id the seriesuid ends with); label is malignant. annotations: rows of LUNA16's annotations.csv
    (labels.read_annotations). Returns (table, problems: one text per row that matches no annotation, or several)."""
    by_scan = {}
    for a in annotations:
        by_scan.setdefault(a['seriesuid'], []).append(a)
    table = table.rename(columns={c: f'published_{c}' for c in ('coordX', 'coordY', 'coordZ')})
    out, problems = {k: [] for k in ('seriesuid', 'nodule_id', 'coordX', 'coordY', 'coordZ', 'label')}, []
    for i, r in enumerate(table.to_dict('records')):
        if not any(str(v).strip() for v in r.values()):  # a blank line stays blank (read_label_table drops it)
            for values in out.values():
                values.append('')
            continue
        m = SUFFIX.fullmatch(r['seriesuid'].strip())
        uid, n = (m.group(1), m.group(2).split('-')[1]) if m else (r['seriesuid'].strip(), str(i))
        try:
            same = [a for a in by_scan.get(uid, ()) if abs(a['diameter_mm'] - float(r['diameter_mm'])) < DIAMETER_MM]
        except ValueError:
            same = []  # not a number: read_label_table names it
        if r['diameter_mm'].strip() and len(same) != 1:
            problems.append(f'line {i + 2}: {len(same) or "no"} LUNA16 annotation(s) of scan {uid} with diameter_mm '
                            f'{r["diameter_mm"]} (each published row is one; is annotations.csv LUNA16\'s?)')
        world = (same[0]['coordX'], same[0]['coordY'], same[0]['coordZ']) if len(same) == 1 else ('',) * 3
        for k, v in zip(out, (uid, f'published{n}', *world, r['malignant'])):
            out[k].append(str(v))
    table = table.drop(columns=['seriesuid', 'malignant'])
    for k, values in reversed(out.items()):
        table.insert(0, k, values)
    return table, [f'label table {path} (the published NAS-HBO format): {p}' for p in problems]
