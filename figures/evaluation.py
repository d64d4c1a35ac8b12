"""Figures of the k-fold evaluation (train_3D_continuation run folders) and of LayerCAM maps (predict.py).

Per fold: train/test loss and accuracy curves (metrics_fold{f}.csv), ROC curves of the test folds with the mean
(probs_fold{f}.csv), confusion matrices at the final epoch (probs_fold{f}.csv, threshold 0.5), and the k-fold
table (result_fold{f}.json) as a figure.
"""
import os

import numpy as np
from matplotlib import colormaps

from figures.common import epoch_axis, fold_files, new_figure, plural, read_rows, run_name, save
from utils import METRIC_NAMES, UserError, read_json

METRIC_TITLES = {'acc': 'accuracy', 'sens': 'sensitivity', 'spec': 'specificity', 'f1': 'F1', 'auc': 'ROC AUC'}


def fold_colour(i):
    return colormaps['tab10'](i % 10)


CURVE_COLUMNS = ('epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc')  # of metrics_fold{f}.csv


def resume_remedy(run_path, fold, what):
    return (f'{what}; train_3D_continuation.py writes it as fold {fold} trains: continue the run (python '
            f'train_3D_continuation.py --RESUME={run_path}), or delete the file to draw the other folds')


def read_curves(run_path):
    """{fold: rows} of metrics_fold{f}.csv, each row with the numbers retrain_curves.png draws; an empty or damaged
    file is a UserError with what to do."""
    return {fold: read_rows(path, CURVE_COLUMNS, resume_remedy(run_path, fold, f'fold {fold} has no finished epoch'))
            for fold, path in fold_files(run_path, 'metrics_fold{f}.csv').items()}


def plot_retrain_curves(run_path, png_path=None):
    """retrain_curves.png: per test fold, train and test loss and accuracy against the epoch; one legend below
    both panels (colour: the fold; dashed: train, solid: test)."""
    from matplotlib.lines import Line2D
    curves = read_curves(run_path)
    if not curves:
        raise UserError(f'{run_path}: no metrics_fold*.csv (not a train_3D_continuation run folder?)')
    fig, axes = new_figure(11, 4.4, 1, 2)
    all_epochs = []
    for i, (fold, rows) in enumerate(curves.items()):
        epochs = [r['epoch'] for r in rows]
        all_epochs += epochs
        marker = 'o' if len(epochs) <= 12 else None
        for ax, key in zip(axes[0], ('loss', 'acc')):
            ax.plot(epochs, [r[f'train_{key}'] for r in rows], '--', color=fold_colour(i), marker=marker, ms=3,
                    label=f'fold {fold} train')
            ax.plot(epochs, [r[f'test_{key}'] for r in rows], '-', color=fold_colour(i), marker=marker, ms=3,
                    label=f'fold {fold} test')
    for ax, (title, ylabel) in zip(axes[0], (('loss', 'cross-entropy loss'), ('accuracy', 'accuracy (%)'))):
        ax.set_title(title)
        epoch_axis(ax, all_epochs)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=fold_colour(i), lw=2, label=f'test fold {fold}') for i, fold in enumerate(curves)]
    handles += [Line2D([], [], color='0.3', ls='--', label='train (other folds)'),
                Line2D([], [], color='0.3', ls='-', label='test (the held-out fold)')]
    fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 6), fontsize=9)
    fig.suptitle(f'retraining per test fold: {run_name(run_path)}\ntrain: running values over augmented batches with '
                 'drop path; test: the held-out fold after each epoch', fontsize=9)
    return save(fig, png_path or os.path.join(run_path, 'retrain_curves.png'))


def read_probs(run_path):
    """{fold: (labels int array, probabilities array)} from probs_fold{f}.csv; a damaged file (empty, a row cut
    short, a label not 0/1, a probability not in [0, 1]) is one UserError naming its line, with what to do."""
    out = {}
    for fold, path in fold_files(run_path, 'probs_fold{f}.csv').items():
        remedy = (f'train_3D_continuation.py writes it when fold {fold} ends: delete result_fold{fold}.json and '
                  f'probs_fold{fold}.csv and continue the run (python train_3D_continuation.py --RESUME={run_path}) '
                  'to evaluate the fold again')
        rows = read_rows(path, remedy=f'the file is damaged; {remedy}')
        for i, r in enumerate(rows):
            label, prob = r.get('label'), r.get('prob')
            if label not in (0.0, 1.0) or not isinstance(prob, float) or not 0 <= prob <= 1:
                raise UserError(f'{path}, line {i + 2}: label {label!r}, prob {prob!r} (label 0 or 1, prob in [0, 1] '
                                f'expected): the file is damaged; {remedy}')
        out[fold] = (np.array([int(r['label']) for r in rows]), np.array([r['prob'] for r in rows]))
    return out


def roc_points(y, p):
    """(false positive rates, true positive rates, AUC) of one fold: malignant (label 1) is the positive class,
    ranked by P(malignant) (sklearn's roc_curve and roc_auc_score)."""
    from sklearn.metrics import roc_auc_score, roc_curve
    fpr, tpr, _ = roc_curve(y, p, pos_label=1)
    return fpr, tpr, float(roc_auc_score(y, p))


def mean_roc(curves, grid):
    """Vertical average of ROC curves [(fpr, tpr), ...]: each tpr interpolated on the fpr grid (starting at 0, as
    roc_curve's first points all lie at fpr 0), then the mean over curves."""
    tprs = []
    for fpr, tpr in curves:
        tprs.append(np.interp(grid, fpr, tpr))
        tprs[-1][0] = 0.0
    return np.mean(tprs, 0)


def plot_roc(run_path, png_path=None):
    """roc.png: the ROC curve of each test fold (final epoch) with its AUC, and with several folds their mean
    (vertical average of the true positive rate over a grid of false positive rates) with mean AUC +/- std."""
    probs = read_probs(run_path)
    if not probs:
        raise UserError(f'{run_path}: no probs_fold*.csv (written by train_3D_continuation at the end of a fold)')
    fig, axes = new_figure(5.6, 5.2)
    ax = axes[0][0]
    grid, curves, aucs = np.linspace(0, 1, 201), [], []
    for i, (fold, (y, p)) in enumerate(probs.items()):
        if len(set(y.tolist())) < 2:
            ax.plot([], [], color=fold_colour(i), label=f'fold {fold}: one class only, no ROC')
            continue
        fpr, tpr, auc = roc_points(y, p)
        aucs.append(auc)
        curves.append((fpr, tpr))
        ax.plot(fpr, tpr, color=fold_colour(i), lw=1.2 if len(probs) > 1 else 2.2, alpha=0.8 if len(probs) > 1 else 1,
                label=f'fold {fold} (AUC {auc:.3f}, n={len(y)})')
    if len(curves) > 1:  # one fold's curve is its own mean: drawn over it, the mean hid it
        ax.plot(grid, mean_roc(curves, grid), color='k', lw=2.2,
                label=f'mean of {plural(len(curves), "fold")} (AUC {np.mean(aucs):.3f} ± {np.std(aucs):.3f})')
    ax.plot([0, 1], [0, 1], ':', color='0.5', lw=1, label='chance')
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect('equal')
    ax.set_xlabel('false positive rate (1 - specificity)')
    ax.set_ylabel('true positive rate (sensitivity)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
    folds = f'test fold {next(iter(probs))}' if len(probs) == 1 else 'the test folds'
    ax.set_title(f'ROC of {folds}, final epoch\n{run_name(run_path)}', fontsize=9)
    return save(fig, png_path or os.path.join(run_path, 'roc.png'))


def confusion(y, p, threshold=0.5):
    """2x2 counts [[TN, FP], [FN, TP]]: rows the true class (benign, malignant), columns the predicted one
    (P(malignant) >= threshold: malignant)."""
    pred = (np.asarray(p) >= threshold).astype(int)
    y = np.asarray(y).astype(int)
    return np.array([[np.sum((y == t) & (pred == q)) for q in (0, 1)] for t in (0, 1)])


def plot_confusion(run_path, png_path=None):
    """confusion.png: confusion matrix of each test fold at the final epoch (P(malignant) >= 0.5), and all folds
    pooled; each cell gives the count and the share of its true class."""
    probs = read_probs(run_path)
    if not probs:
        raise UserError(f'{run_path}: no probs_fold*.csv (written by train_3D_continuation at the end of a fold)')
    panels = [(f'fold {f}', confusion(y, p)) for f, (y, p) in probs.items()]
    if len(panels) > 1:
        panels.append(('all folds', sum(m for _, m in panels)))
    fig, axes = new_figure(max(2.6 * len(panels) + 0.6, 4.4), 4.1, 1, len(panels))
    for ax, (name, m) in zip(axes[0], panels):
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap='Blues', vmin=0, vmax=1)
        for t in (0, 1):
            for q in (0, 1):
                ax.text(q, t, f'{m[t, q]}\n{100 * share[t, q]:.0f}%', ha='center', va='center', fontsize=9,
                        color='white' if share[t, q] > 0.6 else 'black')
        ax.set_xticks([0, 1], ['benign', 'malignant'], fontsize=8)
        ax.set_yticks([0, 1], ['benign', 'malignant'], fontsize=8, rotation=90, va='center')
        ax.set_xlabel('predicted', fontsize=8)
        ax.set_ylabel('true', fontsize=8)
        ax.set_title(f'{name} (n={m.sum()})', fontsize=9)
    fig.suptitle(f'confusion matrices, final epoch,\nthreshold P(malignant) = 0.5\n{run_name(run_path)}', fontsize=9)
    return save(fig, png_path or os.path.join(run_path, 'confusion.png'))


def read_results(run_path):
    """[result dict] of result_fold{f}.json in fold order, each with its fold and metrics; a damaged one is a
    UserError with what to do."""
    results = []
    for fold, path in fold_files(run_path, 'result_fold{f}.json').items():
        remedy = (f'delete it to evaluate fold {fold} again from its checkpoint (python train_3D_continuation.py '
                  f'--RESUME={run_path})')
        r = read_json(path, remedy)
        if not isinstance(r, dict) or r.get('fold') != fold or \
                not all(isinstance(r.get(k), (int, float)) for k in METRIC_NAMES):
            raise UserError(f'{path} is not a result of fold {fold} with {", ".join(METRIC_NAMES)} (damaged?): '
                            f'{remedy}')
        results.append(r)
    return results


def plot_kfold_table(run_path, png_path=None):
    """kfold_table.png: the k-fold table of the final epoch (result_fold{f}.json) with mean +/- std, in percent;
    the image cropped to the table and its title."""
    results = read_results(run_path)
    if not results:
        raise UserError(f'{run_path}: no result_fold*.json (no finished fold)')
    header = ['test fold'] + [f'{METRIC_TITLES[k]} (%)' for k in METRIC_NAMES]
    cells = [[str(r['fold'])] + [f'{r[k]:.2f}' for k in METRIC_NAMES] for r in results]
    values = np.array([[r[k] for k in METRIC_NAMES] for r in results], dtype=float)
    if len(results) > 1:  # one fold: its row is the table (a mean of one, a std of 0, would say nothing)
        cells.append(['mean ± std'] + [f'{m:.2f} ± {s:.2f}' for m, s in zip(np.nanmean(values, 0),
                                                                              np.nanstd(values, 0))])
    fig, axes = new_figure(9, 0.9 + 0.32 * (len(cells) + 1))
    ax = axes[0][0]
    ax.axis('off')
    table = ax.table(cellText=cells, colLabels=header, loc='upper center', cellLoc='center')  # under the title
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    for col in range(len(header)):
        table[0, col].set_facecolor('#dde6f2')
        if len(results) > 1:
            table[len(cells), col].set_facecolor('#f2f2f2')
    params = results[0].get('params_M')
    ax.set_title('k-fold results, final epoch on each test fold (malignant positive)'
                 + (f'; {params:.3f} M parameters' if params is not None else '') + f'\n{run_name(run_path)}',
                 fontsize=9)
    return save(fig, png_path or os.path.join(run_path, 'kfold_table.png'), crop=(table, ax.title))


# ---------------------------------------------------------------- LayerCAM

CAM_COLOURS = 'magma'  # perceptually uniform: brighter = more relevant, readable in grey too (jet is neither)
CAM_ALPHA = 0.3  # the map's opacity over the CT: the CT stays readable under it
CAM_LEVELS = (0.5, 0.8)  # contour levels of the map (scaled to 0..1), drawn over the CT


def hu_ticks(window, step=400):
    """Grey scale ticks of a windowed CT cube: (positions 0..255, HU values) at every `step` HU in the window
    [lo, hi] mapped linearly onto 0..255 (scans.lungmask.window)."""
    lo, hi = window
    hus = np.arange(np.ceil(lo / step) * step, hi + 1e-9, step)
    return (hus - lo) * 255.0 / (hi - lo), hus


def plot_cam(cube, cam, png_path, title, alpha=CAM_ALPHA, diameter_mm=None):
    """Three orthogonal planes through the cube centre (where the nodule is): the CT cube (uint8 0..255, windowed
    HU) alone above, its grey scale in HU; below, the map (0..1) over it at low opacity with its CAM_LEVELS
    contours, so the CT stays visible. diameter_mm: the nodule's annotated diameter, outlined (dashed circle, 1 mm
    voxels) in every panel. cube, cam: (S, S, S) arrays in z, y, x order."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Circle
    cube, cam = np.asarray(cube, dtype=float), np.asarray(cam, dtype=float)
    c = cube.shape[0] // 2
    if diameter_mm is not None and not (np.isfinite(diameter_mm) and diameter_mm > 0):
        diameter_mm = None  # an empty or bad cell of the table: no outline
    planes = [('axial (z = %d)', lambda v: v[c], ('x (voxel, 1 mm)', 'y (voxel, 1 mm)')),
              ('coronal (y = %d)', lambda v: v[:, c], ('x (voxel, 1 mm)', 'z (voxel, 1 mm)')),
              ('sagittal (x = %d)', lambda v: v[:, :, c], ('y (voxel, 1 mm)', 'z (voxel, 1 mm)'))]
    fig, axes = new_figure(9.6, 6.8, 2, 3)
    levels = [v for v in CAM_LEVELS if 0 < v < 1]
    for col, (name, cut, (xl, yl)) in enumerate(planes):
        for row in (0, 1):
            ax = axes[row][col]
            ax.imshow(cut(cube), cmap='gray', vmin=0, vmax=255, origin='upper')
            if row:
                ax.imshow(cut(cam), cmap=CAM_COLOURS, vmin=0, vmax=1, alpha=alpha, origin='upper')
                if np.ptp(cut(cam)) > 0:
                    ax.contour(cut(cam), levels=levels, cmap=CAM_COLOURS, vmin=0, vmax=1, linewidths=1.2)
            if diameter_mm:
                ax.add_patch(Circle((c, c), diameter_mm / 2, fill=False, ls='--', lw=1, color='#4fc3f7'))
            ax.set_xlim(-0.5, cube.shape[0] - 0.5)  # the cube's extent (a circle or contour would widen it)
            ax.set_ylim(cube.shape[0] - 0.5, -0.5)
            ax.set_title(('CT ' if not row else 'LayerCAM over CT, ') + name % c, fontsize=9)
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            ax.tick_params(labelsize=7)
    from scans.lungmask import HU_WINDOW
    grey = fig.colorbar(ScalarMappable(Normalize(0, 255), 'gray'), ax=axes[0].tolist(), shrink=0.8,
                        label=f'CT (HU; window {HU_WINDOW[0]:g} to {HU_WINDOW[1]:g})')
    positions, hus = hu_ticks(HU_WINDOW)
    grey.set_ticks(positions, labels=[f'{h:g}' for h in hus])
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), CAM_COLOURS), ax=axes[1].tolist(), shrink=0.8,
                       label='LayerCAM (0..1); lines at ' + ', '.join(f'{v:g}' for v in levels))
    for v in levels:
        bar.ax.axhline(v, color='w', lw=1)
    outline = f'\ndashed circle: the annotated nodule diameter ({diameter_mm:.1f} mm)' if diameter_mm else ''
    fig.suptitle(title + outline, fontsize=10)
    return save(fig, png_path)
