"""BENCH='gpu': one command for a GPU session that measures every target of the speed issues (#15, #18) within a time
budget and writes a results JSON as it goes (python bench.py --BENCH=gpu; settings GPU_* and PROTOCOL_* in bench.py).

Parts, in order of importance, each under its own cap; a part still running at its cap is stopped (SIGALRM, between
Python statements: a backward pass in progress finishes first) and noted, and whatever was measured before stays in
the file, which is rewritten after every measurement:
1. first use, capped at GPU_COMPILE_S (60 s; outside GPU_BUDGET_S, so it takes no time from the steps): the Triton
   binaries of the default networks (fp32) compiled into an empty cache by GPU_COMPILE_WORKERS processes at once
   (first_use_s, kernel_binaries; "over 60 s" when stopped). The steps then load them from that cache.
2. steps (CASES) while GPU_BUDGET_S lasts: the whole-step CUDA graphs first (graphs.py), then the check that a graphed
   step equals the eager one after 5 steps (benchmarks/graph_check.py, 'graph_check'), then the cases the protocol
   estimate needs, today's eager steps with the Triton kernels on and off, bf16 autocast, recomputed cells: ms/step
   (benchmarks/gpu_case.py: a graphed case times only replays, after all its graphs were captured, and records its
   captures, eager calls and failures), peak memory (graphed: with the graphs' pool), host syncs in one step and,
   for the cases in PROFILED, the host share of a step (DEFINITIONS) and the top kernels by GPU time.
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

import torch

import dwconv3d
import graphs
import utils
from benchmarks import gpu_case, step_times
from benchmarks import gpu_report as report

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
# what protocol.defaults needs (the scripts' defaults: retrain, search and its warm-up), timed right after the graphed
# cases and their check
PROTOCOL_CASES = ('retrain fp32 fast', 'search 2nd fp32 native', 'search warm-up fp32 native')
PROFILED = ('retrain fp32 fast graphed', 'search 2nd fp32 fast graphed', 'search 1st fp32 fast graphed',
            'retrain fp32 fast', 'search 2nd fp32 native', 'search 2nd fp32 fast', 'search 1st fp32 native')
FITS = ('retrain fp32 fast', 'retrain fp32 fast ckpt', 'search 2nd fp32 native', 'search 2nd fp32 native ckpt')
CAP_S = {'search 2nd': 75, 'fit search 2nd': 60, 'other': 40}  # seconds per part at most (first use: GPU_COMPILE_S)
MIN_LEFT_S = 5  # a part is started only with this much of the budget left
ROW_KEYS = ('case', 'step', 'batch', 'dtype', 'fast_kernels', 'checkpoint_cells', 'build_s', 'first_s', 'peak_first_gb',
            'ms', 'ms_halves', 'samples_s', 'peak_gb', 'reserved_gb', 'peak_source', 'steps_timed', 'syncs_per_step',
            'sync_sites', 'host_share', 'gpu_busy_ms', 'gpu_activities_per_step', 'profiled_ms', 'profile_check',
            'graphed', 'settle_calls', 'graphs_captured', 'warmup_calls', 'eager_fallback_calls', 'replays',
            'eager_calls_timed', 'capture_s', 'capture_failures', 'top_kernels')  # every row has them all (None: not
# measured)


class OverBudget(Exception):
    """A part ran past its cap."""


class Clock:
    """What the budget decisions read: the time (monotonic s) and a cap on a part. Tests inject a fake one whose
    steps advance it, so that which part runs, is stopped or is skipped never depends on the machine's load."""

    @staticmethod
    def now():
        return time.monotonic()

    @staticmethod
    def cap(seconds):
        return cap(seconds)


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


def fill_kernel_cache(cfg, out, limit_s, workers=None):
    """First use: compile the Triton binaries of the default search and retrain networks (fp32; benchmarks.kernels
    .launch_plans) into a fresh TRITON_CACHE_DIR, in `workers` processes at once (one group of binaries each),
    stopped at limit_s; the steps then load them from that cache. On a CPU they are compiled for sm_90 (Triton's own
    ptxas; what a GPU machine would compile). Fills out: first_use_s, kernel_binaries, and the workers' times."""
    from benchmarks import kernels
    if dwconv3d.triton is None:
        out.update(first_use=None, note='triton is not installed: nothing to compile')
        return
    t_plan = time.perf_counter()  # the cap counts from here: tracing the plans is part of the part
    calls = kernels.default_conv_calls()
    plans = kernels.launch_plans(calls['search'] + calls['retrain'])
    out['plan_s'] = time.perf_counter() - t_plan
    workers = max(1, min(len(plans), workers or cfg['GPU_COMPILE_WORKERS']))
    groups = [plans[i::workers] for i in range(workers)]
    cache = tempfile.mkdtemp(prefix='triton-cache-')
    code = 'import sys; from benchmarks import kernels; kernels.compile_worker(sys.argv[1], sys.argv[2])'
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, '-c', code, json.dumps(g), str(cfg['DEVICE'])], cwd=utils.REPO,
                              env={**os.environ, 'TRITON_CACHE_DIR': cache}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) for g in groups]

    def stop(p):  # the worker and the ptxas it runs (which holds its output open)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    results, errors, stopped = [], [], False
    out.update(plans=len(plans), workers=workers, first_use_s=None, first_use='unfinished', kernel_binaries=None,
               note='stopped before the workers were done')  # (kept if the part's own cap stops it)
    try:
        for p in procs:
            try:
                stdout, stderr = p.communicate(timeout=max(0.1, limit_s - (time.perf_counter() - t_plan)))
            except subprocess.TimeoutExpired:
                stopped = True
                stop(p)
                stdout, stderr = p.communicate()
            results += [json.loads(line) for line in stdout.decode().splitlines() if line.startswith('{')]
            if p.returncode and not stopped:
                errors.append(stderr.decode(errors='replace')[-1500:])
    finally:  # stopped, failed or interrupted: no worker outlives the part (they would slow the timed steps)
        for p in procs:
            if p.poll() is None:
                stop(p)
                p.wait()
        out['process_s'] = out['first_use_at_least_s'] = time.perf_counter() - t0
        os.environ['TRITON_CACHE_DIR'] = cache  # the steps load what was compiled
    wall = time.perf_counter() - t0
    binaries = kernel_binaries(cache)
    out.update(plans=len(plans), workers=workers, process_s=wall, worker_compile_s=[r['compile_s'] for r in results],
               kernel_binaries=sum(binaries.values()) if binaries is not None else None, kernels=binaries,
               target='this GPU' if str(cfg['DEVICE']).startswith('cuda') else 'sm_90, compiled on the CPU',
               first_use_s=None if stopped or errors else wall, first_use_at_least_s=wall if stopped else None,
               note=(f'stopped at its cap of {limit_s:.0f} s: {out_of(binaries)} of {len(plans)} binaries compiled'
                     if stopped else f'{len(errors)} worker(s) failed' if errors else None))
    out['first_use'] = (f'{wall:.1f} s' if out['first_use_s'] is not None else
                        f'over {limit_s:.0f} s' if stopped else 'failed')
    if errors:
        out['stderr_tail'] = errors[0]


def out_of(binaries):
    return sum(binaries.values()) if binaries else 0


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


def run_part(name, limit_s, fn, res, save, started, budget, clock):
    """Run fn(deadline) under its cap unless the budget is spent; notes a stop, an out-of-memory or another error."""
    left = budget - (clock.now() - started)
    if left < MIN_LEFT_S:
        res['skipped'].append(f'{name}: the budget of {budget:.0f} s was spent')
        save()
        return
    limit = min(limit_s, left)
    print(f'  {name} (at most {limit:.0f} s)', flush=True)
    try:
        with clock.cap(limit):
            fn(clock.now() + limit)
    except OverBudget:
        res['notes'].append(f'{name}: stopped at its cap of {limit:.0f} s')
    except graphs.CaptureBroken as e:  # the eager fallback would fail too: the later CUDA parts are skipped
        res['notes'].append(f'{name}: {e}')
        res['broken'] = 'not run: a failed capture left CUDA unusable'

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


def parts(cfg, res, save, clock):
    """(name, cap in s, fn(deadline)) of every part, in order of importance: first use, the graphed fp32 cases, their
    check, the cases the protocol estimate needs (PROTOCOL_CASES), the other first cases, the fits, the rest."""
    cuda = str(cfg['DEVICE']).startswith('cuda')

    def step_part(name):
        def fn(deadline):
            step, dtype, fast, ckpt, graphed = case_of(name)
            row = res['steps'][name] = {**dict.fromkeys(ROW_KEYS), 'case': name, 'step': step, 'dtype': dtype,
                                        'fast_kernels': fast, 'checkpoint_cells': ckpt, 'graphed': graphed,
                                        'batch': batch_of(name, cfg)}
            made = gpu_case.time_case(lambda: make_step(name, row['batch'], cfg), cfg, row, save, deadline, clock,
                                      expected_graphs=2 if step == 'search zeroth' else 1)
            if cuda and name in PROFILED:
                row.update(gpu_case.host_share_of(made, cfg['DEVICE'], row['ms'], clock))
                row['profile_check'] = gpu_case.profile_check(row)
                save()
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
    if not cuda:  # CUDA graphs need CUDA
        res['skipped'] += [f'{n}: CUDA graphs need a CUDA device' for n in names if case_of(n)[4]]
        names = [n for n in names if not case_of(n)[4]]
    first = [case_name(*c) for c in CASES[:FIRST_CASES]]
    graphed = [n for n in names if n in first and case_of(n)[4] and case_of(n)[1] == 'fp32']
    protocol = [n for n in PROTOCOL_CASES if n in names]
    check = [check_part()] if any(case_of(n)[4] for n in names) else []
    return ([('first use (kernel cache filled)', cfg['GPU_COMPILE_S'] + 10,  # the workers stop 10 s before
              lambda deadline: fill_kernel_cache(cfg, res['compile'], max(1.0, deadline - clock.now() - 10)))]
            + [step_part(n) for n in graphed] + check + [step_part(n) for n in protocol]
            + [step_part(n) for n in names if n in first and n not in graphed and n not in protocol]
            + [fit_part(n) for n in FITS if not cfg['GPU_CASES'] or n in cfg['GPU_CASES']]
            + [step_part(n) for n in names if n not in first and n not in protocol])


def run(cfg, clock=None):
    """Every part within GPU_BUDGET_S; the results JSON (GPU_OUT, and $OUT/ when set) is rewritten after each
    measurement. clock: the budget's clock and caps (Clock; tests inject a fake one). Returns the results."""
    clock = clock or Clock()
    started = clock.now()
    stamp = time.strftime('%Y%m%d-%H%M%S')
    paths = [cfg['GPU_OUT'] or os.path.join('runs', f'bench_gpu-{stamp}.json')]
    if os.environ.get('OUT'):
        paths.append(os.path.join(os.environ['OUT'], os.path.basename(paths[0])))
    device = cfg['DEVICE']
    cuda = str(device).startswith('cuda')
    res = {'meta': {'device': str(device), 'gpu': torch.cuda.get_device_name(device) if cuda else None,
                    'torch': torch.__version__, 'cuda': torch.version.cuda,
                    'triton': getattr(dwconv3d.triton, '__version__', None), 'git': utils.git_commit(),
                    'command': 'python bench.py ' + ' '.join(sys.argv[1:]), 'started': stamp,
                    'profiler': gpu_case.init_profiler_for_graphs() if cuda else None,
                    'settings': {k: v for k, v in cfg.items() if not k.startswith('METHODS')}},
           'definitions': report.DEFINITIONS, 'compile': {}, 'graph_check': {}, 'steps': {}, 'largest_batch': {},
           'protocol': {}, 'targets': {}, 'notes': [], 'skipped': [], 'finished': False, 'elapsed_s': 0.0}

    def save():
        report.summarize(res, cfg)
        res['elapsed_s'] = clock.now() - started
        clean = report.json_safe(res)
        for path in paths:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            utils.save_json_atomic(path, clean)
    torch.backends.cudnn.benchmark = True
    print(f'results: {", ".join(paths)} (rewritten after each measurement)', flush=True)
    try:
        (name, limit, fn), *rest = parts(cfg, res, save, clock)
        # the first use has its own cap (GPU_COMPILE_S), outside the steps' budget: it takes no time from them
        run_part(name, limit, fn, res, save, clock.now(), limit + MIN_LEFT_S, clock)
        steps_started = clock.now()
        for name, limit, fn in rest:
            if res.get('broken'):
                res['skipped'].append(f'{name}: {res["broken"]}')
                continue
            run_part(name, limit, fn, res, save, steps_started, cfg['GPU_BUDGET_S'], clock)
        res['finished'] = True
    finally:  # also when interrupted: what was measured is on disk
        dwconv3d.set_fast_kernels(True)
        after = kernel_binaries() if res['compile'].get('kernel_binaries') is not None else None
        if after is not None:
            res['compile']['kernel_binaries_after_all'] = sum(after.values())
        save()
    print(report.summary_table(res))
    return {**res, 'paths': paths}
