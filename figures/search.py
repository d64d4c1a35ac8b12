"""Figures of searches: which op leads on each edge and by how much over the epochs (weights.png, train_search),
the candidates of an evolutionary search against their size (pareto.png, train_evolve).

Drawn with the Agg canvas directly (no pyplot), so nothing needs a display and the process-wide
matplotlib backend is left alone.
"""
import csv

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from figures.common import epoch_axis, new_figure, save
from utils import UserError

COLUMNS = ('epoch', 'cell', 'edge', 'op', 'weight')
CELLS = ('normal', 'reduce')
PAPER_PARAMS = 12.79e6  # parameters of genotypes.NAS_HBO_PAPER at C=36, 20 cells (DESIGN.md 1; pareto.png)
CELL_NAMES = {'normal': 'normal cell', 'reduce': 'reduction cell'}  # as figures name them


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


def node_of(edge):
    """The node an edge (DARTS order) feeds and the state it comes from: (node, state)."""
    node, first = 0, 0
    while edge >= first + 2 + node:
        first += 2 + node
        node += 1
    return node, edge - first


def edge_label(edge):
    """'c_{k-2}→node 0' for an edge in DARTS order (node n has 2 + n inputs), named as in cells.png."""
    node, state = node_of(edge)
    return f'{state_name(state)}→node {node}'


def _colours(ops):
    """One fixed colour per op, the same in every figure (diagrams.op_colours)."""
    from figures.diagrams import op_colours
    return op_colours(ops)


def weight_table(series, ops, cell):
    """(epochs, edges, W) of one cell: W[t, e, o] the weight of ops[o] on edges[e] at epochs[t]; a missing row is a
    UserError naming it."""
    edges = sorted(e for c, e in series if c == cell)
    epochs = sorted({t for e in edges for pts in series[(cell, e)].values() for t, _ in pts})
    w = np.full((len(epochs), len(edges), len(ops)), np.nan)
    at = {t: i for i, t in enumerate(epochs)}
    for i, e in enumerate(edges):
        for o, op in enumerate(ops):
            for t, v in series[(cell, e)].get(op, []):
                w[at[t], i, o] = v
    missing = np.argwhere(np.isnan(w))
    if len(missing):
        t, i, o = missing[0]
        raise UserError(f'no weight of {ops[o]} on {CELL_NAMES[cell]} edge {edges[i]} at epoch {epochs[t]} '
                        f'({len(missing)} rows missing): the file is damaged')
    return epochs, edges, w


def read_weights(csv_path):
    """({cell: (epochs, edges, W)} as weight_table gives them, ops) of a weights CSV, every row checked."""
    series, ops = read_op_weights(csv_path)
    tables = {}
    for cell in CELLS:
        if any(key[0] == cell for key in series):
            try:
                tables[cell] = weight_table(series, ops, cell)
            except UserError as e:
                raise UserError(f'{csv_path}: {e}') from None
    return tables, ops


def leaders(w, ops):
    """Per edge (row of w, (edges, ops)): (index of the leading op, its lead over the runner-up). 'none' never leads
    and is no runner-up (genotypes.derive_cell never keeps it); ties go to the first op, with a lead of 0."""
    w = np.array(w, dtype=float)
    if 'none' in ops:
        w[:, list(ops).index('none')] = -np.inf
    first = np.argmax(w, 1)
    rest = w.copy()
    rest[np.arange(len(w)), first] = -np.inf
    return first, w[np.arange(len(w)), first] - rest.max(1)


def lead_history(w, leader, ops):
    """w (epochs, edges, ops), leader (edges,) op indices -> (epochs, edges): each edge's leader's weight minus the
    best other op's at every epoch ('none' left out), negative while another op led."""
    w = np.array(w, dtype=float)
    if 'none' in ops:
        w[:, :, list(ops).index('none')] = -np.inf
    rows = np.arange(w.shape[1])
    own = w[:, rows, leader]
    w[:, rows, leader] = -np.inf
    return own - w.max(2)


def lead_text(lead):
    """A lead as the figure prints it: two significant digits (the leads of a short search are ~0.001)."""
    return 'tie' if lead == 0 else f'+{lead:.2g}'


def _heat_map(fig, ax, epochs, edges, w, ops, cell, colour):
    """The final epoch of one cell: edges x ops, each weight minus its edge's mean, the leading op framed, its lead
    printed on the right. Returns the leaders."""
    from matplotlib.patches import Rectangle
    last = w[-1]
    dev = last - last.mean(1, keepdims=True)
    span = max(float(np.abs(dev).max()), 1e-12)
    image = ax.imshow(dev, cmap='RdBu_r', vmin=-span, vmax=span, aspect='auto')
    first, lead = leaders(last, ops)
    for i, o in enumerate(first):
        ax.add_patch(Rectangle((o - 0.5, i - 0.5), 1, 1, fill=False, ec='k', lw=2))
    ax.set_xticks(range(len(ops)), ops, rotation=40, ha='right', fontsize=9)
    ax.set_yticks(range(len(edges)), [edge_label(e) for e in edges], fontsize=9)
    right = ax.secondary_yaxis('right')
    right.set_yticks(range(len(edges)), [f'{ops[o]} {lead_text(v)}' for o, v in zip(first, lead)], fontsize=8)
    ax.set_title(f'{CELL_NAMES[cell]}, epoch {epochs[-1]}: the leading op framed, its lead over the runner-up on '
                 'the right', fontsize=9, loc='left')
    bar = fig.colorbar(image, ax=ax, location='bottom', shrink=0.6, aspect=30, pad=0.01)
    bar.set_label("op weight minus the edge's mean over ops", fontsize=8)
    bar.ax.xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))
    bar.ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:.2g}'))  # -0.0004, not -4 with an offset
    bar.ax.tick_params(labelsize=7)
    return first


def _lead_panels(axes, epochs, edges, w, ops, leader, cell, colour):
    """Per node: the lead of each input edge's final leader over the best other op, against the epoch."""
    history = lead_history(w, leader, ops)
    styles = ('-', '--', ':', '-.', (0, (5, 1)), (0, (1, 3)))
    for node, ax in enumerate(axes):
        mine = [i for i, e in enumerate(edges) if node_of(e)[0] == node]
        if not mine:
            ax.set_visible(False)
            continue
        ax.axhline(0, color='0.5', lw=0.8)
        for k, i in enumerate(mine):
            op = ops[leader[i]]
            ax.plot(epochs, history[:, i], ls=styles[k % len(styles)], color=colour[op], lw=1.8,
                    marker='o' if len(epochs) <= 12 else None, ms=3,
                    label=f'{state_name(node_of(edges[i])[1])}: {op}')
        epoch_axis(ax, epochs)
        ax.set_xlabel('epoch' if node == len(axes) - 1 else '', fontsize=8)
        ax.tick_params(labelsize=8, labelbottom=node == len(axes) - 1)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(title=f'node {node}, input: its leading op', title_fontsize=8, fontsize=8, handlelength=2.5,
                  loc='center left', bbox_to_anchor=(1.01, 0.5), alignment='left', frameon=False)
    axes[0].set_title(f'{CELL_NAMES[cell]}: the lead of each edge\'s final leader over its best other op\n'
                      'per epoch (below 0: another op led then)', fontsize=9, loc='left')


def plot_op_weights(csv_path, png_path, title=None):
    """Save weights.png: per cell, a heat map of the op weights on each edge at the final epoch (which op leads, by
    how much), beside each node's panel of its edges' leads over the epochs. csv_path: rows epoch, cell
    ('normal'/'reduce'), edge, op, weight. Returns png_path."""
    tables, ops = read_weights(csv_path)
    cells = list(tables)
    colour = _colours(ops)
    n_nodes = max(node_of(max(tables[c][1]))[0] + 1 for c in cells)
    n_edges = max(len(tables[c][1]) for c in cells)
    height = max(0.28 * n_edges + 2.6, 1.5 * n_nodes + 0.6)
    fig = Figure(figsize=(9.6 + 0.45 * len(ops), height * len(cells) + 0.5), layout='constrained')
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(cells), 2, width_ratios=(1.6 + 0.45 * len(ops), 7.0))
    for k, cell in enumerate(cells):
        epochs, edges, w = tables[cell]
        leader = _heat_map(fig, fig.add_subplot(grid[k, 0]), epochs, edges, w, ops, cell, colour)
        right = grid[k, 1].subgridspec(n_nodes, 1)  # one panel per node, top to bottom as the heat map's rows
        first = fig.add_subplot(right[0, 0])
        axes = [first] + [fig.add_subplot(right[n, 0], sharex=first, sharey=first) for n in range(1, n_nodes)]
        _lead_panels(axes, epochs, edges, w, ops, leader, cell, colour)
    fig.suptitle(title or 'op weights', fontsize=11)
    return save(fig, png_path, dpi=100)


def generation_colours(gen):
    """A discrete colour scale of the generations: one band per generation, ticks at its whole numbers (at most 10
    ticks): (BoundaryNorm, ticks)."""
    from matplotlib.colors import BoundaryNorm
    lo, hi = int(min(gen)), int(max(gen))
    step = max(1, -(-(hi - lo + 1) // 10))
    return BoundaryNorm([g - 0.5 for g in range(lo, hi + 2)], 256), list(range(lo, hi + 1, step))


def read_evaluations(csv_path):
    """(params, f1, generation) arrays of an evolutionary search's evaluations.csv; a damaged or empty file is a
    UserError naming it."""
    try:
        with open(csv_path, newline='') as f:
            rows = [(float(r['params']), float(r['f1']), int(r['generation'])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise UserError(f'{csv_path}: cannot read params, f1 and generation ({e}): the file is damaged; '
                        'train_evolve.py --RESUME=<its run folder> rewrites it from candidates/') from None
    if not rows:
        raise UserError(f'{csv_path}: no candidate rows yet (the search wrote none): nothing to draw before the '
                        'first candidate is trained')
    return tuple(np.array(c) for c in zip(*rows))


def size_range(params, paper_params=None, reach=4.0):
    """The x range of pareto.png (parameters, log scale): the candidates' sizes with a margin, widened to the paper
    genotype's size only when that lies within `reach` times of them (a 12.79 M line beside candidates of 0.05 M
    squeezed them into a corner). Returns (low, high, whether the paper's size is inside)."""
    lo, hi = float(np.min(params)) / 1.25, float(np.max(params)) * 1.25
    inside = bool(paper_params) and lo / reach <= paper_params <= hi * reach
    if inside:
        lo, hi = min(lo, paper_params / 1.25), max(hi, paper_params * 1.25)
    return lo, hi, inside


def plot_pareto(csv_path, png_path, paper_params=PAPER_PARAMS, run=None):
    """Save pareto.png of an evolutionary search: every evaluated candidate's f1 against its parameters (log scale),
    coloured by generation, the non-dominated front highlighted and joined, and the paper genotype's size: a line
    where it is near the candidates, else an arrow at the edge with the factor. csv_path: evaluations.csv of
    train_evolve.py (columns params, f1, generation); run: the run's name for the title. Returns png_path."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
    params, f1, gen = read_evaluations(csv_path)
    # the non-dominated front (f1, ln params), as in the search (evolution/samea.front; kept apart so that the
    # figures need nothing of the search)
    members = np.sort(NonDominatedSorting().do(np.column_stack([f1, np.log(params)]), only_non_dominated_front=True))
    members = members[np.argsort(params[members])]
    fig, axes = new_figure(7.2, 4.6)
    ax = axes[0][0]
    norm, ticks = generation_colours(gen)
    dots = ax.scatter(params / 1e6, f1, c=gen, cmap='viridis', norm=norm, s=22, alpha=0.85,
                      label='evaluated candidates')
    fig.colorbar(dots, ax=ax, label='generation', ticks=ticks)
    ax.step(params[members] / 1e6, f1[members], where='post', color='tab:red', lw=1.2)
    ax.scatter(params[members] / 1e6, f1[members], facecolors='none', edgecolors='tab:red', s=70, lw=1.4,
               label=f'non-dominated front ({len(members)})')
    ax.set_xscale('log')
    lo, hi, inside = size_range(params, paper_params)
    ax.set_xlim(lo / 1e6, hi / 1e6)
    paper = 'paper genotype, C=36, 20 cells'
    if inside:
        ax.axvline(paper_params / 1e6, color='grey', ls='--', lw=1, label=f'{paper} ({paper_params / 1e6:.2f} M)')
    from matplotlib.ticker import FuncFormatter
    shown = (1, 2, 3, 5) if hi / lo < 100 else (1,)  # within two decades: 0.01, 0.02, 0.03, 0.05; else 0.01, 0.1

    def label(v, _):
        return f'{v:g}' if round(v / 10 ** np.floor(np.log10(v) + 1e-9), 6) in shown else ''
    ax.xaxis.set_major_formatter(FuncFormatter(label))  # 0.02, not 2 x 10^-2
    ax.xaxis.set_minor_formatter(FuncFormatter(label))
    ax.set_xlabel('trainable parameters (millions, log scale)')
    ax.set_ylabel('f1 = error term (unitless, lower is better)')
    ax.grid(alpha=0.3, lw=0.5, which='both')
    ax.legend(fontsize=8, loc='best')
    title = f'{run}: ' if run else ''
    title += f'{len(params)} candidates, front of {len(members)}'
    if paper_params and not inside:
        title += (f'\n{paper}: {paper_params / 1e6:.2f} M parameters, {paper_params / params.max():,.0f}x the '
                  'largest candidate (right of this axis)')
    ax.set_title(title, fontsize=9)
    return save(fig, png_path, dpi=110)
