"""BENCH='methods': what the sizing (benchmarks/sizing.py) reads, measured: the cube counts of each pass, and one
step of each kind as the scripts run it (batch, channels, cells, Triton kernels, CUDA graphs), first its first use
(compilation, autotuning, capture; outside the budget), then its time per step (within the budget)."""
import time

import torch

import data
import dwconv3d
import graphs
import utils
from benchmarks import step_times
from benchmarks.gpu import OverBudget, cap

# kinds of step in the order of their first use: the retrain first (every entry but the baseline needs it)
KINDS = ('retrain', 'search warm-up', 'search 1st', 'search zeroth', 'search 2nd', 'candidate')


def graphs_on(cfg):
    """(search, retrain): CUDA graphs on? 'default' follows each script's CUDA_GRAPHS; never on a CPU."""
    import train_3D_continuation
    import train_search
    cuda = str(cfg['DEVICE']).startswith('cuda')
    if cfg['METHODS_CUDA_GRAPHS'] == 'on' and not cuda:
        raise utils.UserError("bench.py: METHODS_CUDA_GRAPHS='on' needs a CUDA device (DEVICE is "
                              f"{cfg['DEVICE']!r}): use 'default' or 'off'")
    if cfg['METHODS_CUDA_GRAPHS'] != 'default':
        return (cfg['METHODS_CUDA_GRAPHS'] == 'on',) * 2
    return cuda and train_search.DEFAULTS['CUDA_GRAPHS'], cuda and train_3D_continuation.DEFAULTS['CUDA_GRAPHS']


def batches():
    """Batch of the search, the retrain and the evolutionary search's candidates: each script's own."""
    import train_3D_continuation
    import train_evolve
    import train_search
    return {'search_batch': train_search.DEFAULTS['BATCH_SIZE'],
            'retrain_batch': train_3D_continuation.DEFAULTS['BATCH_SIZE'],
            'evolve_batch': train_evolve.DEFAULTS['BATCH_SIZE']}


def data_sizes(cfg):
    """Cubes per pass, for the sizing: search-train and search-val (the searches' split), and per test fold the
    training (all other folds) and test cubes."""
    import train_search
    root = cfg['METHODS_DATA']
    try:
        table = data.read_table(root)
    except utils.UserError as e:
        raise utils.UserError(f'{e}; or build the cube set where that works and copy its folder here '
                              '(docs/gpu.md, the methods comparison)') from None
    folds = [int(f) for f in cfg['METHODS_FOLDS']]
    data.select_folds(table, folds, root, 'METHODS_FOLDS')
    search = data.select_folds(table, train_search.DEFAULTS['SEARCH_FOLDS'], root, 'the searches\' SEARCH_FOLDS')
    train, val = data.split_by_scan(search, train_search.DEFAULTS['VAL_FRACTION'], train_search.DEFAULTS['SEED'])
    return {'search_train': len(train), 'search_val': len(val),
            'retrain': [[int((table['fold'] != f).sum()), int((table['fold'] == f).sum())] for f in folds]}


def step_makers(cfg, graphed):
    """{kind: (make the step function, Triton kernels on, graphed)} as each script runs its steps."""
    import train_3D_continuation
    import train_search
    b = batches()
    net = {'DEVICE': cfg['DEVICE'], 'CUBE': cfg['CUBE'], 'AMP': cfg['AMP'], 'SEARCH_C': cfg['METHODS_C'],
           'SEARCH_LAYERS': cfg['METHODS_LAYERS'], 'RETRAIN_C': cfg['METHODS_RETRAIN_C'],
           'RETRAIN_LAYERS': cfg['METHODS_RETRAIN_LAYERS']}
    largest = {**net, 'RETRAIN_C': max(cfg['METHODS_EVOLVE_FILTERS']),
               'RETRAIN_LAYERS': max(cfg['METHODS_EVOLVE_CELLS'])}
    fast_search, fast_retrain = train_search.DEFAULTS['FAST_KERNELS'], train_3D_continuation.DEFAULTS['FAST_KERNELS']
    g_search, g_retrain = graphed

    def search(hypergrad, arch=True):
        return lambda: step_times.search_step(hypergrad, b['search_batch'], net, arch=arch, graphed=g_search)
    return {'retrain': (lambda: step_times.retrain_step(b['retrain_batch'], net, graphed=g_retrain), fast_retrain,
                        g_retrain),
            'search warm-up': (search('first', arch=False), fast_search, g_search),
            'search 1st': (search('first'), fast_search, g_search),
            'search zeroth': (search('zeroth'), fast_search, g_search),
            'search 2nd': (search('second'), fast_search, g_search),
            # the evolutionary search sets no kernel switch: the module default (on); its largest genome
            'candidate': (lambda: step_times.retrain_step(b['evolve_batch'], largest), True, False)}


def _sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)


def first_use(makers, kinds, device, steps, out, save):
    """Build each kind's step into steps[kind] and run its first calls (a graphed step: its eager warm-ups and its
    capture); the seconds of each go to out[kind] as it finishes."""
    for kind in kinds:
        make, fast, graphed = makers[kind]
        dwconv3d.set_fast_kernels(fast)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        step = make()
        for _ in range(1 + (graphs.WARMUP if graphed else 1)):
            step()
        _sync(device)
        steps[kind], out[kind] = step, time.perf_counter() - t0
        print(f'  first use of the {kind} step: {out[kind]:.1f} s', flush=True)
        save()


def time_steps(steps, makers, n, device, out, save):
    """Seconds per step of each kind (mean of n steps) into out[kind]."""
    for kind, step in steps.items():
        dwconv3d.set_fast_kernels(makers[kind][1])
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        out[kind] = (time.perf_counter() - t0) / n
        print(f'  {kind} step: {1e3 * out[kind]:.1f} ms', flush=True)
        save()


def measure(cfg, kinds, graphed, res, save, start_budget):
    """The first use of each kind (capped at METHODS_FIRST_USE_S), then start_budget() (returns the budget's seconds
    left), then the timed steps within it: into res['first_use_s'] and res['step_s']; a stop at a cap is noted."""
    makers, steps = step_makers(cfg, graphed), {}
    try:
        with cap(cfg['METHODS_FIRST_USE_S']):
            first_use(makers, kinds, cfg['DEVICE'], steps, res['first_use_s'], save)
    except OverBudget:
        res['notes'].append(f'first use: stopped at its cap of {cfg["METHODS_FIRST_USE_S"]:.0f} s')
    left = start_budget()
    try:
        with cap(left):
            time_steps(steps, makers, cfg['METHODS_MEASURE_STEPS'], cfg['DEVICE'], res['step_s'], save)
    except OverBudget:
        res['notes'].append(f'timed steps: stopped at the end of the budget ({left:.0f} s)')
