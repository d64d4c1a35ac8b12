"""Every setting of every script has a rule; a value out of range is one line naming it, before anything is written;
each script's Ctrl-C message says how that script continues."""
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import write_cube_set

import bench
import draw
import nodclsgbt
import predict
import prepare
import settings
import train_3D_continuation as retrain
import train_evolve
import train_search
from utils import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [train_search, retrain, train_evolve, prepare, nodclsgbt, bench, predict, draw]


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda m: m.__name__)
def test_every_setting_has_a_rule_and_the_defaults_keep_them(script):
    assert list(script.RULES) == list(script.DEFAULTS)   # one per setting, in the order of the constants
    settings.check_rules({**script.DEFAULTS, 'DEVICE': 'cpu'} if 'DEVICE' in script.DEFAULTS else script.DEFAULTS,
                         script.RULES)


def test_check_rules_worked_examples(tmp_path):
    cfg = {'EPOCHS': 3, 'C': 6, 'PC_K': 4, 'F': 0.5, 'FOLDS': (5, 6), 'MODE': 'a', 'PATH': '', 'LIM': (1.0, 2.0)}
    ok = {'EPOCHS': '>= 1', 'F': '0 < F < 1', 'FOLDS': 'folds(FOLDS)', 'MODE': "in ('a', 'b')",
          'PATH': "PATH == '' or isfile(PATH)", 'LIM': 'len(LIM) == 2 and 0 <= LIM[0] < LIM[1]', 'C': None}
    settings.check_rules(cfg, ok)
    cases = [({'EPOCHS': 0}, {'EPOCHS': '>= 1'}, 'EPOCHS=0 is not allowed: it must satisfy EPOCHS >= 1$'),
             ({}, {'C': 'C % PC_K == 0'}, r'C=6 is not allowed: it must satisfy C % PC_K == 0 \(PC_K=4\)$'),
             ({'F': 1.0}, {'F': '0 < F < 1'}, 'F=1.0 is not allowed'),
             ({'FOLDS': ()}, {'FOLDS': 'folds(FOLDS)'}, r'FOLDS=\(\) is not allowed'),
             ({'FOLDS': ('a',)}, {'FOLDS': 'folds(FOLDS)'}, r"FOLDS=\('a',\) is not allowed"),
             ({'FOLDS': (-1,)}, {'FOLDS': 'folds(FOLDS)'}, r'FOLDS=\(-1,\) is not allowed'),
             ({'MODE': 'c'}, {'MODE': "not in ('c',)"}, "MODE='c' is not allowed: it must satisfy MODE not in"),
             ({'PATH': str(tmp_path / 'x')}, {'PATH': "PATH == '' or isfile(PATH)"}, 'PATH=.* is not allowed'),
             ({'LIM': (3.0, 2.0)}, {'LIM': 'len(LIM) == 2 and 0 <= LIM[0] < LIM[1]'}, 'LIM=.* is not allowed'),
             ({'LIM': ()}, {'LIM': 'len(LIM) == 2 and 0 <= LIM[0] < LIM[1]'}, 'LIM=.* is not allowed'),
             ({'EPOCHS': 'x'}, {'EPOCHS': '>= 1'}, "EPOCHS='x' is not allowed")]  # a comparison that fails on type
    for change, rules, message in cases:
        with pytest.raises(UserError, match=message):
            settings.check_rules({**cfg, **change}, rules)
    with pytest.raises(ValueError, match='rule for unknown setting NOPE'):
        settings.check_rules(cfg, {'NOPE': '>= 1'})
    with pytest.raises(ValueError, match='rule of C reads unknown setting.s. K'):
        settings.check_rules(cfg, {'C': 'C % K == 0'})
    for rule, element in [("__import__('os').getcwd() != ''", "__import__('os').getcwd()"),
                          ('C.bit_length() > 0', 'C.bit_length()'), ('len(C, x=1) > 0', 'len(C, x=1)'),
                          ('[c for c in FOLDS]', '[c for c in FOLDS]')]:  # only settings and RULE_FUNCTIONS
        with pytest.raises(ValueError, match=re.escape(f'element {element!r} is not supported')):
            settings.check_rules(cfg, {'C': rule})


def test_a_rule_is_checked_after_the_rules_of_the_settings_it_reads():
    # NEIGHBOURS comes first and reads POPULATION: POPULATION's own rule is the one broken
    rules = {'NEIGHBOURS': '2 <= NEIGHBOURS <= POPULATION', 'POPULATION': '>= 2', 'C': 'C % PC_K == 0', 'PC_K': '>= 1'}
    with pytest.raises(UserError, match='^POPULATION=1 is not allowed: it must satisfy POPULATION >= 2$'):
        settings.check_rules({'NEIGHBOURS': 3, 'POPULATION': 1, 'C': 4, 'PC_K': 1}, rules)
    with pytest.raises(UserError, match='^PC_K=0 is not allowed: it must satisfy PC_K >= 1$'):
        settings.check_rules({'NEIGHBOURS': 2, 'POPULATION': 2, 'C': 4, 'PC_K': 0}, rules)
    with pytest.raises(UserError, match='^B=0 is not allowed: it must satisfy B > A'):  # rules reading each other
        settings.check_rules({'A': 1, 'B': 0}, {'A': 'A <= B', 'B': 'B > A'})


def test_a_rule_that_cannot_be_evaluated_names_the_setting_that_made_it_fail():
    # PC_K without a rule of its own: C's rule divides by it
    with pytest.raises(UserError, match=r'^PC_K=0 is not allowed: the rule of C \(C=4\), C >= 1 and C % PC_K == 0, '
                                        r'cannot be evaluated with it \(ZeroDivisionError: integer modulo by zero\)$'):
        settings.check_rules({'C': 4, 'PC_K': 0}, {'C': 'C >= 1 and C % PC_K == 0', 'PC_K': None})
    with pytest.raises(UserError, match=r"^LIMIT='x', K=2 are not allowed: the rule of N \(N=1\), N < LIMIT - K"):
        settings.check_rules({'N': 1, 'LIMIT': 'x', 'K': 2}, {'N': 'N < LIMIT - K'})  # 'x' - 2: TypeError
    # the setting's own value: the rule is not satisfied, as before
    with pytest.raises(UserError, match=r"^N='x' is not allowed: it must satisfy N % K == 1 \(K=0\)$"):
        settings.check_rules({'N': 'x', 'K': 0}, {'N': 'N % K == 1', 'K': None})


def test_device_rule(monkeypatch):
    assert settings.usable_device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UserError, match=r"DEVICE='cuda': CUDA is not available on this machine .*--DEVICE=cpu"):
        settings.usable_device('cuda')
    with pytest.raises(UserError, match=r"DEVICE='gpu': must be 'cpu', 'cuda' or 'cuda:<index>'"):
        settings.usable_device('gpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert settings.usable_device('cuda') and settings.usable_device('cuda:0')
    with pytest.raises(UserError, match=r"DEVICE='cuda:1': this machine has 1 GPU"):
        settings.usable_device('cuda:1')


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=1)


# (script, setting, bad value, message); every case used to end in a traceback or was not caught
BAD = [
    (train_search, 'BATCH_SIZE', 0, 'BATCH_SIZE=0 is not allowed: it must satisfy BATCH_SIZE >= 1'),
    (train_search, 'BATCH_SIZE', -2, 'BATCH_SIZE=-2'),
    (train_search, 'C', 0, 'C=0 is not allowed: it must satisfy C >= 1 and C % PC_K == 0'),
    (train_search, 'C', -4, 'C=-4'),
    (train_search, 'C', 6, r'C=6 .*\(PC_K=4\)'),
    (train_search, 'EPOCHS', 0, 'EPOCHS=0'),
    (train_search, 'LR', -0.1, 'LR=-0.1'),
    (train_search, 'PC_K', 0, 'PC_K=0 is not allowed: it must satisfy PC_K >= 1$'),  # not C's rule, C % PC_K == 0
    (train_search, 'VAL_FRACTION', 0.0, 'VAL_FRACTION=0.0'),
    (train_search, 'VAL_FRACTION', 1.0, 'VAL_FRACTION=1.0'),
    (train_search, 'VAL_FRACTION', -0.5, 'VAL_FRACTION=-0.5'),
    (train_search, 'SEARCH_FOLDS', (), r'SEARCH_FOLDS=\(\)'),
    (train_search, 'TAU_EVERY', 0, 'TAU_EVERY=0'),
    (train_search, 'DEVICE', 'cuda', "DEVICE='cuda': CUDA is not available"),
    (retrain, 'BATCH_SIZE', 0, 'BATCH_SIZE=0'),
    (retrain, 'C', 0, 'C=0'),
    (retrain, 'EPOCHS', 0, 'EPOCHS=0'),
    (retrain, 'LR', -1.0, 'LR=-1.0'),
    (retrain, 'DROP_PATH', 1.0, 'DROP_PATH=1.0'),
    (retrain, 'TEST_FOLDS', (), r'TEST_FOLDS=\(\)'),
    (retrain, 'DEVICE', 'cuda', "DEVICE='cuda': CUDA is not available"),
    (retrain, 'TRAIN_FOLDS', (0, 12), r'TRAIN_FOLDS include fold 12, which has no nodules'),
    (retrain, 'TRAIN_FOLDS', (0, 8), r'test fold 8 is also in TRAIN_FOLDS'),
    (prepare, 'WORKERS', 0, 'WORKERS=0'),
    (prepare, 'MATCH_MM', -1.0, 'MATCH_MM=-1.0'),
    (prepare, 'SCAN_TIMEOUT', 0.0, 'SCAN_TIMEOUT=0.0'),
    (prepare, 'LUNG_ML', (8200.0, 100.0), r'LUNG_ML=\(8200.0, 100.0\)'),
    (prepare, 'START_METHOD', 'thread', "START_METHOD='thread'"),
    (prepare, 'NODULE_TABLE', 'no/such/table.csv', "NODULE_TABLE='no/such/table.csv'"),
    (nodclsgbt, 'DOWNSAMPLE', 0, r'DOWNSAMPLE=0 is not allowed: it must satisfy 1 <= DOWNSAMPLE <= CUBE_SIZE \(CUBE_'),
    (nodclsgbt, 'DOWNSAMPLE', 64, 'DOWNSAMPLE=64'),
    (nodclsgbt, 'MAX_ITER', 0, 'MAX_ITER=0'),
    (nodclsgbt, 'TEST_FOLDS', (), r'TEST_FOLDS=\(\)'),
    (nodclsgbt, 'LEARNING_RATE', 0.0, 'LEARNING_RATE=0.0'),
    (bench, 'STEPS', 0, 'STEPS=0'),
    (bench, 'SEARCH_C', 6, 'SEARCH_C=6'),
    (bench, 'DEVICE', 'cuda', "DEVICE='cuda': CUDA is not available"),
]


@pytest.mark.parametrize('script, name, value, message', BAD,
                         ids=[f'{s.__name__}-{n}={v}' for s, n, v, _ in BAD])
def test_bad_setting_is_one_error_before_anything_is_written(script, name, value, message, cubes, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # the case of this CPU machine, also on a GPU one
    base = {'RUNS': str(tmp_path / 'runs')} if 'RUNS' in script.DEFAULTS else {}
    if 'DEVICE' in script.DEFAULTS:
        base['DEVICE'] = 'cpu'
    if script is retrain:
        base.update(DATA=cubes, FOLD=8, C=4, LAYERS=3, CUBE=8)
    if script is prepare:
        base.update(LUNA16_DIR=str(tmp_path / 'luna'), OUT_DIR=str(tmp_path / 'out'))
    if script is nodclsgbt:
        base.update(PREPARED_DIR=str(tmp_path / 'prepared'), CUBE_SET=str(tmp_path / 'cubes'))
    with pytest.raises(UserError, match=message):
        script.main(**{**base, name: value})
    assert os.listdir(tmp_path) == []                       # no run folder, no output folder


def test_bad_setting_on_the_command_line_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, 'train_search.py', '--BATCH_SIZE=0', f'--RUNS={tmp_path / "runs"}'],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and out.stderr == \
        'error: BATCH_SIZE=0 is not allowed: it must satisfy BATCH_SIZE >= 1\n'
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.parametrize('script, says, never', [
    ('train_search.py', 'before the run folder was made: nothing to resume', '--RESUME'),
    ('train_3D_continuation.py', 'before the run folder was made: nothing to resume', '--RESUME'),
    ('prepare.py', 'finished scans are kept; rerun the same command to continue', '--RESUME'),
    ('nodclsgbt.py', 'rerun the same command to start again', '--RESUME'),
    ('bench.py', 'rerun the same command to benchmark again', '--RESUME'),
    ('train_evolve.py', 'before the run folder was made: nothing to resume', '--RESUME'),
    ('predict.py', 'rerun the same command', '--RESUME'),
    ('draw.py', 'rerun the same command', '--RESUME'),
])
def test_interrupt_message_names_how_the_script_continues(script, says, never, monkeypatch, capsys):
    def interrupted(defaults, argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(settings, 'parse_overrides', interrupted)
    monkeypatch.setattr(sys, 'argv', [script])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(REPO, script), run_name='__main__')
    err = capsys.readouterr().err
    assert stop.value.code == 130 and err.startswith('interrupted') and says in err and err.count('\n') == 1
    assert never is None or never not in err
