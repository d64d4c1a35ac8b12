"""The search methods compared on the demo set under one short budget: each method searches, its genotype is
retrained and tested on one fold. Beside them, the references every NAS comparison needs: the paper genotype,
genotypes drawn at random from the same cell space (several seeds), all retrained the same way, and the
gradient-boosting baseline (nodclsgbt.py) on the same test fold. Run through bench.py --BENCH=methods."""
import os
import time

import numpy as np

import genotypes
import nodclsgbt
import train_3D_continuation
import train_evolve
import train_search
import utils
from evolution.genes import GeneSpace

# (HYPERGRAD, WEIGHTS): DARTS second and first order with NAS-HBO's sigmoid weights, ZO-DARTS+.
METHODS = (('second', 'sigmoid'), ('first', 'sigmoid'), ('zeroth', 'sparsemax'))


def _row(method, search_s, t1, result, search_run):
    fold = result['folds'][0]
    row = {'method': method, 'search_s': search_s, 'retrain_s': time.perf_counter() - t1,
           **{k: fold[k] for k in (*utils.METRIC_NAMES, 'params_M')}, 'search_run': search_run,
           'retrain_run': result['run']}
    print(f'  {method}: search {search_s:.0f} s, retrain {row["retrain_s"]:.0f} s, test acc {fold["acc"]:.2f}',
          flush=True)
    return row


def random_genotype(primitives, seed):
    """A cell pair drawn uniformly from the searched space: per node two distinct earlier states, an op each."""
    space = GeneSpace(primitives, (1,), (1,), (1.0,), 8, 1, 1.0)
    return space.decode(space.random(np.random.default_rng(seed)))[0]


def compare_methods(search, retrain, evolve=None, paper=False, random_seeds=0, baseline=False):
    """Search with each of METHODS (train_search.main(**search) plus the method) and, if `evolve` is given, with
    train_evolve.main(**evolve); retrain each found genotype (train_3D_continuation.main(**retrain); the evolutionary
    search's front member with the lowest f1, with the same C, LAYERS and LR as the others); then, as asked, the paper
    genotype, `random_seeds` random genotypes and the gradient-boosting baseline. One row per entry."""
    rows = []
    same = {'LR': train_3D_continuation.DEFAULTS['LR'], **retrain}  # a front member's own LR must not apply here
    for hypergrad, weights in METHODS:
        t0 = time.perf_counter()
        found = train_search.main(**search, HYPERGRAD=hypergrad, WEIGHTS=weights, TAG=f'methods-{hypergrad}')
        t1 = time.perf_counter()
        result = train_3D_continuation.main(**same, GENOTYPE=os.path.join(found['run'], 'genotype.json'),
                                            TAG=f'methods-{hypergrad}')
        rows.append(_row(f'{hypergrad}, {weights}', t1 - t0, t1, result, found['run']))
    if evolve is not None:
        t0 = time.perf_counter()
        found = train_evolve.main(**evolve, TAG='methods-evolve')
        t1 = time.perf_counter()
        best = min(found['front'], key=lambda r: r['f1'])
        path = os.path.join(found['run'], 'front', f'candidate_{best["index"]:04d}.json')
        result = train_3D_continuation.main(**same, GENOTYPE=path, TAG='methods-evolve')
        rows.append(_row('evolutionary (EMONAS SaMEA), lowest f1', t1 - t0, t1, result, found['run']))
    if paper:
        t1 = time.perf_counter()
        rows.append(_row('reference: paper genotype', 0.0, t1,
                         train_3D_continuation.main(**same, GENOTYPE='NAS_HBO_PAPER', TAG='methods-paper'), ''))
    prims = genotypes.mrfc() if search.get('PRIMITIVES', 'mrfc') == 'mrfc' else list(search['PRIMITIVES'])
    runs = retrain.get('RUNS', train_3D_continuation.DEFAULTS['RUNS'])
    for seed in range(random_seeds):
        path = os.path.join(runs, f'methods-random-genotype-{seed}.json')
        os.makedirs(runs, exist_ok=True)
        genotypes.save_genotype(random_genotype(prims, seed), path)
        t1 = time.perf_counter()
        rows.append(_row(f'reference: random genotype, seed {seed}', 0.0, t1,
                         train_3D_continuation.main(**same, GENOTYPE=path, TAG=f'methods-random{seed}'), ''))
    if baseline:
        rows.append(gbt_row(retrain))
    return rows


def gbt_row(retrain):
    """nodclsgbt.py's gradient-boosting baseline on the retrain's test fold (all other folds train it)."""
    t0 = time.perf_counter()
    out = nodclsgbt.main(CROP=False, CUBE_SET=retrain.get('DATA', train_3D_continuation.DEFAULTS['DATA']),
                         CUBE_SIZE=retrain.get('CUBE', 32), TEST_FOLDS=(int(retrain['FOLD']),), THREADS=1,
                         RUNS=retrain.get('RUNS', 'runs'), TAG='methods-gbt')
    fold = out['folds'][0]
    print(f'  gradient boosting: {time.perf_counter() - t0:.0f} s, test acc {fold["acc"]:.2f}', flush=True)
    return {'method': 'baseline: gradient boosting (nodclsgbt.py)', 'search_s': 0.0,
            'retrain_s': time.perf_counter() - t0, **{k: fold[k] for k in utils.METRIC_NAMES},
            'params_M': float('nan'), 'search_run': '', 'retrain_run': out['run']}


def methods_table(rows):
    lines = ['| method | search time | retrain time | acc | sens | spec | F1 | AUC | params |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        params = '' if r['params_M'] != r['params_M'] else f'{r["params_M"]:.2f} M'
        lines.append(f'| {r["method"]} | {r["search_s"]:.0f} s | {r["retrain_s"]:.0f} s | {r["acc"]:.2f} | '
                     f'{r["sens"]:.2f} | {r["spec"]:.2f} | {r["f1"]:.2f} | {r["auc"]:.2f} | {params} |')
    return '\n'.join(lines)
