"""Loading other people's files safely (issue 18): hostile weights and configs are refused by
every loader before they can run anything, every real format still loads, only https:// and
detectron2:// URLs are fetched, and SHA-256 pins and torchvision's name hashes are checked.

A hostile file here runs ``touch MARKER`` when it is unpickled or yaml-loaded: a loader is safe
when it fails with the file and the key named and MARKER does not exist afterwards."""

import functools
import http.server
import logging
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request

import pytest
import torch
import torchvision
from detectron2.modeling import build_model

from helpers import DKD_R18, R18, TINY, load_tool, make_cfg, run_tool

TRUST = "DKD_DET_TRUST_FILES"


class Payload:
    """Unpickling it runs ``touch <marker>``: the issue's os.system payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "MARKER"


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    # Whatever the environment says, the tests decide when files are trusted.
    monkeypatch.delenv(TRUST, raising=False)


def _hostile(tmp_path, marker, kind, state=None):
    """A weights file of ``kind`` ("pkl": detectron2's model-zoo format, "pth": torch.save's zip,
    "legacy": torch.save's pre-1.6 format) holding ``state`` and the payload."""
    path = tmp_path / {"pkl": "hostile.pkl", "pth": "hostile.pth", "legacy": "legacy.pth"}[kind]
    if kind == "pkl":
        model = {k: v.numpy() for k, v in (state or {"w": torch.zeros(2)}).items()}
        data = {"model": model, "__author__": Payload(marker), "matching_heuristics": True}
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        data = {"model": state or {"w": torch.zeros(2)}, "iteration": 7, "x": Payload(marker)}
        torch.save(data, path, _use_new_zipfile_serialization=kind == "pth")
    return str(path)


def _refused(error, path, key):
    message = str(error)
    assert f"{key} = '{path}'" in message, message
    assert "refused to load: unpickling it would call posix.system" in message, message
    assert f"{TRUST}=1" in message, message


# ---------------------------------------------------------------------------------------------
# Hostile weights, through every loader


@pytest.mark.parametrize("kind", ["pkl", "pth", "legacy"])
def test_hostile_weights_are_refused_by_every_loader(kind, tmp_path, marker, dkd_opts):
    from dkd_det.checkpoint import (
        AtomicCheckpointer,
        UnsafeFileError,
        checkpoint_size,
        load_torchvision_state_dict,
    )
    from dkd_det.engine import load_student

    path = _hostile(tmp_path, marker, kind)
    # The teacher, as training builds it.
    with pytest.raises(UnsafeFileError) as e:
        build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.WEIGHTS", path))
    _refused(e.value, path, "MODEL.TEACHER.WEIGHTS")
    # MODEL.WEIGHTS for --eval-only, the demo and the export (the strict student loader).
    with pytest.raises(UnsafeFileError) as e:
        load_student(make_cfg(DKD_R18), path)
    _refused(e.value, path, "MODEL.WEIGHTS")
    # MODEL.WEIGHTS for training (the trainer's lenient checkpointer).
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UnsafeFileError) as e:
        AtomicCheckpointer(model, save_dir=str(tmp_path / "run")).resume_or_load(path, resume=False)
    _refused(e.value, path, "MODEL.WEIGHTS")
    # --resume: the file last_checkpoint names.
    run = tmp_path / "resume"
    run.mkdir()
    shutil.copy(path, run / "model_0000009.pth")
    (run / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(UnsafeFileError) as e:
        AtomicCheckpointer(model, save_dir=str(run)).resume_or_load("", resume=True)
    _refused(
        e.value,
        str(run / "model_0000009.pth"),
        f"--resume (the checkpoint named in {run / 'last_checkpoint'})",
    )
    # The export's size report, and the converter's --from-state-dict.
    with pytest.raises(UnsafeFileError) as e:
        checkpoint_size(path, "MODEL.TEACHER.WEIGHTS")
    _refused(e.value, path, "MODEL.TEACHER.WEIGHTS")
    with pytest.raises(UnsafeFileError) as e:
        load_torchvision_state_dict("resnet18", path)
    _refused(e.value, path, "--from-state-dict")
    assert not marker.exists()


def test_hostile_weights_through_the_converter_and_export_tools(
    tmp_path, marker, monkeypatch, capsys
):
    """The tools' own error path (in-process, as tests/test_reliability.py runs the exporter):
    exit status 1, one line naming the file, the key and the global."""
    path = _hostile(tmp_path, marker, "pth")
    convert = load_tool("convert_torchvision_to_d2.py")
    out = str(tmp_path / "out.pkl")
    assert convert.main(["--arch", "resnet18", out, "--from-state-dict", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --from-state-dict = '{path}': refused to load") and (
        "posix.system" in err
    )
    assert not os.path.exists(out)

    export = load_tool("export_student.py")
    monkeypatch.setattr(export, "setup_logger", lambda *a, **k: None)
    argv = ["--config-file", DKD_R18, "--weights", path, "--output", str(tmp_path / "exp"), *TINY]
    assert export.main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: MODEL.WEIGHTS = '{path}': refused to load" in err and "posix.system" in err
    assert not marker.exists()


def test_opt_in_loads_the_same_files_and_says_so(
    tmp_path, marker, monkeypatch, caplog, teacher_weights, dkd_opts
):
    from dkd_det.checkpoint import checkpoint_size

    monkeypatch.setenv(TRUST, "1")
    caplog.set_level(logging.WARNING, logger="dkd_det")
    for kind in ("pth", "legacy", "pkl"):
        path = _hostile(tmp_path, marker, kind)
        assert checkpoint_size(path)["params"] == 2
        assert marker.exists(), kind
        marker.unlink()
        assert f"{TRUST}=1: weights = '{path}' is loaded with unrestricted" in caplog.text
    # A whole teacher in the model-zoo format, as training loads it.
    state = torch.load(teacher_weights)["model"]
    path = _hostile(tmp_path, marker, "pkl", state)
    teacher = build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.WEIGHTS", path)).teacher
    assert marker.exists()
    name = "backbone.bottom_up.res2.0.conv1.weight"
    torch.testing.assert_close(teacher.state_dict()[name], state[name], rtol=0, atol=0)
    assert f"MODEL.TEACHER.WEIGHTS = '{path}' is loaded with unrestricted" in caplog.text


@pytest.mark.slow
def test_train_net_refuses_hostile_weights(tmp_path, marker, dkd_opts, dataset_opts):
    """The issue's first two rows, as users run them: a model-zoo .pkl teacher and an
    --eval-only .pth student."""
    pkl, pth = _hostile(tmp_path, marker, "pkl"), _hostile(tmp_path, marker, "pth")
    common = TINY + dataset_opts + ["OUTPUT_DIR", str(tmp_path / "out")]
    run = run_tool(
        "train_net.py", "--config-file", DKD_R18, *common, *dkd_opts, "MODEL.TEACHER.WEIGHTS", pkl
    )
    assert run.returncode != 0
    assert f"MODEL.TEACHER.WEIGHTS = '{pkl}': refused to load" in run.stdout, run.stdout[-3000:]
    run = run_tool(
        "train_net.py", "--eval-only", "--config-file", R18, *common, "MODEL.WEIGHTS", pth
    )
    assert run.returncode != 0
    assert f"MODEL.WEIGHTS = '{pth}': refused to load" in run.stdout, run.stdout[-3000:]
    assert "posix.system" in run.stdout
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Every real format still loads


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pkl_teacher_loads(protocol, tmp_path, teacher_weights, dkd_opts):
    """detectron2's model-zoo format: numpy arrays, __author__, matching_heuristics; every pickle
    protocol (2 writes bytes through _codecs.encode, 5 numpy arrays through _frombuffer)."""
    state = torch.load(teacher_weights)["model"]
    data = {
        "model": {k: v.numpy() for k, v in state.items()},
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
        "note": b"bytes",
    }
    path = str(tmp_path / "model_final_abc123.pkl")
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    teacher = build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.WEIGHTS", path)).teacher
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def test_training_checkpoints_resume_with_optimizer_and_scheduler(tmp_path, dataset_opts):
    """A mid-training checkpoint (model, SGD momentum, LRMultiplier's state, iteration, as
    detectron2's trainer writes it) resumes; model_final.pth loads for --eval-only."""
    from dkd_det.checkpoint import StrictCheckpointer
    from dkd_det.data import register_coco_format
    from dkd_det.engine import Trainer, load_student

    out = str(tmp_path / "out")
    opts = [*dataset_opts, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2"]
    opts += ["SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()", "SOLVER.STEPS", "(1,)"]
    cfg = make_cfg(R18, *opts)
    register_coco_format(cfg)
    first = Trainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    # What detectron2's DefaultTrainer writes: the trainer's state holds the optimizer (its
    # SimpleTrainer's) and the LR scheduler hook's {"base_lrs", "last_epoch"}.
    final = torch.load(os.path.join(out, "model_final.pth"))
    assert set(final) == {"model", "trainer", "iteration"} and final["iteration"] == 1
    optimizer = final["trainer"]["_trainer"]["optimizer"]
    scheduler = final["trainer"]["hooks"]["LRScheduler"]
    assert optimizer["state"] and set(scheduler) == {"base_lrs", "last_epoch"}

    second = Trainer(cfg)
    second.resume_or_load(resume=True)  # last_checkpoint: model_final.pth
    assert second.start_iter == 2
    state = second.optimizer.state_dict()["state"]
    assert len(state) == len(optimizer["state"])
    for i, s in optimizer["state"].items():
        torch.testing.assert_close(state[i]["momentum_buffer"], s["momentum_buffer"])
    assert second.scheduler.last_epoch == scheduler["last_epoch"] == 2
    # A checkpoint of the middle of the schedule resumes too.
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000000.pth")
    third = Trainer(cfg)
    third.resume_or_load(resume=True)
    assert third.start_iter == 1 and third.scheduler.last_epoch == 1

    model = load_student(cfg, os.path.join(out, "model_final.pth"))
    torch.testing.assert_close(
        model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
        final["model"]["roi_heads.box_predictor.cls_score.weight"],
    )
    # The pre-1.6 torch.save format too.
    legacy = str(tmp_path / "legacy.pth")
    torch.save(final, legacy, _use_new_zipfile_serialization=False)
    StrictCheckpointer(build_model(cfg)).load(legacy)


def test_converter_output_and_exported_student_load(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    from dkd_det.checkpoint import (
        AtomicCheckpointer,
        checkpoint_size,
        convert_torchvision,
        load_torchvision_state_dict,
        save_d2_pkl,
    )
    from dkd_det.engine import load_student
    from dkd_det.export import export_student

    torch.manual_seed(0)
    tv = str(tmp_path / "tv.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tv)
    pkl = str(tmp_path / "R-18-torchvision.pkl")
    save_d2_pkl(convert_torchvision("resnet18", load_torchvision_state_dict("resnet18", tv)), pkl)
    model = build_model(make_cfg(R18))
    AtomicCheckpointer(model).load(pkl)  # training's lenient load: the backbone matches
    stem = torch.load(tv)["conv1.weight"]
    torch.testing.assert_close(model.backbone.bottom_up.stem.conv1.weight, stem, rtol=0, atol=0)
    assert checkpoint_size(pkl)["params"] > 11e6

    paths = export_student(make_cfg(R18), model, str(tmp_path / "exported"))
    assert "WEIGHTS_SHA256" not in open(paths["config"]).read()  # vanilla detectron2's keys only
    vanilla = build_model(make_cfg(R18))
    DetectionCheckpointer(vanilla).load(paths["weights"])
    reloaded = load_student(make_cfg(R18), paths["weights"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pth", "legacy"])
def test_torch_files_with_numpy_arrays_load(kind, tmp_path):
    """numpy arrays, dtypes and scalars in a torch.save file (numpy 2 pickles a dtype's state onto
    its numpy.dtypes class) load as they were saved; torch's wider default list is not allowed."""
    import collections

    import numpy as np

    from dkd_det.checkpoint import UnsafeFileError, load_weights_file

    arrays = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "u": np.array([1, 2], np.uint8)}
    data = {"model": {"w": torch.ones(2)}, "arrays": arrays, "dtype": np.dtype("int64")}
    data.update(scalar=np.float64(2.5), text=np.array(["ab"]), iteration=3)
    path = str(tmp_path / "numpy.pth")
    torch.save(data, path, _use_new_zipfile_serialization=kind == "pth")
    loaded = load_weights_file(path, "MODEL.WEIGHTS")
    for name, array in arrays.items():
        assert loaded["arrays"][name].dtype == array.dtype
        np.testing.assert_array_equal(loaded["arrays"][name], array)
    assert loaded["dtype"] == np.dtype("int64") and loaded["scalar"] == 2.5
    assert loaded["text"][0] == "ab" and loaded["iteration"] == 3
    torch.testing.assert_close(loaded["model"]["w"], torch.ones(2), rtol=0, atol=0)
    # In torch's default weights-only list, not in dkd-det's: refused, naming the global.
    torch.save({"counts": collections.Counter(a=1)}, path)
    with pytest.raises(UnsafeFileError, match="would call collections.Counter, which"):
        load_weights_file(path, "MODEL.WEIGHTS")


def test_torch_force_weights_only_load_does_not_break_loading(
    tmp_path, marker, monkeypatch, teacher_weights
):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch.load refuse an explicit pickle module: the
    restricted loads work the same with it set (and hostile files are still refused)."""
    from dkd_det.checkpoint import StrictCheckpointer, UnsafeFileError, load_weights_file

    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    StrictCheckpointer(build_model(make_cfg(R18))).load(teacher_weights)
    legacy = str(tmp_path / "legacy.pth")
    torch.save(torch.load(teacher_weights), legacy, _use_new_zipfile_serialization=False)
    assert set(load_weights_file(legacy, "MODEL.WEIGHTS")["model"]) == set(
        torch.load(teacher_weights)["model"]
    )
    for kind in ("pth", "legacy"):
        path = _hostile(tmp_path, marker, kind)
        with pytest.raises(UnsafeFileError) as e:
            load_weights_file(path, "MODEL.WEIGHTS")
        _refused(e.value, path, "MODEL.WEIGHTS")
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"  # left as the user set it


def test_torchscript_archive_and_tar_are_not_checkpoints(tmp_path):
    """torch.load would hand a TorchScript archive to torch.jit.load and extract a tar to disk."""
    import tarfile

    from dkd_det.checkpoint import NotACheckpointError, StrictCheckpointer, resolve_weights

    path = str(tmp_path / "model.ts")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(NotACheckpointError, match="model.ts' is not a checkpoint: .*TorchScript"):
        resolve_weights(path, "MODEL.WEIGHTS")
    tar = str(tmp_path / "old.pth")
    with tarfile.open(tar, "w") as f:
        f.add(path, arcname="storages")
    with pytest.raises(NotACheckpointError, match="old.pth' is not a checkpoint: .*torch < 0.4"):
        StrictCheckpointer(torch.nn.Linear(2, 2)).load(resolve_weights(tar, "MODEL.WEIGHTS"))


# ---------------------------------------------------------------------------------------------
# Configs


def _yaml(path, text):
    path.write_text(text)
    return str(path)


def _hostile_yaml(tmp_path, marker, name="hostile.yaml", base=R18):
    return _yaml(
        tmp_path / name,
        f'# a paper\'s config\n_BASE_: "{base}"\nSEED: !!python/object/apply:os.system '
        f'["touch {marker}"]\n',
    )


def test_config_python_tags_are_refused_naming_file_and_line(tmp_path, marker, dkd_opts):
    from dkd_det.checkpoint import UnsafeFileError
    from dkd_det.config import get_dkd_cfg
    from dkd_det.modeling.teacher import get_teacher_cfg

    hostile = _hostile_yaml(tmp_path, marker)
    tag = "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply"
    # The main config.
    with pytest.raises(UnsafeFileError) as e:
        get_dkd_cfg(hostile)
    assert str(e.value).startswith(f"--config-file '{hostile}': {hostile}, line 3: {tag}")
    assert f"{TRUST}=1" in str(e.value)
    # A _BASE_ of an innocent config.
    child = _yaml(tmp_path / "child.yaml", f'_BASE_: "{hostile}"\nSEED: 3\n')
    with pytest.raises(UnsafeFileError) as e:
        get_dkd_cfg(child)
    message = str(e.value)
    assert f"--config-file '{child}': {hostile}, line 3 (in the _BASE_ chain of '{child}')" in (
        message
    )
    # The teacher's config.
    cfg = make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.CONFIG_FILE", hostile)
    with pytest.raises(UnsafeFileError) as e:
        get_teacher_cfg(cfg)
    assert str(e.value).startswith(f"MODEL.TEACHER.CONFIG_FILE '{hostile}': {hostile}, line 3")
    with pytest.raises(UnsafeFileError, match="MODEL.TEACHER.CONFIG_FILE"):
        build_model(cfg)
    assert not marker.exists()


def test_detectron2s_packaged_configs_keep_their_tag_and_copies_do_not(tmp_path):
    """detectron2's own Base-RetinaNet.yaml computes its anchor sizes with a python tag: inside
    the installed detectron2 it is as trusted as detectron2's code; a copy elsewhere is not."""
    from detectron2 import model_zoo

    from dkd_det.checkpoint import UnsafeFileError
    from dkd_det.config import get_dkd_cfg

    retina = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    cfg = get_dkd_cfg(retina)
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0] == pytest.approx(
        [32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]
    )
    copy = shutil.copy(model_zoo.get_config_file("Base-RetinaNet.yaml"), tmp_path)
    child = _yaml(tmp_path / "retina.yaml", f'_BASE_: "{copy}"\n')
    with pytest.raises(UnsafeFileError, match=f"{copy}, line 8 \\(in the _BASE_ chain of"):
        get_dkd_cfg(child)


def test_config_opt_in_runs_the_tag_and_says_so(tmp_path, marker, monkeypatch, caplog):
    from dkd_det.config import get_dkd_cfg

    monkeypatch.setenv(TRUST, "1")
    caplog.set_level(logging.WARNING, logger="dkd_det")
    hostile = _hostile_yaml(tmp_path, marker)
    cfg = get_dkd_cfg(hostile)
    assert marker.exists() and cfg.SEED == 0  # os.system's exit status
    assert f"{TRUST}=1: --config-file = '{hostile}' is loaded with yaml.unsafe_load" in caplog.text


def test_config_base_over_http_is_refused_before_any_connection(tmp_path):
    from dkd_det.checkpoint import UnsafeFileError
    from dkd_det.config import get_dkd_cfg

    with _listening() as (server, url):
        child = _yaml(tmp_path / "child.yaml", f'_BASE_: "{url}/Base.yaml"\n')
        with pytest.raises(UnsafeFileError) as e:
            get_dkd_cfg(child)
        _no_connection(server)
    assert f"--config-file (its _BASE_ chain) = '{url}/Base.yaml': http:// is not fetched" in str(
        e.value
    )


@pytest.mark.slow
def test_train_net_refuses_hostile_configs(tmp_path, marker, dkd_opts, dataset_opts):
    """The issue's last two rows, as users run them: the teacher's config and --config-file."""
    hostile = _hostile_yaml(tmp_path, marker)
    common = TINY + dataset_opts + ["OUTPUT_DIR", str(tmp_path / "out")]
    run = run_tool(
        "train_net.py",
        "--config-file",
        DKD_R18,
        *common,
        *dkd_opts,
        "MODEL.TEACHER.CONFIG_FILE",
        hostile,
    )
    assert run.returncode != 0
    assert f"MODEL.TEACHER.CONFIG_FILE '{hostile}': {hostile}, line 3" in run.stdout, run.stdout[
        -3000:
    ]
    run = run_tool("train_net.py", "--config-file", hostile, *common)
    assert run.returncode != 0
    assert f"--config-file '{hostile}': {hostile}, line 3" in run.stdout, run.stdout[-3000:]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# URLs


class _listening:
    """A TCP socket listening on 127.0.0.1: a connection to it would show in accept()."""

    def __enter__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        return self.server, f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def __exit__(self, *exc):
        self.server.close()


def _no_connection(server):
    server.settimeout(0.2)
    with pytest.raises(socket.timeout):
        server.accept()


@pytest.mark.parametrize("scheme", ["http", "ftp", "file"])
def test_insecure_urls_are_refused_before_any_connection(scheme, tmp_path, dkd_opts):
    from dkd_det.checkpoint import AtomicCheckpointer, UnsafeFileError, resolve_weights

    with _listening() as (server, url):
        url = url.replace("http", scheme, 1) + "/model_final.pth"
        with pytest.raises(UnsafeFileError) as e:
            resolve_weights(url, "MODEL.WEIGHTS")
        assert f"MODEL.WEIGHTS = '{url}': {scheme}:// is not fetched" in str(e.value)
        assert "only https:// and detectron2://" in str(e.value)
        with pytest.raises(UnsafeFileError, match="MODEL.WEIGHTS"):
            AtomicCheckpointer(torch.nn.Linear(2, 2)).load(url)
        with pytest.raises(UnsafeFileError, match="MODEL.TEACHER.WEIGHTS = "):
            build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.WEIGHTS", url))
        _no_connection(server)


# ---------------------------------------------------------------------------------------------
# SHA-256


def test_pinned_sha256_of_local_files(tmp_path, teacher_weights, dkd_opts, dataset_opts):
    from dkd_det.checkpoint import HashMismatchError, file_sha256
    from dkd_det.engine import Trainer, load_student

    good = file_sha256(teacher_weights)
    wrong = "ab" * 32  # (all digits would be read as a number by merge_from_list)
    # MODEL.WEIGHTS: the student for --eval-only / export / the demo.
    cfg = make_cfg(R18, "MODEL.WEIGHTS", teacher_weights, "MODEL.WEIGHTS_SHA256", wrong)
    with pytest.raises(HashMismatchError) as e:
        load_student(cfg)
    message = str(e.value)
    assert f"MODEL.WEIGHTS = '{teacher_weights}': SHA-256 {good} does not match" in message
    assert f"the expected {wrong} (MODEL.WEIGHTS_SHA256)" in message
    assert "The file is left as it is" in message and os.path.isfile(teacher_weights)
    load_student(make_cfg(R18, "MODEL.WEIGHTS", teacher_weights, "MODEL.WEIGHTS_SHA256", good))
    # The pin must be a whole SHA-256.
    with pytest.raises(ValueError, match="MODEL.WEIGHTS_SHA256 = 'f37072fd' is not a SHA-256"):
        load_student(
            make_cfg(R18, "MODEL.WEIGHTS", teacher_weights, "MODEL.WEIGHTS_SHA256", "f37072fd")
        )
    # MODEL.TEACHER.WEIGHTS, checked before training builds the teacher.
    with pytest.raises(
        HashMismatchError, match=r"MODEL.TEACHER.WEIGHTS = .*\(MODEL.TEACHER.SHA256\)"
    ):
        Trainer.build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.SHA256", wrong))
    assert Trainer.build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.SHA256", good.upper()))
    # MODEL.WEIGHTS for training.
    from dkd_det.data import register_coco_format

    opts = [*dataset_opts, "MODEL.WEIGHTS", teacher_weights, "MODEL.WEIGHTS_SHA256", wrong]
    cfg = make_cfg(R18, *opts, "OUTPUT_DIR", str(tmp_path / "out"))
    register_coco_format(cfg)
    with pytest.raises(HashMismatchError, match="MODEL.WEIGHTS_SHA256"):
        Trainer(cfg).resume_or_load(resume=False)


def test_torchvision_name_hash_of_local_files(tmp_path, monkeypatch):
    """A --from-state-dict file with torchvision's own name, and a copy in $TORCH_HOME's cache,
    are checked against the hash prefix in the name, and never deleted; no download happens."""
    from dkd_det.checkpoint import HashMismatchError, load_torchvision_state_dict

    proxy = "http://127.0.0.1:9"
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, proxy)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
    path = str(tmp_path / "resnet18-f37072fd.pth")
    with pytest.raises(HashMismatchError) as e:
        load_torchvision_state_dict("resnet18", path)
    assert "does not start with f37072fd (the file name's hash prefix" in str(e.value)
    assert os.path.isfile(path)
    load_torchvision_state_dict("resnet18", shutil.copy(path, tmp_path / "renamed.pth"))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    shutil.copy(path, cached)
    with pytest.raises(HashMismatchError, match="it is left as it is"):
        load_torchvision_state_dict("resnet18")
    assert cached.is_file()


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    """(folder, base URL): an https server on 127.0.0.1 with a self-signed certificate that this
    process trusts; detectron2's PathManager caches downloads in tmp_path. urllib's global
    opener (which fvcore's download uses) makes its HTTPS context once, when first used (Python
    3.12 and later): SSL_CERT_FILE would come too late after another test's urlopen, so an
    opener trusting the certificate is installed for the test, and urllib's own rebuilt after."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make the test server's certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert]
        + ["-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    context = ssl.create_default_context(cafile=cert)
    urllib.request.install_opener(
        urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    )
    try:
        yield root, f"https://localhost:{server.server_address[1]}"
    finally:
        urllib.request.install_opener(None)  # the next urlopen builds the default opener
        server.shutdown()
        server.server_close()


def test_downloaded_files_are_checked_and_a_bad_one_deleted(https_server, teacher_weights):
    from dkd_det.checkpoint import HashMismatchError, file_sha256, resolve_weights

    root, base = https_server
    sha = file_sha256(teacher_weights)
    for name in ("resnet18-0badc0de.pth", f"teacher-{sha[:8]}.pth", "pinned.pth", "plain.pth"):
        shutil.copy(teacher_weights, root / name)

    # The name's hash prefix (torch.hub's check_hash) is wrong: refused, and the download deleted.
    url = f"{base}/resnet18-0badc0de.pth"
    with pytest.raises(HashMismatchError) as e:
        resolve_weights(url, "MODEL.TEACHER.WEIGHTS")
    message = str(e.value)
    assert f"MODEL.TEACHER.WEIGHTS = '{url}': SHA-256 {sha} does not match" in message
    assert "one starting 0badc0de (the file name's hash prefix" in message
    downloaded = message.split("It was downloaded to '")[1].split("'")[0]
    assert "and has been deleted" in message and not os.path.exists(downloaded)
    # A pin that does not match: the same.
    url = f"{base}/pinned.pth"
    with pytest.raises(HashMismatchError, match="MODEL.WEIGHTS_SHA256.*has been deleted") as e:
        resolve_weights(url, "MODEL.WEIGHTS", "1" * 64)
    assert not os.path.exists(str(e.value).split("It was downloaded to '")[1].split("'")[0])
    # Matching: the cached download, which loads.
    local = resolve_weights(url, "MODEL.WEIGHTS", sha)
    assert local != url and file_sha256(local) == sha
    assert resolve_weights(f"{base}/teacher-{sha[:8]}.pth", "MODEL.TEACHER.WEIGHTS")
    assert resolve_weights(f"{base}/plain.pth", "MODEL.WEIGHTS")  # no hash known: not checked
    model = build_model(make_cfg(R18))
    from dkd_det.checkpoint import StrictCheckpointer

    StrictCheckpointer(model).load(f"{base}/plain.pth")


def test_lazy_config_teacher_py_is_code_and_refused_unless_trusted(
    tmp_path, marker, monkeypatch, caplog
):
    """A LazyConfig .py teacher runs when loaded: refused without DKD_DET_TRUST_FILES (nothing of
    it runs), loaded with it and a warning; detectron2's packaged .py configs load as they are,
    a copy of one elsewhere does not."""
    from detectron2 import model_zoo

    from dkd_det.checkpoint import UnsafeFileError
    from dkd_det.modeling.teacher import get_teacher_cfg

    from helpers import save_lazy_teacher

    config, weights = save_lazy_teacher(tmp_path)  # written (and run) by the test itself
    with open(config, "a") as f:
        f.write(f"\nimport os\nos.system('touch {marker}')\n")
    opts = ["MODEL.TEACHER.CONFIG_FILE", config, "MODEL.TEACHER.WEIGHTS", weights]
    cfg = make_cfg(DKD_R18, *opts)
    for load in (get_teacher_cfg, build_model):
        with pytest.raises(UnsafeFileError) as e:
            load(cfg)
        message = str(e.value)
        assert message.startswith(f"MODEL.TEACHER.CONFIG_FILE = '{config}': refused to load")
        assert f"{TRUST}=1" in message and "Python code" in message
    assert not marker.exists()
    zoo = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
    assert get_teacher_cfg(make_cfg(DKD_R18, "MODEL.TEACHER.CONFIG_FILE", zoo)).model is not None
    copy = shutil.copy(model_zoo.get_config_file("common/models/mask_rcnn_fpn.py"), tmp_path)
    with pytest.raises(UnsafeFileError, match=f"{TRUST}=1"):
        get_teacher_cfg(make_cfg(DKD_R18, "MODEL.TEACHER.CONFIG_FILE", copy))
    monkeypatch.setenv(TRUST, "1")
    caplog.set_level(logging.WARNING, logger="dkd_det")
    teacher = build_model(cfg).teacher
    assert marker.exists() and teacher is not None
    assert f"{TRUST}=1: MODEL.TEACHER.CONFIG_FILE = '{config}' is loaded with LazyConfig" in (
        caplog.text
    )
