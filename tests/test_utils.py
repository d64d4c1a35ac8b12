"""utils: settings parsing, config files, resume settings, metrics, tables, atomic saves."""
import json
import math
import os

import pytest
import torch

import utils
from utils import UserError

DEFAULTS = {'N': 3, 'LR': 0.1, 'FOLDS': (5, 6), 'SIZES': [1, 2], 'FLAG': True, 'NAME': 'x', 'OPT': None,
            'FOLD': 'all', 'DEVICE': 'cpu', 'RESUME': ''}


def parse(*argv):
    return utils.parse_overrides(DEFAULTS, argv)


# ---------------------------------------------------------------- command-line overrides

def test_overrides_are_parsed_by_the_type_of_their_default():
    got = parse('--N=5', '--LR=1', '--FOLDS=[1, 2, 3]', '--SIZES=(3,)', '--FLAG=False', '--NAME=abc',
                '--OPT=None')
    assert got == {'N': 5, 'LR': 1.0, 'FOLDS': (1, 2, 3), 'SIZES': [3], 'FLAG': False, 'NAME': 'abc', 'OPT': None}
    assert type(got['LR']) is float and type(got['FOLDS']) is tuple and type(got['SIZES']) is list
    assert parse() == {}                                     # only what was given, so a resume knows it


def test_string_settings_keep_other_literals_as_given():
    assert parse('--NAME=12') == {'NAME': '12'}              # a number given for a string setting
    assert parse('--FOLD=8') == {'FOLD': '8'}
    assert parse('--NAME=a=b') == {'NAME': 'a=b'}            # only the first '=' separates
    assert parse("--NAME=('sep_conv_3x3x3', 'skip_connect')") == {'NAME': ('sep_conv_3x3x3', 'skip_connect')}
    assert parse('--OPT=7', '--OPT=abc') == {'OPT': 'abc'}   # None default: anything; the last one wins


@pytest.mark.parametrize('arg, name', [
    ('--N=abc', 'N'), ('--N=1.5', 'N'), ('--N=True', 'N'), ('--LR=fast', 'LR'), ('--FLAG=1', 'FLAG'),
    ('--FLAG=yes', 'FLAG'), ('--FOLDS=5', 'FOLDS'), ('--SIZES=abc', 'SIZES'), ('--N=None', 'N'), ('--LR=None', 'LR')])
def test_wrong_type_is_a_user_error(arg, name):
    with pytest.raises(UserError, match=f'--{name}=.*expected a'):
        parse(arg)


def test_unknown_or_malformed_argument_is_rejected():
    with pytest.raises(UserError, match=r'unknown setting --NOPE \(known: DEVICE, FLAG, FOLD, FOLDS, LR, N, NAME'):
        parse('--NOPE=1')
    with pytest.raises(UserError, match='use --NAME=value'):
        parse('--N=1', 'N=2')
    with pytest.raises(UserError, match='use --NAME=value'):
        parse('--N')


def test_check_settings_of_main_keyword_arguments():
    cfg = utils.check_settings({'N': 4, 'LR': 2}, DEFAULTS)
    assert cfg['N'] == 4 and cfg['LR'] == 2.0 and cfg['NAME'] == 'x'
    with pytest.raises(UserError, match=r'unknown setting\(s\) BAD, WORSE \(known: DEVICE'):
        utils.check_settings({'BAD': 1, 'WORSE': 2}, DEFAULTS)
    with pytest.raises(UserError, match='--FLAG'):
        utils.check_settings({'FLAG': 'no'}, DEFAULTS)


def test_settings_of_keeps_only_plain_uppercase_constants():
    got = utils.settings_of({'EPOCHS': 3, 'LR': 0.1, 'lower': 1, '_HIDDEN': 2, 'MODULE': os, 'FOLDS': (1,)})
    assert got == {'EPOCHS': 3, 'LR': 0.1, 'FOLDS': (1,)}


# ---------------------------------------------------------------- config files

def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_file_then_command_line_overrides(tmp_path):
    cfg = write(tmp_path / 'cfg.py', "# a comment\nN = 7\nNAME = 'from file'\nLR = 2\nFOLDS = [8, 9]\n")
    assert parse(cfg) == {'N': 7, 'NAME': 'from file', 'LR': 2.0, 'FOLDS': (8, 9)}
    assert parse(cfg, '--N=9', '--FLAG=False') == {'N': 9, 'NAME': 'from file', 'LR': 2.0, 'FOLDS': (8, 9),
                                                   'FLAG': False}


@pytest.mark.parametrize('text, message', [
    ("import os\nN = 1\n", 'line 1: only NAME = value lines'),
    ("N = 1\nprint('hello')\n", 'line 2: only NAME = value lines'),
    ("N = len('abc')\n", 'line 1: N must be a literal'),
    ("N = M = 1\n", 'only NAME = value lines'),
    ("def f():\n    pass\n", 'only NAME = value lines'),
    ("NOPE = 1\n", 'unknown setting NOPE'),
    ("N = 'many'\n", "--N='many': expected a int"),
    ("N = (1\n", 'cfg.py'),
])
def test_bad_config_file_is_rejected(tmp_path, text, message):
    cfg = write(tmp_path / 'cfg.py', text)
    with pytest.raises(UserError, match=message.replace('(', r'\(')):
        parse(cfg)


def test_config_file_is_never_executed(tmp_path):
    marker = tmp_path / 'marker'
    cfg = write(tmp_path / 'cfg.py', f"NAME = open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UserError, match='NAME must be a literal'):
        parse(cfg)
    cfg = write(tmp_path / 'cfg2.py', f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nN = 1\n")
    with pytest.raises(UserError):
        parse(cfg)
    assert not marker.exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match='config file .*nope.py'):
        parse(str(tmp_path / 'nope.py'))


# ---------------------------------------------------------------- resume

def test_resumed_settings(tmp_path):
    saved = {**DEFAULTS, 'N': 11, 'LR': 0.5, 'FOLDS': [8, 9], 'DEVICE': 'cuda:3'}
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    cfg = utils.resumed_settings(str(tmp_path), {'N': 11, 'RESUME': str(tmp_path)}, DEFAULTS)
    # the saved run's settings (repeating one unchanged is fine) and this machine's device
    # (each of its declared type again: JSON wrote the tuple as a list)
    assert cfg['N'] == 11 and cfg['LR'] == 0.5 and cfg['FOLDS'] == (8, 9) and cfg['NAME'] == 'x'
    assert cfg['RESUME'] == str(tmp_path) and cfg['DEVICE'] == 'cpu'
    assert utils.resumed_settings(str(tmp_path), {'DEVICE': 'meta'}, DEFAULTS)['DEVICE'] == 'meta'
    # FAST_KERNELS too is this machine's: the default, or the given value (also for runs saved without it)
    fast = {**DEFAULTS, 'FAST_KERNELS': True}
    assert utils.resumed_settings(str(tmp_path), {}, fast)['FAST_KERNELS'] is True
    assert utils.resumed_settings(str(tmp_path), {'FAST_KERNELS': False}, fast)['FAST_KERNELS'] is False
    with pytest.raises(UserError, match='NOPE'):
        utils.resumed_settings(str(tmp_path), {'NOPE': 1}, DEFAULTS)
    with pytest.raises(UserError, match='--N cannot change when resuming .*11'):
        utils.resumed_settings(str(tmp_path), {'N': 12}, DEFAULTS)
    with pytest.raises(UserError, match=f'RESUME={tmp_path / "empty"}: .*config.json is missing'):
        utils.resumed_settings(str(tmp_path / 'empty'), {}, DEFAULTS)


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


# ---------------------------------------------------------------- checkpoints

def test_save_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / 'last.pt')
    utils.save_atomic({'w': torch.arange(3)}, path)
    utils.save_atomic({'w': torch.arange(4)}, path)
    assert torch.equal(utils.load_checkpoint(path)['w'], torch.arange(4))
    assert os.listdir(tmp_path) == ['last.pt']


def test_save_atomic_crash_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    utils.save_atomic({'w': torch.arange(3)}, path)

    def half_written(obj, f):
        with open(f, 'wb') as out:
            out.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', half_written)
    with pytest.raises(OSError, match='disk full'):
        utils.save_atomic({'w': torch.arange(4)}, path)
    monkeypatch.undo()
    assert torch.equal(utils.load_checkpoint(path)['w'], torch.arange(3))
    assert os.listdir(tmp_path) == ['last.pt']


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        utils.load_checkpoint(str(tmp_path / 'nope.pt'))
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='bad.pt cannot be read'):
        utils.load_checkpoint(str(bad))


def test_rng_states_round_trip():
    utils.seed_everything(1)
    state = utils.rng_states()
    a = torch.rand(3)
    torch.rand(5)
    utils.set_rng_states(state)
    assert torch.equal(torch.rand(3), a)


def test_progress_lines_without_a_terminal(capsys):
    # pytest's stderr is not a terminal: plain lines, at most one per every_s seconds, never after the last item
    assert list(utils.progress(range(4), desc='steps', every_s=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(',')[0] for ln in lines] == ['steps: 1/4', 'steps: 2/4', 'steps: 3/4']
    assert all('s left' in ln for ln in lines)
    assert list(utils.progress([5, 6], desc='quick')) == [5, 6]
    assert capsys.readouterr().out == ''


def test_run_cli_turns_errors_into_one_line_and_an_exit_code(monkeypatch, capsys):
    def main(**kw):
        raise kw['error']
    defaults = {'error': None, 'CHECKPOINT_CELLS': False}
    monkeypatch.setattr('sys.argv', ['script.py'])
    cases = [(UserError('bad input file x.csv'), 2, 'error: bad input file x.csv'),
             (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore'), 3,
              'error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB); set CHECKPOINT_CELLS=True'),
             (torch.cuda.OutOfMemoryError(), 3, 'error: out of GPU memory (); set CHECKPOINT_CELLS=True')]
    for error, code, message in cases:
        with pytest.raises(SystemExit) as stop:
            utils.run_cli(lambda error=error: main(error=error), defaults)
        assert stop.value.code == code and message in capsys.readouterr().err
