"""What a script says on the console before and around its work, without importing anything heavy: --help read
from the script's source (each script calls help_if_asked first thing, so it answers before torch is imported), and
the watcher that makes Ctrl-C act within seconds when a step is stuck in one long C++ call."""
import ast
import os
import signal
import socket
import sys
import threading
import tokenize

INTERRUPT_GRACE_S = 3.0  # after Ctrl-C, a step still running in C++ (e.g. a long backward) is cut after this, s


def help_if_asked(script, module='__main__', argv=None):
    """--help or -h among the arguments of a script run as __main__: print its settings and exit 0. Called first thing
    by each script (help_if_asked(__file__, __name__), before torch is imported: it answers at once) and by run_cli."""
    argv = sys.argv[1:] if argv is None else argv
    if module == '__main__' and ('--help' in argv or '-h' in argv):
        print(script_help(script))
        sys.exit(0)


def script_help(script):
    """The usage of a script, read from its source without running it: its docstring, then each setting (the
    UPPERCASE constants before DEFAULTS) with its default's value (default_text), its comment and its rule from RULES
    in words (rule_words). A comment block after a blank line among the settings heads the settings below it."""
    with open(script) as f:
        source = f.read()
    tree = ast.parse(source, filename=script)
    comments = _comments(source)
    lines_of = source.splitlines()
    body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    rows = []  # (name, default, comment) of a setting, or (None, header, None)
    for node, after in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name == 'DEFAULTS':
            break
        if name.isupper() and not name.startswith('_'):
            last = after.lineno if after is not None else len(lines_of) + 1
            own, header = [], []
            for line in range(node.lineno, last):
                if line in comments:
                    (header if header or not lines_of[line - 2].strip() and line > node.end_lineno else own).append(
                        comments[line])
            rows.append((name, default_text(node.value, script, source), ' '.join(own)))
            if header:
                rows.append((None, ' '.join(header), None))
    rules = {}  # the RULES dict, which follows DEFAULTS
    for node in body:
        if isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] == ['RULES']:
            rules = ast.literal_eval(node.value)
    name = os.path.basename(script)
    lines = [f'{name}: {ast.get_docstring(tree) or ""}'.rstrip(), '',
             'Each setting is overridden by --NAME=value, or by NAME = value lines of a config .py file given first.',
             'settings (--NAME=default  meaning  [allowed values]):']
    width = min(36, max(len(f'--{n}={d}') for n, d, _ in rows if n) + 2) if rows else 0
    for n, default, text in rows:
        if n is None:
            lines += ['', f'  {default}']
            continue
        rule = rule_words(n, rules.get(n))
        lines.append(f'  {f"--{n}={default}":<{width - 2}}  {text}' + (f'  [{rule}]' if rule else ''))
    return '\n'.join(lines)


def default_text(node, script, source):
    """A setting's default as --help shows it: a literal as written (3e-4); the value (repr) of os.path.join of
    literals or of a constant of a project module the script imports (read from that module's source, never run); for
    a call of a project function without arguments, that function's docstring (settings.default_device: what it
    returns); otherwise the source text."""
    try:
        value, text = ast.literal_eval(node), ast.get_source_segment(source, node)
        return text if '\n' not in text else repr(value)  # a literal over several lines: on one
    except ValueError:
        pass
    try:
        return repr(_value(node, script, 0))
    except _NoValue:
        pass
    if isinstance(node, ast.Call) and not node.args and not node.keywords:
        found = _module_node(node.func, script)
        if isinstance(found, ast.FunctionDef) and ast.get_docstring(found):
            return '<' + ast.get_docstring(found).split('\n\n')[0].replace('\n', ' ').rstrip('.') + '>'
    return ast.unparse(node)


class _NoValue(Exception):
    """A default that default_text cannot evaluate from the sources."""


def _value(node, script, depth):
    """The value of a default's expression: literals, tuples, os.path.join(...) and module.CONSTANT (_module_node)."""
    if depth > 5:
        raise _NoValue
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Tuple):
        return tuple(_value(e, script, depth + 1) for e in node.elts)
    if (isinstance(node, ast.Call) and ast.unparse(node.func) == 'os.path.join' and not node.keywords):
        return os.path.join(*(_value(a, script, depth + 1) for a in node.args))
    found = _module_node(node, script)
    if isinstance(found, tuple):  # (assigned expression, its module's file)
        return _value(found[0], found[1], depth + 1)
    raise _NoValue


def _module_node(node, script):
    """For `module.NAME` where the script imports `module` from this repository (import data; from scans import
    lungmask): (the expression assigned to NAME, the module's file), or the FunctionDef of NAME; else None."""
    if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
        return None
    with open(script) as f:
        tree = ast.parse(f.read())
    root = os.path.dirname(os.path.abspath(script))
    path = None
    for imp in tree.body:
        if isinstance(imp, ast.Import):
            path = next((a.name.replace('.', os.sep) for a in imp.names
                         if (a.asname or a.name) == node.value.id), path)
        elif isinstance(imp, ast.ImportFrom) and imp.module and not imp.level:
            path = next((os.path.join(imp.module.replace('.', os.sep), a.name) for a in imp.names
                         if (a.asname or a.name) == node.value.id), path)
    if path is None or not os.path.isfile(os.path.join(root, path + '.py')):
        return None
    module = os.path.join(root, path + '.py')
    with open(module) as f:
        for stmt in ast.parse(f.read()).body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name == node.attr:
                return stmt
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and getattr(stmt.targets[0], 'id', None) == node.attr):
                return stmt.value, module
    return None


def full_rule(name, rule):
    """A setting's rule as an expression: one that starts with a comparison compares the setting itself ('>= 1' of
    EPOCHS is 'EPOCHS >= 1', "in ('a', 'b')" is "NAME in ('a', 'b')"); None stays None (settings.check_rules)."""
    if rule is not None and (rule.lstrip()[0] in '<>=!' or rule.lstrip().startswith(('in ', 'not in '))):
        return f'{name} {rule.strip()}'
    return rule


# What the functions a rule may call (settings.RULE_FUNCTIONS) allow, in words.
RULE_FUNCTION_WORDS = {'folds': 'fold numbers (one or more, each >= 0)', 'ints': 'whole numbers',
                       'isfile': 'an existing file', 'isdir': 'an existing folder',
                       'device': "'cpu', 'cuda' or 'cuda:<index>' of a GPU this machine has",
                       'tensorboard': 'True only where the tensorboard package is installed'}
_OPS = {ast.Lt: '<', ast.LtE: '<=', ast.Gt: '>', ast.GtE: '>=', ast.Eq: '==', ast.NotEq: '!=', ast.In: 'in',
        ast.NotIn: 'not in'}


def rule_words(name, rule):
    """A setting's rule as --help shows it: what it allows, in words where the rule calls a function or compares the
    setting itself ('folds(SEARCH_FOLDS)': 'fold numbers (one or more, each >= 0)', 'EPOCHS >= 1': '>= 1',
    "METRIC in ('acc', 'auc')": "'acc' or 'auc'", 'CUBE % 4 == 0': 'a multiple of 4'); None stays None."""
    rule = full_rule(name, rule)
    return None if rule is None else _words(ast.parse(rule, mode='eval').body, name)


def _words(node, name):
    if isinstance(node, ast.BoolOp):
        values = node.values
        first = values[0]
        if (isinstance(node.op, ast.Or) and isinstance(first, ast.UnaryOp) and isinstance(first.op, ast.Not)
                and isinstance(first.operand, ast.Name) and first.operand.id == name):
            # 'not CUDA_GRAPHS or DEVICE != 'cpu'': True only where the rest holds
            return 'True only with ' + ' or '.join(_words(v, name) for v in values[1:])
        if isinstance(node.op, ast.And):
            return ', '.join(_words(v, name) for v in values)
        # a term that does not read the setting frees it: "SCAN == '' or DATA == ''" is "'' or any value when ..."
        return ' or '.join(_words(v, name) if _reads(v, name) else f'any value when {_words(v, name)}'
                           for v in values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
        arg, fn = node.args[0], node.func.id
        if fn in RULE_FUNCTION_WORDS:
            words = RULE_FUNCTION_WORDS[fn]
            return words if _is(arg, name) else f'{ast.unparse(arg)}: {words}'
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, op, right = node.left, type(node.ops[0]), node.comparators[0]
        of = '' if _is(_inner(left), name) else f' of {ast.unparse(_inner(left))}'
        if isinstance(left, ast.Call) and getattr(left.func, 'id', '') == 'len' and isinstance(right, ast.Constant):
            many = 'one' if right.value == 1 else str(right.value)
            return {ast.Eq: f'{many} value{"s" if right.value != 1 else ""}',
                    ast.GtE: f'{many} or more values'}.get(op, ast.unparse(node)) + of
        if isinstance(left, ast.Call) and getattr(left.func, 'id', '') == 'min' and op in _OPS:
            return f'each {_OPS[op]} {ast.unparse(right)}' + of
        if (isinstance(left, ast.BinOp) and isinstance(left.op, ast.Mod) and _is(left.left, name) and op is ast.Eq
                and isinstance(right, ast.Constant) and right.value == 0):
            return f'a multiple of {ast.unparse(left.right)}'
        if _is(left, name):
            if op in (ast.In, ast.NotIn) and isinstance(right, ast.Tuple):
                items = [ast.unparse(e) for e in right.elts]
                listed = ' or '.join([', '.join(items[:-1]), items[-1]] if len(items) > 2 else items)
                return listed if op is ast.In else f'not {listed}'
            if op is ast.NotEq and isinstance(right, ast.Constant) and right.value == '':
                return 'not empty'
            if op is ast.Eq:
                return ast.unparse(right)
            return f'{_OPS[op]} {ast.unparse(right)}'
    return ast.unparse(node)


def _reads(node, name):
    return any(_is(n, name) for n in ast.walk(node))


def _is(node, name):
    return isinstance(node, ast.Name) and node.id == name


def _inner(node):
    """The setting a len()/min() call reads."""
    return node.args[0] if isinstance(node, ast.Call) and len(node.args) == 1 else node


def _comments(source):
    """{line number: comment text} of a source's comments (tokenize: a '#' inside a string is no comment)."""
    out = {}
    for tok in tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip('#').strip()
    return out


class InterruptWatch:
    """Ctrl-C acts between Python bytecodes only: a step that spends many seconds in one C++ call (a supernet's
    backward on a CPU took 27 s here, 65 s on a slower machine) would hold the interrupt that long. Python's C-level
    handler writes each signal to a wake-up socket at once; a thread reading it gives the main thread
    INTERRUPT_GRACE_S to raise KeyboardInterrupt, then prints the same message and exits (130). Files are written
    atomically, so this loses what a kill loses: the epoch in progress."""

    def __init__(self, message, grace_s=None):
        self.handled = threading.Event()
        self.message, self.grace_s = message, grace_s
        self.old_fd = None
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread can set the wake-up fd (and receives signals)
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.old_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.old_handler = signal.signal(signal.SIGINT, self._interrupt)
        threading.Thread(target=self._watch, daemon=True, name='interrupt-watch').start()

    def _interrupt(self, signum, frame):
        """Python's own SIGINT handler, with a note that Python got control: the script's clean-up (a Ray shutdown,
        the message) may then take longer than the grace without being cut short."""
        self.handled.set()
        raise KeyboardInterrupt

    def _watch(self):
        try:
            while True:
                got = self.reader.recv(64)
                if not got:  # closed: the script ended
                    return
                if signal.SIGINT in got:
                    break
        except OSError:
            return
        grace = INTERRUPT_GRACE_S if self.grace_s is None else self.grace_s
        if self.handled.wait(grace):
            return
        try:
            print(f'(the step was still running {grace:.0f} s after Ctrl-C: stopped it)\n{self.message()}',
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(130)

    def close(self):
        if self.old_fd is None:
            return
        signal.set_wakeup_fd(self.old_fd)
        signal.signal(signal.SIGINT, self.old_handler)
        self.old_fd = None
        self.reader.shutdown(socket.SHUT_RDWR)
        self.reader.close()
        self.writer.close()
