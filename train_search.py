"""Architecture search (NAS-HBO): bilevel DARTS-style search of a 3D cell on the search folds only.

python train_search.py [config.py] [--NAME=value ...]
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)

import math
import os
import time

import torch

import architect as arch_mod
import data
import dwconv3d
import engine
import genotypes
import graphs
import operations
import runfolder
import settings
import tboard
import utils
import zo
from model_search import SearchNetwork, zero_one_loss
from sparsemax import temperature

DATA = data.DEMO_DIR  # cube set folder (nodules.csv + cubes/); the demo set is built there on first use
SEARCH_FOLDS = (0, 1, 2, 3, 4)  # the only folds the search reads (the test folds are never touched)
VAL_FRACTION = 0.5  # share of the search folds' scans used as the search-validation set
CUBE = 32  # network input edge in voxels (larger cubes are centre-cropped)
EPOCHS = 50  # search epochs
WARMUP_EPOCHS = 23  # weight-only epochs before architecture updates start ("pretrain W")
BATCH_SIZE = 7  # cubes per step, for weights and architecture
ONE_SIDED_SHIFT = False  # random crop: content moves 0..+2 voxels per axis before the flip (the published code pads the
# low side only); False: -2..+2
LR = 0.1  # weight SGD learning rate, cosine-annealed to LR_MIN over EPOCHS
LR_MIN = 0.0  # final weight learning rate
MOMENTUM = 0.9  # weight SGD momentum
WEIGHT_DECAY = 3e-4  # weight SGD weight decay
GRAD_CLIP = 5.0  # max gradient norm of the weights
ARCH_LR = 6e-4  # Adam learning rate of alphas/betas
ARCH_BETA1 = 0.5  # Adam beta1 of alphas/betas (beta2 0.999)
ARCH_WEIGHT_DECAY = 1e-3  # Adam weight decay of alphas/betas
C = 16  # initial channels of the supernet
LAYERS = 8  # cells (reductions at LAYERS//3 and 2*LAYERS//3)
PC_K = 4  # partial channels: 1/PC_K of the channels go through the candidate ops
REDUCE_SHIFT = False  # FactorizedReduce's 2nd 1x1x1 stride-2 conv reads x one voxel on (DARTS); False: both read the
# same voxels (the published NAS-HBO code)
MBCONV_AFFINE = True  # the MBConv candidates' BatchNorms learn a scale and shift (the published code); False: no
# candidate's does (DARTS)
PRIMITIVES = 'mrfc'  # candidate ops: 'mrfc' (receptive-field criterion, the paper's 9) or a tuple of op names
WEIGHTS = 'sigmoid'  # op weighting: 'sigmoid' (Fair-DARTS, paper), 'softmax', or 'sparsemax' (ZO-DARTS+)
EDGE_WEIGHTS = True  # multiply each edge by sigmoid(beta)
ZERO_ONE = 'auto'  # zero-one loss on sigmoid(alpha), sigmoid(beta): 'l2', 'l1', 'off'; auto = l2 if sigmoid else off
ZERO_ONE_WEIGHT = 10.0  # weight of the zero-one loss in the architecture loss
HYPERGRAD = 'second'  # 'second' (DARTS 2nd order, paper), 'first', or 'zeroth' (ZO-DARTS+)
HVP = 'fd'  # second order: Hessian-vector product 'fd' (finite difference, paper/DARTS) or 'exact' (double backward)
HVP_R = 0.01  # second order: finite-difference radius of the Hessian-vector product is HVP_R / ||v|| (DARTS: 0.01)
ARCH_BN_STATS = False  # architecture steps' forwards at the network's weights move the BatchNorm running statistics
# too (the published code: the virtual step's and both finite-difference forwards); False: only weight steps do
TAU0 = 1.5  # sparsemax: initial temperature
TAU_FACTOR = 0.75  # sparsemax: temperature multiplied by this ...
TAU_EVERY = 5  # ... every this many epochs
ZO_T = 10  # zeroth order: weight steps between architecture updates (counted across epochs)
ZO_MU = 0.005  # zeroth order: perturbation size relative to ||alpha||
ZO_ARCH_LR = 1.5e-2  # zeroth order: Adam learning rate of alphas/betas
PATIENCE = 0  # stop when search-val accuracy has not improved for this many epochs after warm-up (0: off)
SEED = 2  # seed of model initialization, split and augmentation
DEVICE = settings.default_device()  # 'cuda' or 'cpu'
FAST_KERNELS = False  # Triton depthwise kernels on CUDA; off: this step is host-bound, they slowed it (BENCHMARKS)
CHECKPOINT_CELLS = False  # recompute each cell in backward instead of keeping its activations: less memory, more time
AMP = False  # bf16 autocast of the forward passes (losses, optimizer state and the search's HVP stay fp32)
CUDA_GRAPHS = False  # capture each search step once as a CUDA graph and replay it (graphs.py; CUDA only;
# off until a GPU measurement decides, BENCHMARKS.md)
RUNS = 'runs'  # folder of run folders
TAG = ''  # suffix of the run folder name
FIGURES = True  # draw the run's figures into its folder at the end (python draw.py <run folder> redraws them)
TENSORBOARD = tboard.installed()  # TensorBoard event files in the run folder (tensorboard --logdir runs), if installed
RESUME = ''  # a run folder of this script to continue from its last checkpoint
DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules: '>= 1' reads 'EPOCHS >= 1';
    # None: any value of the setting's type; names of ops, weightings, hypergradients are checked by build())
    'DATA': None, 'SEARCH_FOLDS': 'folds(SEARCH_FOLDS)', 'VAL_FRACTION': '0 < VAL_FRACTION < 1',
    'CUBE': 'CUBE >= 8 and CUBE % 4 == 0', 'EPOCHS': '>= 1', 'WARMUP_EPOCHS': '>= 0', 'BATCH_SIZE': '>= 1',
    'ONE_SIDED_SHIFT': None, 'LR': '>= 0', 'LR_MIN': '>= 0', 'MOMENTUM': '0 <= MOMENTUM < 1', 'WEIGHT_DECAY': '>= 0',
    'GRAD_CLIP': '> 0', 'ARCH_LR': '>= 0', 'ARCH_BETA1': '0 <= ARCH_BETA1 < 1', 'ARCH_WEIGHT_DECAY': '>= 0',
    'C': 'C >= 1 and C % PC_K == 0', 'LAYERS': '>= 3', 'PC_K': '>= 1', 'REDUCE_SHIFT': None, 'MBCONV_AFFINE': None,
    'PRIMITIVES': None, 'WEIGHTS': None, 'EDGE_WEIGHTS': None, 'ZERO_ONE': None, 'ZERO_ONE_WEIGHT': '>= 0',
    'HYPERGRAD': None, 'HVP': None, 'HVP_R': '> 0', 'ARCH_BN_STATS': None,
    'TAU0': '> 0', 'TAU_FACTOR': '0 < TAU_FACTOR <= 1', 'TAU_EVERY': '>= 1', 'ZO_T': '>= 1', 'ZO_MU': '> 0',
    'ZO_ARCH_LR': '>= 0', 'PATIENCE': '>= 0', 'SEED': '>= 0', 'DEVICE': 'device(DEVICE)', 'FAST_KERNELS': None,
    'CHECKPOINT_CELLS': None, 'AMP': None, 'CUDA_GRAPHS': "not CUDA_GRAPHS or DEVICE != 'cpu'",
    'RUNS': "!= ''", 'TAG': None, 'FIGURES': None, 'TENSORBOARD': 'tensorboard(TENSORBOARD)',
    'RESUME': None,
}


def build(cfg):
    """Model, optimizers, scheduler and architecture updater from the settings."""
    prims = genotypes.mrfc() if cfg['PRIMITIVES'] == 'mrfc' else list(cfg['PRIMITIVES'])
    for name in prims:
        operations.check_op_name(name)
    data.check_cube_size(cfg['CUBE'], prims)
    zero_one = cfg['ZERO_ONE'] if cfg['ZERO_ONE'] != 'auto' else ('l2' if cfg['WEIGHTS'] == 'sigmoid' else 'off')
    model = SearchNetwork(cfg['C'], 2, cfg['LAYERS'], prims, k=cfg['PC_K'], weighting=cfg['WEIGHTS'],
                          edge_weights=cfg['EDGE_WEIGHTS'], reduce_shift=cfg['REDUCE_SHIFT'],
                          mbconv_affine=cfg['MBCONV_AFFINE']).to(cfg['DEVICE'])
    model.amp = cfg['AMP']
    model.checkpoint_cells = cfg['CHECKPOINT_CELLS']
    zero_one_loss(model, zero_one)  # an unknown ZERO_ONE fails now, not at the first architecture step
    w_opt = torch.optim.SGD(model.weight_parameters(), cfg['LR'], momentum=cfg['MOMENTUM'],
                            weight_decay=cfg['WEIGHT_DECAY'])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg['EPOCHS'], eta_min=cfg['LR_MIN'])
    zeroth = cfg['HYPERGRAD'] == 'zeroth'
    a_opt = torch.optim.Adam(model.arch_parameters(), cfg['ZO_ARCH_LR'] if zeroth else cfg['ARCH_LR'],
                             betas=(cfg['ARCH_BETA1'], 0.999), weight_decay=cfg['ARCH_WEIGHT_DECAY'])
    if cfg['HYPERGRAD'] not in arch_mod.HYPERGRADS:
        raise utils.UserError(f'unknown HYPERGRAD {cfg["HYPERGRAD"]!r} (known: {", ".join(arch_mod.HYPERGRADS)})')
    if zeroth:
        updater = zo.ZerothOrder(model, w_opt, a_opt, cfg['ZO_T'], cfg['ZO_MU'], cfg['GRAD_CLIP'],
                                 zero_one, cfg['ZERO_ONE_WEIGHT'])
    else:
        updater = arch_mod.Architect(model, w_opt, a_opt, cfg['HYPERGRAD'], zero_one, cfg['ZERO_ONE_WEIGHT'],
                                     cfg['HVP_R'], cfg['HVP'], cfg['ARCH_BN_STATS'])
    return model, w_opt, sched, a_opt, updater


class ValStream:
    """Shuffled search-validation batches for the architecture steps, reshuffled after each pass."""

    def __init__(self, data_val, batch_size, gen):
        self.data, self.batch_size, self.gen = data_val, batch_size, gen
        self.queue = []

    def next(self):
        if not self.queue:
            self.queue = data.batches(len(self.data), self.batch_size, True, self.gen, self.data.device)
        return self.data.eval_batch(self.queue.pop(0))

    def state_dict(self):
        # The batches left in the current pass: a resumed run continues the same pass.
        return {'queue': [idx.cpu() for idx in self.queue]}

    def load_state_dict(self, state):
        self.queue = [idx.to(self.data.device) for idx in state['queue']]


def search_epoch(epoch, cfg, model, w_opt, updater, train, val_stream, gen, run, first=0, train_step=None):
    """One epoch: (after warm-up) an architecture step then a weight step per training batch (first: the first
    epoch this process runs; train_step: the step of graphs.search_steps, built once per run; None: the eager one).
    Returns loss, accuracy and ROC AUC of the training batches' predictions made during the epoch."""
    arch_on = epoch >= cfg['WARMUP_EPOCHS']
    model.train()
    set_temperature(model, cfg, epoch)

    keep = []  # (P(malignant), label) of each training batch, as predicted in its weight step

    train_step = train_step or graphs.search_steps(model, w_opt, updater, cfg['GRAD_CLIP'])

    def step(idx):
        return train_step(*train.train_batch(idx, gen), arch_on, val_stream, keep)
    steps = data.batches(len(train), cfg['BATCH_SIZE'], True, gen, train.device)
    loss, acc = engine.run_epoch(step, steps, len(train), f'search epoch {epoch}', run.path,
                                 on_step_time=phase_estimate(cfg, epoch, run, first))
    return loss, acc, engine.kept_auc(keep)


def phase_estimate(cfg, epoch, run, first):
    """At the first two steps of each phase this process runs (warm-up: weight steps only; search: architecture and
    weight steps), log their time and the phase's estimated total; None on other epochs. first: the first epoch run."""
    warmup = cfg['WARMUP_EPOCHS']
    if epoch != first and epoch != warmup:
        return None
    if epoch < warmup:
        what, epochs, n = 'warm-up (weight steps only)', min(warmup, cfg['EPOCHS']) - epoch, cfg['EPOCHS'] - warmup
        after = f'; then {n} search epoch{"s, timed at their" if n != 1 else ", timed at its"} first step' if n > 0 \
            else ''
    else:
        what, epochs, after = 'search (architecture and weight steps)', cfg['EPOCHS'] - epoch, ''
    return engine.step_time_logger(lambda line: run.log(line + (after if ' x ' in line else '')), what, epochs)


def set_temperature(model, cfg, epoch):
    """Sparsemax temperature of `epoch` (also restored on resume: the final genotype is derived at the last one)."""
    if cfg['WEIGHTS'] == 'sparsemax':
        graphs.set_value(model, 'tau', temperature(max(epoch, 0), cfg['TAU0'], cfg['TAU_FACTOR'], cfg['TAU_EVERY']))


def early_stop(cfg, epoch, best):
    """After `epoch`: has search-val accuracy not improved for PATIENCE epochs after warm-up?"""
    return bool(cfg['PATIENCE'] and epoch >= cfg['WARMUP_EPOCHS'] and best['epoch'] >= 0
                and epoch - best['epoch'] >= cfg['PATIENCE'])


def cpu_estimate(cfg, model, n_train, n_val, start, log):
    """engine.cpu_estimate of the epochs left: a weight step is a forward and backward per cube (3 passes), an
    architecture update adds passes over a training and a validation batch (second order: the virtual step, the
    validation pass and the two finite-difference passes; zeroth order: its twin weights' step)."""
    steps, batch = math.ceil(n_train / cfg['BATCH_SIZE']), cfg['BATCH_SIZE']
    warm = max(0, min(cfg['WARMUP_EPOCHS'], cfg['EPOCHS']) - start)
    arch = {'second': 12, 'first': 3, 'zeroth': 3}.get(cfg['HYPERGRAD'], 3)
    tiny = ('python train_search.py --DEVICE=cpu --SEARCH_FOLDS="(0,)" --C=4 --LAYERS=3 --CUBE=16 --EPOCHS=2 '
            '--WARMUP_EPOCHS=1 --BATCH_SIZE=8')
    return engine.cpu_estimate(model, cfg['CUBE'], 'cpu', [('warm-up', warm, steps, batch, 3),
                                                           ('search', cfg['EPOCHS'] - start - warm, steps, batch,
                                                            3 + arch)], n_val, tiny, log)


def log_weights(run, epoch, model):
    """Per-epoch op weights (and edge weights) of every edge, one CSV row per edge x op."""
    for cell in ('normal', 'reduce'):
        ops = model.op_weights(getattr(model, f'alphas_{cell}')).detach().cpu()
        edges = model.edge_weights(getattr(model, f'betas_{cell}')).detach().cpu()
        run.metrics_rows([{'epoch': epoch, 'cell': cell, 'edge': e, 'op': name, 'weight': float(ops[e, k]),
                           'edge_weight': float(edges[e])}
                          for e in range(ops.shape[0]) for k, name in enumerate(model.primitives)], 'weights.csv')


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    runfolder.seed_everything(cfg['SEED'])
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    dwconv3d.set_fast_kernels(cfg['FAST_KERNELS'])
    # Everything that can fail on the input (cube set, folds, ops, checkpoint) runs before the run folder is touched.
    train, val = data.search_split(cfg['DATA'], cfg['SEARCH_FOLDS'], cfg['VAL_FRACTION'], cfg['SEED'], cfg['CUBE'],
                                   cfg['DEVICE'])  # normalization from search-train cubes only
    train.one_sided_shift = cfg['ONE_SIDED_SHIFT']
    model, w_opt, sched, a_opt, updater = build(cfg)
    gen = data.make_generator(cfg['DEVICE'], cfg['SEED'])
    val_stream = ValStream(val, cfg['BATCH_SIZE'], gen)
    ckpt = {'model': model, 'w_opt': w_opt, 'a_opt': a_opt, 'sched': sched, 'updater': updater,
            'val_stream': val_stream}
    start, best = 0, {'acc': -1.0, 'epoch': -1, 'genotype': None}
    last = os.path.join(cfg['RESUME'], 'last.pt')
    state = None
    if cfg['RESUME'] and os.path.exists(last):
        runfolder.check_checkpoint(last, (*ckpt, 'epoch', 'rng', 'gen', 'best'), model,
                                   'delete it to start the search again from epoch 0')
        state = engine.load_state(last, gen, ckpt)
        start, best = state['epoch'] + 1, state['best']
    for name in ('metrics.csv', 'weights.csv') if cfg['RESUME'] else ():  # damaged: named before anything is written
        runfolder.read_metrics(os.path.join(cfg['RESUME'], name))
    run = runfolder.Run('train_search', cfg, cfg['RUNS'], cfg['TAG'], path=cfg['RESUME'] or None)
    run.header(cfg, cfg['DEVICE'])
    run.log(f'search folds {list(cfg["SEARCH_FOLDS"])}: search-train {engine.class_balance(train.labels.cpu())}, '
            f'search-val {engine.class_balance(val.labels.cpu())} nodules (benign/malignant), split by scan')
    if cfg['RESUME']:
        run.log(f'resumed from {last} after epoch {state["epoch"]}' if state is not None else
                f'resumed before the first checkpoint ({last} does not exist): starting from epoch 0')
        run.continue_metrics(start)
        run.continue_metrics(start, 'weights.csv')
    set_temperature(model, cfg, start - 1)  # the annealed temperature of the last finished epoch
    stopped = start > 0 and early_stop(cfg, start - 1, best)  # a resumed run that had stopped early stays stopped
    if stopped:
        run.log(f'the run had stopped early after epoch {start - 1}: no search-val improvement for '
                f'{cfg["PATIENCE"]} epochs')
    run.log(f'supernet: {sum(p.numel() for p in model.weight_parameters()) / 1e6:.3f} M weights, '
            f'candidate ops {model.primitives}')
    if cfg['DEVICE'] == 'cpu' and start < cfg['EPOCHS'] and not stopped:
        cpu_estimate(cfg, model, len(train), len(val), start, run.log)
    train_step = graphs.search_steps(model, w_opt, updater, cfg['GRAD_CLIP'], cfg['CUDA_GRAPHS'], log=run.log)
    board = tboard.search_board(run.path, cfg['TENSORBOARD'], model, a_opt, start)
    epoch = start - 1
    for epoch in range(start, cfg['EPOCHS'] if not stopped else start):
        t0 = time.time()
        lr = float(w_opt.param_groups[0]['lr'])  # a device tensor with CUDA_GRAPHS
        tr_loss, tr_acc, tr_auc = search_epoch(epoch, cfg, model, w_opt, updater, train, val_stream, gen, run,
                                               start, train_step)
        sched.step()
        ev = engine.evaluate(model, val, cfg['BATCH_SIZE'], f'search-val evaluation of epoch {epoch}', run.path)
        geno = model.genotype()
        if epoch >= cfg['WARMUP_EPOCHS'] and ev['acc'] > best['acc']:
            best = {'acc': ev['acc'], 'epoch': epoch, 'genotype': geno}
        run.log(f'epoch {epoch:3d} lr {lr:.4f} train loss {tr_loss:.4f} acc {tr_acc:6.2f} auc {tr_auc:6.2f} | '
                f'search-val loss {ev["loss"]:.4f} acc {ev["acc"]:6.2f} auc {ev["auc"]:6.2f} | '
                f'{time.time() - t0:6.1f} s')
        run.log(f'  genotype {geno}')
        w = model.edge_op_weights()
        for cell in ('normal', 'reduce'):  # W = op weight x edge weight, whose order decides the genotype
            run.log(f'  {cell} cell, per edge: leading op, its W, its lead over the next: '
                    + engine.edge_leaders(w[cell], model.primitives))
        row = {'epoch': epoch, 'lr': lr, 'train_loss': tr_loss, 'train_acc': tr_acc, 'train_auc': tr_auc,
               'val_loss': ev['loss'], 'val_acc': ev['acc'], 'val_auc': ev['auc'], 'seconds': time.time() - t0}
        run.metrics_row(row)
        log_weights(run, epoch, model)
        tboard.search_epoch(board, epoch, row, model, updater, geno)
        engine.save_state(run.file('last.pt'), epoch, cfg, gen, ckpt, best=best)
        genotypes.save_genotype(geno, run.file('genotype.json'))
        if early_stop(cfg, epoch, best):
            run.log(f'early stop: no search-val improvement for {cfg["PATIENCE"]} epochs')
            break
    return finish(run, model, best, epoch, cfg['FIGURES'], board)


def finish(run, model, best, epoch, figures=True, board=None):
    """Write the final and best-validation genotypes and the figures (and into the TensorBoard `board`); return the
    results."""
    geno = model.genotype()
    genotypes.save_genotype(geno, run.file('genotype.json'))
    if best['genotype'] is not None:
        genotypes.save_genotype(best['genotype'], run.file('genotype_best.json'))
    drawn = []
    if figures and os.path.exists(run.file('weights.csv')):
        from figures import runs
        drawn = runs.draw_run(run.path, run.log)
        run.log('figures: ' + ', '.join(os.path.basename(p) for p in drawn))
    tboard.search_end(board, epoch + 1, geno, best, drawn)
    run.log(f'final genotype (epoch {epoch}): {geno}')
    run.log(f'best search-val genotype (epoch {best["epoch"]}, acc {best["acc"]:.2f}): {best["genotype"]}')
    run.log(f'written {run.file("genotype.json")}')
    return {'genotype': geno, 'best_genotype': best['genotype'], 'best_epoch': best['epoch'], 'run': run.path,
            'epochs_done': epoch + 1}


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, 'the last epoch checkpoint is kept', kept=('last.pt',))
