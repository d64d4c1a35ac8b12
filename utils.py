"""Shared plumbing for the scripts: settings, run folders, logging, checkpoints, metrics."""
import ast
import contextlib
import csv
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem with the user's input or settings: printed as one line, without a traceback."""


# ---------------------------------------------------------------- settings

def _literal(text):
    """Parse a command-line value: a Python literal if it is one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(name, value, default):
    """Check an override against the type of its default (ints are accepted for floats)."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    elif isinstance(default, str):
        # string settings also take other literals: FOLD=8, PRIMITIVES=('sep_conv_3x3x3', ...)
        return str(value) if isinstance(value, (int, float)) else value
    raise UserError(f'--{name}={value!r}: expected a {type(default).__name__}')


def read_config_file(path, known):
    """Read NAME = literal lines from a config .py file without executing it."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError) as e:
        raise UserError(f'config file {path}: {e}') from None
    values = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise UserError(f'config file {path}, line {node.lineno}: only NAME = value lines are allowed')
        name = node.targets[0].id
        if name not in known:
            raise UserError(f'config file {path}: unknown setting {name} (known: {", ".join(sorted(known))})')
        try:
            values[name] = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f'config file {path}, line {node.lineno}: {name} must be a literal') from None
    return values


def parse_overrides(defaults, argv):
    """Settings given on the command line: an optional config .py file (first argument), then --NAME=value."""
    given = {}
    args = list(argv)
    if args and not args[0].startswith('--'):
        given.update({k: _coerce(k, v, defaults[k]) for k, v in read_config_file(args.pop(0), defaults).items()})
    for arg in args:
        if not arg.startswith('--') or '=' not in arg:
            raise UserError(f'cannot parse argument {arg!r}: use --NAME=value')
        name, text = arg[2:].split('=', 1)
        if name not in defaults:
            raise UserError(f'unknown setting --{name} (known: {", ".join(sorted(defaults))})')
        given[name] = _coerce(name, _literal(text), defaults[name])
    return given


def settings_of(module_globals):
    """The UPPERCASE constants of a script, as a dict of defaults."""
    plain = (int, float, str, bool, list, tuple, type(None))
    return {k: v for k, v in module_globals.items() if k.isupper() and not k.startswith('_') and isinstance(v, plain)}


RESUME_HINT = 'the last checkpoint is kept; rerun with --RESUME=<run folder> to continue'


def run_cli(main, defaults, on_interrupt=RESUME_HINT):
    """Entry point of a script: parse sys.argv, run main(**overrides), print user errors as one line.
    on_interrupt: what Ctrl-C prints after 'interrupted: ', i.e. how this script continues (or that it restarts)."""
    try:
        main(**parse_overrides(defaults, sys.argv[1:]))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'interrupted: {on_interrupt}', file=sys.stderr)
        sys.exit(130)
    except torch.cuda.OutOfMemoryError as e:
        advice = ('set CHECKPOINT_CELLS=True (a run continues with it: --RESUME=<run folder> '
                  '--CHECKPOINT_CELLS=True) or a smaller BATCH_SIZE') if 'CHECKPOINT_CELLS' in defaults else \
            'use a smaller batch'
        first = str(e).partition('\n')[0]
        print(f'error: out of GPU memory ({first}); {advice}', file=sys.stderr)
        sys.exit(3)


def check_settings(overrides, defaults):
    """Defaults updated with main(**overrides); unknown names and wrong types are rejected."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UserError(f'unknown setting(s) {", ".join(unknown)} (known: {", ".join(sorted(defaults))})')
    return {**defaults, **{k: _coerce(k, v, defaults[k]) for k, v in overrides.items()}}


# Settings a continued run may change: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = ('RESUME', 'DEVICE', 'FAST_KERNELS', 'CHECKPOINT_CELLS', 'FIGURES', 'PARALLEL')


def read_run_config(run_path, defaults):
    """config.json of a run folder to continue, checked to belong to the script of `defaults`: it must parse, hold
    every setting of the script (those in RESUMABLE_CHANGES may be missing) and no other, each of its type."""
    path = os.path.join(run_path, 'config.json')
    if not os.path.exists(path):
        raise UserError(f'RESUME={run_path}: {path} is missing (not a run folder of this script?)')
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        what = 'is empty' if os.path.getsize(path) == 0 else f'cannot be read ({e})'
        raise UserError(f'RESUME={run_path}: {path} {what}; the run cannot be continued') from None
    if not isinstance(saved, dict):
        raise UserError(f'RESUME={run_path}: {path} holds no settings; the run cannot be continued')
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise UserError(f'RESUME={run_path}: not a run folder of this script: its config.json has setting(s) '
                        f'{", ".join(unknown)}, which this script does not have')
    missing = sorted(set(defaults) - set(saved) - set(RESUMABLE_CHANGES))
    if missing:
        raise UserError(f'RESUME={run_path}: {path} lacks setting(s) {", ".join(missing)} (damaged, or written by '
                        'another version of this script); the run cannot be continued')
    for k, v in saved.items():
        try:
            _coerce(k, v, defaults[k])
        except UserError:
            raise UserError(f'RESUME={run_path}: {path}: {k}={v!r} is not a {type(defaults[k]).__name__}') from None
    return saved


def resumed_settings(run_path, overrides, defaults):
    """Settings of a run being continued: its config.json; DEVICE and FAST_KERNELS are this machine's (the
    defaults or given values). Other settings cannot change (the saved optimizer and schedule were built from them)."""
    checked = check_settings(overrides, defaults)
    saved = read_run_config(run_path, defaults)
    for k in overrides:
        if k not in RESUMABLE_CHANGES and json.loads(json.dumps(checked[k])) != saved.get(k):
            raise UserError(f'--{k} cannot change when resuming {run_path} (it was {saved.get(k)!r}); '
                            'start a new run instead')
    saved = {k: _coerce(k, v, defaults[k]) for k, v in saved.items()}
    return {**saved, **{k: checked[k] for k in RESUMABLE_CHANGES if k in checked}, 'RESUME': run_path}


# ---------------------------------------------------------------- run folders and logs

def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


class Run:
    """A run folder runs/<script>-<timestamp>[-tag]/ with config.json, log.txt and metrics.csv."""

    def __init__(self, script, cfg, root='runs', tag='', path=None):
        if path is None:
            stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
            path = os.path.join(root, f'{script}-{stamp}' + (f'-{tag}' if tag else ''))
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.quiet = False
        save_json_atomic(self.file('config.json'), cfg, default=str)  # a kill mid-write keeps the previous one

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, text):
        if not self.quiet:
            print(text, flush=True)
        with open(self.file('log.txt'), 'a') as f:
            f.write(text + '\n')

    def header(self, cfg, device):
        self.log(f'run folder {self.path}')
        self.log(f'git {git_commit()}  python {platform.python_version()}  torch {torch.__version__}  '
                 f'cuda {torch.version.cuda}  device {device}'
                 + (f' ({torch.cuda.get_device_name(device)})' if str(device).startswith('cuda') else ''))
        for k, v in cfg.items():
            self.log(f'  {k} = {v!r}')

    def metrics_row(self, row, name='metrics.csv'):
        """Append one row (a dict) to a CSV, writing the header on first use."""
        self.metrics_rows([row], name)

    def metrics_rows(self, rows, name='metrics.csv'):
        """Append rows (dicts with the same keys) to a CSV, writing the header on first use."""
        path = self.file(name)
        new = not os.path.exists(path)
        with open(path, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)

    def truncate_metrics(self, epochs_done, name='metrics.csv'):
        """On resume, drop rows of epochs that the checkpoint does not contain (and rows a kill cut short);
        returns the sorted epochs whose rows remain."""
        path = self.file(name)
        if not os.path.exists(path):
            return []
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), reader.fieldnames
        if not fields:  # empty (cut before its header): the next row writes a new header
            os.remove(path)
            return []

        def epoch(row):
            try:
                return int(row['epoch'])
            except (KeyError, TypeError, ValueError):
                return None
        keep = [r for r in rows if epoch(r) is not None and epoch(r) < epochs_done and None not in r.values()]
        with atomic_path(path) as tmp:
            with open(tmp, 'w', newline='') as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(keep)
        return sorted({epoch(r) for r in keep})

    def continue_metrics(self, epochs_done, name='metrics.csv'):
        """truncate_metrics, and a log line when rows of the epochs before the checkpoint are missing (a deleted or
        damaged file): they cannot be rebuilt from the checkpoint, but their numbers are in log.txt."""
        kept = self.truncate_metrics(epochs_done, name)
        lost = sorted(set(range(epochs_done)) - set(kept))
        if lost:
            what = 'is missing' if not os.path.exists(self.file(name)) else 'lacks their rows'
            self.log(f'warning: {name} {what}: rows of epoch(s) {lost[0]}-{lost[-1]} ({len(lost)}) are lost '
                     f'(their numbers are in log.txt); rows from epoch {epochs_done} on are appended')
        return lost


def progress(iterable, total=None, desc=None, every_s=60.0):
    """tqdm progress bar when the output is a terminal; otherwise (logs, batch jobs) a line at most every
    `every_s` seconds with the count and the estimated time left, so a slow loop is never silent."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)
    return _progress_lines(iterable, total if total is not None else len(iterable), desc or '', every_s)


def _progress_lines(iterable, total, desc, every_s):
    start = last = time.time()
    for i, item in enumerate(iterable):
        yield item
        now = time.time()
        if now - last >= every_s and i + 1 < total:
            last = now
            eta = (now - start) / (i + 1) * (total - i - 1)
            print(f'{desc}: {i + 1}/{total}, {now - start:.0f} s, about {eta:.0f} s left', flush=True)


# ---------------------------------------------------------------- checkpoints and randomness

@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to: it replaces `path` on success and is removed on any failure
    (also KeyboardInterrupt), so a crash never leaves a half-written file."""
    tmp = f'{path}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path):
    """torch.save, atomically (checkpoints)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path, remedy):
    """json.load of a file the code wrote; a damaged or unreadable one is a UserError naming it and `remedy`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise UserError(f'{path} cannot be read ({e}): {remedy}') from None


def save_json_atomic(path, obj, default=None):
    """json.dump, atomically (default: json.dump's, for values JSON lacks)."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1, default=default)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(f'checkpoint {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f'checkpoint {path} cannot be read: {e}') from None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states():
    states = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states['python'])
    np.random.set_state(states['numpy'])
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


# ---------------------------------------------------------------- metrics

def binary_metrics(labels, prob_malignant, threshold=0.5):
    """Accuracy, sensitivity, specificity, F1 and ROC AUC in percent; malignant (1) is positive."""
    from sklearn.metrics import roc_auc_score
    y = np.asarray(labels).astype(int)
    p = np.asarray(prob_malignant, dtype=float)
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())

    def ratio(a, b):
        return 100.0 * a / b if b else float('nan')
    auc = 100.0 * roc_auc_score(y, p) if len(set(y.tolist())) == 2 else float('nan')
    return {'acc': ratio(tp + tn, len(y)), 'sens': ratio(tp, tp + fn), 'spec': ratio(tn, tn + fp),
            'f1': ratio(2 * tp, 2 * tp + fp + fn), 'auc': auc}


METRIC_NAMES = ('acc', 'sens', 'spec', 'f1', 'auc')


def results_table(rows, keys=METRIC_NAMES, extra=()):
    """Per-fold rows ({'fold': f, metric: value}) and a mean +/- std line, as text."""
    cols = list(keys) + list(extra)
    lines = ['fold  ' + ''.join(f'{k:>14}' for k in cols)]
    for r in rows:
        lines.append(f'{r["fold"]!s:<6}' + ''.join(f'{r[k]:>14d}' if isinstance(r[k], int) else f'{r[k]:>14.2f}'
                                                   for k in cols))
    if rows:
        stats = []
        for k in cols:
            v = np.array([r[k] for r in rows], dtype=float)
            stats.append(f'{np.nanmean(v):>7.2f} ± {np.nanstd(v):<4.2f}')
        lines.append('mean  ' + ''.join(f'{s:>14}' for s in stats))
    return '\n'.join(lines)
