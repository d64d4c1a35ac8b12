"""A run folder (runs/<script>-<timestamp>[-tag]/: config.json, log.txt, metrics CSVs), its checkpoints and the
random states they hold."""
import csv
import datetime
import os
import platform
import random

import numpy as np
import torch

import settings
from utils import UserError, atomic_path, git_commit, save_json_atomic


class Run:
    """A run folder runs/<script>-<timestamp>[-tag]/ with config.json, log.txt and metrics.csv."""

    def __init__(self, script, cfg, root='runs', tag='', path=None):
        if path is None:
            stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
            path = os.path.join(root, f'{script}-{stamp}' + (f'-{tag}' if tag else ''))
        self.path = path
        os.makedirs(path, exist_ok=True)
        settings.note_run_folder(path)  # named by the resume command when the run is interrupted
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


def save_atomic(obj, path):
    """torch.save, atomically (checkpoints)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
