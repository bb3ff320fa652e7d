"""One place for joblib parallelism."""

from joblib import Parallel, delayed
from joblib.externals.loky import get_reusable_executor


def parallel_map(function, argument_tuples, *, n_jobs):
    """``[function(*args) for args in argument_tuples]`` over ``n_jobs`` joblib workers.

    Large arrays reach the workers as copy-on-write memmaps (DIPY's Cython code
    rejects the read-only ones joblib uses by default). The worker processes
    are shut down afterwards: idle loky workers otherwise live for minutes and
    keep a host process (e.g. a Nipype MultiProc worker) from exiting.
    """
    with Parallel(n_jobs=n_jobs, mmap_mode="c") as parallel:  # removes its memmap folder
        results = parallel(delayed(function)(*args) for args in argument_tuples)
    if n_jobs != 1:
        get_reusable_executor().shutdown(wait=True)
    return results
