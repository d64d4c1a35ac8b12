"""Cell diagrams of a genotype, drawn the way DARTS papers show cells: the inputs c_{k-2} and c_{k-1} on the
left, the intermediate nodes 0..n-1, the output c_{k} (concatenation) on the right, op names on the edges.

matplotlib only (no graphviz). Nodes are placed in columns by depth (a node is one column right of its
deepest input); edges that skip columns are drawn as arcs bowing away from the centre line, so that their
op labels do not sit on the nodes in between.
"""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

import genotypes
from figures.common import save

DX, DY = 2.3, 1.3  # distance between columns / between nodes of one column, data units
BOX_W, BOX_H = 0.8, 0.42  # node box, data units
INCH = 0.95  # inches per data unit
FILL = {'input': '#cfe8cf', 'node': '#cfe0f5', 'output': '#f3ebb5'}  # pale green, blue, yellow


def op_colours(names):
    """A fixed colour per op: the paper's candidates first (always the same colours), then others."""
    from matplotlib import colormaps
    order = list(genotypes.PRIMITIVES) + sorted(set(names) - set(genotypes.PRIMITIVES))
    # tab10 without its grey (grey is for the dashed edges into c_k), then tab20's paler shades
    palette = [colormaps['tab10'](i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + \
        [colormaps['tab20'](i) for i in range(1, 20, 2) if i != 15]
    return {op: palette[i % len(palette)] for i, op in enumerate(order)}


def cell_layout(edges, concat):
    """Positions {state: (x, y)} of a cell's states (0, 1 inputs; 2.. nodes; 'out'), in data units.
    edges: [(op, input_state)] two per node."""
    n_nodes = len(edges) // 2
    rank = {0: 0, 1: 0}
    for i in range(n_nodes):  # one column right of its inputs, and never left of the node before it (index order)
        rank[i + 2] = max(1 + max(rank[j] for _, j in edges[2 * i:2 * i + 2]), rank.get(i + 1, 0) if i else 0)
    rank['out'] = 1 + max(rank[s] for s in concat)
    columns = {}
    for state, r in rank.items():
        columns.setdefault(r, []).append(state)
    # A gap between columns widens with the number of edges crossing it, to leave room for their labels.
    crossing = [sum(rank[j] <= r < rank[e // 2 + 2] for e, (_, j) in enumerate(edges)) for r in range(rank['out'])]
    left = [0.0]
    for n in crossing:
        left.append(left[-1] + DX * (1 + 0.12 * max(0, n - 3)))
    pos = {}
    for r, states in columns.items():
        for k, state in enumerate(states):
            # c_{k-2} above c_{k-1}; nodes of one column top to bottom in index order; a lone node sits a little
            # off the centre line, alternating, so that straight edges of a chain do not overlap.
            y = ((len(states) - 1) / 2 - k) * DY
            if len(states) == 1 and state != 'out':
                y = 0.22 * DY * (1 if r % 2 else -1)
            pos[state] = (left[r], y)
    return pos


def _two_lines(op):
    """'dil_conv_5x5x5' -> 'dil_conv' over '5x5x5' (labels half as wide); names without a kernel stay."""
    head, sep, tail = op.partition('_' + next((p for p in op.split('_') if 'x' in p and p[0].isdigit()), '#'))
    return f'{head}\n{sep[1:]}{tail}' if sep else op


def _bezier(p0, c, p1, ts):
    """Points (len(ts), 2) of the quadratic Bezier p0, c, p1 at parameters ts."""
    ts = np.asarray(ts, dtype=float)[:, None]
    return (1 - ts) ** 2 * np.asarray(p0) + 2 * ts * (1 - ts) * np.asarray(c) + ts ** 2 * np.asarray(p1)


def arc_control(p0, p1, rad):
    """The control point of matplotlib's arc3 between p0 and p1: the midpoint moved by rad x the chord turned by 90
    degrees (the arc is then the quadratic Bezier p0, control, p1)."""
    (x0, y0), (x1, y1) = p0, p1
    return (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)


def clear_rad(p0, p1, rad, nodes, margin=0.08):
    """The bend of an arc from p0 to p1: rad, or bent further the same way (up to 0.7) until it passes through no box
    centred at `nodes` (an arc through a node box read as an edge into it)."""
    ts = np.linspace(0.05, 0.95, 50)
    for k in range(8):
        r = rad + np.sign(rad) * 0.08 * k
        if abs(r) > 0.7:
            break
        path = _bezier(p0, arc_control(p0, p1, r), p1, ts)
        if not any(((np.abs(path[:, 0] - x) < BOX_W / 2 + margin) & (np.abs(path[:, 1] - y) < BOX_H / 2 + margin)).any()
                   for x, y in nodes):
            return float(r)
    return rad


def label_size(op):
    """A label's box (width, height) in data units at 8 pt: about 0.07 per character, 0.17 per line, plus frame."""
    text = _two_lines(op)
    return 0.07 * max(len(line) for line in text.split('\n')) + 0.12, 0.17 * (text.count('\n') + 1) + 0.1


def label_spot(size, curve, others, taken, t0):
    """Where on its edge (curve: a quadratic Bezier p0, c, p1) a label of `size` goes: of the points from t = 0.15 to
    0.85, the one whose box covers the fewest points of the other edges (others: (n, 2) points along them) and
    overlaps no box in `taken` (nodes, earlier labels), nearest t0 among equals; appended to `taken`."""
    w, h = size
    ts = np.linspace(0.15, 0.85, 29)
    spots = _bezier(*curve, ts)
    best, best_cost = None, None
    for t, (x, y) in zip(ts, spots):
        boxes = sum(abs(x - bx) < (w + bw) / 2 and abs(y - by) < (h + bh) / 2 for bx, by, bw, bh in taken)
        lines = int(np.sum((np.abs(others[:, 0] - x) < w / 2 + 0.06) & (np.abs(others[:, 1] - y) < h / 2 + 0.06)))
        cost = 1000 * boxes + 10 * lines + abs(t - t0)
        if best_cost is None or cost < best_cost:
            best, best_cost = (float(x), float(y)), cost
    taken.append((*best, w, h))
    return best


def _name(state):
    return {0: 'c$_{k-2}$', 1: 'c$_{k-1}$', 'out': 'c$_{k}$'}.get(state, str(state - 2) if state != 'out' else '')


def draw_cell(ax, edges, concat, title, colours):
    """One cell on `ax`: boxes for the states, an arrow per edge labelled with its op, dashed arrows into c_k."""
    pos = cell_layout(edges, concat)
    ys = [y for _, y in pos.values()]
    centre = (max(ys) + min(ys)) / 2
    boxes = {}
    for state, (x, y) in pos.items():
        kind = 'input' if state in (0, 1) else 'output' if state == 'out' else 'node'
        box = FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, boxstyle='round,pad=0,rounding_size=0.12',
                             fc=FILL[kind], ec='0.3', lw=1.0, zorder=3)
        ax.add_patch(box)
        ax.text(x, y, _name(state), ha='center', va='center', fontsize=11, zorder=4)
        boxes[state] = box
    top, bottom = max(ys), min(ys)
    curves = []
    for e, (op, j) in enumerate(edges):
        dst = e // 2 + 2
        (x0, y0), (x1, y1) = pos[j], pos[dst]
        span = round((x1 - x0) / DX)
        # Arcs for edges that jump columns: bow away from the centre line, higher the longer the jump.
        side = 1 if (y0 + y1) / 2 >= centre else -1
        rad = 0.0 if span <= 1 else -side * min(0.1 + 0.06 * span, 0.3) * (1 if x1 > x0 else -1)
        if rad:
            rad = clear_rad((x0, y0), (x1, y1), rad, [xy for st, xy in pos.items() if st not in (j, dst)])
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), connectionstyle=f'arc3,rad={rad}', arrowstyle='-|>',
                                     mutation_scale=11, lw=1.6, color=colours[op], patchA=boxes[j],
                                     patchB=boxes[dst], zorder=2))
        curves.append(((x0, y0), arc_control((x0, y0), (x1, y1), rad), (x1, y1)))
    for s in concat:
        ax.add_patch(FancyArrowPatch(pos[s], pos['out'], arrowstyle='-|>', mutation_scale=9, lw=0.8, ls='--',
                                     color='0.6', patchA=boxes[s], patchB=boxes['out'], zorder=1))
    ts = np.linspace(0, 1, 60)
    dashed = [_bezier(pos[s], pos[s], pos['out'], ts) for s in concat]
    arcs = np.concatenate([_bezier(*c, ts) for c in curves])
    top, bottom = max(top, arcs[:, 1].max() - 0.3), min(bottom, arcs[:, 1].min() + 0.3)  # arcs: inside the margin
    taken = [(x, y, BOX_W, BOX_H) for x, y in pos.values()]  # boxes (centre x, y, width, height) labels avoid
    for e, (op, _) in enumerate(edges):
        others = np.concatenate([_bezier(*c, ts) for k, c in enumerate(curves) if k != e] + dashed)
        lx, ly = label_spot(label_size(op), curves[e], others, taken, 0.5)
        ax.text(lx, ly, _two_lines(op), ha='center', va='center', fontsize=8, color='0.1', zorder=5,
                bbox=dict(boxstyle='round,pad=0.15', fc='white', ec=colours[op], lw=0.9))
        top, bottom = max(top, ly), min(bottom, ly)
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(min(xs) - BOX_W, max(xs) + BOX_W)
    ax.set_ylim(bottom - 0.6, top + 0.6)
    ax.set_aspect('equal')  # arc3 bends in display space: the label positions above need equal scales
    ax.axis('off')
    ax.set_title(title, fontsize=10, loc='left')
    return (max(xs) - min(xs) + 2 * BOX_W, top - bottom + 1.2)


def plot_genotype(genotype, png_path, title=None):
    """Save the normal and the reduction cell of `genotype` (a Genotype, registered name or genotype.json path)
    as one PNG, the normal cell above the reduction cell. Returns png_path."""
    if not isinstance(genotype, genotypes.Genotype):
        title = title or str(genotype)
        genotype = genotypes.get_genotype(genotype)
    colours = op_colours([op for op, _ in genotype.normal + genotype.reduce])
    cells = [(genotype.normal, genotype.normal_concat, 'normal cell'),
             (genotype.reduce, genotype.reduce_concat, 'reduction cell (inputs at stride 2)')]
    sizes = [_extent(edges, concat) for edges, concat, _ in cells]
    width = max(w for w, _ in sizes) * INCH
    heights = [h * INCH + 0.35 for _, h in sizes]
    head, foot = (0.45 if title else 0.1), 0.3  # foot: the note on the arrows
    fig = Figure(figsize=(max(width, 7.5), sum(heights) + head + foot))
    FigureCanvasAgg(fig)
    total = sum(heights) + head + foot
    y = 1 - head / total
    for (edges, concat, name), h in zip(cells, heights):
        ax = fig.add_axes((0.01, y - h / total, 0.98, h / total - 0.3 / total))
        draw_cell(ax, edges, concat, name, colours)
        y -= h / total
    if title:
        fig.text(0.5, 1 - 0.12 / total, f'genotype: {title}', ha='center', va='top', fontsize=11)
    fig.text(0.5, 0.06 / total, 'coloured arrows: the op each node applies to an input (the edges the genotype keeps); '
             'grey dashed arrows: the nodes concatenated into the cell output c$_k$', ha='center', va='bottom',
             fontsize=8, color='0.3')
    return save(fig, png_path)


def _extent(edges, concat):
    """Width and height (data units) a cell needs, labels included (as draw_cell computes them)."""
    fig = Figure()
    return draw_cell(fig.add_subplot(), edges, concat, '', op_colours([op for op, _ in edges]))
