"""The report of BENCH='gpu' (benchmarks/gpu.py): definitions, the issue's targets against the measured numbers, the
full-protocol estimate, strict JSON and the closing table."""
import math

import train_3D_continuation
import train_search

PUBLISHED_H = 108  # the published code's full protocol (search + 5 folds x 600 epochs), hours (issue #15)
TARGETS = (  # issue #15: (name, step (or 'profiled': any profiled case, 'compile'), key, upper bound)
    ('search 2nd order ms/step', 'search 2nd', 'ms', 675), ('search 1st order ms/step', 'search 1st', 'ms', 220),
    ('retrain ms/step', 'retrain', 'ms', 70), ('search 2nd order peak GB', 'search 2nd', 'peak_gb', 9.75),
    ('retrain peak GB', 'retrain', 'peak_gb', 10.6), ('host share of a step', 'profiled', 'host_share', 0.10),
    ('first use compile s', 'compile', 'first_use_s', 60))
DEFINITIONS = {
    'ms': 'wall time per step, mean over steps_timed steps (host clock around the loop, synchronized at both ends), '
          'after the first step and one warm-up step; a graphed case times only replays, after every graph of the '
          'step was captured (settle_calls: the eager warm-ups and captures before; eager_calls_timed: eager calls '
          'inside the timing, 0 unless a capture failed), at least 20 replays or 2 s of them; ms_halves: the means '
          'of the first and second half (noise)',
    'peak_gb': 'torch.cuda.max_memory_allocated (1e9 bytes), peak_source says over what: the timed steps (eager), or '
               'the captures and replays (graphed: the graphs\' private pool is allocated while a capture runs); '
               'reserved_gb: torch.cuda.memory_reserved after the timing; peak_first_gb: over the building and the '
               'first step',
    'syncs_per_step': 'host syncs in one step after the timed ones (torch.cuda.set_sync_debug_mode("warn") warnings)',
    'host_share': '1 - gpu_busy_ms / ms: the share of a step during which the GPU has no kernel to run (it waits for '
                  'the host to launch work); gpu_busy_ms is the union of the intervals of every GPU activity (kernels, '
                  'memcpy, memset) of one step traced by torch.profiler (CUDA activity only; set up for CUDA graphs '
                  'before the first capture: meta.profiler), ms the unprofiled step; profile_check: why a trace is '
                  'implausible (a replay listing almost no kernels), else null',
    'first_use_s': 'seconds to compile the Triton binaries of the default search and retrain networks (fp32, '
                   'benchmarks.kernels.launch_plans) into an empty TRITON_CACHE_DIR, GPU_COMPILE_WORKERS processes at '
                   'once (workers, worker_compile_s; plan_s: tracing which binaries, before, within the same cap); '
                   'target: on a CPU the binaries are compiled for sm_90; when '
                   'stopped at its cap (or failed) first_use_s is null and first_use_at_least_s its running time. '
                   'cuDNN autotuning and CUDA start-up fall in each case\'s first_s',
    'kernel_binaries': 'compiled binaries (.cubin/.hsaco) in that cache; kernel_binaries_after_all: in the same cache '
                       'at the end of the run (every case measured: more means some step compiled on its first use)',
    'first_use': 'first_use_s as text, or "over N s" when the workers ran past the cap of N s (GPU_COMPILE_S)',
    'graphed': 'the step captured once per graph as a CUDA graph and replayed (graphs.py, the scripts\' CUDA_GRAPHS); '
               'graphs_captured, warmup_calls, eager_fallback_calls, replays and capture_failures from its '
               'StepGraphs; capture_s: host seconds of the captures themselves, not in ms',
    'top_kernels': '[kernel name, GPU ms] of the kernels with the most GPU time in one traced step of a profiled case',
    'graph_check': 'per step kind, after 5 steps graphed and 5 eager from the same start: max_abs (largest difference '
                   'of weights, alphas/betas, BatchNorm statistics, optimizer buffers), worst (its tensor), equal '
                   '(all within 1e-4 + 1e-3 |eager|); benchmarks/graph_check.py',
    'largest_batch': 'benchmarks.step_times.largest_batch: linear fit of the peak memory of one step at the batch and '
                     'twice it',
    'targets': 'each bound of the issue against the smallest measured value over its cases (best, case; by_case: every '
               'case); met is null without a measurement or off a GPU (the bounds are for a GPU at the full sizes)',
    'protocol_h': 'search: warm-up epochs x steps x (weight-only step) + other epochs x steps x (search step); '
                  'retrain: folds x epochs x steps x (retrain step); steps = ceil(nodules / batch); the evaluation '
                  'passes are not included',
}


def protocol_hours(steps, cfg, search, warmup, retrain):
    """Full-protocol hours (DEFINITIONS) from the ms/step of three measured cases; None if one is missing."""
    ms = [steps.get(name, {}).get('ms') for name in (search, warmup, retrain)]
    if None in ms:
        return None
    s_steps = math.ceil(cfg['PROTOCOL_SEARCH_NODULES'] / cfg['SEARCH_BATCH'])
    r_steps = math.ceil(cfg['PROTOCOL_RETRAIN_NODULES'] / cfg['RETRAIN_BATCH'])
    epochs, warm = train_search.DEFAULTS['EPOCHS'], train_search.DEFAULTS['WARMUP_EPOCHS']
    folds, r_epochs = len(train_3D_continuation.DEFAULTS['TEST_FOLDS']), train_3D_continuation.DEFAULTS['EPOCHS']
    search_h = s_steps * (warm * ms[1] + (epochs - warm) * ms[0]) / 3.6e6
    retrain_h = folds * r_epochs * r_steps * ms[2] / 3.6e6
    total = search_h + retrain_h
    return {'search': search, 'warm-up': warmup, 'retrain': retrain, 'search_h': search_h, 'retrain_h': retrain_h,
            'total_h': total, 'published_h': PUBLISHED_H, 'speedup': PUBLISHED_H / total}


def fastest(steps, step, key='ms'):
    """Name of the measured case of a step with the smallest value of `key`, or None."""
    rows = [r for r in steps.values() if r['step'] == step and r.get(key) is not None]
    return min(rows, key=lambda r: r[key])['case'] if rows else None


def summarize(res, cfg):
    """The protocol estimates and the targets from what has been measured so far."""
    steps = res['steps']
    best = {k: fastest(steps, k) for k in ('search 2nd', 'search warm-up', 'retrain')}
    res['protocol'] = {
        'search_nodules': cfg['PROTOCOL_SEARCH_NODULES'], 'retrain_nodules': cfg['PROTOCOL_RETRAIN_NODULES'],
        'defaults': protocol_hours(steps, cfg, 'search 2nd fp32 native', 'search warm-up fp32 native',
                                   'retrain fp32 fast'),
        'fastest': protocol_hours(steps, cfg, best['search 2nd'], best['search warm-up'], best['retrain'])}
    targets, gpu = {}, str(cfg['DEVICE']).startswith('cuda')  # the bounds are for a GPU at the full sizes
    for name, kind, key, bound in TARGETS:
        if kind == 'compile':  # a probe stopped at its cap took longer than that
            values = {'first use': res['compile'].get(key) or res['compile'].get('first_use_at_least_s')}
        else:
            values = {r['case']: r[key] for r in steps.values() if (kind == 'profiled' or r['step'] == kind)}
        measured = {k: v for k, v in values.items() if v is not None}
        where = min(measured, key=measured.get) if measured else None
        met = None if where is None or not gpu else bool(measured[where] <= bound)
        targets[name] = {'bound': bound, 'best': measured.get(where), 'case': where, 'met': met, 'by_case': measured}
    res['targets'] = targets


def json_safe(obj):
    """NaN/inf -> None, for strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def summary_table(res):
    """A short table of the steps, targets and protocol estimate (printed last)."""
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else 'n/a'
    lines = [f'{"case":30s} {"batch":>5s} {"ms/step":>9s} {"peak GB":>8s} {"first s":>8s} {"syncs":>5s} '
             f'{"host share":>10s}']
    for r in res['steps'].values():
        lines.append(f'{r["case"]:30s} {r["batch"]:5d} {f(r.get("ms"), "9.1f")} {f(r.get("peak_gb"), "8.2f")} '
                     f'{f(r.get("first_s"), "8.1f")} {f(r.get("syncs_per_step"), "5d")} '
                     f'{f(r.get("host_share"), "10.1%")}')
    lines.append(f'largest batch in the memory budget: {res["largest_batch"]}')
    c = res['compile']
    lines.append(f'first use (binaries compiled in parallel): {f(c.get("first_use_s"), ".1f")} s, '
                 f'{f(c.get("kernel_binaries"), "d")} kernel binaries')
    for name, t in res['targets'].items():
        lines.append(f'target {name} <= {t["bound"]}: best {f(t["best"], ".4g")} ({t["case"]}) met: {t["met"]}')
    for which, p in res['protocol'].items():
        if isinstance(p, dict):
            lines.append(f'protocol ({which}): search {f(p["search_h"], ".2f")} h + retrain {f(p["retrain_h"], ".1f")} '
                         f'h = {f(p["total_h"], ".1f")} h, published {p["published_h"]} h')
    lines += [f'note: {n}' for n in res['notes']] + [f'skipped: {n}' for n in res['skipped']]
    return '\n'.join(lines)
