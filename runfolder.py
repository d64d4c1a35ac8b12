"""A run folder (runs/<script>-<timestamp>[-tag]/: config.json, log.txt, metrics CSVs), its checkpoints and the
random states they hold.

torch is imported by the functions that need it, not by this module: prepare.py keeps its run folder here, and each of
its scan workers imports prepare.py again (start methods 'spawn', 'forkserver'), where torch would cost ~0.2 GB and
seconds per worker for nothing (tests/test_scan_worker.py)."""
import csv
import datetime
import json
import os
import platform
import random
import sys

import numpy as np

import settings
from utils import UserError, atomic_path, git_commit, save_json_atomic


class Run:
    """A run folder runs/<script>-<timestamp>[-tag]/ with config.json, log.txt and metrics.csv."""

    def __init__(self, script, cfg, root='runs', tag='', path=None):
        if path is None:
            stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
            path = os.path.join(root, f'{script}-{stamp}' + (f'-{tag}' if tag else ''))
        self.path = path
        new = not os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        settings.note_run_folder(path, new)  # named by the resume command (or removed) when the run is interrupted
        self.quiet = False
        self.previous = self._previous_config()  # settings of a continued run before this start; None: a new run
        save_json_atomic(self.file('config.json'), cfg, default=str)  # a kill mid-write keeps the previous one

    def _previous_config(self):
        """config.json as it was (checked by settings.resumed_settings before the run folder is touched), or None."""
        try:
            with open(self.file('config.json')) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            return None
        return previous if isinstance(previous, dict) else None

    def changed_settings(self, cfg):
        """'NAME old -> new' for each setting of `cfg` whose value differs from the previous config.json ('(none)'
        where that lacks it); RESUME aside, which names the folder."""
        now = json.loads(json.dumps(cfg, default=str))
        old = self.previous or {}
        return [f'{k} {old[k]!r} -> {v!r}' if k in old else f'{k} (none) -> {v!r}'
                for k, v in now.items() if k != 'RESUME' and (k not in old or old[k] != v)]

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, text):
        if not self.quiet:
            print(text, flush=True)
        with open(self.file('log.txt'), 'a') as f:
            f.write(text + '\n')

    def header(self, cfg, device):
        self.log(f'run folder {self.path}')
        torch = sys.modules.get('torch')  # the versions of torch and CUDA where the script uses them
        self.log(f'git {git_commit()}  python {platform.python_version()}  '
                 + (f'torch {torch.__version__}  cuda {torch.version.cuda}  ' if torch else '') + f'device {device}'
                 + (f' ({torch.cuda.get_device_name(device)})' if torch and str(device).startswith('cuda') else ''))
        for k, v in cfg.items():
            self.log(f'  {k} = {v!r}')
        if self.previous is not None:
            changed = self.changed_settings(cfg)
            self.log('resumed with the settings of its config.json' + (
                ', changed: ' + ', '.join(changed) if changed else ' (none changed)'))

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
        rows, fields = read_metrics(path)
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


def read_metrics(path):
    """(rows, header) of a metrics CSV a run wrote (rows: dicts), ([], None) when it is missing or empty. A damaged
    one (binary content, no epoch column) is a UserError naming it and what to do: resuming a run checks its CSVs
    with this before anything in the run folder is written."""
    if not os.path.exists(path):
        return [], None
    try:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f'{path} cannot be read as a CSV table ({_first_line(e)}): {METRICS_REMEDY}') from None
    if fields and 'epoch' not in fields:
        raise UserError(f'{path} has no epoch column (damaged?): {METRICS_REMEDY}')
    return rows, fields


METRICS_REMEDY = 'delete it to continue the run (the rows of its finished epochs are then lost; log.txt has them)'


def _first_line(error):
    return str(error).strip().partition('\n')[0][:200]


def save_atomic(obj, path):
    """torch.save, atomically (checkpoints)."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, remedy=''):
    """A checkpoint, on the CPU; a missing or unreadable file is a UserError naming it (and `remedy`: what to do)."""
    import torch
    tail = f': {remedy}' if remedy else ''
    if not os.path.exists(path):
        raise UserError(f'checkpoint {path} does not exist{tail}')
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f'checkpoint {path} cannot be read ({_first_line(e)}){tail}') from None


def check_checkpoint(path, keys, model, remedy):
    """A checkpoint to continue from, checked before its run folder is touched: readable, holding `keys`, and its
    'model' weights of the names and shapes of `model` (the network of the run's settings, built on the meta
    device: no memory). A bad one is a UserError naming it and `remedy`."""
    state = load_checkpoint(path, remedy)
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f'checkpoint {path} lacks {", ".join(missing)} (damaged?): {remedy}')
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = state['model'] if isinstance(state['model'], dict) else {}
    got = {k: tuple(getattr(v, 'shape', ())) for k, v in weights.items()}
    if got != want:
        differ = sorted(set(got) ^ set(want)) or sorted(k for k in want if got[k] != want[k])
        raise UserError(f'checkpoint {path} holds a model that does not fit the network of the run\'s settings '
                        f'({len(differ)} weight(s) differ, e.g. {differ[0]}; from another version?): {remedy}')
    return state


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states():
    import torch
    states = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    import torch
    random.setstate(states['python'])
    np.random.set_state(states['numpy'])
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])
