#!/usr/bin/env bash
# CI stage: the pipeline on a real SLURM cluster (one node on localhost, slurm-wlm + munge).
#
# 1. a local run (MultiProc) of two real subjects: the reference. The tests' own runs of
#    them serve, where they were kept (CST_TEST_RUNS_DIR, set by .ci/run);
# 2. the same through Nipype's SLURM plugin: every step must be a SLURM job (the job ids
#    Nipype recorded are found completed in slurmctld's log) and the outputs must equal
#    the reference (metrics JSON apart from its creation time, streamlines bit for bit,
#    profiles byte for byte);
# 3. scripts/slurm_array.py with a work directory of step 1 or 2 (its steps are cached,
#    only the outputs are written again): a task cancelled at once is resubmitted
#    automatically (--retries 1), and the outputs equal the reference;
# 4. the tests marked `slurm` (tracking on a dask-jobqueue SLURMCluster).
# Every daemon started here is stopped on exit, also on failure.
#
# Environment: PYTHON (default .venv/bin/python, with the [test] extra installed),
# CST_SHARED_BIDS (default ../shared/data/bids; without it the demo phantom is used),
# CST_CI_SUBJECTS (default "toshiba01 philips02"), CST_TEST_RUNS_DIR (the tests' runs of
# the real scans, one folder per subject: tests/conftest.py real_scan_run).
set -euo pipefail
cd "$(dirname "$0")/.."
stage_start=$(date +%s)
PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
BIDS=${CST_SHARED_BIDS:-../shared/data/bids}
# Two real scans that give a full (assessable) report, of two vendors, which the tests run
# too (~40 and ~65 s each).
read -r -a SUBJECTS <<<"${CST_CI_SUBJECTS:-toshiba01 philips02}"
N_JOBS=2  # the CI machine's cores

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

SCRATCH=$(mktemp -d /tmp/cst-slurm-stage.XXXXXX)
chmod 755 "$SCRATCH"  # munged checks that its socket's folder is not private
export SLURM_CONF=$SCRATCH/slurm.conf
# Nipype's SLURM plugin names jobs after $LOGNAME (unset in CI); cst-integrity also sets it.
export LOGNAME=${LOGNAME:-$(id -un)}
export NIPYPE_NO_ET=1 MPLBACKEND=Agg

stop_daemons() {
  local status=$?
  set +e
  if [ "$status" -ne 0 ]; then
    echo "slurm stage FAILED (exit $status); daemon logs:" >&2
    tail -n 30 "$SCRATCH"/slurmctld.log "$SCRATCH"/slurmd.log "$SCRATCH"/munge/munged.log >&2
  fi
  scancel --user "$(id -un)" 2>/dev/null
  for pid_file in "$SCRATCH"/slurmd.pid "$SCRATCH"/slurmctld.pid "$SCRATCH"/munge/munged.pid; do
    [ -s "$pid_file" ] || continue
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  rm -rf "$SCRATCH"
  echo "slurm stage: daemons stopped, scratch removed"
  exit "$status"
}
trap stop_daemons EXIT

start_cluster() {
  mkdir -p "$SCRATCH"/munge "$SCRATCH"/state "$SCRATCH"/spool
  chmod 755 "$SCRATCH"/munge
  head -c 1024 /dev/urandom > "$SCRATCH"/munge/munge.key
  chmod 400 "$SCRATCH"/munge/munge.key
  munged --key-file="$SCRATCH"/munge/munge.key --socket="$SCRATCH"/munge/munge.socket \
    --pid-file="$SCRATCH"/munge/munged.pid --log-file="$SCRATCH"/munge/munged.log \
    --seed-file="$SCRATCH"/munge/munged.seed
  local node memory
  node=$(hostname -s)  # slurmd only serves the node whose name is its host name
  memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  cat > "$SLURM_CONF" <<EOF
ClusterName=cstci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SCRATCH/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmctldLogFile=$SCRATCH/slurmctld.log
SlurmdLogFile=$SCRATCH/slurmd.log
SlurmctldDebug=info
# Start each job as soon as it is submitted (the defaults batch submissions for busy sites,
# which costs Nipype's one-job-per-step ~2 s a step here).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$N_JOBS RealMemory=$memory State=UNKNOWN
PartitionName=ci Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -c
  slurmd
  for _ in $(seq 100); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && return 0
    sleep 0.2
  done
  echo "the SLURM node did not become idle" >&2
  return 1
}

wait_for_jobs() {  # until no job named $1* is queued or running
  while squeue -h -o %j | grep -q "^$1"; do sleep 2; done
}

timed() {  # timed LABEL COMMAND...: run, print its wall time
  local label=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  echo "slurm stage: $label took $(( $(date +%s) - t0 )) s"
}

if [ -d "$BIDS" ]; then
  labels=("${SUBJECTS[@]}")
else
  echo "slurm stage: no real scans at $BIDS; using the demo phantom"
  BIDS=$SCRATCH/demo-bids
  "$PYTHON" scripts/make_demo_dataset.py "$BIDS" >/dev/null
  labels=(subject01)
fi
BIDS=$(cd "$BIDS" && pwd)

timed "cluster start" start_cluster
sinfo

# --keep-work: the checks below read the work folders (job logs, cached steps), which a
# successful run would otherwise delete.
participant() {  # participant OUT WORK LABEL... [-- options]: cst-integrity, checked
  local out=$1 work=$2 code=0 log
  shift 2
  local selected=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do selected+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  log=$out-$(IFS=-; echo "${selected[*]}").log
  mkdir -p "$out"
  "$BIN"/cst-integrity "$BIDS" "$out" participant --participant-label "${selected[@]}" \
    --n-jobs "$N_JOBS" --work-dir "$work" --keep-work "$@" >"$log" 2>&1 || code=$?
  cat "$log"
  [ "$code" -eq 0 ] || [ "$code" -eq 3 ]  # 3: reported, but not assessable
}

slurm_run() {  # one cst-integrity per subject at the same time: their jobs share the node
  local pids=() pid failed=0 subject
  for subject in "${labels[@]}"; do
    participant "$SCRATCH"/slurm "$SCRATCH"/work-slurm "$subject" -- --plugin SLURM &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return "$failed"
}

reference_from_tests() {  # the tests' runs of every subject, if kept: copied as the reference
  local subject
  [ -n "${CST_TEST_RUNS_DIR:-}" ] || return 1
  for subject in "${labels[@]}"; do
    [ -s "$CST_TEST_RUNS_DIR/$subject/sub-$subject/dwi/sub-${subject}_desc-cst_metrics.json" ] \
      || return 1
  done
  mkdir -p "$SCRATCH"/local
  for subject in "${labels[@]}"; do
    cp -r "$CST_TEST_RUNS_DIR/$subject/sub-$subject" "$SCRATCH"/local/
  done
}
if reference_from_tests; then
  echo "slurm stage: the reference is the tests' local runs (cst-report --n-jobs $N_JOBS) in $CST_TEST_RUNS_DIR"
  cached_work=$SCRATCH/work-slurm
else
  timed "local run (MultiProc)" participant "$SCRATCH"/local "$SCRATCH"/work-local "${labels[@]}"
  cached_work=$SCRATCH/work-local
fi
timed "SLURM plugin run" slurm_run

# Every step went through SLURM: Nipype keeps one slurm-<job id>.out per submitted job,
# and slurmctld logged each of those jobs as allocated and completed with exit status 0.
mapfile -t job_ids < <(find "$SCRATCH"/work-slurm -path '*/batch/slurm-*.out' \
  | sed 's/.*slurm-\([0-9]*\)\.out/\1/' | sort -n)
n_steps=$(find "$SCRATCH"/work-slurm -name '_node.pklz' | wc -l)
echo "slurm stage: ${#job_ids[@]} SLURM jobs for $n_steps workflow steps (ids ${job_ids[0]}..${job_ids[-1]})"
[ "${#job_ids[@]}" -gt 0 ] && [ "${#job_ids[@]}" -eq "$n_steps" ]
for id in "${job_ids[@]}"; do  # started by the main or the backfill scheduler
  grep -Eq "(Allocate|Started) JobId=$id " "$SCRATCH"/slurmctld.log
  grep -q "_job_complete: JobId=$id WEXITSTATUS 0" "$SCRATCH"/slurmctld.log
done
grep -E "(Allocate|Started) JobId=" "$SCRATCH"/slurmctld.log | tail -n 3
"$PYTHON" scripts/compare_outputs.py --results-only "$SCRATCH"/local "$SCRATCH"/slurm

# The array script against the same scheduler: one task per participant. It reuses the
# work directory of the local or the SLURM run (a copy would not do: Nipype's cache keys
# hold absolute paths; the plugin is not part of them) and its --n-jobs (part of the
# recorded parameters). A task cancelled right after
# submission must be resubmitted by the follow-up job.
array_run() {
  local state=$cached_work/slurm-array array_id subject
  "$PYTHON" scripts/slurm_array.py "$BIDS" "$SCRATCH"/array --work-dir "$cached_work" \
    --cst-integrity "$BIN"/cst-integrity --cpus "$N_JOBS" --mem 2G --time 00:20:00 \
    --retries 1 --participant-label "${labels[@]}" | tee "$SCRATCH"/array-submit.log
  array_id=$(sed -n 's/^submitted array job \([0-9]*\).*/\1/p' "$SCRATCH"/array-submit.log)
  scancel "${array_id}_1"
  wait_for_jobs cst-integrity
  cat "$state"/logs/retry-*.out
  grep -q "^submitted array job" "$state"/logs/retry-*.out
  for subject in "${labels[@]}"; do
    grep -qxE "0|3" "$state/exit/sub-$subject"
  done
}
timed "array submission with one resubmission" array_run
"$PYTHON" scripts/compare_outputs.py --results-only "$SCRATCH"/local "$SCRATCH"/array

slurm_tests() {  # they skip without a cluster: here they must run
  "$PYTHON" -m pytest -q -rs -m slurm -p no:cacheprovider tests/test_slurm_dask.py \
    | tee "$SCRATCH"/pytest.log
  grep -q " passed" "$SCRATCH"/pytest.log && ! grep -q "skipped" "$SCRATCH"/pytest.log
}
timed "tests marked slurm (Dask SLURMCluster)" slurm_tests

echo "slurm stage finished in $(( $(date +%s) - stage_start )) s"
