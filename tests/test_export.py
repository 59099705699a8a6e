"""dkd_det.export and tools/export_student.py: what the export reports."""

import pytest
import torch

from helpers import DKD_R18, R18, TINY, make_cfg

# ---------------------------------------------------------------------------------------------
# Export: the teacher's size is its parameters', not its training checkpoint's


def test_export_reports_the_teacher_parameter_size(tmp_path, monkeypatch, capsys, dkd_opts):
    from dkd_det.checkpoint import checkpoint_size

    from helpers import load_tool, save_random_model

    cfg = make_cfg(R18)
    student = save_random_model(cfg, str(tmp_path / "student.pth"))
    model = torch.load(student)["model"]
    params = sum(v.numel() for k, v in model.items() if not k.endswith("num_batches_tracked"))
    # A teacher as a training run leaves it: the model plus SGD momentum for every parameter.
    teacher = str(tmp_path / "teacher_final.pth")
    momentum = {i: {"momentum_buffer": v.clone()} for i, v in enumerate(model.values())}
    torch.save({"model": model, "optimizer": {"state": momentum}, "iteration": 89999}, teacher)
    size = checkpoint_size(teacher)
    assert size["params"] == params
    assert size["mb"] == pytest.approx(params * 4 / 1e6)  # float32
    assert size["file_mb"] > 1.8 * size["mb"]

    tool = load_tool("export_student.py")
    monkeypatch.setattr(tool, "setup_logger", lambda *a, **k: None)
    argv = ["--config-file", DKD_R18, "--weights", student, "--output", str(tmp_path / "exp")]
    argv += TINY + dkd_opts[:-1] + [teacher]  # dkd_opts ends with the teacher's weights
    assert tool.main(argv) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    expected = f"{params * 4 / 1e6:.1f} MB, {params / 1e6:.2f} M parameters"
    assert expected in lines["teacher"] and expected in lines["student"], lines
