"""What every part of the project shares, without torch (the scan workers import it): the user-error type,
atomic files and JSON, progress lines, the git commit, and the classification metrics."""
import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem with the user's input or settings: printed as one line, without a traceback."""


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


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
    """Per-fold rows ({'fold': f, metric: value}) and, for two folds or more, a mean +/- std line, as text."""
    cols = list(keys) + list(extra)
    lines = ['fold  ' + ''.join(f'{k:>14}' for k in cols)]
    for r in rows:
        lines.append(f'{r["fold"]!s:<6}' + ''.join(f'{r[k]:>14d}' if isinstance(r[k], int) else f'{r[k]:>14.2f}'
                                                   for k in cols))
    if len(rows) > 1:  # one fold: its row is the table (a mean of one, a spread of 0, would say nothing)
        stats = []
        for k in cols:
            v = np.array([r[k] for r in rows], dtype=float)
            stats.append(f'{np.nanmean(v):>7.2f} ± {np.nanstd(v):<4.2f}')
        lines.append('mean  ' + ''.join(f'{s:>14}' for s in stats))
    return '\n'.join(lines)


def prediction_table(result, limit=20):
    """The console's view of predictions.csv (a DataFrame with nodule_id, prob_mean, prob_std and optionally label
    and prob_heldout): a row per nodule, its mean P(malignant) over the fold models, their spread, the predicted class
    (P >= 0.5); the first `limit` rows, then how many more the file holds."""
    cols = [c for c in ('label', 'prob_heldout') if c in result.columns]
    width = max(12, *(len(str(n)) for n in result['nodule_id'][:limit]))
    lines = [f'{"nodule":<{width}}  P(malignant)  spread  predicted' + ''.join(f'  {c:>12}' for c in cols)]
    for _, r in result.head(limit).iterrows():
        lines.append(f'{r["nodule_id"]!s:<{width}}  {r["prob_mean"]:>12.4f}  {r["prob_std"]:>6.4f}  '
                     f'{"malignant" if r["prob_mean"] >= 0.5 else "benign":<9}'
                     + ''.join(f'  {_table_cell(r[c]):>12}' for c in cols))
    if len(result) > limit:
        lines.append(f'... {len(result) - limit} more in predictions.csv')
    return '\n'.join(lines)


def _table_cell(value):
    if isinstance(value, (float, np.floating)):
        return '' if value != value else f'{value:.4f}'
    return str(value)
