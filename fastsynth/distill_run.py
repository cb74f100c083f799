"""``fastsynth distill``: a whole data-free run from one command.

    fastsynth distill [--method nayer|fast_meta|fast|deepinv|dafl|zskt|dfq|dfad] [--dataset digits|cifar10|cifar100|imagefolder:PATH]
                      [--teacher ARCH|tv:NAME --teacher-ckpt PATH --student ARCH] [--config FILE] [--out DIR] ...
    torchrun --standalone --nproc_per_node N -m fastsynth distill ...      (one process per GPU; gloo on CPUs)

Without arguments it runs the built-in digits job (the shipped teacher, ``fastsynth demo``'s
settings). Settings: ``fastsynth.run_config`` (per-method defaults of the upstream scripts).
``--teacher tv:NAME`` is a torchvision model (ImageNet), with torchvision's pretrained weights
unless ``--teacher-ckpt`` is given (torchvision is optional: a one-line error without it).

Outputs in ``--out``: ``config.yaml`` (the resolved settings), ``metrics.csv`` (one row per
epoch: epoch, wall_s and synthesis_s (cumulative seconds, over resumed sittings too), kd_loss,
test_acc), ``student_last.pt`` / ``student_best.pt`` (the student's state_dict),
``grids/epoch_NNNN.png`` (the newest synthesized images grouped by the teacher's class, the
class index drawn under each; ``classes.txt`` names the indices), TensorBoard scalars and
grids in ``tb/`` when ``tensorboard`` is installed, and ``checkpoints/ckpt-EEEEE.pt``.

Checkpoints: one per epoch (and with ``--ckpt-every N`` one every N synthesis rounds inside an
epoch, ``ckpt-EEEEE-RRRR.pt``: E epochs and R rounds of the next done), written atomically
(temporary file, fsync, rename), the last ``--keep-ckpts`` kept: student, optimizer, scheduler,
epochs and rounds done, best accuracy, history, every RNG state, the resolved settings, the
synthesizer's ``state_dict()`` (generator, optimizers, counters, pool, RNG states; every
fastsynth synthesizer has one) and, inside an epoch, the epoch's running values. Rerunning in
the same ``--out`` (or ``--resume``) continues from the newest complete checkpoint,
bit-identical to a run that was never interrupted (same device and process count); a checkpoint
of other settings is refused with the settings that differ. A user synthesizer without
``state_dict()`` restarts (new generator, empty pool) on resume, with a note: the student side
resumes exactly, the synthesis does not.

Several processes (``torchrun``, or ``run()`` under a process group the caller initialised):
``main`` initialises the default group from torchrun's environment (NCCL when the device is a
GPU, gloo otherwise; each process on cuda:LOCAL_RANK) and destroys it at the end. The global
``--synthesis-batch-size`` and ``--batch-size`` are split evenly over the processes (a world size
that does not divide them is an error). Every rank builds the same student and generator from
``--seed`` and then draws its own random stream (seed + rank): no two ranks synthesize the same
images; the synthesizers merge the BN statistics over the global batch and average the
generator's gradients (``fastsynth.distributed``); each rank keeps its own pool and samples its
KD batch from it. The student is trained in DistributedDataParallel (the teacher is never
wrapped; the synthesizers see the unwrapped student), rank 0's BN buffers are broadcast after
every round of student updates. Evaluation is sharded: each rank evaluates every world-th test
batch and the counts are summed, so every rank gets the exact whole-set accuracy. Rank 0 alone
prints and writes the outputs; a checkpoint is each rank's part (``ckpt-....rankN.pt``: its
synthesizer, RNG states and running values), then, after a barrier, rank 0's file (student,
optimizer, settings), whose presence marks it complete. On resume every rank loads the
checkpoint rank 0 chose; one written by another number of processes is refused, naming both.
All processes must see the same ``--out`` folder.

The evaluation set is read only to evaluate, only from disk (never downloaded).
"""
from __future__ import annotations

import csv
import io
import os
import pickle
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from . import distill as _distill
from . import run_config as rc
from .run_config import ConfigError

CKPT_DIR = "checkpoints"
METRICS_COLUMNS = ("epoch", "wall_s", "synthesis_s", "kd_loss", "test_acc")
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
EVAL_BATCH = 256


# ----------------------------------------------------------------------------- evaluation data
class EvalData:
    """Normalised (images, labels) batches of the evaluation split, with what the run needs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: list, mean, std):
        from .synthesis import Normalizer

        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.shape = tuple(x.shape[1:])
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalizer = Normalizer(self.mean, self.std)
        self.loader = [(self.normalizer(x[i:i + EVAL_BATCH]), y[i:i + EVAL_BATCH]) for i in range(0, len(y), EVAL_BATCH)]


def _cifar_file(cfg: dict, name: str) -> tuple:
    sub, test, meta, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", "test_batch", "batches.meta", b"labels", b"label_names"),
        "cifar100": ("cifar-100-python", "test", "meta", b"fine_labels", b"fine_label_names"),
    }[name]
    roots = [cfg["data_root"], os.path.join(cfg["data_root"], "torchdata")]  # upstream keeps it in torchdata/
    for root in roots:
        if os.path.isfile(os.path.join(root, sub, test)):
            return os.path.join(root, sub), test, meta, label_key, names_key
    raise FileNotFoundError(
        f"--dataset {name}: the test split is not on disk: expected {os.path.join(roots[0], sub, test)} "
        f"(or under {roots[1]}); download the python version of {name.upper()} from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into --data-root {cfg['data_root']} "
        f"(fastsynth never downloads data)")


def _load_cifar(cfg: dict, name: str):
    folder, test, meta, label_key, names_key = _cifar_file(cfg, name)
    # the dataset's own pickle format, as torchvision reads it
    with open(os.path.join(folder, test), "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)).float() / 255.0
    y = torch.as_tensor(np.asarray(d[label_key]), dtype=torch.long)
    classes = [str(i) for i in range(10 if name == "cifar10" else 100)]
    if os.path.isfile(os.path.join(folder, meta)):
        with open(os.path.join(folder, meta), "rb") as f:
            m = pickle.load(f, encoding="bytes")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in m[names_key]]
    return x, y, classes


def _load_imagefolder(cfg: dict, path: str):
    from .synthesis.png import IMAGE_EXTENSIONS

    root = path
    for split in ("val", "test"):
        if os.path.isdir(os.path.join(path, split)):
            root = os.path.join(path, split)
            break
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--dataset imagefolder:{path}: no such folder")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(
            f"--dataset imagefolder:{path}: expected one folder per class holding PNG/JPG images, in {path}/val/, "
            f"{path}/test/ or {path}/ itself (e.g. {path}/val/cat/0001.png); found none")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("--dataset imagefolder: reading images needs Pillow (pip install pillow)") from None
    # torchvision's ImageNet models were trained on 224x224 crops
    side = cfg["img_size"] or (224 if str(cfg["teacher"]).startswith(rc.TORCHVISION_PREFIX) else 32)
    xs, ys = [], []
    for file, label in files:
        with Image.open(file) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = side / min(w, h)  # shorter side to ``side``, then the centre crop
            im = im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - side) // 2, (h - side) // 2
            arr = np.asarray(im.crop((left, top, left + side, top + side)), dtype=np.uint8)
        xs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        ys.append(label)
    return torch.stack(xs).float() / 255.0, torch.tensor(ys, dtype=torch.long), classes


def load_eval_data(cfg: dict) -> EvalData:
    ds = cfg["dataset"]
    if ds == "digits":
        from . import demo, lte

        _, _, x, y = demo.load_digits()
        data = EvalData(x, y, lte.BUILTIN_LABELS["digits"], cfg["mean"] or demo.MEAN, cfg["std"] or demo.STD)
    elif ds in CIFAR_STATS:
        x, y, classes = _load_cifar(cfg, ds)
        mean, std = CIFAR_STATS[ds]
        data = EvalData(x, y, classes, cfg["mean"] or mean, cfg["std"] or std)
    else:
        x, y, classes = _load_imagefolder(cfg, ds[len("imagefolder:"):])
        data = EvalData(x, y, classes, cfg["mean"] or IMAGENET_STATS[0], cfg["std"] or IMAGENET_STATS[1])
    for name, v in (("mean", data.mean), ("std", data.std)):
        if len(v) != data.shape[0]:
            raise ConfigError(f"--{name}: {len(v)} values for {data.shape[0]}-channel images")
    if cfg["img_size"] is not None and cfg["img_size"] != data.shape[1]:
        raise ConfigError(f"--img-size {cfg['img_size']}: the {ds} images are {data.shape[1]}x{data.shape[2]}")
    return data


# ----------------------------------------------------------------------------- teacher checkpoints
def read_state_dict(path: str, flag: str = "--teacher-ckpt") -> dict:
    """The state_dict in ``path``: upstream's ``{'state_dict': ...}`` (or ``{'model': ...}``), with
    or without DataParallel's ``module.`` prefix, or a bare state_dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no file at {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{flag} {path}: not a checkpoint torch.load(weights_only=True) can read ({exc})") from None
    for key in ("state_dict", "model", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{flag} {path}: expected a state_dict (name -> tensor) or {{'state_dict': ...}}, "
                         f"got {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else ''}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_into(model: nn.Module, state: dict, flag: str, arch: str, path: str) -> None:
    """Load ``state`` into ``model``; a ValueError naming the flag and the first keys that do not fit."""
    own = model.state_dict()
    # BatchNorm's num_batches_tracked is absent from older checkpoints and never read in eval mode
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"{len(shapes)} shapes differ (first: {'; '.join(shapes[:3])}; checkpoint vs model)")
        raise ValueError(f"{flag} {path} does not fit the architecture {arch}: {', '.join(parts)}")
    model.load_state_dict(state, strict=False)


def build_teacher(cfg: dict, data: EvalData) -> nn.Module:
    from . import demo

    torchvision_weights = cfg["teacher"].startswith(rc.TORCHVISION_PREFIX) and not cfg["teacher_ckpt"]
    teacher = rc.build_model(cfg["teacher"], "--teacher", data.num_classes, data.shape[0],
                             pretrained=torchvision_weights)
    if torchvision_weights:
        return teacher.eval()
    path = cfg["teacher_ckpt"] or demo.TEACHER_PATH
    load_into(teacher, read_state_dict(path), "--teacher-ckpt", cfg["teacher"], path)
    return teacher.eval()


# ----------------------------------------------------------------------------- synthesizers
def label_embedding(cfg: dict, data: EvalData, out: str) -> torch.Tensor:
    from . import lte

    if cfg["le_pickle"]:
        path = cfg["le_pickle"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--le-pickle: no file at {path!r}")
        if path.endswith(".pt"):
            emb = torch.load(path, map_location="cpu", weights_only=True)
            emb = emb["embeddings"] if isinstance(emb, dict) else emb
        else:
            emb = lte.load_upstream_pickle(path)
        emb = torch.as_tensor(emb, dtype=torch.float32)
    elif cfg["dataset"] == "digits":
        emb = lte.load_builtin("digits")
    else:
        try:
            emb = lte.label_embeddings(data.classes, encoder=cfg["lte_encoder"], cache_dir=os.path.join(out, "lte"))
        except ImportError as exc:
            raise ImportError(f"--method nayer needs label-text embeddings of the class names: install a text "
                              f"encoder (pip install \"fastsynth[lte]\") or give NAYER's file with --le-pickle "
                              f"({exc})") from None
    if emb.dim() != 2 or emb.shape[0] != data.num_classes:
        raise ValueError(f"--le-pickle: embeddings of shape {tuple(emb.shape)}, expected "
                         f"[{data.num_classes} classes, D]")
    return emb


def build_synthesizer(cfg: dict, teacher: nn.Module, student: nn.Module, data: EvalData, device, out: str):
    from .nn import Generator, NLGenerator
    from .synthesis import NAYER, DeepInversionSynthesizer, FastMetaSynthesizer, FastSynthesizer

    c, h, w = data.shape
    aug = {k: cfg[k] for k in ("aug_padding", "aug_flip") if cfg[k] is not None}
    # the pool's storage does not change what is computed (a resume may change it)
    pool = dict(pool_device=None if cfg["pool_device"] == "auto" else cfg["pool_device"],
                pool_dir=cfg["pool_dir"] or (os.path.join(out, "pool") if cfg["pool_device"] == "disk" else None))
    common = dict(num_classes=data.num_classes, img_size=(c, h, w), synthesis_batch_size=cfg["synthesis_batch_size"],
                  sample_batch_size=cfg["batch_size"], adv=cfg["adv"], bn=cfg["bn"], oh=cfg["oh"],
                  normalizer=data.normalizer, device=device, use_fp16=cfg["use_fp16"], bn_stats=cfg["bn_stats"],
                  **pool, **aug)
    method = cfg["method"]
    if method == "nayer":
        le = label_embedding(cfg, data, out)
        gen = NLGenerator(ngf=cfg["ngf"], img_size=h, nc=c, nl=data.num_classes, label_emb=le,
                          le_emb_size=cfg["le_emb_size"], le_size=le.shape[1], sbz=cfg["synthesis_batch_size"])
        return NAYER(teacher, student, gen.to(device), g_steps=cfg["g_steps"], lr_g=cfg["lr_g"],
                     warmup=cfg["warmup"], bn_mmt=cfg["bn_mmt"], bnt=cfg["bnt"], oht=cfg["oht"],
                     g_life=cfg["g_life"], g_loops=cfg["g_loops"], gwp_loops=cfg["gwp_loops"],
                     dataset=cfg["dataset"].split(":")[0], **common)
    if method in ("fast", "fast_meta"):
        gen = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=h, nc=c)
        cls = FastMetaSynthesizer if method == "fast_meta" else FastSynthesizer
        return cls(teacher, student, gen.to(device), nz=cfg["nz"], iterations=cfg["g_steps"], lr_g=cfg["lr_g"],
                   lr_z=cfg["lr_z"], warmup=cfg["warmup"], bn_mmt=cfg["bn_mmt"], reset_l0=cfg["reset_l0"],
                   reset_bn=cfg["reset_bn"], is_maml=cfg["is_maml"], **common)
    if method == "deepinv":
        return DeepInversionSynthesizer(teacher, student, iterations=cfg["g_steps"], lr_g=cfg["lr_g"],
                                        tv=cfg["tv"], l2=cfg["l2"], **common)
    if method in rc.GENERATIVE:
        from .losses import KLDiv
        from .synthesis import GenerativeSynthesizer

        gen = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=h, nc=c)
        synth = GenerativeSynthesizer(
            teacher, student, gen.to(device), nz=cfg["nz"], img_size=(c, h, w), iterations=cfg["g_steps"],
            lr_g=cfg["lr_g"], synthesis_batch_size=cfg["synthesis_batch_size"], sample_batch_size=cfg["batch_size"],
            adv=cfg["adv"], bn=cfg["bn"], oh=cfg["oh"], act=cfg["act"], balance=cfg["balance"],
            criterion=nn.L1Loss() if cfg["kd_loss"] == "l1" else KLDiv(), normalizer=data.normalizer, device=device,
            use_fp16=cfg["use_fp16"], bn_stats=cfg["bn_stats"])
        return _GeneratorSamples(synth)
    raise ConfigError(f"--method: unknown method {method!r}; known: {', '.join(rc.methods())}")


class _GeneratorSamples:
    """A generative synthesizer for the KD loop: ``sample()`` returns the images (the generator
    draws them afresh for every student step) and its seconds count as synthesis time."""

    def __init__(self, synth):
        self.synth = synth
        self.seconds = 0.0
        self.data_pool = None
        self.last_images = None

    def synthesize(self):
        vis, secs = self.synth.synthesize()
        self.last_images = vis.get("synthetic")
        secs, self.seconds = secs + self.seconds, 0.0
        return vis, secs

    def sample(self):
        x, secs = self.synth.sample()
        self.seconds += secs
        return x

    def __getattr__(self, name):  # state_dict() and the rest, when the synthesizer has them
        return getattr(self.synth, name)


def kd_criterion(cfg: dict):
    """The student loss: None (the KD loss at temperature T) or the L1 distance of the logits."""
    if cfg["kd_loss"] == "l1":
        return lambda s, t, T: torch.nn.functional.l1_loss(s, t)
    return None


# ----------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in st["python"]))
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


_CKPT_RE = re.compile(r"^ckpt-(\d{5,})(?:-(\d{4,}))?(?:\.rank(\d+))?\.pt$")


def checkpoint_name(epoch: int, rounds: int = 0, rank: int | None = None) -> str:
    """``ckpt-EEEEE.pt`` after epoch E; ``ckpt-EEEEE-RRRR.pt`` after R synthesis rounds of epoch
    E + 1 (``--ckpt-every``); ``.rankN`` before ``.pt``: rank N's part of a multi-process one."""
    return f"ckpt-{epoch:05d}" + (f"-{rounds:04d}" if rounds else "") + (f".rank{rank}" if rank is not None else "") \
        + ".pt"


def _checkpoint_files(out: str) -> list:
    folder = os.path.join(out, CKPT_DIR)
    if not os.path.isdir(folder):
        return []
    found = []
    for f in os.listdir(folder):
        m = _CKPT_RE.match(f)
        if m:
            found.append((int(m.group(1)), int(m.group(2) or 0), None if m.group(3) is None else int(m.group(3)),
                          os.path.join(folder, f)))
    return found


def checkpoints(out: str) -> list:
    """``[(epochs done, rounds done in the next epoch, path)]`` of the checkpoints in ``out``,
    newest first (temporary files of an interrupted write are never listed: they do not carry
    the final name; ranks' parts are not listed)."""
    return sorted(((e, r, p) for e, r, k, p in _checkpoint_files(out) if k is None), reverse=True)


def load_newest_checkpoint(out: str, log=print):
    for epoch, rounds, path in checkpoints(out):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("complete") and state.get("epoch") == epoch and state.get("round", 0) == rounds:
                return state, path
        except Exception as exc:  # a damaged file (disk error): fall back to the one before
            log(f"[distill] skipping unreadable checkpoint {path} ({type(exc).__name__}: {exc})")
    return None, None


def rank_part(path: str, rank: int) -> str:
    """The file of rank ``rank``'s part of the checkpoint ``path``."""
    return path[:-len(".pt")] + f".rank{rank}.pt"


def write_checkpoint(out: str, state: dict, keep: int) -> str:
    """Rank 0's file (the whole checkpoint on one process), atomically; then only the newest
    ``keep`` checkpoints stay, with their ranks' parts. Written last: its presence says every
    rank's part is on disk."""
    path = os.path.join(out, CKPT_DIR, checkpoint_name(state["epoch"], state.get("round", 0)))
    _distill.save_checkpoint(path, **state, complete=True)
    kept = checkpoints(out)[:keep]
    newest = kept[0][:2]
    names = {(e, r) for e, r, _ in kept}
    for e, r, k, old in _checkpoint_files(out):
        # parts newer than the newest checkpoint belong to one being written: left alone
        if (e, r) not in names and (e, r) < newest:
            os.remove(old)
    return path


def write_rank_part(out: str, epoch: int, rounds: int, rank: int, world: int, local: dict) -> str:
    path = os.path.join(out, CKPT_DIR, checkpoint_name(epoch, rounds, rank))
    return _distill.save_checkpoint(path, **local, epoch=epoch, round=rounds, rank=rank, world_size=world,
                                    complete=True)


def remove_checkpoints(out: str) -> None:
    for *_, path in _checkpoint_files(out):
        os.remove(path)


def remove_partial_writes(out: str) -> None:
    """The temporary files of checkpoint writes a killed process left (``.ckpt-....tmp-PID``);
    called before any process of this run writes one."""
    folder = os.path.join(out, CKPT_DIR)
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(".ckpt-") and ".tmp-" in f:
                os.remove(os.path.join(folder, f))


# ----------------------------------------------------------------------------- outputs
_FONT = {  # 3x5 digit glyphs, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111",
}


_GLYPHS: dict = {}


def _glyph(ch: str, px: int) -> np.ndarray:
    g = _GLYPHS.get((ch, px))
    if g is None:
        bits = np.array([b == "1" for b in _FONT[ch]], dtype=np.uint8).reshape(5, 3) * 255
        g = _GLYPHS[(ch, px)] = np.kron(bits, np.ones((px, px), dtype=np.uint8))
    return g


def _draw_number(canvas: np.ndarray, text: str, top: int, left: int, px: int) -> None:
    for n, ch in enumerate(text):
        g = _glyph(ch, px)
        x = left + n * 4 * px
        canvas[top:top + g.shape[0], x:x + g.shape[1]] = g[:, :, None]


def labelled_grid(images: torch.Tensor, labels: torch.Tensor, ncol: int = 10, scale: int = 3) -> np.ndarray:
    """(N, C, H, W) uint8 images -> one uint8 (H', W', C) grid, each image with its class index
    drawn under it."""
    imgs = images.detach().cpu()
    n, c, h, w = imgs.shape
    imgs = imgs.numpy().repeat(scale, 2).repeat(scale, 3)  # numpy's repeat: torch's is slow on uint8
    px = max(1, scale // 2)
    strip = 5 * px + 2
    th, tw = h * scale + strip, w * scale
    rows = (n + ncol - 1) // ncol
    canvas = np.zeros((rows * (th + 2), ncol * (tw + 2), c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = r * (th + 2), k * (tw + 2)
        canvas[top:top + h * scale, left:left + tw] = imgs[i].transpose(1, 2, 0)
        _draw_number(canvas, str(int(labels[i])), top + h * scale + 1, left + 1, px)
    return canvas


@torch.no_grad()
def latest_images(synth, teacher: nn.Module, normalizer, n: int = 100):
    """The newest ``n`` pool images (uint8) and the teacher's class for each, sorted by class."""
    pool = getattr(synth, "data_pool", None)
    try:
        imgs = pool.images()[-n:] if pool is not None and len(pool) else None
    except RuntimeError:
        imgs = None
    if imgs is None and torch.is_tensor(getattr(synth, "last_images", None)):
        imgs = synth.last_images.detach()[-n:]  # in [0, 1]
    if imgs is None or not len(imgs):
        return None, None
    x = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
    was = teacher.training
    teacher.eval()
    labels = teacher(normalizer(x.to(next(teacher.parameters()).device))).argmax(1).cpu()
    teacher.train(was)
    order = torch.argsort(labels, stable=True)
    u8 = imgs if imgs.dtype == torch.uint8 else (x.clamp(0, 1) * 255).to(torch.uint8)
    return u8.cpu()[order], labels[order]


def write_metrics(out: str, rows: list) -> None:
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS, lineterminator="\n")
    wr.writeheader()
    for row in rows:
        wr.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})
    # rebuilt from the checkpoint on resume: renamed into place, not flushed to disk every epoch
    _distill.atomic_write(os.path.join(out, "metrics.csv"), lambda f: f.write(buf.getvalue()), binary=False,
                          fsync=False)


def save_state_dict(path: str, model: nn.Module, fsync: bool = False) -> None:
    """The model's state_dict, renamed into place (the checkpoint is the copy that is fsynced)."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _distill.atomic_write(path, lambda f: torch.save(sd, f), fsync=fsync)


def _tensorboard(out: str, log):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("[distill] TensorBoard: not installed (pip install tensorboard); the scalars are in metrics.csv")
        return None
    return SummaryWriter(os.path.join(out, "tb"))


# ----------------------------------------------------------------------------- processes
def rank_world() -> tuple:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    from . import distributed

    return distributed.rank(), distributed.world_size()


def _local_rank(rank: int) -> int:
    """The process's index on its machine: torchrun's LOCAL_RANK, else the rank modulo the GPUs."""
    env = os.environ.get("LOCAL_RANK")
    if env is not None and env.strip().isdigit():
        return int(env)
    return rank % max(torch.cuda.device_count(), 1)


def resolve_device(name: str, world: int = 1, rank: int = 0) -> torch.device:
    """``--device`` as a torch.device; with several processes a GPU device is cuda:LOCAL_RANK
    (one process per GPU)."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available")
    if dev.type == "cuda" and world > 1:
        local = _local_rank(rank)
        if dev.index is not None and dev.index != local:
            raise ConfigError(f"--device {name}: with {world} processes each one takes cuda:LOCAL_RANK "
                              f"(this one cuda:{local}); pass --device cuda or auto")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: local rank {local} has no GPU ({torch.cuda.device_count()} "
                              f"visible); start at most one process per GPU (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local)
    return dev


def init_distributed_from_env(device_name: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment) and without a process group yet:
    initialise the default group from the environment, NCCL when the run's device is a GPU and
    gloo otherwise, and make cuda:LOCAL_RANK this process's device. Returns whether it
    initialised one (the caller then destroys it)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.strip().isdigit():
        raise ConfigError(f"WORLD_SIZE={world!r} in the environment: expected the number of processes")
    world = int(world)
    if world <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("torchrun: this torch build has no torch.distributed; run one process")
    if dist.is_initialized():
        return False
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device_name, world, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return True


def _split_batches(cfg: dict, world: int) -> dict:
    """The settings of one rank: the global synthesis and KD batches divided by the world size."""
    if world == 1:
        return cfg
    for name in ("synthesis_batch_size", "batch_size"):
        if cfg[name] % world:
            raise ConfigError(f"--{name.replace('_', '-')} {cfg[name]}: not divisible by the {world} processes "
                              f"(torchrun --nproc_per_node): each process takes an equal slice of the global batch")
    return dict(cfg, synthesis_batch_size=cfg["synthesis_batch_size"] // world, batch_size=cfg["batch_size"] // world)


def _broadcast_object(obj, rank: int, world: int):
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- the run
def run(cfg: dict, *, resume: str = "auto", quiet: bool = False, log=print, progress: bool | None = None,
        save_outputs: bool = True) -> dict:
    """One data-free run with the resolved settings ``cfg`` (``run_config.resolve``), outputs in
    ``cfg["out"]``. ``resume``: "auto" (continue from a checkpoint when there is one), "require"
    (``--resume``: an error without one) or "never" (start over, discarding old checkpoints).
    Returns the accuracies, times, the synthesizer and the (unwrapped) student.

    Under an initialised default process group of several processes (torchrun; see
    ``init_distributed_from_env``) every rank calls ``run`` with the same settings: each
    synthesizes and trains on its slice of the global batches, the student is a
    DistributedDataParallel, rank 0 alone writes the outputs and prints."""
    if resume not in ("auto", "require", "never"):
        raise ValueError(f"run: resume must be 'auto', 'require' or 'never', got {resume!r}")
    t0 = time.time()
    out = cfg["out"]
    rank, world = rank_world()
    lead = rank == 0
    say = (lambda s: None) if quiet or not lead else log
    writes = save_outputs and lead
    device = resolve_device(cfg["device"], world, rank)
    local_cfg = _split_batches(cfg, world)
    data = load_eval_data(cfg)
    # each rank evaluates its share of the test batches; the counts are summed (exact accuracy)
    test_shard = data.loader[rank::world]
    teacher = build_teacher(cfg, data).to(device)
    teacher_acc = _distill.evaluate(teacher, test_shard, device, reduce=True)["acc"]

    # the order of what draws random numbers is that of ``fastsynth demo`` (same results); every
    # rank builds the same student and generator from the same seed
    torch.manual_seed(cfg["seed"])
    student = rc.build_model(cfg["student"], "--student", data.num_classes, data.shape[0]).to(device)
    synth = build_synthesizer(local_cfg, teacher, student, data, device, out)
    optimizer, scheduler = _distill.make_optimizer(student, epochs=cfg["epochs"], warmup=cfg["warmup"], lr=cfg["lr"],
                                                   momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                                                   eta_min=cfg["eta_min"])
    if world > 1:
        # from here each rank draws its own stream: no two ranks synthesize the same images
        torch.manual_seed(cfg["seed"] + rank)
    ident = rc.identity(cfg)
    start_epoch, start_round, round_state, rows, hist = 0, 0, None, [], None
    if resume == "never":
        if lead:
            remove_checkpoints(out)
            remove_partial_writes(out)
        _barrier(world)
    else:
        if lead:
            remove_partial_writes(out)  # the other ranks write nothing before the broadcast below
        state, path = load_newest_checkpoint(out, log) if lead else (None, None)
        path = _broadcast_object(path, rank, world)  # every rank resumes from rank 0's choice
        if path is not None and not lead:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if path is None and resume == "require":
            raise ConfigError(f"--resume: no complete checkpoint in {os.path.join(out, CKPT_DIR)}")
        if state is not None:
            diff = rc.config_diff(state["config"], ident)
            if diff:
                listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff[:8])
                raise ConfigError(f"--out {out} holds a run with other settings ({listed}); pass --restart to "
                                  f"start over in that folder, or choose another --out")
            saved_world = state.get("world_size", 1)
            if saved_world != world:
                raise ConfigError(f"--out {out}: the checkpoint {os.path.basename(path)} was written by {saved_world} "
                                  f"process(es), this run has {world} (torchrun --nproc_per_node): resume with "
                                  f"{saved_world}, or pass --restart to start over")
            local = state
            if world > 1:
                part = rank_part(path, rank)
                if not os.path.isfile(part):
                    raise FileNotFoundError(f"--out {out}: rank {rank}'s part of {os.path.basename(path)} is missing "
                                            f"({part}); every process must see the same --out folder")
                local = torch.load(part, map_location="cpu", weights_only=True)
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, rows, hist = state["epoch"], list(state["rows"]), dict(state["history"])
            start_round = state.get("round", 0)
            round_state = local.get("round_state")
            if round_state is not None and torch.is_tensor(round_state.get("kd_mean")):
                round_state = dict(round_state, kd_mean=round_state["kd_mean"].to(device))
            if local.get("synthesizer") is not None and hasattr(synth, "load_state_dict"):
                synth.load_state_dict(local["synthesizer"])
            elif start_epoch < cfg["epochs"]:
                say("[distill] the synthesizer has no saved state: it restarts (new generator, empty pool)")
            set_rng_state(local["rng"])
            within = f" and {start_round} synthesis rounds of epoch {start_epoch + 1}" if start_round else ""
            say(f"[distill] resuming {path} after epoch {start_epoch}/{cfg['epochs']}{within}")

    if writes:
        os.makedirs(out, exist_ok=True)
        yaml_text = rc.to_yaml(cfg)
        _distill.atomic_write(os.path.join(out, "config.yaml"), lambda f: f.write(yaml_text), binary=False)
        _distill.atomic_write(os.path.join(out, "classes.txt"),
                              lambda f: f.write("".join(f"{i} {c}\n" for i, c in enumerate(data.classes))), binary=False)
        write_metrics(out, rows)
        if start_epoch:
            save_state_dict(os.path.join(out, "student_last.pt"), student)
    procs = f" processes={world} (per process: synthesis batch {local_cfg['synthesis_batch_size']}, KD batch " \
            f"{local_cfg['batch_size']})" if world > 1 else ""
    say(f"[distill] method={cfg['method']} dataset={cfg['dataset']} teacher={cfg['teacher']} "
        f"student={cfg['student']} seed={cfg['seed']} device={device}{procs} teacher test accuracy {teacher_acc:.2f}%")
    tb = _tensorboard(out, say) if writes else None
    wall0 = rows[-1]["wall_s"] if rows else 0.0
    t_loop = time.time()
    trained = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the teacher is never wrapped (no gradient all-reduce, no buffer broadcast); DDP's
        # construction broadcasts rank 0's student (equal on every rank already)
        trained = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    def save_checkpoint(epoch_done: int, rounds_done: int, h: dict, rstate: dict | None) -> None:
        common = {"format": "fastsynth-distill/2", "epoch": epoch_done, "round": rounds_done, "world_size": world,
                  "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "best_acc": h["best_acc"], "history": h, "rows": rows,
                  "config": ident}
        # what differs per rank: the synthesizer (generator, pool, its RNGs), the RNG states and,
        # inside an epoch, the epoch's running values
        local = {"synthesizer": synth.state_dict() if hasattr(synth, "state_dict") else None, "rng": rng_state(),
                 "round_state": rstate}
        if world == 1:
            write_checkpoint(out, {**common, **local}, cfg["keep_ckpts"])
            return
        write_rank_part(out, epoch_done, rounds_done, rank, world, local)
        _barrier(world)  # every part is on disk before rank 0's file names the checkpoint complete
        if lead:
            write_checkpoint(out, {**common, "synthesizer": None, "rng": None, "round_state": None},
                             cfg["keep_ckpts"])

    rounds_per_epoch = max(cfg["ep_steps"] // cfg["kd_steps"], 1)

    def on_round_end(epoch: int, rounds_done: int, info: dict) -> None:
        every = cfg["ckpt_every"]
        if save_outputs and every and (epoch * rounds_per_epoch + rounds_done) % every == 0:
            save_checkpoint(epoch, rounds_done, info["history"], info["round_state"])

    def on_epoch_end(epoch: int, info: dict) -> None:
        h = info["history"]
        row = {"epoch": info["epoch"], "wall_s": round(wall0 + time.time() - t_loop, 3),
               "synthesis_s": round(h["synthesis_s"], 3),  # the history carries earlier sittings
               "kd_loss": None if info["kd_loss"] is None else round(info["kd_loss"], 6),
               "test_acc": None if info["acc"] is None else round(info["acc"], 4)}
        rows.append(row)
        if not save_outputs:
            return
        save_checkpoint(info["epoch"], 0, h, None)
        if not writes:
            return
        save_state_dict(os.path.join(out, "student_last.pt"), student)
        if info["is_best"]:
            save_state_dict(os.path.join(out, "student_best.pt"), student)
        write_metrics(out, rows)
        imgs, labels = latest_images(synth, teacher, data.normalizer)
        grid = None
        if imgs is not None:
            from .synthesis.png import write_png

            grid = labelled_grid(imgs, labels, ncol=10, scale=3 if data.shape[1] <= 32 else 1)
            os.makedirs(os.path.join(out, "grids"), exist_ok=True)
            write_png(os.path.join(out, "grids", f"epoch_{info['epoch']:04d}.png"), grid)
        if tb is not None:
            for k in ("kd_loss", "test_acc", "synthesis_s"):
                if row[k] is not None:
                    tb.add_scalar(k, row[k], info["epoch"])
            tb.add_scalar("lr", info["lr"], info["epoch"])
            if grid is not None:
                tb.add_image("synthetic", grid, info["epoch"], dataformats="HWC")
            tb.flush()

    hist = _distill.distill(synth, trained, teacher, epochs=cfg["epochs"], kd_steps=cfg["kd_steps"],
                            ep_steps=cfg["ep_steps"], T=cfg["T"], warmup=cfg["warmup"], test_loader=test_shard,
                            device=device, eval_every=cfg["eval_every"],
                            progress=lead and ((not quiet) if progress is None else progress),
                            optimizer=optimizer, scheduler=scheduler, start_epoch=start_epoch, history=hist,
                            on_epoch_end=on_epoch_end, criterion=kd_criterion(cfg), start_round=start_round,
                            round_state=round_state, on_round_end=on_round_end)
    if tb is not None:
        tb.close()
    student_acc = _distill.evaluate(student, test_shard, device, reduce=True)["acc"]
    pool = getattr(synth, "data_pool", None)
    return {"teacher_acc": teacher_acc, "student_acc": student_acc, "best_acc": hist["best_acc"],
            "synthesis_s": hist["synthesis_s"], "wall_s": time.time() - t0, "epochs_run": cfg["epochs"] - start_epoch,
            "start_epoch": start_epoch, "start_round": start_round, "pool_images": len(pool) if pool is not None else 0,
            "synthesizer": synth, "student": student, "teacher": teacher, "data": data, "rows": rows, "config": cfg,
            "rank": rank, "world_size": world}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = rc.build_parser()
    args = vars(parser.parse_args(argv))
    owns_group = False
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        if args.get("resume") and args.get("restart"):
            raise ConfigError("--resume and --restart exclude each other")
        file_cfg = rc.load_config_file(args["config"]) if args.get("config") else {}
        cfg = rc.resolve(args, file_cfg)
        torch.set_num_threads(args.get("threads") or (1 if cfg["dataset"] == "digits" else torch.get_num_threads()))
        quiet = bool(args.get("quiet"))
        owns_group = init_distributed_from_env(cfg["device"])
        rank, world = rank_world()
        _split_batches(cfg, world)  # before anything is printed or built
        if rank == 0:
            print("[distill] resolved configuration:")
            print("".join(f"  {line}\n" for line in rc.to_yaml(cfg).splitlines()), end="")
        mode = "require" if args.get("resume") else "never" if args.get("restart") else "auto"
        res = run(cfg, resume=mode, progress=not quiet)
        if owns_group and getattr(res.get("synthesizer"), "close", None) is not None:
            res["synthesizer"].close()  # the pool's writes are finished before the exit below
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as exc:
        who = f" (rank {rank})" if rank else ""
        print(f"fastsynth distill{who}: {exc}", file=sys.stderr)
        return _exit_process(2) if owns_group else 2
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        print(f"[distill] outputs in {cfg['out']}: config.yaml metrics.csv student_last.pt student_best.pt grids/ "
              f"{CKPT_DIR}/ (wall {res['wall_s']:.1f} s, synthesis {res['synthesis_s']:.1f} s, "
              f"best {res['best_acc']:.2f}%)")
        print(f"teacher test accuracy {res['teacher_acc']:.2f}%, student test accuracy {res['student_acc']:.2f}%")
    return _exit_process(0) if owns_group else 0


def _exit_process(code: int) -> int:
    """End a torchrun worker now, with ``code``, without the interpreter's teardown: a gloo process
    group's worker thread may still be releasing the tensors of the last collective (a Python
    object, so it takes the GIL) while the interpreter finalises, and a thread taking the GIL then
    is terminated from inside C++ (``terminate called without an active exception``, SIGABRT,
    after every output was written). Everything is written and closed by now; the standard
    streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
