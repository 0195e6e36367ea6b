"""`recscale grid ... --launcher slurm`: the grid as one SLURM job array, submitted through submitit.

Each array task runs exactly one cell: the same `recscale fit` command the local launcher runs (config files, overrides,
experiment, run name and tags), resolved and hashed before submission so that cells already FINISHED in MLflow (and
cells still queued or running in SLURM) are not submitted again.

What a cell asks SLURM for: ``--time`` (``--slurm-time``), ``--cpus-per-task`` (``--slurm-cpus-per-cell``, divided
between the tasks of a multi-GPU cell), ``--gpus-per-node`` (``--slurm-gpus-per-cell``; above 1 the cell is DDP with
one task per GPU: ``--ntasks-per-node`` = GPUs, ``--trainer.devices`` = GPUs, ``--trainer.strategy ddp``, and each task
becomes one Lightning rank through Lightning's SLURM environment), ``--mem``, ``--partition``, ``--requeue``, and
``--signal=USR1@SECONDS``; any other sbatch option through ``--slurm-sbatch KEY=VALUE``.

Preemption, time limits and requeueing: SLURM sends SIGUSR1 ``--slurm-signal-delay`` seconds before the time limit (and
on preemption); ``scancel --signal=USR1`` does the same by hand. submitit's handler in the task calls
:meth:`CellTask.checkpoint`, which has the `recscale fit` process save ``last.ckpt`` and stop (recscale.signals), then
submitit requeues the task (``scontrol requeue``); the requeued task finds ``last.ckpt`` in the cell's checkpoint
directory and runs the cell with ``--ckpt_path last``, which continues the same MLflow run (``mlflow_run.json``). A
cell stopped by a plain SIGTERM (``scancel``, preemption in CANCEL mode) saves ``last.ckpt`` and fails; SLURM's own
requeue (node failure, preemption in REQUEUE mode) or the next submission of the grid resumes it the same way.

Logs: the cell's output goes to ``LOG_DIR/CELL.log`` (appended, one header per attempt), submitit's own files (batch
script, pickles, task stdout/stderr) to ``LOG_DIR/slurm/JOBID/``, and every submission is recorded in
``LOG_DIR/slurm/submissions.jsonl`` (job id, cell, config hash), which ``--status`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import submitit

SIGNAL = "USR1"  # the warning signal the cells ask SLURM for, and the one submitit's handler listens to
MANIFEST = "submissions.jsonl"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESIZING", "CONFIGURING"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


class SlurmError(RuntimeError):
    """A SLURM option or command the user must fix; the message names it."""


def parse_time(text: str) -> int:
    """SLURM's ``--time`` formats (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) -> whole minutes,
    rounded up (submitit takes minutes)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SlurmError(f"--slurm-time {text!r} is not a SLURM time: use MINUTES, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = int(a), int(b or 0), int(c or 0)
        seconds = int(days) * 86400 + h * 3600 + mi * 60 + s
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:  # M
        seconds = int(a) * 60
    if seconds <= 0:
        raise SlurmError(f"--slurm-time {text!r} must be positive")
    return -(-seconds // 60)


def parse_sbatch(items: list[str]) -> dict[str, str | bool]:
    """``--slurm-sbatch KEY=VALUE`` (or a bare ``KEY`` for a flag) -> sbatch options, without leading dashes."""
    out: dict[str, str | bool] = {}
    for it in items:
        key, eq, value = it.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_-]*", key):
            raise SlurmError(f"--slurm-sbatch {it!r}: expected an sbatch option as KEY=VALUE (e.g. qos=high) or KEY")
        out[key.replace("_", "-")] = value if eq else True
    return out


@dataclass
class SlurmOptions:
    partition: str | None = None
    time: str = "24:00:00"
    gpus_per_cell: int = 1
    cpus_per_cell: int = 8
    mem: str | None = None
    array_parallelism: int = 256
    signal_delay_s: int = 120
    max_timeouts: int = 3
    sbatch: dict = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)

    def fit_overrides(self) -> list[str]:
        """Overrides a multi-GPU cell adds to `recscale fit` (they are part of the experiment, hence of its hash)."""
        if self.gpus_per_cell > 1:
            return [f"--trainer.devices={self.gpus_per_cell}", "--trainer.strategy=ddp", "--trainer.num_nodes=1"]
        return []

    def sbatch_parameters(self, job_name: str) -> dict:
        """Parameters of submitit's SlurmExecutor.update_parameters."""
        if self.gpus_per_cell < 0 or self.cpus_per_cell < 1 or self.array_parallelism < 1:
            raise SlurmError("--slurm-gpus-per-cell must be >= 0, --slurm-cpus-per-cell and "
                             "--slurm-array-parallelism >= 1")
        tasks = max(1, self.gpus_per_cell)
        p: dict = {"job_name": job_name, "time": parse_time(self.time), "nodes": 1,
                   "cpus_per_task": max(1, self.cpus_per_cell // tasks), "array_parallelism": self.array_parallelism,
                   "signal_delay_s": self.signal_delay_s, "stderr_to_stdout": True,
                   "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={SIGNAL}", *self.setup]}
        if self.partition:
            p["partition"] = self.partition
        if self.gpus_per_cell > 0:
            p["gpus_per_node"] = self.gpus_per_cell
        if self.gpus_per_cell > 1:
            p["ntasks_per_node"] = self.gpus_per_cell
        extra: dict = {"signal": f"{SIGNAL}@{self.signal_delay_s}", "requeue": True}
        if self.mem:
            extra["mem"] = self.mem
        extra.update(self.sbatch)
        p["additional_parameters"] = extra
        return p


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("SLURM launcher (--launcher slurm)")
    g.add_argument("--slurm-partition", default=None, help="partition (default: the cluster's default)")
    g.add_argument("--slurm-time", default="24:00:00", help="time limit per attempt of a cell (SLURM format; "
                   "a cell reaching it is checkpointed and requeued, up to --slurm-max-timeouts times)")
    g.add_argument("--slurm-gpus-per-cell", type=int, default=1, help="GPUs per cell; >1 runs the cell as DDP, "
                   "one task per GPU (default 1; 0 for CPU-only cells)")
    g.add_argument("--slurm-cpus-per-cell", type=int, default=8, help="CPUs per cell (default 8)")
    g.add_argument("--slurm-mem", default=None, help="memory per node of a cell, e.g. 64G (default: the cluster's)")
    g.add_argument("--slurm-array-parallelism", type=int, default=256, help="cells running at once (default 256)")
    g.add_argument("--slurm-signal-delay", type=int, default=120,
                   help=f"seconds before the time limit at which SLURM sends SIG{SIGNAL} (default 120)")
    g.add_argument("--slurm-max-timeouts", type=int, default=3, help="requeues after reaching the time limit (3)")
    g.add_argument("--slurm-sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, repeatable: --slurm-sbatch qos=high --slurm-sbatch account=proj "
                        "--slurm-sbatch exclusive")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="COMMAND",
                   help="shell line run in the batch script before the cell, repeatable (e.g. 'module load cuda')")
    g.add_argument("--wait", action="store_true", help="wait until every submitted cell has left the queue")


def options_from_args(a: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(partition=a.slurm_partition, time=a.slurm_time, gpus_per_cell=a.slurm_gpus_per_cell,
                        cpus_per_cell=a.slurm_cpus_per_cell, mem=a.slurm_mem,
                        array_parallelism=a.slurm_array_parallelism, signal_delay_s=a.slurm_signal_delay,
                        max_timeouts=a.slurm_max_timeouts, sbatch=parse_sbatch(a.slurm_sbatch), setup=a.slurm_setup)


def job_tags() -> dict[str, str]:
    """MLflow tags of a run started inside a SLURM job (empty outside one); refreshed on every (re)start."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    env = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
           "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_cluster": "SLURM_CLUSTER_NAME",
           "slurm_node": "SLURMD_NODENAME"}
    tags = {k: os.environ[v] for k, v in env.items() if os.environ.get(v)}
    tags["slurm_restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return tags


class CellFailed(RuntimeError):
    pass


class CellTask(submitit.helpers.Checkpointable):
    """One grid cell as a submitit job: runs `recscale fit` in a child process (log appended to ``log``), resuming from
    ``ckpt_dir/last.ckpt`` when an earlier attempt left one. Checkpointable: on SLURM's warning signal it has the
    fit save ``last.ckpt`` and stop, and hands itself back to submitit for requeueing."""

    def __init__(self, name: str, argv: list[str], cwd: str, log: str, ckpt_dir: str, tracking_uri: str,
                 stop_timeout_s: float = 100.0, parent_run_id: str | None = None):
        self.name, self.argv, self.cwd, self.log = name, list(argv), cwd, log
        self.parent_run_id = parent_run_id
        self.ckpt_dir, self.tracking_uri, self.stop_timeout_s = ckpt_dir, tracking_uri, stop_timeout_s
        self._proc: subprocess.Popen | None = None
        self._rc: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"], state["_rc"] = None, None
        return state

    def command(self) -> list[str]:
        resume = (Path(self.ckpt_dir) / "last.ckpt").exists()
        return [sys.executable, "-m", "recscale", *self.argv, *(["--ckpt_path=last"] if resume else [])]

    def __call__(self) -> dict:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        log = Path(self.log) if rank == 0 else Path(self.log).with_suffix(f".rank{rank}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID", "?")
        with open(log, "a") as f:
            f.write(f"==== {datetime.now(timezone.utc).isoformat(timespec='seconds')} SLURM job {job} "
                    f"(restart {os.environ.get('SLURM_RESTART_COUNT', '0')}) on {socket.gethostname()}, rank {rank}: "
                    f"{'resuming from last.ckpt' if '--ckpt_path=last' in cmd else 'starting'}\n"
                    f"$ {shlex.join(cmd)}\n")
            f.flush()
            self._rc = None
            self._proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.cwd,
                                          env={**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri,
                                               **({"RECSCALE_PARENT_RUN_ID": self.parent_run_id}  # PARENT_RUN_ENV
                                                  if self.parent_run_id else {})})
            rc = self._wait(None)
        if rc != 0:
            stopped = rc in (128 + signal.SIGTERM, 128 + signal.SIGUSR1)
            raise CellFailed(f"cell {self.name}: recscale fit exited with {rc}"
                             + (" (stopped by a signal; last.ckpt saved, the next attempt resumes it)" if stopped else "")
                             + f"; log {log}")
        return {"cell": self.name, "returncode": rc, "log": str(log)}

    def _wait(self, timeout: float | None) -> int | None:
        """Exit code of the fit process, waiting up to `timeout` s (None: until it ends). Uses waitpid directly (not
        Popen.wait, whose lock the interrupted main thread may hold when a signal handler calls this)."""
        proc, deadline = self._proc, None if timeout is None else time.monotonic() + timeout
        while proc is not None and self._rc is None:
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                self._rc = proc.returncode if proc.returncode is not None else -1
                break
            if pid:
                self._rc = proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.2)
        return self._rc

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's signal handler (rank 0) on SIGUSR1: the fit process (which SLURM signalled too; it is
        signalled again here in case it was not) saves ``last.ckpt`` and exits; then this task is requeued as is
        and its next run resumes from that checkpoint."""
        proc = self._proc
        if proc is not None and self._rc is None:
            try:
                os.kill(proc.pid, getattr(signal, f"SIG{SIGNAL}"))
            except ProcessLookupError:
                pass
            rc = self._wait(self.stop_timeout_s)
            print(f"recscale: cell {self.name}: fit stopped with exit code {rc} for requeueing"
                  if rc is not None else f"recscale: cell {self.name}: fit did not stop within "
                  f"{self.stop_timeout_s:.0f} s; requeueing (it resumes from the last saved last.ckpt)", flush=True)
        return super().checkpoint(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- submission and status
def resolve(cell, extra: list[str]) -> tuple[str, Path]:
    """(config hash, checkpoint directory) of a cell, exactly as `recscale fit` computes them (train.before_fit)."""
    import warnings

    from recscale.tracking import config_hash, resolved_config
    from recscale.train import parse_fit_config

    with warnings.catch_warnings():  # LightningCLI warns that `args` and sys.argv (the grid's) are both given
        warnings.simplefilter("ignore")
        parser, cfg = parse_fit_config(cell.argv(extra))
    _, resolved = resolved_config(parser, cfg)
    h = config_hash(resolved)
    root = (resolved.get("trainer") or {}).get("default_root_dir") or "."
    return h, Path(root).resolve() / "checkpoints" / h


def fit_argv(cell, extra: list[str], experiment: str) -> list[str]:
    """The `recscale fit` arguments of a cell (as the local launcher passes them)."""
    return [*cell.argv(extra), f"--trainer.logger.init_args.experiment_name={experiment}",
            f"--trainer.logger.init_args.run_name={cell.name}",
            f"--trainer.logger.init_args.tags={json.dumps(cell.tags)}"]


def read_manifest(log_dir: str | Path) -> dict[str, dict]:
    """config hash -> the latest submission record of that cell."""
    path = Path(log_dir) / "slurm" / MANIFEST
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash while appending
                continue
            out[rec["config_hash"]] = rec
    return out


def queue_states() -> dict[str, str]:
    """job id (``ARRAY_TASK`` for array tasks) -> state, for the jobs SLURM still holds (squeue); {} without SLURM."""
    try:
        p = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    if p.returncode != 0:
        return {}
    return dict(line.split("|", 1) for line in p.stdout.split() if "|" in line)


def final_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> how SLURM ended it (sacct: COMPLETED, FAILED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY, ...);
    {} on a cluster without accounting."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        p = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)],
                           capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    out = {}
    if p.returncode == 0:
        for line in p.stdout.splitlines():
            jid, _, state = line.partition("|")
            if state.split():
                out[jid.strip()] = state.split()[0]
    return out


def submit_grid(cells, extra: list[str], opts: SlurmOptions, uri: str, experiment: str, log_dir: str,
                dry_run: bool = False, wait: bool = False) -> dict:
    """Submit the cells not yet FINISHED in MLflow (nor queued/running in SLURM) as one job array."""
    from recscale.grid import end_parent_run, finished_hashes, start_parent_run
    from recscale.tracking import ensure_experiment

    extra = [*extra, *opts.fit_overrides()]
    job_name = "recscale-" + (cells[0].tags.get("grid", "grid") if cells else "grid")
    params = opts.sbatch_parameters(job_name)
    done = finished_hashes(uri, experiment)
    logs = Path(log_dir).resolve()
    active = queue_states()
    previous = read_manifest(logs)
    todo, skipped, in_queue = [], [], []
    for c in cells:
        h, ckpt = resolve(c, extra)
        prev = previous.get(h)
        if h in done:
            skipped.append(c)
        elif prev is not None and active.get(prev["job_id"]) in QUEUED | RUNNING:
            in_queue.append((c, prev["job_id"], active[prev["job_id"]]))
        else:
            todo.append((c, h, ckpt))
    print(f"grid: {len(cells)} cells, {len(skipped)} already FINISHED in {uri}, {len(in_queue)} queued or running in "
          f"SLURM, {len(todo)} to submit as one SLURM job array" + (" (dry run)" if dry_run else ""), flush=True)
    for c in skipped:
        print(f"  skip  {c.name}")
    for c, jid, state in in_queue:
        print(f"  skip  {c.name} (SLURM job {jid} is {state})")
    asks = (f"each cell asks: {params['time']} min, {params['cpus_per_task']} CPU(s) x "
            f"{max(1, opts.gpus_per_cell)} task(s), {opts.gpus_per_cell} GPU(s), "
            f"mem {opts.mem or 'cluster default'}, partition {opts.partition or 'cluster default'}"
            + "".join(f", --{k}" + ("" if v is True else f"={v}") for k, v in opts.sbatch.items()))
    if dry_run:
        for c, h, _ in todo:
            print(f"  submit {c.name} [{h}]: recscale {shlex.join(fit_argv(c, extra, experiment))}")
        if todo:
            print("  " + asks)
            from submitit.slurm.slurm import _make_sbatch_string

            script = _make_sbatch_string(command=f"{shlex.quote(sys.executable)} -u -m submitit.core._submit "
                                         f"{logs / 'slurm' / '%j'}", folder=logs / "slurm" / "%j",
                                         map_count=len(todo) if len(todo) > 1 else None, **params)
            print("  batch script:\n" + "\n".join("    " + line for line in script.splitlines()))
        return {"total": len(cells), "skipped": len(skipped), "in_queue": len(in_queue), "submitted": 0,
                "jobs": [], "failed": []}
    if not todo:
        return {"total": len(cells), "skipped": len(skipped), "in_queue": len(in_queue), "submitted": 0,
                "jobs": [], "failed": []}
    exp_id = ensure_experiment(uri, experiment)  # once, before cells start in parallel
    parent = start_parent_run(uri, exp_id, cells, len(todo), len(skipped))  # the cells become its child runs
    (logs / "slurm").mkdir(parents=True, exist_ok=True)
    try:
        executor = submitit.SlurmExecutor(folder=logs / "slurm" / "%j", max_num_timeout=opts.max_timeouts)
    except RuntimeError as e:
        raise SlurmError(f"--launcher slurm: {e} (no `srun` on PATH: run the grid on a SLURM login node, or start "
                         "the test cluster with `make slurm-up`)") from e
    executor.update_parameters(**params)
    cwd = os.getcwd()
    tasks = [CellTask(c.name, fit_argv(c, extra, experiment), cwd, str(logs / f"{c.name}.log"), str(ckpt), uri,
                      stop_timeout_s=max(10.0, opts.signal_delay_s - 20.0), parent_run_id=parent)
             for c, _, ckpt in todo]
    try:
        with executor.batch():
            jobs = [executor.submit(t) for t in tasks]
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as e:
        raise SlurmError(f"sbatch refused the grid's job array: {e}") from e
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(logs / "slurm" / MANIFEST, "a") as f:
        for (c, h, _), j in zip(todo, jobs):
            f.write(json.dumps({"job_id": j.job_id, "cell": c.name, "config_hash": h, "log": str(logs / f"{c.name}.log"),
                                "submitted": now, "experiment": experiment, "tracking_uri": uri}) + "\n")
    array = jobs[0].job_id.split("_")[0]
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_tag(parent, "slurm_array_job_id", array)
    print(f"grid: submitted {len(jobs)} cell(s) as SLURM job {array} ({job_name}); {asks}\n"
          f"  cell logs: {logs}/CELL.log; submitit files: {logs / 'slurm' / array}*\n"
          f"  progress: the same `recscale grid` command with --status (or squeue -j {array})", flush=True)
    for (c, _, _), j in zip(todo, jobs):
        print(f"  {j.job_id}  {c.name}")
    res = {"total": len(cells), "skipped": len(skipped), "in_queue": len(in_queue), "submitted": len(jobs),
           "jobs": [j.job_id for j in jobs], "failed": []}
    if wait:
        ids = set(res["jobs"])
        while ids & set(queue_states()):
            time.sleep(2)
        st = status(cells, extra, uri, experiment, log_dir, quiet=True, resolved=[(c, h) for c, h, _ in todo])
        res["failed"] = [c for c, s in st["cells"].items() if s["state"] != "finished"]
        print(f"grid: all submitted cells left the queue: {len(todo) - len(res['failed'])} finished, "
              f"{len(res['failed'])} not", flush=True)
        end_parent_run(uri, parent, res["failed"])
    else:  # the parent run records the submission; the cells' own runs (its children) say how each one ends
        MlflowClient(uri).set_tag(parent, "note", f"submission only: the cells run as SLURM job array {array}; "
                                  "progress: the same recscale grid command with --status")
        end_parent_run(uri, parent, [])
    return res


def status(cells, extra: list[str], uri: str, experiment: str, log_dir: str, quiet: bool = False,
           resolved: list | None = None) -> dict:
    """How many cells of a grid are finished, running, queued, failed or not submitted, from the MLflow runs (tag
    ``config_hash``) and SLURM (squeue for jobs it holds; sacct for how the others ended)."""
    from mlflow.tracking import MlflowClient

    pairs = resolved if resolved is not None else [(c, resolve(c, extra)[0]) for c in cells]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=50000) if exp is not None else []
    by_hash: dict[str, list] = {}
    for r in runs:
        by_hash.setdefault(r.data.tags.get("config_hash"), []).append(r)
    manifest = read_manifest(log_dir)
    queue = queue_states()
    ended = final_states([manifest[h]["job_id"] for _, h in pairs if h in manifest
                          and manifest[h]["job_id"] not in queue])
    cells_out: dict[str, dict] = {}
    for c, h in pairs:
        rs = by_hash.get(h, [])
        rec = manifest.get(h)
        jid = rec["job_id"] if rec else None
        slurm_state = queue.get(jid) if jid else None
        if any(r.info.status == "FINISHED" for r in rs):
            state = "finished"
        elif slurm_state in RUNNING:
            state = "running"
        elif slurm_state in QUEUED:
            state = "queued"
        elif rec is None and any(r.info.status == "RUNNING" for r in rs):
            state = "running"  # a local launcher's cell (or one whose MLflow run was never closed)
        elif rec is not None or rs:
            state = "failed"
            slurm_state = ended.get(jid, slurm_state) if jid else None
        else:
            state = "not submitted"
        cells_out[c.name] = {"state": state, "config_hash": h, "job_id": jid, "slurm_state": slurm_state,
                             "mlflow": sorted(r.info.status for r in rs),
                             "log": rec["log"] if rec else str(Path(log_dir) / f"{c.name}.log")}
    counts = {k: sum(1 for v in cells_out.values() if v["state"] == k)
              for k in ("finished", "running", "queued", "failed", "not submitted")}
    if not quiet:
        print(f"grid status: {len(pairs)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items())
              + f" (MLflow {uri}, experiment {experiment}; SLURM {'squeue answering' if shutil.which('squeue') else 'not available'})")
        for name, s in cells_out.items():
            if s["state"] != "finished":
                print(f"  {s['state']:<13} {name}" + (f"  job {s['job_id']}" if s["job_id"] else "")
                      + (f" ({s['slurm_state']})" if s["slurm_state"] else "")
                      + (f"  MLflow runs: {', '.join(s['mlflow'])}" if s["mlflow"] else "")
                      + (f"  log {s['log']}" if s["state"] == "failed" else ""))
    return {"counts": counts, "cells": cells_out}

