"""utils: metrics, tables, progress lines; utils and the scan preprocessing import without torch."""
import math
import subprocess
import sys

import pytest

import utils

# ---------------------------------------------------------------- metrics

def test_binary_metrics_worked_example():
    # malignant (1) is positive; threshold 0.5 inclusive
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    prob = [0.9, 0.8, 0.5, 0.3, 0.7, 0.55, 0.3, 0.2, 0.1, 0.05]
    # tp = 3 (0.9, 0.8, 0.5), fn = 1 (0.3), fp = 2 (0.7, 0.55), tn = 4
    # AUC: over the 4 x 6 (malignant, benign) pairs, count malignant > benign, ties 1/2:
    # 0.9: 6, 0.8: 6, 0.5: 4, 0.3: 3 + 0.5 (tie with 0.3) -> 19.5 / 24
    m = utils.binary_metrics(labels, prob)
    assert m['acc'] == pytest.approx(70.0)
    assert m['sens'] == pytest.approx(75.0)
    assert m['spec'] == pytest.approx(100 * 4 / 6)
    assert m['f1'] == pytest.approx(100 * 6 / 9)             # 2tp / (2tp + fp + fn)
    assert m['auc'] == pytest.approx(100 * 19.5 / 24)
    assert set(m) == set(utils.METRIC_NAMES)


def test_binary_metrics_with_one_class_gives_nan_where_undefined():
    m = utils.binary_metrics([0, 0, 0], [0.1, 0.6, 0.2])
    assert m['acc'] == pytest.approx(100 * 2 / 3) and m['spec'] == pytest.approx(100 * 2 / 3)
    assert math.isnan(m['sens']) and math.isnan(m['auc'])
    assert m['f1'] == 0.0                                    # fp = 1, tp = fn = 0


def test_results_table_mean_and_std():
    rows = [{'fold': 5, 'acc': 90.0, 'sens': 80.0, 'spec': 100.0, 'f1': 85.0, 'auc': 95.0, 'epoch': 3},
            {'fold': 6, 'acc': 92.0, 'sens': 84.0, 'spec': 100.0, 'f1': 88.0, 'auc': float('nan'), 'epoch': 5}]
    lines = utils.results_table(rows, extra=('epoch',)).splitlines()
    assert lines[0].split() == ['fold', 'acc', 'sens', 'spec', 'f1', 'auc', 'epoch']
    assert lines[1].split() == ['5', '90.00', '80.00', '100.00', '85.00', '95.00', '3']  # ints stay ints
    assert lines[2].split()[:2] == ['6', '92.00']
    # population std over folds; NaN folds are left out of the mean
    assert lines[3].replace(' ± ', '±').split() == ['mean', '91.00±1.00', '82.00±2.00', '100.00±0.00',
                                                    '86.50±1.50', '95.00±0.00', '4.00±1.00']
    assert len(lines) == 4


def test_results_table_of_one_fold_has_no_mean_or_spread():
    row = {'fold': 5, 'acc': 90.0, 'sens': 80.0, 'spec': 100.0, 'f1': 85.0, 'auc': 95.0, 'params_M': 0.03}
    lines = utils.results_table([row], extra=('params_M',)).splitlines()
    assert len(lines) == 2 and lines[1].split() == ['5', '90.00', '80.00', '100.00', '85.00', '95.00', '0.03']
    assert '±' not in '\n'.join(lines)


def test_progress_lines_without_a_terminal(capsys):
    # pytest's stderr is not a terminal: plain lines, at most one per every_s seconds, never after the last item
    assert list(utils.progress(range(4), desc='steps', every_s=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(',')[0] for ln in lines] == ['steps: 1/4', 'steps: 2/4', 'steps: 3/4']
    assert all('s left' in ln for ln in lines)
    assert list(utils.progress([5, 6], desc='quick')) == [5, 6]
    assert capsys.readouterr().out == ''


def test_utils_and_the_scan_modules_do_not_import_torch():
    # a scan worker imports these: torch would cost each worker ~0.2 GB and seconds of start-up
    code = ('import sys, utils, settings, scans.luna, scans.lungmask, scans.lidc, scans.demo, scans.pool; '
            'print(sorted(m for m in ("torch", "sklearn") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=utils.REPO, check=True)
    assert out.stdout.strip() == '[]'
