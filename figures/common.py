"""What the figures share: a constrained Agg figure, saving, reading a run folder's CSV rows, config and
per-fold files."""
import csv
import glob
import os
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils import UserError, atomic_path, read_json


def new_figure(width, height, nrows=1, ncols=1, **kw):
    fig = Figure(figsize=(width, height), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def run_name(run_path):
    """A run folder as figures name it: its own name (runs/<script>-<timestamp>[-tag]), never the machine's path."""
    return os.path.basename(os.path.normpath(run_path))


def plural(n, word):
    """'1 fold', '5 folds'."""
    return f'{n} {word}' if n == 1 else f'{n} {word}s'


def epoch_axis(ax, epochs):
    """An x axis of epochs with whole-number ticks only: each epoch of a short run (one epoch: a 1-wide range around
    it, where matplotlib would tick 0.00, 0.02, ...), at most ~6 whole numbers of a long one."""
    from matplotlib.ticker import MaxNLocator
    ax.set_xlabel('epoch')
    epochs = sorted({int(e) for e in epochs})
    if len(epochs) <= 6:
        ax.set_xticks(epochs)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def save(fig, path, dpi=100, crop=None):
    """Write fig as a PNG whole: to a temporary name beside path, then renamed (a kill never leaves half a PNG under
    the final name). crop: the artists the image is cut to (a table in a wide figure). Returns path."""
    from matplotlib.transforms import Bbox
    os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
    box = {}
    if crop:
        renderer = fig.canvas.get_renderer()
        fig.draw_without_rendering()  # the layout, as savefig will place it
        pixels = Bbox.union([a.get_window_extent(renderer) for a in crop])
        box = dict(bbox_inches=pixels.transformed(fig.dpi_scale_trans.inverted()).padded(0.12))
    with atomic_path(str(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format='png', **box)  # the format: the temporary name's suffix is not .png
    return path


def read_rows(path, numbers=(), remedy=''):
    """CSV rows as dicts of floats where a value parses as a number (strings otherwise). numbers: the columns every
    row must have as numbers. An unreadable file, one without rows, or a row without those numbers is a UserError
    naming the file and `remedy` (what to do)."""
    def value(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    tail = f': {remedy}' if remedy else ''
    try:
        with open(path, newline='') as f:
            rows = [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f'{path}: cannot read ({getattr(e, "strerror", None) or e}){tail}') from None
    if not rows:
        raise UserError(f'{path}: no data rows{tail}')
    for i, r in enumerate(rows):
        bad = [c for c in numbers if not isinstance(r.get(c), float)]
        if bad:
            raise UserError(f'{path}, line {i + 2}: {", ".join(bad)} not a number (damaged?){tail}')
    return rows


SEARCH_REMEDY = ('no finished epoch in it: continue the run (python train_search.py --RESUME={run}), or delete the '
                 'file to draw the other figures')  # what to do about an empty or damaged metrics.csv of a search


def read_config(run_path):
    """A run folder's config.json ({} without one); a damaged one is a UserError with the remedy."""
    path = os.path.join(run_path, 'config.json')
    if not os.path.exists(path):
        return {}
    config = read_json(path, 'log.txt holds the same settings; delete config.json to draw the figures without it')
    if not isinstance(config, dict):
        raise UserError(f'{path} is not a table of settings (damaged?): log.txt holds the same settings; delete '
                        'config.json to draw the figures without it')
    return config


def fold_files(run_path, pattern):
    """{fold: path} of files named like pattern with '{f}' standing for the fold number, sorted by fold."""
    regex = re.compile(re.escape(pattern).replace(r'\{f\}', r'(\d+)') + '$')
    found = {}
    for path in glob.glob(os.path.join(run_path, pattern.replace('{f}', '*'))):
        m = regex.search(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))
