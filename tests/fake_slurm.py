#!/usr/bin/env python3
"""A local stand-in for SLURM's ``sbatch``, ``srun`` and ``scontrol``: runs the real ``slurm/*.sbatch``
scripts unchanged on one machine, several "nodes" at once. A test and development tool (tests/,
benchmarks/check_multinode_gpu.py); nothing on the training path uses it, and it is on ``PATH`` only
inside the jobs it starts.

    python tests/fake_slurm.py sbatch --nodes=2 --ntasks-per-node=2 --cpus-per-task=1 \\
        slurm/train_multinode.sbatch trainer=fsdp2 trainer.device=cpu ...
    kill -USR1 <pid of fake_slurm.py>        # what --signal=B:USR1@300 does near the time limit

``sbatch`` (in the foreground; prints ``fake_slurm: ...`` lines on stderr)
  * reads the script's ``#SBATCH`` lines, then the command line (which wins), as sbatch does;
    understood: ``-N/--nodes`` (``MIN-MAX``: MAX nodes first, MIN after a requeue, as a busier
    scheduler might give), ``--ntasks-per-node``, ``--gpus-per-node``, ``-c/--cpus-per-task``,
    ``-J/--job-name``, ``--requeue`` / ``--no-requeue``, ``--array=I`` (one index); every other
    option (``--time=...``, ``--signal=...``, ``--output=...``, ``-p PART``, ``-A ACCT``) is accepted
    and ignored (long ones in the ``--opt=value`` form);
  * runs a copy of the script from a spool directory (as slurmd does: the script is not where it was
    submitted from) with the batch-step environment: ``SLURM_JOB_ID``, ``SLURM_JOB_NAME``,
    ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``, ``SLURM_JOB_NUM_NODES`` / ``SLURM_NNODES``,
    ``SLURM_NTASKS``, ``SLURM_NTASKS_PER_NODE``, ``SLURM_TASKS_PER_NODE``, ``SLURM_CPUS_PER_TASK``,
    ``SLURM_GPUS_PER_NODE``, ``SLURM_SUBMIT_DIR``, ``SLURM_RESTART_COUNT``, and ``SLURM_PROCID`` /
    ``SLURM_LOCALID`` / ``SLURM_NODEID`` = 0 (the batch step is task 0 of node 0: a script that reads
    them instead of leaving them to srun gets every rank wrong);
  * node *i* is the loopback address ``127.0.0.<i+1>`` (nodelist ``127.0.0.[1-N]``): a distinct,
    resolvable host name per node;
  * job id: ``FAKE_SLURM_JOB_ID``, else a random one whose derived port ``20000 + id % 20000`` is free;
  * SIGUSR1 / SIGUSR2 go to the batch shell only (``--signal=B:...``); SIGTERM / SIGINT go to the batch
    shell as SIGTERM (scancel, preemption);
  * ``scontrol requeue`` marks the job; when the batch script has exited, a marked job is run again
    with the same id and ``SLURM_RESTART_COUNT`` + 1 (at most ``FAKE_SLURM_MAX_RESTARTS``, default 3);
    the exit status is the last run's.

``srun`` (inside such a job)
  * ``-N/--nodes`` (default: all of the job's), ``--ntasks-per-node`` (default: the job's, else 1),
    ``-n/--ntasks`` (must equal nodes x tasks per node), ``-c/--cpus-per-task``, ``-K/--kill-on-bad-exit[=0|1]``;
    ``--cpu-bind``, ``--mpi``, ``--export=ALL``, ``-l/--label`` and ``--unbuffered`` are accepted and ignored;
    anything else (``--container-image``, ...) is refused;
  * starts nodes x tasks-per-node tasks, block distribution (task = node x per node + local), each in a
    session of its own, with ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURMD_NODENAME``,
    ``SLURM_NTASKS``, ``SLURM_NPROCS``, ``SLURM_NNODES``, ``SLURM_NTASKS_PER_NODE``, ``SLURM_TASKS_PER_NODE``,
    ``SLURM_STEP_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_STEP_NUM_NODES``, ``SLURM_STEP_NUM_TASKS``,
    ``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_GTIDS``; with ``--gpus-per-node=G`` every task of node *i* sees
    that node's G GPUs (physical GPUs ``i*G .. i*G+G-1``, renumbered from 0 as under a cgroup:
    ``CUDA_VISIBLE_DEVICES``); without it, no GPU (``CUDA_VISIBLE_DEVICES=`` on a machine that has some);
    the GPUs handed out are ``FAKE_SLURM_GPUS`` (e.g. ``0,1``; pretended ones work too), else nvidia-smi's;
    ``FAKE_SLURM_NCCL_HOSTID=1`` gives each node's tasks ``NCCL_HOSTID=<node>``: NCCL then treats the
    nodes as separate hosts and uses its network transport between them, as across real nodes;
  * forwards SIGUSR1, SIGUSR2, SIGTERM, SIGHUP, SIGQUIT, SIGCONT and SIGINT to every process of every
    task (slurmstepd signals the whole step);
  * ``--kill-on-bad-exit=1``: the first task that exits non-zero or by a signal ends the step: the others
    get SIGCONT + SIGTERM, then SIGKILL after ``FAKE_SLURM_KILL_WAIT`` seconds (default 30, SLURM's
    ``KillWait``). Note that this includes an exit with 75 (train.py's "checkpointed, resume me");
  * exit status as srun's: 128 + the highest signal if any task died of a signal, else the highest
    exit code; a line ``srun: error: <node>: task <i>: Exited with exit code <n>`` per failed task.

``scontrol show hostnames [LIST]`` expands a host list (default ``$SLURM_JOB_NODELIST``);
``scontrol requeue JOBID`` marks the job (refused with ``--no-requeue``).

Not emulated: queueing, time limits (send the signal yourself), CPU binding, memory limits, job arrays
beyond one index, heterogeneous jobs, containers.
"""
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

STATE = "FAKE_SLURM_DIR"  # the job's state directory, in the environment of everything the job runs
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCONT,
             signal.SIGINT)


def fail(tool: str, message: str, code: int = 1):
    print(f"{tool}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ---- host lists -------------------------------------------------------------------------------------
def expand_hostlist(hostlist: str) -> list:
    """``"gpu-[07-08,11],login"`` -> ``["gpu-07", "gpu-08", "gpu-11", "login"]`` (zero padding kept)."""
    items = re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", hostlist)
    hosts = []
    for item in filter(None, items):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
        if "[" in suffix:
            raise ValueError(f"host list {hostlist!r}: one bracket group per name is emulated")
    return hosts


def node_names(n: int) -> tuple:
    """The emulated nodes (``127.0.0.1`` ...) and their host list."""
    return [f"127.0.0.{i + 1}" for i in range(n)], "127.0.0.1" if n == 1 else f"127.0.0.[1-{n}]"


def tasks_per_node_string(per_node: int, nodes: int) -> str:
    return f"{per_node}(x{nodes})" if nodes > 1 else str(per_node)


def physical_gpus() -> list:
    """GPU indices this machine offers (honouring CUDA_VISIBLE_DEVICES), without importing torch."""
    if "FAKE_SLURM_GPUS" in os.environ:  # set by sbatch for the job's sruns
        return [g for g in os.environ["FAKE_SLURM_GPUS"].split(",") if g]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


# ---- option parsing ---------------------------------------------------------------------------------
def parse_options(args: list, spec: dict, tool: str, strict: bool) -> tuple:
    """Leading options of ``args`` -> ({name: value}, rest). ``spec``: option -> (name, takes_value);
    a flag without a value stores True, ``--opt=0`` stores "0". Unknown options: refused when
    ``strict``, else skipped (with their ``=value``; a separate value cannot be told from the script)."""
    found, i = {}, 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        if args[i] == "--":
            i += 1
            break
        opt, eq, value = args[i].partition("=")
        if opt not in spec:
            if strict:
                fail(tool, f"option {opt} is not emulated by tests/fake_slurm.py")
            i += 1
            continue
        name, takes_value = spec[opt]
        if takes_value and not eq:
            if i + 1 >= len(args):
                fail(tool, f"option {opt} needs a value")
            value, i = args[i + 1], i + 1
        found[name] = value if (takes_value or eq) else True
        i += 1
    return found, args[i:]


SBATCH_OPTIONS = {
    "-N": ("nodes", True), "--nodes": ("nodes", True), "--ntasks-per-node": ("ntasks_per_node", True),
    "--gpus-per-node": ("gpus_per_node", True), "-c": ("cpus_per_task", True),
    "--cpus-per-task": ("cpus_per_task", True),
    "-J": ("job_name", True), "--job-name": ("job_name", True), "--requeue": ("requeue", False),
    "--no-requeue": ("no_requeue", False), "--array": ("array", True), "-a": ("array", True),
}
SBATCH_IGNORED_WITH_VALUE = ("-p", "-A", "-t", "-o", "-e", "-d", "--export")


def sbatch_header(script: str) -> list:
    """The ``#SBATCH`` options of a script, up to its first command (sbatch stops reading there)."""
    options = []
    with open(script) as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("#SBATCH"):
                options += shlex.split(stripped[len("#SBATCH"):])
            elif stripped and not stripped.startswith("#"):
                break
    return options


def strip_ignored(args: list) -> list:
    """Drop the short sbatch options that take a separate value and are not emulated (``-p gpu``)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in SBATCH_IGNORED_WITH_VALUE:
            skip = True
        else:
            out.append(arg)
    return out


def free_job_id() -> int:
    """A job id whose port as slurm/common.sh derives it (20000 + id % 20000) is free here."""
    for _ in range(200):
        job_id = random.randint(100_000, 999_999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 20000))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 20000-39999")


# ---- sbatch -----------------------------------------------------------------------------------------
def sbatch(argv: list) -> int:
    cli = strip_ignored(argv)
    first = 0
    while first < len(cli) and cli[first].startswith("-"):  # the script is the first non-option argument
        first += 2 if "=" not in cli[first] and SBATCH_OPTIONS.get(cli[first], (None, False))[1] else 1
    if first >= len(cli):
        fail("sbatch", "no batch script given")
    script, script_args = cli[first], cli[first + 1:]
    if not os.path.isfile(script):
        fail("sbatch", f"unable to open file {script}")
    opts, _ = parse_options(strip_ignored(sbatch_header(script)), SBATCH_OPTIONS, "sbatch", strict=False)
    cli_opts, _ = parse_options(cli[:first], SBATCH_OPTIONS, "sbatch", strict=False)
    opts.update(cli_opts)
    lo, _, hi = str(opts.get("nodes", "1")).partition("-")
    nodes_first, nodes_requeued = int(hi or lo), int(lo)
    per_node = int(opts["ntasks_per_node"]) if "ntasks_per_node" in opts else None
    gpus_per_node = int(str(opts["gpus_per_node"]).rsplit(":", 1)[-1]) if "gpus_per_node" in opts else 0
    requeue = not opts.get("no_requeue", False)
    job_id = int(os.environ.get("FAKE_SLURM_JOB_ID") or free_job_id())
    job_name = opts.get("job_name", os.path.basename(script))
    gpus = physical_gpus()
    if gpus_per_node and gpus and nodes_first * gpus_per_node > len(gpus):
        fail("sbatch", f"{nodes_first} node(s) x {gpus_per_node} GPU(s) asked for, this machine has {len(gpus)}: "
                       f"pass --gpus-per-node={len(gpus) // nodes_first or 1} or fewer nodes")
    if gpus_per_node and not gpus:
        print(f"fake_slurm: no GPU here; --gpus-per-node={gpus_per_node} ignored (tasks run on the CPU)",
              file=sys.stderr, flush=True)
        gpus_per_node = 0

    state = tempfile.mkdtemp(prefix=f"fake_slurm_{job_id}_")
    spool = os.path.join(state, "slurm_script")
    shutil.copy(script, spool)
    bin_dir = os.path.join(state, "bin")
    os.makedirs(bin_dir)
    for tool in ("srun", "scontrol"):
        path = os.path.join(bin_dir, tool)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} "
                    f"{tool} \"$@\"\n")
        os.chmod(path, 0o755)
    with open(os.path.join(state, "job.json"), "w") as f:
        json.dump({"job_id": job_id, "requeue": requeue}, f)

    restarts, max_restarts, rc = 0, int(os.environ.get("FAKE_SLURM_MAX_RESTARTS", "3")), 0
    try:
        while True:
            nodes = nodes_first if restarts == 0 else nodes_requeued
            hosts, hostlist = node_names(nodes)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_"))}
            env.update({
                "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": job_name,
                "SLURM_JOB_NODELIST": hostlist, "SLURM_NODELIST": hostlist, "SLURM_JOB_NUM_NODES": str(nodes),
                "SLURM_NNODES": str(nodes), "SLURM_SUBMIT_DIR": os.getcwd(), "SLURM_SUBMIT_HOST": socket.gethostname(),
                "SLURM_CLUSTER_NAME": "fake", "SLURM_JOB_PARTITION": "fake", "SLURM_RESTART_COUNT": str(restarts),
                "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURMD_NODENAME": hosts[0],
                "SLURM_TASKS_PER_NODE": tasks_per_node_string(per_node or 1, nodes),
                "SLURM_NTASKS": str(nodes * (per_node or 1)), "SLURM_NPROCS": str(nodes * (per_node or 1)),
                STATE: state, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            })
            if per_node:
                env["SLURM_NTASKS_PER_NODE"] = str(per_node)
            if "cpus_per_task" in opts:
                env["SLURM_CPUS_PER_TASK"] = str(opts["cpus_per_task"])
            if "array" in opts:
                if not str(opts["array"]).isdigit():
                    fail("sbatch", f"--array={opts['array']}: only one index is emulated (e.g. --array=2)")
                env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=str(opts["array"]))
            if gpus_per_node:
                env.update(SLURM_GPUS_PER_NODE=str(gpus_per_node), FAKE_SLURM_GPUS=",".join(gpus),
                           CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus_per_node)))
            elif gpus:
                env["CUDA_VISIBLE_DEVICES"] = ""
            print(f"fake_slurm: job {job_id} ({job_name}) {'requeued, ' if restarts else ''}on {nodes} node(s) "
                  f"{hostlist}: bash {script} {shlex.join(script_args)}", file=sys.stderr, flush=True)
            rc = _run_batch(["bash", spool, *script_args], env)
            print(f"fake_slurm: job {job_id}: batch script exited {rc}", file=sys.stderr, flush=True)
            marker = os.path.join(state, "requeue")
            if not os.path.exists(marker):
                return rc
            os.remove(marker)
            if restarts >= max_restarts:
                print(f"fake_slurm: job {job_id}: requeued {restarts} times already; not again", file=sys.stderr)
                return rc
            restarts += 1
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _run_batch(cmd: list, env: dict) -> int:
    """Run the batch script; forward signals as SLURM delivers them to a batch job."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def to_batch_shell(signum, frame):
        sig = signum if signum in (signal.SIGUSR1, signal.SIGUSR2) else signal.SIGTERM
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    previous = {s: signal.signal(s, to_batch_shell) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM,
                                                              signal.SIGINT)}
    try:
        while proc.poll() is None:
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


# ---- srun -------------------------------------------------------------------------------------------
SRUN_OPTIONS = {
    "-N": ("nodes", True), "--nodes": ("nodes", True), "--ntasks-per-node": ("ntasks_per_node", True),
    "-n": ("ntasks", True), "--ntasks": ("ntasks", True), "-c": ("cpus_per_task", True),
    "--cpus-per-task": ("cpus_per_task", True), "-K": ("kill_on_bad_exit", False),
    "--kill-on-bad-exit": ("kill_on_bad_exit", False), "--cpu-bind": ("ignored", True), "--mpi": ("ignored", True),
    "--export": ("export", True), "-l": ("ignored", False), "--label": ("ignored", False),
    "-u": ("ignored", False), "--unbuffered": ("ignored", False),
}


def srun(argv: list) -> int:
    if STATE not in os.environ or "SLURM_JOB_ID" not in os.environ:
        fail("srun", "not inside a job of tests/fake_slurm.py sbatch")
    opts, command = parse_options(argv, SRUN_OPTIONS, "srun", strict=True)
    if not command:
        fail("srun", "no command given")
    if opts.get("export", "ALL") != "ALL":
        fail("srun", "only --export=ALL is emulated")
    hosts = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
    nodes = int(opts.get("nodes", len(hosts)))
    if nodes > len(hosts):
        fail("srun", f"only allocated {len(hosts)} nodes asked for {nodes}")
    per_node = int(opts.get("ntasks_per_node", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
    ntasks = nodes * per_node
    if "ntasks" in opts and int(opts["ntasks"]) != ntasks:
        fail("srun", f"--ntasks={opts['ntasks']} differs from {nodes} nodes x {per_node}: not emulated")
    kill_on_bad_exit = str(opts.get("kill_on_bad_exit", "0")) not in ("0", "")
    step = _next_step_id()
    job = os.environ["SLURM_JOB_ID"]
    step_hosts = hosts[:nodes]
    _, step_hostlist = node_names(nodes)
    gpus_per_node = int(os.environ.get("SLURM_GPUS_PER_NODE", "0") or 0)
    gpus = physical_gpus() if gpus_per_node else []

    tasks = []

    def forward(signum, frame):
        for task in tasks:
            if task["proc"].poll() is None:
                _signal_task(task, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for node in range(nodes):
        for local in range(per_node):
            rank = node * per_node + local
            env = dict(os.environ)
            env.update({
                "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
                "SLURMD_NODENAME": step_hosts[node], "SLURM_TOPOLOGY_ADDR": step_hosts[node],
                "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_NNODES": str(nodes),
                "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_TASKS_PER_NODE": tasks_per_node_string(per_node, nodes),
                "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step), "SLURM_STEP_NODELIST": step_hostlist,
                "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NUM_TASKS": str(ntasks),
                "SLURM_STEP_TASKS_PER_NODE": tasks_per_node_string(per_node, nodes),
                "SLURM_GTIDS": ",".join(str(node * per_node + i) for i in range(per_node)),
            })
            if "cpus_per_task" in opts:
                env["SLURM_CPUS_PER_TASK"] = str(opts["cpus_per_task"])
            if gpus_per_node:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[node * gpus_per_node:(node + 1) * gpus_per_node])
            if os.environ.get("FAKE_SLURM_NCCL_HOSTID") == "1":
                env["NCCL_HOSTID"] = step_hosts[node]
            tasks.append({"rank": rank, "host": step_hosts[node],
                          "proc": subprocess.Popen(command, env=env, start_new_session=True)})

    kill_wait = float(os.environ.get("FAKE_SLURM_KILL_WAIT", "30"))
    terminating_since, codes, signals = None, [0], []
    live = list(tasks)
    while live:
        time.sleep(0.02)
        for task in [t for t in live if t["proc"].poll() is not None]:
            live.remove(task)
            code = task["proc"].returncode
            if code < 0:
                signals.append(-code)
                if terminating_since is None:
                    print(f"srun: error: {task['host']}: task {task['rank']}: {signal.Signals(-code).name}",
                          file=sys.stderr, flush=True)
            elif code:
                codes.append(code)
                print(f"srun: error: {task['host']}: task {task['rank']}: Exited with exit code {code}",
                      file=sys.stderr, flush=True)
            if code and kill_on_bad_exit and terminating_since is None and live:
                print(f"srun: Terminating StepId={job}.{step}", file=sys.stderr, flush=True)
                terminating_since = time.time()
                for other in live:
                    _signal_task(other, signal.SIGCONT)
                    _signal_task(other, signal.SIGTERM)
        if terminating_since is not None and time.time() - terminating_since > kill_wait:
            for other in live:
                _signal_task(other, signal.SIGKILL)
            kill_wait = float("inf")
    # srun's rule: a task killed by a signal outranks any exit code; the highest signal wins
    return 128 + max(signals) if signals else max(codes)


def _signal_task(task: dict, sig) -> None:
    try:
        os.killpg(task["proc"].pid, sig)
    except ProcessLookupError:
        pass


def _next_step_id() -> int:
    path = os.path.join(os.environ[STATE], "steps")
    step = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(step + 1))
    return step


# ---- scontrol ---------------------------------------------------------------------------------------
def scontrol(argv: list) -> int:
    if argv[:2] == ["show", "hostnames"]:
        hostlist = argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST")
        if not hostlist:
            fail("scontrol", "no host list given and SLURM_JOB_NODELIST is unset")
        print("\n".join(expand_hostlist(hostlist)))
        return 0
    if len(argv) == 2 and argv[0] == "requeue":
        if STATE not in os.environ:
            fail("scontrol", "not inside a job of tests/fake_slurm.py sbatch")
        with open(os.path.join(os.environ[STATE], "job.json")) as f:
            job = json.load(f)
        if argv[1] != str(job["job_id"]):
            fail("scontrol", f"Invalid job id specified for job {argv[1]}")
        if not job["requeue"]:
            print(f"Requested operation is presently disabled for job {argv[1]}", file=sys.stderr)
            return 1
        open(os.path.join(os.environ[STATE], "requeue"), "w").close()
        return 0
    fail("scontrol", f"`scontrol {shlex.join(argv)}`: only `show hostnames` and `requeue JOBID` are emulated")


def main(argv: list) -> int:
    tools = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol}
    if not argv or argv[0] not in tools:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print("usage: fake_slurm.py {sbatch|srun|scontrol} ARGS...", file=sys.stderr)
        return 2
    return tools[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
