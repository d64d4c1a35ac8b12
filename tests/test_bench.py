"""bench.py's step benchmarks run (tiny, on CPU) and its table is consistent; the kernels need CUDA."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import bench
from benchmarks import gpu, gpu_report, step_times
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
    with pytest.raises(UserError, match='BENCH must be kernels, steps, ops, all, methods, hypergrad or gpu'):
        bench.main(BENCH='everything', DEVICE='cpu')
    with pytest.raises(UserError, match=r"GPU_CASES: unknown case\(s\) \[.retrain fp64.\] \(known: retrain fp32 fast "):
        bench.main(BENCH='gpu', DEVICE='cpu', GPU_CASES=('retrain fp64',))


def test_operation_counts_on_cpu(capfd):
    counts = bench.main(BENCH='ops', **TINY)['ops']
    out, err = capfd.readouterr()  # the process's descriptors: the profiler's C++ start/stop lines are not shown
    assert 'profiler_start' not in err and 'profiler_stop' not in err and 'USDT' not in out + err
    assert len([line for line in out.splitlines() if 'top-level ops per step' in line]) == len(counts)
    assert set(counts) == {name for name, _, _ in step_times.step_cases(bench.DEFAULTS)}
    # second order: a virtual step, a validation pass at w', two HVP passes, then the weight step
    assert counts['search 2nd order'] > 2 * counts['search 1st order'] > 0
    assert counts['retrain paper genotype'] > 0


# ---------------------------------------------------------------- BENCH='gpu': one command for a GPU session

GPU_TINY = dict(TINY, GPU_TIMED_S=0.01, RETRAIN_BATCH=2)


def test_gpu_bench_on_cpu_writes_every_key(tmp_path, monkeypatch):
    monkeypatch.setenv('OUT', str(tmp_path / 'out'))
    cases = ('retrain fp32 fast', 'search 2nd fp32 native', 'search warm-up fp32 native')
    # the first-use subprocess starts Python and torch: on a loaded 2-core CPU that alone can pass the GPU's 60 s cap
    res = bench.main(BENCH='gpu', **GPU_TINY, GPU_CASES=cases, GPU_OUT=str(tmp_path / 'r.json'),
                     GPU_COMPILE_S=600.0)['gpu']
    saved = json.load(open(tmp_path / 'r.json'))
    assert saved == json.load(open(tmp_path / 'out' / 'r.json')) and res['paths'][0] == str(tmp_path / 'r.json')
    assert set(saved) == {'meta', 'definitions', 'compile', 'graph_check', 'steps', 'largest_batch', 'protocol',
                          'targets', 'notes', 'skipped', 'finished', 'elapsed_s'}
    assert saved['finished'] and saved['notes'] == [] and saved['skipped'] == []
    assert list(saved['steps']) == list(cases)
    for row in saved['steps'].values():
        assert set(row) == set(gpu.ROW_KEYS)
        assert row['ms'] > 0 and row['steps_timed'] == 2 and row['first_s'] > 0 and len(row['ms_halves']) == 2
        assert row['peak_gb'] is None and row['syncs_per_step'] is None and row['host_share'] is None  # CUDA only
    assert saved['steps']['retrain fp32 fast']['batch'] == 2 and saved['steps']['search 2nd fp32 native']['batch'] == 2
    # first use: each case of COMPILED ran its first step in the subprocess; no Triton cache on the CPU
    assert set(saved['compile']['cases']) == set(gpu.COMPILED) and saved['compile']['kernel_binaries'] is None
    first = [c['first_s'] for c in saved['compile']['cases'].values()]
    assert saved['compile']['first_use_s'] == pytest.approx(sum(first)) and min(first) > 0
    assert saved['largest_batch'] == {'retrain fp32 fast': None, 'search 2nd fp32 native': None}  # needs CUDA memory
    # protocol: 38 search steps (266 / 7 rounded up: SEARCH_BATCH 2 here gives 133), 5 folds x 600 epochs x 455 steps
    p, ms = saved['protocol']['defaults'], {k: r['ms'] for k, r in saved['steps'].items()}
    assert p['search_h'] == pytest.approx(133 * (23 * ms['search warm-up fp32 native']
                                                 + 27 * ms['search 2nd fp32 native']) / 3.6e6)
    assert p['retrain_h'] == pytest.approx(5 * 600 * 455 * ms['retrain fp32 fast'] / 3.6e6)
    assert p['published_h'] == 108 and p['total_h'] == pytest.approx(p['search_h'] + p['retrain_h'])
    t = saved['targets']
    assert set(t) == {name for name, *_ in gpu_report.TARGETS}
    assert t['retrain ms/step'] == {'bound': 70, 'best': ms['retrain fp32 fast'], 'case': 'retrain fp32 fast',
                                    'met': None, 'by_case': {'retrain fp32 fast':
                                                                                      ms['retrain fp32 fast']}}
    assert t['retrain peak GB']['met'] is None and t['host share of a step']['best'] is None


def fake_steps(monkeypatch, behaviour):
    """bench_gpu's steps replaced, per case: 'instant', 'sleep' (1 s a step), 'boom' (fails to build), 'interrupt'."""
    def make_step(name, batch, cfg):
        if behaviour[name] == 'boom':
            raise RuntimeError('boom')
        if behaviour[name] == 'interrupt':
            raise KeyboardInterrupt
        return (lambda: None) if behaviour[name] == 'instant' else (lambda: time.sleep(1.0))
    monkeypatch.setattr(gpu, 'make_step', make_step)
    monkeypatch.setattr(gpu, 'measure_compile', lambda cfg, out, limit: out.update(first_use_s=1.0))
    return tuple(behaviour)


def test_gpu_bench_caps_each_part_notes_failures_and_skips_past_its_budget(tmp_path, monkeypatch):
    cases = fake_steps(monkeypatch, {'retrain fp32 fast': 'instant', 'search 2nd fp32 native': 'boom',
                                     'search warm-up fp32 native': 'sleep', 'retrain bf16 fast': 'instant'})
    monkeypatch.setattr(gpu, 'MIN_LEFT_S', 0.5)
    bench.main(BENCH='gpu', **GPU_TINY, GPU_CASES=cases, GPU_BUDGET_S=4.0, GPU_OUT=str(tmp_path / 'r.json'))
    saved = json.load(open(tmp_path / 'r.json'))
    steps = saved['steps']
    assert steps['retrain fp32 fast']['ms'] >= 0 and steps['retrain fp32 fast']['steps_timed'] == 200  # MAX_TIMED
    assert saved['notes'][0] == 'search 2nd fp32 native: RuntimeError: boom'
    # 1 s steps: the first two are kept, the timed ones (and everything after them) did not fit the 4 s budget
    warm = steps['search warm-up fp32 native']
    assert warm['first_s'] == pytest.approx(1.0, abs=0.3) and warm['ms'] is None
    assert len(saved['notes']) == 2 and saved['notes'][1].startswith('search warm-up fp32 native: stopped at its cap')
    assert saved['skipped'] == [f'{name}: the budget of 4 s was spent' for name in
                                ('retrain bf16 fast', 'largest batch: retrain fp32 fast',
                                 'largest batch: search 2nd fp32 native')]
    assert saved['finished'] and saved['compile']['first_use_s'] == 1.0
    assert saved['targets']['first use compile s']['best'] == 1.0 and saved['targets']['retrain ms/step']['met'] is None


def test_gpu_bench_interrupted_keeps_what_it_measured(tmp_path, monkeypatch):
    cases = fake_steps(monkeypatch, {'search 1st fp32 native': 'instant', 'search zeroth fp32 native': 'interrupt'})
    with pytest.raises(KeyboardInterrupt):
        bench.main(BENCH='gpu', **GPU_TINY, GPU_CASES=cases, GPU_OUT=str(tmp_path / 'r.json'))
    saved = json.load(open(tmp_path / 'r.json'))
    assert saved['steps']['search 1st fp32 native']['ms'] >= 0 and saved['steps']['search zeroth fp32 native']['ms'] \
        is None and not saved['finished']


def test_first_use_probe_is_stopped_at_its_cap():
    out = {}
    gpu.measure_compile({**bench.DEFAULTS, **GPU_TINY}, out, 0.5)
    assert out['note'].startswith('stopped at its cap of 0 s') and out['cases'] == {} and out['first_use_s'] is None
    assert out['process_s'] < 5 and out['first_use_at_least_s'] == out['process_s']
    res = {'compile': out, 'steps': {}}
    gpu_report.summarize(res, {**bench.DEFAULTS, **GPU_TINY, 'DEVICE': 'cuda'})  # as on a GPU: met or not
    assert res['targets']['first use compile s']['best'] == out['process_s'] and res['targets']['first use compile s'][
        'met'] is True  # took at least that long, under the 60 s bound
    res['compile'] = {'first_use_s': None, 'first_use_at_least_s': 120.3}  # stopped at a cap of 120 s
    gpu_report.summarize(res, {**bench.DEFAULTS, **GPU_TINY, 'DEVICE': 'cuda'})
    assert res['targets']['first use compile s']['met'] is False and res['targets']['retrain ms/step']['met'] is None


def test_busy_time_is_the_union_of_intervals():
    assert gpu.busy_ms([(0, 10_000_000), (5_000_000, 15_000_000), (20_000_000, 30_000_000),
                              (21_000_000, 22_000_000)]) == 25.0
    assert gpu.busy_ms([]) == 0.0


def test_activity_spans_read_a_profiler_trace():
    """The trace reading of the host share, on CPU activities (the GPU run reads the CUDA ones the same way)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(256, 256)
    t0 = time.perf_counter_ns()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x @ x).exp()
    wall = time.perf_counter_ns() - t0
    spans = gpu.activity_spans(prof, DeviceType.CPU)
    assert len(spans) >= 2 and all(e >= s for s, e in spans)
    assert 0 < gpu.busy_ms(spans) <= wall / 1e6 and gpu.activity_spans(prof, DeviceType.CUDA) == []



BLOCKED = ('pandas', 'scipy', 'SimpleITK', 'skimage', 'sklearn', 'pymoo', 'ray', 'matplotlib', 'tqdm')
# A finder that answers for the blocked packages with a loader that fails: `import pandas` raises
# ModuleNotFoundError as where it is not installed (importlib.util.find_spec, which torch's dynamo calls for
# many names at import, still answers without loading).
NO_EXTRAS = '''import importlib.abc, importlib.machinery, runpy, sys
class Fail(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f'No module named {{spec.name!r}} (blocked by the test)', name=spec.name)
    def exec_module(self, module):
        pass
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in {blocked!r}:
            return importlib.machinery.ModuleSpec(name, Fail())
sys.meta_path.insert(0, Missing())
sys.argv = ['bench.py'] + sys.argv[1:]
runpy.run_path('bench.py', run_name='__main__')
'''


def test_gpu_bench_runs_with_only_torch_numpy_and_triton(tmp_path):
    """The GPU machine has no SimpleITK, pymoo, Ray (maybe no pandas, scipy, sklearn, matplotlib, tqdm): bench.py
    --BENCH=gpu runs in a process where importing any of them fails, and measures and writes its results."""
    out = tmp_path / 'r.json'
    args = [f'--{k}={v!r}' if isinstance(v, str) else f'--{k}={v}' for k, v in GPU_TINY.items()]
    done = subprocess.run([sys.executable, '-c', NO_EXTRAS.format(blocked=BLOCKED), '--BENCH=gpu', *args,
                           "--GPU_CASES=('retrain fp32 fast',)", f'--GPU_OUT={out}', '--GPU_COMPILE_S=1',
                           '--GPU_BUDGET_S=40'], env={**os.environ, 'OMP_NUM_THREADS': '1'},
                          cwd=bench.utils.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    saved = json.load(open(out))
    assert saved['finished'] and saved['steps']['retrain fp32 fast']['first_s'] > 0
    assert not [n for n in saved['notes'] if 'Error' in n], saved['notes']  # (a slow CPU may hit a part's cap)


def test_top_kernels_sums_gpu_time_by_kernel_name():
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def event(name, ms, device=DeviceType.CUDA):
        return NS(name=lambda: name, duration_ns=lambda: int(ms * 1e6), device_type=lambda: device)
    events = [event('dw_fwd', 2), event('bn', 1), event('dw_fwd', 3), event('aten::conv3d', 50, DeviceType.CPU),
              event('copy', 0.5)]
    prof = NS(profiler=NS(kineto_results=NS(events=lambda: events)))
    assert gpu.top_kernels(prof, n=2) == [['dw_fwd', 5.0], ['bn', 1.0]]


def test_quiet_stderr_drops_only_the_profilers_lines(capfd):
    with step_times.quiet_stderr():
        os.write(2, b'USDT:2026-12-08 00:44:22 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n')
        os.write(2, b'a real warning\n')
    assert capfd.readouterr().err == 'a real warning\n'
