"""BENCH='gpu': one command for a GPU session that measures every target of the speed issues (#15, #18) within a time
budget and writes a results JSON as it goes (python bench.py --BENCH=gpu; settings GPU_* and PROTOCOL_* in bench.py).

Parts, in order of importance, each under its own cap; a part still running at its cap is stopped (SIGALRM, between
Python statements: a backward pass in progress finishes first) and noted, and whatever was measured before stays in
the file, which is rewritten after every measurement:
1. first use, capped at GPU_COMPILE_S (60 s; outside GPU_BUDGET_S, so it takes no time from the steps): a subprocess
   with an empty Triton cache runs the first retrain and search steps with the Triton kernels (seconds of each first
   step, or "over 60 s"; distinct kernel binaries compiled). The main process then uses that cache.
2. steps (CASES) while GPU_BUDGET_S lasts: the whole-step CUDA graphs first (graphs.py), then the check that a graphed
   step equals the eager one after 5 steps (benchmarks/graph_check.py, 'graph_check'), then today's eager steps with
   the Triton kernels on and off, bf16 autocast, recomputed cells: ms/step (mean over the timed steps, after the first
   steps, and for graphed cases the capture) and peak memory; host syncs in one step (torch.cuda.set_sync_debug_mode)
   and, for the cases in PROFILED, the host share of a step (DEFINITIONS) and the top kernels by GPU time.
3. the largest batch in MEMORY_GB (step_times.largest_batch) of the retrain and the 2nd-order search.
4. the full protocol's time estimated from the measured steps, beside the published code's.
On a CPU it runs too (with small settings, for the tests): the CUDA-only numbers are null, the graphed cases skipped.
"""
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch

import dwconv3d
import graphs
import utils
from benchmarks import gpu_report as report
from benchmarks import step_times

# (step, dtype, Triton kernels, cells recomputed, CUDA graphs), in the order they are timed while the budget lasts:
# the whole-step CUDA graphs first (graphs.py, the scripts' CUDA_GRAPHS; Triton kernels on), then the eager steps as
# the scripts run them today (train_3D_continuation: Triton kernels on; train_search: off) and the search with the
# Triton kernels on, then bf16 autocast, then the graphed search on torch's kernels, recomputed cells, the rest.
# 'search warm-up' is the weight step alone of the search's warm-up epochs.
CASES = (('retrain', 'fp32', True, False, True), ('search 2nd', 'fp32', True, False, True),
         ('search 1st', 'fp32', True, False, True), ('search zeroth', 'fp32', True, False, True),
         ('search warm-up', 'fp32', True, False, True),
         ('retrain', 'fp32', True, False, False), ('search 2nd', 'fp32', False, False, False),
         ('search 2nd', 'fp32', True, False, False), ('search 1st', 'fp32', False, False, False),
         ('search 1st', 'fp32', True, False, False), ('search zeroth', 'fp32', False, False, False),
         ('search zeroth', 'fp32', True, False, False), ('search warm-up', 'fp32', False, False, False),
         ('retrain', 'bf16', True, False, True), ('search 2nd', 'bf16', True, False, True),
         ('retrain', 'bf16', True, False, False), ('search 2nd', 'bf16', False, False, False),
         ('search 2nd', 'fp32', False, False, True), ('retrain', 'fp32', False, False, False),
         ('retrain', 'fp32', True, True, False), ('search 2nd', 'fp32', False, True, False),
         ('search 1st', 'bf16', True, False, True), ('search zeroth', 'bf16', False, False, False),
         ('retrain', 'bf16', True, True, False), ('search 2nd', 'bf16', False, True, False))
FIRST_CASES = 18  # CASES timed before the largest-batch fits, the rest after them
PROFILED = ('retrain fp32 fast graphed', 'search 2nd fp32 fast graphed', 'search 1st fp32 fast graphed',
            'retrain fp32 fast', 'search 2nd fp32 native', 'search 2nd fp32 fast', 'search 1st fp32 native')
FITS = ('retrain fp32 fast', 'retrain fp32 fast ckpt', 'search 2nd fp32 native', 'search 2nd fp32 native ckpt')
# first steps in an empty Triton cache: the default retrain and the search with the Triton kernels, fp32 (the 52
# binaries of benchmarks.kernels.specializations; bf16 compiles its own when its cases first run)
COMPILED = ('retrain fp32 fast', 'search 2nd fp32 fast')
TOP_KERNELS = 12  # rows of the top-kernels table of a profiled case
CAP_S = {'search 2nd': 75, 'fit search 2nd': 60, 'other': 40}  # seconds per part at most (first use: GPU_COMPILE_S)
MIN_LEFT_S = 5  # a part is started only with this much of the budget left
MAX_TIMED = 200  # timed steps per case at most
ROW_KEYS = ('case', 'step', 'batch', 'dtype', 'fast_kernels', 'checkpoint_cells', 'build_s', 'first_s', 'peak_first_gb',
            'ms', 'ms_halves', 'samples_s', 'peak_gb', 'steps_timed', 'syncs_per_step', 'sync_sites', 'host_share',
            'gpu_busy_ms', 'gpu_activities_per_step', 'profiled_ms', 'graphed', 'capture_s',
            'top_kernels')  # every row has them all (None: not measured)


class OverBudget(Exception):
    """A part ran past its cap."""


@contextlib.contextmanager
def cap(seconds):
    """Raise OverBudget in the main thread after `seconds` (nothing is capped in other threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise OverBudget()
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def case_name(step, dtype, fast, ckpt, graphed=False):
    return f'{step} {dtype} {"fast" if fast else "native"}{" ckpt" if ckpt else ""}{" graphed" if graphed else ""}'


def case_names():
    return [case_name(*c) for c in CASES]


def case_of(name):
    return next(c for c in CASES if case_name(*c) == name)


def make_step(name, batch, cfg):
    """The step function of a case (bench_steps' builders) at a batch; sets the kernel switch."""
    step, dtype, fast, ckpt, graphed = case_of(name)
    dwconv3d.set_fast_kernels(fast)
    torch.manual_seed(0)
    c = {**cfg, 'AMP': dtype == 'bf16'}
    if step == 'retrain':
        return step_times.retrain_step(batch, c, ckpt, graphed)
    if step == 'search warm-up':
        return step_times.search_step('first', batch, c, ckpt, arch=False, graphed=graphed)
    return step_times.search_step({'search 2nd': 'second', 'search 1st': 'first'}.get(step, 'zeroth'), batch, c, ckpt,
                                  graphed=graphed)


def batch_of(name, cfg):
    return cfg['RETRAIN_BATCH'] if name.startswith('retrain') else cfg['SEARCH_BATCH']


def _sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)


def _timed(step, device):
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def time_case(name, cfg, row, save, deadline):
    """Fill `row` (saved after each phase): build, first and second step, timed steps, syncs, host share."""
    device, cuda = cfg['DEVICE'], str(cfg['DEVICE']).startswith('cuda')
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step = make_step(name, row['batch'], cfg)
    row['build_s'] = time.perf_counter() - t0
    row['first_s'] = _timed(step, device)
    save()
    second = _timed(step, device)
    if row['graphed']:  # the 3rd call is the last eager warm-up, the 4th captures (graphs.WARMUP): both untimed
        for _ in range(graphs.WARMUP - 1):
            _timed(step, device)
        row['capture_s'] = _timed(step, device)
    row['peak_first_gb'] = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    # timed steps: about GPU_TIMED_S of them (at least 2, at most MAX_TIMED), timed as two halves (their spread
    # shows the noise), one more warm-up step first; fewer when the part's cap is near
    left = deadline - time.monotonic() - 2 * second
    n = max(2, min(MAX_TIMED, int(min(cfg['GPU_TIMED_S'], left) / max(second, 1e-6))))
    ms1, peak1, _ = step_times.time_steps(lambda: step, device, 1, n // 2)
    ms2, peak2, _ = step_times.time_steps(lambda: step, device, 0, n - n // 2)
    ms = (ms1 * (n // 2) + ms2 * (n - n // 2)) / n
    row.update(ms=ms, ms_halves=[ms1, ms2], samples_s=1e3 * row['batch'] / ms,
               peak_gb=max(peak1, peak2) if cuda else None, steps_timed=n)
    save()
    if cuda:
        row['syncs_per_step'], row['sync_sites'] = count_syncs(step, device)
        save()
    if cuda and name in PROFILED:
        row.update(host_share_of(step, device, ms))
        save()


def count_syncs(step, device):
    """(host syncs in one step, up to 8 'file:line' where they were called) from CUDA's sync debug mode."""
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    syncs = [w for w in seen if 'synchronizing' in str(w.message)]
    return len(syncs), sorted({f'{os.path.basename(w.filename)}:{w.lineno}' for w in syncs})[:8]


def busy_ms(spans):
    """Length of the union of [start, end) intervals (ns), in ms."""
    total, end = 0, None
    for s, e in sorted(spans):
        if end is None or s >= end:
            total, end = total + e - s, e
        elif e > end:
            total, end = total + e - end, e
    return total / 1e6


def activity_spans(prof, device_type):
    """[start, end) in ns of every activity on devices of a type in a finished torch.profiler trace."""
    return [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
            if e.device_type() == device_type]


def host_share_of(step, device, step_ms):
    """GPU busy time of one traced step (union of its GPU activities) and the host share (DEFINITIONS)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    wall_ms = 1e3 * (time.perf_counter() - t0)
    spans = activity_spans(prof, DeviceType.CUDA)
    busy = busy_ms(spans)
    return {'gpu_busy_ms': busy, 'gpu_activities_per_step': len(spans), 'profiled_ms': wall_ms,
            'host_share': max(0.0, 1 - busy / step_ms), 'top_kernels': top_kernels(prof)}


def top_kernels(prof, n=TOP_KERNELS):
    """[[kernel name, GPU ms in the traced step], ...]: the n kernels (by name) with the most GPU time."""
    from torch.autograd import DeviceType
    totals = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            totals[e.name()] = totals.get(e.name(), 0) + e.duration_ns() / 1e6
    return [[name[:120], ms] for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:n]]


def compile_probe(cfg_json):
    """In a subprocess with an empty TRITON_CACHE_DIR: the first step of each COMPILED case, one JSON line each."""
    cfg = json.loads(cfg_json)
    torch.backends.cudnn.benchmark = True
    for name in COMPILED:
        step = make_step(name, batch_of(name, cfg), cfg)
        s = _timed(step, cfg['DEVICE'])
        binaries = kernel_binaries() if dwconv3d.triton is not None and cfg['DEVICE'].startswith('cuda') else None
        print(json.dumps({'case': name, 'first_s': s, 'kernel_binaries_so_far': sum(binaries.values())
                          if binaries is not None else None}), flush=True)
        del step
        gc.collect()


def kernel_binaries(cache=None):
    """{kernel name: compiled binaries} in a Triton cache folder (default TRITON_CACHE_DIR); None without one."""
    cache = cache or os.environ.get('TRITON_CACHE_DIR')
    if not cache or not os.path.isdir(cache):
        return None
    counts = {}
    for _, _, files in os.walk(cache):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext in ('.cubin', '.hsaco'):
                counts[stem] = counts.get(stem, 0) + 1
    return counts


def measure_compile(cfg, out, limit_s):
    """First use in a fresh Triton cache (a subprocess, stopped at limit_s); the main process then uses that cache."""
    cache = tempfile.mkdtemp(prefix='triton-cache-')
    probe = {k: cfg[k] for k in ('DEVICE', 'SEARCH_C', 'SEARCH_LAYERS', 'RETRAIN_C', 'RETRAIN_LAYERS', 'CUBE',
                                 'SEARCH_BATCH', 'RETRAIN_BATCH')}
    cmd = [sys.executable, '-c', 'import sys; from benchmarks import gpu; gpu.compile_probe(sys.argv[1])',
           json.dumps(probe)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=utils.REPO, env={**os.environ, 'TRITON_CACHE_DIR': cache}, capture_output=True,
                              timeout=limit_s)
        stdout, err = done.stdout, done.stderr if done.returncode else b''
        out['note'] = None if not done.returncode else f'the subprocess failed (exit {done.returncode})'
    except subprocess.TimeoutExpired as e:
        stdout, err = e.stdout or b'', b''
        out['note'] = f'stopped at its cap of {limit_s:.0f} s: the cases after the last finished one were not compiled'
    out['process_s'] = time.perf_counter() - t0
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith('{')]
    out['cases'] = {r.pop('case'): r for r in lines}
    complete = len(lines) == len(COMPILED)
    out['first_use_s'] = sum(r['first_s'] for r in lines) if complete else None
    out['first_use_at_least_s'] = None if complete else out['process_s']  # stopped or failed: more than this
    out['first_use'] = (f'{out["first_use_s"]:.1f} s' if complete else
                        f'over {limit_s:.0f} s' if 'stopped' in (out['note'] or '') else 'failed')
    binaries = kernel_binaries(cache) if dwconv3d.triton is not None and str(cfg['DEVICE']).startswith('cuda') else None
    out['kernel_binaries'] = sum(binaries.values()) if binaries is not None else None
    out['kernels'] = binaries
    if err:
        out['stderr_tail'] = err.decode(errors='replace')[-2000:]
    os.environ['TRITON_CACHE_DIR'] = cache  # later first steps reuse what was compiled


def run_part(name, limit_s, fn, res, save, started, budget):
    """Run fn() under its cap unless the budget is spent; notes a stop, an out-of-memory or another error."""
    left = budget - (time.monotonic() - started)
    if left < MIN_LEFT_S:
        res['skipped'].append(f'{name}: the budget of {budget:.0f} s was spent')
        save()
        return
    limit = min(limit_s, left)
    print(f'  {name} (at most {limit:.0f} s)', flush=True)
    try:
        with cap(limit):
            fn(time.monotonic() + limit)
    except OverBudget:
        res['notes'].append(f'{name}: stopped at its cap of {limit:.0f} s')
    except torch.cuda.OutOfMemoryError as e:
        res['notes'].append(f'{name}: out of memory ({str(e).partition(chr(10))[0][:200]})')
    except Exception as e:  # one failing part must not cost the rest of the session: noted, the run goes on
        res['notes'].append(f'{name}: {type(e).__name__}: {str(e).partition(chr(10))[0][:300]}')
    finally:
        gc.collect()
        if str(res['meta']['device']).startswith('cuda'):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        save()


def parts(cfg, res, save):
    """(name, cap in s, fn(deadline)) of every part, in order of importance."""
    def step_part(name):
        def fn(deadline):
            step, dtype, fast, ckpt, graphed = case_of(name)
            row = res['steps'][name] = {**dict.fromkeys(ROW_KEYS), 'case': name, 'step': step, 'dtype': dtype,
                                        'fast_kernels': fast, 'checkpoint_cells': ckpt, 'graphed': graphed,
                                        'batch': batch_of(name, cfg)}
            time_case(name, cfg, row, save, deadline)
        return name, CAP_S['search 2nd'] if name.startswith('search 2nd') else CAP_S['other'], fn

    def fit_part(name):
        def fn(deadline):
            res['largest_batch'][name] = None
            fit = step_times.largest_batch(lambda b: make_step(name, b, cfg), batch_of(name, cfg), cfg)
            res['largest_batch'][name] = fit if isinstance(fit, int) else None
        return f'largest batch: {name}', CAP_S['fit search 2nd'] if 'search' in name else CAP_S['other'], fn

    def check_part():
        def fn(deadline):
            from benchmarks import graph_check
            for kind in ('retrain', 'first', 'second', 'exact'):
                res['graph_check'][kind] = None
                res['graph_check'][kind] = graph_check.compare(kind, cfg['DEVICE'])
                save()
        return 'graphed step == eager step (5 steps, benchmarks/graph_check.py)', CAP_S['other'], fn

    names = [case_name(*c) for c in CASES if not cfg['GPU_CASES'] or case_name(*c) in cfg['GPU_CASES']]
    if not str(cfg['DEVICE']).startswith('cuda'):  # CUDA graphs need CUDA
        res['skipped'] += [f'{n}: CUDA graphs need a CUDA device' for n in names if case_of(n)[4]]
        names = [n for n in names if not case_of(n)[4]]
    first = [case_name(*c) for c in CASES[:FIRST_CASES]]
    graphed = [n for n in names if n in first and case_of(n)[4] and case_of(n)[1] == 'fp32']
    check = [check_part()] if any(case_of(n)[4] for n in names) else []
    return ([('first use (empty Triton cache)', cfg['GPU_COMPILE_S'] + 10,  # the subprocess stops 10 s before
              lambda deadline: measure_compile(cfg, res['compile'], max(1.0, deadline - time.monotonic() - 10)))]
            + [step_part(n) for n in graphed] + check
            + [step_part(n) for n in names if n in first and n not in graphed]
            + [fit_part(n) for n in FITS if not cfg['GPU_CASES'] or n in cfg['GPU_CASES']]
            + [step_part(n) for n in names if n not in first])


def run(cfg):
    """Every part within GPU_BUDGET_S; the results JSON (GPU_OUT, and $OUT/ when set) is rewritten after each
    measurement. Returns the results."""
    started = time.monotonic()
    stamp = time.strftime('%Y%m%d-%H%M%S')
    paths = [cfg['GPU_OUT'] or os.path.join('runs', f'bench_gpu-{stamp}.json')]
    if os.environ.get('OUT'):
        paths.append(os.path.join(os.environ['OUT'], os.path.basename(paths[0])))
    device = cfg['DEVICE']
    res = {'meta': {'device': str(device), 'gpu': torch.cuda.get_device_name(device)
                    if str(device).startswith('cuda') else None, 'torch': torch.__version__,
                    'cuda': torch.version.cuda, 'triton': getattr(dwconv3d.triton, '__version__', None),
                    'git': utils.git_commit(), 'command': 'python bench.py ' + ' '.join(sys.argv[1:]),
                    'started': stamp, 'settings': {k: v for k, v in cfg.items() if not k.startswith('METHODS')}},
           'definitions': report.DEFINITIONS, 'compile': {}, 'graph_check': {}, 'steps': {}, 'largest_batch': {},
           'protocol': {}, 'targets': {}, 'notes': [], 'skipped': [], 'finished': False, 'elapsed_s': 0.0}

    def save():
        report.summarize(res, cfg)
        res['elapsed_s'] = time.monotonic() - started
        clean = report.json_safe(res)
        for path in paths:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            utils.save_json_atomic(path, clean)
    torch.backends.cudnn.benchmark = True
    print(f'results: {", ".join(paths)} (rewritten after each measurement)', flush=True)
    try:
        (name, limit, fn), *rest = parts(cfg, res, save)
        # the first use has its own cap (GPU_COMPILE_S), outside the steps' budget: it takes no time from them
        run_part(name, limit, fn, res, save, time.monotonic(), limit + MIN_LEFT_S)
        steps_started = time.monotonic()
        for name, limit, fn in rest:
            run_part(name, limit, fn, res, save, steps_started, cfg['GPU_BUDGET_S'])
        res['finished'] = True
    finally:  # also when interrupted: what was measured is on disk
        dwconv3d.set_fast_kernels(True)
        if res['compile'].get('kernel_binaries') is not None:
            res['compile']['kernel_binaries_after_all'] = sum(kernel_binaries().values())
        save()
    print(report.summary_table(res))
    return {**res, 'paths': paths}
