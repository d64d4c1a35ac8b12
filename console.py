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
    UPPERCASE constants before DEFAULTS) with its default as written, its comment and its rule from RULES."""
    with open(script) as f:
        source = f.read()
    tree = ast.parse(source, filename=script)
    comments = _comments(source)
    body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    rows = []
    for node, after in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name == 'DEFAULTS':
            break
        if name.isupper() and not name.startswith('_'):
            last = after.lineno if after is not None else len(source.splitlines()) + 1
            text = ' '.join(c for line, c in comments.items() if node.lineno <= line < last)
            rows.append((name, ast.get_source_segment(source, node.value), text))
    rules = {}  # the RULES dict, which follows DEFAULTS
    for node in body:
        if isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] == ['RULES']:
            rules = ast.literal_eval(node.value)
    name = os.path.basename(script)
    lines = [f'{name}: {ast.get_docstring(tree) or ""}'.rstrip(), '',
             'Each setting is overridden by --NAME=value, or by NAME = value lines of a config .py file given first.',
             'settings (--NAME=default  meaning  [allowed values]):']
    width = min(36, max(len(f'--{n}={d}') for n, d, _ in rows) + 2) if rows else 0
    for n, default, text in rows:
        rule = full_rule(n, rules.get(n))
        lines.append(f'  {f"--{n}={default}":<{width - 2}}  {text}' + (f'  [{rule}]' if rule else ''))
    return '\n'.join(lines)


def full_rule(name, rule):
    """A setting's rule as an expression: one that starts with a comparison compares the setting itself ('>= 1' of
    EPOCHS is 'EPOCHS >= 1', "in ('a', 'b')" is "NAME in ('a', 'b')"); None stays None (settings.check_rules)."""
    if rule is not None and (rule.lstrip()[0] in '<>=!' or rule.lstrip().startswith(('in ', 'not in '))):
        return f'{name} {rule.strip()}'
    return rule


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
