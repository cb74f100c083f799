"""Settings of ``fastsynth distill``: the flags, the per-method defaults of the upstream scripts,
``--config FILE`` (TOML, or YAML when PyYAML is installed), the resolved configuration and its
``config.yaml``.

Resolution, later wins: global defaults < the method's upstream defaults < the dataset preset
(``digits``: the settings of ``fastsynth demo``) < the config file < the command-line flags.

Per-method defaults are what the upstream run scripts pass (zju-vipa/Fast-Datafree
``scripts/fast_cifar.sh`` first line (Fast-2, CIFAR-100 ResNet-34 -> ResNet-18) for ``fast_meta``
and ``fast``, ``scripts/deepinv_cifar.sh`` first line for ``deepinv``; tmtuan1307/nayer
``scripts/nayer_100.sh`` first line (CIFAR-100 ResNet-34 -> ResNet-18, 120 epochs) for ``nayer``),
with the harness's argparse defaults for what a script does not pass. Where a harness does not
forward an argument to the synthesizer (NAYER's ``--bnt``/``--oht``), the value the run uses
(the synthesizer's own default) is the default here.
"""
from __future__ import annotations

import argparse
import os

__all__ = ["METHODS", "DATASETS", "SETTINGS", "ConfigError", "build_parser", "resolve", "load_config_file",
           "to_yaml", "identity", "config_diff", "architectures"]


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the flag."""


# name, type, global default, help. Types: int, float, str, bool, "floats" (comma-separated list).
SETTINGS = [
    # what to run
    ("method", str, "nayer", "synthesis method"),
    ("dataset", str, "digits", "digits | cifar10 | cifar100 | imagefolder:PATH (evaluation only, read from disk)"),
    ("teacher", str, None, "teacher architecture (default for digits: the shipped digits_cnn); tv:NAME is a "
                           "torchvision model (ImageNet; its pretrained weights without --teacher-ckpt)"),
    ("teacher_ckpt", str, None, "teacher weights: {'state_dict': ...} (with or without 'module.') or a bare state_dict"),
    ("student", str, None, "student architecture (default for digits: digits_cnn_small); tv:NAME: torchvision's"),
    ("data_root", str, "data", "folder holding the evaluation data (cifar-10-batches-py/, cifar-100-python/)"),
    ("seed", int, 0, "random seed"),
    ("device", str, "auto", "cpu | cuda | cuda:N | auto"),
    # student training (upstream datafree_kd.py)
    ("epochs", int, 200, "epochs"),
    ("warmup", int, 0, "epochs of synthesis before KD starts"),
    ("kd_steps", int, 400, "student updates per synthesis round"),
    ("ep_steps", int, None, "student updates per epoch (ep_steps // kd_steps rounds; default kd_steps)"),
    ("batch_size", int, 128, "student batch size (sampled from the pool)"),
    ("synthesis_batch_size", int, None, "images per synthesis batch (default batch_size)"),
    ("lr", float, 0.1, "student learning rate (SGD)"),
    ("momentum", float, 0.9, "SGD momentum"),
    ("weight_decay", float, 1e-4, "SGD weight decay"),
    ("eta_min", float, 2e-4, "cosine schedule floor"),
    ("T", float, 20.0, "KD temperature"),
    ("kd_loss", str, "kl", "student loss: kl (T^2 KL at temperature T) | l1 (mean |s - t| of the logits, DFAD)"),
    # synthesis
    ("g_steps", int, 1, "generator / image optimisation steps per synthesis round"),
    ("lr_g", float, 1e-3, "generator (or image) learning rate"),
    ("lr_z", float, 1e-3, "latent code learning rate (fast, fast_meta)"),
    ("adv", float, 0.0, "adversarial loss weight"),
    ("bn", float, 0.0, "BatchNorm-statistics loss weight"),
    ("oh", float, 0.0, "one-hot (cross-entropy) loss weight"),
    ("act", float, 0.0, "activation loss weight (DAFL; upstream scripts pass 0)"),
    ("balance", float, 0.0, "class-balance loss weight (upstream scripts pass 0)"),
    ("bn_mmt", float, 0.0, "momentum of the BN statistics"),
    ("reset_l0", int, 0, "reset the generator's first layer each round (fast_meta)"),
    ("reset_bn", int, 0, "reset the generator's BN layers each round (fast, fast_meta)"),
    ("is_maml", int, 1, "MAML (1) or Reptile (0) meta update (fast_meta)"),
    ("g_life", int, 10, "rounds between generator re-initialisations (nayer)"),
    ("g_loops", int, 1, "generator loops per round (nayer)"),
    ("gwp_loops", int, 1, "generator loops per round during warmup (nayer)"),
    ("le_emb_size", int, 1000, "label-embedding projection width (nayer)"),
    ("bnt", float, 30.0, "BN loss weight of the label-embedding branch (nayer)"),
    ("oht", float, 1.5, "one-hot loss weight of the label-embedding branch (nayer)"),
    ("nz", int, 256, "latent size (fast, fast_meta)"),
    ("ngf", int, 64, "generator width"),
    ("tv", float, 0.0, "total-variation weight (deepinv; the harness passes 0)"),
    ("l2", float, 0.0, "image L2 weight (deepinv; the harness passes 0)"),
    ("img_size", int, None, "image side (default: the dataset's; imagefolder: 32, 224 with a tv: teacher)"),
    ("mean", "floats", None, "normalisation mean, comma-separated (default: the dataset's)"),
    ("std", "floats", None, "normalisation std, comma-separated (default: the dataset's)"),
    ("aug_padding", int, None, "crop padding of the synthesis augmentation (default: the synthesizer's)"),
    ("aug_flip", bool, None, "horizontal flips in the synthesis augmentation (default: the synthesizer's)"),
    ("use_fp16", bool, False, "fp16 autocast in synthesis on a GPU"),
    ("bn_stats", str, "global", "BN-statistics loss on several processes: global (over the global synthesis batch) "
                                "| per_rank (each process's own batch)"),
    ("pool_device", str, "auto", "where the image pool lives: auto (from its expected size and free memory) | device | "
                                 "cuda | cpu | disk"),
    ("pool_dir", str, None, "folder of a disk pool (default OUT/pool; one subfolder per process)"),
    ("le_pickle", str, None, "NAYER label embeddings: an upstream *_le.pickle or a fastsynth .pt"),
    ("lte_encoder", str, "auto", "text encoder for the label embeddings: auto | minilm | clip"),
    # run
    ("eval_every", int, 1, "evaluate the student every N epochs (after warmup)"),
    ("keep_ckpts", int, 2, "checkpoints kept in OUT/checkpoints"),
    ("ckpt_every", int, 0, "also checkpoint every N synthesis rounds inside an epoch (0: at epoch ends only)"),
]
SETTING_TYPES = {name: typ for name, typ, _, _ in SETTINGS}
GLOBAL_DEFAULTS = {name: default for name, _, default, _ in SETTINGS}

# the upstream scripts' settings per method (see the module docstring)
_FAST_DATAFREE = dict(batch_size=256, lr=0.2, kd_steps=400, ep_steps=400, adv=1.33, bn=10.0, oh=0.5, act=0.0,
                      balance=0.0, T=20.0, seed=0, bn_mmt=0.9, warmup=20, epochs=220, g_steps=2, lr_z=0.015,
                      lr_g=5e-3, is_maml=1, reset_l0=1, reset_bn=0, nz=256, ngf=64, teacher="resnet34",
                      student="resnet18")
METHODS = {
    "nayer": dict(batch_size=512, synthesis_batch_size=400, lr=0.2, warmup=20, epochs=120, lr_g=4e-3, adv=1.33,
                  bn=10.0, oh=0.5, g_steps=40, g_life=10, g_loops=2, gwp_loops=10, bn_mmt=0.9, T=20.0,
                  kd_steps=400, le_emb_size=1000, bnt=30.0, oht=1.5, eta_min=2e-4, ngf=64, seed=0,
                  teacher="resnet34", student="resnet18"),
    "fast_meta": dict(_FAST_DATAFREE),
    "fast": dict(_FAST_DATAFREE, is_maml=0, reset_l0=0),
    "deepinv": dict(batch_size=256, lr=0.1, epochs=200, kd_steps=400, ep_steps=400, g_steps=1000, lr_g=0.1,
                    adv=1.0, bn=10.0, oh=1.0, T=20.0, act=0.0, balance=0.0, seed=0, tv=0.0, l2=0.0, warmup=0,
                    teacher="wrn40_2", student="wrn16_1"),
}
# zju-vipa/CMI scripts/{dafl,zskt,dfq,dfad}_cifar10.sh (the DAFL script names --method zskt with
# DAFL's coefficients); the harness builds Generator(nz=512 for DAFL, else 256, ngf=64) and trains
# the student with the synthesis criterion (KLDiv at T=1, L1 for DFAD), so the scripts' --T 20
# never reaches the KD loss: T=1 here. Each of the ep_steps // kd_steps rounds per epoch is one
# generator step and kd_steps student steps on fresh generator samples.
_GENERATIVE = dict(batch_size=256, lr=0.1, epochs=200, kd_steps=5, ep_steps=400, g_steps=1, lr_g=1e-3, T=1.0,
                   seed=0, warmup=0, bn_mmt=0.0, ngf=64, nz=256, teacher="wrn40_2", student="wrn16_1")
METHODS.update({
    "dafl": dict(_GENERATIVE, nz=512, adv=0.0, bn=0.0, oh=1.0, act=0.1, balance=20.0),
    "zskt": dict(_GENERATIVE, adv=1.0, bn=0.0, oh=0.0, act=0.0, balance=0.0),
    "dfq": dict(_GENERATIVE, lr_g=1e-4, adv=0.5, bn=1.0, oh=0.5, act=0.0, balance=20.0),
    "dfad": dict(_GENERATIVE, adv=1.0, bn=0.0, oh=0.0, act=0.0, balance=0.0, kd_loss="l1"),
})
GENERATIVE = ("dafl", "zskt", "dfq", "dfad")
# ``fastsynth demo``'s settings: a couple of minutes on a CPU for the digits teacher; one
# synthesis round per epoch (ep_steps = kd_steps)
_DIGITS_COMMON = dict(epochs=20, warmup=3, kd_steps=25, ep_steps=None, batch_size=128, synthesis_batch_size=100,
                      g_steps=10, lr_g=1e-2, bn=10.0, oh=0.5, adv=1.33, bn_mmt=0.9, lr=0.1, T=20.0, ngf=16,
                      aug_padding=2, aug_flip=False, teacher="digits_cnn", student="digits_cnn_small")
DIGITS_PRESETS = {
    "nayer": dict(_DIGITS_COMMON, g_loops=1, gwp_loops=3, g_life=10, le_emb_size=64),
    "fast_meta": dict(_DIGITS_COMMON, lr_z=0.03, nz=64, reset_l0=1, is_maml=1, reset_bn=0),
    "fast": dict(_DIGITS_COMMON, lr_z=0.03, nz=64, reset_l0=0, is_maml=0, reset_bn=0),
    "deepinv": dict(_DIGITS_COMMON, g_steps=20, lr_g=0.1, warmup=0, oh=1.0, adv=1.0),
}
for _m in GENERATIVE:
    DIGITS_PRESETS[_m] = dict(_DIGITS_COMMON, **{k: METHODS[_m][k] for k in ("adv", "bn", "oh", "act", "balance", "T",
                                                                             "kd_loss") if k in METHODS[_m]},
                              kd_steps=5, ep_steps=25, g_steps=1, lr_g=1e-3, nz=64, warmup=0)
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder:PATH")

# settings that do not change what the run computes (a resume may change them)
RUN_ONLY = {"device", "eval_every", "keep_ckpts", "data_root", "ckpt_every", "pool_device", "pool_dir"}


def architectures() -> dict:
    """name -> (constructor(num_classes, in_ch), input shape (C, H, W) it was designed for)."""
    from .models.upstream import UPSTREAM_MODELS

    archs = {}
    for name, (ctor, shape) in UPSTREAM_MODELS.items():
        archs[name] = (lambda num_classes, in_ch, _c=ctor: _c(num_classes=num_classes), shape)

    def digits_cnn(width):
        def make(num_classes, in_ch):
            from .demo import DigitsCNN

            return DigitsCNN(width=width, num_classes=num_classes, in_ch=in_ch)
        return make

    archs["digits_cnn"] = (digits_cnn(16), (1, 16, 16))
    archs["digits_cnn_small"] = (digits_cnn(8), (1, 16, 16))
    return archs


TORCHVISION_PREFIX = "tv:"


def _torchvision_models(flag: str, name: str):
    try:
        import torchvision.models as tvm
    except ImportError:
        raise ConfigError(f"{flag} {name}: torchvision model names need torchvision, which is not installed "
                          f"(pip install torchvision)") from None
    return tvm


def check_torchvision_name(name: str, flag: str) -> None:
    """A ConfigError naming ``flag`` unless ``tv:NAME`` is a torchvision classification model."""
    tvm = _torchvision_models(flag, name)
    known = tvm.list_models(module=tvm)
    if name[len(TORCHVISION_PREFIX):] not in known:
        raise ConfigError(f"{flag}: {name!r} is not a torchvision classification model; known: "
                          f"{', '.join(TORCHVISION_PREFIX + k for k in known[:12])}, ... "
                          f"(torchvision.models.list_models())")


def build_model(name: str, flag: str, num_classes: int, in_ch: int, pretrained: bool = False):
    """The architecture ``name`` (see ``architectures()``; ``tv:NAME``: torchvision's model, with
    its default pretrained weights when ``pretrained``, downloaded by torchvision into its cache
    when absent)."""
    if name.startswith(TORCHVISION_PREFIX):
        check_torchvision_name(name, flag)
        tvm = _torchvision_models(flag, name)
        if in_ch != 3:
            raise ConfigError(f"{flag}: {name} takes 3-channel images, the dataset has {in_ch} channels")
        arch = name[len(TORCHVISION_PREFIX):]
        if pretrained:
            model = tvm.get_model(arch, weights="DEFAULT")
            classes = len(tvm.get_model_weights(arch).DEFAULT.meta["categories"])
            if classes != num_classes:
                raise ConfigError(f"{flag}: {name}'s pretrained weights classify {classes} classes, the dataset has "
                                  f"{num_classes}; give the weights of a {num_classes}-class model with --teacher-ckpt")
            return model
        return tvm.get_model(arch, weights=None, num_classes=num_classes)
    archs = architectures()
    if name not in archs:
        raise ConfigError(f"{flag}: unknown architecture {name!r}; known: {', '.join(sorted(archs))}, "
                          f"or tv:NAME (torchvision)")
    ctor, shape = archs[name]
    if shape[0] != in_ch and not name.startswith("digits_cnn"):
        raise ConfigError(f"{flag}: {name} takes {shape[0]}-channel images, the dataset has {in_ch} channels")
    return ctor(num_classes, in_ch)


def methods() -> list:
    return sorted(METHODS)


# ----------------------------------------------------------------------------- parsing
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _floats(text) -> list:
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _converter(typ):
    return {"floats": _floats, bool: _bool}.get(typ, typ)


def build_parser(prog: str = "fastsynth distill") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Data-free knowledge distillation, one whole run: synthesis, student training, "
        "evaluation, checkpoints. Defaults per method are those of the upstream scripts; --dataset digits "
        "(the default) is the built-in demo with the shipped teacher. The run prints the resolved settings "
        "and saves them as OUT/config.yaml. On several processes: torchrun --standalone --nproc_per_node N -m "
        "fastsynth distill ... (one process per GPU, gloo on CPUs; the batch sizes are global, split over the "
        "processes; see docs/DISTILL.md).",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (flags override it)")
    p.add_argument("--out", metavar="DIR", help="output folder (default fastsynth-distill)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --out (also the default when one exists); "
                        "an error when there is none")
    p.add_argument("--restart", action="store_true", help="ignore checkpoints in --out and start over")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, typ, default, help_ in SETTINGS:
        flags = [_flag(name)]
        if "_" in name:
            flags.append("--" + name)  # the upstream scripts' spelling (--batch_size)
        # the defaults depend on --method and --dataset: the resolved values are printed by the run
        extra = f" ({', '.join(methods())})" if name == "method" else ""
        if typ is bool:
            p.add_argument(*flags, dest=name, type=_bool, nargs="?", const=True, metavar="BOOL", help=help_ + extra)
        else:
            p.add_argument(*flags, dest=name, type=_converter(typ), metavar=name.upper(), help=help_ + extra)
    return p


def load_config_file(path: str) -> dict:
    """Flat settings from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no file at {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        import tomllib

        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                              "or write the settings as TOML (a .toml file)") from None
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    else:
        raise ConfigError(f"--config {path}: expected a .toml, .yaml or .yml file, got {ext or 'no extension'!r}")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of settings, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "out":
            out[name] = str(value)
            continue
        if name not in SETTING_TYPES:
            raise ConfigError(f"--config {path}: unknown setting {key!r}; known: {', '.join(sorted(SETTING_TYPES))}")
        out[name] = _coerce(name, value, f"--config {path}: {key}")
    return out


def _coerce(name: str, value, where: str):
    typ = SETTING_TYPES[name]
    if value is None:
        return None
    try:
        if typ == "floats":
            return _floats(value)
        if typ is bool:
            return value if isinstance(value, bool) else _bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError
        return typ(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        tname = "numbers" if typ == "floats" else getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{where}: expected {tname}, got {value!r}") from None


def resolve(cli: dict | None = None, file_cfg: dict | None = None) -> dict:
    """The resolved settings (every key of SETTINGS plus ``out``) from the flags given on the
    command line (``cli``, only those given) and a config file's settings."""
    cli = {k: v for k, v in (cli or {}).items() if k not in ("config", "resume", "restart", "quiet", "threads")}
    file_cfg = dict(file_cfg or {})
    method = cli.get("method", file_cfg.get("method", GLOBAL_DEFAULTS["method"]))
    dataset = cli.get("dataset", file_cfg.get("dataset", GLOBAL_DEFAULTS["dataset"]))
    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; known: {', '.join(methods())}")
    check_dataset(dataset)
    cfg = dict(GLOBAL_DEFAULTS)
    cfg.update(METHODS[method])
    if dataset == "digits":
        cfg.update(DIGITS_PRESETS[method])
        cfg["teacher_ckpt"] = None  # the shipped teacher
    else:
        # the architectures of the upstream scripts are defaults only with a teacher checkpoint given
        cfg["teacher"] = cfg["student"] = None
    cfg["out"] = "fastsynth-distill"
    cfg.update(file_cfg)
    cfg.update(cli)
    cfg["method"], cfg["dataset"] = method, dataset
    if cfg["synthesis_batch_size"] is None:
        cfg["synthesis_batch_size"] = cfg["batch_size"]
    if cfg["ep_steps"] is None:
        cfg["ep_steps"] = cfg["kd_steps"]
    _check(cfg)
    return cfg


def check_dataset(dataset: str) -> None:
    if dataset in ("digits", "cifar10", "cifar100"):
        return
    if isinstance(dataset, str) and dataset.startswith("imagefolder:") and len(dataset) > len("imagefolder:"):
        return
    raise ConfigError(f"--dataset: expected one of {', '.join(DATASETS)}, got {dataset!r}")


def _check(cfg: dict) -> None:
    for name in ("epochs", "kd_steps", "ep_steps", "batch_size", "synthesis_batch_size", "eval_every",
                 "keep_ckpts", "g_steps"):
        v = cfg[name]
        low = 0 if name == "g_steps" and cfg["method"] == "deepinv" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{_flag(name)}: must be an integer >= {low}, got {v!r}")
    if not isinstance(cfg["ckpt_every"], int) or isinstance(cfg["ckpt_every"], bool) or cfg["ckpt_every"] < 0:
        raise ConfigError(f"--ckpt-every: must be an integer >= 0 (synthesis rounds; 0: at epoch ends only), "
                          f"got {cfg['ckpt_every']!r}")
    if not 0 <= cfg["warmup"] <= cfg["epochs"]:
        raise ConfigError(f"--warmup: must be in [0, --epochs={cfg['epochs']}], got {cfg['warmup']!r}")
    if cfg["dataset"] != "digits":
        for name in ("teacher", "student", "teacher_ckpt"):
            if name == "teacher_ckpt" and str(cfg["teacher"]).startswith(TORCHVISION_PREFIX):
                continue  # torchvision's pretrained weights
            if not cfg[name]:
                raise ConfigError(f"{_flag(name)} is required with --dataset {cfg['dataset']} "
                                  f"(the upstream scripts use e.g. --teacher {METHODS[cfg['method']]['teacher']} "
                                  f"--student {METHODS[cfg['method']]['student']})")
    archs = architectures()
    for name in ("teacher", "student"):
        if isinstance(cfg[name], str) and cfg[name].startswith(TORCHVISION_PREFIX):
            check_torchvision_name(cfg[name], _flag(name))
        elif cfg[name] is not None and cfg[name] not in archs:
            raise ConfigError(f"{_flag(name)}: unknown architecture {cfg[name]!r}; known: {', '.join(sorted(archs))}, "
                              f"or tv:NAME (torchvision)")
    for name in ("mean", "std"):
        if cfg[name] is not None and (not cfg[name] or (name == "std" and any(s <= 0 for s in cfg[name]))):
            raise ConfigError(f"{_flag(name)}: expected positive comma-separated numbers, got {cfg[name]!r}")
    if cfg["kd_loss"] not in ("kl", "l1"):
        raise ConfigError(f"--kd-loss: expected kl or l1, got {cfg['kd_loss']!r}")
    if cfg["bn_stats"] not in ("global", "per_rank"):
        raise ConfigError(f"--bn-stats: expected global or per_rank, got {cfg['bn_stats']!r}")
    if cfg["pool_device"] not in ("auto", "device", "cuda", "cpu", "disk"):
        raise ConfigError(f"--pool-device: expected auto, device, cuda, cpu or disk, got {cfg['pool_device']!r}")
    if cfg["lte_encoder"] not in ("auto", "minilm", "clip"):
        raise ConfigError(f"--lte-encoder: expected auto, minilm or clip, got {cfg['lte_encoder']!r}")


# ----------------------------------------------------------------------------- output and resume checks
def identity(cfg: dict) -> dict:
    """The settings that decide what a run computes (a resumed run must match them)."""
    return {k: cfg[k] for k in sorted(cfg) if k not in RUN_ONLY and k != "out"}


def config_diff(saved: dict, now: dict) -> list:
    """``[(name, saved value, current value)]`` for every setting that differs. A setting newer
    than the saved run (absent from it) counts at its global default, the value it then had."""
    keys = sorted(set(saved) | set(now))
    diff = []
    for k in keys:
        a = saved.get(k, GLOBAL_DEFAULTS.get(k, "<absent>"))
        b = now.get(k, "<absent>")
        if a != b:
            diff.append((k, a, b))
    return diff


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(x) for x in v) + "]"
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_yaml(cfg: dict) -> str:
    """A flat mapping as YAML (PyYAML's safe_dump when installed, else written here: scalars,
    lists of scalars and quoted strings only)."""
    try:
        import yaml
    except ImportError:
        return "".join(f"{k}: {_yaml_scalar(v)}\n" for k, v in cfg.items())
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
