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
one line (a UserError, printed by utils.run_cli without a traceback) naming the setting, its value and the rule.
"""
import ast
import operator
import os

import torch

import utils
from utils import UserError


def resolve(overrides, defaults, rules):
    """The settings of a script's run, every one checked before the script writes anything: the defaults updated
    with main(**overrides) (names and types checked), or, with RESUME, the continued run's config.json (see
    utils.resumed_settings: config.json checked to be complete and of this script); then each value against its rule
    (check_rules). See the module docstring for how a script adopts it."""
    cfg = utils.check_settings(overrides, defaults)
    if cfg.get('RESUME'):
        cfg = utils.resumed_settings(cfg['RESUME'], overrides, defaults)
    check_rules(cfg, rules)
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
    if not torch.cuda.is_available():
        raise UserError(f'DEVICE={name!r}: CUDA is not available on this machine (torch.cuda.is_available() is '
                        'False); use --DEVICE=cpu')
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f'DEVICE={name!r}: this machine has {torch.cuda.device_count()} GPU(s)')
    return True


# Functions a rule may call (besides its settings, constants, arithmetic, comparisons, and/or/not, x[i]).
RULE_FUNCTIONS = {'len': len, 'min': min, 'max': max, 'ints': _ints, 'folds': _folds, 'isfile': os.path.isfile,
                  'isdir': os.path.isdir, 'device': usable_device}
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


def _rule_value(node, cfg):
    """Evaluate a rule's parsed expression over the settings `cfg`; nothing else is reachable (no eval)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return cfg[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(_rule_value(e, cfg) for e in node.elts)
    if isinstance(node, ast.BoolOp):  # short-circuits like Python: 'len(X) >= 1 and X[0] >= 0'
        for value in node.values:
            result = _rule_value(value, cfg)
            if bool(result) == isinstance(node.op, ast.Or):
                return result
        return result
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        value = _rule_value(node.operand, cfg)
        return not value if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_rule_value(node.left, cfg), _rule_value(node.right, cfg))
    if isinstance(node, ast.Compare):
        left = _rule_value(node.left, cfg)
        for op, right_node in zip(node.ops, node.comparators):
            right = _rule_value(right_node, cfg)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Subscript):
        return _rule_value(node.value, cfg)[_rule_value(node.slice, cfg)]
    if isinstance(node, ast.Call):  # checked by _check_rule: one of RULE_FUNCTIONS
        return RULE_FUNCTIONS[node.func.id](*(_rule_value(a, cfg) for a in node.args))
    raise AssertionError(f'{ast.unparse(node)!r} passed _check_rule')


def check_rules(cfg, rules):
    """Check each setting against its rule: `rules` maps a setting's name to a Python expression over the settings
    (e.g. '0 < VAL_FRACTION < 1', 'C % PC_K == 0', "NODULE_TABLE == '' or isfile(NODULE_TABLE)"; one that starts
    with a comparison compares the setting itself: '>= 1' for 'EPOCHS' is 'EPOCHS >= 1') or to None (any value of
    its type). The first broken rule is a UserError naming the setting, its value, the rule and the other
    settings the rule reads. A rule naming an unknown setting is a bug of the script (ValueError)."""
    for name, rule in rules.items():
        if name not in cfg:
            raise ValueError(f'rule for unknown setting {name}')
        if rule is None:
            continue
        if rule.lstrip()[0] in '<>=!' or rule.lstrip().startswith(('in ', 'not in ')):  # '>= 1', "in ('a', 'b')"
            rule = f'{name} {rule.strip()}'
        tree = ast.parse(rule, mode='eval')
        _check_rule(tree, rule)
        names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in RULE_FUNCTIONS]
        bad = [n for n in names if n not in cfg]
        if bad:
            raise ValueError(f'rule of {name} reads unknown setting(s) {", ".join(bad)}')
        try:
            ok = _rule_value(tree.body, cfg)
        except (TypeError, ValueError, ZeroDivisionError, IndexError, KeyError):
            ok = False  # e.g. a comparison with a value of another type (settings whose default is None)
        if not ok:
            others = ', '.join(f'{n}={cfg[n]!r}' for n in dict.fromkeys(names) if n != name)
            raise UserError(f'{name}={cfg[name]!r} is not allowed: it must satisfy {rule}'
                            + (f' ({others})' if others else ''))
