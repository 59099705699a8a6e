"""Launching: detectron2's launcher and torchrun, a restarted torchrun job resuming by itself,
and a dead or frozen machine ending the others within the collective timeout."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dkd_det.engine import Trainer, argument_parser, launch, resume_or_load
from dkd_det.engine.launcher import torchrun_env

from helpers import (
    DKD_R18,
    ROOT,
    TINY,
    child_pids,
    free_port,
    make_cfg,
    process_env,
    run_tool,
    torchrun_cmd,
)

TRAIN = ["--config-file", DKD_R18]
_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
# Two processes share the 2 cores: one thread each (the same in every run that is compared).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _torchrun_environ(rank=0, local_rank=0, world=1, local_world=1, restarts=0):
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
        "TORCHELASTIC_RESTART_COUNT": str(restarts),
    }


def _set_environ(monkeypatch, environ):
    for k, v in environ.items():
        monkeypatch.setenv(k, v)


def test_flags_that_contradict_torchrun_are_refused(monkeypatch):
    """Under torchrun the processes are torchrun's: --num-gpus 8 with --nproc-per-node 1 would
    silently train on 1 process per node."""
    assert argument_parser().parse_args([]).dist_timeout == 1800  # detectron2's 30 minutes
    _set_environ(monkeypatch, _torchrun_environ())
    for flags, message in (
        (["--num-gpus", "8"], "--num-gpus 8 under torchrun, which started 1 process"),
        (["--num-machines", "2"], "--num-machines 2 under torchrun"),
    ):
        args = argument_parser().parse_args(flags + ["--dist-timeout", "30"])
        with pytest.raises(ValueError, match=message):
            launch(lambda a: pytest.fail("main ran"), args)
    # Ranks not numbered node by node (a different --nproc-per-node per node).
    with pytest.raises(ValueError, match="the same --nproc-per-node on every node"):
        torchrun_env(_torchrun_environ(rank=3, local_rank=0, world=4, local_world=2))
    assert torchrun_env({}) is None  # plain python: detectron2's launcher


def test_restarted_worker_resumes_without_the_flag(monkeypatch, tmp_path, dkd_opts, dataset_opts):
    """TORCHELASTIC_RESTART_COUNT > 0 resumes from the last checkpoint as --resume does, and
    says so; a first start (count 0) without --resume does not."""
    from dkd_det.data import register_coco_format

    cfg = make_cfg(DKD_R18, *dkd_opts, *dataset_opts, "OUTPUT_DIR", str(tmp_path))
    register_coco_format(cfg)
    trainer = Trainer(cfg)
    trainer.iter = 5  # as PeriodicCheckpointer saves it after iteration 5
    trainer.checkpointer.save("model_0000005", iteration=5)
    trainer.iter = 0
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("dkd_det.engine.launcher")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as tools/train_net.py's setup_logger("dkd_det") sets it
    try:
        _set_environ(monkeypatch, _torchrun_environ(restarts=0))
        resume_or_load(trainer, resume=False)
        assert trainer.start_iter == 0 and records == []
        _set_environ(monkeypatch, _torchrun_environ(restarts=1))
        resume_or_load(trainer, resume=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert trainer.start_iter == 6
    assert records == [f"restart 1: resuming from {tmp_path}/model_0000005.pth (iteration 5)"]


def _final_weights(out):
    return torch.load(os.path.join(out, "model_final.pth"))


@pytest.mark.slow
def test_two_processes_alike_under_detectron2_launch_and_torchrun(tmp_path, dkd_opts, dataset_opts):
    """The 2-iteration smoke run with two GLOO processes on the CPU: detectron2's launcher
    (--num-gpus 2) and torchrun --nproc-per-node 2 train the same model, weight for weight."""
    opts = TINY + dkd_opts + dataset_opts + ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "4"]
    runs = {}
    for name, prefix in (
        ("launch", ["--num-gpus", "2", "--dist-url", "auto"]),
        ("torchrun", None),
    ):
        out = str(tmp_path / name)
        if prefix is None:
            # --standalone: one node, a c10d rendezvous on a free port.
            cmd = torchrun_cmd("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
            run = subprocess.run(
                cmd + TRAIN + opts + ["OUTPUT_DIR", out],
                cwd=ROOT,
                env={**os.environ, **ONE_THREAD},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=300,
            )
        else:
            run = run_tool(
                "train_net.py", *prefix, *TRAIN, *opts, "OUTPUT_DIR", out, env=ONE_THREAD
            )
        assert run.returncode == 0, run.stdout[-3000:]
        assert "Rank of current process: 0. World size: 2" in run.stdout
        assert "copypaste: AP,AP50" in run.stdout
        assert "Teacher unchanged by training and identical on 2 rank(s)" in run.stdout
        runs[name] = _final_weights(out)
        assert runs[name]["iteration"] == 1
        if prefix is None and _TORCH < (2, 4):
            # A job that would fail at its first restart says so when it starts.
            assert "torchrun --max-restarts 1 cannot restart this job" in run.stdout
        assert not any("teacher" in k or k.startswith("module.") for k in runs[name]["model"])
    a, b = runs["launch"]["model"], runs["torchrun"]["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "torchrun trained a different model"


def _wait_for(predicate, procs, timeout, what):
    deadline = time.time() + timeout
    while not predicate():
        ended = [p.args[-1] for p in procs if p.poll() is not None]
        assert not ended and time.time() < deadline, f"no {what}; ended: {ended}"
        time.sleep(0.2)


def _read(path):
    return path.read_text() if path.exists() else ""


def _stop_all(procs):
    """SIGKILL each process of ``procs`` that still runs, and all its descendants: killing its
    process group would miss the workers that current torch's torchrun starts in sessions of
    their own. Each is stopped as it is found, so that none starts another meanwhile."""
    for p in procs:
        if p.poll() is None:
            tree = [p.pid]
            for pid in tree:  # grows while it is walked
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    continue
                tree += child_pids(pid)
            for pid in reversed(tree):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(
    tmp_path, dkd_opts, dataset_opts, rdzv
):
    """Two torchrun nodes of one process each, --max-restarts 1, with the static rendezvous
    (--node-rank, --master-addr, --master-port) or the c10d one; the worker of rank 0 (the one
    that writes checkpoints) is killed with SIGKILL after the checkpoint of iteration 3. The
    job restarts, resumes from that checkpoint by itself and ends as an uninterrupted run.
    Both rendezvous keep the agent's store across the restart (current torch), so the
    restarted workers must not read what the dead ones wrote there."""
    if rdzv == "c10d" and _TORCH < (2, 4):
        pytest.skip(
            "torch < 2.4 closes a c10d rendezvous when it restarts the workers and then fails "
            "(pytorch/pytorch#123678); restarts_unsupported warns of it"
        )
    out = tmp_path / "out"
    max_iter = 8
    opts = TINY + dkd_opts + dataset_opts
    opts += ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", str(max_iter)]
    opts += ["SOLVER.CHECKPOINT_PERIOD", "4"]
    port = free_port()
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = []
    try:
        for n in (0, 1):
            if rdzv == "static":
                where = f"--node-rank {n} --master-addr 127.0.0.1 --master-port {port}"
            else:  # the first agent hosts the rendezvous's store, the other connects to it
                where = f"--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id job"
            cmd = torchrun_cmd(
                *"--nnodes 2 --nproc-per-node 1 --max-restarts 1 --monitor-interval 1".split(),
                *where.split(),
            )
            with open(logs[n], "w") as log:
                procs.append(
                    subprocess.Popen(
                        cmd + TRAIN + opts,
                        cwd=ROOT,
                        env={**os.environ, **ONE_THREAD},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        tag = out / "last_checkpoint"
        _wait_for(lambda: _read(tag) == "model_0000003.pth", procs, 300, "checkpoint 3")
        time.sleep(0.5)  # into the iteration after it
        workers = [w for p in procs for w in child_pids(p.pid)]
        rank0 = [w for w in workers if process_env(w).get("RANK") == "0"]
        assert len(workers) == 2 and len(rank0) == 1, workers
        os.kill(rank0[0], signal.SIGKILL)
        tagged = tag.read_text()  # rank 0 is dead: nothing writes checkpoints until the restart
        resumed_at = int(torch.load(out / tagged)["iteration"])
        assert resumed_at < max_iter - 1 and not (out / "model_final.pth").exists()
        for p in procs:
            p.wait(timeout=400)
    finally:
        _stop_all(procs)
    text = "\n".join(log.read_text() for log in logs)
    assert [p.returncode for p in procs] == [0, 0], text[-5000:]
    assert f"restart 1: resuming from {out / tagged} (iteration {resumed_at})" in text
    assert f"Starting training from iteration {resumed_at + 1}" in text
    assert "copypaste: AP,AP50" in text  # the final COCO evaluation
    assert "Teacher unchanged by training and identical on 2 rank(s)" in text
    final = _final_weights(out)
    assert final["iteration"] == max_iter - 1
    assert not any("teacher" in k or k.startswith("module.") for k in final["model"])
    with open(out / "metrics.json") as f:
        iterations = [r["iteration"] for r in map(json.loads, f) if "total_loss" in r]
    assert iterations[-1] == max_iter - 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_dead_machine_ends_the_other_within_the_timeout(tmp_path, dkd_opts, dataset_opts, sig):
    """detectron2's launcher, two machines of one process each, --dist-timeout 15; after the
    checkpoint of iteration 1 of 400, machine 1 is killed (its sockets close) or frozen
    (SIGSTOP: what a machine that lost power or its network looks like to the others: nothing
    closes). Machine 0 exits non-zero well within a minute, saying it lost a peer or timed
    out."""
    out = tmp_path / "out"
    opts = TINY + dkd_opts + dataset_opts
    opts += ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "400", "SOLVER.CHECKPOINT_PERIOD", "2"]
    url = f"tcp://127.0.0.1:{free_port()}"
    logs = [tmp_path / f"machine{n}.log" for n in (0, 1)]
    procs = []
    try:
        for n in (0, 1):
            cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py")]
            cmd += f"--num-machines 2 --machine-rank {n} --dist-url {url}".split()
            cmd += ["--dist-timeout", "15"]
            with open(logs[n], "w") as log:
                procs.append(
                    subprocess.Popen(
                        cmd + TRAIN + opts,
                        cwd=ROOT,
                        env={**os.environ, **ONE_THREAD},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        tag = out / "last_checkpoint"
        _wait_for(lambda: _read(tag) == "model_0000001.pth", procs, 300, "checkpoint 1")
        os.killpg(procs[1].pid, sig)  # the whole machine: the launcher and its worker
        start = time.time()
        try:
            procs[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"machine 0 still running {time.time() - start:.0f} s after the peer")
        elapsed = time.time() - start
    finally:
        _stop_all(procs)
    text = logs[0].read_text()
    assert procs[0].returncode != 0, text[-3000:]
    assert elapsed < 60, f"machine 0 ended {elapsed:.0f} s after its peer"
    if sig == signal.SIGKILL:  # its connections closed: noticed at once
        assert "Rank 0 lost a peer in a collective" in text, text[-3000:]
        assert "by peer" in text  # GLOO: "Connection closed by peer" or "... reset by peer"
    else:  # nothing closed: the collective timeout ends the wait
        assert "Rank 0 timed out after 15 s (--dist-timeout) in a collective" in text, text[-3000:]
    assert "rerun it with --resume" in text
