"""Independent jobs (test folds of the retrain, candidates of the evolutionary search): one after the other, or
spread over Ray workers (PARALLEL='ray').

A job is fn(*args) with a module-level fn and picklable args; it writes its own files, so a job that is lost can
be run again. Results come back in the order of the jobs.

With Ray, each job is one Ray task: one GPU per job where the Ray cluster has GPUs, else a share of its CPUs. The
workers run this repository's code as Ray's working_dir (a copy of the repo without runs/ and data/, also on other
nodes of a cluster), so paths a job reads or writes must be absolute, and on a cluster on a filesystem every node
sees. The Ray cluster is the one RAY_ADDRESS names, else a local one started here (all GPUs, all CPUs).
"""
import importlib
import os
import sys

from utils import REPO, UserError

MODES = ('off', 'ray')  # 'off': in this process, one after the other
RETRIES = 1  # a job whose worker died or ran out of memory runs again this many times
# not shipped to the workers: run folders, cube sets, caches
EXCLUDES = ['runs/', 'data/', '.git', '__pycache__/', '.pytest_cache/', '.ruff_cache/', '.whl/', '*.pt']
TASK_DEVICE = None  # inside a Ray task: 'cuda' when Ray gave it a GPU, else 'cpu' (see job_device)


class JobsFailed(UserError):
    """Some jobs failed for good; .failed maps a job's name to why, .results holds the others' results (None for a
    failed job), in job order."""

    def __init__(self, failed, results):
        self.failed, self.results = failed, results
        why = '; '.join(f'{name}: {reason}' for name, reason in failed.items())
        super().__init__(f'{len(failed)} of {len(results)} jobs failed ({why})')


def map_jobs(fn, jobs, mode='off', names=None, log=print, retries=RETRIES, gpus=None):
    """[fn(*args) for args in jobs], in this process ('off') or as Ray tasks at once ('ray'); results in job order.

    names: one per job for logs and errors (default 'job 0', 'job 1', ...); log: a function of one line.
    'off': an exception of a job propagates at once (as a plain loop would).
    'ray': a job whose worker dies (killed, out of host memory, its node lost) or that raises an out-of-memory
    error runs again up to `retries` times (it continues from what it saved); any other exception of a job
    is final. The other jobs go on; when all are done, failures raise JobsFailed naming each failed job.
    gpus: GPUs per job (default: 1 where the Ray cluster has GPUs, else 0 and the CPUs split between the jobs).
    """
    check_mode(mode)
    names = list(names) if names is not None else [f'job {i}' for i in range(len(jobs))]
    if mode == 'off':
        return [fn(*args) for args in jobs]
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        init_ray()
    try:
        return _map_ray(ray, _importable(fn), jobs, names, log, retries, gpus)
    finally:
        if started:
            ray.shutdown()


def check_mode(mode):
    """A clear error for an unknown mode, or for 'ray' where Ray is not installed (before a run starts)."""
    if mode not in MODES:
        raise UserError(f'PARALLEL must be one of {", ".join(MODES)}, got {mode!r}')
    if mode == 'ray':
        import_ray()


def import_ray():
    # every fold's or candidate's own lines on the console: Ray would fold lines alike but for their numbers
    os.environ.setdefault('RAY_DEDUP_LOGS', '0')
    try:
        import ray
    except ImportError:
        raise UserError("PARALLEL='ray' needs Ray, which is not installed here: pip install ray") from None
    return ray


def init_ray(**kwargs):
    """Connect to the Ray cluster RAY_ADDRESS names, or start a local one (kwargs go to ray.init then, e.g.
    num_cpus); the workers import this repository's code."""
    ray = import_ray()
    env = {'working_dir': REPO, 'excludes': EXCLUDES}
    address = os.environ.get('RAY_ADDRESS')
    if address:
        try:
            ray.init(runtime_env=env, logging_level='WARNING')
        except (ConnectionError, RuntimeError) as e:
            why = str(e.__cause__ or e).strip().partition('\n')[0][:300]
            raise UserError(f'cannot use the Ray cluster at RAY_ADDRESS={address}: {why}') from None
    else:  # 'local': a new Ray on this machine, even where one was started with `ray start`
        ray.init('local', runtime_env=env, logging_level='WARNING', include_dashboard=False, **kwargs)


def job_device(device):
    """The device of a job: in a Ray task, 'cuda' when Ray gave it a GPU, else 'cpu'; elsewhere `device`."""
    return TASK_DEVICE or device


def _run_task(fn, args):
    """A job inside a Ray task: torch threads and device from what Ray gave the task, then fn(*args)."""
    import ray
    import torch
    global TASK_DEVICE
    TASK_DEVICE = 'cuda' if ray.get_gpu_ids() else 'cpu'
    cpus = ray.get_runtime_context().get_assigned_resources().get('CPU', 1)
    torch.set_num_threads(max(1, int(cpus)))
    return fn(*args)


def _importable(fn):
    """A job function defined in the script being run (__main__) is sent as the same function of the script
    imported as a module (the scripts do nothing at import), so workers import it instead of unpickling a copy."""
    if fn.__module__ != '__main__':
        return fn
    script = os.path.splitext(os.path.basename(sys.modules['__main__'].__file__))[0]
    return getattr(importlib.import_module(script), fn.__name__)


def _resources(ray, n_jobs, gpus):
    total = ray.cluster_resources()
    if gpus is None:
        gpus = 1 if total.get('GPU', 0) > 0 else 0
    if gpus:
        return {'num_gpus': gpus, 'num_cpus': 1}
    cpus = int(total.get('CPU', 1))
    return {'num_gpus': 0, 'num_cpus': max(1, cpus // max(1, min(n_jobs, cpus)))}


def _map_ray(ray, fn, jobs, names, log, retries, gpus):
    res = _resources(ray, len(jobs), gpus)
    total = ray.cluster_resources()
    log(f'{len(jobs)} jobs as Ray tasks ({int(total.get("CPU", 0))} CPUs, {int(total.get("GPU", 0))} GPUs in the '
        f'cluster), each with {res["num_gpus"]} GPU(s) and {res["num_cpus"]} CPU(s)')
    task = ray.remote(_run_task)

    def submit(i):
        return task.options(name=names[i], max_retries=0, **res).remote(fn, jobs[i])
    pending = {submit(i): i for i in range(len(jobs))}
    try:
        return _collect(ray, pending, submit, names, log, retries)
    except BaseException:  # interrupted (Ctrl-C): the running jobs stop too; what they saved stays
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _collect(ray, pending, submit, names, log, retries):
    """Wait for the jobs (pending: object ref -> job index), running again those that may succeed."""
    tries = [1] * len(names)
    results, failed = [None] * len(names), {}
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        try:
            results[i] = ray.get(ref)
            continue
        except Exception as e:  # noqa: BLE001 - every failure of a job is reported by its name
            reason, retry = _why(ray, e)
        if retry and tries[i] <= retries:
            tries[i] += 1
            log(f'{names[i]}: {reason}; running it again (try {tries[i]} of {retries + 1})')
            pending[submit(i)] = i
        else:
            log(f'{names[i]}: {reason}' + (f' (after {tries[i]} tries)' if tries[i] > 1 else ''))
            failed[names[i]] = reason
    if failed:
        raise JobsFailed(failed, results)
    return results


def _why(ray, error):
    """(one line saying why a job failed, whether running it again may help)."""
    exc = ray.exceptions
    if isinstance(error, exc.OutOfMemoryError):
        return "Ray stopped its worker for lack of host memory", True
    if isinstance(error, (exc.WorkerCrashedError, exc.NodeDiedError, exc.LocalRayletDiedError)):
        return 'its worker died (killed, out of host memory or crashed)', True
    cause = getattr(error, 'cause', None) if isinstance(error, exc.RayTaskError) else None
    if cause is None:
        return f'{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ""}', False
    first = str(cause).strip().partition('\n')[0]
    if isinstance(cause, MemoryError) or type(cause).__name__ == 'OutOfMemoryError':  # torch.cuda's
        return f'out of memory ({first})', True
    if isinstance(cause, UserError):
        return first, False
    return f'{type(cause).__name__}: {first}', False
