"""`sleepscale launch`: start `sleepscale train` on every device of every node, through a c10d rendezvous.

Run the same command on each node; the nodes find each other at `--rdzv-endpoint` (any host:port
the first node can listen on and every node can reach) and are numbered by the rendezvous. Inside,
this is torch's elastic agent (what `torchrun` runs) called in-process, so that this launcher
decides three things torchrun does not do the way a preemptible job needs:

- SIGUSR1 and SIGTERM are passed on to the training processes, which write a checkpoint at the
  next step boundary and exit 75; torchrun itself dies on SIGUSR1 and kills its workers 30 s after
  a SIGTERM whatever they are doing.
- The exit code is the trainer's when every failed rank agrees (75 preempted, 2 bad config,
  3 bad steps), 1 otherwise, so a batch script can tell "requeue me" from "broken".
- A failed rank is named in one line (rank, node, exit code) after the agent has stopped the other
  local ranks; ranks on other nodes fail on their next collective with the dead peer.

The launcher holds no training logic: it only starts processes and reports how they ended.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass

from sleepscale.config import ConfigError

EXIT_FAILED = 1
# The trainer's own exit codes (sleepscale.train.trainer); passed through when all failed ranks agree.
TRAINER_EXIT_CODES = {
    2: "bad configuration or data",
    3: "too many bad steps",
    75: "stopped by signal after a checkpoint",
}
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class LaunchError(ConfigError):
    """A launcher argument that cannot work; the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class LaunchPlan:
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    rdzv_id: str
    threads_per_process: int
    command: list[str]  # what every rank runs, as an argv list (never a shell string)


def plan(args) -> LaunchPlan:
    """Checks the arguments and decides everything the launch needs, without starting anything."""
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes {args.nnodes}: must be >= 1")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node {args.nproc_per_node}: must be >= 1")
    endpoint = args.rdzv_endpoint
    if endpoint is None:
        if args.nnodes > 1:
            raise LaunchError("--rdzv-endpoint HOST:PORT is required with --nnodes > 1 (the same on every node)")
        endpoint = f"127.0.0.1:{_free_port()}"
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--rdzv-endpoint {endpoint!r}: give HOST:PORT, e.g. node001:29500")
    nproc = args.nproc_per_node if args.nproc_per_node is not None else _devices()  # imports torch: last
    rdzv_id = args.rdzv_id or os.environ.get("SLURM_JOB_ID") or "sleepscale"
    threads = (
        int(os.environ["OMP_NUM_THREADS"])
        if os.environ.get("OMP_NUM_THREADS", "").isdigit()
        else max(1, _cpus() // nproc)
    )
    command = [sys.executable, "-u", "-m", "sleepscale.cli", "train", args.config, *args.overrides]
    return LaunchPlan(args.nnodes, nproc, endpoint, rdzv_id, threads, command)


def launch(args) -> int:
    """Runs the plan; returns the exit code for the process (see the module docstring)."""
    the_plan = plan(args)  # argument errors first, before the slow imports
    # torch's elastic agent, ~2 s: only once the arguments are good (`sleepscale --help` loads this module)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # ~2 s: see above
    from torch.distributed.elastic.rendezvous import RendezvousError  # ~2 s: see above
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # ~2 s: see above

    # Every rank inherits this; torch would otherwise use all cores in each of several processes.
    os.environ["OMP_NUM_THREADS"] = str(the_plan.threads_per_process)
    config = LaunchConfig(
        min_nodes=the_plan.nnodes,
        max_nodes=the_plan.nnodes,
        nproc_per_node=the_plan.nproc_per_node,
        run_id=the_plan.rdzv_id,
        rdzv_backend="c10d",
        rdzv_endpoint=the_plan.rdzv_endpoint,
        rdzv_configs={"timeout": args.rdzv_timeout},
        max_restarts=0,  # a failed rank fails the job; resuming is the scheduler's (or the user's) restart
        start_method="spawn",
        # SIGTERM and SIGUSR1 are ours (forwarded, see _forward_stop_signals); the agent keeps the rest.
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",
        shutdown_timeout=args.stop_timeout,
        log_line_prefix_template="[rank${rank}]:" if args.log_dir else None,
        logs_specs=_logs_specs(args.log_dir),
    )
    _say(
        f"{the_plan.nnodes} node(s) x {the_plan.nproc_per_node} process(es) on {socket.gethostname()}, "
        f"rendezvous c10d at {the_plan.rdzv_endpoint} (id "
        f"{the_plan.rdzv_id}), OMP_NUM_THREADS={the_plan.threads_per_process}"
    )
    stop = _forward_stop_signals()
    try:
        elastic_launch(config, the_plan.command[0])(*the_plan.command[1:])
    except ChildFailedError as error:
        return _report_failures(error.failures, stop)
    except RendezvousError as error:
        # Also how a node learns that the node hosting the rendezvous store has gone (after a rank
        # failed there): the agents poll the store while their workers run.
        _say(
            f"rendezvous at {the_plan.rdzv_endpoint} failed or was lost ({type(error).__name__}: {error}); "
            "if training had started, the node hosting it has stopped, see its log; this node's ranks were stopped"
        )
        return EXIT_FAILED
    return 0


class _StopForwarder:
    """Passes SIGUSR1/SIGTERM on to the worker processes (this process's children) and remembers it.

    Under Slurm the workers usually get the signal themselves too (a step signal reaches every
    process of the step); a second copy is harmless: the trainer only sets a flag."""

    def __init__(self):
        self.received: list[str] = []

    def __call__(self, number, frame):
        import psutil  # ~30 ms: only when a stop signal comes (the CLI imports this module for every command)

        name = signal.Signals(number).name
        self.received.append(name)
        children = psutil.Process().children()
        for child in children:
            try:
                child.send_signal(number)
            except psutil.NoSuchProcess:
                pass
        _say(f"got {name}: passed it to {len(children)} training process(es) (checkpoint at the next step, then exit)")


def _forward_stop_signals() -> _StopForwarder:
    forwarder = _StopForwarder()
    for number in STOP_SIGNALS:
        signal.signal(number, forwarder)
    return forwarder


def _report_failures(failures: dict, stop: _StopForwarder) -> int:
    """The exit code the failed ranks agree on, or 1 with one line per failed rank, root cause first."""
    ordered = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    # A rank exits with a trainer code only after the run's last barrier, so by then every rank is
    # done; the agent SIGTERMs the slower ones on seeing the first exit, which may kill them while
    # Python shuts down (it restores default handlers). Those do not change the outcome.
    codes = {failure.exitcode for _, failure in ordered} - {-signal.SIGTERM}
    if len(codes) == 1 and (code := next(iter(codes))) in TRAINER_EXIT_CODES:
        ranks = ", ".join(str(rank) for rank, failure in sorted(ordered) if failure.exitcode == code)
        _say(f"rank(s) {ranks} on {socket.gethostname()} exited with code {code} ({TRAINER_EXIT_CODES[code]})")
        if code == 75 and not stop.received:
            _say("(no signal reached this launcher: the ranks were signalled directly)")
        return code
    for rank, failure in ordered:
        _say(
            f"rank {rank} (local rank {failure.local_rank} on {socket.gethostname()}, pid {failure.pid}) "
            f"{_describe_exit(failure.exitcode)}"
        )
    _say(
        "the job failed; the other ranks on this node were stopped (ranks on other nodes stop at their next collective)"
    )
    return EXIT_FAILED


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    meaning = TRAINER_EXIT_CODES.get(code)
    return f"exited with code {code}" + (f" ({meaning})" if meaning else "")


def _logs_specs(log_dir: str | None):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std  # torch, ~2 s: only to launch

    if log_dir is None:
        return DefaultLogsSpecs(log_dir=os.devnull)  # output goes to this process's stdout/stderr
    # Per rank files under log_dir/<rdzv id>/attempt_0/<local rank>/, and the console too, prefixed.
    return DefaultLogsSpecs(log_dir=log_dir, tee=Std.ALL)


def _devices() -> int:
    """One process per GPU; one on a machine without one."""
    import torch  # ~2 s: only without --nproc-per-node (the CLI imports this module for every command)

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by what Slurm granted the task."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    granted = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(granted)) if granted.isdigit() else cpus


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _say(message: str) -> None:
    print(f"sleepscale launch: {message}", file=sys.stderr, flush=True)


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config file (the same path must exist on every node)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sleep.passes=4")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="training processes per node (default: one per GPU; 1 without a GPU)",
    )
    parser.add_argument(
        "--rdzv-endpoint",
        default=None,
        help="HOST:PORT of the rendezvous, on the first node (default with one node: a free local port)",
    )
    parser.add_argument(
        "--rdzv-id", default=None, help="job id shared by all nodes (default: $SLURM_JOB_ID or 'sleepscale')"
    )
    parser.add_argument(
        "--rdzv-timeout", type=int, default=900, help="seconds to wait for all nodes to join (default 900)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=int,
        default=30,
        help="seconds the other ranks get to exit after one fails, before SIGKILL (default 30)",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="also write each rank's output to files under this directory (console lines get a [rankN]: prefix)",
    )
