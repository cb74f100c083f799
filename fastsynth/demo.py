"""``fastsynth demo``: data-free knowledge distillation on the handwritten digits of
scikit-learn, end to end on a CPU in a couple of minutes, no downloads.

1. A small BatchNorm CNN teacher trained on the digits (8x8, upsampled to 16x16) ships with
   the package (``fastsynth/data/digits_teacher.pt``; ``python -m fastsynth.demo
   --retrain-teacher`` rebuilds it).
2. A smaller student is distilled from the teacher with NAYER (default) or FastDFKD
   (``--method fast``) on synthesized images only: it never sees a digit.
3. A control student is distilled the same way from pure noise images.
4. The held-out accuracies of teacher, data-free student and noise student are printed with
   the wall time, and a PNG grid of synthesized samples is written.

Step 2 is ``fastsynth distill --dataset digits`` (``fastsynth.distill_run.run``, started afresh in
``--out``, which also receives its config.yaml, metrics.csv, student checkpoints and grids).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distill as _distill
from .synthesis import Normalizer
from .synthesis.png import save_image_grid

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TEACHER_PATH = os.path.join(DATA_DIR, "digits_teacher.pt")
IMG = 16
NC = 1
NUM_CLASSES = 10
MEAN, STD = (0.305,), (0.376,)  # pixel mean/std of the digits scaled to [0, 1]
SPLIT_SEED = 0
TEST_FRACTION = 0.25


# ----------------------------------------------------------------------------- data and models
def load_digits(img_size: int = IMG):
    """(x_train, y_train, x_test, y_test): images in [0, 1], (N, 1, img, img), fixed split."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("fastsynth demo needs scikit-learn: pip install 'fastsynth[demo]'") from exc
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * TEST_FRACTION))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _block(cin, cout, stride):
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x3 (stride 1, 2, 2), global average pooling, linear classifier."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES, in_ch: int = NC):
        super().__init__()
        w = width
        self.features = nn.Sequential(*_block(in_ch, w, 1), *_block(w, 2 * w, 2), *_block(2 * w, 4 * w, 2))
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def make_teacher():
    return DigitsCNN(width=16)


def make_student():
    return DigitsCNN(width=8)


def _loader(x, y, batch=256):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def _shift(x, pad=2):
    """random translations by up to ``pad`` pixels (teacher training augmentation)."""
    from .synthesis.augment import crop_flip

    return crop_flip(x, padding=pad, flip=False)


def train_teacher(epochs: int = 40, seed: int = 0, path: str = TEACHER_PATH, log=print):
    """Train the digits teacher and save it (state_dict + metadata) to ``path``."""
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits()
    norm = Normalizer(MEAN, STD)
    model = make_teacher()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(ytr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            out = model(norm(_shift(xtr[idx])))
            loss = F.cross_entropy(out, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    acc = _distill.evaluate(_Normalized(model, norm), _loader(xte, yte))["acc"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "test_acc": acc, "img_size": IMG, "mean": MEAN, "std": STD,
                "command": "python -m fastsynth.demo --retrain-teacher"}, path)
    log(f"teacher: test accuracy {acc:.2f}% -> {path} ({os.path.getsize(path) / 1024:.0f} KiB)")
    return model, acc


class _Normalized(nn.Module):
    """model(normalize(x)) for evaluation on [0, 1] images."""

    def __init__(self, model, norm):
        super().__init__()
        self.model = model
        self.norm = norm

    def forward(self, x):
        return self.model(self.norm(x))


def load_teacher(path: str = TEACHER_PATH):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; rebuild it with: python -m fastsynth.demo --retrain-teacher")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = make_teacher()
    model.load_state_dict(ck["state_dict"])
    return model.eval()


def label_embedding() -> torch.Tensor:
    """Label-text embeddings of the 10 digit classes (shipped with fastsynth.lte), [10, D]."""
    from . import lte

    return torch.as_tensor(lte.load_builtin("digits"), dtype=torch.float32)


# ----------------------------------------------------------------------------- configurations
# ``fastsynth demo --method fast`` is FastDFKD's meta synthesizer (``fastsynth distill --method fast_meta``)
METHOD_OF = {"nayer": "nayer", "fast": "fast_meta"}
# the demo's setting names -> fastsynth distill's
_NAMES = {"batch": "batch_size", "synthesis_batch": "synthesis_batch_size"}


def _settings(method: str) -> dict:
    from . import run_config

    preset = run_config.DIGITS_PRESETS[METHOD_OF[method]]
    back = {v: k for k, v in _NAMES.items()}
    skip = {"aug_padding", "aug_flip", "teacher", "student", "is_maml", "reset_bn", "ep_steps"}
    return {back.get(k, k): v for k, v in preset.items() if k not in skip}


DEFAULTS = {m: _settings(m) for m in METHOD_OF}


class _NoiseSynthesizer:
    """Control: a 'synthesizer' whose samples are pure noise images (uniform in [0, 1])."""

    def __init__(self, batch, norm, gen):
        self.batch, self.norm, self.gen = batch, norm, gen

    def synthesize(self):
        return {"synthetic": None}, 0.0

    def sample(self):
        return self.norm(torch.rand(self.batch, NC, IMG, IMG, generator=self.gen))


def run(method: str = "nayer", seed: int = 0, out_dir: str = "fastsynth-demo", quiet: bool = False,
        noise_control: bool = True, **overrides) -> dict:
    """Distil a student without data, and a noise control; returns the accuracies and times.

    The data-free run is ``fastsynth distill --dataset digits`` (``fastsynth.distill_run.run``,
    started afresh in ``out_dir``, which also receives its metrics, checkpoints and grids)."""
    from . import distill_run, run_config

    if method not in DEFAULTS:
        raise ValueError(f"method must be one of {sorted(DEFAULTS)}, got {method!r}")
    cfg = dict(DEFAULTS[method])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown demo settings {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    log = (lambda s: None) if quiet else print
    t0 = time.time()
    flags = {_NAMES.get(k, k): v for k, v in cfg.items()}
    flags.update(method=METHOD_OF[method], dataset="digits", seed=seed, out=out_dir, device="cpu")
    resolved = run_config.resolve(flags)
    log(f"[demo] method={method} seed={seed}")
    r = distill_run.run(resolved, resume="never", quiet=quiet)
    t_student = time.time() - t0
    res = {"method": method, "seed": seed, "teacher_acc": r["teacher_acc"], "student_acc": r["student_acc"],
           "synthesis_s": r["synthesis_s"], "student_s": t_student, "pool_images": r["pool_images"]}
    teacher, norm = r["teacher"], r["data"].normalizer
    if noise_control:
        t1 = time.time()
        torch.manual_seed(seed)
        noise_student = make_student()
        kd_epochs = cfg["epochs"] - cfg["warmup"]
        noise = _NoiseSynthesizer(cfg["batch"], norm, torch.Generator().manual_seed(seed))
        _distill.distill(noise, noise_student, teacher, epochs=kd_epochs, kd_steps=cfg["kd_steps"], lr=cfg["lr"],
                         T=cfg["T"], warmup=0, progress=False)
        res["noise_acc"] = _distill.evaluate(noise_student, r["data"].loader)["acc"]
        res["noise_s"] = time.time() - t1

    os.makedirs(out_dir, exist_ok=True)
    imgs = r["synthesizer"].data_pool.images()[-100:]
    res["grid_png"] = save_image_grid(imgs, os.path.join(out_dir, f"synthetic_{method}.png"), ncol=10, scale=3)
    res["wall_s"] = time.time() - t0
    return res


def report(res: dict) -> str:
    lines = [
        f"data-free distillation on scikit-learn digits ({res['method']}, seed {res['seed']})",
        f"  {'teacher (trained on the digits)':40s} test accuracy {res['teacher_acc']:6.2f}%",
        f"  {'student, data-free (' + res['method'] + ')':40s} test accuracy {res['student_acc']:6.2f}%"
        f"   ({100 * res['student_acc'] / max(res['teacher_acc'], 1e-9):.1f}% of the teacher)",
    ]
    if "noise_acc" in res:
        lines.append(f"  {'student, distilled from noise images':40s} test accuracy {res['noise_acc']:6.2f}%")
    lines += [
        f"  synthesized images: {res['pool_images']} (grid: {res['grid_png']})",
        f"  wall time {res['wall_s']:.1f} s (synthesis {res['synthesis_s']:.1f} s)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastsynth demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=sorted(DEFAULTS), default="nayer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="fastsynth-demo", help="directory for the PNG grid")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1, fastest for these small networks on a busy machine)")
    p.add_argument("--no-noise-control", action="store_true")
    p.add_argument("--retrain-teacher", action="store_true", help="retrain the shipped digits teacher and exit")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    if args.retrain_teacher:
        train_teacher()
        return 0
    over = {} if args.epochs is None else {"epochs": args.epochs}
    res = run(args.method, seed=args.seed, out_dir=args.out, quiet=args.quiet,
              noise_control=not args.no_noise_control, **over)
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
