"""The search methods compared on the demo set under one short budget: each method searches, its genotype is
retrained and tested on one fold. Run through bench.py --BENCH=methods."""
import os
import time

import train_3D_continuation
import train_search
import utils

# (HYPERGRAD, WEIGHTS): DARTS second and first order with NAS-HBO's sigmoid weights, ZO-DARTS+.
METHODS = (('second', 'sigmoid'), ('first', 'sigmoid'), ('zeroth', 'sparsemax'))


def compare_methods(search, retrain):
    """Search with each of METHODS (train_search.main(**search) plus the method), retrain its final genotype
    (train_3D_continuation.main(**retrain)); one row per method with wall times and the test-fold metrics."""
    rows = []
    for hypergrad, weights in METHODS:
        t0 = time.perf_counter()
        found = train_search.main(**search, HYPERGRAD=hypergrad, WEIGHTS=weights, TAG=f'methods-{hypergrad}')
        t1 = time.perf_counter()
        result = train_3D_continuation.main(**retrain, GENOTYPE=os.path.join(found['run'], 'genotype.json'),
                                            TAG=f'methods-{hypergrad}')
        fold = result['folds'][0]
        rows.append({'method': f'{hypergrad}, {weights}', 'search_s': t1 - t0, 'retrain_s': time.perf_counter() - t1,
                     **{k: fold[k] for k in (*utils.METRIC_NAMES, 'params_M')},
                     'search_run': found['run'], 'retrain_run': result['run']})
        print(f'  {rows[-1]["method"]}: search {t1 - t0:.0f} s, retrain {rows[-1]["retrain_s"]:.0f} s, '
              f'test acc {fold["acc"]:.2f}', flush=True)
    return rows


def methods_table(rows):
    lines = ['| HYPERGRAD, WEIGHTS | search time | retrain time | acc | sens | spec | F1 | AUC | params |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        lines.append(f'| {r["method"]} | {r["search_s"]:.0f} s | {r["retrain_s"]:.0f} s | {r["acc"]:.2f} | '
                     f'{r["sens"]:.2f} | {r["spec"]:.2f} | {r["f1"]:.2f} | {r["auc"]:.2f} | {r["params_M"]:.2f} M |')
    return '\n'.join(lines)
