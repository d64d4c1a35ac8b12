"""One case of BENCH='gpu' (benchmarks/gpu.py): its first steps, its timed steps (for a graphed case only replays,
after every graph of the step was captured), memory, host syncs and, for profiled cases, the host share from a
torch.profiler trace. Every decision reads an injected clock (gpu.Clock; tests/test_bench.py passes a fake one)."""
import math
import os
import warnings

import torch

MAX_TIMED = 200  # timed steps per case at most
MIN_REPLAYS, MIN_REPLAY_S = 20, 2.0  # a graphed case times at least this many replays, or this many seconds of them
MIN_GRAPH_ACTIVITIES = 10  # a profiled replay listing fewer GPU activities lost its kernels (profiler not set up)
PEAK_SOURCE = {False: 'max_memory_allocated over the timed steps',
               True: 'max_memory_allocated over the captures and the replays (the graphs\' private pool included: '
                     'its blocks are allocated while a capture runs)'}


def sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)


def timed(step, device, clock, n=1):
    """Seconds of n calls of step (synchronized at both ends) on the clock."""
    sync(device)
    t0 = clock.now()
    for _ in range(n):
        step()
    sync(device)
    return clock.now() - t0


def settle(step, device, clock, expected, limit=64):
    """Call a graphed step until its `expected` graphs are captured (or have fallen back to eager): the eager warm-ups
    and the captures, none of them timed. Returns (calls made, seconds)."""
    g, calls, t0 = step.graphs, 0, clock.now()
    while g.stats['captured'] + len(g.failures) < expected and calls < limit:
        timed(step, device, clock)
        calls += 1
    return calls, clock.now() - t0


def graph_fields(g, before=None):
    """The JSON fields of a StepGraphs: graphs captured, eager calls (warm-ups, fallbacks), replays, capture seconds,
    failures; with `before` (an earlier copy of g.stats), the eager calls since then (should be 0 in the timing)."""
    s = g.stats
    out = {'graphs_captured': s['captured'], 'warmup_calls': s['warmup_calls'],
           'eager_fallback_calls': s['eager_fallback_calls'], 'replays': s['replays'],
           'capture_s': sum(s['capture_s']) if s['capture_s'] else None, 'capture_failures': list(g.failures)}
    if before is not None:
        out['eager_calls_timed'] = (s['warmup_calls'] + s['eager_fallback_calls']
                                    - before['warmup_calls'] - before['eager_fallback_calls'])
    return out


def steps_to_time(row, one_s, left_s, timed_s):
    """How many steps to time: about timed_s of them within left_s (at least 2, at most MAX_TIMED); a graphed case at
    least MIN_REPLAYS replays, or MIN_REPLAY_S of them when fewer fill that (sized from a replay, not an eager step)."""
    one_s = max(one_s, 1e-6)
    n = max(2, min(MAX_TIMED, int(min(timed_s, left_s) / one_s)))
    if row['graphed']:
        n = max(n, min(MIN_REPLAYS, math.ceil(MIN_REPLAY_S / one_s)))
    return n


def time_case(make_step, cfg, row, save, deadline, clock, expected_graphs=1):
    """Fill `row` (saved after each phase): build, first step, (graphed: captures), timed steps, memory, syncs."""
    device, cuda = cfg['DEVICE'], str(cfg['DEVICE']).startswith('cuda')
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = clock.now()
    step = make_step()
    row['build_s'] = clock.now() - t0
    row['first_s'] = timed(step, device, clock)
    save()
    if cuda:
        row['peak_first_gb'] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)  # graphed: the peak below includes the captures
    if row['graphed']:
        row['settle_calls'], _ = settle(step, device, clock, expected_graphs)
        row.update(graph_fields(step.graphs))
        save()
    one = timed(step, device, clock)  # one more warm-up step (a replay when graphed): sizes the count
    n = steps_to_time(row, one, deadline - clock.now() - 2 * one, cfg['GPU_TIMED_S'])
    before = dict(step.graphs.stats) if row['graphed'] else None
    halves = [timed(step, device, clock, n // 2), timed(step, device, clock, n - n // 2)]
    ms = 1e3 * sum(halves) / n
    row.update(ms=ms, ms_halves=[1e3 * halves[0] / (n // 2), 1e3 * halves[1] / (n - n // 2)],
               samples_s=1e3 * row['batch'] / ms if ms > 0 else None, steps_timed=n,
               peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
               reserved_gb=torch.cuda.memory_reserved(device) / 1e9 if cuda else None,
               peak_source=PEAK_SOURCE[bool(row['graphed'])])
    if row['graphed']:
        row.update(graph_fields(step.graphs, before))
    save()
    if cuda:
        row['syncs_per_step'], row['sync_sites'] = count_syncs(step, device)
        save()
    return step


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


def init_profiler_for_graphs():
    """torch.profiler's set-up for CUDA graphs, before the first capture: without it the kernels of a replay are not
    listed in a later trace (a replay is one launch). Returns what was done, for the JSON."""
    from torch.profiler import _utils
    init = getattr(_utils, '_init_for_cuda_graphs', None)
    if init is None:
        return 'torch.profiler has no _init_for_cuda_graphs in this torch: graphed traces may miss kernels'
    init()
    return 'torch.profiler._utils._init_for_cuda_graphs() before the first capture'


def profile_check(row):
    """None, or why a profiled row's numbers are implausible: a graphed step whose trace lists almost no GPU
    activities (its kernels are missing, so its host share would read ~100 %)."""
    n = row.get('gpu_activities_per_step')
    if row.get('graphed') and n is not None and n < MIN_GRAPH_ACTIVITIES:
        return (f'the trace of a replay lists {n} GPU activities (< {MIN_GRAPH_ACTIVITIES}): its kernels are missing, '
                'gpu_busy_ms and host_share are not the step\'s')
    share = row.get('host_share')
    if share is not None and not 0.0 <= share <= 1.0:
        return f'host share {share} outside [0, 1]'
    return None


def host_share_of(step, device, step_ms, clock):
    """GPU busy time of one traced step (union of its GPU activities) and the host share (DEFINITIONS)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    t0 = clock.now()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    wall_ms = 1e3 * (clock.now() - t0)
    spans = activity_spans(prof, DeviceType.CUDA)
    busy = busy_ms(spans)
    return {'gpu_busy_ms': busy, 'gpu_activities_per_step': len(spans), 'profiled_ms': wall_ms,
            'host_share': max(0.0, 1 - busy / step_ms), 'top_kernels': top_kernels(prof)}


def top_kernels(prof, n=12):
    """[[kernel name, GPU ms in the traced step], ...]: the n kernels (by name) with the most GPU time."""
    from torch.autograd import DeviceType
    totals = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            totals[e.name()] = totals.get(e.name(), 0) + e.duration_ns() / 1e6
    return [[name[:120], ms] for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:n]]
