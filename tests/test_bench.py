"""bench.py's step benchmarks run (tiny, on CPU) and its table is consistent; the kernels need CUDA."""
import math

import pytest

import bench
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
    with pytest.raises(UserError, match='BENCH must be kernels, steps, ops or all'):
        bench.main(BENCH='everything', DEVICE='cpu')


def test_operation_counts_on_cpu():
    counts = bench.main(BENCH='ops', **TINY)['ops']
    assert set(counts) == {name for name, _, _ in bench.step_cases(bench.DEFAULTS)}
    # second order: a virtual step, a validation pass at w', two HVP passes, then the weight step
    assert counts['search 2nd order'] > 2 * counts['search 1st order'] > 0
    assert counts['retrain paper genotype'] > 0
