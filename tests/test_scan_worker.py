"""What a scan worker of prepare.py imports. With the start methods 'spawn' and 'forkserver' a worker imports the
__main__ script again (prepare.py, with everything it imports) before its first scan; with 'fork' it is a copy of
prepare.py's process. A scan needs NumPy, SciPy, scikit-image and SimpleITK: torch (~0.2 GB and 1 s of CPU per worker,
BENCHMARKS.md) or pandas in a worker is paid for nothing."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_FOR_A_SCAN = ('torch', 'pandas', 'sklearn', 'matplotlib', 'triton', 'tensorboard')

# Run in a fresh interpreter whose __main__ is prepare.py, as `python prepare.py` has it: one job in a pool of
# scans/pool.py, evaluated in the worker, lists the modules it holds that a scan does not need.
WORKER = f'''
import os, sys
sys.modules['__main__'].__file__ = os.path.join({REPO!r}, 'prepare.py')
from scans import pool
job = "sorted(m for m in {NOT_FOR_A_SCAN!r} if m in __import__('sys').modules)"
((_, ok, found),) = pool.run_isolated(eval, [job], 1, 120, sys.argv[1])
print(found if ok else 'failed: ' + found)
'''

# prepare.py's own process (the parent of 'fork' workers): the script, its settings and its run folder's header
PARENT = f'''
import sys
import prepare, runfolder, settings
cfg = settings.resolve({{}}, prepare.DEFAULTS, prepare.RULES)
run = runfolder.Run('prepare', cfg, root=sys.argv[1])
run.quiet = True
run.header(cfg, 'cpu')
print(sorted(m for m in {NOT_FOR_A_SCAN!r} if m in sys.modules))
'''


def python(code, arg):
    out = subprocess.run([sys.executable, '-c', code, arg], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize('start_method', ['spawn', 'forkserver'])
def test_a_scan_worker_imports_neither_torch_nor_pandas(start_method):
    assert python(WORKER, start_method) == '[]'


def test_prepare_and_its_run_folder_import_neither_torch_nor_pandas(tmp_path):
    assert python(PARENT, str(tmp_path)) == '[]'
    (folder,) = os.listdir(tmp_path)
    with open(tmp_path / folder / 'log.txt') as f:
        assert 'torch' not in f.read().splitlines()[1]       # the header names no torch it did not use
