"""settings: command-line overrides, config files, the settings of a resumed run, run_cli's one-line errors."""
import json
import os

import pytest
import torch

import settings
from utils import UserError

DEFAULTS = {'N': 3, 'LR': 0.1, 'FOLDS': (5, 6), 'SIZES': [1, 2], 'FLAG': True, 'NAME': 'x', 'OPT': None,
            'FOLD': 'all', 'DEVICE': 'cpu', 'RESUME': ''}


def parse(*argv):
    return settings.parse_overrides(DEFAULTS, argv)


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
    cfg = settings.check_settings({'N': 4, 'LR': 2}, DEFAULTS)
    assert cfg['N'] == 4 and cfg['LR'] == 2.0 and cfg['NAME'] == 'x'
    with pytest.raises(UserError, match=r'unknown setting\(s\) BAD, WORSE \(known: DEVICE'):
        settings.check_settings({'BAD': 1, 'WORSE': 2}, DEFAULTS)
    with pytest.raises(UserError, match='--FLAG'):
        settings.check_settings({'FLAG': 'no'}, DEFAULTS)


def test_settings_of_keeps_only_plain_uppercase_constants():
    got = settings.settings_of({'EPOCHS': 3, 'LR': 0.1, 'lower': 1, '_HIDDEN': 2, 'MODULE': os, 'FOLDS': (1,)})
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

RUN_DEFAULTS = {**DEFAULTS, 'FAST_KERNELS': True, 'CHECKPOINT_CELLS': False, 'FIGURES': True, 'PARALLEL': 'off'}


def test_resumed_settings(tmp_path):
    saved = {**RUN_DEFAULTS, 'N': 11, 'LR': 0.5, 'FOLDS': [8, 9], 'DEVICE': 'cuda:3', 'FAST_KERNELS': False,
             'CHECKPOINT_CELLS': True, 'FIGURES': False, 'PARALLEL': 'ray', 'RESUME': ''}
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    cfg = settings.resumed_settings(str(tmp_path), {'N': 11, 'RESUME': str(tmp_path)}, RUN_DEFAULTS)
    # every setting is the saved run's (repeating one unchanged is fine), each of its declared type again (JSON wrote
    # the tuple as a list), also those a run may change: not the script's defaults
    assert cfg == {**saved, 'FOLDS': (8, 9), 'RESUME': str(tmp_path)} and list(cfg) == list(RUN_DEFAULTS)
    # only the settings given change, and only those that may
    cfg = settings.resumed_settings(str(tmp_path), {'DEVICE': 'meta', 'CHECKPOINT_CELLS': False}, RUN_DEFAULTS)
    assert (cfg['DEVICE'], cfg['CHECKPOINT_CELLS'], cfg['FIGURES'], cfg['PARALLEL']) == ('meta', False, False, 'ray')
    with pytest.raises(UserError, match='NOPE'):
        settings.resumed_settings(str(tmp_path), {'NOPE': 1}, RUN_DEFAULTS)
    with pytest.raises(UserError, match='--N cannot change when resuming .*11'):
        settings.resumed_settings(str(tmp_path), {'N': 12}, RUN_DEFAULTS)
    with pytest.raises(UserError, match=f'RESUME={tmp_path / "empty"}: .*config.json is missing'):
        settings.resumed_settings(str(tmp_path / 'empty'), {}, RUN_DEFAULTS)


def test_config_of_an_older_version_without_the_changeable_settings_resumes(tmp_path):
    old = {k: v for k, v in RUN_DEFAULTS.items() if k not in ('FAST_KERNELS', 'FIGURES', 'PARALLEL')}
    (tmp_path / 'config.json').write_text(json.dumps({**old, 'N': 7, 'CHECKPOINT_CELLS': True}))
    cfg = settings.resumed_settings(str(tmp_path), {'FIGURES': False}, RUN_DEFAULTS)
    assert (cfg['N'], cfg['CHECKPOINT_CELLS'], cfg['FIGURES'], cfg['FAST_KERNELS'], cfg['PARALLEL']) == \
        (7, True, False, True, 'off')                          # saved, saved, given, default, default


def test_a_saved_setting_broken_on_this_machine_says_where_it_comes_from(tmp_path, monkeypatch):
    (tmp_path / 'config.json').write_text(json.dumps({**RUN_DEFAULTS, 'DEVICE': 'cuda'}))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    rules = {**{k: None for k in RUN_DEFAULTS}, 'DEVICE': 'device(DEVICE)'}
    with pytest.raises(UserError, match=r"^DEVICE='cuda': CUDA is not available on this machine .*--DEVICE=cpu "
                                        rf'\(resuming {tmp_path}: the settings not given are those of its '
                                        r'config.json\)$'):
        settings.resolve({'RESUME': str(tmp_path)}, RUN_DEFAULTS, rules)
    assert settings.resolve({'RESUME': str(tmp_path), 'DEVICE': 'cpu'}, RUN_DEFAULTS, rules)['DEVICE'] == 'cpu'


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
            settings.run_cli(lambda error=error: main(error=error), defaults)
        assert stop.value.code == code and message in capsys.readouterr().err
