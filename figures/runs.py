"""Figures of finished runs, drawn from the files in the run folder (so they can be redrawn at any time):
search curves and the genotype's evolution (train_search), per-fold curves, ROC curves, confusion matrices and
the k-fold table (train_3D_continuation), and the LayerCAM mid-plane figure (predict.py).

draw_run(folder) draws everything a run folder supports; `python draw.py runs/<folder>` calls it.
Agg canvas only (no pyplot): no display needed, the process-wide backend is left alone.
"""
import csv
import os

import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

import genotypes
from figures import diagrams, evaluation, search
from figures.common import SEARCH_REMEDY, epoch_axis, fold_files, new_figure, read_config, read_rows, run_name, save
from utils import UserError, atomic_path

FOLD_COLOURS = 'tab10'  # one colour per test fold
NOT_KEPT = (0.93, 0.93, 0.93)  # genotype evolution: an edge the genotype does not keep


# ---------------------------------------------------------------- search

def read_search_metrics(run_path):
    """metrics.csv of a search, each row with its epoch."""
    return read_rows(os.path.join(run_path, 'metrics.csv'), ('epoch',), SEARCH_REMEDY.format(run=run_path))


def plot_search_curves(run_path, png_path=None):
    """search_curves.png: loss, accuracy and ROC AUC per epoch on search-train and search-val (metrics.csv)."""
    rows = read_search_metrics(run_path)
    warmup = read_config(run_path).get('WARMUP_EPOCHS')
    epochs = [r['epoch'] for r in rows]
    fig, axes = new_figure(12, 3.6, 1, 3)
    panels = [('loss', 'cross-entropy loss'), ('acc', 'accuracy (%)'), ('auc', 'ROC AUC (%)')]
    for ax, (key, ylabel) in zip(axes[0], panels):
        for split, name, style in (('train', 'search-train', '--'), ('val', 'search-val', '-')):
            values = [r.get(f'{split}_{key}', '') for r in rows]
            if all(isinstance(v, float) for v in values):
                ax.plot(epochs, values, style, marker='o' if len(epochs) <= 12 else None, ms=3, label=name)
        if warmup and 0 < warmup <= max(epochs):
            ax.axvline(warmup - 0.5, color='0.5', lw=0.8, ls=':', label='architecture steps start')
        epoch_axis(ax, epochs)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title('loss')
    axes[0][1].set_title('accuracy')
    axes[0][2].set_title('ROC AUC (malignant positive)')
    fig.suptitle(f'search curves: {run_name(run_path)}\nsearch-train: running values over the epoch\'s augmented '
                 'batches (weights still changing); search-val: end of epoch, no augmentation', fontsize=9)
    return save(fig, png_path or os.path.join(run_path, 'search_curves.png'))


def genotype_history(weights_csv):
    """Per-epoch genotype cells recomputed from weights.csv as the search derives them (W = op weight x edge
    weight, genotypes.derive_cell): ({cell: {epoch: [(op, input), ...]}}, ops in column order). A damaged file
    (a row missing, a bad edge weight, edges that make no whole cell) is a UserError naming it."""
    tables, ops = search.read_weights(weights_csv)
    edge_w = {}
    with open(weights_csv, newline='') as f:
        reader = csv.DictReader(f)
        for r in reader:
            try:
                edge_w[(int(r['epoch']), r['cell'], int(r['edge']))] = float(r.get('edge_weight') or 1.0)
            except ValueError:
                raise UserError(f'{weights_csv}, line {reader.line_num}: edge_weight must be a number, got '
                                f'{r.get("edge_weight")!r}: the file is damaged') from None
    history = {}
    for cell, (epochs, edges, w) in tables.items():
        steps = next((s for s in range(1, 20) if sum(2 + i for i in range(s)) == len(edges)), None)
        if steps is None or edges != list(range(len(edges))):
            raise UserError(f'{weights_csv}: the {search.CELL_NAMES[cell]} has edges {edges[0]}-{edges[-1]} '
                            f'({len(edges)}), not the 2, 5, 9, 14, ... edges 0.. of whole nodes: the file is damaged')
        history[cell] = {epoch: genotypes.derive_cell(w[t] * np.array([[edge_w[(epoch, cell, e)]] for e in edges]),
                                                      ops, steps)
                         for t, epoch in enumerate(epochs)}
    return history, ops


def edge_choices(gene, n_edges):
    """Per edge (DARTS numbering) the op the cell keeps on it, or None."""
    choice = [None] * n_edges
    for k, (op, j) in enumerate(gene):
        first = sum(2 + i for i in range(k // 2))  # node k // 2's first edge
        choice[first + j] = op
    return choice


def last_changes(history_cell, n_edges):
    """Per edge, the last epoch at which its choice (op kept, or not kept) changed; the first epoch if never."""
    epochs = sorted(history_cell)
    choices = [edge_choices(history_cell[e], n_edges) for e in epochs]
    last = [epochs[0]] * n_edges
    for k in range(1, len(epochs)):
        for e in range(n_edges):
            if choices[k][e] != choices[k - 1][e]:
                last[e] = epochs[k]
    return last


def plot_genotype_evolution(run_path, png_path=None):
    """genotype_evolution.png: per cell, which edges the genotype keeps with which op at each epoch, and the epoch
    at which each edge's choice last changed."""
    history, ops = genotype_history(os.path.join(run_path, 'weights.csv'))
    colours = diagrams.op_colours(ops)
    n_epochs = max(len(h) for h in history.values())
    warmup = read_config(run_path).get('WARMUP_EPOCHS')
    fig, axes = new_figure(min(max(9, 4 + 0.18 * n_epochs), 16), 1.2 + 2.9 * len(history), len(history), 1)
    for ax, (cell, hist) in zip(axes[:, 0], history.items()):
        epochs = sorted(hist)
        n_edges = sum(2 + i for i in range(len(hist[epochs[0]]) // 2))
        grid = np.array([[colours[c][:3] if c else NOT_KEPT for c in edge_choices(hist[e], n_edges)]
                         for e in epochs]).transpose(1, 0, 2)      # (edges, epochs, rgb)
        ax.imshow(grid, aspect='auto', interpolation='nearest',
                  extent=(epochs[0] - 0.5, epochs[-1] + 0.5, n_edges - 0.5, -0.5))
        last = last_changes(hist, n_edges)
        changed = [e for e in range(n_edges) if last[e] > epochs[0]]
        ax.scatter([last[e] - 0.5 for e in changed], changed, marker='|', s=90, color='k', lw=2)
        if warmup and epochs[0] < warmup <= epochs[-1]:
            ax.axvline(warmup - 0.5, color='k', lw=1, ls=':')
        ax.set_yticks(range(n_edges))
        ax.set_yticklabels([f'{search.edge_label(e)}, same since epoch {last[e]:g}' for e in range(n_edges)],
                           fontsize=7)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f'{search.CELL_NAMES[cell]}: op kept on each edge (grey: edge not kept)', fontsize=9)
    used = [op for op in ops if any(op in [o for g in h.values() for o, _ in g] for h in history.values())]
    handles = [Patch(color=colours[op], label=op) for op in used]
    handles.append(Patch(fc=NOT_KEPT, ec='0.6', label='not kept'))
    fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(f'genotype per epoch (recomputed from weights.csv): {run_name(run_path)}\n'
                 'black bar: the edge\'s last change; dotted line: architecture steps start', fontsize=9)
    return save(fig, png_path or os.path.join(run_path, 'genotype_evolution.png'))


# ---------------------------------------------------------------- a whole run folder

def draw_run(run_path, log=print, out_dir=None):
    """Draw every figure the files of a run folder support (search, evolutionary search or retrain run) into out_dir
    (default: the run folder); returns the PNG paths. Every input is read and checked before the first figure is
    drawn (a damaged file is one line, with nothing written). Figures whose inputs are missing (an older run, a
    search stopped before its first epoch) are skipped with a line through `log`."""
    if not os.path.isdir(run_path):
        raise UserError(f'{run_path} is not a folder (give a run folder runs/<script>-<timestamp>)')
    jobs = run_figures(run_path, out_dir or run_path, log)
    if not jobs:
        raise UserError(f'{run_path}: nothing to draw (no metrics.csv, weights.csv, metrics_fold*.csv, '
                        'evaluations.csv or genotype)')
    for check, _ in jobs:
        check()
    return [draw() for _, draw in jobs]


def run_figures(run_path, out_dir, log):
    """[(check, draw)] per figure the run folder's files support: check() reads and checks the figure's inputs (a
    UserError naming a damaged file), draw() draws it and returns its path."""
    def path(name):
        return os.path.join(run_path, name)

    def out(name):
        return os.path.join(out_dir, name)
    cfg = read_config(run_path)
    name = run_name(run_path)
    jobs = []
    if os.path.exists(path('weights.csv')):
        weights = path('weights.csv')
        title = f'op weights per edge and epoch: {name}'
        jobs += [(lambda: genotype_history(weights),
                  lambda: search.plot_op_weights(weights, out('weights.png'), title)),
                 (lambda: None, lambda: plot_genotype_evolution(run_path, out('genotype_evolution.png')))]
        if os.path.exists(path('metrics.csv')):
            jobs.append((lambda: read_search_metrics(run_path),
                         lambda: plot_search_curves(run_path, out('search_curves.png'))))
    if os.path.exists(path('evaluations.csv')):
        jobs.append((lambda: search.read_evaluations(path('evaluations.csv')),
                     lambda: search.plot_pareto(path('evaluations.csv'), out('pareto.png'), run=name)))
    if fold_files(run_path, 'metrics_fold{f}.csv'):
        jobs.append((lambda: evaluation.read_curves(run_path),
                     lambda: evaluation.plot_retrain_curves(run_path, out('retrain_curves.png'))))
    if fold_files(run_path, 'probs_fold{f}.csv'):
        jobs += [(lambda: evaluation.read_probs(run_path), lambda: evaluation.plot_roc(run_path, out('roc.png'))),
                 (lambda: None, lambda: evaluation.plot_confusion(run_path, out('confusion.png')))]
    elif fold_files(run_path, 'result_fold{f}.json'):
        log(f'{run_path}: no probs_fold*.csv (a run from before they were saved): no ROC or confusion figure')
    if fold_files(run_path, 'result_fold{f}.json'):
        jobs.append((lambda: evaluation.read_results(run_path),
                     lambda: evaluation.plot_kfold_table(run_path, out('kfold_table.png'))))
    genotype = path('genotype.json') if os.path.exists(path('genotype.json')) else cfg.get('GENOTYPE')
    if genotype and (genotype in genotypes.GENOTYPES or os.path.isfile(genotype)):
        jobs.append((lambda: genotypes.get_genotype(genotype),
                     lambda: diagrams.plot_genotype(genotype, out('cells.png'), genotype_title(genotype))))
    elif genotype:
        log(f'{run_path}: genotype {genotype} not found from here: no cell diagram')
    return jobs


def genotype_title(genotype):
    """A registered name as it is; a genotype file by its name in its run folder (no machine path)."""
    if genotype in genotypes.GENOTYPES:
        return genotype
    return f'{run_name(os.path.dirname(os.path.abspath(genotype)))}/{os.path.basename(genotype)}'


def to_palette(png_path):
    """Rewrite a PNG with a 256-colour palette (about 3x smaller; for pictures kept in the repository)."""
    from PIL import Image
    with Image.open(png_path) as img:
        small = img.convert('RGB').quantize(256, method=Image.Quantize.FASTOCTREE)  # keeps small-area colours
    with atomic_path(str(png_path)) as tmp:  # whole or not at all, as every figure
        small.save(tmp, format='PNG', optimize=True)
    return png_path
