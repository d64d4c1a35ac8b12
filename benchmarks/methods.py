"""BENCH='methods': the search methods compared on the demo set within one short GPU budget.

python bench.py --BENCH=methods [--GPU_BUDGET_S=240]
Entries: DARTS-style searches of second, first and zeroth order (NAS-HBO's sigmoid weights; ZO-DARTS+' sparsemax),
the evolutionary search (EMONAS' SaMEA, its front member with the lowest f1), the paper genotype and random genotypes
of the same cell space, each genotype retrained the same way (same channels, cells, learning rate, epochs) on the same
test folds; the gradient-boosting baseline (nodclsgbt.py) on the same folds.
In order, writing the results JSON after every part (a part cut off by the budget is marked, the rest kept):
1. the cube set is read and each entry's libraries are imported: an entry whose library is missing is skipped with
   its reason (the GPU machine has no SimpleITK, pymoo or Ray);
2. first use, outside the budget and capped at METHODS_FIRST_USE_S: the first steps of each kind of step (Triton
   compilation, cuDNN autotuning, the CUDA-graph capture where graphs are on);
3. within GPU_BUDGET_S: METHODS_MEASURE_STEPS timed steps of each kind, the gradient-boosting baseline, then the
   epochs and candidates that fit what is left (benchmarks/sizing.py), then each search with its retrain, the paper
   genotype and the random genotypes. An entry whose planned time exceeds what is left is not started, one still
   running when the budget ends is stopped; both are marked 'cut'.
"""
import gc
import importlib
import os
import sys
import time

import numpy as np
import torch

import dwconv3d
import genotypes
import utils
from benchmarks import measure, sizing
from benchmarks.gpu import OverBudget, cap
from benchmarks.gpu_report import json_safe
from evolution.genes import GeneSpace

# (entry, HYPERGRAD, WEIGHTS, step kind): DARTS second and first order with NAS-HBO's sigmoid weights, ZO-DARTS+.
DARTS = (('second, sigmoid', 'second', 'sigmoid', 'search 2nd'), ('first, sigmoid', 'first', 'sigmoid', 'search 1st'),
         ('zeroth, sparsemax', 'zeroth', 'sparsemax', 'search zeroth'))
EVOLVE = 'evolutionary (EMONAS SaMEA), lowest f1'
PAPER = 'reference: paper genotype'
GBT = 'baseline: gradient boosting (nodclsgbt.py)'
REQUIRES = {EVOLVE: ('pymoo', 'sklearn'), GBT: ('sklearn', 'threadpoolctl')}  # beyond torch, numpy and pandas
ROW_KEYS = ('method', 'status', 'reason', 'planned_s', 'search_s', 'retrain_s', 'params_M', 'folds', 'mean',
            'search_run', 'retrain_run')  # status: pending, done, skipped, cut, failed


def random_name(seed):
    return f'reference: random genotype, seed {seed}'


def random_genotype(primitives, seed):
    """A cell pair drawn uniformly from the searched space: per node two distinct earlier states, an op each."""
    space = GeneSpace(primitives, (1,), (1,), (1.0,), 8, 1, 1.0)
    return space.decode(space.random(np.random.default_rng(seed)))[0]


def missing_library(entry):
    """Why `entry` cannot run here (a library it needs cannot be imported), or None."""
    for name in REQUIRES.get(entry, ()):
        try:
            importlib.import_module(name)
        except ImportError as e:
            return f'needs {name}, which cannot be imported here ({e})'
    return None


# ---------------------------------------------------------------- the entries: each fills its row as it goes

def fill_results(row, result, seconds):
    """The test metrics of a retrain (or of the baseline) per fold and their mean, into the row."""
    folds = result['folds']
    row.update(retrain_s=seconds, retrain_run=result['run'], params_M=folds[0].get('params_M'),
               folds={str(r['fold']): {k: r[k] for k in utils.METRIC_NAMES} for r in folds},
               mean={k: float(np.nanmean([r[k] for r in folds])) for k in utils.METRIC_NAMES})


def retrain(row, genotype, tag, settings, save):
    import train_3D_continuation
    t0 = time.perf_counter()
    result = train_3D_continuation.main(**settings, GENOTYPE=genotype, TAG=tag)
    fill_results(row, result, time.perf_counter() - t0)
    save()


def darts_entry(hypergrad, weights, search, same):
    def run(row, save):
        import train_search
        t0 = time.perf_counter()
        found = train_search.main(**search, HYPERGRAD=hypergrad, WEIGHTS=weights, TAG=f'methods-{hypergrad}')
        row.update(search_s=time.perf_counter() - t0, search_run=found['run'])
        save()
        retrain(row, os.path.join(found['run'], 'genotype.json'), f'methods-{hypergrad}', same, save)
    return run


def evolve_entry(evolve, same):
    def run(row, save):
        import train_evolve
        t0 = time.perf_counter()
        found = train_evolve.main(**evolve, TAG='methods-evolve')
        row.update(search_s=time.perf_counter() - t0, search_run=found['run'])
        save()
        best = min(found['front'], key=lambda r: r['f1'])  # retrained with the same C, LAYERS and LR as the others
        path = os.path.join(found['run'], 'front', f'candidate_{best["index"]:04d}.json')
        retrain(row, path, 'methods-evolve', same, save)
    return run


def reference_entry(genotype, tag, same):
    return lambda row, save: retrain(row, genotype, tag, same, save)


def gbt_entry(cfg):
    def run(row, save):
        import nodclsgbt
        t0 = time.perf_counter()
        out = nodclsgbt.main(CROP=False, CUBE_SET=cfg['METHODS_DATA'], CUBE_SIZE=cfg['CUBE'],
                             TEST_FOLDS=tuple(cfg['METHODS_FOLDS']), RUNS=cfg['METHODS_RUNS'], TAG='methods-gbt',
                             THREADS=0 if str(cfg['DEVICE']).startswith('cuda') else 1)  # 1: faster on a busy CPU
        fill_results(row, out, time.perf_counter() - t0)
    return run


def run_entry(row, planned_s, fn, left_s, save):
    """Run one entry under what is left of the budget, or mark why it did not run or finish."""
    row['planned_s'] = planned_s
    if planned_s > left_s:
        row.update(status='cut', reason=f'not started: {planned_s:.0f} s planned, {max(left_s, 0):.0f} s of the '
                                        'budget left')
        save()
        return
    print(f'  {row["method"]} ({planned_s:.0f} s planned, {left_s:.0f} s of the budget left)', flush=True)
    try:
        with cap(left_s):
            fn(row, save)
        row['status'] = 'done'
    except OverBudget:
        row.update(status='cut', reason=f'stopped at the end of the budget ({left_s:.0f} s were left at its start)')
    except ImportError as e:
        row.update(status='skipped', reason=f'a library is missing: {e}')
    except Exception as e:  # one failing entry must not cost the others: noted, the comparison goes on
        row.update(status='failed', reason=f'{type(e).__name__}: {str(e).partition(chr(10))[0][:300]}')
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()
    print(f'  {row["method"]}: {row["status"]}' + (f' ({row["reason"]})' if row['reason'] else ''), flush=True)


def entries(cfg, p, graphed):
    """(entry, planned s, fn(row, save)) of every search and reference, in the order they run."""
    import train_3D_continuation
    common = {'DATA': cfg['METHODS_DATA'], 'DEVICE': cfg['DEVICE'], 'CUBE': cfg['CUBE'], 'RUNS': cfg['METHODS_RUNS']}
    search = {**common, 'AMP': cfg['AMP'], 'C': cfg['METHODS_C'], 'LAYERS': cfg['METHODS_LAYERS'],
              'EPOCHS': p['search_epochs'], 'WARMUP_EPOCHS': p['warmup_epochs'], 'CUDA_GRAPHS': graphed[0],
              'FIGURES': False}
    same = {**common, 'AMP': cfg['AMP'], 'C': cfg['METHODS_RETRAIN_C'], 'LAYERS': cfg['METHODS_RETRAIN_LAYERS'],
            'LR': train_3D_continuation.DEFAULTS['LR'], 'EPOCHS': p['retrain_epochs'], 'FOLD': 'all',
            'TEST_FOLDS': tuple(cfg['METHODS_FOLDS']), 'CUDA_GRAPHS': graphed[1], 'FIGURES': False}
    evolve = {**common, 'POPULATION': p['population'], 'NEIGHBOURS': sizing.MIN_POPULATION,
              'GENERATIONS': p['generations'], 'LEARNING_GENERATIONS': p['generations'] // 2,
              'EPOCHS': p['candidate_epochs'], 'LAST_EPOCHS': 1, 'FILTERS': tuple(cfg['METHODS_EVOLVE_FILTERS']),
              'CELLS': tuple(cfg['METHODS_EVOLVE_CELLS']), 'MEMORY_GB': cfg['MEMORY_GB']}
    out = [(name, p['search_s'].get(kind, 0.0) + p['retrain_s'], darts_entry(hypergrad, weights, search, same))
           for name, hypergrad, weights, kind in DARTS]
    out.append((EVOLVE, p['evolve_s'] + p['retrain_s'], evolve_entry(evolve, same)))
    out.append((PAPER, p['retrain_s'], reference_entry('NAS_HBO_PAPER', 'methods-paper', same)))
    for seed in range(cfg['METHODS_RANDOM_SEEDS']):
        path = os.path.join(cfg['METHODS_RUNS'], f'methods-random-genotype-{seed}.json')
        os.makedirs(cfg['METHODS_RUNS'], exist_ok=True)
        genotypes.save_genotype(random_genotype(genotypes.mrfc(), seed), path)
        out.append((random_name(seed), p['retrain_s'], reference_entry(path, f'methods-random{seed}', same)))
    return out


# ---------------------------------------------------------------- the comparison within the budget

def entry_names(cfg):
    names = [name for name, *_ in DARTS] + ([EVOLVE] if cfg['METHODS_EVOLVE'] else [])
    if cfg['METHODS_REFERENCES']:
        names.append(PAPER)
    names += [random_name(s) for s in range(cfg['METHODS_RANDOM_SEEDS'])]
    return names + ([GBT] if cfg['METHODS_REFERENCES'] else [])


def kinds_of(name):
    """The kinds of step an entry's sizing needs."""
    kind = {n: k for n, _, _, k in DARTS}.get(name)
    if kind:
        return ('search warm-up', kind, 'retrain')
    return ('candidate', 'retrain') if name == EVOLVE else () if name == GBT else ('retrain',)


def out_paths(cfg, stamp):
    paths = [cfg['METHODS_OUT'] or os.path.join(cfg['METHODS_RUNS'], f'bench_methods-{stamp}.json')]
    if os.environ.get('OUT'):
        paths.append(os.path.join(os.environ['OUT'], os.path.basename(paths[0])))
    return paths


def limits_of(cfg):
    return {'search_epochs': cfg['METHODS_EPOCHS'], 'retrain_epochs': cfg['METHODS_RETRAIN_EPOCHS'],
            'population': cfg['METHODS_EVOLVE_POPULATION'], 'generations': cfg['METHODS_EVOLVE_GENERATIONS'],
            'candidate_epochs': cfg['METHODS_EVOLVE_EPOCHS'], 'search_share': cfg['METHODS_SEARCH_SHARE'],
            'overhead_s': cfg['METHODS_OVERHEAD_S'], **measure.batches()}


def new_results(cfg, stamp):
    device, keep = cfg['DEVICE'], ('DEVICE', 'CUBE', 'AMP', 'MEMORY_GB', 'GPU_BUDGET_S')
    return {'meta': {'device': str(device), 'gpu': torch.cuda.get_device_name(device)
                     if str(device).startswith('cuda') else None, 'torch': torch.__version__,
                     'triton': getattr(dwconv3d.triton, '__version__', None), 'git': utils.git_commit(),
                     'command': 'python bench.py ' + ' '.join(sys.argv[1:]), 'started': stamp,
                     'settings': {k: v for k, v in cfg.items() if k.startswith('METHODS') or k in keep}},
            'data': None, 'graphs': None, 'first_use_s': {}, 'step_s': {}, 'plan': None, 'methods': [], 'notes': [],
            'budget_s': cfg['GPU_BUDGET_S'], 'budget_used_s': 0.0, 'finished': False, 'elapsed_s': 0.0}


def sized(cfg, rows, res, left_s):
    """The plan for what is left (benchmarks/sizing.py); the searches it drops are marked 'cut' with the reason."""
    live = {n for n, r in rows.items() if r['status'] == 'pending'}
    darts = [kind for name, _, _, kind in DARTS if name in live]
    p = sizing.plan(res['step_s'], res['data'], left_s, limits_of(cfg), darts, EVOLVE in live,
                    sum(1 for n in live if n == PAPER or n.startswith('reference: random')))
    by_kind = {kind: name for name, _, _, kind in DARTS}
    for what, reason in p['dropped'].items():
        rows[by_kind.get(what, EVOLVE)].update(status='cut', reason=f'does not fit the budget: {reason}')
    print(f'plan for {left_s:.0f} s: searches of {p["search_epochs"]} epochs ({p["warmup_epochs"]} warm-up), '
          f'evolutionary search of {p["population"]} x {p["generations"]} candidates, retrains of '
          f'{p["retrain_epochs"]} epochs on folds {list(cfg["METHODS_FOLDS"])}: {p["planned_s"]:.0f} s planned',
          flush=True)
    return p


def run(cfg, clock=time.monotonic):
    """The comparison within cfg['GPU_BUDGET_S'] (bench.py's settings); the results JSON (METHODS_OUT, and $OUT/ when
    set) is rewritten after every part. clock: seconds (the tests pass their own). Returns the results."""
    started, stamp = clock(), time.strftime('%Y%m%d-%H%M%S')
    paths, res, budget = out_paths(cfg, stamp), new_results(cfg, stamp), {}

    def save():
        res['elapsed_s'] = clock() - started
        res['budget_used_s'] = clock() - budget['start'] if budget else 0.0
        for path in paths:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            utils.save_json_atomic(path, json_safe(res))

    def left():
        if 'start' not in budget:  # the budget starts at the first call: after the first use
            budget['start'] = clock()
        return cfg['GPU_BUDGET_S'] - (clock() - budget['start'])
    graphed = measure.graphs_on(cfg)
    res['graphs'] = {'search': graphed[0], 'retrain': graphed[1]}
    res['data'] = measure.data_sizes(cfg)
    rows = {name: {**dict.fromkeys(ROW_KEYS), 'method': name, 'status': 'pending'} for name in entry_names(cfg)}
    res['methods'] = list(rows.values())
    for name, row in rows.items():
        reason = missing_library(name)
        if reason:
            row.update(status='skipped', reason=reason)
    print(f'results: {", ".join(paths)} (rewritten after every part)', flush=True)
    save()
    try:
        pending = [n for n, r in rows.items() if r['status'] == 'pending']
        kinds = [k for k in measure.KINDS if any(k in kinds_of(n) for n in pending)]
        measure.measure(cfg, kinds, graphed, res, save, left)
        gc.collect()
        for name in pending:
            unmeasured = [k for k in kinds_of(name) if k not in res['step_s']]
            if unmeasured:
                rows[name].update(status='cut', reason=f'its steps were not measured ({", ".join(unmeasured)})')
        if rows.get(GBT, {}).get('status') == 'pending':  # first: its time is then known, not estimated
            run_entry(rows[GBT], 0.0, gbt_entry(cfg), left(), save)
        p = res['plan'] = sized(cfg, rows, res, left())
        save()
        for name, planned, fn in entries(cfg, p, graphed):
            if rows.get(name, {}).get('status') != 'pending':
                continue
            if not p['retrain_epochs']:
                rows[name].update(status='cut', reason='does not fit the budget: not one retrain epoch fits')
                save()
            else:
                run_entry(rows[name], planned, fn, left(), save)
        res['finished'] = True
    finally:  # also when interrupted: what was measured is on disk
        dwconv3d.set_fast_kernels(True)
        save()
    print(methods_table(res))
    return {**res, 'paths': paths}


def methods_table(res):
    """One table: method, status, search and retrain time, parameters, test AUC and accuracy per fold and their mean;
    the reasons of the entries not done below it."""
    folds = [str(f) for f in res['meta']['settings']['METHODS_FOLDS']]
    head = (['method', 'status', 'search', 'retrain', 'params'] + [c for f in folds for c in (f'fold {f} AUC',
                                                                                              f'fold {f} acc')]
            + ['mean AUC', 'mean acc'])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]

    def num(v, fmt='{:.2f}'):
        return '' if v is None or v != v else fmt.format(v)
    for r in res['methods']:
        per_fold = [num(((r['folds'] or {}).get(f) or {}).get(k)) for f in folds for k in ('auc', 'acc')]
        mean = r['mean'] or {}
        lines.append('| ' + ' | '.join([r['method'], r['status'], num(r['search_s'], '{:.0f} s'),
                                        num(r['retrain_s'], '{:.0f} s'), num(r['params_M'], '{:.3f} M'), *per_fold,
                                        num(mean.get('auc')), num(mean.get('acc'))]) + ' |')
    lines += [f'{r["method"]}: {r["status"]}: {r["reason"]}' for r in res['methods'] if r['reason']]
    lines += [f'note: {n}' for n in res['notes']]
    return '\n'.join(lines)
