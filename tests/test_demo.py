"""The data-free digits demo, in a reduced configuration (seconds)."""
from __future__ import annotations

import os

import pytest
import torch

from fastsynth import demo


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_teacher_is_accurate_and_small():
    assert os.path.getsize(demo.TEACHER_PATH) < 256 * 1024
    t = demo.load_teacher()
    _, _, xte, yte = demo.load_digits()
    norm = demo.Normalizer(demo.MEAN, demo.STD)
    acc = demo._distill.evaluate(t, [(norm(xte), yte)])["acc"]
    assert acc > 95.0
    assert acc == pytest.approx(torch.load(demo.TEACHER_PATH, weights_only=True)["test_acc"], abs=1e-6)


def test_quick_datafree_run_beats_chance(tmp_path):
    res = demo.run("nayer", seed=0, out_dir=str(tmp_path), quiet=True, noise_control=False, epochs=6, warmup=1,
                   gwp_loops=2, g_steps=6, kd_steps=20, batch=64, synthesis_batch=50)
    assert res["student_acc"] > 30.0, res  # chance is 10%
    png = res["grid_png"]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in demo.report(res)


def test_quick_fast_method_and_cli(tmp_path, capsys):
    rc = demo.main(["--method", "fast", "--epochs", "3", "--out", str(tmp_path), "--quiet", "--no-noise-control"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "student, data-free (fast" in out and os.path.exists(tmp_path / "synthetic_fast.png")
    assert "synthesized images: 300 " in out  # one synthesis round of 100 images per epoch


def test_retrain_teacher_writes_weights(tmp_path):
    path = str(tmp_path / "t.pt")
    _, acc = demo.train_teacher(epochs=2, path=path, log=lambda s: None)
    ck = torch.load(path, weights_only=True)
    assert set(ck) >= {"state_dict", "test_acc", "command"} and acc > 50.0
