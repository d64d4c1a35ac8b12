"""What a user sees on the console: --help of every script (fast, before torch), the first step's time and the run's
estimate, and Ctrl-C (between steps, during a long C call, with the exact resume command or 'nothing to resume')."""
import ast
import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import write_cube_set

import console
import engine
import settings
import train_search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('prepare', 'nodclsgbt', 'train_search', 'train_evolve', 'train_3D_continuation', 'predict', 'draw', 'bench')
SEARCH = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
              PRIMITIVES=('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3'), EPOCHS=2, WARMUP_EPOCHS=1, SEED=3,
              HYPERGRAD='first', FIGURES=False)


# ---------------------------------------------------------------- --help

HELP_ALL = textwrap.dedent('''
    import io, runpy, sys, time, contextlib
    for name in sys.argv[1:]:
        out, t0 = io.StringIO(), time.perf_counter()
        sys.argv = [name + '.py', '--help']
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_path(name + '.py', run_name='__main__')
                code = 'no exit'
            except SystemExit as e:
                code = e.code
        print(f'=== {name} {code} {time.perf_counter() - t0:.2f}')
        print(out.getvalue())
    print('imported:', [m for m in ('torch', 'tensorboard') if m in sys.modules])
''')


@pytest.fixture(scope='module')
def helps():
    """{script: (exit code, --help text)} of every script, all run in one fresh interpreter that must not have
    imported torch or tensorboard afterwards."""
    out = subprocess.run([sys.executable, '-c', HELP_ALL, *SCRIPTS], cwd=REPO, capture_output=True, text=True,
                         timeout=600)  # a hang guard, not a measurement
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith('imported: []')
    texts = {}
    for part in out.stdout.split('=== ')[1:]:
        head, _, text = part.partition('\n')
        name, code, _ = head.split()
        texts[name] = (code, text)
    return texts


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_lists_every_setting_with_default_comment_and_rule(helps, script):
    code, text = helps[script]
    assert code == '0'
    module = importlib.import_module(script)
    lines = {line.split()[0].split('=')[0]: line for line in text.splitlines() if line.startswith('  --')}
    assert sorted(lines) == sorted(f'--{k}' for k in module.DEFAULTS)  # every setting, nothing else
    for name, rule in module.RULES.items():
        if rule is not None:
            assert lines[f'--{name}'].endswith(f'  [{console.rule_words(name, rule)}]'), name
    for line in lines.values():  # a default is a value: a literal, or a <description> of what it depends on
        default = line.split()[0].partition('=')[2]
        if not default.startswith('<'):
            ast.literal_eval(line[2:].partition('=')[2].partition('  ')[0].strip())


def test_help_shows_values_not_source_expressions(helps):
    def line(script, name):
        return next(x for x in helps[script][1].splitlines() if x.startswith(f'  --{name}='))
    assert line('train_search', 'DATA').startswith(f"  --DATA={os.path.join('data', 'demo')!r} ")  # data.DEMO_DIR
    assert line('train_search', 'DEVICE').startswith("  --DEVICE=<'cuda' when torch sees a GPU, else 'cpu'> ")
    assert line('predict', 'LUNG_ML').startswith('  --LUNG_ML=(100.0, 8200.0) ')  # lungmask.LUNG_ML
    assert line('prepare', 'PROTECT_MM').startswith('  --PROTECT_MM=4.0 ')
    assert line('nodclsgbt', 'CUBE_SET').startswith(f"  --CUBE_SET={os.path.join('data', 'luna16', 'cubes')!r} ")
    assert line('train_evolve', 'LRS').startswith('  --LRS=(0.001, 0.002, ')
    assert line('train_search', 'WEIGHT_DECAY').startswith('  --WEIGHT_DECAY=3e-4 ')  # a literal as written


def test_help_shows_rules_in_words(helps):
    text = helps['train_search'][1]
    assert '[fold numbers (one or more, each >= 0)]' in text and 'folds(' not in text
    assert "['cpu', 'cuda' or 'cuda:<index>' of a GPU this machine has]" in text and 'device(' not in text
    assert "[True only with DEVICE != 'cpu']" in text
    assert '  --EPOCHS=50 ' in text and 'search epochs  [>= 1]' in text
    assert '--C=16 ' in text and '[>= 1, a multiple of PC_K]' in text
    assert "  ['acc' or 'auc']" in helps['train_evolve'][1]
    assert "['' or an existing file]" in helps['prepare'][1]  # NODULE_TABLE == '' or isfile(NODULE_TABLE)
    assert '[one or more values, whole numbers, each >= 1]' in helps['train_evolve'][1]  # FILTERS
    assert '[2 values, 0 <= LUNG_ML[0] < LUNG_ML[1]]' in helps['predict'][1]


def test_bench_help_heads_sections_instead_of_attaching_them_to_the_setting_above(helps):
    text = helps['bench'][1]
    assert text.startswith('bench.py: Benchmarks: operations per training step (on a CPU too)')
    lines = text.splitlines()
    amp = lines.index(next(x for x in lines if x.startswith('  --AMP=')))
    assert lines[amp].endswith('bf16 autocast in the step benchmarks')
    assert lines[amp + 1] == '' and lines[amp + 2].startswith("  BENCH='methods' (not in 'all'; benchmarks/methods.py)")
    assert lines[amp + 3].startswith('  --METHODS_DATA=')
    assert next(x for x in lines if x.startswith('  --MEMORY_GB=')).endswith('the largest batch that fits is '
                                                                             'estimated for it  [> 0]')
    budget = next(x for x in lines if x.startswith('  --GPU_BUDGET_S='))  # a comment's next line continues it
    assert 'the whole run takes under 8 minutes  [> 0]' in budget


def test_help_of_the_shown_setting_reads_the_rule_words():
    assert console.rule_words('X', "X == '' or isdir(X)") == "'' or an existing folder"
    assert console.rule_words('M', "in ('off', 'ray')") == "'off' or 'ray'"
    assert console.rule_words('T', "T == () or folds(T)") == '() or fold numbers (one or more, each >= 0)'
    assert console.rule_words('N', '2 <= N <= P') == '2 <= N <= P'  # kept as written where no words fit
    assert console.rule_words('S', "S == '' or D == ''") == "'' or any value when D == ''"
    assert console.rule_words('M', "in ('a', 'b', 'c')") == "'a', 'b' or 'c'"
    assert console.rule_words('N', None) is None
    # every function a rule may call, besides len/min/max (read as counts and bounds), has its words
    assert set(settings.RULE_FUNCTIONS) - {'len', 'min', 'max'} == set(console.RULE_FUNCTION_WORDS)


def test_help_shows_default_as_written_comment_continuation_and_rule(helps):
    text = helps['train_search'][1]
    assert "capture each search step once as a CUDA graph and replay it (graphs.py; CUDA only; off until a GPU " \
        "measurement decides, BENCHMARKS.md)  [True only" in text  # the continuation line, not a section head
    assert text.startswith('train_search.py: Architecture search (NAS-HBO)')
    retrain = [line for line in helps['train_3D_continuation'][1].splitlines() if line.startswith('  --GENOTYPE=')]
    assert retrain and retrain[0].endswith("which become this run's defaults unless given explicitly)")  # next line


def test_help_is_read_without_running_the_source(tmp_path):
    """The settings are read with ast: a script whose constants would raise if executed still answers."""
    script = tmp_path / 'tool.py'
    script.write_text('"""A tool."""\nimport settings\nX = 1 / 0  # a number\n# more about X\nY = "#"  # a hash\n'
                      'DEFAULTS = {}\nRULES = {"X": "> 0", "Y": None}\n')
    text = console.script_help(str(script))
    assert '--X=1 / 0' in text and 'a number more about X  [> 0]' in text
    assert '--Y="#"' in text and text.rstrip().endswith('a hash')


# ---------------------------------------------------------------- first step: its time and the run's estimate

def test_estimate_line_multiplies_epochs_steps_and_step_time():
    assert engine.estimate_line('fold 5', 2.0, 38, 50) == (
        'fold 5: 50 epochs x 38 steps x 2.00 s = about 63 min (without evaluation)')
    assert engine.estimate_line('x', 1.0, 1, 1) == 'x: 1 epoch x 1 step x 1.00 s = about 1 s (without evaluation)'
    assert [engine.duration(s) for s in (45, 700, 3 * 3600, 3 * 86400)] == ['45 s', '12 min', '3.0 h', '3.0 days']


def test_run_epoch_times_its_first_two_steps_and_the_estimate_uses_the_second():
    """The first step carries one-time setup (35 s against 1 s for the next on a busy CPU): the estimate is the
    second step's time x steps x epochs."""
    import torch
    lines, clock = [], iter([0.0, 30.0, 30.0, 32.0])  # perf_counter: start, after step 0, mark, after step 1
    engine_time = engine.time.perf_counter
    engine.time.perf_counter = lambda: next(clock, 99.0)
    try:
        engine.run_epoch(lambda idx: (torch.tensor(1.0), torch.tensor(0)), [torch.arange(2)] * 5, 10, 'e', None,
                         on_step_time=engine.step_time_logger(lines.append, 'warm-up', 3))
    finally:
        engine.time.perf_counter = engine_time
    assert lines == ['warm-up: first step 30.00 s (with one-time setup); timing the next one for the estimate',
                     'warm-up: 3 epochs x 5 steps x 2.00 s = about 30 s (without evaluation)']


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=2)


def run_cli_search(monkeypatch, capsys, cubes, runs, interrupt_at=None):
    """train_search through run_cli as from the command line; interrupt_at=epoch: Ctrl-C at its first step (the
    KeyboardInterrupt Python raises between two steps). Returns (exit code or None, captured output)."""
    real = engine.train_step
    if interrupt_at is not None:
        epoch_of = {}
        real_epoch = train_search.search_epoch

        def search_epoch(epoch, *args, **kwargs):
            epoch_of['now'] = epoch
            return real_epoch(epoch, *args, **kwargs)

        def step(*args, **kwargs):
            if epoch_of['now'] == interrupt_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        monkeypatch.setattr(train_search, 'search_epoch', search_epoch)
        monkeypatch.setattr(engine, 'train_step', step)
    argv = ['train_search.py', *(f'--{k}={v!r}' if not isinstance(v, str) else f'--{k}={v}'
                                 for k, v in {**SEARCH, 'DATA': cubes, 'RUNS': str(runs)}.items())]
    monkeypatch.setattr(sys, 'argv', argv)
    capsys.readouterr()
    try:
        settings.run_cli(train_search.main, train_search.DEFAULTS, 'the last epoch checkpoint is kept',
                         kept=('last.pt',))
        code = None
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_search_logs_first_step_time_and_estimate_of_each_phase(monkeypatch, capsys, cubes, tmp_path):
    code, out = run_cli_search(monkeypatch, capsys, cubes, tmp_path / 'runs')
    assert code is None
    lines = [line for line in out.out.splitlines() if 'first step' in line or ' x 3 steps x ' in line]
    assert len(lines) == 4, out.out  # two per phase
    assert lines[0].startswith('warm-up (weight steps only): first step ')
    assert lines[1].startswith('warm-up (weight steps only): 1 epoch x 3 steps x ')
    assert lines[1].endswith('; then 1 search epoch, timed at its first step')
    assert lines[2].startswith('search (architecture and weight steps): first step ')
    assert lines[3].startswith('search (architecture and weight steps): 1 epoch x 3 steps x ')
    log = open(os.path.join(tmp_path / 'runs', os.listdir(tmp_path / 'runs')[0], 'log.txt')).read()
    assert all(line in log for line in lines)
    assert out.out.index('rough estimate on this CPU from one cube') < out.out.index(lines[0])  # before any step
    cells = [line for line in out.out.splitlines() if ' cell, per edge: leading op' in line]
    assert len(cells) == 4  # normal and reduce, two epochs
    edges = cells[0].partition(': leading op, its W, its lead over the next: ')[2].split(' | ')
    assert len(edges) == 14 and all(e.split()[1] in SEARCH['PRIMITIVES'] for e in edges)
    assert len({e.split()[2] for e in edges}) > 1  # W to 4 digits tells the edges apart after one epoch


def test_cpu_estimate_leaves_the_search_unchanged(monkeypatch, cubes, tmp_path):
    """The timed forward pass draws no random number and moves no batch-norm statistic: the same search with and
    without it gives the same numbers."""
    with_it = train_search.main(**SEARCH, DATA=cubes, RUNS=str(tmp_path / 'a'))
    monkeypatch.setattr(engine, 'cpu_estimate', lambda *args: 0.0)
    without = train_search.main(**SEARCH, DATA=cubes, RUNS=str(tmp_path / 'b'))
    rows = [open(os.path.join(r['run'], 'metrics.csv')).read().splitlines() for r in (with_it, without)]
    assert [x.split(',')[:-1] for x in rows[0]] == [x.split(',')[:-1] for x in rows[1]]  # all but the seconds
    assert with_it['genotype'] == without['genotype']


def test_edge_leaders_names_each_edges_leading_op_its_weight_and_lead():
    w = torch.tensor([[0.25, 0.2512, 0.2499], [0.1, 0.3, 0.6]])
    assert engine.edge_leaders(w, ['a', 'b', 'c']) == '0 b 0.2512 +1.2e-03 | 1 c 0.6000 +3.0e-01'


def test_cpu_estimate_scales_one_forward_by_the_passes_and_names_the_tiny_command(monkeypatch):
    monkeypatch.setattr(engine, 'forward_seconds', lambda model, cube, device: (2.0, 1.9))
    lines = []
    total = engine.cpu_estimate(None, 32, 'cpu', [('warm-up', 23, 38, 7, 3), ('search', 27, 38, 7, 15)], 242,
                                'python tiny.py', lines.append)
    assert total == 2.0 * (23 * 38 * 7 * 3 + 27 * 38 * 7 * 15 + 50 * 242)
    assert 'warm-up step about 42 s (7 cubes x 3 passes), search step about 4 min (7 cubes x 15 passes)' in lines[1]
    assert lines[2].endswith('a run that finishes in minutes on a CPU (a tiny network on one fold; its numbers mean '
                             'nothing):\n  python tiny.py')
    assert len(lines) == 2 + (total > engine.CPU_SIZED_S)
    lines.clear()
    assert engine.cpu_estimate(None, 16, 'cpu', [('warm-up', 1, 2, 8, 3)], 10, 'tiny', lines.append) < 3600
    assert len(lines) == 2  # a run under an hour: no GPU-sized note
    assert "CPU: other work" not in lines[1]
    monkeypatch.setattr(engine, 'forward_seconds', lambda model, cube, device: (200.0, 40.0))  # a busy machine
    engine.cpu_estimate(None, 16, 'cpu', [('warm-up', 1, 2, 8, 3)], 10, 'tiny', lines.append)
    assert "forward pass (200.00 s, 40 s of it on this process's CPU: other work slows this machine;" in lines[-2]


# ---------------------------------------------------------------- Ctrl-C

def test_interrupt_before_the_first_checkpoint_says_nothing_to_resume(monkeypatch, capsys, cubes, tmp_path):
    """The new run folder holds only config.json and log.txt: it is removed, and the message says so."""
    code, out = run_cli_search(monkeypatch, capsys, cubes, tmp_path / 'runs', interrupt_at=0)
    assert code == 130
    assert os.listdir(tmp_path / 'runs') == []
    folder = re.search(r'removed its new run folder (\S+) ', out.err).group(1)
    assert os.path.dirname(folder) == str(tmp_path / 'runs')
    assert out.err.strip() == (f'interrupted before the first checkpoint: nothing to resume; removed its new run '
                               f'folder {folder} (it held only config.json and log.txt); rerun the same command to '
                               'start again')


def test_interrupt_before_the_first_checkpoint_keeps_a_folder_with_more_or_given_by_resume(monkeypatch, tmp_path):
    run = tmp_path / 'runs' / 'train_search-1'
    run.mkdir(parents=True)
    for name in ('config.json', 'log.txt', 'notes.txt'):
        (run / name).write_text('x')
    monkeypatch.setattr(settings, '_RUN_FOLDER', [str(run), True])
    assert settings.interrupt_message('train_search.py', 'kept', ('last.pt',), {}) == (
        f'interrupted before the first checkpoint: nothing to resume in {run} (kept: it holds more than config.json '
        'and log.txt); rerun the same command to start again')
    (run / 'notes.txt').unlink()
    monkeypatch.setattr(settings, '_RUN_FOLDER', [str(run), False])  # a RESUME folder is never removed
    assert 'nothing to resume in' in settings.interrupt_message('train_search.py', 'kept', ('last.pt',), {})
    assert sorted(os.listdir(run)) == ['config.json', 'log.txt']


def test_interrupt_prints_the_exact_resume_command_and_it_continues(monkeypatch, capsys, cubes, tmp_path):
    code, out = run_cli_search(monkeypatch, capsys, cubes, tmp_path / 'runs', interrupt_at=1)
    assert code == 130
    (folder,) = os.listdir(tmp_path / 'runs')
    path = os.path.join(tmp_path / 'runs', folder)
    head, command = out.err.strip().split('\n')
    assert head == 'interrupted: the last epoch checkpoint is kept; continue with:'
    assert command == f'  python train_search.py --RESUME={path} --DEVICE=cpu --FIGURES=False'
    monkeypatch.undo()
    monkeypatch.setattr(sys, 'argv', command.split()[1:])  # run the printed command
    settings.run_cli(train_search.main, train_search.DEFAULTS, kept=('last.pt',))  # returns: no exit
    assert 'resumed from ' in capsys.readouterr().out
    metrics = open(os.path.join(path, 'metrics.csv')).read().splitlines()
    assert [row.split(',')[0] for row in metrics[1:]] == ['0', '1']


def test_interrupt_before_the_run_folder_says_nothing_to_resume(monkeypatch):
    monkeypatch.setattr(settings, '_RUN_FOLDER', [])  # no run folder made yet
    assert settings.interrupt_message('train_search.py', 'kept', ('last.pt',), {}) == (
        'interrupted before the run folder was made: nothing to resume; rerun the same command to start again')
    assert settings.interrupt_message('predict.py', 'rerun the same command', None, {}) == (
        'interrupted: rerun the same command')


LONG_C_CALL = textwrap.dedent('''
    import ctypes, os, signal, sys
    sys.path.insert(0, {repo!r})
    import settings

    def main(**overrides):
        run = {run!r}
        os.makedirs(run, exist_ok=True)
        open(os.path.join(run, 'last.pt'), 'w').close()
        settings.note_run_folder(run)
        # One long C call with the GIL released, like a supernet's backward on a CPU. SIGINT is blocked in this
        # thread so that sleep() is not cut short: it reaches the process through another thread, as it would
        # while autograd's threads run.
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})
        print('ready', flush=True)
        ctypes.CDLL(None).sleep(60)

    settings.run_cli(main, {{'RESUME': '', 'DEVICE': 'cpu'}}, 'the last epoch checkpoint is kept', kept=('last.pt',))
''')


def wait_until_in_c_sleep(proc):
    """Until the process's main thread waits in the C library's sleep() (Linux: its wait channel names nanosleep;
    it reads 0 while the thread runs). Where it cannot be read: a short pause."""
    for _ in range(6000):  # at most a minute: the call ends by itself at 60 s
        try:
            with open(f'/proc/{proc.pid}/wchan') as f:
                if 'nanosleep' in f.read() or proc.poll() is not None:
                    return
        except OSError:
            time.sleep(0.3)
            return
        time.sleep(0.01)


def test_ctrl_c_during_a_long_c_call_acts_within_seconds(tmp_path):
    script = tmp_path / 'long_step.py'
    run = str(tmp_path / 'runs' / 'long_step-1')
    script.write_text(LONG_C_CALL.format(repo=REPO, run=run))
    proc = subprocess.Popen([sys.executable, str(script), '--DEVICE=cpu'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline() == 'ready\n'
    wait_until_in_c_sleep(proc)  # Ctrl-C before the call would be Python's to handle
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=600)  # a hang guard, not a measurement (unstopped, the call ends at 60 s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail('Ctrl-C did not stop a long C call')
    # stopped by the watcher after its grace (the line below), not by the call's end (exit code 0) or by Python
    assert proc.returncode == 130
    assert err.strip().splitlines()[-3:] == [f'(the step was still running {console.INTERRUPT_GRACE_S:.0f} s after '
                                             'Ctrl-C: stopped it)',
                                             'interrupted: the last epoch checkpoint is kept; continue with:',
                                             f'  python {script} --RESUME={run} --DEVICE=cpu']


SLOW_CLEAN_UP = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import console
    import settings

    def main(**overrides):
        try:
            print('ready', flush=True)
            while True:  # Python code: Ctrl-C reaches it at once
                time.sleep(0.05)
        finally:  # a clean-up longer than the watcher's grace (e.g. a Ray shutdown)
            time.sleep(console.INTERRUPT_GRACE_S + 1)
            open({done!r}, 'w').close()

    settings.run_cli(main, {{'DEVICE': 'cpu'}}, 'nothing is kept')
''')


def test_ctrl_c_handled_by_python_lets_a_slow_clean_up_finish(tmp_path):
    done = str(tmp_path / 'cleaned')
    script = tmp_path / 'slow_clean_up.py'
    script.write_text(SLOW_CLEAN_UP.format(repo=REPO, done=done))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    assert proc.stdout.readline() == 'ready\n'
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)  # a hang guard, not a measurement
    assert proc.returncode == 130 and os.path.exists(done)  # the watcher did not cut the clean-up short
    assert err.strip().splitlines()[-1] == 'interrupted: nothing is kept'
