"""Student distillation recipe (fastsynth.distill)."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from fastsynth import distill


pytestmark = pytest.mark.usefixtures("one_thread")


class FixedSynth:
    """Counts synthesize() calls and serves fixed random batches."""

    def __init__(self, n=32):
        self.x = torch.randn(n, 4)
        self.calls = 0
        self.samples = 0

    def synthesize(self):
        self.calls += 1
        return {"synthetic": self.x}, 0.5

    def sample(self):
        self.samples += 1
        return self.x


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_recipe_schedule_rounds_and_warmup(tmp_path):
    teacher, student = mlp(0).eval(), mlp(1)
    synth = FixedSynth()
    xs, ys = torch.randn(20, 4), torch.randint(0, 3, (20,))
    ck = tmp_path / "ck" / "student.pth"
    hist = distill.distill(synth, student, teacher, epochs=5, kd_steps=3, ep_steps=6, lr=0.1, T=4.0, warmup=2,
                           test_loader=[(xs, ys)], checkpoint=str(ck), progress=False)
    assert synth.calls == 5 * 2  # ep_steps // kd_steps rounds per epoch (FastDFKD harness)
    assert synth.samples == (5 - 2) * 2 * 3  # KD only after warmup
    assert len(hist["kd_loss"]) == 3 and len(hist["acc"]) == 3
    assert hist["synthesis_s"] == pytest.approx(0.5 * 10)
    state = torch.load(ck, weights_only=False)
    assert state["epoch"] >= 3 and set(state) >= {"state_dict", "best_acc1", "optimizer", "scheduler"}
    opt = state["optimizer"]["param_groups"][0]
    assert opt["momentum"] == 0.9 and opt["weight_decay"] == 1e-4
    # cosine over the post-warmup epochs
    assert distill.cosine_lr(0.1, 3, 3) == pytest.approx(2e-4)


def test_kd_train_fits_teacher():
    teacher, student = mlp(0).eval(), mlp(1)
    x = torch.randn(64, 4)
    opt = torch.optim.SGD(student.parameters(), 0.05, momentum=0.9)
    kd = lambda: float(distill.kd_loss(student(x), teacher(x), 2.0).detach())  # noqa: E731
    before = kd()
    mean = distill.kd_train(student, teacher, lambda: x, opt, 150, T=2.0)
    assert torch.is_tensor(mean) and kd() < 0.2 * before
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in teacher.parameters())


def test_kd_loss_formula():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1), reduction="batchmean") * T * T
    torch.testing.assert_close(distill.kd_loss(s, t, T), ref)


def test_evaluate_and_progress_bar():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert distill.evaluate(model, [(x, y)])["acc"] == pytest.approx(75.0)
    buf = io.StringIO()
    bar = distill.ProgressBar(4, prefix="p ", stream=buf)
    bar.update(2, "x")
    assert "[############............] 2/4" in buf.getvalue() and buf.getvalue().endswith("x\n")
    assert math.isclose(distill.cosine_lr(1.0, 0, 10, 0.0), 1.0)
