"""One candidate of the evolutionary search (train_evolve.py): train the network a genome describes on search-train,
measure it on search-train and search-val each epoch, stop early, and compute EMONAS' objectives.

train_candidate is the job function handed to parallel.map_jobs: module-level, picklable arguments, seeded from
(SEED, candidate index) only, and it writes its own result file, which a resumed search reads instead of training.
"""
import math
import numbers
import os
import re
import time

import numpy as np
import torch

import data
import engine
import parallel
import runfolder
import utils
from evolution.genes import GeneSpace
from model import NetworkLUNA

_DATA = {}  # (cube set, folds, split, cube, device) -> (search-train, search-val) CubeData, kept per process


def primitives_of(cfg):
    import genotypes
    return genotypes.mrfc() if cfg['PRIMITIVES'] == 'mrfc' else list(cfg['PRIMITIVES'])


def gene_space(cfg):
    return GeneSpace(primitives_of(cfg), cfg['FILTERS'], cfg['CELLS'], cfg['LRS'], cfg['CUBE'], cfg['BATCH_SIZE'],
                     cfg['MEMORY_GB'])


def search_data(cfg):
    """(search-train, search-val) of the search folds, split by scan as train_search.py does; normalization from
    search-train. Cached in the process, so a sequence of candidates reads the cubes once."""
    key = (os.path.abspath(cfg['DATA']), tuple(cfg['SEARCH_FOLDS']), cfg['VAL_FRACTION'], cfg['SEED'], cfg['CUBE'],
           cfg['DEVICE'])
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = data.search_split(cfg['DATA'], cfg['SEARCH_FOLDS'], cfg['VAL_FRACTION'], cfg['SEED'], cfg['CUBE'],
                                       cfg['DEVICE'])
        _DATA[key][0].one_sided_shift = cfg['ONE_SIDED_SHIFT']
    return _DATA[key]


def objective_f1(m_train, m_val, val_loss, epochs, alpha, beta, last):
    """EMONAS' f1 from per-epoch metrics in [0, 1] and validation losses of the epochs run:
    alpha (1 - mean m_train) + (1 - mean m_val) over the last `last` epochs + beta (E - e_best) / E, with E the
    maximum epochs and e_best the (1-based) epoch of the lowest validation loss. Returns (f1, e_best)."""
    e_best = int(np.argmin(val_loss)) + 1
    f1 = (alpha * (1.0 - float(np.mean(m_train[-last:]))) + (1.0 - float(np.mean(m_val[-last:])))
          + beta * (epochs - e_best) / epochs)
    return f1, e_best


def worst_f1(alpha, beta):
    """f1 of a candidate whose training diverged: both metrics 0 and no best epoch (the largest possible f1)."""
    return 1.0 + alpha + beta


def fit(cfg, model, lr, seed, name, run_path):
    """Train on search-train with early stopping on search-val loss; per-epoch metrics of both sets. A NaN/inf loss
    or metric ends the training as diverged. Returns (history of lists, diverged)."""
    train, val = search_data(cfg)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr, momentum=cfg['MOMENTUM'], weight_decay=cfg['WEIGHT_DECAY'])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg['EPOCHS'])
    gen = data.make_generator(cfg['DEVICE'], seed)
    metric = cfg['METRIC']
    hist = {'m_train': [], 'm_val': [], 'val_loss': [], 'acc_val': [], 'auc_val': [], 'malignant_val': []}
    best_loss, since_best = math.inf, 0
    try:
        for epoch in range(cfg['EPOCHS']):
            model.train()
            steps = data.batches(len(train), cfg['BATCH_SIZE'], True, gen, train.device)
            engine.run_epoch(
                lambda b: engine.train_step(model, opt, *train.train_batch(b, gen), params, cfg['GRAD_CLIP']),
                steps, len(train), f'{name} epoch {epoch}', run_path, 'none')
            sched.step()
            ev_tr = engine.evaluate(model, train, cfg['BATCH_SIZE'])
            ev_va = engine.evaluate(model, val, cfg['BATCH_SIZE'])
            if not all(math.isfinite(v) for v in (ev_tr[metric], ev_va[metric], ev_va['loss'])):
                raise FloatingPointError(f'{metric} or loss not finite')
            for k, v in (('m_train', ev_tr[metric] / 100), ('m_val', ev_va[metric] / 100),
                         ('val_loss', ev_va['loss']), ('acc_val', ev_va['acc']), ('auc_val', ev_va['auc']),
                         ('malignant_val', float(np.mean(ev_va['prob'] >= 0.5)))):  # share predicted malignant
                hist[k].append(v)
            best_loss, since_best = (ev_va['loss'], 0) if ev_va['loss'] < best_loss else (best_loss, since_best + 1)
            if cfg['PATIENCE'] and since_best >= cfg['PATIENCE']:
                break
    except (utils.UserError, FloatingPointError) as e:
        if not isinstance(e, FloatingPointError) and not str(e).startswith('loss is'):
            raise
        return hist, True
    except torch.cuda.OutOfMemoryError:  # the memory guard is an estimate: such a candidate gets the worst f1 too
        torch.cuda.empty_cache()  # (deterministic, so a resumed search replays the same decision)
        return hist, True
    return hist, False


RESULT_NAME = re.compile(r'(\d+)\.json')  # candidates/<index>.json (a kill may leave a <name>.tmp beside them)
NUMBERS = ('params', 'f1', 'f2', 'm_val', 'epochs', 'seconds')  # what the search's records read


def read_candidate(path, genome=None):
    """A finished candidate's result file (train_candidate writes it), checked; `genome`: the one the search asks for.
    A damaged file (cut short, not a result of this candidate) is a UserError naming it and what to do."""
    idx = int(RESULT_NAME.fullmatch(os.path.basename(path)).group(1))
    remedy = f'delete it to train candidate {idx} again (the search is replayed from its seed)'
    result = utils.read_json(path, remedy)
    if not (isinstance(result, dict) and result.get('index') == idx and isinstance(result.get('genome'), list)
            and all(isinstance(v, int) for v in result['genome']) and isinstance(result.get('diverged'), bool)
            and all(isinstance(result.get(k), numbers.Real) for k in NUMBERS)):
        raise utils.UserError(f'{path} is not a result of candidate {idx} (damaged?): {remedy}')
    if genome is not None and tuple(result['genome']) != tuple(genome):
        raise utils.UserError(f'{path} holds genome {result["genome"]}, the search now asks for {list(genome)}: '
                              'the run folder comes from other code or settings; start a new run')
    return result


def check_candidates(folder):
    """Read every result file in a run folder's candidates/ (check before a resumed search deletes its outputs)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names:
        if RESULT_NAME.fullmatch(name):
            read_candidate(os.path.join(folder, name))


def candidate_seed(seed, idx):
    """Training seed of candidate idx: depends on the candidate, not on what the process ran before."""
    return seed * 1_000_003 + idx


def train_candidate(cfg, idx, genome, path):
    """Train candidate `idx` (genome) and write its result json to `path`; an existing file is read instead."""
    if os.path.exists(path):
        return read_candidate(path, genome)
    t0 = time.time()
    cfg = {**cfg, 'DEVICE': parallel.job_device(cfg['DEVICE'])}  # in a Ray task: the device Ray gave it
    geno, C, cells, lr = gene_space(cfg).decode(genome)
    seed = candidate_seed(cfg['SEED'], idx)
    runfolder.seed_everything(seed)
    model = NetworkLUNA(C, 2, cells, geno, reduce_shift=cfg['REDUCE_SHIFT']).to(cfg['DEVICE'])
    hist, diverged = fit(cfg, model, lr, seed, f'candidate {idx}', os.path.dirname(path))
    if diverged or not hist['val_loss']:
        f1, e_best = worst_f1(cfg['ALPHA'], cfg['BETA']), 0
    else:
        f1, e_best = objective_f1(hist['m_train'], hist['m_val'], hist['val_loss'], cfg['EPOCHS'], cfg['ALPHA'],
                                  cfg['BETA'], cfg['LAST_EPOCHS'])
    last = slice(-cfg['LAST_EPOCHS'], None)
    result = {'index': idx, 'genome': [int(v) for v in genome], 'params': sum(p.numel() for p in model.parameters()),
              'f1': f1, 'e_best': e_best, 'epochs': len(hist['val_loss']), 'diverged': diverged,
              **{k: float(np.mean(v[last])) if v and not diverged else float('nan') for k, v in hist.items()},
              'seconds': time.time() - t0}
    result['f2'] = math.log(result['params'])
    utils.save_json_atomic(path, result)
    return result
