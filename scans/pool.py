"""Run one function over many jobs in worker processes so that each job fails alone.

A job can fail three ways: it raises (the exception is its reason), it kills its worker process (a
crash in a C library, the out-of-memory killer), or it hangs. At most `workers` jobs are in flight, so
when a worker dies the jobs that may have killed it are known: they are retried one at a time in a
single-worker pool, where a job that breaks the pool again is the culprit. A job running longer than
timeout_s fails as timed out; the pool is then stopped (its workers killed) and restarted.
"""
import collections
import concurrent.futures as cf
import multiprocessing
import time
from concurrent.futures.process import BrokenProcessPool

POLL_S = 0.2  # how often running jobs are checked for the timeout, seconds
DIED = 'its worker process died (a crash in a library, or out of memory)'


def reason_of(error):
    """One short line for a failure list."""
    text = str(error).strip().splitlines()
    name = type(error).__name__
    return (text[-1] if name == 'ScanError' else f'{name}: {text[-1]}' if text else name)[:600]


def run_isolated(fn, jobs, workers, timeout_s, start_method='spawn'):
    """Yield (job, ok, result or reason string) once for every job, in completion order.

    fn must be importable by the workers (a module-level function) and jobs picklable."""
    ctx = multiprocessing.get_context(start_method)
    todo = collections.deque(jobs)
    suspects = collections.deque()
    while todo or suspects:
        if suspects:
            yield from _pool_run(fn, suspects, 1, timeout_s, ctx, suspects)
        else:
            yield from _pool_run(fn, todo, max(1, int(workers)), timeout_s, ctx, suspects)


def _pool_run(fn, queue, n, timeout_s, ctx, suspects):
    """Run jobs from `queue` in one pool of n workers until the queue is empty or the pool breaks.

    When it breaks, the jobs then in flight join `suspects` (n > 1) or fail as the culprit (n == 1)."""
    pool = cf.ProcessPoolExecutor(n, mp_context=ctx)
    running = {}  # future -> (job, start time)
    try:
        while queue or running:
            while queue and len(running) < n:
                job = queue.popleft()
                running[pool.submit(fn, job)] = (job, time.monotonic())
            done, _ = cf.wait(running, timeout=POLL_S, return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in done:
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue  # stays in `running`: handled below with the other jobs in flight
                except Exception as e:  # noqa: BLE001 - any error of one job is that job's failure
                    yield running.pop(fut)[0], False, reason_of(e)
                    continue
                yield running.pop(fut)[0], True, result
            now = time.monotonic()
            late = [] if broken else [f for f, (_, t0) in running.items() if now - t0 > timeout_s]
            for fut in late:
                yield running.pop(fut)[0], False, f'timed out after {timeout_s:g} s'
            if late:
                _kill_workers(pool)
                broken = True
            if broken:
                for job, _ in running.values():
                    if n == 1:
                        yield job, False, DIED
                    else:
                        suspects.append(job)
                return
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _kill_workers(pool):
    """Kill the pool's worker processes (ProcessPoolExecutor has no public per-worker API before 3.14)."""
    kill = getattr(pool, 'kill_workers', None)
    if kill is not None:
        kill()
        return
    for proc in list((getattr(pool, '_processes', None) or {}).values()):
        proc.kill()
