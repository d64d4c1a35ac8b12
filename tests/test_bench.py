"""bench.py's step benchmarks run (tiny, on CPU) and its table is consistent; the kernels need CUDA."""
import json
import math
import os

import pytest

import bench
import bench_methods
import bench_steps
from conftest import write_cube_set
from utils import UserError

TINY = dict(DEVICE='cpu', SEARCH_C=4, SEARCH_LAYERS=3, RETRAIN_C=4, RETRAIN_LAYERS=3, CUBE=12, STEPS=1,
            WARMUP_STEPS=0, SEARCH_BATCH=2, RETRAIN_BATCH=3)


def test_step_benchmarks_run_on_cpu(capsys):
    rows = bench.main(BENCH='steps', **TINY)['steps']
    assert [(r['step'], r['path']) for r in rows[:2]] == [('search 2nd order', 'fast'), ('search 2nd order', 'native')]
    assert {r['step'] for r in rows} == {'search 2nd order', 'search 1st order', 'search zeroth order',
                                         'search 2nd, cells recomputed', 'retrain paper genotype',
                                         'retrain, cells recomputed'}
    for r in rows:
        assert r['ms'] > 0 and r['samples_s'] == pytest.approx(1e3 * r['batch'] / r['ms'])
        assert r['batch'] == (3 if r['step'].startswith('retrain') else 2) and math.isnan(r['peak_gb'])
    out = capsys.readouterr().out
    assert 'search zeroth order' in out and 'speedup' in out


def test_kernel_benchmarks_need_cuda_and_bad_settings_are_rejected():
    with pytest.raises(UserError, match='needs a CUDA device'):
        bench.main(BENCH='kernels', DEVICE='cpu')
    with pytest.raises(UserError, match='BENCH must be kernels, steps, ops, all, methods or hypergrad'):
        bench.main(BENCH='everything', DEVICE='cpu')


def test_operation_counts_on_cpu():
    counts = bench.main(BENCH='ops', **TINY)['ops']
    assert set(counts) == {name for name, _, _ in bench_steps.step_cases(bench.DEFAULTS)}
    # second order: a virtual step, a validation pass at w', two HVP passes, then the weight step
    assert counts['search 2nd order'] > 2 * counts['search 1st order'] > 0
    assert counts['retrain paper genotype'] > 0


def test_methods_comparison_runs_each_search_and_retrains_its_genotype(tmp_path, capsys):
    cubes = str(write_cube_set(tmp_path / 'cubes'))
    common = dict(DATA=cubes, RUNS=str(tmp_path / 'runs'), DEVICE='cpu', C=4, LAYERS=3, CUBE=8)
    rows = bench_methods.compare_methods(
        dict(common, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34, BATCH_SIZE=3, EPOCHS=2, WARMUP_EPOCHS=1, ZO_T=2,
             PRIMITIVES=('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3')),
        dict(common, FOLD=5, TRAIN_FOLDS=(0, 1, 2, 3), BATCH_SIZE=4, EPOCHS=1))
    assert [r['method'] for r in rows] == ['second, sigmoid', 'first, sigmoid', 'zeroth, sparsemax']
    for r, (hypergrad, weights) in zip(rows, bench_methods.METHODS):
        config = json.load(open(os.path.join(r['search_run'], 'config.json')))
        assert (config['HYPERGRAD'], config['WEIGHTS'], config['EPOCHS']) == (hypergrad, weights, 2)
        retrained = json.load(open(os.path.join(r['retrain_run'], 'results.json')))
        assert retrained[0]['fold'] == 5 and retrained[0]['acc'] == r['acc']
        assert r['search_s'] > 0 and r['retrain_s'] > 0 and 0 <= r['acc'] <= 100 and r['params_M'] > 0
    table = bench_methods.methods_table(rows).splitlines()
    assert len(table) == 5 and table[4].startswith('| zeroth, sparsemax |')
    assert 'zeroth, sparsemax: search' in capsys.readouterr().out


def test_methods_comparison_adds_the_evolutionary_search_and_the_references(tmp_path, capsys):
    cubes = str(write_cube_set(tmp_path / 'cubes', size=8))
    runs = str(tmp_path / 'runs')
    ops = ('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3')
    common = dict(DATA=cubes, RUNS=runs, DEVICE='cpu', CUBE=8)
    rows = bench_methods.compare_methods(
        dict(common, C=4, LAYERS=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34, BATCH_SIZE=3, EPOCHS=1, WARMUP_EPOCHS=1,
             ZO_T=2, PRIMITIVES=ops),
        dict(common, C=4, LAYERS=3, FOLD=5, TRAIN_FOLDS=(0, 1, 2, 3), BATCH_SIZE=4, EPOCHS=1),
        evolve=dict(common, PRIMITIVES=ops, FILTERS=(4,), CELLS=(2,), POPULATION=3, NEIGHBOURS=2, GENERATIONS=2,
                    LEARNING_GENERATIONS=1, EPOCHS=1, LAST_EPOCHS=1),
        paper=True, random_seeds=2, baseline=True)
    names = [r['method'] for r in rows]
    assert names[3:] == ['evolutionary (EMONAS SaMEA), lowest f1', 'reference: paper genotype',
                         'reference: random genotype, seed 0', 'reference: random genotype, seed 1',
                         'baseline: gradient boosting (nodclsgbt.py)']
    retrained = [json.load(open(os.path.join(r['retrain_run'], 'config.json'))) for r in rows[3:7]]
    # every genotype is retrained the same way: same C, cells, learning rate, epochs and test fold
    assert {(c['C'], c['LAYERS'], c['LR'], c['EPOCHS'], c['FOLD']) for c in retrained} == {(4, 3, 0.025, 1, '5')}
    assert retrained[1]['GENOTYPE'] == 'NAS_HBO_PAPER' and retrained[2]['GENOTYPE'] != retrained[3]['GENOTYPE']
    assert rows[3]['search_s'] > 0 and all(0 <= r['acc'] <= 100 for r in rows)
    gbt = json.load(open(os.path.join(rows[-1]['retrain_run'], 'config.json')))
    assert gbt['TEST_FOLDS'] == [5] and gbt['CROP'] is False
    table = bench_methods.methods_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[-1].endswith('|  |')
    assert 'gradient boosting' in capsys.readouterr().out
