"""Retrain a genotype from scratch and evaluate it by k-fold (by LUNA16 subset); continue a killed run.

python train_3D_continuation.py [config.py] [--NAME=value ...]
Each test fold f is evaluated by training on all other folds and reporting the final epoch on f.
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)
import copy
import os
import time

import torch

import data
import dwconv3d
import engine
import genotypes
import graphs
import parallel
import runfolder
import settings
import tboard
import utils
from model import NetworkLUNA

DATA = data.DEMO_DIR  # cube set folder (nodules.csv + cubes/); the demo set is built there on first use
GENOTYPE = 'NAS_HBO_PAPER'  # a registered name, or a genotype.json path (train_search.py; train_evolve.py's front/
# files also hold C, LAYERS and LR, which become this run's defaults unless given explicitly)
FOLD = 'all'  # test fold: a fold number, or 'all' for every fold in TEST_FOLDS
TEST_FOLDS = (5, 6, 7, 8, 9)  # folds evaluated when FOLD = 'all' (the paper reports 5-9)
TRAIN_FOLDS = ()  # training folds; () = every fold of the cube set except the test fold
CUBE = 32  # network input edge in voxels
EPOCHS = 600  # training epochs per fold
BATCH_SIZE = 4  # cubes per step
ONE_SIDED_SHIFT = False  # random crop: content moves 0..+2 voxels per axis before the flip (the published code pads the
# low side only); False: -2..+2
LR = 0.025  # SGD learning rate, cosine-annealed to LR_MIN over EPOCHS
LR_MIN = 0.0  # final learning rate
MOMENTUM = 0.9  # SGD momentum
WEIGHT_DECAY = 3e-4  # SGD weight decay
GRAD_CLIP = 5.0  # max gradient norm
C = 36  # initial channels
LAYERS = 20  # cells (reductions at LAYERS//3 and 2*LAYERS//3)
REDUCE_SHIFT = False  # FactorizedReduce's 2nd 1x1x1 stride-2 conv reads x one voxel on (DARTS); False: both read the
# same voxels (the published NAS-HBO code)
DROP_PATH = 0.2  # drop-path probability, rising linearly from 0 to this over the epochs
REPORT_BEST = True  # also print the best epoch on the test fold (the published, optimistic protocol)
SEED = 0  # seed of initialization and augmentation
DEVICE = settings.default_device()  # 'cuda' or 'cpu'
FAST_KERNELS = True  # Triton depthwise kernels on CUDA (dwconv3d.py): 1.8x faster retrain steps (BENCHMARKS.md)
CHECKPOINT_CELLS = False  # recompute each cell in backward instead of keeping its activations: less memory, more time
AMP = False  # bf16 autocast of the forward passes (losses, optimizer state and the search's HVP stay fp32)
CUDA_GRAPHS = False  # capture the training step once as a CUDA graph and replay it (graphs.py; CUDA only;
# off until a GPU measurement decides, BENCHMARKS.md)
PARALLEL = 'off'  # 'ray': the test folds run at once as Ray tasks, one per GPU (docs/retrain.md); 'off': in turn
RUNS = 'runs'  # folder of run folders
TAG = ''  # suffix of the run folder name
FIGURES = True  # draw the run's figures into its folder at the end (python draw.py <run folder> redraws them)
TENSORBOARD = tboard.installed()  # TensorBoard event files in the run folder (tensorboard --logdir runs), if installed
RESUME = ''  # a run folder of this script: finished folds are kept, the interrupted one continues
DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules: '>= 1' reads 'EPOCHS >= 1';
    # None: any value of the setting's type; GENOTYPE and FOLD are checked by main() before the run folder is made)
    'DATA': None, 'GENOTYPE': None, 'FOLD': None, 'TEST_FOLDS': 'folds(TEST_FOLDS)',
    'TRAIN_FOLDS': 'TRAIN_FOLDS == () or folds(TRAIN_FOLDS)', 'CUBE': 'CUBE >= 8 and CUBE % 4 == 0',
    'EPOCHS': '>= 1', 'BATCH_SIZE': '>= 1', 'ONE_SIDED_SHIFT': None,
    'LR': '>= 0', 'LR_MIN': '>= 0', 'MOMENTUM': '0 <= MOMENTUM < 1',
    'WEIGHT_DECAY': '>= 0', 'GRAD_CLIP': '> 0', 'C': '>= 1', 'LAYERS': '>= 1', 'REDUCE_SHIFT': None,
    'DROP_PATH': '0 <= DROP_PATH < 1',
    'REPORT_BEST': None, 'SEED': '>= 0', 'DEVICE': 'device(DEVICE)', 'FAST_KERNELS': None, 'CHECKPOINT_CELLS': None,
    'AMP': None, 'CUDA_GRAPHS': "not CUDA_GRAPHS or DEVICE != 'cpu'",
    'PARALLEL': "in ('off', 'ray')", 'RUNS': "!= ''", 'TAG': None, 'FIGURES': None,
    'TENSORBOARD': 'tensorboard(TENSORBOARD)', 'RESUME': None,
}


def test_folds(cfg):
    if str(cfg['FOLD']) == 'all':
        return [int(f) for f in cfg['TEST_FOLDS']]
    try:
        return [int(cfg['FOLD'])]
    except ValueError:
        raise utils.UserError(f"FOLD must be a fold number or 'all', not {cfg['FOLD']!r}") from None


def train_folds_of(cfg, table, fold):
    """The training folds of test fold `fold`, checked."""
    train_folds = [int(f) for f in cfg['TRAIN_FOLDS']] or sorted(set(table['fold']) - {fold})
    if fold in train_folds:
        raise utils.UserError(f'test fold {fold} is also in TRAIN_FOLDS {train_folds}')
    data.select_folds(table, train_folds, cfg['DATA'], 'TRAIN_FOLDS')
    return train_folds


def read_result(path, fold):
    """A finished fold's result_fold<f>.json, checked (a damaged one is named, not a traceback)."""
    result = utils.read_json(path, f'delete it to evaluate fold {fold} again from its checkpoint')
    keys = {'fold', 'params_M', 'best', *utils.METRIC_NAMES}
    if not isinstance(result, dict) or not keys <= set(result) or result['fold'] != fold:
        raise utils.UserError(f'{path} is not a result of fold {fold} (damaged?): delete it to evaluate fold {fold} '
                              'again from its checkpoint')
    return result


def check_resumed_fold(cfg, genotype, fold):
    """The files of test fold `fold` in the run folder to continue, checked before anything in it is written: its
    result if it is finished, else its last checkpoint; its metrics CSV (the figures read it too)."""
    def path(name):
        return os.path.join(cfg['RESUME'], name)
    runfolder.read_metrics(path(f'metrics_fold{fold}.csv'))
    if os.path.exists(path(f'result_fold{fold}.json')):
        read_result(path(f'result_fold{fold}.json'), fold)
    elif os.path.exists(path(f'last_fold{fold}.pt')):
        with torch.device('meta'):  # names and shapes only
            model = NetworkLUNA(cfg['C'], 2, cfg['LAYERS'], genotype, reduce_shift=cfg['REDUCE_SHIFT'])
        keys = ('model', 'opt', 'sched', 'epoch', 'rng', 'gen', 'best')
        runfolder.check_checkpoint(path(f'last_fold{fold}.pt'), keys, model,
                                   f'delete it to train fold {fold} again from its first epoch')


def fold_data(cfg, table, fold):
    """Training and test CubeData of one test fold; normalization from the training folds only."""
    train_folds = train_folds_of(cfg, table, fold)
    train, _ = data.load_split(cfg['DATA'], table, train_folds, cfg['CUBE'], cfg['DEVICE'], what='TRAIN_FOLDS')
    test, _ = data.load_split(cfg['DATA'], table, [fold], cfg['CUBE'], cfg['DEVICE'], (train.mean, train.std),
                              what='test folds')
    train.one_sided_shift = cfg['ONE_SIDED_SHIFT']
    return train, test, train_folds


def train_fold(cfg, genotype, table, fold, run):
    """Train on all other folds, evaluate on `fold` every epoch; returns final and best-epoch metrics."""
    result_path = run.file(f'result_fold{fold}.json')
    if os.path.exists(result_path):
        run.log(f'fold {fold}: finished earlier, result read from {result_path}')
        return read_result(result_path, fold)
    train, test, train_folds = fold_data(cfg, table, fold)
    run.log(f'fold {fold}: train folds {train_folds} {engine.class_balance(train.labels.cpu())}, '
            f'test {engine.class_balance(test.labels.cpu())} nodules (benign/malignant)')
    runfolder.seed_everything(cfg['SEED'] + fold)
    model = NetworkLUNA(cfg['C'], 2, cfg['LAYERS'], genotype, reduce_shift=cfg['REDUCE_SHIFT']).to(cfg['DEVICE'])
    model.amp = cfg['AMP']
    model.checkpoint_cells = cfg['CHECKPOINT_CELLS']
    params = list(model.parameters())
    opt = torch.optim.SGD(params, cfg['LR'], momentum=cfg['MOMENTUM'], weight_decay=cfg['WEIGHT_DECAY'])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg['EPOCHS'], eta_min=cfg['LR_MIN'])
    gen = data.make_generator(cfg['DEVICE'], cfg['SEED'] + fold)
    ckpt_name, objects = f'last_fold{fold}.pt', {'model': model, 'opt': opt, 'sched': sched}
    ckpt_path = run.file(ckpt_name)
    start, best = 0, {'acc': -1.0}
    metrics_name = f'metrics_fold{fold}.csv'
    if os.path.exists(ckpt_path):
        state = engine.load_state(ckpt_path, gen, objects)
        start, best = state['epoch'] + 1, state['best']
        run.log(f'fold {fold}: continuing after epoch {state["epoch"]} from {ckpt_path}')
    run.continue_metrics(start, metrics_name)
    board = tboard.Board(run.file(f'fold{fold}'), cfg['TENSORBOARD'], start)  # curves of the folds side by side
    n_params = sum(p.numel() for p in params) / 1e6
    train_step = graphs.retrain_step(model, opt, params, cfg['GRAD_CLIP'], cfg['CUDA_GRAPHS'], log=run.log)
    ev = None
    for epoch in range(start, cfg['EPOCHS']):
        t0 = time.time()
        drop = cfg['DROP_PATH'] * epoch / cfg['EPOCHS']
        graphs.set_value(model, 'drop_path_prob', drop)
        lr = float(opt.param_groups[0]['lr'])  # a device tensor with CUDA_GRAPHS
        model.train()
        steps = data.batches(len(train), cfg['BATCH_SIZE'], True, gen, train.device)
        train_loss, train_acc = engine.run_epoch(
            lambda idx: train_step(*train.train_batch(idx, gen)),
            steps, len(train), f'fold {fold} epoch {epoch}', run.path, ckpt_name,
            on_step_time=None if epoch != start else engine.step_time_logger(run.log, f'fold {fold}',
                                                                            cfg['EPOCHS'] - start))
        sched.step()
        ev = engine.evaluate(model, test, cfg['BATCH_SIZE'], f'fold {fold} test evaluation of epoch {epoch}', run.path,
                             ckpt_name)
        row = {'epoch': epoch, 'lr': lr, 'train_loss': train_loss, 'train_acc': train_acc, 'test_loss': ev['loss'],
               **{f'test_{k}': ev[k] for k in utils.METRIC_NAMES}, 'seconds': time.time() - t0}
        if ev['acc'] > best['acc']:
            best = {**{k: ev[k] for k in utils.METRIC_NAMES}, 'epoch': epoch}
        run.metrics_row(row, metrics_name)
        board.scalars({**row, 'drop_path_prob': drop}, epoch)
        board.flush()
        run.log(f'fold {fold} epoch {epoch:3d} lr {lr:.5f} train loss {row["train_loss"]:.4f} acc '
                f'{row["train_acc"]:6.2f} | test loss {ev["loss"]:.4f} acc {ev["acc"]:6.2f} sens {ev["sens"]:6.2f} '
                f'spec {ev["spec"]:6.2f} f1 {ev["f1"]:6.2f} auc {ev["auc"]:6.2f} | {row["seconds"]:.1f} s')
        engine.save_state(ckpt_path, epoch, cfg, gen, objects, best=best)
    board.close()
    if ev is None:  # every epoch was done before the interruption: evaluate the final weights again
        ev = engine.evaluate(model, test, cfg['BATCH_SIZE'], f'fold {fold} final test evaluation', run.path, ckpt_name)
    result = {'fold': fold, **{k: ev[k] for k in utils.METRIC_NAMES}, 'params_M': n_params,
              'best': {'fold': fold, **best}}
    runfolder.save_atomic(model.state_dict(), run.file(f'model_fold{fold}.pt'))
    save_fold_outputs(run, cfg, table, fold, train, train_folds, ev['prob'])
    utils.save_json_atomic(result_path, result)  # its presence marks the fold as finished on resume
    return result


def save_fold_outputs(run, cfg, table, fold, train, train_folds, prob):
    """Beside the fold's model: its normalization statistics (predict.py applies them) and the test fold's
    final-epoch probabilities (ROC curves, confusion matrices)."""
    utils.save_json_atomic(run.file(f'norm_fold{fold}.json'), {
        'mean': train.mean, 'std': train.std, 'train_folds': train_folds, 'cube': cfg['CUBE']})
    import pandas as pd  # here, not at the top: the speed benchmarks import this script where pandas is missing
    test = data.select_folds(table, [fold])  # the rows of the test CubeData, in its order
    with utils.atomic_path(run.file(f'probs_fold{fold}.csv')) as tmp:
        pd.DataFrame({'nodule_id': test['nodule_id'], 'label': test['label'], 'prob': prob}).to_csv(tmp, index=False)


def genotype_file_settings(cfg, overrides):
    """Settings stored beside the genotype in its json file ('C', 'LAYERS', 'LR': a front member of train_evolve.py)
    are this run's defaults; settings given explicitly (command line, config file, main()) win."""
    path = str(cfg['GENOTYPE'])
    if not path.endswith('.json') or not os.path.isfile(path):
        return cfg
    body = utils.read_json(path, 'a genotype.json of train_search.py or a front file of train_evolve.py')
    stored = {k: body[k] for k in ('C', 'LAYERS', 'LR') if isinstance(body, dict) and k in body and k not in overrides}
    return {**cfg, **{k: v for k, v in settings.check_settings(stored, DEFAULTS).items() if k in stored}}


def fold_job(cfg, genotype, table, fold, run):
    """One test fold as an independent job, in this process or a Ray worker: the process-wide switches come from
    the settings here, so a fold computes the same wherever it runs."""
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    dwconv3d.set_fast_kernels(cfg['FAST_KERNELS'])
    cfg = {**cfg, 'DEVICE': parallel.job_device(cfg['DEVICE'])}
    return train_fold(cfg, genotype, table, fold, run)


def run_folds(cfg, genotype, table, folds, run):
    """Results of the test folds, one after the other or as Ray tasks (PARALLEL); a failed fold stops the run
    after the others are done, and RESUME of the run folder runs only what is missing."""
    job_cfg, job_run = cfg, run
    if cfg['PARALLEL'] != 'off':  # workers run in a copy of the repo: they get absolute paths
        job_cfg = {**cfg, 'DATA': os.path.abspath(cfg['DATA'])}
        job_run = copy.copy(run)
        job_run.path = os.path.abspath(run.path)
    jobs = [(job_cfg, genotype, table, f, job_run) for f in folds]
    try:
        return parallel.map_jobs(fold_job, jobs, cfg['PARALLEL'], names=[f'fold {f}' for f in folds], log=run.log,
                                 gpus=0 if cfg['DEVICE'] == 'cpu' else None)  # DEVICE=cpu: no GPU even if there are
    except parallel.JobsFailed as e:
        raise utils.UserError(f'{e}; the finished folds are kept: --RESUME={run.path} runs the missing ones') from None


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    genotype = genotypes.get_genotype(cfg['GENOTYPE'])
    if not cfg['RESUME']:
        cfg = genotype_file_settings(cfg, overrides)
        settings.check_rules(cfg, RULES)
    data.check_cube_size(cfg['CUBE'], [op for op, _ in genotype.normal + genotype.reduce])
    folds = test_folds(cfg)
    parallel.check_mode(cfg['PARALLEL'])
    table = data.read_table(cfg['DATA'])
    data.select_folds(table, folds, cfg['DATA'], 'test folds')
    for f in folds:  # every input problem is found before the run folder is made or touched
        train_folds_of(cfg, table, f)
        if cfg['RESUME']:
            check_resumed_fold(cfg, genotype, f)
    run = runfolder.Run('train_3D_continuation', cfg, cfg['RUNS'], cfg['TAG'], path=cfg['RESUME'] or None)
    run.header(cfg, cfg['DEVICE'])
    run.log(f'genotype {cfg["GENOTYPE"]}: {genotype}')
    genotypes.save_genotype(genotype, run.file('genotype.json'))  # the run folder alone suffices for predict.py
    results = run_folds(cfg, genotype, table, folds, run)
    run.log('final epoch on each test fold (our protocol):')
    run.log(utils.results_table(results, extra=('params_M',)))
    if cfg['REPORT_BEST']:
        run.log('best epoch on each test fold (published protocol; optimistic, selected on the test fold):')
        run.log(utils.results_table([r['best'] for r in results], extra=('epoch',)))
    utils.save_json_atomic(run.file('results.json'), results)
    drawn = []
    if cfg['FIGURES']:
        from figures import runs
        drawn = runs.draw_run(run.path, run.log)
        run.log('figures: ' + ', '.join(os.path.basename(p) for p in drawn))
    tboard.retrain_end(run.path, cfg['TENSORBOARD'], cfg, results, drawn)
    return {'folds': results, 'run': run.path}


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, 'finished folds and the last epoch checkpoint are kept',
                     kept=('last_fold*.pt', 'result_fold*.json'))
