"""Launching training: detectron2's launcher, or torchrun's (torch.distributed.elastic)
environment; a collective timeout the user sets; resuming after torchrun restarted the job.

``tools/train_net.py`` runs under both:

- detectron2's :func:`detectron2.engine.launch` (``--num-gpus``, ``--num-machines``,
  ``--machine-rank``, ``--dist-url``) spawns one process per GPU on each machine; when one dies,
  the others fail and nothing restarts the job.
- ``torchrun`` starts the processes itself and describes them in the environment (``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); when
  one dies it stops all of them and starts them again, up to ``--max-restarts`` times, and a
  restarted job resumes from the last checkpoint by itself (:func:`resume_or_load`).
"""

import argparse
import functools
import logging
import os
import re
import sys
import time
import uuid
from datetime import timedelta
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from detectron2.engine import default_argument_parser
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

__all__ = [
    "DEFAULT_TIMEOUT",
    "LostPeerError",
    "TorchrunEnv",
    "argument_parser",
    "launch",
    "restart_count",
    "restarts_unsupported",
    "resume_or_load",
    "torchrun_env",
]

logger = logging.getLogger(__name__)

# What torchrun (and torch.distributed.launch --use-env) sets for every worker; init_method
# "env://" reads the last four.
_TORCHRUN_VARS = (
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# The variable torch >= 2.2 reads, and its older name (still read, with a deprecation warning).
_NCCL_ASYNC = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")

_EPILOG = """
Examples:

One machine, 8 GPUs (detectron2's launcher, or torchrun):
    $ {prog} --num-gpus 8 --config-file cfg.yaml
    $ torchrun --nproc-per-node 8 {prog} --config-file cfg.yaml

Several machines with detectron2's launcher (a dead machine ends the job):
    (machine0)$ {prog} --machine-rank 0 --num-machines 2 --dist-url tcp://HOST0:PORT \\
                    --dist-timeout 600 [--other-flags]
    (machine1)$ {prog} --machine-rank 1 --num-machines 2 --dist-url tcp://HOST0:PORT \\
                    --dist-timeout 600 [--other-flags]

Several machines with torchrun (restarts the job from its last checkpoint up to
--max-restarts times; with torch < 2.4 only the static rendezvous shown here can restart):
    (machine0)$ torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --max-restarts 3 \\
                    --master-addr HOST0 --master-port PORT {prog} --dist-timeout 600 [...]
    (machine1)$ torchrun --nnodes 2 --node-rank 1 --nproc-per-node 8 --max-restarts 3 \\
                    --master-addr HOST0 --master-port PORT {prog} --dist-timeout 600 [...]
"""


def argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """detectron2's :func:`default_argument_parser` plus ``--dist-timeout SECONDS``, the
    collective timeout (see :func:`launch`); its epilog also shows how to run under torchrun."""
    parser = default_argument_parser(epilog or _EPILOG.format(prog=sys.argv[0]))
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT.total_seconds(),
        metavar="SECONDS",
        help="how long a process waits in a collective (and for the other machines to join at "
        "the start) before it fails; default %(default)g (detectron2's 30 minutes). A dead or "
        "unreachable peer is detected after that long, so a shorter timeout ends a broken job "
        "sooner; but the slowest legitimate wait must fit in it: the other ranks wait while "
        "rank 0 runs the COCO evaluation, and a first iteration (cudnn benchmark) is slow.",
    )
    return parser


class TorchrunEnv(NamedTuple):
    """The process group as torchrun describes it in the environment."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    restart_count: int  # TORCHELASTIC_RESTART_COUNT: this node's agent's restarts so far


def torchrun_env(environ=None) -> Optional[TorchrunEnv]:
    """The process group torchrun set up (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` all set), or None without torchrun.

    Raises:
        ValueError: the ranks are not laid out as detectron2 needs (the same number of processes
            on every machine, numbered machine by machine).
    """
    environ = os.environ if environ is None else environ
    if not all(v in environ for v in _TORCHRUN_VARS):
        return None
    env = TorchrunEnv(
        rank=int(environ["RANK"]),
        local_rank=int(environ["LOCAL_RANK"]),
        world_size=int(environ["WORLD_SIZE"]),
        local_world_size=int(environ["LOCAL_WORLD_SIZE"]),
        restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    )
    if env.world_size % env.local_world_size or (env.rank % env.local_world_size != env.local_rank):
        raise ValueError(
            f"torchrun started rank {env.rank} of {env.world_size} as local rank "
            f"{env.local_rank} of {env.local_world_size}: detectron2 needs the same "
            "--nproc-per-node on every node."
        )
    return env


class LostPeerError(RuntimeError):
    """A collective failed: another process of the job died, became unreachable, or did not
    answer within the collective timeout."""


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):  # DistBackendError (NCCL), DistNetworkError, ...
        return True
    # GLOO's errors are plain RuntimeErrors that name its source file
    # ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer ...");
    # NCCL's name NCCL.
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("gloo/", "NCCL"))


def _reporting_lost_peers(main_func: Callable, timeout: timedelta, *args):
    """``main_func(*args)``; a failed collective in a job of several processes becomes a
    :class:`LostPeerError` that says so, names the timeout and what to do."""
    try:
        return main_func(*args)
    except Exception as e:
        if comm.get_world_size() < 2 or not _is_collective_failure(e):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if re.search("timed out|timeout", first_line, re.IGNORECASE):
            what = f"timed out after {timeout.total_seconds():g} s (--dist-timeout)"
        else:
            what = "lost a peer"
        then = (
            "torchrun restarts the job from its last checkpoint if --max-restarts allows, "
            "otherwise rerun it with --resume"
            if torchrun_env()
            else "rerun it with --resume to continue from its last checkpoint"
        )
        message = (
            f"Rank {comm.get_rank()} {what} in a collective: {first_line}. Another process of "
            f"the job died or stopped answering; {then}."
        )
        logger.error(message)
        raise LostPeerError(message) from e


def settle_collectives(seconds: float = 0.1) -> None:
    """End this process's part of a finished job: wait for every rank, then let the collectives'
    threads finish freeing their tensors before the interpreter exits.

    A GLOO worker thread frees a collective's tensors after the collective has returned, and
    freeing a tensor made in Python takes the GIL. If that happens while the interpreter is
    exiting, Python ends the thread mid-destructor and the process aborts ("terminate called
    without an active exception", SIGABRT): a finished job fails (8 of 70 runs of two processes
    whose last act was an ``all_gather``; 1 of 80 with a barrier after it). Here the barrier's
    own work is the last, and ``seconds`` of sleep without the GIL let the thread free it and
    what it holds. Destroying the process group instead deadlocks on torch 2.3: its destructor
    holds the GIL while it waits for that thread (released upstream by pytorch/pytorch#154976).

    A collective: every rank must call it. Nothing happens without a process group.
    """
    if not dist.is_initialized():
        return
    comm.synchronize()
    time.sleep(seconds)


def _finished_job(main_func: Callable, timeout: timedelta, *args):
    result = _reporting_lost_peers(main_func, timeout, *args)
    settle_collectives()
    return result


def _enable_nccl_async_error_handling():
    # With it, NCCL's watchdog ends a process whose collective failed or timed out instead of
    # leaving it blocked: survivors of a dead peer exit, and torchrun can restart them. It must
    # be set before the process group is created; the user's own setting (either name) wins.
    if not any(v in os.environ for v in _NCCL_ASYNC):
        os.environ[_NCCL_ASYNC[0]] = "1"


def launch(main_func: Callable, args: argparse.Namespace):
    """Run ``main_func(args)`` in every process of the job, with the collective timeout
    ``args.dist_timeout`` (seconds).

    Under torchrun (see :func:`torchrun_env`), this process is one worker: it joins the process
    group that torchrun describes (GLOO on the CPU, NCCL on GPUs, ``init_method="env://"``)
    and detectron2's per-machine group, and ``--num-gpus``, ``--num-machines``,
    ``--machine-rank`` and ``--dist-url`` are not used. Otherwise detectron2's
    :func:`~detectron2.engine.launch` spawns ``--num-gpus`` processes, exactly as
    detectron2's tools/train_net.py does.

    Either way NCCL's asynchronous error handling is enabled (``TORCH_NCCL_ASYNC_ERROR_HANDLING
    =1`` unless set), and a collective that fails because a peer died or timed out raises
    :class:`LostPeerError`. When ``main_func`` returns, :func:`settle_collectives` ends the
    process's collectives.

    Raises:
        ValueError: under torchrun, ``--num-gpus`` or ``--num-machines`` contradict it.
    """
    timeout = timedelta(seconds=args.dist_timeout)
    _enable_nccl_async_error_handling()
    env = torchrun_env()
    if env is None:
        return detectron2_launch(
            functools.partial(_finished_job, main_func, timeout),
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=timeout,
        )
    num_machines = env.world_size // env.local_world_size
    for flag, given, actual in (
        ("--num-gpus", args.num_gpus, env.local_world_size),
        ("--num-machines", args.num_machines, num_machines),
    ):
        if given not in (1, actual):
            raise ValueError(
                f"{flag} {given} under torchrun, which started {env.local_world_size} "
                f"process(es) on each of {num_machines} node(s): torchrun's --nproc-per-node "
                f"and --nnodes set them; drop {flag}."
            )
    return _torchrun_worker(main_func, args, env, timeout)


def restarts_unsupported(environ=None) -> Optional[str]:
    """Why torchrun's ``--max-restarts`` cannot work in this job, or None.

    torch < 2.4 closes a dynamic rendezvous (``--rdzv-backend c10d`` or ``etcd``, also
    ``--standalone``) when it stops the workers to restart them, so every agent then fails with
    ``RendezvousClosedError`` instead of restarting (pytorch/pytorch#123678, fixed by #124819).
    The static rendezvous (``--node-rank``, ``--master-addr``, ``--master-port``, torchrun's
    default without ``--rdzv-backend``) restarts. With torch >= 2.4 both restart (each attempt
    of the job under its own prefix of the agent's store: :func:`_attempt_store`).
    """
    environ = os.environ if environ is None else environ
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    # torch < 2.4 shares the agent's store with the workers under the static backend alone.
    dynamic = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "False"
    if restarts > 0 and dynamic and _torch_version() < (2, 4):
        return (
            f"torchrun --max-restarts {restarts} cannot restart this job: torch "
            f"{torch.__version__} closes a c10d/etcd rendezvous (also --standalone) when it "
            "restarts the workers, and then fails with RendezvousClosedError "
            "(pytorch/pytorch#123678, fixed in torch 2.4). Use the static rendezvous instead: "
            "torchrun --nnodes N --node-rank I --master-addr HOST0 --master-port PORT, "
            "without --rdzv-backend or --standalone."
        )
    return None


def _torch_version():
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _torchrun_worker(main_func, args, env: TorchrunEnv, timeout: timedelta):
    problem = restarts_unsupported()
    if problem and env.local_rank == 0:
        logger.warning(problem)  # no handler yet: Python prints it on stderr
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if has_gpu else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = _attempt_store(env, timeout)
        dist.init_process_group(
            backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
        )
    else:  # rank 0 hosts the store, at a port the agents chose afresh for this attempt
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    comm.create_local_process_group(env.local_world_size)
    comm.synchronize()
    return _finished_job(main_func, timeout, args)


def _attempt_store(env: TorchrunEnv, timeout: timedelta, poll: float = 0.2) -> dist.Store:
    """The agent's store (``MASTER_ADDR:MASTER_PORT``) under a prefix that only this attempt
    of the job uses, one that all its ranks agree on.

    torchrun's agent keeps that store across restarts (the static rendezvous; the c10d one
    too since torch shares its store with the workers), so it still holds what the processes
    of a dead attempt wrote: a restarted process that reads it looks for the dead ones'
    addresses and hangs. torch 2.3 put each attempt under ``TORCHELASTIC_RESTART_COUNT``;
    current torch uses no prefix. That count is each node's own, though: under the c10d
    rendezvous an agent whose workers were still running when another node's failed restarts
    them as a membership change, without counting it (pytorch/pytorch#135712), so the ranks
    of one attempt can hold different counts and would wait under different prefixes. Hence
    rank 0 names the attempt with a fresh random id; every other rank reads the name, joins
    under it, and waits for rank 0 to answer its own fresh token. A name left by a dead or
    stalled rank 0 gets no answer, so the rank reads the name again until the new rank 0 has
    set it.
    """
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    token = uuid.uuid4().hex
    if env.rank == 0:
        client.set("dkd_det/attempt", token)
        joins = [f"dkd_det/{token}/join/{r}" for r in range(1, env.world_size)]
        client.wait(joins)  # every other rank of this attempt (the store's timeout)
        for key in joins:
            client.set(f"dkd_det/{token}/ok/{client.get(key).decode()}", "")
        return dist.PrefixStore(f"dkd_det/{token}/", client)
    deadline = time.monotonic() + timeout.total_seconds()
    joined = None
    while True:
        attempt = client.get("dkd_det/attempt").decode()  # waits for a first rank 0
        if attempt != joined:
            client.set(f"dkd_det/{attempt}/join/{env.rank}", token)
            joined = attempt
        if client.check([f"dkd_det/{attempt}/ok/{token}"]):
            return dist.PrefixStore(f"dkd_det/{attempt}/", client)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {env.rank}: rank 0 did not start within {timeout.total_seconds():g} s "
                "(--dist-timeout)"
            )
        time.sleep(poll)


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers: the largest
    ``TORCHELASTIC_RESTART_COUNT`` of all ranks, since each node's agent counts only the
    failures of its own workers (one that restarts because another node rejoined does not count
    it); 0 without torchrun.

    A collective: every rank must call it.
    """
    env = torchrun_env()
    return max(comm.all_gather(env.restart_count if env else 0))


def resume_or_load(trainer, resume: bool) -> None:
    """``trainer.resume_or_load(resume)``, and, when torchrun restarted the job
    (:func:`restart_count` > 0), resume as ``--resume`` does, logging
    ``restart N: resuming from <checkpoint> (iteration K)``.

    Every rank must call it. When resuming, every rank must see the same last checkpoint (the
    output directory shared by all machines), otherwise ranks would start from different
    iterations.

    Raises:
        RuntimeError: resuming, and the ranks see different last checkpoints.
    """
    restart = restart_count()
    resume = resume or restart > 0
    checkpointer = trainer.checkpointer
    last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
    if resume:
        # By name: a shared directory may be mounted at different paths on different machines.
        seen = comm.all_gather(os.path.basename(last) if last else None)
        if len(set(seen)) > 1:
            raise RuntimeError(
                f"Resuming, but the ranks see different last checkpoints in "
                f"{checkpointer.save_dir}: {seen} (rank by rank). OUTPUT_DIR must be a "
                "directory that every machine shares."
            )
    trainer.resume_or_load(resume=resume)
    if restart:
        if last is None:
            logger.info(
                "restart %d: no checkpoint in %s yet: training from iteration 0",
                restart,
                checkpointer.save_dir,
            )
        else:
            logger.info(
                "restart %d: resuming from %s (iteration %d)", restart, last, trainer.start_iter - 1
            )
