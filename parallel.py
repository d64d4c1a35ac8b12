"""Independent jobs (test folds of the retrain, candidates of the evolutionary search): one after the other, or
spread over Ray workers (PARALLEL='ray').

A job is fn(*args) with a module-level fn and picklable args; it writes its own files, so a job that is lost can
be run again. Results come back in the order of the jobs.
"""
from utils import UserError

MODES = ('off', 'ray')  # 'off': in this process, one after the other


def map_jobs(fn, jobs, mode='off'):
    """[fn(*args) for args in jobs], in this process ('off') or as Ray tasks ('ray')."""
    if mode not in MODES:
        raise UserError(f'PARALLEL must be one of {", ".join(MODES)}, got {mode!r}')
    if mode == 'off':
        return [fn(*args) for args in jobs]
    raise UserError("PARALLEL='ray' is not available yet")
