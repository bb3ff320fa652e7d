"""One place for parallelism: joblib on this machine, or joblib's Dask backend on a cluster."""

import time
from contextlib import contextmanager
from contextvars import ContextVar

from joblib import Parallel, delayed, parallel_config
from joblib.externals.loky import get_reusable_executor
from threadpoolctl import threadpool_limits

from .errors import InputError

#: ``dask_scheduler`` value that starts a dask-jobqueue ``SLURMCluster`` for the work.
SLURM_CLUSTER = "slurm"

#: Size of one Dask worker job on SLURM unless dask-jobqueue's configuration sets it.
DEFAULT_SLURM_WORKER = {"cores": 1, "memory": "2GiB"}

#: What starting the workers and handing them the arrays costs (s): measured on
#: sub-philips01 (benchmarks/bench_tracking.py), EuDX on 100k seeds took 4.4 s here and
#: 5.2 s over 2 workers, i.e. 3 s more than half the serial time.
WORKER_START_SECONDS = 3.0

_ON_DASK = ContextVar("on_dask", default=False)


def parallel_map(function, argument_tuples, *, n_jobs, threads=False):
    """``[function(*args) for args in argument_tuples]`` over ``n_jobs`` joblib workers.

    Parallel only where it pays: with processes, the first call runs here and is
    timed; the others go to the workers only when that saves more than starting
    them costs (:data:`WORKER_START_SECONDS`), so ``n_jobs > 1`` is never much
    slower than serial. The calls and their arguments are the same either way, so are the
    results.

    ``threads=True`` is for functions that release the GIL for most of their work
    (Numba ``nogil`` kernels, DIPY's trackers and image metrics, FFTs, numpy's
    batched linear algebra): the workers are threads of this process, which share
    the arrays instead of receiving them and cost nothing to start, so there is no
    timed first call. Each runs one BLAS thread, as loky's worker processes do:
    more would oversubscribe the cores, and on MP-PCA's small matrices OpenBLAS's
    threads only cost (sub-philips01 on one core: 8.7 s with one BLAS thread,
    10.7 s with two). Functions that hold the GIL keep to processes.

    Large arrays reach the workers as copy-on-write memmaps (DIPY's Cython code
    rejects the read-only ones joblib uses by default). The worker processes
    are shut down afterwards: idle loky workers otherwise live for minutes and
    keep a host process (e.g. a Nipype MultiProc worker) from exiting.

    Inside :func:`dask_backend` every call goes to the Dask cluster (the user
    asked for it), in the same order and with the same results.
    """
    argument_tuples = list(argument_tuples)
    on_dask = _ON_DASK.get()
    if threads and not on_dask:  # n_jobs=1 runs the calls here, one after the other
        return list(parallel_imap_threads(function, argument_tuples, n_jobs=n_jobs))
    if not on_dask and (n_jobs == 1 or len(argument_tuples) < 2):
        return [function(*args) for args in argument_tuples]
    results = []
    if not on_dask:
        started = time.perf_counter()
        results.append(function(*argument_tuples[0]))
        per_call = time.perf_counter() - started
        remaining = per_call * (len(argument_tuples) - 1)
        saved = remaining * (1 - 1 / min(n_jobs, len(argument_tuples) - 1))
        if saved < WORKER_START_SECONDS:
            return results + [function(*args) for args in argument_tuples[1:]]
    # ``prefer`` is only a hint: inside dask_backend the calls still go to Dask.
    with Parallel(n_jobs=n_jobs, mmap_mode="c", prefer="threads" if threads else None) as parallel:
        results += parallel(delayed(function)(*args) for args in argument_tuples[len(results):])
    if not on_dask:
        get_reusable_executor().shutdown(wait=True)
    return results


def parallel_imap_threads(function, argument_tuples, *, n_jobs):
    """``function(*args)`` for each of ``argument_tuples`` on ``n_jobs`` threads, yielded
    in order as they finish (see :func:`parallel_map`'s ``threads=True``).

    A generator, so the caller can store each result and let it go: at most about
    ``2 × n_jobs`` results are alive at once, not all of them.
    """
    with threadpool_limits(limits=1, user_api="blas"), \
            Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator") as parallel:
        yield from parallel(delayed(function)(*args) for args in argument_tuples)


def require_dask(dask_scheduler):
    """Fail early, with the fix, when ``dask_scheduler`` asks for packages not installed.

    Parameters
    ----------
    dask_scheduler : str or None
        A Dask scheduler address (``tcp://host:8786``), :data:`SLURM_CLUSTER`,
        or None (no Dask).

    Raises
    ------
    InputError
        Dask (``distributed``) is missing, or dask-jobqueue for :data:`SLURM_CLUSTER`.
    """
    if not dask_scheduler:
        return
    needed = ["distributed"] + (["dask_jobqueue"] if dask_scheduler == SLURM_CLUSTER else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError as exc:
            raise InputError(
                f"A Dask scheduler was asked for ({dask_scheduler!r}) but the Python package "
                f"'{module.replace('_', '-')}' is not installed.",
                fix='Install the optional extra: pip install "cst-integrity[dask]", or run '
                    'without --dask-scheduler.') from exc


@contextmanager
def dask_backend(dask_scheduler, *, n_workers=1):
    """Run the :func:`parallel_map` calls made inside on a Dask cluster (joblib's Dask backend).

    Parameters
    ----------
    dask_scheduler : str or None
        Address of a running Dask scheduler (e.g. ``tcp://10.0.0.5:8786``), or
        ``"slurm"`` to start a dask-jobqueue ``SLURMCluster`` of ``n_workers``
        worker jobs for the duration of the block. Worker job size, partition,
        account and wall time come from dask-jobqueue's configuration
        (``jobqueue.slurm.*`` in ``~/.config/dask/jobqueue.yaml`` or
        ``DASK_JOBQUEUE__SLURM__*`` variables); without one each worker job
        gets :data:`DEFAULT_SLURM_WORKER`. None or empty: nothing changes, the
        work stays on this machine.
    n_workers : int
        Worker jobs of the ``"slurm"`` cluster; the work starts once all are up.

    Notes
    -----
    joblib runs the calls in this process when the cluster offers a single
    worker thread; the results are the same.
    """
    if not dask_scheduler:
        yield
        return
    require_dask(dask_scheduler)
    from distributed import Client

    with _cluster(dask_scheduler, n_workers) as (address, expected_workers), \
            Client(address, set_as_default=False) as client:
        # joblib sizes its dispatch by the workers present when it starts (one thread: it
        # runs everything here) and gives up after 10 s without any; SLURM worker jobs
        # may wait longer than that in the queue.
        client.wait_for_workers(expected_workers)
        token = _ON_DASK.set(True)
        try:
            with parallel_config(backend="dask", client=client):
                yield
        finally:
            _ON_DASK.reset(token)


@contextmanager
def _cluster(dask_scheduler, n_workers):
    """The scheduler address to connect to and the workers to wait for, starting a
    SLURMCluster when asked."""
    if dask_scheduler != SLURM_CLUSTER:
        yield dask_scheduler, 1
        return
    import dask
    from dask_jobqueue import SLURMCluster

    unset = {key: value for key, value in DEFAULT_SLURM_WORKER.items()
             if dask.config.get(f"jobqueue.slurm.{key}", None) is None}
    n_jobs = max(1, n_workers)
    with SLURMCluster(**unset) as cluster:
        cluster.scale(jobs=n_jobs)
        yield cluster.scheduler_address, n_jobs
