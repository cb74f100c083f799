"""Student distillation on synthesized data: the upstream recipe of the FastDFKD and NAYER
harnesses.

- SGD (momentum 0.9, weight decay 1e-4), cosine learning rate over the post-warmup epochs
  (eta_min 2e-4), stepped once per epoch after warmup;
- each epoch: ``ep_steps // kd_steps`` synthesis rounds (FastDFKD harness; NAYER's harness
  does one round per epoch, i.e. ep_steps == kd_steps), each followed, once ``epoch >= warmup``,
  by ``kd_steps`` student updates on ``synthesizer.sample()`` batches with the KD loss
  ``T^2 * KL(p_t(T) || p_s(T))`` (teacher under no_grad, student in train());
- evaluation on a user test loader after each epoch (or every ``eval_every``), the best
  accuracy kept, checkpoints (student, optimizer, scheduler, epoch, best) written when asked;
- a plain-text progress bar (no tqdm).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .ops.logit_losses import kd_loss


class ProgressBar:
    """``[#####.....] 12/40 text`` on one line of a terminal (a line per update elsewhere)."""

    def __init__(self, total: int, prefix: str = "", width: int = 24, stream=None, enabled: bool = True):
        self.total = max(int(total), 1)
        self.prefix = prefix
        self.width = width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()

    def update(self, n: int, text: str = "") -> None:
        if not self.enabled:
            return
        frac = min(max(n / self.total, 0.0), 1.0)
        fill = int(round(frac * self.width))
        el = time.time() - self.start
        line = f"{self.prefix}[{'#' * fill}{'.' * (self.width - fill)}] {n}/{self.total} {el:6.1f}s {text}"
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            if n >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device="cpu") -> dict:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on (images, labels) batches."""
    was = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train(was)
    return {"acc": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1)}


def kd_train(student: nn.Module, teacher: nn.Module, sample: Callable[[], torch.Tensor],
             optimizer: torch.optim.Optimizer, steps: int, T: float = 20.0, autocast=None,
             criterion: Callable | None = None) -> torch.Tensor:
    """``steps`` KD updates of the student on ``sample()`` batches; returns the mean loss as a
    device tensor (read by the caller once per epoch). ``criterion(s_out, t_out, T)`` replaces
    the KD loss (default ``T^2 KL(p_t(T) || p_s(T))``)."""
    kd = kd_loss if criterion is None else criterion
    student.train()
    teacher.eval()
    total = None
    for _ in range(steps):
        x = sample()
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            with torch.no_grad():
                t_out = teacher(x)
            s_out = student(x.detach())
            loss = kd(s_out, t_out.detach(), T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = loss.detach() if total is None else total + loss.detach()
    return total / max(steps, 1) if total is not None else torch.zeros(())


def atomic_write(path: str, write: Callable[[object], None], binary: bool = True, fsync: bool = True) -> str:
    """Write ``path`` so that a crash at any moment leaves either the old file or the new one:
    into a temporary file in the same folder, flushed and fsynced, then renamed over ``path``
    (and the folder fsynced, so the rename itself survives a power loss where the OS allows).
    ``fsync=False`` keeps the rename (a killed process never leaves half a file) without the
    disk flushes, for files that can be rebuilt from a checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if not fsync:
        return path
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on every OS (Windows)
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def save_checkpoint(path: str, **state) -> str:
    """``torch.save(state, path)``, atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def distill(synthesizer, student: nn.Module, teacher: nn.Module, *, epochs: int = 200, kd_steps: int = 400,
            ep_steps: int | None = None, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
            T: float = 20.0, warmup: int = 0, eta_min: float = 2e-4, test_loader=None, device="cpu",
            eval_every: int = 1, checkpoint: str | None = None, save_best_only: bool = True,
            progress: bool = True, autocast=None, log: Callable[[str], None] | None = None,
            optimizer: torch.optim.Optimizer | None = None, scheduler=None, start_epoch: int = 0,
            history: dict | None = None, on_epoch_end: Callable[[int, dict], None] | None = None,
            criterion: Callable | None = None) -> dict:
    """Data-free distillation of ``student`` from ``teacher`` with ``synthesizer`` (any fastsynth or
    upstream-style synthesizer with synthesize()/sample()). Returns a history dict with the
    per-epoch accuracies, the best accuracy, the synthesis time and the total time.

    Resuming: pass the ``optimizer`` and ``scheduler`` (``make_optimizer``) with their restored
    state, ``start_epoch`` (epochs already done) and the ``history`` returned before.
    ``on_epoch_end(epoch, info)`` is called after each epoch, after the scheduler step (so a
    checkpoint written there resumes exactly), with ``info`` = {"epoch": epochs done,
    "kd_loss", "acc" (None when not evaluated), "synthesis_s" (this epoch), "epoch_s",
    "best_acc", "is_best", "lr", "optimizer", "scheduler", "history"}."""
    ep_steps = kd_steps if ep_steps is None else ep_steps
    rounds = max(ep_steps // max(kd_steps, 1), 1)
    if optimizer is None:
        optimizer, scheduler = make_optimizer(student, epochs=epochs, warmup=warmup, lr=lr, momentum=momentum,
                                              weight_decay=weight_decay, eta_min=eta_min)
    elif scheduler is None:
        raise ValueError("distill: an optimizer was given without its scheduler")
    bar = ProgressBar(epochs, prefix="distill ", enabled=progress)
    hist = history if history is not None else {"acc": [], "kd_loss": [], "best_acc": 0.0, "synthesis_s": 0.0}
    hist["epochs"] = epochs
    start = time.time()
    for epoch in range(start_epoch, epochs):
        t_epoch = time.time()
        synth_s = 0.0
        kd_mean = None
        for _ in range(rounds):
            res = synthesizer.synthesize()
            if res is not None and len(res) > 1 and isinstance(res[1], (int, float)):
                synth_s += float(res[1])
            if epoch >= warmup:
                kd_mean = kd_train(student, teacher, synthesizer.sample, optimizer, kd_steps, T, autocast, criterion)
        hist["synthesis_s"] += synth_s
        text = ""
        kd_value = None
        if kd_mean is not None:
            kd_value = float(kd_mean)  # the one host read of the epoch
            hist["kd_loss"].append(kd_value)
            text = f"kd {kd_value:.3f} lr {optimizer.param_groups[0]['lr']:.4f}"
        acc, is_best = None, False
        if test_loader is not None and epoch >= warmup and ((epoch + 1) % eval_every == 0 or epoch == epochs - 1):
            acc = evaluate(student, test_loader, device)["acc"]
            hist["acc"].append(acc)
            is_best = acc > hist["best_acc"]
            hist["best_acc"] = max(hist["best_acc"], acc)
            text += f" acc {acc:.2f}"
            if checkpoint is not None and (is_best or not save_best_only):
                save_checkpoint(checkpoint, epoch=epoch + 1, state_dict=student.state_dict(),
                                best_acc1=hist["best_acc"], optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict())
        elif checkpoint is not None and not save_best_only:
            save_checkpoint(checkpoint, epoch=epoch + 1, state_dict=student.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        bar.update(epoch + 1, text)
        if log is not None and text:
            log(f"epoch {epoch + 1}/{epochs} {text}")
        lr_now = optimizer.param_groups[0]["lr"]
        if epoch >= warmup:
            scheduler.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"epoch": epoch + 1, "kd_loss": kd_value, "acc": acc, "synthesis_s": synth_s,
                                 "epoch_s": time.time() - t_epoch, "best_acc": hist["best_acc"],
                                 "is_best": is_best, "lr": lr_now, "optimizer": optimizer,
                                 "scheduler": scheduler, "history": hist})
    hist["total_s"] = time.time() - start
    return hist


def make_optimizer(student: nn.Module, *, epochs: int, warmup: int = 0, lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 1e-4, eta_min: float = 2e-4):
    """The upstream student optimizer and schedule: SGD and a cosine over the post-warmup epochs."""
    optimizer = torch.optim.SGD(student.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs - warmup, 1), eta_min=eta_min)
    return optimizer, scheduler


def cosine_lr(base: float, epoch: int, total: int, eta_min: float = 2e-4) -> float:
    """The learning rate CosineAnnealingLR gives after ``epoch`` steps."""
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * epoch / max(total, 1))) / 2
