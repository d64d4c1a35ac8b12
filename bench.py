"""Speed benchmarks on a CUDA GPU: the fast path (Triton depthwise kernels) against torch's native kernels.

python bench.py [config.py] [--NAME=value ...]
Section 1: the depthwise 3D convolution kernels at the shapes the search and retrain networks use, and the
host time per launch (Triton launcher vs torch conv3d).
Section 2: whole training steps (search 2nd / 1st / zeroth order, retrain of the paper genotype; 2nd-order search
and retrain also with cells recomputed in backward, CHECKPOINT_CELLS of the scripts), ms/step,
samples/s and peak memory, each with the fast path and with torch's kernels (same code, switch off).
Section 3: operations per step (what the host issues; the search step appeared host-bound on an H100).
BENCH='methods' (separately): 2nd / 1st / zeroth-order searches on the demo set under one short budget, each
genotype retrained and tested on one fold: search time and test metrics per method.
The steps and the counts also run on a CPU (BENCH='steps' or 'ops', small settings); the kernels need CUDA.
"""
import datetime
import os
import sys
import time

import torch

import dwconv3d
import engine
import train_3D_continuation
import train_search
import utils
from genotypes import NAS_HBO_PAPER
from model import NetworkLUNA

DTYPE = 'float32'  # 'float32' or 'bfloat16'
WARMUP_MS = 25  # warm-up time per measurement (triton.testing.do_bench)
REP_MS = 100  # measured time per measurement; the median is reported
PEAK_GBPS = 3000.0  # HBM bandwidth the "% peak" column divides by (H100: ~3 TB/s)
DEVICE = utils.default_device()  # 'cuda' or 'cpu' (the benchmarks need 'cuda')
BENCH = 'all'  # 'kernels', 'steps', 'ops' (operations per step, also on a CPU), 'all' (these three) or 'methods'
STEPS = 10  # timed training steps per case
WARMUP_STEPS = 3  # untimed steps first (Triton compilation, cuDNN autotuning)
SEARCH_BATCH = 7  # search step batch (paper: 7)
RETRAIN_BATCH = 4  # retrain step batch (paper: 4)
SEARCH_C = 16  # supernet channels (paper: 16)
SEARCH_LAYERS = 8  # supernet cells (paper: 8)
RETRAIN_C = 36  # retrain channels (paper: 36)
RETRAIN_LAYERS = 20  # retrain cells (paper: 20)
CUBE = 32  # input edge
AMP = False  # bf16 autocast in the step benchmarks
# BENCH='methods' (not in 'all'): search with each hypergradient on the demo set under one short budget, then retrain
# each final genotype on the other folds and test it on one fold (ZO-DARTS+ issue: search time and accuracy).
METHODS_EPOCHS = 6  # search epochs per method, the first half weight-only warm-up
METHODS_C = 8  # supernet channels (a smaller supernet than the paper's 16, to fit a short GPU session)
METHODS_LAYERS = 5  # supernet cells
METHODS_RETRAIN_EPOCHS = 20  # retrain epochs of each found genotype
METHODS_RETRAIN_C = 16  # retrain channels
METHODS_RETRAIN_LAYERS = 8  # retrain cells
METHODS_FOLD = 5  # test fold of the retrains
MEMORY_GB = 24.0  # the workstation budget: the largest batch that fits is estimated for it
DEFAULTS = utils.settings_of(globals())

# ---------------------------------------------------------------------------------------------------
# Section 1: depthwise 3D convolution kernels
# ---------------------------------------------------------------------------------------------------

# (where, N, C, input edge, kernel, stride, dilation). Derived from DESIGN.md section 1:
# retrain net (C=36, 20 cells, batch 4): 36 / 72 / 144 channels at 32^3 / 16^3 / 8^3 (reductions at
# cells 6 and 13, whose stride-2 ops read the larger input); MBConv hidden width = 3x or 6x.
# search supernet (C=16, 8 cells, batch 7, partial channels 1/4): 4 / 8 / 16 channels at 32^3 / 16^3 /
# 8^3, MBConv hidden 12-96. The paper genotype uses dil_conv 3/5, MBConv 5 (x3, x6) and sep_conv 3.
DWCONV_SHAPES = [
    ('retrain dil_conv_3x3x3', 4, 36, 32, 3, 1, 2),
    ('retrain dil_conv_5x5x5', 4, 36, 32, 5, 1, 2),
    ('retrain sep_conv_3x3x3', 4, 36, 32, 3, 1, 1),
    ('retrain MBConv_5_3', 4, 108, 32, 5, 1, 1),
    ('retrain MBConv_5_6', 4, 216, 32, 5, 1, 1),
    ('retrain MBConv_5_6 reduce', 4, 432, 32, 5, 2, 1),
    ('retrain dil_conv_3x3x3 reduce', 4, 72, 32, 3, 2, 2),
    ('retrain dil_conv_5x5x5 16^3', 4, 72, 16, 5, 1, 2),
    ('retrain MBConv_5_6 16^3', 4, 432, 16, 5, 1, 1),
    ('retrain MBConv_5_6 8^3', 4, 864, 8, 5, 1, 1),
    ('retrain dil_conv_3x3x3 8^3', 4, 144, 8, 3, 1, 2),
    ('search dil_conv_5x5x5', 7, 4, 32, 5, 1, 2),
    ('search MBConv_5_6', 7, 24, 32, 5, 1, 1),
    ('search sep_conv_5x5x5 reduce', 7, 8, 32, 5, 2, 1),
    ('search MBConv_5_6 16^3', 7, 48, 16, 5, 1, 1),
    ('search MBConv_5_6 8^3', 7, 96, 8, 5, 1, 1),
]


def _dwconv_passes(n, c, size, k, stride, dilation, device, dtype):
    """{pass: (triton fn, torch fn, bytes the pass must move)} for one depthwise conv shape."""
    pad = dilation * (k - 1) // 2
    x = torch.randn(n, c, size, size, size, device=device, dtype=dtype)
    w = torch.randn(c, 1, k, k, k, device=device, dtype=dtype)
    y = torch.nn.functional.conv3d(x, w, None, stride, pad, dilation, c)
    gy = torch.randn_like(y)

    def native_backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            gy, x, w, None, (stride,) * 3, (pad,) * 3, (dilation,) * 3, False, (0, 0, 0), c, mask)

    xb, yb, wb = x.numel() * x.element_size(), y.numel() * y.element_size(), w.numel() * w.element_size()
    return {
        'forward': (lambda: dwconv3d.dwconv3d_forward(x, w, stride, dilation),
                    lambda: torch.nn.functional.conv3d(x, w, None, stride, pad, dilation, c), xb + yb + wb),
        'grad_input': (lambda: dwconv3d.dwconv3d_grad_input(gy, w, x.shape, stride, dilation),
                       native_backward((True, False, False)), xb + yb + wb),
        'grad_weight': (lambda: dwconv3d.dwconv3d_grad_weight(x, gy, k, stride, dilation),
                        native_backward((False, True, False)), xb + yb + w.numel() * 4),
    }


def _max_diff(fast, native):
    """Largest |triton - torch| relative to the largest |torch| (a sanity check of what is timed)."""
    a, b = fast(), native()
    b = next(t for t in b if t is not None) if isinstance(b, tuple) else b
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def bench_kernels(device, dtype=torch.float32, shapes=None, warmup_ms=WARMUP_MS, rep_ms=REP_MS,
                  peak_gbps=PEAK_GBPS):
    """Time forward / grad_input / grad_weight of each shape with the Triton kernels and with torch.

    Returns one dict per (shape, pass, impl): ms (median), GB/s achieved over the bytes the pass must
    move (inputs read once, output written once), % of peak_gbps, and rel_diff (triton vs torch).
    """
    device = torch.device(device)
    if device.type != 'cuda':
        raise utils.UserError(f'bench.py: bench_kernels needs a CUDA device, got {device}')
    if dwconv3d.triton is None:
        raise utils.UserError('bench.py: bench_kernels needs triton (pip install triton)')
    from triton.testing import do_bench
    rows = []
    for where, n, c, size, k, stride, dilation in shapes or DWCONV_SHAPES:
        passes = _dwconv_passes(n, c, size, k, stride, dilation, device, dtype)
        for name, (fast, native, nbytes) in passes.items():
            diff = _max_diff(fast, native)
            for impl, fn in (('triton', fast), ('torch', native)):
                ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode='median')
                gbps = nbytes / ms / 1e6
                rows.append(dict(where=where, shape=f'{n}x{c}x{size}^3', k=k, stride=stride, dilation=dilation,
                                 dtype=str(dtype).replace('torch.', ''), pass_=name, impl=impl, ms=ms,
                                 gbps=gbps, pct_peak=100 * gbps / peak_gbps, rel_diff=diff))
    return rows


def bench_launch(device, calls=500):
    """Host time per call (us) of the Triton forward launcher and of torch's conv3d, on a small and a search-
    sized tensor: the search step launches tens of thousands of convolutions, so this overhead adds up."""
    rows = []
    for shape, k in (((1, 4, 8, 8, 8), 3), ((7, 4, 32, 32, 32), 5)):
        x = torch.randn(*shape, device=device)
        w = torch.randn(shape[1], 1, k, k, k, device=device)
        for impl, fn in (('triton', lambda x=x, w=w: dwconv3d.dwconv3d_forward(x, w)),
                         ('torch', lambda x=x, w=w, k=k: torch.nn.functional.conv3d(x, w, None, 1, k // 2, 1,
                                                                                    x.shape[1]))):
            for _ in range(20):
                fn()
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            host = time.perf_counter() - t0
            torch.cuda.synchronize(device)
            rows.append(f'{"x".join(map(str, shape)):14s} k={k} {impl:6s}: {1e6 * host / calls:6.1f} us/call host, '
                        f'{1e6 * (time.perf_counter() - t0) / calls:6.1f} us/call with the GPU')
    return '\n'.join(rows)


def kernels_table(rows):
    """The rows of bench_kernels as a fixed-width text table, triton and torch side by side."""
    lines = [f'{"where":30s} {"shape":14s} {"k":>2s} {"s":>2s} {"d":>2s} {"pass":12s} '
             f'{"triton ms":>9s} {"GB/s":>7s} {"%peak":>6s} {"torch ms":>9s} {"GB/s":>7s} {"speedup":>7s} '
             f'{"rel diff":>9s}']
    for fast, native in zip(rows[0::2], rows[1::2]):
        lines.append(f'{fast["where"]:30s} {fast["shape"]:14s} {fast["k"]:2d} {fast["stride"]:2d} '
                     f'{fast["dilation"]:2d} {fast["pass_"]:12s} {fast["ms"]:9.4f} {fast["gbps"]:7.0f} '
                     f'{fast["pct_peak"]:6.1f} {native["ms"]:9.4f} {native["gbps"]:7.0f} '
                     f'{native["ms"] / fast["ms"]:7.1f} {fast["rel_diff"]:9.1e}')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------
# Section 2: whole training steps (search second / first / zeroth order, retrain of the paper genotype)
# ---------------------------------------------------------------------------------------------------

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


def search_step(hypergrad, batch, cfg, checkpoint_cells=False):
    """A function running one search step as train_search.py does: architecture step, then weight step."""
    settings = {**train_search.DEFAULTS, 'HYPERGRAD': hypergrad, 'BATCH_SIZE': batch, 'DEVICE': cfg['DEVICE'],
                'C': cfg['SEARCH_C'], 'LAYERS': cfg['SEARCH_LAYERS'], 'CUBE': cfg['CUBE'], 'AMP': cfg['AMP'],
                'CHECKPOINT_CELLS': checkpoint_cells}
    model, w_opt, _, _, updater = train_search.build(settings)
    x, y = _random_batch(batch, cfg['CUBE'], cfg['DEVICE'], 0)
    val = _Batches(*_random_batch(batch, cfg['CUBE'], cfg['DEVICE'], 1))
    params = model.weight_parameters()
    lr = w_opt.param_groups[0]['lr']
    if hypergrad == 'zeroth':  # the twin's step every step, an architecture step every ZO_T steps
        return lambda: updater.weight_step(x, y, True, val)

    def step():
        updater.step(x, y, *val.next(), lr)
        engine.train_step(model, w_opt, x, y, params, settings['GRAD_CLIP'])
    return step


def retrain_step(batch, cfg, checkpoint_cells=False):
    """A function running one retrain step of the paper genotype (drop path on, as mid-training)."""
    model = NetworkLUNA(cfg['RETRAIN_C'], 2, cfg['RETRAIN_LAYERS'], NAS_HBO_PAPER).to(cfg['DEVICE'])
    model.drop_path_prob = 0.1
    model.amp = cfg['AMP']
    model.checkpoint_cells = checkpoint_cells
    params = list(model.parameters())
    opt = torch.optim.SGD(params, 0.025, momentum=0.9, weight_decay=3e-4)
    x, y = _random_batch(batch, cfg['CUBE'], cfg['DEVICE'], 0)
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
        with profile(activities=[ProfilerActivity.CPU]) as prof:
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


# ---------------------------------------------------------------------------------------------------
# Search methods compared (ZO-DARTS+ issue)
# ---------------------------------------------------------------------------------------------------

# (HYPERGRAD, WEIGHTS): DARTS second and first order with NAS-HBO's sigmoid weights, ZO-DARTS+.
METHODS = (('second', 'sigmoid'), ('first', 'sigmoid'), ('zeroth', 'sparsemax'))


def compare_methods(search, retrain):
    """Search with each of METHODS (train_search.main(**search) plus the method), retrain its final genotype
    (train_3D_continuation.main(**retrain)); one row per method with wall times and the test-fold metrics."""
    rows = []
    for hypergrad, weights in METHODS:
        t0 = time.perf_counter()
        found = train_search.main(**search, HYPERGRAD=hypergrad, WEIGHTS=weights, TAG=f'methods-{hypergrad}')
        t1 = time.perf_counter()
        result = train_3D_continuation.main(**retrain, GENOTYPE=os.path.join(found['run'], 'genotype.json'),
                                            TAG=f'methods-{hypergrad}')
        fold = result['folds'][0]
        rows.append({'method': f'{hypergrad}, {weights}', 'search_s': t1 - t0, 'retrain_s': time.perf_counter() - t1,
                     **{k: fold[k] for k in (*utils.METRIC_NAMES, 'params_M')},
                     'search_run': found['run'], 'retrain_run': result['run']})
        print(f'  {rows[-1]["method"]}: search {t1 - t0:.0f} s, retrain {rows[-1]["retrain_s"]:.0f} s, '
              f'test acc {fold["acc"]:.2f}', flush=True)
    return rows


def methods_table(rows):
    lines = ['| HYPERGRAD, WEIGHTS | search time | retrain time | acc | sens | spec | F1 | AUC | params |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        lines.append(f'| {r["method"]} | {r["search_s"]:.0f} s | {r["retrain_s"]:.0f} s | {r["acc"]:.2f} | '
                     f'{r["sens"]:.2f} | {r["spec"]:.2f} | {r["f1"]:.2f} | {r["auc"]:.2f} | {r["params_M"]:.2f} M |')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------


def main(**overrides):
    cfg = utils.check_settings(overrides, DEFAULTS)
    if cfg['DTYPE'] not in ('float32', 'bfloat16'):
        raise utils.UserError(f'bench.py: DTYPE must be float32 or bfloat16, got {cfg["DTYPE"]!r}')
    if cfg['BENCH'] not in ('kernels', 'steps', 'ops', 'all', 'methods'):
        raise utils.UserError(f'bench.py: BENCH must be kernels, steps, ops, all or methods, got {cfg["BENCH"]!r}')
    device = cfg['DEVICE']
    where = torch.cuda.get_device_name(device) if str(device).startswith('cuda') else 'cpu'
    print(f'{datetime.date.today()}  {where}  torch {torch.__version__}  '
          f'triton {getattr(dwconv3d.triton, "__version__", "missing")}  command: python bench.py '
          + ' '.join(sys.argv[1:]))
    out = {}
    if cfg['BENCH'] in ('kernels', 'all'):
        dtype = getattr(torch, cfg['DTYPE'])
        out['kernels'] = bench_kernels(device, dtype, warmup_ms=cfg['WARMUP_MS'], rep_ms=cfg['REP_MS'],
                                       peak_gbps=cfg['PEAK_GBPS'])
        print(f'depthwise conv3d, {cfg["DTYPE"]}')
        print(kernels_table(out['kernels']))
        print('launch overhead (fp32 forward)')
        print(bench_launch(device))
    if cfg['BENCH'] in ('steps', 'all'):
        torch.backends.cudnn.benchmark = True
        print(f'training steps, cube {cfg["CUBE"]}^3, AMP {cfg["AMP"]} (the first step compiles the kernels)')
        out['steps'] = bench_steps(cfg)
        print(steps_table(out['steps']))
        if where != 'cpu':
            measured = ('search 2nd order', 'search 2nd, cells recomputed', 'retrain paper genotype',
                        'retrain, cells recomputed')
            fits = {name: largest_batch(make, batch, cfg) for name, batch, make in step_cases(cfg) if name in measured}
            print(f'largest batch in {cfg["MEMORY_GB"]} GB (fast path, linear fit of peak memory): {fits}')
            out['largest_batch'] = fits
    if cfg['BENCH'] in ('ops', 'all'):
        print('host-side work: operations per step (torch.profiler, CPU activity)')
        out['ops'] = count_ops(cfg)
    if cfg['BENCH'] == 'methods':
        common = {'DEVICE': device, 'CUBE': cfg['CUBE'], 'AMP': cfg['AMP']}
        print(f'search methods on the demo set: {cfg["METHODS_EPOCHS"]} search epochs (C={cfg["METHODS_C"]}, '
              f'{cfg["METHODS_LAYERS"]} cells), retrain {cfg["METHODS_RETRAIN_EPOCHS"]} epochs (C='
              f'{cfg["METHODS_RETRAIN_C"]}, {cfg["METHODS_RETRAIN_LAYERS"]} cells), test fold {cfg["METHODS_FOLD"]}')
        out['methods'] = compare_methods(
            {**common, 'EPOCHS': cfg['METHODS_EPOCHS'], 'WARMUP_EPOCHS': cfg['METHODS_EPOCHS'] // 2,
             'C': cfg['METHODS_C'], 'LAYERS': cfg['METHODS_LAYERS']},
            {**common, 'EPOCHS': cfg['METHODS_RETRAIN_EPOCHS'], 'C': cfg['METHODS_RETRAIN_C'],
             'LAYERS': cfg['METHODS_RETRAIN_LAYERS'], 'FOLD': cfg['METHODS_FOLD']})
        print(methods_table(out['methods']))
    return out


if __name__ == '__main__':
    utils.run_cli(main, DEFAULTS)
