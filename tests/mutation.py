"""Mutation testing of one module against only its test files (mutmut 3), on a copy of the repository.

python -m tests.mutation evolution/samea.py [--jobs=1] [--fresh | --survivors]
python -m tests.mutation --list

The working tree is never touched: the repository's files (git ls-files: tracked and untracked, not ignored) are
copied to WORK/<module> (kept between runs, so an unchanged function's mutants are not run again; --fresh starts
over; --survivors runs again only the mutants that were not killed, e.g. after new tests), mutmut writes its
mutants there, and each mutant runs only the tests of TESTS[module] that call the mutated
function, with -x and a per-mutant CPU-time limit. Prints the counts and writes every survivor's diff to
WORK/<module>/survivors.txt (mutmut's own output: WORK/<module>/mutmut.log). Not part of the default pytest run
(this file holds no tests). TESTING.md: how to read the results, and the table.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(tempfile.gettempdir(), 'nas-hbo-mutation')  # one copy of the repository per module
# the test files each module's mutants run against: the ones that check its decisions (mutmut then runs, per mutant,
# only those of their tests that call the mutated function)
EVOLVE = ['tests/test_decisions.py', 'tests/test_evolve.py']
TESTS = {
    'evolution/samea.py': EVOLVE,
    'evolution/genes.py': EVOLVE,
    'evolution/candidate.py': EVOLVE,
    'evolution/records.py': EVOLVE,
    'architect.py': ['tests/test_search.py', 'tests/test_hypergrad.py'],
    'zo.py': ['tests/test_decisions.py', 'tests/test_zo.py'],
    'sparsemax.py': ['tests/test_sparsemax.py'],
    'genotypes.py': ['tests/test_genotypes.py'],
    'settings.py': ['tests/test_decisions.py', 'tests/test_settings.py'],
    'scans/labels.py': ['tests/test_decisions.py', 'tests/test_label_table.py'],
    'model_search.py': ['tests/test_search.py'],
    'data.py': ['tests/test_data.py'],
    'engine.py': ['tests/test_retrain.py'],
    'nodclsgbt.py': ['tests/test_decisions.py', 'tests/test_nodclsgbt.py'],
    'scans/luna.py': ['tests/test_prepare.py'],
}
# end-to-end runs left out of a module's mutation runs (pytest -k): minutes per mutant on 2 cores, and what they
# check of these modules' decisions the worked examples check directly
SLOW = {m: 'not (tiny_search or resume_after or constant_predictors or older_search or training_seed or '
           'share_predicted or parallel_equals or kept_genotype or drop_path_tensor)'
        for m in TESTS if m.startswith('evolution/')}
TIMEOUT_MULTIPLIER = 10.0  # a mutant may take this many times its tests' unmutated time (+ 1 s) before it is a timeout
# mutmut's exit codes of a mutant's test run -> our words
STATUS = {1: 'killed', 3: 'killed', 0: 'survived', 5: 'no tests', 33: 'no tests', 34: 'skipped', 35: 'suspicious',
          36: 'timeout', -24: 'timeout', 24: 'timeout', 152: 'timeout', 255: 'timeout', -11: 'segfault', -9: 'killed'}


def copy_repository(dest):
    """Mirror the repository's files into dest: changed files copied, vanished ones removed (mutants/ kept)."""
    names = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split('\n')
    names = {n for n in names if n and os.path.isfile(os.path.join(ROOT, n))}
    for name in names:
        src, dst = os.path.join(ROOT, name), os.path.join(dest, name)
        if not (os.path.exists(dst) and open(src, 'rb').read() == open(dst, 'rb').read()):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    for folder, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if not (folder == dest and d == 'mutants') and d != '__pycache__']
        for f in files:
            rel = os.path.relpath(os.path.join(folder, f), dest)
            if rel not in names and rel != 'setup.cfg':
                os.remove(os.path.join(folder, f))


def write_config(dest, module, tests):
    only = ['    -k', f'    {SLOW[module]}'] if module in SLOW else []
    lines = ['[mutmut]', 'source_paths = .', f'only_mutate = {module}', 'do_not_mutate =', '    tests/*',
             'also_copy =', '    pytest.ini', 'pytest_add_cli_args_test_selection =', *[f'    {t}' for t in tests],
             'pytest_add_cli_args =', '    -p', '    no:cacheprovider', *only,
             f'timeout_multiplier = {TIMEOUT_MULTIPLIER}',
             'process_isolation = forkserver', 'use_git_change_detection = false', '']
    with open(os.path.join(dest, 'setup.cfg'), 'w') as f:
        f.write('\n'.join(lines))


def results(dest, module):
    """{mutant name: status} from mutmut's record of the module."""
    with open(os.path.join(dest, 'mutants', module + '.meta')) as f:
        codes = json.load(f)['exit_code_by_key']
    return {name: 'not run' if code is None else STATUS.get(code, f'exit code {code}') for name, code in codes.items()}


def main(argv):
    if '--list' in argv or not argv:
        print('\n'.join(f'{m}: {" ".join(t)}' for m, t in TESTS.items()))
        return 0
    module = argv[0]
    if module not in TESTS:
        sys.exit(f'{module}: no test files mapped; add it to TESTS in tests/mutation.py (known: {", ".join(TESTS)})')
    jobs = next((int(a.split('=', 1)[1]) for a in argv if a.startswith('--jobs=')), 1)
    dest = os.path.join(WORK, module.replace('/', '_').removesuffix('.py'))
    if '--fresh' in argv:
        shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest, exist_ok=True)
    copy_repository(dest)
    write_config(dest, module, TESTS[module])
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    again = []
    if '--survivors' in argv:  # mutmut keeps a result until its function changes: name the ones to run again
        again = sorted(n for n, s in results(dest, module).items() if s not in ('killed', 'timeout', 'not run'))
        if not again:
            print(f'{module}: no survivors to run again')
    with open(os.path.join(dest, 'mutmut.log'), 'w') as log:  # its progress display, kept out of the terminal
        subprocess.run([sys.executable, '-m', 'mutmut', 'run', f'--max-children={jobs}', *again], cwd=dest,
                       env=env, stdout=log, stderr=subprocess.STDOUT)
    status = results(dest, module)
    counts = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    survivors = sorted(n for n, s in status.items() if s != 'killed')
    with open(os.path.join(dest, 'survivors.txt'), 'w') as f:
        for name in survivors:
            shown = subprocess.run([sys.executable, '-m', 'mutmut', 'show', name], cwd=dest, capture_output=True,
                                   text=True, env=env).stdout
            f.write(f'# {status[name]}: {name}\n{shown}\n')
    print(f'{module}: {len(status)} mutants, ' + ', '.join(f'{n} {s}' for s, n in sorted(counts.items())))
    print(f'survivors (diffs): {os.path.join(dest, "survivors.txt")}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
