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
