"""What the figures share: a constrained Agg figure, saving, reading a run folder's CSV rows, config and
per-fold files."""
import csv
import glob
import json
import os
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils import UserError


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


def save(fig, path, dpi=100):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def read_rows(path):
    """CSV rows as dicts of floats where a value parses as a number (strings otherwise)."""
    def value(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    try:
        with open(path, newline='') as f:
            rows = [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except OSError as e:
        raise UserError(f'{path}: cannot read ({e.strerror})') from None
    if not rows:
        raise UserError(f'{path}: no data rows')
    return rows


def read_config(run_path):
    path = os.path.join(run_path, 'config.json')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def fold_files(run_path, pattern):
    """{fold: path} of files named like pattern with '{f}' standing for the fold number, sorted by fold."""
    regex = re.compile(re.escape(pattern).replace(r'\{f\}', r'(\d+)') + '$')
    found = {}
    for path in glob.glob(os.path.join(run_path, pattern.replace('{f}', '*'))):
        m = regex.search(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))
