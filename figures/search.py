"""Figures from run outputs: per-edge operation weights over the search epochs.

Drawn with the Agg canvas directly (no pyplot), so nothing needs a display and the process-wide
matplotlib backend is left alone.
"""
import csv
import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from utils import UserError

COLUMNS = ('epoch', 'cell', 'edge', 'op', 'weight')
CELLS = ('normal', 'reduce')
MAX_COLS = 7  # subplots per row: 14 edges of a 4-node cell fill two rows
LEGEND_COLS = 5  # ops per legend row
PANEL_W, PANEL_H = 2.3, 1.6  # size of one subplot with its title and ticks, inches


def _parse_row(row, csv_path, line):
    """One CSV row -> (epoch, cell, edge, op, weight); a bad value is a UserError naming file and line."""
    try:
        epoch, edge, weight = int(row['epoch']), int(row['edge']), float(row['weight'])
    except (TypeError, ValueError):
        raise UserError(f'{csv_path}, line {line}: epoch and edge must be integers and weight a number, '
                        f'got {row["epoch"]!r}, {row["edge"]!r}, {row["weight"]!r}') from None
    if row['cell'] not in CELLS:
        raise UserError(f'{csv_path}, line {line}: cell must be one of {", ".join(CELLS)}, got {row["cell"]!r}')
    if edge < 0:
        raise UserError(f'{csv_path}, line {line}: edge must be >= 0, got {edge}')
    return epoch, row['cell'], edge, row['op'], weight


def read_op_weights(csv_path):
    """Read a weights CSV into ({(cell, edge): {op: [(epoch, weight), ...]}}, ops in first-seen order)."""
    try:
        with open(csv_path, newline='') as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise UserError(f'{csv_path}: missing column(s) {", ".join(missing)} '
                                f'(need {", ".join(COLUMNS)}; found {", ".join(header) or "no header"})')
            series, ops, seen = {}, [], set()
            for row in reader:
                epoch, cell, edge, op, weight = _parse_row(row, csv_path, reader.line_num)
                if (epoch, cell, edge, op) in seen:
                    raise UserError(f'{csv_path}, line {reader.line_num}: second row for epoch {epoch}, '
                                    f'{cell} cell, edge {edge}, op {op}')
                seen.add((epoch, cell, edge, op))
                if op not in ops:
                    ops.append(op)
                series.setdefault((cell, edge), {}).setdefault(op, []).append((epoch, weight))
    except OSError as e:
        raise UserError(f'{csv_path}: cannot read ({e.strerror})') from None
    if not series:
        raise UserError(f'{csv_path}: no data rows')
    return series, ops


def state_name(state):
    """The names of cells.png (figures.diagrams): c_{k-2}, c_{k-1} for the cell inputs (states 0, 1), then the
    intermediate nodes 0, 1, ... (states 2, 3, ...)."""
    return {0: 'c$_{k-2}$', 1: 'c$_{k-1}$'}.get(state, str(state - 2))


def edge_label(edge):
    """'c_{k-2}→node 0' for an edge in DARTS order (node n has 2 + n inputs), named as in cells.png."""
    node, first = 0, 0
    while edge >= first + 2 + node:
        first += 2 + node
        node += 1
    return f'{state_name(edge - first)}→node {node}'


def _colours(ops):
    """One fixed colour per op, the same in every figure (diagrams.op_colours)."""
    from figures.diagrams import op_colours
    return op_colours(ops)


def _figure(nrows, ncols, n_ops, title):
    """Figure with an nrows x ncols grid of panels and fixed margins (in inches) for labels and legend."""
    legend_rows = math.ceil(n_ops / LEGEND_COLS)
    # Above the panels: the title, the legend, then room for the first row's panel titles.
    top = 0.1 + (0.3 if title else 0) + 0.2 * legend_rows + 0.25
    bottom, left, right = 0.45, 0.55, 0.1
    width, height = PANEL_W * ncols + left + right, PANEL_H * nrows + top + bottom
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # Fixed margins instead of constrained layout: same look, half the time for a 28-panel grid.
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=0.4, hspace=0.32)  # room for each panel's own y ticks
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False)  # y: each panel its own scale
    if title:
        fig.text(0.5, 1 - 0.08 / height, title, ha='center', va='top', fontsize=10)
    fig.text(0.5, 0.06 / height, 'epoch', ha='center', va='bottom', fontsize=8)
    fig.text(0.08 / width, 0.5, 'weight', rotation=90, ha='left', va='center', fontsize=8)
    return fig, axes, 1 - (0.1 + (0.3 if title else 0)) / height


MIN_SPAN = 0.01  # smallest y range of a weights panel: ops that differ by less than this look alike anyway


def set_weight_scale(ax, weights):
    """A weights panel's y range: its own data with a margin (after warm-up every sigmoid weight sits near 0.5, and
    a shared 0..1 axis drew them as one line), at least MIN_SPAN wide; returns (low, high)."""
    lo, hi = min(weights), max(weights)
    mid, half = (lo + hi) / 2, max(hi - lo, MIN_SPAN) / 2 * 1.1
    ax.set_ylim(mid - half, mid + half)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
    return mid - half, mid + half


def plot_op_weights(csv_path, png_path, title=None):
    """Save a PNG with one small panel per (cell, edge) showing every op's weight against the epoch.

    csv_path: rows epoch, cell ('normal'/'reduce'), edge, op, weight. Rows of a cell are laid out
    MAX_COLS panels wide; panels share the epoch axis and one legend, each scales its weights to its own data.
    Returns png_path.
    """
    series, ops = read_op_weights(csv_path)
    cells = [c for c in CELLS if any(key[0] == c for key in series)]
    edges = {c: sorted(e for cc, e in series if cc == c) for c in cells}
    ncols = min(MAX_COLS, max(len(v) for v in edges.values()))
    rows_per_cell = {c: math.ceil(len(edges[c]) / ncols) for c in cells}
    epochs = sorted({e for per_op in series.values() for pts in per_op.values() for e, _ in pts})
    colour = _colours(ops)
    fig, axes, legend_top = _figure(sum(rows_per_cell.values()), ncols, len(ops), title)
    # Markers only when there are few epochs: a single epoch would otherwise draw nothing.
    marker = 'o' if len(epochs) <= 12 else None
    row0 = 0
    for cell in cells:
        for i, edge in enumerate(edges[cell]):
            ax = axes[row0 + i // ncols][i % ncols]
            for op in ops:
                pts = sorted(series[(cell, edge)].get(op, []))
                if pts:
                    ax.plot([e for e, _ in pts], [w for _, w in pts], color=colour[op], lw=1.2,
                            marker=marker, ms=2.5)
            set_weight_scale(ax, [w for pts in series[(cell, edge)].values() for _, w in pts])
            ax.set_title(f'{cell}: {edge_label(edge)}', fontsize=7, pad=3)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3, lw=0.5)
        for j in range(len(edges[cell]), rows_per_cell[cell] * ncols):
            axes[row0 + j // ncols][j % ncols].set_visible(False)
        row0 += rows_per_cell[cell]
    axes[0][0].xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    if len(epochs) == 1:
        axes[0][0].set_xlim(epochs[0] - 1, epochs[0] + 1)
    handles = [Line2D([], [], color=colour[op], lw=2) for op in ops]
    fig.legend(handles, ops, loc='upper center', bbox_to_anchor=(0.5, legend_top), ncol=min(len(ops), LEGEND_COLS),
               fontsize=7, frameon=False, borderaxespad=0, handlelength=1.8, columnspacing=1.5)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


def generation_colours(gen):
    """A discrete colour scale of the generations: one band per generation, ticks at its whole numbers (at most 10
    ticks): (BoundaryNorm, ticks)."""
    from matplotlib.colors import BoundaryNorm
    lo, hi = int(min(gen)), int(max(gen))
    step = max(1, -(-(hi - lo + 1) // 10))
    return BoundaryNorm([g - 0.5 for g in range(lo, hi + 2)], 256), list(range(lo, hi + 1, step))


def plot_pareto(csv_path, png_path, paper_params=None, title=None):
    """Save a PNG of an evolutionary search's candidates: f1 against parameters (log scale), every evaluated
    candidate as a dot, the non-dominated front highlighted and joined, the paper genotype's size as a vertical line.

    csv_path: evaluations.csv of train_evolve.py (columns params, f1, generation). Returns png_path."""
    import numpy as np
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
    try:
        with open(csv_path, newline='') as f:
            rows = [(float(r['params']), float(r['f1']), int(r['generation'])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f'{csv_path}: cannot read params, f1 and generation ({e})') from None
    if not rows:
        raise UserError(f'{csv_path}: no data rows')
    params, f1, gen = (np.array(c) for c in zip(*rows))
    # the non-dominated front (f1, ln params), as in the search (evolution/samea.front; kept apart so that the
    # figures need nothing of the search)
    members = np.sort(NonDominatedSorting().do(np.column_stack([f1, np.log(params)]), only_non_dominated_front=True))
    members = members[np.argsort(params[members])]
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    norm, ticks = generation_colours(gen)
    dots = ax.scatter(params / 1e6, f1, c=gen, cmap='viridis', norm=norm, s=16, alpha=0.8,
                      label='evaluated candidates')
    fig.colorbar(dots, ax=ax, label='generation', ticks=ticks)
    ax.step(params[members] / 1e6, f1[members], where='post', color='tab:red', lw=1.2)
    ax.scatter(params[members] / 1e6, f1[members], facecolors='none', edgecolors='tab:red', s=60, lw=1.4,
               label=f'non-dominated front ({len(members)})')
    if paper_params:
        ax.axvline(paper_params / 1e6, color='grey', ls='--', lw=1,
                   label=f'paper genotype, C=36, 20 cells ({paper_params / 1e6:.2f} M)')
    ax.set_xscale('log')
    ax.set_xlabel('trainable parameters (millions, log scale)')
    ax.set_ylabel('f1 = error term (unitless, lower is better)')
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=7, loc='upper right')
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path
