"""Benchmarks of whole training steps (search second / first / zeroth order, retrain of the paper genotype):
ms/step, peak memory, the largest batch that fits, and operations per step. Run through bench.py --BENCH=steps/ops;
they also run on a CPU with small settings."""
import contextlib
import os
import re
import sys
import tempfile
import time

import torch

import dwconv3d
import engine
import graphs
import train_search
from genotypes import NAS_HBO_PAPER
from model import NetworkLUNA


class _Batches:
    """Stands in for the search-validation stream: the same random batch every time."""

    def __init__(self, x, y):
        self.batch = (x, y)

    def next(self):
        return self.batch


def _random_batch(n, cube, device, seed):
    g = torch.Generator(device='cpu').manual_seed(seed)
    x = torch.randn(n, 1, cube, cube, cube, generator=g).to(device)
    return x, torch.randint(0, 2, (n,), generator=g).to(device)


def search_step(hypergrad, batch, cfg, checkpoint_cells=False, arch=True, graphed=False):
    """A function running one search step as train_search.py does: architecture step, then weight step.
    arch False: the weight step alone (the warm-up epochs; 'first' or 'second' build the same model).
    graphed: the step of train_search with CUDA_GRAPHS (graphs.search_steps; captured on its 4th call)."""
    settings = {**train_search.DEFAULTS, 'HYPERGRAD': hypergrad, 'BATCH_SIZE': batch, 'DEVICE': cfg['DEVICE'],
                'C': cfg['SEARCH_C'], 'LAYERS': cfg['SEARCH_LAYERS'], 'CUBE': cfg['CUBE'], 'AMP': cfg['AMP'],
                'CHECKPOINT_CELLS': checkpoint_cells}
    model, w_opt, _, _, updater = train_search.build(settings)
    x, y = _random_batch(batch, cfg['CUBE'], cfg['DEVICE'], 0)
    val = _Batches(*_random_batch(batch, cfg['CUBE'], cfg['DEVICE'], 1))
    params = model.weight_parameters()
    lr = w_opt.param_groups[0]['lr']
    if graphed:
        step = graphs.search_steps(model, w_opt, updater, settings['GRAD_CLIP'], True)
        run = lambda: step(x, y, arch, val, None)  # noqa: E731
        run.graphs = step.graphs  # (benchmarks/gpu_case.py reads its captures)
        return run
    if hypergrad == 'zeroth':  # the twin's step every step, an architecture step every ZO_T steps
        return lambda: updater.weight_step(x, y, True, val)

    def step():
        if arch:
            updater.step(x, y, *val.next(), lr)
        engine.train_step(model, w_opt, x, y, params, settings['GRAD_CLIP'])
    return step


def retrain_step(batch, cfg, checkpoint_cells=False, graphed=False):
    """A function running one retrain step of the paper genotype (drop path on, as mid-training). graphed: the step
    of train_3D_continuation with CUDA_GRAPHS (graphs.retrain_step; captured on its 4th call)."""
    model = NetworkLUNA(cfg['RETRAIN_C'], 2, cfg['RETRAIN_LAYERS'], NAS_HBO_PAPER).to(cfg['DEVICE'])
    model.drop_path_prob = 0.1
    model.amp = cfg['AMP']
    model.checkpoint_cells = checkpoint_cells
    params = list(model.parameters())
    opt = torch.optim.SGD(params, 0.025, momentum=0.9, weight_decay=3e-4)
    x, y = _random_batch(batch, cfg['CUBE'], cfg['DEVICE'], 0)
    if graphed:
        step = graphs.retrain_step(model, opt, params, 5.0, True)
        run = lambda: step(x, y)  # noqa: E731
        run.graphs = step  # (a StepGraphs)
        return run
    return lambda: engine.train_step(model, opt, x, y, params, 5.0)


def time_steps(make_step, device, warmup, iters):
    """(ms per step, peak GPU memory in GB or nan on CPU, s of the first step) of the step made by make_step().

    The first step includes one-time work (Triton compilation, cuDNN autotuning); warm-up steps follow it.
    """
    cuda = str(device).startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda *_: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step()
    t0 = time.perf_counter()
    for i in range(warmup):
        step()
        if i == 0:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    ms = 1e3 * (time.perf_counter() - t0) / iters if iters else float('nan')
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float('nan')
    del step
    return ms, peak, first if warmup else float('nan')


def step_cases(cfg):
    """(name, batch, make_step(batch)) of every step benchmark."""
    return [('search 2nd order', cfg['SEARCH_BATCH'], lambda b: search_step('second', b, cfg)),
            ('search 1st order', cfg['SEARCH_BATCH'], lambda b: search_step('first', b, cfg)),
            ('search zeroth order', cfg['SEARCH_BATCH'], lambda b: search_step('zeroth', b, cfg)),
            ('search 2nd, cells recomputed', cfg['SEARCH_BATCH'], lambda b: search_step('second', b, cfg, True)),
            ('retrain paper genotype', cfg['RETRAIN_BATCH'], lambda b: retrain_step(b, cfg)),
            ('retrain, cells recomputed', cfg['RETRAIN_BATCH'], lambda b: retrain_step(b, cfg, True))]


PROFILER_NOISE = re.compile(r'USDT:.*(profiler_start|profiler_stop)|ActivityProfiler|^STAGE:')


@contextlib.contextmanager
def quiet_stderr(noise=PROFILER_NOISE):
    """The process's stderr (file descriptor 2, where the profiler's C++ library writes its start and stop lines)
    goes to a temporary file while the block runs; its lines that do not match `noise` are written back after."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode='w+') as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp if not noise.search(line)]
            if kept:
                sys.stderr.write(''.join(kept))
                sys.stderr.flush()


def count_ops(cfg):
    """{step: top-level operations per step} (aten ops and autograd nodes as torch.profiler lists them, after
    one untimed step): the host-side work a step issues, the same for any batch and cube size. Recomputed cells
    run inside backward nodes, so their operations are not counted apart."""
    from torch.profiler import ProfilerActivity, profile
    counts = {}
    for name, batch, make in step_cases(cfg):
        torch.manual_seed(0)
        step = make(batch)
        step()
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        counts[name] = sum(1 for e in prof.events() if e.cpu_parent is None)
        print(f'  {name}: {counts[name]} top-level ops per step', flush=True)
    return counts


def bench_steps(cfg):
    """Rows: step, batch, path (fast / native), ms/step, samples/s, peak GB, first step s; each row is also
    printed as soon as it is measured."""
    rows = []
    for name, batch, make in step_cases(cfg):
        for fast in (True, False):
            dwconv3d.set_fast_kernels(fast)
            torch.manual_seed(0)
            ms, peak, first = time_steps(lambda make=make, batch=batch: make(batch), cfg['DEVICE'],
                                         cfg['WARMUP_STEPS'], cfg['STEPS'])
            rows.append({'step': name, 'batch': batch, 'path': 'fast' if fast else 'native', 'ms': ms,
                         'samples_s': 1e3 * batch / ms, 'peak_gb': peak, 'first_s': first})
            print(f'  {name}, {rows[-1]["path"]}: {ms:.1f} ms/step, peak {peak:.2f} GB, first step {first:.1f} s')
    dwconv3d.set_fast_kernels(True)
    return rows


def largest_batch(make_step, batch, cfg):
    """Largest batch whose peak memory fits MEMORY_GB, from a linear fit of the peaks at batch and 2*batch."""
    m1 = time_steps(lambda: make_step(batch), cfg['DEVICE'], 1, 0)[1]
    m2 = time_steps(lambda: make_step(2 * batch), cfg['DEVICE'], 1, 0)[1]
    per_sample = (m2 - m1) / batch
    return int(batch + (cfg['MEMORY_GB'] - m1) / per_sample) if per_sample > 0 else float('nan')


def steps_table(rows):
    lines = [f'{"step":28s} {"batch":>5s} {"path":7s} {"ms/step":>9s} {"samples/s":>9s} {"peak GB":>8s} '
             f'{"speedup":>7s} {"first step s":>12s}']
    for fast, native in zip(rows[0::2], rows[1::2]):
        for r in (fast, native):
            speedup = f'{native["ms"] / fast["ms"]:7.2f}' if r is fast else ''
            lines.append(f'{r["step"]:28s} {r["batch"]:5d} {r["path"]:7s} {r["ms"]:9.1f} {r["samples_s"]:9.2f} '
                         f'{r["peak_gb"]:8.2f} {speedup:>7s} {r["first_s"]:12.1f}')
    return '\n'.join(lines)
