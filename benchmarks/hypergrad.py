"""Precision and cost of the hypergradient estimators. Run through bench.py --BENCH=hypergrad (also on a CPU).

Second order (DARTS / NAS-HBO): the reference is the exact derivative of L_val(w - eta (grad_w L_train + wd w +
momentum buf), alpha) w.r.t. alpha, by autograd through the virtual step; the estimators are the finite-difference
Hessian-vector product at several radii, the exact one (HVP='exact') and first order (no virtual step).
Zeroth order (ZO-DARTS+): the reference is the derivative through its T unrolled SGD steps (momentum, weight decay,
gradient clipping); the estimators are its twin-trajectory estimate at several mu, averaged over K directions.
Errors in float64 at the same weights: relative error ||g - g*|| / ||g*|| and cosine to g*; for second order also
the error relative to the Hessian-vector term, ||g - g*|| / ||eta H v|| (the estimators share the direct part);
for zeroth order also the error of the K directional derivatives u . g* themselves (the estimator's own
precision; its estimate is their projection, (u . g) u, so its error to g* is ~1 even when they are exact).
Medians over seeds and batches.
Time and peak memory of one architecture update of each estimator in float32 on the device (zeroth order: its
K * T twin steps and the validation gradient, i.e. its cost beyond the plain weight steps).
"""
import copy
import ctypes
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

import dwconv3d
import engine
import train_search
import zo
from architect import keep_buffers


def _batch(n, cube, gen, dtype, device):
    """(n, 1, S, S, S) standardized cubes (a bright sphere of random radius in noise) and random labels.

    The labels do not depend on the cubes: the networks cannot fit them, so the losses and their gradients stay
    at the size they have during a search. (With learnable labels these tiny supernets fit the batches within a
    few steps, the cross-entropy falls to ~1e-6 and the zero-one term, exact in every estimator, dominates.)"""
    r = torch.linspace(-1, 1, cube, dtype=torch.float64)
    dist = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
    y = torch.randint(0, 2, (n,), generator=gen)
    radius = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen, dtype=torch.float64)
    x = (dist < radius).double() + 0.3 * torch.randn(n, cube, cube, cube, generator=gen, dtype=torch.float64)
    x = (x - x.mean()) / x.std()
    return x.unsqueeze(1).to(device, dtype), y.to(device)


def _setup(cfg, seed, dtype):
    """The search's model, weight optimizer and second-order architect (train_search.build, default settings but
    the supernet size), after HG_WARMUP_STEPS weight steps (momentum buffers exist, weights left the init)."""
    settings = {**train_search.DEFAULTS, 'DEVICE': cfg['DEVICE'], 'C': cfg['HG_C'], 'LAYERS': cfg['HG_LAYERS'],
                'CUBE': cfg['HG_CUBE'], 'PRIMITIVES': cfg['HG_PRIMITIVES'], 'HYPERGRAD': 'second', 'SEED': seed}
    torch.manual_seed(seed)
    model, w_opt, _, _, arch = train_search.build(settings)
    model.to(dtype)
    if cfg['HG_ALPHA_STD']:  # an architecture as mid-search, not at its initialization (1e-3 randn)
        with torch.no_grad():
            for p in model.arch_parameters():
                p.normal_(0.0, cfg['HG_ALPHA_STD'], generator=torch.Generator().manual_seed(seed + 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg['HG_WARMUP_STEPS']):
        engine.train_step(model, w_opt, *_batch(cfg['HG_BATCH'], cfg['HG_CUBE'], gen, dtype, cfg['DEVICE']),
                          model.weight_parameters(), settings['GRAD_CLIP'])
    return model, w_opt, arch, settings


def second_order_reference(arch, x_train, y_train, x_val, y_val, eta):
    """d/d alpha L_val(w'(alpha), alpha), autograd through the virtual step (its graph kept: create_graph)."""
    model, opt = arch.model, arch.w_optimizer
    group = opt.param_groups[0]
    params = dict(model.named_parameters())
    w = [params[n] for n in arch.w_names]
    with keep_buffers(model):
        g = torch.autograd.grad(F.cross_entropy(model(x_train), y_train), w, create_graph=True)
        virtual = {}
        for n, p, gi in zip(arch.w_names, w, g):
            buf = opt.state.get(p, {}).get('momentum_buffer')
            d = gi + group['weight_decay'] * p
            virtual[n] = p - eta * (d if buf is None else d + group['momentum'] * buf)
        loss = arch.arch_loss(functional_call(model, virtual, (x_val,)), y_val)
        return list(torch.autograd.grad(loss, arch.arch))


def unrolled_reference(model, opt, batches, x_val, y_val, clip, arch_loss):
    """d/d alpha L_val(w_T(alpha), alpha) through T SGD steps as torch's SGD takes them after clip_grad_norm_
    (clip, then weight decay, momentum buffer b = momentum b + d, w -= lr b), from the current weights and buffers."""
    group = opt.param_groups[0]
    names = [n for n in dict(model.named_parameters()) if n not in model.ARCH_NAMES]
    arch = {n: getattr(model, n) for n in model.ARCH_NAMES}
    params = dict(model.named_parameters())
    w = {n: params[n].detach().clone().requires_grad_() for n in names}
    bufs = {n: opt.state.get(params[n], {}).get('momentum_buffer') for n in names}
    with keep_buffers(model):  # BatchNorm on batch statistics, as in the steps (running statistics are not read)
        for x, y in batches:
            loss = F.cross_entropy(functional_call(model, {**w, **arch}, (x,)), y)
            g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
            scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
            for (n, p), gi in zip(list(w.items()), g):
                d = gi * scale + group['weight_decay'] * p
                bufs[n] = d if bufs[n] is None else group['momentum'] * bufs[n] + d
                w[n] = p - group['lr'] * bufs[n]
        loss = arch_loss(functional_call(model, {**w, **arch}, (x_val,)), y_val)
    return list(torch.autograd.grad(loss, list(arch.values())))


class _Restore:
    """Snapshot of model and weight optimizer, put back before each estimator."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        self.state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    def __call__(self):
        self.model.load_state_dict(self.state[0])
        self.opt.load_state_dict(copy.deepcopy(self.state[1]))


def zeroth_order_estimates(model, opt, settings, batches, x_val, y_val, mu, k, seed):
    """k single-direction ZO-DARTS+ estimates h_i (each a twin trajectory over `batches` from the current state, at
    alpha + mu ||alpha|| u_i) and their directions u_i, as (k, n_arch) tensors. The mean of the first j rows is the
    estimate averaged over j directions."""
    restore = _Restore(model, opt)
    for x, y in batches:  # the real trajectory: the same for every direction and mu
        engine.train_step(model, opt, x, y, model.weight_parameters(), settings['GRAD_CLIP'])
    final = copy.deepcopy(model.state_dict())
    estimates, directions = [], []
    for i in range(k):
        restore()
        a_opt = torch.optim.SGD(model.arch_parameters(), lr=0.0)  # keeps alpha; the estimate stays in .grad
        updater = zo.ZerothOrder(model, opt, a_opt, len(batches), mu, settings['GRAD_CLIP'], 'l2',
                                 settings['ZERO_ONE_WEIGHT'])
        torch.manual_seed(seed * 1000 + i)
        updater._start_period()
        for x, y in batches:
            updater._twin_step(x, y)
        model.load_state_dict(final)
        directions.append(torch.cat([d.flatten() for d in updater.twin['u']]))
        updater.arch_step(x_val, y_val)
        estimates.append(torch.cat([p.grad.flatten() for p in model.arch_parameters()]))
    restore()
    return torch.stack(estimates), torch.stack(directions)


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def _compare(est, ref):
    est, ref = est.detach(), ref.detach()
    return float((est - ref).norm() / ref.norm()), float(F.cosine_similarity(est, ref, dim=0))


def measure_errors(cfg):
    """{estimator: [(rel_err, cos, dir_err, hvp_err), ...]} over seeds x batches, in float64 (nan where a column
    does not apply)."""
    out = {}
    dtype, cube, n, dev = torch.float64, cfg['HG_CUBE'], cfg['HG_BATCH'], cfg['DEVICE']
    for seed in range(cfg['HG_SEEDS']):
        model, opt, arch, settings = _setup(cfg, seed, dtype)
        restore = _Restore(model, opt)
        eta = opt.param_groups[0]['lr']
        for b in range(cfg['HG_BATCHES']):
            gen = torch.Generator().manual_seed(10_000 + 100 * seed + b)
            batches = [_batch(n, cube, gen, dtype, dev) for _ in range(cfg['HG_ZO_T'])]
            val = _batch(n, cube, gen, dtype, dev)
            ref = _flat(second_order_reference(arch, *batches[0], *val, eta))
            with keep_buffers(model):
                virtual = arch.virtual_weights(*batches[0], eta)
                direct = arch.arch_loss(arch._call(virtual, val[0]), val[1])
                # -eta H v exactly: the reference less its direct part dL_val(w')/d alpha at fixed w'
                implicit = (ref - _flat(torch.autograd.grad(direct, arch.arch))).norm()
                first = arch.arch_loss(model(val[0]), val[1])
                cases = [('first order', _flat(torch.autograd.grad(first, arch.arch)))]
                for label, hvp, r in ([(f'fd r={r:g}', 'fd', r) for r in cfg['HG_RADII']] + [('exact', 'exact', 0)]):
                    arch.hvp, arch.hvp_r = hvp, r
                    cases.append((label, _flat(arch.second_order_grads(*batches[0], *val, eta)[1])))
            for label, est in cases:  # second-order estimators share the direct part: their error is the HVP's
                hvp_err = float((est - ref).norm() / implicit) if label != 'first order' else float('nan')
                out.setdefault(label, []).append(_compare(est, ref) + (float('nan'), hvp_err))
            restore()
            ref = _flat(unrolled_reference(model, opt, batches, *val, settings['GRAD_CLIP'], arch.arch_loss))
            for mu in cfg['HG_MUS']:  # the same directions for every mu; x1 is the first of x4's
                h, u = zeroth_order_estimates(model, opt, settings, batches, *val, mu, max(cfg['HG_DIRECTIONS']),
                                              100 * seed + b)
                dirs, true_dirs = (h * u).sum(1), u @ ref
                for k in cfg['HG_DIRECTIONS']:
                    dir_err = float((dirs[:k] - true_dirs[:k]).norm() / true_dirs[:k].norm())
                    row = _compare(h[:k].mean(0), ref) + (dir_err, float('nan'))
                    out.setdefault(f'zo mu={mu:g} x{k}', []).append(row)
            print(f'  seed {seed} batch {b}: ' + ', '.join(f'{k} {v[-1][0]:.3g}' for k, v in out.items()), flush=True)
        print(f'  seed {seed}: ||alpha, beta|| {float(_flat(arch.arch).detach().norm()):.3g}', flush=True)
    return out


try:
    _libc = ctypes.CDLL('libc.so.6')
except OSError:  # not glibc: peaks then include memory the allocator kept from earlier steps
    _libc = None


def _peak_probe(device):
    """(reset, read) of peak memory in MB above the level at reset: CUDA's allocator statistics, or on a CPU the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs; Linux)."""
    if str(device).startswith('cuda'):
        def reset():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return reset, lambda base: (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20

    def status(key):
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    if _libc is not None:  # large blocks straight from and back to the OS, so that freed memory leaves the RSS
        _libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (fixed: no longer raised after frees)

    def reset():
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return status('VmRSS')
    return reset, lambda base: status('VmHWM') - base


def time_estimators(cfg):
    """{estimator: (ms, peak MB)} of one architecture update in float32 on the device (median of HG_TIME_STEPS),
    with the search's AMP, CHECKPOINT_CELLS and FAST_KERNELS as bench.py's AMP, HG_CHECKPOINT_CELLS and
    HG_FAST_KERNELS set them."""
    model, opt, arch, settings = _setup(cfg, 0, torch.float32)
    model.amp, model.checkpoint_cells = cfg['AMP'], cfg['HG_CHECKPOINT_CELLS']
    dwconv3d.set_fast_kernels(cfg['HG_FAST_KERNELS'])
    gen = torch.Generator().manual_seed(1)
    cube, n, dev = cfg['HG_CUBE'], cfg['HG_BATCH'], cfg['DEVICE']
    train, val = _batch(n, cube, gen, torch.float32, dev), _batch(n, cube, gen, torch.float32, dev)
    eta = opt.param_groups[0]['lr']
    restore = _Restore(model, opt)

    def second(hvp):
        def run():
            arch.order, arch.hvp = ('first', 'fd') if hvp == 'first' else ('second', hvp)
            arch.step(*train, *val, eta)
        return run

    def zeroth(k):
        def run():
            updater = zo.ZerothOrder(model, opt, torch.optim.SGD(model.arch_parameters(), lr=0.0), cfg['HG_ZO_T'],
                                     cfg['HG_MUS'][0], settings['GRAD_CLIP'], 'l2', settings['ZERO_ONE_WEIGHT'])
            for _ in range(k):
                updater._start_period()
                for _ in range(cfg['HG_ZO_T']):
                    updater._twin_step(*train)
            updater.arch_step(*val)
        return run
    runs = {'first order': second('first'), 'fd': second('fd'), 'exact': second('exact')}
    runs.update({f'zo x{k}': zeroth(k) for k in cfg['HG_DIRECTIONS']})
    reset, peak = _peak_probe(dev)
    sync = torch.cuda.synchronize if str(dev).startswith('cuda') else (lambda *_: None)
    out = {}
    for name, run in runs.items():
        run()  # untimed: compilation, allocator and cuDNN warm-up
        times, peaks = [], []
        for _ in range(cfg['HG_TIME_STEPS']):
            restore()
            base = reset()
            t0 = time.perf_counter()
            run()
            sync(dev)
            times.append(1e3 * (time.perf_counter() - t0))
            peaks.append(peak(base))
        out[name] = (sorted(times)[len(times) // 2], max(peaks))
        print(f'  {name}: {out[name][0]:.0f} ms, peak +{out[name][1]:.0f} MB', flush=True)
    dwconv3d.set_fast_kernels(True)
    return out


def bench_hypergrad(cfg):
    """Rows per estimator: median rel_err, cos, dir_err over n samples (nan without HG_ERRORS), ms and peak_mb."""
    errors = measure_errors(cfg) if cfg['HG_ERRORS'] else {}
    costs = time_estimators(cfg)
    if errors:
        labels = (['first order'] + [f'fd r={r:g}' for r in cfg['HG_RADII']] + ['exact']
                  + [f'zo mu={mu:g} x{k}' for mu in cfg['HG_MUS'] for k in cfg['HG_DIRECTIONS']])
    else:  # the radius and mu change no work: one row per kind
        labels = list(costs)
    rows = []
    for label in labels:
        med = np.median(np.array(errors.get(label, [(float('nan'),) * 4]), dtype=np.float64), axis=0)
        cost = costs['fd' if label.startswith('fd') else 'zo x' + label.split(' x')[-1] if label.startswith('zo')
                     else label]
        rows.append({'estimator': label, 'rel_err': float(med[0]), 'cos': float(med[1]), 'dir_err': float(med[2]),
                     'hvp_err': float(med[3]), 'n': len(errors.get(label, [])), 'ms': cost[0], 'peak_mb': cost[1]})
    return rows


def hypergrad_table(rows):
    lines = ['| estimator | rel. error | cosine | HVP term rel. error | directional rel. error | samples | '
             'ms / arch. update | peak MB |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        lines.append(f'| {r["estimator"]} | {r["rel_err"]:.3g} | {r["cos"]:.4f} | {r["hvp_err"]:.3g} | '
                     f'{r["dir_err"]:.3g} | {r["n"]} | '
                     f'{r["ms"]:.0f} | {r["peak_mb"]:.0f} |')
    return '\n'.join(lines)
