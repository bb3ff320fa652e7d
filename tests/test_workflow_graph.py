"""The workflow graph, built for the main option branches and never run: each stage node
is its stage's signature and declared outputs, every connection names fields that exist,
every input a stage needs is set or connected, and only the execution settings are left
out of the cache keys."""

import importlib
import inspect

import pytest
from nipype.interfaces.base import isdefined

from pipeline import steps
from pipeline.io.bids import combine_by_session, find_dwi_runs
from pipeline.io.derivatives import DERIVATIVES
from pipeline.stage import stage
from pipeline.tractometry.qc import quality_control
from workflows.base import StageInterface, init_single_subject_wf, stage_node
from workflows.cli import cst_report_parser
from workflows.config import RunConfig

#: The inputs that must not change a step's cache key (workflows.execution).
UNHASHED = {"n_jobs", "mem_gb", "dask_scheduler", "execution"}

#: Command-line options of each branch, and the steps it must have / must not have.
BRANCHES = {
    "defaults": ([], {"remove_gibbs", "correct_motion", "fit_fodf"}, {"combine_runs"}),
    "no gibbs, no motion, no denoising": (
        ["--no-gibbs", "--motion", "none", "--denoise", "none"], set(),
        {"remove_gibbs", "correct_motion"}),
    "rigid, csd, dask, report-only outliers, memory budget": (
        ["--motion", "rigid", "--model", "csd", "--direction", "det", "--outliers", "report",
         "--gradient-check", "off", "--dask-scheduler", "tcp://h:8786", "--mem-gb", "3"],
        {"correct_motion"}, {"combine_runs"}),
    "combined runs, patch2self, auto model": (
        ["--combine-runs", "--denoise", "patch2self", "--model", "auto", "--n-jobs", "2"],
        {"combine_runs", "remove_gibbs"}, set()),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one subject: the files exist, and are never read."""
    bids = tmp_path_factory.mktemp("bids")
    dwi = bids / "sub-01" / "dwi"
    dwi.mkdir(parents=True)
    for direction in ("AP", "PA"):
        for suffix in (".nii.gz", ".bval", ".bvec"):
            (dwi / f"sub-01_dir-{direction}_dwi{suffix}").touch()
    return find_dwi_runs(bids, "01")


def _graph(runs, tmp_path, argv):
    args = cst_report_parser().parse_args(["01", "--bids-dir", "x", "--out-dir", "y", *argv])
    parameters = RunConfig.from_args(args).parameters()
    if parameters["preprocessing"]["combine_runs"]:
        runs = combine_by_session(runs)
    wf = init_single_subject_wf(runs, out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                                parameters=parameters, mem_gb=parameters["mem_gb"])
    return wf._create_flat_graph()


def _step(node):
    module, _, name = node.inputs.stage.partition(":")
    return getattr(importlib.import_module(module), name)


def _parameters(step):
    return {name: p for name, p in inspect.signature(step).parameters.items()
            if name != "out_dir"}


def _fields(node, side):
    """The fields of ``node`` on ``side`` ("in" or "out")."""
    if isinstance(node.interface, StageInterface):
        if side == "in":
            return set(_parameters(_step(node)))
        return set(node.interface._output_names)
    spec = node.inputs if side == "in" else node.outputs
    return set(spec.copyable_trait_names())


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_each_stage_node_is_its_stage_and_every_connection_exists(runs, tmp_path, branch):
    argv, present, absent = BRANCHES[branch]
    graph = _graph(runs, tmp_path, argv)
    connected = {node: set() for node in graph.nodes}
    for source, target, data in graph.edges(data=True):
        for out_field, in_field in data["connect"]:
            assert isinstance(out_field, str), (source, out_field)  # no function connections
            assert out_field in _fields(source, "out"), f"{source.fullname} has no {out_field}"
            assert in_field in _fields(target, "in"), f"{target.fullname} has no {in_field}"
            assert in_field not in connected[target], f"{target.fullname}.{in_field} twice"
            connected[target].add(in_field)

    steps_here = set()
    for node in graph.nodes:
        if not isinstance(node.interface, StageInterface):
            continue
        step = _step(node)
        parameters = _parameters(step)
        steps_here.add(step.__name__)
        # inputs: the parameters (and the stage's name); outputs: the declared results
        assert sorted(node.interface._input_names) == sorted(["stage", *parameters])
        assert node.interface._output_names == list(step.stage_outputs.names)
        values = {k for k, v in node.inputs.trait_get().items()
                  if isdefined(v) and k not in ("function_str", "stage")}
        assert values <= set(parameters), f"{node.fullname}: {values - set(parameters)}"
        assert not values & connected[node], f"{node.fullname}: set and connected"
        required = {k for k, p in parameters.items() if p.default is p.empty}
        missing = required - values - connected[node]
        assert not missing, f"{node.fullname} gets no {sorted(missing)}"
        unhashed = {k for k in parameters if node.inputs.has_metadata(k, "nohash", True)}
        assert unhashed == UNHASHED & set(parameters), node.fullname
    assert present <= steps_here and not absent & steps_here, sorted(steps_here)


def test_every_stage_of_the_pipeline_is_in_some_branch(runs, tmp_path):
    declared = {name for name, value in vars(steps).items() if hasattr(value, "stage_outputs")}
    used = set()
    for index, (argv, _, _) in enumerate(BRANCHES.values()):
        graph = _graph(runs, tmp_path / str(index), argv)
        used |= {_step(n).__name__ for n in graph.nodes if isinstance(n.interface, StageInterface)}
    assert used == declared


def test_the_derivatives_are_the_written_files():
    written = list(inspect.signature(steps.write_derivatives).parameters)
    assert written[:len(DERIVATIVES)] == list(DERIVATIVES)


def test_stage_node_refuses_what_the_stage_does_not_take():
    with pytest.raises(ValueError, match="takes no njobs"):
        stage_node(steps.remove_gibbs, "gibbs", inputs={"njobs": 2})
    with pytest.raises(TypeError, match="not declared a stage"):
        stage_node(quality_control, "qc")

    @stage(outputs=("a",))
    def loose(**kwargs):
        return kwargs

    with pytest.raises(TypeError, match=r"\*\*kwargs"):
        stage_node(loose, "loose")
