"""bench.py's step benchmarks run (tiny, on CPU) and its table is consistent; the kernels need CUDA."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import graphs
from benchmarks import gpu, gpu_case, gpu_report, step_times
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
    """The real steps (tiny, CPU), the first use replaced; what the JSON holds, not how long anything took."""
    monkeypatch.setenv('OUT', str(tmp_path / 'out'))
    monkeypatch.setattr(gpu, 'fill_kernel_cache', lambda cfg, out, limit: out.update(first_use_s=2.5,
                                                                                     kernel_binaries=52))
    cases = ('retrain fp32 fast', 'search 2nd fp32 native', 'search warm-up fp32 native')
    res = gpu.run({**bench.DEFAULTS, **GPU_TINY, 'GPU_CASES': cases, 'GPU_OUT': str(tmp_path / 'r.json'),
                   'GPU_BUDGET_S': 1e6}, clock=TickClock())
    saved = json.load(open(tmp_path / 'r.json'))
    assert saved == json.load(open(tmp_path / 'out' / 'r.json')) and res['paths'][0] == str(tmp_path / 'r.json')
    assert set(saved) == {'meta', 'definitions', 'compile', 'graph_check', 'steps', 'largest_batch', 'protocol',
                          'targets', 'notes', 'skipped', 'finished', 'elapsed_s'}
    assert saved['finished'] and saved['notes'] == [] and saved['skipped'] == []
    assert list(saved['steps']) == list(cases)
    for row in saved['steps'].values():
        assert set(row) == set(gpu.ROW_KEYS)
        assert row['steps_timed'] == 2 and len(row['ms_halves']) == 2  # a step reads as 50 ms: 2 fill 0.01 s
        assert row['peak_gb'] is None and row['syncs_per_step'] is None and row['host_share'] is None  # CUDA only
        assert row['peak_source'] == gpu_case.PEAK_SOURCE[False] and row['graphs_captured'] is None
    assert saved['steps']['retrain fp32 fast']['batch'] == 2 and saved['steps']['search 2nd fp32 native']['batch'] == 2
    assert saved['compile'] == {'first_use_s': 2.5, 'kernel_binaries': 52}
    assert saved['largest_batch'] == {'retrain fp32 fast': None, 'search 2nd fp32 native': None}  # needs CUDA memory
    t = saved['targets']
    assert set(t) == {name for name, *_ in gpu_report.TARGETS}
    assert t['first use compile s']['best'] == 2.5 and t['first use compile s']['met'] is None  # (not on a GPU)
    assert t['retrain peak GB']['met'] is None and t['host share of a step']['best'] is None


def test_protocol_estimate_from_the_measured_steps():
    """protocol.defaults: 38 search steps (266 / 7 rounded up; batch 2 here: 133), 5 folds x 600 epochs x 455 steps."""
    res = {'compile': {}, 'steps': {name: {**dict.fromkeys(gpu.ROW_KEYS), 'case': name, 'step': gpu.case_of(name)[0],
                                           'ms': ms} for name, ms in
                                    (('search warm-up fp32 native', 100.0), ('search 2nd fp32 native', 300.0),
                                     ('retrain fp32 fast', 50.0))}}
    gpu_report.summarize(res, {**bench.DEFAULTS, **GPU_TINY})
    p = res['protocol']['defaults']
    assert p['search_h'] == pytest.approx(133 * (23 * 100.0 + 27 * 300.0) / 3.6e6)
    assert p['retrain_h'] == pytest.approx(5 * 600 * 455 * 50.0 / 3.6e6)
    assert p['published_h'] == 108 and p['total_h'] == pytest.approx(p['search_h'] + p['retrain_h'])
    assert res['targets']['retrain ms/step'] == {'bound': 70, 'best': 50.0, 'case': 'retrain fp32 fast', 'met': None,
                                                 'by_case': {'retrain fp32 fast': 50.0}}


class FakeClock:
    """gpu.Clock for the tests: time moves only when a fake step says so (advance); a cap stops the step that passes
    its deadline, as the alarm would. The budget decisions are then the same on any machine, however loaded."""

    def __init__(self):
        self.t, self.deadlines = 0.0, []

    def now(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds
        if self.deadlines and self.t > min(self.deadlines):
            raise gpu.OverBudget()

    @contextlib.contextmanager
    def cap(self, seconds):
        self.deadlines.append(self.t + seconds)
        try:
            yield
        finally:
            self.deadlines.pop()


class TickClock(FakeClock):
    """A fake clock that moves 50 ms at each reading (the real steps do not move it)."""

    def now(self):
        self.advance(0.05)
        return self.t


def fake_steps(monkeypatch, clock, behaviour):
    """bench_gpu's steps replaced, per case: seconds a step takes on the clock, 'boom' (fails to build), 'interrupt',
    'broken' (a failed capture left CUDA unusable)."""
    def make_step(name, batch, cfg):
        what = behaviour[name]
        if what == 'boom':
            raise RuntimeError('boom')
        if what == 'interrupt':
            raise KeyboardInterrupt
        if what == 'broken':
            raise graphs.CaptureBroken('CUDA graphs: capturing the step failed and left the CUDA generator unusable')
        return lambda: clock.advance(what)
    monkeypatch.setattr(gpu, 'make_step', make_step)
    monkeypatch.setattr(gpu, 'fill_kernel_cache', lambda cfg, out, limit: out.update(first_use_s=1.0))
    return tuple(behaviour)


def run_fake(tmp_path, clock, cases, **settings):
    gpu.run({**bench.DEFAULTS, **GPU_TINY, 'GPU_CASES': cases, 'GPU_OUT': str(tmp_path / 'r.json'), **settings},
            clock=clock)
    return json.load(open(tmp_path / 'r.json'))


def test_gpu_bench_caps_each_part_notes_failures_and_skips_past_its_budget(tmp_path, monkeypatch):
    """A 4 s budget, MIN_LEFT_S 0.5: an instant case (10 timed steps of 1 ms: GPU_TIMED_S 0.01), a case that fails,
    a case of 1 s steps (first and warm-up steps kept, stopped in its timed steps at the budget's end: t = 4.012 s),
    then nothing more starts."""
    clock = FakeClock()
    cases = fake_steps(monkeypatch, clock, {'retrain fp32 fast': 0.001, 'search 2nd fp32 native': 'boom',
                                            'search warm-up fp32 native': 1.0, 'retrain bf16 fast': 0.001})
    monkeypatch.setattr(gpu, 'MIN_LEFT_S', 0.5)
    saved = run_fake(tmp_path, clock, cases, GPU_BUDGET_S=4.0)
    steps = saved['steps']
    assert steps['retrain fp32 fast']['ms'] == pytest.approx(1.0) and steps['retrain fp32 fast']['steps_timed'] == 10
    assert saved['notes'] == ['search 2nd fp32 native: RuntimeError: boom',
                              'search warm-up fp32 native: stopped at its cap of 4 s']
    warm = steps['search warm-up fp32 native']
    assert warm['first_s'] == 1.0 and warm['ms'] is None
    assert saved['skipped'] == [f'{name}: the budget of 4 s was spent' for name in
                                ('retrain bf16 fast', 'largest batch: retrain fp32 fast',
                                 'largest batch: search 2nd fp32 native')]
    assert saved['finished'] and saved['compile']['first_use_s'] == 1.0
    assert saved['targets']['first use compile s']['best'] == 1.0 and saved['targets']['retrain ms/step']['met'] is None


def test_gpu_bench_times_the_protocol_cases_first(tmp_path, monkeypatch):
    """The cases protocol.defaults needs run right after the graphed ones: with room for three 4 s cases, the
    search warm-up (last of them in CASES) is measured and the 1st-order search (before it in CASES) is skipped."""
    clock = FakeClock()
    cases = fake_steps(monkeypatch, clock, {'search 1st fp32 native': 1.0, 'search warm-up fp32 native': 1.0,
                                            'retrain fp32 fast': 1.0, 'search 2nd fp32 native': 1.0})
    monkeypatch.setattr(gpu, 'MIN_LEFT_S', 0.5)
    saved = run_fake(tmp_path, clock, cases, GPU_BUDGET_S=12.4)  # each: first, warm-up, 2 timed steps
    assert list(saved['steps']) == ['retrain fp32 fast', 'search 2nd fp32 native', 'search warm-up fp32 native']
    assert saved['skipped'][0] == 'search 1st fp32 native: the budget of 12 s was spent'
    assert saved['protocol']['defaults']['total_h'] > 0


def test_gpu_bench_stops_its_cuda_parts_after_a_broken_capture(tmp_path, monkeypatch):
    clock = FakeClock()
    cases = fake_steps(monkeypatch, clock, {'retrain fp32 fast': 'broken', 'search 2nd fp32 native': 0.001})
    saved = run_fake(tmp_path, clock, cases)
    assert saved['notes'] == ['retrain fp32 fast: CUDA graphs: capturing the step failed and left the CUDA generator '
                              'unusable']
    assert saved['skipped'][0] == 'search 2nd fp32 native: not run: a failed capture left CUDA unusable'
    assert saved['steps'] == {'retrain fp32 fast': saved['steps']['retrain fp32 fast']} and saved['finished']


def test_gpu_bench_interrupted_keeps_what_it_measured(tmp_path, monkeypatch):
    clock = FakeClock()
    cases = fake_steps(monkeypatch, clock, {'search 1st fp32 native': 0.001, 'search zeroth fp32 native': 'interrupt'})
    with pytest.raises(KeyboardInterrupt):
        run_fake(tmp_path, clock, cases)
    saved = json.load(open(tmp_path / 'r.json'))
    assert saved['steps']['search 1st fp32 native']['ms'] == pytest.approx(1.0)
    assert saved['steps']['search zeroth fp32 native']['ms'] is None and not saved['finished']


def graphed_step(clock, period=1, eager_s=0.1, replay_s=0.01):
    """A graphed step as StepGraphs runs it (3 eager warm-ups per graph, then capture and replays), whose eager calls
    take eager_s and replays replay_s on the clock; `period` > 1: a zeroth-order-like cycle of two graphs (the
    second at every period's end)."""
    calls = []

    def capture(fn, pool):
        return (lambda: clock.advance(replay_s)), [torch.zeros(1)]

    def fn(x):
        clock.advance(eager_s)
        return (x,)
    g = graphs.StepGraphs(fn, capture=capture)

    def step():
        calls.append(1)
        g(torch.zeros(1), tag='end' if period > 1 and len(calls) % period == 0 else '')
    step.graphs = g
    return step


@pytest.mark.parametrize('period', [1, 4])
def test_graphed_case_times_only_replays_after_every_capture(period):
    """A graphed case: its warm-ups and captures (both graphs of a zeroth-order-like cycle) before the timing, which
    holds only replays (10 ms each: no 100 ms eager call), at least MIN_REPLAYS of them (sized from a replay); the
    row records the graphs captured, the eager calls (none timed) and the memory source."""
    clock = FakeClock()
    step = graphed_step(clock, period)
    row = {'batch': 2, 'graphed': True}
    gpu_case.time_case(lambda: step, {'DEVICE': 'cpu', 'GPU_TIMED_S': 0.01}, row, lambda: None, 1e9, clock,
                       expected_graphs=2 if period > 1 else 1)
    assert row['ms'] == pytest.approx(10.0) and row['ms_halves'] == [pytest.approx(10.0)] * 2
    assert row['steps_timed'] == gpu_case.MIN_REPLAYS and row['first_s'] == pytest.approx(0.1)
    assert row['graphs_captured'] == (2 if period > 1 else 1) and row['eager_calls_timed'] == 0
    assert row['warmup_calls'] == 3 * row['graphs_captured'] and row['eager_fallback_calls'] == 0
    assert row['capture_failures'] == [] and row['capture_s'] >= 0
    assert row['peak_source'] == gpu_case.PEAK_SOURCE[True]


def test_graphed_case_records_a_failed_capture():
    clock = FakeClock()

    def broken(fn, pool):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    g = graphs.StepGraphs(lambda x: (clock.advance(0.1), x)[1:], capture=broken, log=lambda line: None)
    step = lambda: g(torch.zeros(1))  # noqa: E731
    step.graphs = g
    row = {'batch': 1, 'graphed': True}
    gpu_case.time_case(lambda: step, {'DEVICE': 'cpu', 'GPU_TIMED_S': 1.0}, row, lambda: None, 1e9, clock)
    assert row['capture_failures'] == ['the step [(1,)]: out of memory during the capture']
    assert row['graphs_captured'] == 0
    assert row['eager_calls_timed'] == row['steps_timed'] and row['ms'] == pytest.approx(100.0)


def test_steps_to_time_sizes_from_the_budget_and_graphed_minimum():
    assert gpu_case.steps_to_time({'graphed': False}, 0.5, 100.0, 8.0) == 16
    assert gpu_case.steps_to_time({'graphed': False}, 0.5, 0.4, 8.0) == 2  # near the cap: at least 2
    assert gpu_case.steps_to_time({'graphed': True}, 0.05, 100.0, 0.5) == 20  # at least MIN_REPLAYS
    assert gpu_case.steps_to_time({'graphed': True}, 0.5, 100.0, 0.5) == 4  # or MIN_REPLAY_S of replays
    assert gpu_case.steps_to_time({'graphed': False}, 1e-4, 100.0, 8.0) == gpu_case.MAX_TIMED


def test_profile_check_flags_a_replay_without_its_kernels():
    assert gpu_case.profile_check({'graphed': True, 'gpu_activities_per_step': 1, 'host_share': 0.99}).startswith(
        'the trace of a replay lists 1 GPU activities')
    assert gpu_case.profile_check({'graphed': True, 'gpu_activities_per_step': 900, 'host_share': 0.05}) is None
    assert gpu_case.profile_check({'graphed': False, 'gpu_activities_per_step': 3, 'host_share': 0.5}) is None


def test_alarm_is_held_back_during_a_capture():
    """A SIGALRM (a part's cap) that comes during a capture is delivered after it, not inside it."""
    events = []

    def capture(fn, pool):
        signal.raise_signal(signal.SIGALRM)
        events.append('capture end')
        return (lambda: None), [torch.zeros(1)]

    def on_alarm(signum, frame):
        events.append('alarm')
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        graphs.StepGraphs(lambda x: (x,), warmup=0, capture=capture)(torch.zeros(1))
    finally:
        signal.signal(signal.SIGALRM, old)
    assert events == ['capture end', 'alarm']


def test_first_use_is_stopped_at_its_cap():
    """The compiling workers are stopped at the cap (none left running) and the JSON says so."""
    out = {}
    gpu.fill_kernel_cache({**bench.DEFAULTS, **GPU_TINY}, out, 0.5, workers=2)
    assert out['note'].startswith('stopped at its cap of 0 s: 0 of 52 binaries') and out['first_use_s'] is None
    assert out['first_use'] == 'over 0 s' and out['first_use_at_least_s'] == out['process_s'] and out['workers'] == 2
    res = {'compile': out, 'steps': {}}
    gpu_report.summarize(res, {**bench.DEFAULTS, **GPU_TINY, 'DEVICE': 'cuda'})  # as on a GPU: met or not
    assert res['targets']['first use compile s']['best'] == out['process_s'] and res['targets']['first use compile s'][
        'met'] is True  # took at least that long, under the 60 s bound
    res['compile'] = {'first_use_s': None, 'first_use_at_least_s': 120.3}  # stopped at a cap of 120 s
    gpu_report.summarize(res, {**bench.DEFAULTS, **GPU_TINY, 'DEVICE': 'cuda'})
    assert res['targets']['first use compile s']['met'] is False and res['targets']['retrain ms/step']['met'] is None


def test_busy_time_is_the_union_of_intervals():
    assert gpu_case.busy_ms([(0, 10_000_000), (5_000_000, 15_000_000), (20_000_000, 30_000_000),
                              (21_000_000, 22_000_000)]) == 25.0
    assert gpu_case.busy_ms([]) == 0.0


def test_activity_spans_read_a_profiler_trace():
    """The trace reading of the host share, on CPU activities (the GPU run reads the CUDA ones the same way)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(256, 256)
    t0 = time.perf_counter_ns()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x @ x).exp()
    wall = time.perf_counter_ns() - t0
    spans = gpu_case.activity_spans(prof, DeviceType.CPU)
    assert len(spans) >= 2 and all(e >= s for s, e in spans)
    assert 0 < gpu_case.busy_ms(spans) <= wall / 1e6 and gpu_case.activity_spans(prof, DeviceType.CUDA) == []



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
                           '--GPU_COMPILE_WORKERS=1', '--GPU_BUDGET_S=40'], env={**os.environ, 'OMP_NUM_THREADS': '1'},
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
    assert gpu_case.top_kernels(prof, n=2) == [['dw_fwd', 5.0], ['bn', 1.0]]


def test_quiet_stderr_drops_only_the_profilers_lines(capfd):
    with step_times.quiet_stderr():
        os.write(2, b'USDT:2026-12-08 00:44:22 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n')
        os.write(2, b'a real warning\n')
    assert capfd.readouterr().err == 'a real warning\n'
