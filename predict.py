"""Apply the fold models of a finished retrain run to a cube set: each fold model's probability of malignancy and
their mean per nodule, and optionally each nodule's 3D LayerCAM.

python predict.py --RUN=runs/<train_3D_continuation run> [--DATA=<cube set>] [--NODULES="('id1','id2')"] [--CAM=True]
Writes <RUN>/predict-<timestamp>[-TAG]/: config.json, log.txt, predictions.csv, and with CAM cam/<id>.npy (the map,
S^3 float32 in [0, 1]) and cam/<id>.png (three mid-planes through the nodule, map over the CT).
"""
import console  # first: --help answers from the source, before the heavy imports below
console.help_if_asked(__file__, __name__)
import os

import numpy as np
import pandas as pd
import torch

from figures import cam as cam_mod
import data
import dwconv3d
import genotypes
from figures import evaluation
import settings
import train_3D_continuation
import runfolder
import utils
from model import NetworkLUNA
from figures.common import fold_files

RUN = ''  # a train_3D_continuation run folder with at least one finished fold (model_fold{f}.pt, result_fold{f}.json)
DATA = ''  # cube set to predict: a folder with cubes/<id>.npy and optionally nodules.csv ('' = the run's own DATA)
NODULES = ()  # nodule ids to predict (() = every nodule of the cube set)
CAM = False  # also write each nodule's LayerCAM volume (.npy) and figure (.png), averaged over the fold models
CAM_CELLS = ()  # cells whose LayerCAM maps are fused (() = the last cell; negative indices count from the end)
BATCH_SIZE = 16  # cubes per forward pass
DEVICE = settings.default_device()  # 'cuda' or 'cpu'
FAST_KERNELS = False  # Triton depthwise kernels on CUDA (compiling them takes longer than a prediction)
TAG = ''  # suffix of the output folder name
DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules; None: any value of the type)
    'RUN': None, 'DATA': "DATA == '' or isdir(DATA)", 'NODULES': None, 'CAM': None,
    'CAM_CELLS': 'ints(CAM_CELLS)', 'BATCH_SIZE': '>= 1', 'DEVICE': 'device(DEVICE)', 'FAST_KERNELS': None,
    'TAG': None,
}


def finished_folds(run_path):
    """{fold: model path} of the folds whose model and result were written."""
    results = fold_files(run_path, 'result_fold{f}.json')
    folds = {f: p for f, p in fold_files(run_path, 'model_fold{f}.pt').items() if f in results}
    if not folds:
        raise utils.UserError(f'RUN={run_path}: no finished fold (needs model_fold<f>.pt and result_fold<f>.json, '
                              'written by train_3D_continuation.py when a fold ends)')
    return folds


def read_nodules(root):
    """The cube set's table: nodules.csv if present (nodule_id required; label and fold kept when given), else
    every cubes/<id>.npy."""
    if not os.path.isdir(os.path.join(root, 'cubes')):
        raise utils.UserError(f'DATA={root}: no cubes/ folder (a cube set holds cubes/<nodule_id>.npy)')
    path = os.path.join(root, 'nodules.csv')
    if os.path.exists(path):
        table = pd.read_csv(path, dtype={'nodule_id': str})
        if 'nodule_id' not in table.columns:
            raise utils.UserError(f'{path} lacks the column nodule_id')
    else:
        ids = sorted(f[:-4] for f in os.listdir(os.path.join(root, 'cubes')) if f.endswith('.npy'))
        table = pd.DataFrame({'nodule_id': ids})
    keep = [c for c in ('nodule_id', 'fold', 'label', 'diameter_mm') if c in table.columns]  # diameter: CAM outline
    return table[keep].reset_index(drop=True)


def select_nodules(table, ids, root):
    if not ids:
        return table
    ids = [str(i) for i in ids]
    unknown = [i for i in ids if i not in set(table['nodule_id'])]
    if unknown:
        raise utils.UserError(f'DATA={root}: no nodule {", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""} '
                              f'(the cube set has {len(table)} nodules, e.g. {", ".join(table["nodule_id"][:3])})')
    return table.set_index('nodule_id').loc[ids].reset_index()


def check_cube_size(root, table, size):
    """The models take size^3 inputs: smaller cubes are refused (larger ones are centre-cropped as in training)."""
    path = os.path.join(root, 'cubes', f'{table["nodule_id"].iloc[0]}.npy')
    if not os.path.exists(path):
        raise utils.UserError(f'DATA={root}: {path} is missing')
    shape = np.load(path, mmap_mode='r').shape
    if len(shape) != 3 or len(set(shape)) != 1 or shape[0] < size:
        raise utils.UserError(f'DATA={root}: its cubes are {"x".join(map(str, shape))} voxels; the run\'s models take '
                              f'{size}^3 cubes (CUBE={size}): use a cube set made for them')


def fold_norm(run_path, run_cfg, fold, log):
    """(mean, std) of the fold's training cubes: saved beside the model, or recomputed as the retrain did (older
    runs): every fold of the run's cube set except the test fold, or its TRAIN_FOLDS."""
    path = os.path.join(run_path, f'norm_fold{fold}.json')
    if os.path.exists(path):
        remedy = 'delete it to recompute the normalization from the cube set'
        saved = utils.read_json(path, remedy)
        try:
            return float(saved['mean']), float(saved['std'])
        except (KeyError, TypeError, ValueError) as e:
            raise utils.UserError(f'{path} is damaged ({type(e).__name__}: {e}); {remedy}') from None
    table = data.read_table(run_cfg['DATA'])
    train_folds = train_3D_continuation.train_folds_of({'TRAIN_FOLDS': (), **run_cfg}, table, fold)
    cubes = data.load_cubes(run_cfg['DATA'], data.select_folds(table, train_folds, run_cfg['DATA']), run_cfg['CUBE'])
    log(f'fold {fold}: {path} missing (older run): normalization recomputed from {run_cfg["DATA"]} '
        f'folds {train_folds}')
    return data.cube_stats(cubes)


def load_models(run_path, run_cfg, folds, device, log):
    """{fold: (model in eval mode, mean, std)}."""
    geno_path = os.path.join(run_path, 'genotype.json')
    genotype = genotypes.get_genotype(geno_path if os.path.exists(geno_path) else run_cfg['GENOTYPE'])
    models = {}
    for fold, path in folds.items():
        model = NetworkLUNA(run_cfg['C'], 2, run_cfg['LAYERS'], genotype)
        try:
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        except (RuntimeError, OSError, ValueError) as e:
            raise utils.UserError(f'{path} does not fit the run\'s genotype, C and LAYERS '
                                  f'({str(e).partition(chr(10))[0]})') from None
        models[fold] = (model.to(device).eval(), *fold_norm(run_path, run_cfg, fold, log))
    return models


@torch.no_grad()
def fold_probs(model, cubes, mean, std, batch_size, device):
    """P(malignant) of uint8 cubes (N, S, S, S) normalized with the fold's training statistics."""
    out = []
    for i in range(0, len(cubes), batch_size):
        x = torch.as_tensor(cubes[i:i + batch_size]).to(device).float().unsqueeze(1)
        out.append(torch.softmax(model((x - mean) / std).float(), 1)[:, 1].cpu())
    return torch.cat(out).numpy()


def write_cams(out_dir, table, cubes, models, probs, cells, cfg):
    """Per nodule: LayerCAM of each fold model for the class the ensemble predicts, averaged and scaled to [0, 1]."""
    os.makedirs(out_dir, exist_ok=True)
    for i, nid in enumerate(table['nodule_id']):
        target = int(probs[i] >= 0.5)
        maps = []
        for model, mean, std in models.values():
            x = (torch.as_tensor(cubes[i:i + 1]).to(cfg['DEVICE']).float().unsqueeze(1) - mean) / std
            maps.append(cam_mod.layer_cam(model, x, cells, target)[0])
        volume = cam_mod.scale01(torch.stack(maps).mean(0))[0].cpu().numpy().astype(np.float32)
        np.save(os.path.join(out_dir, f'{nid}.npy'), volume)
        label = table['label'][i] if 'label' in table.columns else float('nan')
        truth = 'unknown' if pd.isna(label) else ('malignant' if int(label) else 'benign')
        which = 'last cell' if cells is None else f'cells {", ".join(map(str, cells))} fused'
        evaluation.plot_cam(cubes[i], volume, os.path.join(out_dir, f'{nid}.png'),
                            f'nodule {nid}: P(malignant) = {probs[i]:.3f} (mean of {len(models)} fold models), '
                            f'predicted {"malignant" if target else "benign"}, label {truth}\n'
                            f'LayerCAM of class {"malignant" if target else "benign"}, {which}; '
                            f'{os.path.basename(os.path.normpath(cfg["RUN"]))}',
                            diameter_mm=table['diameter_mm'][i] if 'diameter_mm' in table.columns else None)


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    if not cfg['RUN'] or not os.path.isfile(os.path.join(cfg['RUN'], 'config.json')):  # the rule of RUN
        raise utils.UserError(f'RUN={cfg["RUN"]!r}: give a train_3D_continuation run folder (with config.json)')
    folds = finished_folds(cfg['RUN'])
    run_cfg = utils.read_json(os.path.join(cfg['RUN'], 'config.json'), 'not a usable train_3D_continuation run folder')
    root = cfg['DATA'] or run_cfg['DATA']
    table = select_nodules(read_nodules(root), cfg['NODULES'], root)
    check_cube_size(root, table, run_cfg['CUBE'])
    cells = tuple(int(c) for c in cfg['CAM_CELLS']) or None
    bad = [c for c in cells or () if not -run_cfg['LAYERS'] <= c < run_cfg['LAYERS']]
    if bad:
        raise utils.UserError(f'CAM_CELLS {bad}: the run\'s network has cells 0..{run_cfg["LAYERS"] - 1}')
    cubes = data.load_cubes(root, table, run_cfg['CUBE'])
    dwconv3d.set_fast_kernels(cfg['FAST_KERNELS'])
    out = runfolder.Run('predict', cfg, cfg['RUN'], cfg['TAG'])
    out.header(cfg, cfg['DEVICE'])
    models = load_models(cfg['RUN'], run_cfg, folds, cfg['DEVICE'], out.log)
    result = table.drop(columns=['diameter_mm'], errors='ignore')  # the diameter only outlines the LayerCAM figures
    for fold, (model, mean, std) in models.items():
        result[f'prob_fold{fold}'] = fold_probs(model, cubes, mean, std, cfg['BATCH_SIZE'], cfg['DEVICE'])
    result['prob_mean'] = result[[f'prob_fold{f}' for f in models]].mean(axis=1)
    own = os.path.abspath(root) == os.path.abspath(run_cfg['DATA'])
    if own and 'fold' in result.columns:  # the model of a nodule's own fold never trained on it
        result['prob_heldout'] = [row[f'prob_fold{int(row["fold"])}'] if int(row['fold']) in models else np.nan
                                  for _, row in result.iterrows()]
    result.to_csv(out.file('predictions.csv'), index=False)
    out.log(f'{len(result)} nodules of {root}, fold models {list(models)}: written {out.file("predictions.csv")}')
    if own:
        out.log('note: this is the run\'s own cube set: prob_fold<f> is a held-out prediction only for the nodules '
                'of fold f (prob_heldout); the other fold models may have trained on them')
    if cfg['CAM']:
        write_cams(out.file('cam'), table, cubes, models, result['prob_mean'].to_numpy(), cells, cfg)
        out.log(f'LayerCAM volumes and figures: {out.file("cam")}')
    return {'run': out.path, 'predictions': result}


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, 'rerun the same command (nothing is kept from an interrupted prediction)')
