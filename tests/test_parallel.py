"""parallel.map_jobs on Ray, and train_3D_continuation with PARALLEL='ray': results in job order, equal to the
sequential run; a worker that dies or runs out of memory is named and its job run again; a job that keeps failing
is named at the end while the others finish, and RESUME runs only what is missing; Ray missing is one clear line.

One local Ray session (2 CPUs) serves the module. The job functions below reach the workers by value (they are
registered with Ray's cloudpickle), as the test module is not importable there."""
import csv
import json
import os
import signal
import sys
import time
import types

import pytest
import ray
import torch
from conftest import write_cube_set
from ray import cloudpickle

import engine
import parallel
import train_3D_continuation as retrain
from utils import UserError

TINY = dict(C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, DEVICE='cpu', SEED=0, FOLD='all', TEST_FOLDS=(8, 9), EPOCHS=2)
STEPS = 5  # training steps per epoch: 18 training nodules in batches of 4


@pytest.fixture(scope='module')
def ray_session():
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    parallel.init_ray(num_cpus=2)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=1)


@pytest.fixture(scope='module')
def sequential(cubes, tmp_path_factory):
    """The two folds one after the other, in this process."""
    return retrain.main(DATA=cubes, RUNS=str(tmp_path_factory.mktemp('seq')), **TINY)


def read(path):
    with open(path) as f:
        return f.read()


def metrics(path, fold):
    with open(os.path.join(path, f'metrics_fold{fold}.csv'), newline='') as f:
        return [{k: v for k, v in row.items() if k != 'seconds'} for row in csv.DictReader(f)]


def assert_same_folds(path, reference):
    """Same results, per-epoch metrics and final weights as the reference run, fold by fold."""
    for fold in TINY['TEST_FOLDS']:
        with open(os.path.join(path, f'result_fold{fold}.json')) as f, \
                open(os.path.join(reference, f'result_fold{fold}.json')) as g:
            assert json.load(f) == json.load(g)
        assert metrics(path, fold) == metrics(reference, fold)
        a, b = (torch.load(os.path.join(p, f'model_fold{fold}.pt'), weights_only=True) for p in (path, reference))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), fold


# ---------------------------------------------------------------- job functions (they run in Ray workers)

def job(kind, marker, x):
    """'slow': x*x after a second; 'die_once' / 'oom_once': the worker is killed / raises out of memory on the
    first try; 'die': killed on every try; 'user': a UserError (counted in marker)."""
    first = not os.path.exists(marker)
    with open(marker, 'a') as f:
        f.write('try\n')
    if kind == 'slow':
        time.sleep(1.0)
    elif kind == 'die' or (kind == 'die_once' and first):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == 'oom_once' and first:
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    elif kind == 'user':
        raise UserError(f'cube set {marker} is missing')
    return x * x, torch.get_num_threads(), parallel.job_device('cuda')


def dying_fold_job(fold_to_kill, marker, always):
    """train_3D_continuation.fold_job whose worker is killed in fold `fold_to_kill`: right after its first
    checkpoint on the first try (always=False), or at its start on every try (always=True)."""
    def fold_job(cfg, genotype, table, fold, run):
        if fold == fold_to_kill and always:
            os.kill(os.getpid(), signal.SIGKILL)
        if fold == fold_to_kill and not os.path.exists(marker):
            open(marker, 'w').close()
            save = engine.save_state

            def save_then_die(*args, **kwargs):
                save(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            engine.save_state = save_then_die  # in this worker only, which dies with it
        return retrain.fold_job(cfg, genotype, table, fold, run)
    return fold_job


# ---------------------------------------------------------------- without Ray (before the Ray session starts)

def test_map_jobs_off_is_a_plain_loop():
    assert parallel.map_jobs(pow, [(2, 3), (3, 2)]) == [8, 9]
    with pytest.raises(ZeroDivisionError):
        parallel.map_jobs(divmod, [(1, 0)], 'off')
    with pytest.raises(UserError, match="PARALLEL must be one of off, ray, got 'dask'"):
        parallel.map_jobs(pow, [(2, 3)], 'dask')


def test_a_job_function_of_the_script_being_run_is_sent_by_its_module(monkeypatch):
    main = types.ModuleType('__main__')
    main.__file__ = os.path.join('somewhere', 'train_3D_continuation.py')
    monkeypatch.setitem(sys.modules, '__main__', main)
    as_script = types.FunctionType(retrain.fold_job.__code__, {}, 'fold_job')
    as_script.__module__ = '__main__'
    assert parallel._importable(as_script) is retrain.fold_job
    assert parallel._importable(retrain.fold_job) is retrain.fold_job


def test_ray_missing_is_one_clear_line(cubes, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'ray', None)  # import ray raises ImportError
    with pytest.raises(UserError, match=r"^PARALLEL='ray' needs Ray, which is not installed here: pip install ray$"):
        retrain.main(DATA=cubes, RUNS=str(tmp_path), PARALLEL='ray', **TINY)
    with pytest.raises(UserError, match=r"PARALLEL='threads' is not allowed: it must satisfy PARALLEL in \("):
        retrain.main(DATA=cubes, RUNS=str(tmp_path), PARALLEL='threads', **TINY)
    with pytest.raises(UserError, match="PARALLEL must be one of off, ray, got 'threads'"):
        parallel.check_mode('threads')
    assert os.listdir(tmp_path) == []


def test_an_unreachable_cluster_is_one_clear_line(monkeypatch):
    def init(*args, **kwargs):
        raise ConnectionError('Failed to connect to Ray cluster at 10.9.9.9:6379')
    monkeypatch.setattr(ray, 'init', init)
    monkeypatch.setenv('RAY_ADDRESS', '10.9.9.9:6379')
    with pytest.raises(UserError, match=r'^cannot use the Ray cluster at RAY_ADDRESS=10\.9\.9\.9:6379: '
                                        r'Failed to connect to Ray cluster at 10\.9\.9\.9:6379$'):
        parallel.map_jobs(pow, [(2, 3)], 'ray')


# ---------------------------------------------------------------- map_jobs on Ray

def test_map_jobs_order_retries_and_failures(ray_session, tmp_path):
    kinds = ['slow', 'die_once', 'oom_once', 'user', 'die', 'plain']
    jobs = [(kind, str(tmp_path / kind), i) for i, kind in enumerate(kinds)]
    lines = []
    with pytest.raises(parallel.JobsFailed) as info:
        parallel.map_jobs(job, jobs, 'ray', names=kinds, log=lines.append)
    failed, results = info.value.failed, info.value.results
    assert failed == {'user': f'cube set {tmp_path / "user"} is missing',
                      'die': 'its worker died (killed, out of host memory or crashed)'}
    assert str(info.value).startswith('2 of 6 jobs failed (user: cube set ')
    # in job order; 6 jobs on 2 CPUs: one CPU (one torch thread) each; no GPU: cpu
    assert results == [(0, 1, 'cpu'), (1, 1, 'cpu'), (4, 1, 'cpu'), None, None, (25, 1, 'cpu')]
    tries = {kind: read(tmp_path / kind).count('try') for kind in kinds}
    assert tries == {'slow': 1, 'die_once': 2, 'oom_once': 2, 'user': 1, 'die': 2, 'plain': 1}
    assert 'die_once: its worker died (killed, out of host memory or crashed); running it again (try 2 of 2)' in lines
    assert 'oom_once: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); running it again (try 2 of 2)' \
        in lines
    assert 'die: its worker died (killed, out of host memory or crashed) (after 2 tries)' in lines
    assert lines[0] == '6 jobs as Ray tasks (2 CPUs, 0 GPUs in the cluster), each with 0 GPU(s) and 1 CPU(s)'
    # no retries asked: the first death is final
    with pytest.raises(parallel.JobsFailed, match=r'1 of 1 jobs failed \(job 0: its worker died'):
        parallel.map_jobs(job, [('die_once', str(tmp_path / 'again'), 0)], 'ray', log=lines.append, retries=0)


# ---------------------------------------------------------------- the retrain's test folds on Ray

def test_parallel_folds_equal_the_sequential_run(ray_session, cubes, tmp_path, sequential):
    out = retrain.main(DATA=cubes, RUNS=str(tmp_path), PARALLEL='ray', **TINY)
    assert out['folds'] == sequential['folds']
    assert_same_folds(out['run'], sequential['run'])
    log = read(os.path.join(out['run'], 'log.txt'))
    assert '2 jobs as Ray tasks (2 CPUs, 0 GPUs in the cluster), each with 0 GPU(s) and 1 CPU(s)' in log
    for fold in (8, 9):  # both workers wrote their lines into the run's log
        assert f'fold {fold} epoch   1 lr' in log and f'fold {fold}: train folds' in log
    assert 'final epoch on each test fold (our protocol):' in log


def test_a_killed_fold_is_named_and_continues_from_its_checkpoint(ray_session, cubes, tmp_path, monkeypatch,
                                                                  sequential):
    monkeypatch.setattr(retrain, 'fold_job', dying_fold_job(9, str(tmp_path / 'killed'), always=False))
    out = retrain.main(DATA=cubes, RUNS=str(tmp_path / 'runs'), PARALLEL='ray', **TINY)
    assert out['folds'] == sequential['folds']
    assert_same_folds(out['run'], sequential['run'])
    log = read(os.path.join(out['run'], 'log.txt'))
    assert 'fold 9: its worker died (killed, out of host memory or crashed); running it again (try 2 of 2)' in log
    assert 'fold 9: continuing after epoch 0' in log


def test_a_fold_that_always_dies_is_named_and_resume_runs_only_it(ray_session, cubes, tmp_path, monkeypatch,
                                                                  sequential):
    monkeypatch.setattr(retrain, 'fold_job', dying_fold_job(9, str(tmp_path / 'killed'), always=True))
    runs = tmp_path / 'runs'
    with pytest.raises(UserError, match=r'^1 of 2 jobs failed \(fold 9: its worker died \(killed, out of host memory '
                                        r'or crashed\)\); the finished folds are kept: --RESUME=.+ runs the missing '
                                        r'ones$'):
        retrain.main(DATA=cubes, RUNS=str(runs), PARALLEL='ray', **TINY)
    (path,) = [os.path.join(runs, p) for p in os.listdir(runs)]
    assert os.path.exists(os.path.join(path, 'result_fold8.json'))
    assert not os.path.exists(os.path.join(path, 'last_fold9.pt'))
    assert 'fold 9: its worker died (killed, out of host memory or crashed) (after 2 tries)' in \
        read(os.path.join(path, 'log.txt'))
    monkeypatch.undo()
    # PARALLEL may change on resume (it changes where folds run, not what they compute): here, in this process
    steps = []
    real = engine.train_step
    monkeypatch.setattr(engine, 'train_step', lambda *args: steps.append(1) or real(*args))
    out = retrain.main(RESUME=path, DEVICE='cpu', PARALLEL='off')  # given: a resumed run keeps its own otherwise
    assert len(steps) == TINY['EPOCHS'] * STEPS  # fold 9 only
    assert out['folds'] == sequential['folds']
    assert_same_folds(path, sequential['run'])
    assert 'fold 8: finished earlier, result read from' in read(os.path.join(path, 'log.txt'))
    assert "changed: PARALLEL 'ray' -> 'off'" in read(os.path.join(path, 'log.txt'))


# ---------------------------------------------------------------- the evolutionary search on Ray

def test_an_evolutionary_search_on_ray_equals_the_sequential_one(ray_session, cubes, tmp_path):
    """Initial population, a learning and an exploitation generation trained as Ray tasks: the same candidates,
    objectives, surrogate decisions and front as one after the other (each candidate is seeded from SEED and its
    index only)."""
    import train_evolve
    tiny = dict(DATA=cubes, DEVICE='cpu', CUBE=8, EPOCHS=1, LAST_EPOCHS=1, BATCH_SIZE=4, FILTERS=(4,), CELLS=(2, 3),
                PRIMITIVES=('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3'), POPULATION=3, NEIGHBOURS=2,
                GENERATIONS=3, LEARNING_GENERATIONS=1)  # generation 2: exploitation (surrogate, pool on Ray)
    seq = train_evolve.main(**tiny, RUNS=str(tmp_path / 'seq'))
    par = train_evolve.main(**tiny, RUNS=str(tmp_path / 'par'), PARALLEL='ray')
    for name in ('evaluations.csv', 'pareto.csv'):
        with open(os.path.join(seq['run'], name), newline='') as a, open(os.path.join(par['run'], name)) as b:
            rows = [[{k: v for k, v in r.items() if k not in ('seconds', 'genotype_file')} for r in csv.DictReader(f)]
                    for f in (a, b)]
        assert rows[0] == rows[1] and len(rows[0]) >= (7 if name == 'evaluations.csv' else 1)
        if name == 'evaluations.csv':
            assert rows[0][-1]['phase'] == 'exploitation'
    assert 'candidate 3' in read(os.path.join(par['run'], 'log.txt'))
