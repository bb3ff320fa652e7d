"""The declaration of a pipeline stage: what it returns, named once.

A stage (:mod:`pipeline.steps`) is a function of files and settings that writes its
results into ``out_dir`` when it takes one. :func:`stage` only records the names of
its results on the function; ``workflows`` builds the stage's Nipype node from them
and from the function's signature (:func:`workflows.base.stage_node`), so that a
stage is written once. This module imports nothing: ``pipeline`` never needs Nipype.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class StageOutputs:
    """What a stage returns.

    Attributes
    ----------
    names : tuple of str
        The names of its results, in order.
    mapping : bool
        True: the stage returns a dict holding (at least) ``names``; False: it returns
        its one result itself.
    """

    names: tuple
    mapping: bool

    def values(self, result):
        """The stage's results in the order of :attr:`names`, from what it returned."""
        if not self.mapping:
            return (result,)
        missing = [name for name in self.names if name not in result]
        if missing:
            raise KeyError(f"the stage returned no {', '.join(missing)} "
                           f"(it returned {', '.join(result)})")
        return tuple(result[name] for name in self.names)


def stage(*, outputs=None, output=None):
    """Declare a function a pipeline stage and name its results.

    Parameters
    ----------
    outputs : tuple of str
        The keys of the dict the stage returns.
    output : str
        The name of the one value the stage returns (not a dict of results).

    Examples
    --------
    >>> @stage(outputs=("dwi", "qc"))
    ... def denoise(dwi_file, *, out_dir, n_jobs=1):
    ...     ...
    >>> denoise.stage_outputs.names
    ('dwi', 'qc')
    """
    if (outputs is None) == (output is None):
        raise TypeError("give either outputs (the keys of the returned dict) or output")
    declared = (StageOutputs(tuple(outputs), True) if output is None
                else StageOutputs((output,), False))

    def declare(function):
        function.stage_outputs = declared
        return function

    return declare
