"""Apply the fold models of a finished retrain run to a cube set, or to nodules of new CT scans: each fold model's
probability of malignancy, their mean and spread per nodule, and optionally each nodule's 3D LayerCAM.

python predict.py --RUN=runs/<train_3D_continuation run> [--DATA=<cube set>] [--NODULES="('id1','id2')"] [--CAM=True]
python predict.py --RUN=<run> --SCAN=<.mhd | .nii(.gz) | DICOM folder | folder of scans> --AT=<nodules.csv> [--CAM=True]
With SCAN, each scan goes through the preprocessing of training (scans/cubes.py: lung mask with the nodules
protected, 1 mm resampling, window, cube crop), no label needed. Everything is read and checked before the output
folder <RUN or OUT>/predict-<timestamp>[-TAG]/ is made: config.json, log.txt, predictions.csv, with SCAN the cube set
(nodules.csv, cubes/<id>.npy), with CAM cam/<id>.npy (the map, S^3 float32 in [0, 1]) and cam/<id>.png (three
mid-planes through the nodule, map over the CT). The file INCOMPLETE marks a folder whose writing was interrupted.
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)
import os
import pickle
import sys
import time

import numpy as np
import pandas as pd
import torch

import data
import dwconv3d
import genotypes
import runfolder
import settings
import train_3D_continuation
import utils
from figures import cam as cam_mod
from figures import evaluation
from figures.common import fold_files, plural, run_name
from model import NetworkLUNA
from scans import cubes as scan_cubes
from scans import luna, lungmask

RUN = ''  # a train_3D_continuation run folder with at least one finished fold (model_fold{f}.pt, result_fold{f}.json)
DATA = ''  # cube set to predict: a folder with cubes/<id>.npy and optionally nodules.csv ('' = the run's own DATA)
SCAN = ''  # instead of DATA: a CT scan (.mhd, .nii, .nii.gz, DICOM series folder) or a folder of scans
AT = ''  # with SCAN: CSV of nodules, coordX, coordY, coordZ (world mm), diameter_mm [, nodule_id] [, seriesuid or file]
SERIES = ''  # with SCAN: the DICOM series to read from a folder holding several ('' = its only series)
LUNG_ML = lungmask.LUNG_ML  # with SCAN: lung volume range (ml), as prepare.py's LUNG_ML
PROTECT_MM = lungmask.PROTECT_MM  # with SCAN: margin (mm) beyond each nodule's radius never masked, as prepare.py's
CENTRE_CHECK = 'refuse'  # with SCAN: a centre of AT with nothing denser than lung around it: 'refuse' or 'warn'
NODULES = ()  # nodule ids to predict (() = every nodule of the cube set)
CAM = False  # also write each nodule's LayerCAM volume (.npy) and figure (.png), averaged over the fold models
CAM_CELLS = ()  # cells whose LayerCAM maps are fused (() = the last cell; negative indices count from the end)
BATCH_SIZE = 16  # cubes per forward pass
DEVICE = settings.default_device()  # 'cuda' or 'cpu'
FAST_KERNELS = False  # Triton depthwise kernels on CUDA (compiling them takes longer than a prediction)
TAG = ''  # suffix of the output folder name
OUT = ''  # folder in which the output folder is made ('' = RUN; another one when RUN is read-only)
DEFAULTS = settings.settings_of(globals())
INCOMPLETE = 'INCOMPLETE'  # file in an output folder whose writing has not finished
CAM_EVERY_S = 10.0  # seconds between progress lines of the LayerCAM maps (when the console is not a terminal)
RULES = {  # allowed values of the settings above, in their order (settings.check_rules; None: any value of the type)
    'RUN': None, 'DATA': "DATA == '' or isdir(DATA)", 'SCAN': "SCAN == '' or DATA == ''",
    'AT': "AT == '' or isfile(AT)", 'SERIES': None, 'LUNG_ML': 'len(LUNG_ML) == 2 and 0 <= LUNG_ML[0] < LUNG_ML[1]',
    'PROTECT_MM': '>= 0', 'CENTRE_CHECK': "in ('refuse', 'warn')", 'NODULES': None, 'CAM': None,
    'CAM_CELLS': 'ints(CAM_CELLS)', 'BATCH_SIZE': '>= 1', 'DEVICE': 'device(DEVICE)', 'FAST_KERNELS': None,
    'TAG': None, 'OUT': None,
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
    """The cube set's table: nodules.csv if present (nodule_id required; label and fold kept when given) and the
    unlabelled cubes of unlabelled.csv (nodclsgbt.py, own label table), else every cubes/<id>.npy."""
    if not os.path.isdir(os.path.join(root, 'cubes')):
        raise utils.UserError(f'DATA={root}: no cubes/ folder (a cube set holds cubes/<nodule_id>.npy)')
    tables = []
    for name in ('nodules.csv', 'unlabelled.csv'):
        path = os.path.join(root, name)
        if os.path.exists(path):
            try:
                table = pd.read_csv(path, dtype={'nodule_id': str})
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                raise utils.UserError(f'{path} cannot be parsed: {str(e).strip()[:200]}') from None
            if 'nodule_id' not in table.columns:
                raise utils.UserError(f'{path} lacks the column nodule_id')
            tables.append(table)
    if tables:
        table = pd.concat(tables, ignore_index=True)
    else:
        ids = sorted(f[:-4] for f in os.listdir(os.path.join(root, 'cubes')) if f.endswith('.npy'))
        table = pd.DataFrame({'nodule_id': ids})
    if table.empty:
        raise utils.UserError(f'DATA={root}: no nodules (its tables have no rows, or cubes/ holds no .npy files)')
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
    runs): every fold of the run's cube set except the test fold, or its TRAIN_FOLDS. A std that is not a finite
    positive number is refused (it would make every probability of that fold model NaN)."""
    path = os.path.join(run_path, f'norm_fold{fold}.json')
    if os.path.exists(path):
        remedy = 'delete it to recompute the normalization from the cube set'
        saved = utils.read_json(path, remedy)
        try:
            mean, std = float(saved['mean']), float(saved['std'])
        except (KeyError, TypeError, ValueError) as e:
            raise utils.UserError(f'{path} is damaged ({type(e).__name__}: {e}); {remedy}') from None
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise utils.UserError(f'{path} is damaged (mean {mean}, std {std}: std must be a finite number > 0); '
                                  f'{remedy}')
        return mean, std
    table = data.read_table(run_cfg['DATA'])
    train_folds = train_3D_continuation.train_folds_of({'TRAIN_FOLDS': (), **run_cfg}, table, fold)
    cubes = data.load_cubes(run_cfg['DATA'], data.select_folds(table, train_folds, run_cfg['DATA']), run_cfg['CUBE'])
    log(f'fold {fold}: {path} missing (older run): normalization recomputed from {run_cfg["DATA"]} '
        f'folds {train_folds}')
    return data.cube_stats(cubes)


def run_genotype(run_path, run_cfg):
    """The run's genotype.json, or its GENOTYPE setting when the file is missing (older runs); a damaged file is
    one line saying what to do."""
    path = os.path.join(run_path, 'genotype.json')
    if not os.path.exists(path):
        return genotypes.get_genotype(run_cfg['GENOTYPE'])
    try:
        return genotypes.get_genotype(path)
    except utils.UserError as e:
        raise utils.UserError(f'{e}: copy the genotype.json of the search that gave this run over it, or delete it to '
                              f'use the GENOTYPE={run_cfg["GENOTYPE"]!r} of {run_path}/config.json') from None


def load_models(run_path, run_cfg, folds, device, log):
    """{fold: (model in eval mode, mean, std)}; a model file that is not a state dict of the run's network (cut
    short, random bytes, another network) is one UserError naming it."""
    genotype = run_genotype(run_path, run_cfg)
    models = {}
    for fold, path in folds.items():
        # the FactorizedReduce form the run was trained with (a run folder older than the setting: the former one)
        model = NetworkLUNA(run_cfg['C'], 2, run_cfg['LAYERS'], genotype,
                            reduce_shift=settings.trained_with(run_cfg, 'REDUCE_SHIFT'))
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            garbled = isinstance(e, (EOFError, pickle.UnpicklingError))
            why = 'cut short, or not a file that torch.save wrote' if garbled else str(e).partition(chr(10))[0][:120]
            raise utils.UserError(f'{path} is not a readable model file ({type(e).__name__}: {why}); retrain that '
                                  'fold') from None
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError, ValueError) as e:
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


def write_cams(out_dir, table, cubes, models, probs, cells, cfg, log):
    """Per nodule: LayerCAM of each fold model for the class the ensemble predicts, averaged and scaled to [0, 1];
    each file is written whole (a temporary name, then renamed). Progress with the time left."""
    os.makedirs(out_dir, exist_ok=True)
    which = 'last cell' if cells is None else f'cells {", ".join(map(str, cells))} fused'
    log(f'LayerCAM: {len(table)} maps to make (one per nodule, each from {len(models)} fold models, {which}), '
        f'into {out_dir}')
    t0 = time.time()
    for i, nid in utils.progress(list(enumerate(table['nodule_id'])), desc='LayerCAM maps', every_s=CAM_EVERY_S):
        target = int(probs[i] >= 0.5)
        maps = []
        for model, mean, std in models.values():
            x = (torch.as_tensor(cubes[i:i + 1]).to(cfg['DEVICE']).float().unsqueeze(1) - mean) / std
            maps.append(cam_mod.layer_cam(model, x, cells, target)[0])
        volume = cam_mod.scale01(torch.stack(maps).mean(0))[0].cpu().numpy().astype(np.float32)
        luna.save_npy_atomic(os.path.join(out_dir, f'{nid}.npy'), volume)
        label = table['label'][i] if 'label' in table.columns else float('nan')
        truth = 'unknown' if pd.isna(label) else ('malignant' if int(label) else 'benign')
        evaluation.plot_cam(cubes[i], volume, os.path.join(out_dir, f'{nid}.png'),  # written whole (common.save)
                            f'nodule {nid}: P(malignant) = {probs[i]:.3f} '
                            f'(mean of {plural(len(models), "fold model")}), '
                            f'predicted {"malignant" if target else "benign"}, label {truth}\n'
                            f'LayerCAM of class {"malignant" if target else "benign"}, {which}; '
                            f'{run_name(cfg["RUN"])}' + scan_warning(table, i),
                            diameter_mm=table['diameter_mm'].iloc[i] if 'diameter_mm' in table.columns else None)
    log(f'LayerCAM: {len(table)} maps in {time.time() - t0:.0f} s: {out_dir}')


def scan_warning(table, i):
    """A figure title's last lines: the warning of the nodule's scan (lung mask of an unusual volume), if any."""
    warning = table['scan_warning'].iloc[i] if 'scan_warning' in table.columns else ''
    return '\nWARNING: ' + warning.replace('; ', ';\n') if isinstance(warning, str) and warning else ''


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    if not cfg['RUN'] or not os.path.isfile(os.path.join(cfg['RUN'], 'config.json')):  # the rule of RUN
        raise utils.UserError(f'RUN={cfg["RUN"]!r}: give a train_3D_continuation run folder (with config.json)')
    if cfg['AT'] and not cfg['SCAN']:
        raise utils.UserError('AT is the nodule table of SCAN: give SCAN=<scan or folder of scans> too')
    folds = finished_folds(cfg['RUN'])
    run_cfg = utils.read_json(os.path.join(cfg['RUN'], 'config.json'), 'not a usable train_3D_continuation run folder')
    cells = tuple(int(c) for c in cfg['CAM_CELLS']) or None
    bad = [c for c in cells or () if not -run_cfg['LAYERS'] <= c < run_cfg['LAYERS']]
    if bad:
        raise utils.UserError(f'CAM_CELLS {bad}: the run\'s network has cells 0..{run_cfg["LAYERS"] - 1}')
    notes = []
    models = load_models(cfg['RUN'], run_cfg, folds, cfg['DEVICE'], notes.append)  # checked before any output
    if cfg['SCAN']:
        root = cfg['SCAN']
        table, cubes, geometries, more = scan_cubes.nodule_cubes(
            cfg['SCAN'], cfg['AT'], cfg['NODULES'], run_cfg['CUBE'], tuple(cfg['LUNG_ML']), cfg['PROTECT_MM'],
            cfg['SERIES'], cfg['CENTRE_CHECK'])
        notes += more
    else:
        root, geometries = cfg['DATA'] or run_cfg['DATA'], None
        table = select_nodules(read_nodules(root), cfg['NODULES'], root)
        check_cube_size(root, table, run_cfg['CUBE'])
        cubes = data.load_cubes(root, table, run_cfg['CUBE'])
    dwconv3d.set_fast_kernels(cfg['FAST_KERNELS'])
    # a cube set's diameter only outlines the LayerCAM figures; a scan's table is echoed as given
    result = table.copy() if cfg['SCAN'] else table.drop(columns=['diameter_mm'], errors='ignore')
    for fold, (model, mean, std) in models.items():
        result[f'prob_fold{fold}'] = fold_probs(model, cubes, mean, std, cfg['BATCH_SIZE'], cfg['DEVICE'])
    probs = result[[f'prob_fold{f}' for f in models]]
    result['prob_mean'] = probs.mean(axis=1).astype(np.float32)  # float32's digits, as the fold models'
    result['prob_std'] = probs.std(axis=1, ddof=0).astype(np.float32)
    own = not cfg['SCAN'] and os.path.abspath(root) == os.path.abspath(run_cfg['DATA'])
    if own and 'fold' in result.columns:  # the model of a nodule's own fold never trained on it (float32 as the rest)
        result['prob_heldout'] = np.array([row[f'prob_fold{int(row["fold"])}'] if int(row['fold']) in models
                                           else np.nan for _, row in result.iterrows()], dtype=np.float32)
    out = output_folder(cfg)
    try:
        return write_outputs(out, cfg, result, table, cubes, models, cells, notes, root, own, geometries)
    except KeyboardInterrupt:
        print(f'{out.path} is incomplete: it holds the file {INCOMPLETE}', file=sys.stderr, flush=True)
        raise


def output_folder(cfg):
    """The new output folder in OUT (default: RUN); one line naming it and the remedy when it cannot be made."""
    parent = cfg['OUT'] or cfg['RUN']
    try:
        return runfolder.Run('predict', cfg, parent, cfg['TAG'])
    except OSError as e:
        where = e.filename or parent
        raise utils.UserError(f'cannot write the output folder {where} ({e.strerror or e}): give --OUT=<a writable '
                              f'folder> to write it there instead of in {parent}') from None


def write_outputs(out, cfg, result, table, cubes, models, cells, notes, root, own, geometries):
    """Everything of the output folder; INCOMPLETE is there until the last file is written."""
    incomplete = out.file(INCOMPLETE)
    with open(incomplete, 'w') as f:
        f.write('this prediction was interrupted: its files may be missing or partial; rerun the same command\n')
    out.header(cfg, cfg['DEVICE'])
    for note in notes:
        out.log(note)
    if geometries is not None:
        write_cube_set(out, result, cubes, geometries)
    with utils.atomic_path(out.file('predictions.csv')) as tmp:
        result.to_csv(tmp, index=False)
    out.log(f'{len(result)} nodules of {root}, fold models {list(models)}: written {out.file("predictions.csv")} '
            '(prob_mean: mean of the fold models; prob_std: their spread, a simple uncertainty)')
    out.log(utils.prediction_table(result))
    if own:
        out.log('note: this is the run\'s own cube set: prob_fold<f> is a held-out prediction only for the nodules '
                'of fold f (prob_heldout); the other fold models may have trained on them')
    if cfg['CAM']:
        write_cams(out.file('cam'), table, cubes, models, result['prob_mean'].to_numpy(), cells, cfg, out.log)
    os.remove(incomplete)
    return {'run': out.path, 'predictions': result}


def write_cube_set(out, table, cubes, geometries):
    """The cubes cut from the scans, as a cube set (nodules.csv, cubes/<id>.npy; DATA of a later predict.py), and
    each scan's geometry (geometry/<seriesuid>.json: world -> voxel of its preprocessed volume)."""
    for name in ('cubes', 'geometry'):
        os.makedirs(out.file(name), exist_ok=True)
    for nid, cube in zip(table['nodule_id'], cubes):
        luna.save_npy_atomic(os.path.join(out.file('cubes'), f'{nid}.npy'), cube)
    for name, geometry in geometries.items():
        utils.save_json_atomic(os.path.join(out.file('geometry'), f'{name}.json'), geometry)
    keep = [c for c in table.columns if not c.startswith('prob_')]
    with utils.atomic_path(out.file('nodules.csv')) as tmp:
        table[keep].to_csv(tmp, index=False)


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, f'nothing is written before the models, cubes and scans are read; an output '
                     f'folder begun holds the file {INCOMPLETE} (named above); rerun the same command (a new folder)')
