"""Nodule cube set from prepare.py's volumes, and a gradient-boosting baseline on it.

    python nodclsgbt.py [config.py] [--NAME=value ...]
    python nodclsgbt.py --CROP=False --CUBE_SET=data/demo     # the baseline on an existing cube set

1. CROP: cut a CUBE_SIZE^3 cube around every labelled nodule (label 0 or 1 in PREPARED_DIR/labels.csv)
   out of its preprocessed volume into CUBE_SET: nodules.csv (nodule_id, seriesuid, fold, diameter_mm,
   label, world and voxel centre) and cubes/<nodule_id>.npy (uint8; voxels outside the volume are 170).
2. For each test fold f in TEST_FOLDS: fit scikit-learn's HistGradientBoostingClassifier on the cubes of
   all other folds, each averaged over DOWNSAMPLE^3 blocks and flattened (32^3 -> 16^3 = 4096 features),
   and report accuracy, sensitivity, specificity, F1 and ROC AUC on fold f. The histogram variant bins
   each feature into 255 levels once, which makes it ~100x faster than GradientBoostingClassifier on
   thousands of features (seconds per fold instead of minutes) while being the same kind of model.
Run folder runs/nodclsgbt-<time>/: config.json, log.txt, metrics.csv (a row per fold), predictions.csv.
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)
import json
import os
import time

import numpy as np
import pandas as pd

import data
import runfolder
import settings
import utils

PREPARED_DIR = os.path.join('data', 'luna16', 'prepared')  # prepare.py's OUT_DIR (volumes/, labels.csv)
CUBE_SET = os.path.join('data', 'luna16', 'cubes')  # cube set folder written by CROP (or read when CROP=False)
CROP = True               # build CUBE_SET from PREPARED_DIR first; False: use CUBE_SET as it is (e.g. data/demo)
CUBE_SIZE = 32            # edge of the cubes, voxels (1 mm)
TEST_FOLDS = (5, 6, 7, 8, 9)  # LUNA16 subsets evaluated (each trained on all other folds), as in the paper
DOWNSAMPLE = 2            # cubes are averaged over DOWNSAMPLE^3 blocks before flattening (1 = raw voxels)
MAX_ITER = 300            # boosting iterations (trees)
LEARNING_RATE = 0.05      # shrinkage of each tree
MAX_LEAF_NODES = 15       # leaves per tree
L2 = 1.0                  # L2 regularization of the leaf values
MIN_SAMPLES_LEAF = 20     # fewest training cubes in a leaf
THREADS = 0               # OpenMP threads of the classifier (0 = all cores; 1 is faster on a busy machine)
SEED = 0                  # random state of the classifier
RUNS = 'runs'             # folder of run folders
MAX_PADDED = 0.5          # a cube with a larger share of its voxels outside the volume is refused (not cropped)
TAG = ''                  # suffix of the run folder name

DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules: '>= 1' reads 'MAX_ITER >= 1';
    # None: any value of the setting's type; PREPARED_DIR / CUBE_SET are checked before the run folder is made)
    'PREPARED_DIR': None, 'CUBE_SET': "!= ''", 'CROP': None, 'CUBE_SIZE': '>= 1', 'TEST_FOLDS': 'folds(TEST_FOLDS)',
    'DOWNSAMPLE': '1 <= DOWNSAMPLE <= CUBE_SIZE', 'MAX_ITER': '>= 1', 'LEARNING_RATE': '> 0',
    'MAX_LEAF_NODES': '>= 2', 'L2': '>= 0', 'MIN_SAMPLES_LEAF': '>= 1', 'THREADS': '>= 0', 'SEED': '>= 0',
    'RUNS': "!= ''", 'MAX_PADDED': '0 <= MAX_PADDED < 1', 'TAG': None,
}


def read_labels(prepared_dir):
    """The rows of labels.csv to crop: labelled 0 or 1, and own-table rows without a label (label empty)."""
    path = os.path.join(prepared_dir, 'labels.csv')
    if not os.path.isfile(path):
        raise utils.UserError(f'{path} does not exist: run prepare.py first (or use --CROP=False on a cube set)')
    table = pd.read_csv(path, dtype={'seriesuid': str, 'nodule_id': str})
    missing = [c for c in ('nodule_id', 'seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm', 'label', 'fold')
               if c not in table.columns]
    if missing:
        raise utils.UserError(f'{path} lacks column(s) {", ".join(missing)}')
    if not table['label'].isin([0, 1]).any():
        counts = ', '.join(f'{n} with label {v}' for v, n in table['label'].value_counts(dropna=False).items())
        raise utils.UserError(f'{path}: no nodule is labelled 0 (benign) or 1 (malignant), nothing to crop '
                              f'({len(table)} rows' + (f': {counts})' if counts else ')') + '; the labels come from '
                              'the LIDC reader clusters (prepare.py NODULE_TABLE / LIDC_DB) or your own LABEL_TABLE')
    return table[table['label'].isin([0, 1]) | table['label'].isna()].reset_index(drop=True)


def crop_cube_set(prepared_dir, out_dir, size, log, max_padded=MAX_PADDED):
    """Write the cube set: nodules.csv lists the labelled cubes, unlabelled.csv those without a label (own table;
    never trained or evaluated on). A cube more than max_padded outside its volume is refused (nodule outside
    the scan). Returns (number of labelled cubes, nodule ids whose volume is missing)."""
    from scans import luna, lungmask  # here, not at the top: the baseline on a cube set runs without SimpleITK
    table = read_labels(prepared_dir)
    os.makedirs(os.path.join(out_dir, 'cubes'), exist_ok=True)
    rows, missing, refused = [], [], []
    for uid, group in table.groupby('seriesuid', sort=True):
        npy, meta = (os.path.join(prepared_dir, 'volumes', uid + ext) for ext in ('.npy', '.json'))
        if not (os.path.exists(npy) and os.path.exists(meta)):
            missing += group['nodule_id'].tolist()
            continue
        with open(meta) as f:
            geometry = json.load(f)
        volume = np.load(npy, mmap_mode='r')
        world = group[['coordX', 'coordY', 'coordZ']].to_numpy(dtype=float)
        cubes, centres, padded = luna.crop_nodules(volume, geometry, world, size, lungmask.PAD_VALUE)
        for r, cube, centre, share in zip(group.itertuples(index=False), cubes, centres, padded):
            if share > max_padded:
                refused.append(f'{r.nodule_id} (scan {uid}, {share:.0%} outside the volume)')
                continue
            luna.save_npy_atomic(os.path.join(out_dir, 'cubes', f'{r.nodule_id}.npy'), cube)
            rows.append({'nodule_id': r.nodule_id, 'seriesuid': uid, 'fold': int(r.fold),
                         'diameter_mm': r.diameter_mm, 'label': r.label, 'coordX': r.coordX,
                         'coordY': r.coordY, 'coordZ': r.coordZ,
                         **{f'voxel_{a}': round(float(c), 2) for a, c in zip('zyx', centre)}})
    if refused:
        log(f'{len(refused)} nodules refused, their cube mostly padding (the nodule lies outside its scan\'s volume): '
            + ', '.join(refused[:10]) + (' ...' if len(refused) > 10 else ''))
    labelled = sorted((dict(r, label=int(r['label'])) for r in rows if r['label'] == r['label']),
                      key=lambda r: r['nodule_id'])
    unlabelled = sorted((dict(r, label='') for r in rows if r['label'] != r['label']), key=lambda r: r['nodule_id'])
    if not labelled:
        raise utils.UserError(f'no labelled cube could be cropped: of the {len(table)} nodules to crop in '
                              f'{table["seriesuid"].nunique()} scans, {len(missing)} have no volume (.npy and .json) '
                              f'in {prepared_dir}/volumes (run prepare.py with VOLUMES=True; failed scans are in '
                              f'{prepared_dir}/failures.csv), {len(refused)} were refused')
    luna.write_csv_atomic(os.path.join(out_dir, 'nodules.csv'), labelled, list(labelled[0]))
    if unlabelled:
        luna.write_csv_atomic(os.path.join(out_dir, 'unlabelled.csv'), unlabelled, list(unlabelled[0]))
    log(f'cube set {out_dir}: {len(labelled)} cubes of {size}^3 ({sum(r["label"] for r in labelled)} malignant); '
        f'{len(unlabelled)} unlabelled cubes (unlabelled.csv: kept out of training and evaluation); '
        f'{len(missing)} nodules skipped because their scan has no volume; {len(refused)} refused as mostly padding')
    return len(labelled), missing


def features(cubes, factor):
    """(N, S, S, S) uint8 -> (N, (S // factor)^3) float32: means over factor^3 blocks, flattened."""
    n, s = cubes.shape[0], cubes.shape[1] // factor * factor
    x = cubes[:, :s, :s, :s].astype(np.float32)
    k = s // factor
    return x.reshape(n, k, factor, k, factor, k, factor).mean(axis=(2, 4, 6)).reshape(n, -1)


def fit_predict(x_train, y_train, x_test, cfg):
    """Probability of malignancy for x_test from a HistGradientBoostingClassifier fitted on the training set."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits
    clf = HistGradientBoostingClassifier(max_iter=cfg['MAX_ITER'], learning_rate=cfg['LEARNING_RATE'],
                                         max_leaf_nodes=cfg['MAX_LEAF_NODES'], l2_regularization=cfg['L2'],
                                         min_samples_leaf=cfg['MIN_SAMPLES_LEAF'], early_stopping=False,
                                         random_state=cfg['SEED'])
    with threadpool_limits(limits=cfg['THREADS'] or None, user_api='openmp'):
        clf.fit(x_train, y_train)
        return clf.predict_proba(x_test)[:, 1]


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    if cfg['CROP']:  # the inputs fail before the run folder is made
        read_labels(cfg['PREPARED_DIR'])
    else:
        data.select_folds(data.read_table(cfg['CUBE_SET']), cfg['TEST_FOLDS'], cfg['CUBE_SET'], what='TEST_FOLDS')
    run = runfolder.Run('nodclsgbt', cfg, root=cfg['RUNS'], tag=cfg['TAG'])
    run.header(cfg, 'cpu')
    if cfg['CROP']:
        crop_cube_set(cfg['PREPARED_DIR'], cfg['CUBE_SET'], cfg['CUBE_SIZE'], run.log, cfg['MAX_PADDED'])
    table = data.read_table(cfg['CUBE_SET'])
    data.select_folds(table, cfg['TEST_FOLDS'], cfg['CUBE_SET'], what='TEST_FOLDS')
    x = features(data.load_cubes(cfg['CUBE_SET'], table, cfg['CUBE_SIZE']), cfg['DOWNSAMPLE'])
    y = table['label'].to_numpy(dtype=int)
    fold = table['fold'].to_numpy(dtype=int)
    run.log(f'{len(y)} nodules ({int(y.sum())} malignant) in folds {sorted(set(fold.tolist()))}; '
            f'{x.shape[1]} features per cube')
    rows, preds = [], []
    for k, f in enumerate(cfg['TEST_FOLDS']):
        t0 = time.time()
        test = fold == f
        if len(set(y[~test].tolist())) < 2:
            raise utils.UserError(f'cube set {cfg["CUBE_SET"]}: the training folds of test fold {f} lack a class')
        run.log(f'fold {f} ({k + 1} of {len(cfg["TEST_FOLDS"])}): fitting {cfg["MAX_ITER"]} trees on '
                f'{int((~test).sum())} cubes' + (f', about {rows[0]["seconds"]:.0f} s as the first fold' if rows else
                                                 ' (minutes on a CPU with the default settings)'))
        prob = fit_predict(x[~test], y[~test], x[test], cfg)
        row = {'fold': f, **utils.binary_metrics(y[test], prob), 'n_test': int(test.sum()),
               'seconds': round(time.time() - t0, 2)}
        rows.append(row)
        run.metrics_row(row)
        preds += [{'nodule_id': i, 'fold': f, 'label': int(t), 'prob_malignant': round(float(p), 5)}
                  for i, t, p in zip(table['nodule_id'][test], y[test], prob)]
        run.log(f'fold {f}: ' + '  '.join(f'{k} {row[k]:.2f}' for k in utils.METRIC_NAMES)
                + f'  ({row["n_test"]} nodules, {row["seconds"]:.1f} s)')
    with utils.atomic_path(run.file('predictions.csv')) as tmp:
        pd.DataFrame(preds, columns=['nodule_id', 'fold', 'label', 'prob_malignant']).to_csv(tmp, index=False)
    run.log(utils.results_table(rows))
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in utils.METRIC_NAMES}
    return {'folds': rows, 'mean': mean, 'run': run.path}


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, 'nothing is continued: rerun the same command to start again')
