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

Under an initialised process group the student may be a ``DistributedDataParallel``: its
gradients are averaged over the ranks by DDP (each rank's loss is the mean over its slice of the
batch, so the update is that of the global batch), rank 0's BatchNorm buffers are broadcast after
every round of student updates (the synthesizers then evaluate the same student on every rank),
the epoch's KD loss is averaged over the ranks, and the test loader is each rank's shard of the
test set, its counts summed over the ranks (``evaluate(..., reduce=True)``).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn

from . import distributed as _dist
from .atomic_file import atomic_write
from .distributed import unwrap
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


def group_size() -> int:
    """The world size of the initialised default process group (1 without one)."""
    return _dist.world_size()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device="cpu", reduce: bool = False) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on (images, labels) batches.
    ``reduce=True`` under an initialised process group: ``loader`` is this rank's shard and the
    counts are summed over the ranks (one all_reduce), so every rank returns the accuracy on the
    whole set. A DistributedDataParallel is evaluated through its module: DDP's forward would
    broadcast buffers, a collective the ranks' unequal shards cannot match."""
    model = unwrap(model)
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
    if reduce and group_size() > 1:
        import torch.distributed as dist

        # float64 holds the counts exactly; on the device the backend reduces (NCCL: CUDA only)
        dev = torch.device(device)
        sums = torch.tensor([correct, total, loss], dtype=torch.float64,
                            device=dev if dev.type == "cuda" else "cpu")
        dist.all_reduce(sums)
        correct, total, loss = int(sums[0]), int(sums[1]), float(sums[2])
    return {"acc": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1)}


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank of a DistributedDataParallel:
    DDP broadcasts them before each training forward, so after the last one every rank holds
    statistics of its own batch; the synthesizers and the evaluation read them. No-op otherwise."""
    if unwrap(model) is model or group_size() == 1:
        return
    import torch.distributed as dist

    for b in unwrap(model).buffers():
        dist.broadcast(b.data, 0)


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
            criterion: Callable | None = None, start_round: int = 0, round_state: dict | None = None,
            on_round_end: Callable[[int, int, dict], None] | None = None) -> dict:
    """Data-free distillation of ``student`` from ``teacher`` with ``synthesizer`` (any fastsynth or
    upstream-style synthesizer with synthesize()/sample()). Returns a history dict with the
    per-epoch accuracies, the best accuracy, the synthesis time and the total time.

    Resuming: pass the ``optimizer`` and ``scheduler`` (``make_optimizer``) with their restored
    state, ``start_epoch`` (epochs already done) and the ``history`` returned before.
    ``on_epoch_end(epoch, info)`` is called after each epoch, after the scheduler step (so a
    checkpoint written there resumes exactly), with ``info`` = {"epoch": epochs done,
    "kd_loss", "acc" (None when not evaluated), "synthesis_s" (this epoch), "epoch_s",
    "best_acc", "is_best", "lr", "optimizer", "scheduler", "history"}.

    Inside an epoch: ``on_round_end(epoch, rounds_done, info)`` is called after each synthesis
    round but the epoch's last (whose state is the epoch's), with ``info`` = {"round_state"
    (what the rest of the epoch reads: its synthesis seconds so far and the last round's KD loss
    tensor), "history"}; a run resumed there passes ``start_epoch`` = that epoch,
    ``start_round`` = rounds_done and that ``round_state``.

    ``student`` may be a DistributedDataParallel (see the module docstring); the evaluation and
    the callbacks' view use its module."""
    ep_steps = kd_steps if ep_steps is None else ep_steps
    rounds = max(ep_steps // max(kd_steps, 1), 1)
    if not 0 <= start_round < rounds:
        raise ValueError(f"distill: start_round must be in [0, {rounds}) (synthesis rounds per epoch), "
                         f"got {start_round}")
    distributed = group_size() > 1 and unwrap(student) is not student
    if optimizer is None:
        optimizer, scheduler = make_optimizer(unwrap(student), epochs=epochs, warmup=warmup, lr=lr,
                                              momentum=momentum, weight_decay=weight_decay, eta_min=eta_min)
    elif scheduler is None:
        raise ValueError("distill: an optimizer was given without its scheduler")
    bar = ProgressBar(epochs, prefix="distill ", enabled=progress)
    hist = history if history is not None else {"acc": [], "kd_loss": [], "best_acc": 0.0, "synthesis_s": 0.0}
    hist["epochs"] = epochs
    start = time.time()
    for epoch in range(start_epoch, epochs):
        t_epoch = time.time()
        first = start_round if epoch == start_epoch else 0
        synth_s, kd_mean = 0.0, None
        if first and round_state is not None:
            synth_s, kd_mean = float(round_state["synthesis_s"]), round_state["kd_mean"]
        for r in range(first, rounds):
            res = synthesizer.synthesize()
            if res is not None and len(res) > 1 and isinstance(res[1], (int, float)):
                synth_s += float(res[1])
            if epoch >= warmup:
                kd_mean = kd_train(student, teacher, synthesizer.sample, optimizer, kd_steps, T, autocast, criterion)
                sync_buffers(student)
            if on_round_end is not None and r + 1 < rounds:
                on_round_end(epoch, r + 1, {"round_state": {"synthesis_s": synth_s, "kd_mean": kd_mean},
                                            "history": hist})
        hist["synthesis_s"] += synth_s
        text = ""
        kd_value = None
        if kd_mean is not None:
            if distributed:  # the loss of the global batch: the mean of the ranks' means
                import torch.distributed as dist

                kd_mean = kd_mean.detach().clone()
                dist.all_reduce(kd_mean)
                kd_mean = kd_mean / group_size()
            kd_value = float(kd_mean)  # the one host read of the epoch
            hist["kd_loss"].append(kd_value)
            text = f"kd {kd_value:.3f} lr {optimizer.param_groups[0]['lr']:.4f}"
        acc, is_best = None, False
        if test_loader is not None and epoch >= warmup and ((epoch + 1) % eval_every == 0 or epoch == epochs - 1):
            acc = evaluate(student, test_loader, device, reduce=distributed)["acc"]
            hist["acc"].append(acc)
            is_best = acc > hist["best_acc"]
            hist["best_acc"] = max(hist["best_acc"], acc)
            text += f" acc {acc:.2f}"
            if checkpoint is not None and (is_best or not save_best_only):
                save_checkpoint(checkpoint, epoch=epoch + 1, state_dict=unwrap(student).state_dict(),
                                best_acc1=hist["best_acc"], optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict())
        elif checkpoint is not None and not save_best_only:
            save_checkpoint(checkpoint, epoch=epoch + 1, state_dict=unwrap(student).state_dict(),
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
