"""Allowed values of the scripts' settings, and resolving the settings of a run before anything is written.

Each script declares, right after its UPPERCASE constants, a RULES dict with one entry per setting (in the
constants' order): a small Python expression over the settings that must hold, or None (any value of the setting's
type). Rules are parsed, never executed: only settings, constants, arithmetic, comparisons, and/or/not, x[i] and
the functions of RULE_FUNCTIONS. A rule starting with a comparison compares the setting itself:

    RULES = {'EPOCHS': '>= 1', 'VAL_FRACTION': '0 < VAL_FRACTION < 1', 'C': 'C >= 1 and C % PC_K == 0',
             'DEVICE': 'device(DEVICE)', 'TABLE': "TABLE == '' or isfile(TABLE)", 'TAG': None}

and main(**overrides) starts with

    cfg = settings.resolve(overrides, DEFAULTS, RULES)

then checks its other inputs (files, folds, genotypes) before it creates or touches its run folder. A broken rule is
one line (a UserError, printed by run_cli without a traceback) naming the setting, its value and the rule.
"""
import ast
import contextlib
import glob
import json
import operator
import os
import shlex
import shutil
import sys

import console
import tboard
from utils import UserError


def resolve(overrides, defaults, rules):
    """The settings of a script's run, every one checked before the script writes anything: the defaults updated
    with main(**overrides) (names and types checked), or, with RESUME, the continued run's config.json updated with
    the given settings that may change (see resumed_settings); then each value against its rule (check_rules)."""
    cfg = check_settings(overrides, defaults)
    if not cfg.get('RESUME'):
        check_rules(cfg, rules)
        return cfg
    cfg = resumed_settings(cfg['RESUME'], overrides, defaults)
    try:
        check_rules(cfg, rules)
    except UserError as e:  # e.g. DEVICE='cuda' of a run continued on a machine without a GPU
        raise UserError(f'{e} (resuming {cfg["RESUME"]}: the settings not given are those of its config.json)') \
            from None
    return cfg


def _ints(values):
    """Every element an int (not a bool)."""
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _folds(values):
    """A non-empty sequence of fold numbers (ints >= 0)."""
    return len(values) >= 1 and _ints(values) and min(values) >= 0


def usable_device(name):
    """True for 'cpu' and for 'cuda' / 'cuda:<index>' when that GPU is visible; otherwise a UserError saying why."""
    if name == 'cpu':
        return True
    kind, _, index = name.partition(':')
    if kind != 'cuda' or not (index == '' or index.isdigit()):
        raise UserError(f"DEVICE={name!r}: must be 'cpu', 'cuda' or 'cuda:<index>'")
    import torch
    if not torch.cuda.is_available():
        raise UserError(f'DEVICE={name!r}: CUDA is not available on this machine (torch.cuda.is_available() is '
                        'False); use --DEVICE=cpu')
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f'DEVICE={name!r}: this machine has {torch.cuda.device_count()} GPU(s)')
    return True


# Functions a rule may call (besides its settings, constants, arithmetic, comparisons, and/or/not, x[i]).
RULE_FUNCTIONS = {'len': len, 'min': min, 'max': max, 'ints': _ints, 'folds': _folds, 'isfile': os.path.isfile,
                  'isdir': os.path.isdir, 'device': usable_device,
                  'tensorboard': tboard.check}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Eq: operator.eq,
            ast.NotEq: operator.ne, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_RULE_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Tuple, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp,
               ast.Not, ast.USub, ast.BinOp, ast.Compare, ast.Subscript, ast.Call, *_BINARY, *_COMPARE)


def _check_rule(tree, rule):
    """Only the elements _rule_value evaluates: a rule is data, never run as code."""
    for node in ast.walk(tree):
        if not isinstance(node, _RULE_NODES) or (isinstance(node, ast.Call) and (
                not isinstance(node.func, ast.Name) or node.func.id not in RULE_FUNCTIONS or node.keywords)):
            raise ValueError(f'rule {rule!r}: element {ast.unparse(node)!r} is not supported')


class _RuleFailure(Exception):
    """A rule that cannot be evaluated: `names` are the settings whose values made the failing step fail."""

    def __init__(self, names, error):
        super().__init__(str(error))
        self.names, self.error = names, error


def _setting_names(*nodes):
    return list(dict.fromkeys(n.id for node in nodes for n in ast.walk(node)
                              if isinstance(n, ast.Name) and n.id not in RULE_FUNCTIONS))


def _step(blamed, fn, *args, divisor=None):
    """fn(*args) of one step of a rule; a failure (a comparison of values of other types, an index out of range) is a
    _RuleFailure naming the settings read by the nodes `blamed`; a division by zero names those of the `divisor`."""
    try:
        return fn(*args)
    except (TypeError, ValueError, ZeroDivisionError, IndexError, KeyError, OverflowError) as e:
        if isinstance(e, ZeroDivisionError) and divisor is not None:
            blamed = [divisor]
        raise _RuleFailure(_setting_names(*blamed), e) from None


def _rule_value(node, cfg):
    """Evaluate a rule's parsed expression over the settings `cfg`; nothing else is reachable (no eval). A step that
    fails raises _RuleFailure naming the settings that made it fail."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return cfg[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(_rule_value(e, cfg) for e in node.elts)
    if isinstance(node, ast.BoolOp):  # short-circuits like Python: 'len(X) >= 1 and X[0] >= 0'
        for value in node.values:
            result = _rule_value(value, cfg)
            if _step([value], bool, result) == isinstance(node.op, ast.Or):
                return result
        return result
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        value = _rule_value(node.operand, cfg)
        return _step([node.operand], operator.not_ if isinstance(node.op, ast.Not) else operator.neg, value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        # dividing by zero is the divisor's fault (C % PC_K with PC_K=0 names PC_K); other failures both operands'
        return _step([node.left, node.right], _BINARY[type(node.op)], _rule_value(node.left, cfg),
                     _rule_value(node.right, cfg), divisor=node.right)
    if isinstance(node, ast.Compare):
        left_node, left = node.left, _rule_value(node.left, cfg)
        for op, right_node in zip(node.ops, node.comparators):
            right = _rule_value(right_node, cfg)
            if not _step([left_node, right_node], _COMPARE[type(op)], left, right):
                return False
            left_node, left = right_node, right
        return True
    if isinstance(node, ast.Subscript):
        return _step([node.value, node.slice], operator.getitem, _rule_value(node.value, cfg),
                     _rule_value(node.slice, cfg))
    if isinstance(node, ast.Call):  # checked by _check_rule: one of RULE_FUNCTIONS
        return _step(node.args, RULE_FUNCTIONS[node.func.id], *(_rule_value(a, cfg) for a in node.args))
    raise AssertionError(f'{ast.unparse(node)!r} passed _check_rule')


def _parse_rule(name, rule, cfg):
    """(rule text, parsed expression, the settings it reads) of a setting's rule, checked; None for no rule."""
    if name not in cfg:
        raise ValueError(f'rule for unknown setting {name}')
    if rule is None:
        return None
    rule = console.full_rule(name, rule)  # '>= 1' of EPOCHS: 'EPOCHS >= 1'
    tree = ast.parse(rule, mode='eval')
    _check_rule(tree, rule)
    names = _setting_names(tree)
    bad = [n for n in names if n not in cfg]
    if bad:
        raise ValueError(f'rule of {name} reads unknown setting(s) {", ".join(bad)}')
    return rule, tree, names


def check_rules(cfg, rules):
    """Check each setting against its rule: `rules` maps a setting's name to a Python expression over the settings
    (e.g. '0 < VAL_FRACTION < 1', 'C % PC_K == 0', "NODULE_TABLE == '' or isfile(NODULE_TABLE)"; one that starts
    with a comparison compares the setting itself: '>= 1' for 'EPOCHS' is 'EPOCHS >= 1') or to None (any value of
    its type). A rule is checked after the rules of the other settings it reads, so the first broken rule is the
    one of the setting at fault: a UserError naming the setting, its value, the rule and the other settings the rule
    reads (PC_K=0 breaks PC_K's '>= 1', not C's 'C % PC_K == 0'). A rule that cannot be evaluated names the
    settings that made it fail (a divisor of 0, a value of another type). A rule naming an unknown setting is a bug
    of the script (ValueError)."""
    parsed = {name: _parse_rule(name, rule, cfg) for name, rule in rules.items()}
    done = set()

    def check(name, reading):
        if name in done or name in reading:  # checked, or a cycle of rules reading each other
            return
        rule, tree, names = parsed[name] or (None, None, ())
        for other in names:
            if other != name and other in parsed:
                check(other, reading | {name})
        done.add(name)
        if rule is not None:
            _evaluate(name, rule, tree, names, cfg)
    for name in rules:
        check(name, frozenset())


def _evaluate(name, rule, tree, names, cfg):
    try:
        ok = _rule_value(tree.body, cfg)
    except _RuleFailure as failure:
        if failure.names and name not in failure.names:  # another setting's value made the rule fail: name it
            values = ', '.join(f'{n}={cfg[n]!r}' for n in failure.names)
            many = len(failure.names) > 1
            raise UserError(f'{values} {"are" if many else "is"} not allowed: the rule of {name} ({name}={cfg[name]!r})'
                            f', {rule}, cannot be evaluated with {"them" if many else "it"} '
                            f'({type(failure.error).__name__}: {failure.error})') from None
        ok = False  # the setting's own value, e.g. a comparison with a value of another type (None defaults)
    if not ok:
        others = ', '.join(f'{n}={cfg[n]!r}' for n in names if n != name)
        raise UserError(f'{name}={cfg[name]!r} is not allowed: it must satisfy {rule}'
                        + (f' ({others})' if others else ''))


# ---------------------------------------------------------------- command line, config files, resume

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


RESUME_HINT = 'the last checkpoint is kept'
_RUN_FOLDER = []  # [path, new]: the run folder this process opened (runfolder.Run notes it) and whether it made it
STARTED_FILES = ('config.json', 'log.txt')  # what a run folder holds before its first checkpoint or result
EVENT_FILES = 'events.out.tfevents.'  # TensorBoard's (tboard.py), in the folder and in a retrain's fold<f>/


def note_run_folder(path, new=False):
    """Called by runfolder.Run: the folder an interrupted run names in its resume command; new: this process made it
    (a run interrupted before its first checkpoint removes it)."""
    _RUN_FOLDER[:] = [path, new]


def discard_unstarted(path):
    """Remove a run folder this process made when it holds nothing but STARTED_FILES and TensorBoard event files
    (the run was interrupted before anything worth keeping was written); returns whether it did. Anything else in it
    keeps the folder."""
    try:
        for folder, _, files in os.walk(path):
            if any(not f.startswith(EVENT_FILES) and (folder != path or f not in STARTED_FILES) for f in files):
                return False
        shutil.rmtree(path)
    except OSError:
        return False
    return True


def run_cli(main, defaults, on_interrupt=RESUME_HINT, kept=None):
    """Entry point of a script: answer --help, parse sys.argv, run main(**overrides), print user errors as one line.
    on_interrupt: what Ctrl-C prints after 'interrupted: ' (what is kept, or how the script continues).
    kept: for a resumable script, the file patterns in its run folder from which --RESUME continues (checkpoints,
    finished folds); Ctrl-C then prints the exact resume command, or that there is nothing to resume yet."""
    script = sys.modules[main.__module__].__file__
    console.help_if_asked(script)
    _RUN_FOLDER.clear()
    overrides = {}
    watch = console.InterruptWatch(lambda: interrupt_message(script, on_interrupt, kept, overrides))
    try:
        overrides.update(parse_overrides(defaults, sys.argv[1:]))
        main(**overrides)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        watch.handled.set()
        print(interrupt_message(script, on_interrupt, kept, overrides), file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - only torch's out-of-GPU-memory error is answered here
        torch = sys.modules.get('torch')  # imported by the script when it ran a network; never imported here
        if torch is None or not isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        advice = ('set CHECKPOINT_CELLS=True (a run continues with it: --RESUME=<run folder> '
                  '--CHECKPOINT_CELLS=True) or a smaller BATCH_SIZE') if 'CHECKPOINT_CELLS' in defaults else \
            'use a smaller batch'
        first = str(e).partition('\n')[0]
        print(f'error: out of GPU memory ({first}); {advice}', file=sys.stderr)
        sys.exit(3)
    finally:
        watch.close()


def interrupt_message(script, on_interrupt, kept, overrides):
    """What Ctrl-C prints: for a resumable script (kept: its checkpoint patterns) the exact command that continues the
    run folder, or that nothing can be resumed yet; otherwise 'interrupted: ' + on_interrupt."""
    if kept is None:
        return f'interrupted: {on_interrupt}'
    if not _RUN_FOLDER:
        return 'interrupted before the run folder was made: nothing to resume; rerun the same command to start again'
    path, new = _RUN_FOLDER
    if not any(glob.glob(os.path.join(glob.escape(path), pattern)) for pattern in kept):
        if new and discard_unstarted(path):
            return (f'interrupted before the first checkpoint: nothing to resume; removed its new run folder {path} '
                    f'(it held only {" and ".join(STARTED_FILES)}); rerun the same command to start again')
        why = f'it holds more than {" and ".join(STARTED_FILES)}' if new else 'the folder given by RESUME'
        return (f'interrupted before the first checkpoint: nothing to resume in {path} (kept: {why}); rerun the same '
                'command to start again')
    args = [f'--RESUME={path}'] + [f'--{k}={v if isinstance(v, str) else repr(v)}' for k, v in overrides.items()
                                   if k in RESUMABLE_CHANGES and k != 'RESUME']  # this machine's, not in config.json
    shown = sys.argv[0] if os.path.basename(sys.argv[0]) == os.path.basename(script) else os.path.relpath(script)
    command = shlex.join(['python', shown, *args])
    return f'interrupted: {on_interrupt}; continue with:\n  {command}'


def check_settings(overrides, defaults):
    """Defaults updated with main(**overrides); unknown names and wrong types are rejected."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UserError(f'unknown setting(s) {", ".join(unknown)} (known: {", ".join(sorted(defaults))})')
    return {**defaults, **{k: _coerce(k, v, defaults[k]) for k, v in overrides.items()}}


# Settings a continued run may change, when given: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = ('RESUME', 'DEVICE', 'FAST_KERNELS', 'CUDA_GRAPHS', 'CHECKPOINT_CELLS', 'FIGURES', 'PARALLEL',
                     'TENSORBOARD')


# Settings that change what a run computes and were added after run folders had been written: a config.json
# without one was trained with the value here (the form the code had before the setting existed), so such a run
# resumes, and predict.py loads its models, in that form. A setting added later must be listed here.
FORMER_VALUES = {
    'REDUCE_SHIFT': True,  # FactorizedReduce's second conv read x shifted by one voxel (DARTS)
    'MBCONV_AFFINE': False,  # the supernet's MBConv BatchNorms had no scale and shift
    'ONE_SIDED_SHIFT': False,  # the random crop moved the content -2..+2 voxels
    'ARCH_BN_STATS': False,  # architecture steps left the BatchNorm running statistics
}


def trained_with(run_cfg, name):
    """The value of setting `name` a run was trained with: its config.json's, or FORMER_VALUES' for a run folder
    written before the setting existed."""
    return run_cfg.get(name, FORMER_VALUES[name])


def read_run_config(run_path, defaults):
    """config.json of a run folder to continue, checked to belong to the script of `defaults`: it must parse, hold
    every setting of the script (those in RESUMABLE_CHANGES may be missing) and no other, each of its type. Settings
    of FORMER_VALUES it lacks (an older run folder) get their former value."""
    path = os.path.join(run_path, 'config.json')
    if not os.path.exists(path):
        raise UserError(f'RESUME={run_path}: {path} is missing (not a run folder of this script?)')
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        what = 'is empty' if os.path.getsize(path) == 0 else f'cannot be read ({e})'
        raise UserError(f'RESUME={run_path}: {path} {what}; {new_run_hint(run_path, defaults)}') from None
    if not isinstance(saved, dict):
        raise UserError(f'RESUME={run_path}: {path} holds no settings; {new_run_hint(run_path, defaults)}')
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise UserError(f'RESUME={run_path}: not a run folder of this script: its config.json has setting(s) '
                        f'{", ".join(unknown)}, which this script does not have')
    missing = sorted(set(defaults) - set(saved) - set(RESUMABLE_CHANGES) - set(FORMER_VALUES))
    if missing:
        raise UserError(f'RESUME={run_path}: {path} lacks setting(s) {", ".join(missing)} (damaged, or written by '
                        f'another version of this script); {new_run_hint(run_path, defaults)}')
    for k, v in saved.items():
        try:
            _coerce(k, v, defaults[k])
        except UserError:
            raise UserError(f'RESUME={run_path}: {path}: {k}={v!r} is not a {type(defaults[k]).__name__}; '
                            f'{new_run_hint(run_path, defaults)}') from None
    return {**{k: v for k, v in FORMER_VALUES.items() if k in defaults}, **saved}  # an older run: its former form


def new_run_hint(run_path, defaults):
    """The end of a damaged config.json's message: the run cannot be continued, its log.txt holds the settings it ran
    with (the '  NAME = value' lines of Run.header), and the command of a new run with them (those not the default,
    but the machine's own: RESUMABLE_CHANGES)."""
    log, logged = os.path.join(run_path, 'log.txt'), {}
    try:
        with open(log, errors='replace') as f:
            for line in f:
                name, sep, value = line.rstrip('\n').partition(' = ')
                if sep and name.startswith('  ') and name.strip() in defaults:
                    with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                        logged[name.strip()] = ast.literal_eval(value)
    except OSError:
        return 'the run cannot be continued: start a new run (the same command without --RESUME)'
    args = [f'--{k}={v if isinstance(v, str) else repr(v)}' for k, v in logged.items()
            if k not in RESUMABLE_CHANGES and v != defaults[k]]
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.path.basename(sys.argv[0]))
    script = sys.argv[0] if os.path.isfile(here) and not here.endswith('__main__.py') else '<script>.py'
    return (f'the run cannot be continued; {log} holds the settings it ran with (its lines "  NAME = value"): start a '
            f'new run with them: {shlex.join(["python", script, *args])}')


def resumed_settings(run_path, overrides, defaults):
    """Settings of a run being continued: every one from its config.json, except those given (main(**overrides),
    the command line) among RESUMABLE_CHANGES. Giving another value of any other setting is a UserError (the saved
    optimizer and schedule were built from them); repeating the saved value is fine. A setting of RESUMABLE_CHANGES
    that an older config.json lacks is the given value or the script's default."""
    checked = check_settings(overrides, defaults)
    saved = read_run_config(run_path, defaults)
    for k in overrides:
        if k not in RESUMABLE_CHANGES and json.loads(json.dumps(checked[k])) != saved.get(k):
            raise UserError(f'--{k} cannot change when resuming {run_path} (it was {saved.get(k)!r}); '
                            'start a new run instead')
    return {k: checked[k] if k in overrides or k not in saved else _coerce(k, saved[k], defaults[k])
            for k in defaults} | {'RESUME': run_path}


def default_device():
    """'cuda' when torch sees a GPU, else 'cpu'."""
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'
