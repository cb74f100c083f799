"""fastsynth.patch(datafree): the one-line switch for the upstream harnesses (issue 17, sections
2-4; issue 18's synthesizer-construction errors).

Each test builds a fake ``datafree`` package in tmp_path with the module layout, names and
constructor signatures of one upstream repository (zju-vipa/Fast-Datafree, tmtuan1307/nayer,
zju-vipa/CMI). The fake classes are stubs that fail when used, so a harness that runs proves the
patch installed fastsynth's; the miniature harness loops call them the way each repository's
datafree_kd.py does (dotted names, the same keywords, the same unpacking of synthesize()).
"""
from __future__ import annotations

import importlib
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsynth
import fastsynth.losses
import fastsynth.nn
import fastsynth.synthesis as fs
from fastsynth.synthesis.augment import crop_flip

PIL = pytest.importorskip("PIL.Image")

# ------------------------------------------------------------------------------------------------
# fake upstream packages (signatures as upstream; bodies are stubs)

FAST_META_SIG = ("teacher, student, generator, nz, num_classes, img_size, init_dataset=None, iterations=100, "
                 "lr_g=0.1, synthesis_batch_size=128, sample_batch_size=128, adv=0.0, bn=1, oh=1, "
                 "save_dir='run/fast', transform=None, autocast=None, use_fp16=False, normalizer=None, "
                 "device='cpu', distributed=False, lr_z=0.01, warmup=10, reset_l0=0, reset_bn=0, bn_mmt=0, "
                 "is_maml=1")
FAST_META_IMAGENET_SIG = (
    "teacher, student, generator, nz, num_classes, img_size, init_dataset=None, iterations=100, lr_g=1e-3, "
    "lr_z=1e-3, lr_z_meta=1e-3, lr_g_meta=1e-3, synthesis_batch_size=128, sample_batch_size=128, reinit=0, "
    "adv=0.0, bn=1, oh=1, meta_lr_scale=1.0, save_dir='run/fast', transform=None, autocast=None, "
    "use_fp16=False, normalizer=None, device='cpu', distributed=False, start_kd=10, rand_label=1, reset_l0=0, "
    "reset_bn=0, bn_mmt=0, lr_diff=0, is_maml=1")
DEEPINV_SIG = ("teacher, student, num_classes, img_size, iterations=1000, lr_g=0.1, progressive_scale=False, "
               "synthesis_batch_size=128, sample_batch_size=128, adv=0.0, bn=1, oh=1, tv=1e-5, l2=0.0, "
               "save_dir='run/deepinversion', transform=None, normalizer=None, device='cpu', autocast=None, "
               "use_fp16=False, distributed=False")
GENERATIVE_SIG = ("teacher, student, generator, nz, img_size, iterations=1, lr_g=1e-3, synthesis_batch_size=128, "
                  "sample_batch_size=128, adv=0, bn=0, oh=0, act=0, balance=0, criterion=None, normalizer=None, "
                  "device='cpu', autocast=None, use_fp16=False, distributed=False")
CMI_SIG = ("teacher, student, generator, nz, num_classes, img_size, feature_layers=None, bank_size=40960, "
           "n_neg=4096, head_dim=128, init_dataset=None, iterations=100, lr_g=0.1, progressive_scale=False, "
           "synthesis_batch_size=128, sample_batch_size=128, adv=0.0, bn=1, oh=1, cr=0.8, cr_T=0.1, "
           "save_dir='run/cmi', transform=None, autocast=None, use_fp16=False, normalizer=None, device='cpu', "
           "distributed=False")
# Fast-Datafree's (and NAYER's identical copy's): feature_reuse between img_size and feature_layers
CMI_SIG_FD = CMI_SIG.replace("img_size, feature_layers=None", "img_size, feature_reuse=False, feature_layers=None")
NAYER_SIG = ("teacher, student, generator, num_classes, img_size, init_dataset=None, g_steps=100, lr_g=0.1, "
             "synthesis_batch_size=128, sample_batch_size=128, adv=0.0, bn=1, oh=1, save_dir='run/fast', "
             "transform=None, autocast=None, use_fp16=False, normalizer=None, device='cpu', distributed=False, "
             "warmup=10, bn_mmt=0, bnt=30, oht=1.5, cr_loop=1, g_life=50, g_loops=1, gwp_loops=10, "
             "dataset='cifar10'")
NL_SIG = "ngf=64, img_size=32, nc=3, nl=100, label_emb=None, le_emb_size=256, le_size=512, sbz=200"


def _synth_stub(name, sig):
    return f'''
class {name}(BaseSynthesis):
    def __init__(self, {sig}):
        super().__init__(teacher, student)

    def synthesize(self, targets=None):
        raise RuntimeError("upstream {name}.synthesize ran")

    def sample(self):
        raise RuntimeError("upstream {name}.sample ran")
'''


def _module_stub(name, init_sig, fwd_sig, extra=""):
    return f'''
class {name}(nn.Module):
    def __init__(self, {init_sig}):
        super().__init__()

    def forward(self, {fwd_sig}):
        raise RuntimeError("upstream {name}.forward ran")
{extra}'''


BASE = '''
from abc import ABC, abstractmethod


class BaseSynthesis(ABC):
    def __init__(self, teacher, student):
        self.teacher, self.student = teacher, student

    @abstractmethod
    def synthesize(self):
        ...

    @abstractmethod
    def sample(self):
        ...
'''

HOOKS_FD = '''
class FeatureHook:
    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        self.output = output

    def remove(self):
        self.hook.remove()


class DeepInversionHook:
    def __init__(self, module, mmt_rate):
        raise RuntimeError("upstream DeepInversionHook ran")
'''
HOOKS_FD += '''

class InstanceMeanHook:
    def __init__(self, module):
        raise RuntimeError("upstream InstanceMeanHook ran")
'''
HOOKS_CMI = HOOKS_FD.replace("def __init__(self, module, mmt_rate):", "def __init__(self, module):")

# the helpers of datafree/synthesis/contrastive.py next to CMISynthesizer
CONTRASTIVE_EXTRA = ('''
import torch.nn as nn
''' + _module_stub("MLPHead", "dim_in, dim_feat, dim_h=None", "x") + '''

class MultiTransform:
    def __init__(self, transform):
        raise RuntimeError("upstream MultiTransform ran")


class MemoryBank(object):
    def __init__(self, device, max_size=4096, dim_feat=512):
        raise RuntimeError("upstream MemoryBank ran")
''')

CRITERIONS = '''
import torch.nn as nn


def kldiv(logits, targets, T=1.0, reduction='batchmean'):
    raise RuntimeError("upstream kldiv ran")


class KLDiv(nn.Module):
    def __init__(self, T=1.0, reduction='batchmean'):
        super().__init__()
        raise RuntimeError("upstream KLDiv ran")

    def forward(self, logits, targets):
        raise RuntimeError("upstream KLDiv.forward ran")


def jsdiv(logits, targets, T=1.0, reduction='batchmean'):
    raise RuntimeError("upstream jsdiv ran")


def cross_entropy(logits, targets, reduction='mean'):
    raise RuntimeError("upstream cross_entropy ran")


def class_balance_loss(logits):
    raise RuntimeError("upstream class_balance_loss ran")


def onehot_loss(logits, targets=None):
    raise RuntimeError("upstream onehot_loss ran")


def get_image_prior_losses(inputs_jit):
    raise RuntimeError("upstream get_image_prior_losses ran")
'''

UTILS = '''
import contextlib
import os

import torch


def normalize(tensor, mean, std, reverse=False):
    raise RuntimeError("upstream normalize ran")


class Normalizer(object):
    def __init__(self, mean, std):
        raise RuntimeError("upstream Normalizer ran")


def save_image_batch(imgs, output, col=None, size=None, pack=True):
    # what the harness visualises: images in [0, 1], (N, C, H, W)
    assert torch.is_tensor(imgs) and imgs.dim() == 4, type(imgs)
    assert float(imgs.min()) >= 0.0 and float(imgs.max()) <= 1.0
    os.makedirs(os.path.dirname(output), exist_ok=True)
    torch.save(imgs.detach().cpu(), output + ".pt")


@contextlib.contextmanager
def dummy_ctx(*args, **kwargs):
    yield
'''


def _fake_sources(flavour: str) -> dict:
    g_fd = _module_stub("Generator", "nz=100, ngf=64, img_size=32, nc=3", "z")
    deep = _module_stub("DeepGenerator", "nz=100, ngf=64, img_size=224, nc=3", "z")
    dcgan = _module_stub("DCGAN_Generator", "nz=100, ngf=64, nc=3, img_size=64, slope=0.2", "z")
    if flavour == "fast-datafree":
        synth = {"fast_meta": [("FastMetaSynthesizer", FAST_META_SIG)], "fast": [("FastSynthesizer", FAST_META_SIG)],
                 "deepinversion": [("DeepInvSyntheiszer", DEEPINV_SIG)],
                 "generative": [("GenerativeSynthesizer", GENERATIVE_SIG)],
                 "contrastive": [("CMISynthesizer", CMI_SIG_FD)],
                 "fast_meta_imagenet": [("FastMetaSynthesizerForImageNet", FAST_META_IMAGENET_SIG)]}
        gens, hooks = g_fd + deep + dcgan, HOOKS_FD
        # Fast-Datafree's package __init__ does not import models (its registry.py does)
        init = "from . import criterions, utils, hooks, synthesis\n"
    elif flavour == "nayer":
        synth = {"fast_meta": [("FastMetaSynthesizer", FAST_META_SIG)], "fast": [("FastSynthesizer", FAST_META_SIG)],
                 "deepinversion": [("DeepInvSyntheiszer", DEEPINV_SIG)],
                 "generative": [("GenerativeSynthesizer", GENERATIVE_SIG)],
                 "contrastive": [("CMISynthesizer", CMI_SIG_FD)], "nayer": [("NAYER", NAYER_SIG)]}
        nl_extra = "\n    def reinit(self):\n        raise RuntimeError('upstream reinit ran')\n\n" \
                   "    def re_init_le(self):\n        raise RuntimeError('upstream re_init_le ran')\n"
        gens = (_module_stub("NLGenerator", NL_SIG, "targets=None", nl_extra)
                + _module_stub("NLDeepGenerator", NL_SIG.replace("img_size=32", "img_size=224"), "targets=None",
                               nl_extra)
                + _module_stub("Generator", "nz=100, ngf=64, img_size=32, nc=3, nl=100", "z, y=None") + deep
                # NAYER's DCGAN_Generator is label-conditioned: not fastsynth's signature
                + _module_stub("DCGAN_Generator", NL_SIG.replace("img_size=32", "img_size=224") + ", slope=0.2",
                               "targets=None", nl_extra))
        hooks = HOOKS_FD
        init = "from . import criterions, utils, hooks, synthesis, models\n"
    else:
        synth = {"deepinversion": [("DeepInvSyntheiszer", DEEPINV_SIG)],
                 "generative": [("GenerativeSynthesizer", GENERATIVE_SIG)],
                 "contrastive": [("CMISynthesizer", CMI_SIG)]}
        gens = g_fd + _module_stub("LargeGenerator", "nz=100, ngf=64, img_size=32, nc=3", "z") + dcgan
        hooks = HOOKS_CMI
        init = "from . import criterions, utils, hooks, synthesis, models\n"
    src = {"datafree/__init__.py": init, "datafree/hooks.py": hooks, "datafree/criterions.py": CRITERIONS,
           "datafree/utils/__init__.py": UTILS, "datafree/synthesis/base.py": BASE,
           "datafree/models/__init__.py": "from . import generator\n",
           "datafree/models/generator.py": "import torch.nn as nn\n" + gens}
    lines = ["from .base import BaseSynthesis\n"]
    for mod, classes in synth.items():
        src[f"datafree/synthesis/{mod}.py"] = "from .base import BaseSynthesis\n" + "".join(
            _synth_stub(n, s) for n, s in classes) + (CONTRASTIVE_EXTRA if mod == "contrastive" else "")
        lines += [f"from .{mod} import {n}\n" for n, _ in classes]
    src["datafree/synthesis/__init__.py"] = "".join(lines)
    return src


def _purge():
    for name in [n for n in sys.modules if n == "datafree" or n.startswith("datafree.")]:
        del sys.modules[name]


@pytest.fixture
def make_datafree(tmp_path):
    """make_datafree(flavour, edit=None) -> the imported fake package (``import datafree``)."""
    made = []

    def make(flavour, edit=None):
        root = tmp_path / f"pkg_{flavour}_{len(made)}"
        src = _fake_sources(flavour)
        if edit is not None:
            src = edit(src)
        for rel, text in src.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(textwrap.dedent(text))
        _purge()
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
        try:
            mod = importlib.import_module("datafree")
        finally:
            sys.path.remove(str(root))
        made.append(mod)
        return mod

    yield make
    for mod in made:
        fastsynth.unpatch(mod)
    _purge()


# ------------------------------------------------------------------------------------------------
# tiny models with the upstream classifier signature forward(x, return_features=False)

class TinyNet(nn.Module):
    def __init__(self, num_classes=10, width=8, bn=True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=not bn)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=not bn)
        self.bn2 = norm(width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x, return_features=False):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        feat = F.adaptive_avg_pool2d(out, 1).flatten(1)
        out = self.linear(feat)
        if return_features:
            return out, feat
        return out


NC, IMG, B = 10, 16, 8
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _models(student_bn=True):
    torch.manual_seed(0)
    teacher = TinyNet(NC, 8).eval()
    with torch.no_grad():  # non-trivial running statistics
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return teacher, TinyNet(NC, 4, bn=student_bn)


def _kd_steps(datafree, synthesizer, student, teacher, criterion, optimizer, steps=2):
    """datafree_kd.py's train(): sample, teacher with return_features, KD loss, SGD step."""
    student.train()
    teacher.eval()
    for _ in range(steps):
        images = synthesizer.sample()
        with datafree.utils.dummy_ctx():
            with torch.no_grad():
                t_out, t_feat = teacher(images, return_features=True)
            s_out = student(images.detach())
            loss_s = criterion(s_out, t_out.detach())
        optimizer.zero_grad()
        loss_s.backward()
        optimizer.step()
        assert torch.isfinite(loss_s)


def _png_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".png"))


def _read_png(path):
    with PIL.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------------
# flavour detection, the report, unpatch

def test_detect_flavour_and_bad_arguments(make_datafree):
    from fastsynth.patch import detect_flavour

    for flavour in ("fast-datafree", "nayer", "cmi"):
        assert detect_flavour(make_datafree(flavour)) == flavour
    df = make_datafree("cmi")
    with pytest.raises(TypeError, match="datafree must be the imported upstream package"):
        fastsynth.patch("datafree")
    with pytest.raises(ValueError, match="flavour must be one of .*got 'torch'"):
        fastsynth.patch(df, flavour="torch")
    import types

    empty = types.ModuleType("datafree_like")
    empty.synthesis = types.ModuleType("datafree_like.synthesis")
    with pytest.raises(ValueError, match="pass flavour="):
        fastsynth.patch(empty)
    with pytest.raises(TypeError, match="'synthesis' submodule"):
        fastsynth.patch(types.ModuleType("no_synthesis"))


def _snapshot(datafree):
    mods = {n: m for n, m in sys.modules.items() if n == datafree.__name__ or n.startswith(datafree.__name__ + ".")}
    return {n: dict(vars(m)) for n, m in mods.items()}


def _same(before, after):
    assert before.keys() == after.keys()
    for mod in before:
        assert before[mod].keys() == after[mod].keys(), mod
        for k, v in before[mod].items():
            assert after[mod][k] is v, f"{mod}.{k} changed"


CMI_ALL = {"synthesis.CMISynthesizer", "synthesis.contrastive.MLPHead", "synthesis.contrastive.MultiTransform",
           "synthesis.contrastive.MemoryBank", "hooks.InstanceMeanHook"}
CRITERIONS_ALL = {"criterions.kldiv", "criterions.KLDiv", "criterions.jsdiv", "criterions.cross_entropy",
                  "criterions.class_balance_loss", "criterions.onehot_loss"}
EXPECTED = {  # what the README's "Synthesizers" section says each harness gets
    "fast-datafree": {
        "replaced": CRITERIONS_ALL | CMI_ALL | {
            "synthesis.FastMetaSynthesizer", "synthesis.FastSynthesizer", "synthesis.DeepInvSyntheiszer",
            "synthesis.GenerativeSynthesizer", "synthesis.FastMetaSynthesizerForImageNet",
            "hooks.DeepInversionHook", "models.generator.Generator",
            "models.generator.DeepGenerator", "models.generator.DCGAN_Generator", "utils.Normalizer",
            "utils.normalize"},
        "left": set()},
    "nayer": {
        "replaced": CRITERIONS_ALL | CMI_ALL | {
            "synthesis.NAYER", "synthesis.FastMetaSynthesizer", "synthesis.FastSynthesizer",
            "synthesis.DeepInvSyntheiszer", "hooks.DeepInversionHook", "models.generator.NLGenerator",
            "models.generator.NLDeepGenerator", "models.generator.Generator", "models.generator.DeepGenerator",
            "utils.Normalizer", "utils.normalize"},
        # NAYER's label-conditioned DCGAN_Generator is not fastsynth's; its GenerativeSynthesizer
        # returns a generator loss fastsynth's does not
        "left": {"synthesis.GenerativeSynthesizer", "models.generator.DCGAN_Generator"}},
    "cmi": {
        "replaced": CRITERIONS_ALL | CMI_ALL | {
            "synthesis.DeepInvSyntheiszer", "synthesis.GenerativeSynthesizer", "hooks.DeepInversionHook",
            "models.generator.Generator", "models.generator.LargeGenerator", "models.generator.DCGAN_Generator",
            "utils.Normalizer", "utils.normalize"},
        "left": set()},
}


@pytest.mark.parametrize("flavour", ["fast-datafree", "nayer", "cmi"])
def test_patch_replaces_reports_and_unpatch_restores(make_datafree, flavour, capsys):
    datafree = make_datafree(flavour)
    importlib.import_module("datafree.models.generator")  # as the harness's registry.py does
    before = _snapshot(datafree)
    feature_hook = datafree.hooks.FeatureHook
    own = {c: dict(vars(c)) for c in (fs.FastMetaSynthesizer, fs.FastSynthesizer, fs.NAYER, fs.DeepInvSyntheiszer,
                                      fs.GenerativeSynthesizer, fs.CMISynthesizer, fs.CMISynthesizerCMI)}
    report = fastsynth.patch(datafree)
    for c, attrs in own.items():  # fastsynth's own classes are not modified
        assert dict(vars(c)) == attrs
    line = capsys.readouterr().err
    assert f"flavour={flavour!r}" in line and "replaced synthesis." in line and "; left " in line
    assert report.flavour == flavour
    exp = EXPECTED[flavour]
    assert exp["replaced"] <= set(report.replaced), exp["replaced"] - set(report.replaced)
    assert exp["left"] <= set(report.left)
    assert not set(report.replaced) & set(report.left)
    # anything else replaced is a name fastsynth gained since (the table is looked up by name);
    # anything left for want of an equivalent really has none
    from fastsynth.patch import TABLE

    where = {up: (mod, attr) for up, mod, attr in TABLE}
    for name in set(report.replaced) - exp["replaced"]:
        assert name in ("synthesis.FastMetaSynthesizerForImageNet", "criterions.get_image_prior_losses"), name
    for name, why in report.left.items():
        if why == "no fastsynth equivalent":
            mod, attr = where[name]
            assert not hasattr(importlib.import_module(mod), attr)
        assert name.split(".")[-1] in line
    if flavour == "nayer":
        assert "parameter 'ngf' at another position" in report.left["models.generator.DCGAN_Generator"]
    # everything the report names as replaced is a fastsynth object now; nothing else moved
    after = _snapshot(datafree)
    changed = set()
    for mod, attrs in before.items():
        for k, v in attrs.items():
            if after[mod][k] is not v:
                changed.add(mod[len("datafree."):] + "." + k)
    assert changed == set(report.replaced)
    assert datafree.hooks.FeatureHook is feature_hook
    assert datafree.hooks.DeepInversionHook is fastsynth.DeepInversionHook
    assert datafree.criterions.KLDiv is fastsynth.KLDiv
    assert issubclass(datafree.synthesis.DeepInvSyntheiszer, fs.DeepInvSyntheiszer)
    assert datafree.synthesis.DeepInvSyntheiszer is not fs.DeepInvSyntheiszer  # a flavoured subclass
    assert datafree.synthesis.DeepInvSyntheiszer.__name__ == "DeepInvSyntheiszer"
    # patching again replaces the first patch (unpatched in between), same result
    again = fastsynth.patch(datafree, verbose=False)
    assert again.replaced == report.replaced
    fastsynth.unpatch(datafree)
    _same(before, _snapshot(datafree))
    fastsynth.unpatch(datafree)  # a second unpatch is a no-op
    _same(before, _snapshot(datafree))


def test_patch_imports_models_like_registry(make_datafree):
    """Fast-Datafree's package __init__ does not import models; its registry.py does. patch()
    imports datafree.models.generator itself so the generators are replaced either way."""
    datafree = make_datafree("fast-datafree")
    assert "datafree.models" not in sys.modules
    report = fastsynth.patch(datafree, verbose=False)
    assert "models.generator.Generator" in report.replaced
    assert datafree.models.generator.Generator is fastsynth.nn.Generator


def test_patch_leaves_a_fork_with_another_signature(make_datafree):
    """A fork whose class takes other arguments or defaults keeps its own class, with the reason."""
    def edit(src):
        src["datafree/synthesis/fast_meta.py"] = src["datafree/synthesis/fast_meta.py"].replace(
            "lr_g=0.1", "lr_g=0.5")
        src["datafree/synthesis/fast.py"] = src["datafree/synthesis/fast.py"].replace(
            "is_maml=1", "is_maml=1, temperature=4.0")
        return src

    datafree = make_datafree("fast-datafree", edit)
    original = datafree.synthesis.FastMetaSynthesizer
    report = fastsynth.patch(datafree, verbose=False)
    assert datafree.synthesis.FastMetaSynthesizer is original
    assert "lr_g=0.1 here, 0.5 upstream" in report.left["synthesis.FastMetaSynthesizer"]
    assert "temperature" in report.left["synthesis.FastSynthesizer"]
    assert "synthesis.DeepInvSyntheiszer" in report.replaced


def test_new_fastsynth_names_are_picked_up(make_datafree, monkeypatch):
    """The table is looked up by name: a synthesizer fastsynth gains later is installed (as a
    flavoured subclass) without touching patch(); a missing one is left, with the reason."""
    datafree = make_datafree("cmi")

    class CMISynthesizer(fs.DeepInvSyntheiszer):
        def __init__(self, teacher, student, generator, nz, num_classes, img_size, feature_layers=None,
                     bank_size=40960, n_neg=4096, head_dim=128, init_dataset=None, iterations=100, lr_g=0.1,
                     progressive_scale=False, synthesis_batch_size=128, sample_batch_size=128, adv=0.0, bn=1,
                     oh=1, cr=0.8, cr_T=0.1, save_dir='run/cmi', transform=None, autocast=None, use_fp16=False,
                     normalizer=None, device='cpu', distributed=False, *, save_images=False, **kw):
            self.save_images, self.kw = save_images, kw

    # the cmi flavour installs the class with zju-vipa/CMI's constructor order (CMISynthesizerCMI)
    monkeypatch.delattr(fs, "CMISynthesizer", raising=False)
    monkeypatch.delattr(fs, "CMISynthesizerCMI", raising=False)
    report = fastsynth.patch(datafree, verbose=False)
    assert report.left["synthesis.CMISynthesizer"] == "no fastsynth equivalent"
    monkeypatch.setattr(fs, "CMISynthesizer", CMISynthesizer, raising=False)
    report = fastsynth.patch(datafree, verbose=False)
    assert report.left["synthesis.CMISynthesizer"] == "no fastsynth equivalent"
    monkeypatch.setattr(fs, "CMISynthesizerCMI", CMISynthesizer, raising=False)
    report = fastsynth.patch(datafree, verbose=False)
    assert "synthesis.CMISynthesizer" in report.replaced
    patched = datafree.synthesis.CMISynthesizer
    assert issubclass(patched, CMISynthesizer) and patched.fastsynth_flavour == "cmi"
    obj = patched(None, None, None, 8, NC, (3, IMG, IMG))
    assert obj.save_images == "png" and obj.kw == {}  # the patched default: PNGs where upstream writes them


# ------------------------------------------------------------------------------------------------
# the miniature harnesses

def test_fast_datafree_imagenet_harness(make_datafree, tmp_path):
    """datafree_kd_imagenet.py's fast_meta path: FastMetaSynthesizerForImageNet with a
    DeepGenerator and a spatial z, its three-element return, PNGs in save_dir."""
    datafree = make_datafree("fast-datafree")
    fastsynth.patch(datafree, verbose=False)
    teacher, student = _models()
    save_dir = str(tmp_path / "run" / "imagenet")
    normalizer = datafree.utils.Normalizer(mean=MEAN, std=STD)
    nz, img = 8, 32  # DeepGenerator: a multiple of 32
    generator = datafree.models.generator.DeepGenerator(nz=nz, ngf=4, img_size=img, nc=3)
    synthesizer = datafree.synthesis.FastMetaSynthesizerForImageNet(
        teacher, student, generator, nz=nz, num_classes=NC, img_size=(3, img, img), init_dataset=None,
        save_dir=save_dir, device=None, transform=None, normalizer=normalizer, synthesis_batch_size=B,
        sample_batch_size=B, iterations=2, lr_g=5e-3, lr_z=0.015, lr_z_meta=0.015, lr_g_meta=5e-3, adv=1.33,
        bn=10.0, oh=0.5, reinit=0, bn_mmt=0.9, is_maml=1)
    assert isinstance(synthesizer, fs.FastMetaSynthesizerForImageNet)
    criterion = datafree.criterions.KLDiv(T=20)
    optimizer = torch.optim.SGD(student.parameters(), 0.1, weight_decay=1e-4, momentum=0.9)
    for _ in range(2):
        vis, losses, secs = synthesizer.synthesize()
        assert set(vis) == {"synthetic", "meta"} and set(losses) == {"loss_bn", "loss_oh"}
        assert isinstance(secs, float) and all(np.isfinite(float(v)) for v in losses.values())
        _kd_steps(datafree, synthesizer, student, teacher, criterion, optimizer)
    synthesizer.data_pool.flush()
    assert len(_png_files(save_dir)) == 2 * B
    synthesizer.close()


@pytest.mark.parametrize("method", ["fast_meta", "fast", "deepinv"])
def test_fast_datafree_harness(make_datafree, tmp_path, method):
    """datafree_kd.py of zju-vipa/Fast-Datafree, unchanged apart from fastsynth.patch(datafree)."""
    datafree = make_datafree("fast-datafree")
    fastsynth.patch(datafree, verbose=False)
    teacher, student = _models()
    save_dir = str(tmp_path / "run" / method)
    normalizer = datafree.utils.Normalizer(mean=MEAN, std=STD)
    criterion = datafree.criterions.KLDiv(T=20)
    if method == "deepinv":
        synthesizer = datafree.synthesis.DeepInvSyntheiszer(
            teacher=teacher, student=student, num_classes=NC, img_size=(3, IMG, IMG), iterations=2, lr_g=0.1,
            synthesis_batch_size=B, sample_batch_size=B, adv=1, bn=10, oh=1, tv=0.0, l2=0.0,
            save_dir=save_dir, transform=None, normalizer=normalizer, device=None)
        base = fs.DeepInvSyntheiszer
    else:
        nz = 8
        generator = datafree.models.generator.Generator(nz=nz, ngf=4, img_size=IMG, nc=3)
        cls = datafree.synthesis.FastSynthesizer if method == "fast" else datafree.synthesis.FastMetaSynthesizer
        synthesizer = cls(teacher, student, generator, nz=nz, num_classes=NC, img_size=(3, IMG, IMG),
                          init_dataset=None, save_dir=save_dir, device=None, transform=None, normalizer=normalizer,
                          synthesis_batch_size=B, sample_batch_size=B, iterations=2, warmup=1, lr_g=5e-3,
                          lr_z=0.015, adv=1.33, bn=10.0, oh=0.5, reset_l0=1, reset_bn=0, bn_mmt=0.9, is_maml=1)
        base = fs.FastSynthesizer if method == "fast" else fs.FastMetaSynthesizer
    assert isinstance(synthesizer, base)
    optimizer = torch.optim.SGD(student.parameters(), 0.1, weight_decay=1e-4, momentum=0.9)
    for epoch in range(2):
        result = synthesizer.synthesize()
        vis_results, cost = result  # Fast-Datafree: (vis, seconds)
        assert len(result) == 2 and isinstance(cost, float)
        _kd_steps(datafree, synthesizer, student, teacher, criterion, optimizer)
        for vis_name, vis_image in vis_results.items():
            datafree.utils.save_image_batch(vis_image, str(tmp_path / f"ckpt/{vis_name}-{method}.png"))
    # every synthesized image as a PNG in save_dir, upstream's layout {batch}-{k}.png
    synthesizer.data_pool.flush()
    assert _png_files(save_dir) == sorted(f"{i}-{k}.png" for i in range(2) for k in range(B))
    pool = synthesizer.data_pool.images()
    for i in range(2):
        for k in range(B):
            np.testing.assert_array_equal(_read_png(os.path.join(save_dir, f"{i}-{k}.png")), pool[i * B + k].numpy())
    synthesizer.close()


def test_nayer_harness(make_datafree, tmp_path):
    """tmtuan1307/nayer's datafree_kd.py (CIFAR path), with NAYER's open PR's num_workers= keyword."""
    datafree = make_datafree("nayer")
    fastsynth.patch(datafree, verbose=False)
    teacher, student = _models()
    label_emb = torch.randn(NC, 16)
    generator = datafree.models.generator.NLGenerator(ngf=4, img_size=IMG, nc=3, nl=NC, label_emb=label_emb,
                                                       le_emb_size=8, sbz=B, le_size=16)
    assert isinstance(generator, fastsynth.nn.NLGenerator)
    normalizer = datafree.utils.Normalizer(mean=MEAN, std=STD)
    synthesizer = datafree.synthesis.NAYER(
        teacher, student, generator, num_classes=NC, img_size=(3, IMG, IMG), init_dataset=None,
        save_dir=str(tmp_path / "run"), device=None, transform=None, normalizer=normalizer,
        synthesis_batch_size=B, sample_batch_size=B, g_steps=2, warmup=1, lr_g=4e-3, adv=1.0, bn=10.0, oh=1.0,
        bn_mmt=0.9, g_life=10, g_loops=1, gwp_loops=2, num_workers=4)
    criterion = datafree.criterions.KLDiv(T=20)
    optimizer = torch.optim.SGD(student.parameters(), 0.1, weight_decay=1e-4, momentum=0.9)
    warmup = 1
    for epoch in range(3):
        vis_results, cost, loss_synthesizer, loss_oh = synthesizer.synthesize()
        assert isinstance(vis_results["synthetic"], list)
        assert len(vis_results["synthetic"]) == (2 if epoch < warmup else 1)
        "SL:{sl:.4f} OH:{oh:.4f} Cost:{co:.4f}".format(sl=loss_synthesizer, oh=loss_oh, co=cost)
        if epoch >= warmup:
            del vis_results
            _kd_steps(datafree, synthesizer, student, teacher, criterion, optimizer)
    synthesizer.data_pool.flush()
    assert _png_files(tmp_path / "run") == sorted(f"{i}-{k}.png" for i in range(4) for k in range(B))
    synthesizer.close()


@pytest.mark.parametrize("method", ["fast_meta", "fast"])
def test_nayer_repo_fast_copies_return_their_tuples(make_datafree, tmp_path, method):
    """NAYER's own FastMetaSynthesizer returns ({"synthetic": [x]}, s, loss.item(), loss_oh.item())
    and its FastSynthesizer (vis, s, loss): the last inner step's losses."""
    datafree = make_datafree("nayer")
    fastsynth.patch(datafree, verbose=False)
    teacher, student = _models()
    nz = 8
    generator = datafree.models.generator.Generator(nz=nz, ngf=4, img_size=IMG, nc=3, nl=NC)
    cls = datafree.synthesis.FastMetaSynthesizer if method == "fast_meta" else datafree.synthesis.FastSynthesizer
    # bn=0, adv=0, oh=1: the total loss is the one-hot loss
    synthesizer = cls(teacher, student, generator, nz=nz, num_classes=NC, img_size=(3, IMG, IMG),
                      save_dir=str(tmp_path / "run"), device=None, normalizer=fs.Normalizer(MEAN, STD),
                      synthesis_batch_size=B, sample_batch_size=B, iterations=3, warmup=0, lr_g=5e-3, lr_z=0.015,
                      adv=0.0, bn=0.0, oh=1.0, num_workers=2)
    synthesizer.log_losses = True
    for _ in range(2):
        if method == "fast_meta":
            vis, cost, loss, loss_oh = synthesizer.synthesize()
            assert isinstance(vis["synthetic"], list) and len(vis["synthetic"]) == 1
            assert vis["synthetic"][0].shape == (B, 3, IMG, IMG)
            assert isinstance(loss, float) and isinstance(loss_oh, float)
            assert loss == pytest.approx(loss_oh, rel=1e-6)
        else:
            vis, cost, loss = synthesizer.synthesize()
            assert torch.is_tensor(vis["synthetic"]) and torch.is_tensor(loss) and loss.dim() == 0
            loss = float(loss)
        assert isinstance(cost, float)
        # the last inner step's loss (not the best one)
        assert loss == pytest.approx(float(synthesizer.loss_log[-1]), rel=1e-6)
        assert len(synthesizer.loss_log) % 3 == 0
    synthesizer.close()


def test_generative_harness(make_datafree, tmp_path):
    """The generative methods (DAFL here): Fast-Datafree's sample() returns (images, seconds),
    CMI's the images alone; synthesize() (vis, seconds) and a bare dict."""
    for flavour in ("fast-datafree", "cmi"):
        datafree = make_datafree(flavour)
        fastsynth.patch(datafree, verbose=False)
        teacher, student = _models()
        nz = 16
        gen_cls = datafree.models.generator.LargeGenerator if flavour == "cmi" else \
            datafree.models.generator.Generator
        generator = gen_cls(nz=nz, ngf=4, img_size=IMG, nc=3)
        criterion = datafree.criterions.KLDiv()
        synthesizer = datafree.synthesis.GenerativeSynthesizer(
            teacher=teacher, student=student, generator=generator, nz=nz, img_size=(3, IMG, IMG), iterations=1,
            lr_g=1e-3, synthesis_batch_size=B, sample_batch_size=B, adv=0, bn=1, oh=1, act=0.1, balance=5,
            criterion=criterion, normalizer=datafree.utils.Normalizer(mean=MEAN, std=STD), device=None)
        assert isinstance(synthesizer, fs.GenerativeSynthesizer)
        out = synthesizer.synthesize()
        if flavour == "cmi":
            assert isinstance(out, dict) and out["synthetic"].shape == (B, 3, IMG, IMG)
            images = synthesizer.sample()
        else:
            vis, cost = out
            assert isinstance(cost, float) and vis["synthetic"].shape == (B, 3, IMG, IMG)
            images, cost = synthesizer.sample()
        assert torch.is_tensor(images) and images.shape == (B, 3, IMG, IMG)
        if hasattr(synthesizer, "close"):
            synthesizer.close()


def test_cmi_harness(make_datafree, tmp_path):
    """zju-vipa/CMI's datafree_kd.py (deepinv): synthesize() returns a bare dict; its
    DeepInversionHook takes the module alone."""
    datafree = make_datafree("cmi")
    fastsynth.patch(datafree, verbose=False)
    teacher, student = _models()
    normalizer = datafree.utils.Normalizer(mean=MEAN, std=STD)
    synthesizer = datafree.synthesis.DeepInvSyntheiszer(
        teacher=teacher, student=student, num_classes=NC, img_size=(3, IMG, IMG), iterations=2, lr_g=0.1,
        synthesis_batch_size=B, sample_batch_size=B, adv=1, bn=10, oh=1, tv=0.0, l2=0.0,
        save_dir=str(tmp_path / "run"), transform=None, normalizer=normalizer, device=None)
    criterion = datafree.criterions.KLDiv(T=20)
    optimizer = torch.optim.SGD(student.parameters(), 0.1, weight_decay=1e-4, momentum=0.9)
    for _ in range(2):
        vis_results = synthesizer.synthesize()
        assert isinstance(vis_results, dict)
        _kd_steps(datafree, synthesizer, student, teacher, criterion, optimizer)
        for vis_name, vis_image in vis_results.items():
            datafree.utils.save_image_batch(vis_image, str(tmp_path / f"ckpt/{vis_name}.png"))
    # CMI's DeepInversion has no student BN term (Fast-Datafree's has -0.001 * student BN)
    assert synthesizer.s_capture is None
    hooks = [datafree.hooks.DeepInversionHook(m) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    teacher(torch.rand(4, 3, IMG, IMG))
    assert all(torch.isfinite(h.r_feature) for h in hooks)
    for h in hooks:
        h.remove()
    synthesizer.data_pool.flush()
    assert len(_png_files(tmp_path / "run")) == 2 * B
    synthesizer.close()


@pytest.mark.parametrize("flavour", ["fast-datafree", "nayer", "cmi"])
def test_cmi_method_harness(make_datafree, tmp_path, flavour):
    """The cmi method of each repository's datafree_kd.py: Generator(nz=256 scaled down), every
    BatchNorm input hooked (feature_layers=None) or the stages (the ResNet-34 branch), a bank and
    head as the script sizes them (scaled down); Fast-Datafree and NAYER pass feature_reuse=False
    and unpack (vis, seconds), zju-vipa/CMI passes no feature_reuse and reads a bare dict."""
    datafree = make_datafree(flavour)
    fastsynth.patch(datafree, verbose=False)
    teacher, student = _models()
    nz = 16
    generator = datafree.models.generator.Generator(nz=nz, ngf=4, img_size=IMG, nc=3)
    save_dir = str(tmp_path / "run" / "cmi")
    extra = {} if flavour == "cmi" else {"feature_reuse": False}
    for feature_layers in (None, [teacher.conv2, teacher.bn2]):
        synthesizer = datafree.synthesis.CMISynthesizer(
            teacher, student, generator, nz=nz, num_classes=NC, img_size=(3, IMG, IMG), **extra,
            feature_layers=feature_layers, bank_size=4 * B, n_neg=2 * B, head_dim=16, init_dataset=None,
            iterations=2, lr_g=1e-3, progressive_scale=False, synthesis_batch_size=B, sample_batch_size=B,
            adv=0.5, bn=1, oh=0.5, cr=0.8, cr_T=0.1, save_dir=save_dir, transform=None,
            normalizer=datafree.utils.Normalizer(mean=MEAN, std=STD), device=None)
        assert isinstance(synthesizer, fs.CMISynthesizer)
        assert type(synthesizer).__name__ == "CMISynthesizer"
        assert synthesizer.cmi_dim == 16 and synthesizer.mem_bank.dim_feat == 32
        assert isinstance(synthesizer.head, datafree.synthesis.contrastive.MLPHead)
        criterion = datafree.criterions.KLDiv(T=20)
        optimizer = torch.optim.SGD(student.parameters(), 0.1, weight_decay=1e-4, momentum=0.9)
        for _ in range(3):
            result = synthesizer.synthesize()
            if flavour == "cmi":
                assert isinstance(result, dict)
                vis_results = result
            else:
                vis_results, cost = result
                assert isinstance(cost, float)
            assert vis_results["synthetic"].shape == (B, 3, IMG, IMG)
            _kd_steps(datafree, synthesizer, student, teacher, criterion, optimizer)
        assert synthesizer.mem_bank.n_updates == 3 * B
        synthesizer.data_pool.flush()
        synthesizer.close()
    # every synthesized image as a PNG in save_dir (two synthesizers, numbering continued)
    assert len(_png_files(save_dir)) == 2 * 3 * B
    # the helpers of datafree.synthesis.contrastive and datafree.hooks are fastsynth's
    bank = datafree.synthesis.contrastive.MemoryBank("cpu", max_size=8, dim_feat=4)
    bank.add(torch.ones(3, 4))
    assert bank.get_data(8)[0].shape == (3, 4)
    views = datafree.synthesis.contrastive.MultiTransform([lambda x: x + 1, lambda x: x * 2])(torch.ones(1))
    assert [v.item() for v in views] == [2.0, 2.0]
    hook = datafree.hooks.InstanceMeanHook(teacher.bn1)
    x = torch.rand(2, 3, IMG, IMG)
    teacher(x)
    torch.testing.assert_close(hook.instance_mean, teacher.conv1(x).mean(dim=[2, 3]))
    hook.remove()


# ------------------------------------------------------------------------------------------------
# outputs

def test_png_numbering_continues_across_calls_and_restarts(tmp_path):
    teacher, student = _models()
    save_dir = str(tmp_path / "run")

    def build():
        return fs.FastMetaSynthesizer(teacher, student, fastsynth.nn.Generator(nz=8, ngf=4, img_size=IMG), nz=8,
                                      num_classes=NC, img_size=(3, IMG, IMG), iterations=1, synthesis_batch_size=4,
                                      sample_batch_size=4, save_dir=save_dir, save_images="png")

    s = build()
    s.synthesize()
    s.synthesize()
    s.close()
    first = {f: open(os.path.join(save_dir, f), "rb").read() for f in _png_files(save_dir)}
    assert sorted(first) == sorted(f"{i}-{k}.png" for i in range(2) for k in range(4))
    # a restarted run (a new process forgets the counter: clear this process's memory of the dir)
    from fastsynth.synthesis import pool as pool_mod

    pool_mod._DIR_NEXT.pop(os.path.abspath(save_dir))
    s2 = build()
    s2.synthesize()
    # and a second synthesizer on the same directory in the same process
    s3 = build()
    s3.synthesize()
    s2.close()
    s3.close()
    files = _png_files(save_dir)
    assert sorted(files) == sorted(f"{i}-{k}.png" for i in range(4) for k in range(4))
    for f, data in first.items():
        assert open(os.path.join(save_dir, f), "rb").read() == data


def test_save_images_png_and_off(tmp_path, make_datafree):
    teacher, student = _models()
    s = fs.DeepInvSyntheiszer(teacher, student, NC, (3, IMG, IMG), iterations=1, synthesis_batch_size=4,
                              save_dir=str(tmp_path / "png"), save_images="png", num_workers=4)
    s.synthesize()
    s.close()
    assert _png_files(tmp_path / "png") == [f"0-{k}.png" for k in range(4)]
    datafree = make_datafree("fast-datafree")
    fastsynth.patch(datafree, verbose=False)
    s = datafree.synthesis.DeepInvSyntheiszer(teacher, student, NC, (3, IMG, IMG), iterations=1,
                                              synthesis_batch_size=4, save_dir=str(tmp_path / "off"),
                                              save_images=False)
    s.synthesize()
    s.close()
    assert not os.path.exists(tmp_path / "off")
    with pytest.raises(ValueError, match="save_images must be .*got 'jpg'"):
        fs.DeepInvSyntheiszer(teacher, student, NC, (3, IMG, IMG), save_images="jpg")


def test_init_dataset_folder_of_images(tmp_path):
    """--cmi_init: a folder of PNG/JPG images, sampled with the pool but kept apart from it."""
    init = tmp_path / "init" / "sub"
    init.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, IMG, IMG, 3), dtype=np.uint8)
    for i, a in enumerate(imgs[:4]):
        PIL.fromarray(a).save(init / f"{i}.png")
    PIL.fromarray(imgs[4]).save(init / "4.jpg", quality=95)
    teacher, student = _models()
    s = fs.FastMetaSynthesizer(teacher, student, fastsynth.nn.Generator(nz=8, ngf=4, img_size=IMG), nz=8,
                               num_classes=NC, img_size=(3, IMG, IMG), init_dataset=str(tmp_path / "init"),
                               iterations=1, synthesis_batch_size=4, sample_batch_size=64,
                               save_dir=str(tmp_path / "run"), save_images="png", augment=False, pool_capacity=4)
    pool = s.data_pool
    assert len(pool) == 0  # kept apart: not in the pool
    got = pool.sample(64)
    assert got.shape == (5, 3, IMG, IMG)  # all five init images, nothing else yet
    want = torch.from_numpy(imgs.transpose(0, 3, 1, 2)).float() / 255
    for w in want[:4]:  # the PNGs exactly (the JPG is lossy)
        assert sum(bool(torch.equal(g, w)) for g in got) == 1
    s.synthesize()
    assert len(pool) == 4
    both = pool.sample(64)
    assert both.shape == (9, 3, IMG, IMG)
    s.synthesize()  # the pool holds 4 (pool_capacity): synthesized images are evicted, init ones never
    assert len(pool) == 4
    after = pool.sample(64)
    assert after.shape == (9, 3, IMG, IMG)
    for w in want[:4]:
        assert sum(bool(torch.equal(g, w)) for g in after) == 1
    s.data_pool.flush()
    assert _png_files(tmp_path / "run") == [f"{i}-{k}.png" for i in range(2) for k in range(4)]  # not the init ones
    s.close()
    bad = tmp_path / "bad"
    bad.mkdir()
    PIL.fromarray(imgs[0][:8]).save(bad / "x.png")
    with pytest.raises(ValueError, match=r"x.png is 8x16, expected 16x16"):
        fs.FastMetaSynthesizer(teacher, student, fastsynth.nn.Generator(nz=8, ngf=4, img_size=IMG), nz=8,
                               num_classes=NC, img_size=(3, IMG, IMG), init_dataset=str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no shard_.*PNG or JPG"):
        fs.FastMetaSynthesizer(teacher, student, fastsynth.nn.Generator(nz=8, ngf=4, img_size=IMG), nz=8,
                               num_classes=NC, img_size=(3, IMG, IMG), init_dataset=str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------
# bad input: a clear error at construction

def _nl_generator(img_size=IMG):
    return fastsynth.nn.NLGenerator(ngf=4, img_size=img_size, nc=3, nl=NC, label_emb=torch.randn(NC, 16),
                                    le_emb_size=8, le_size=16, sbz=B)


def test_construction_errors_name_the_argument():
    teacher, student = _models()
    gen = fastsynth.nn.Generator(nz=8, ngf=4, img_size=IMG)
    kw = dict(num_classes=NC, img_size=(3, IMG, IMG), synthesis_batch_size=B)
    with pytest.raises(ValueError, match="FastMetaSynthesizer: iterations must be >= 1, got 0"):
        fs.FastMetaSynthesizer(teacher, student, gen, nz=8, iterations=0, **kw)
    with pytest.raises(TypeError, match="iterations must be an int >= 1, got float 2.5"):
        fs.FastSynthesizer(teacher, student, gen, nz=8, iterations=2.5, **kw)
    with pytest.raises(ValueError, match="NAYER: g_steps must be >= 1, got 0"):
        fs.NAYER(teacher, student, _nl_generator(), g_steps=0, **kw)
    with pytest.raises(TypeError, match=r"NAYER generator with reinit\(\) and re_init_le\(\).*got Generator"):
        fs.NAYER(teacher, student, gen, **kw)
    with pytest.raises(ValueError, match=r"nz=16 but the generator \(Generator\) takes z of 8 features"):
        fs.FastMetaSynthesizer(teacher, student, gen, nz=16, **kw)
    with pytest.raises(ValueError, match="num_classes=20 but the teacher has 10 outputs"):
        fs.FastMetaSynthesizer(teacher, student, gen, nz=8, **dict(kw, num_classes=20))
    with pytest.raises(ValueError, match="num_classes=11 but the teacher has 10 outputs"):
        fs.DeepInvSyntheiszer(teacher, student, 11, (3, IMG, IMG))
    with pytest.raises(ValueError, match="num_classes=12 but the teacher has 10 outputs"):
        fs.NAYER(teacher, student, _nl_generator(), **dict(kw, num_classes=12))
    with pytest.raises(ValueError, match="iterations must be >= 0, got -1"):
        fs.DeepInvSyntheiszer(teacher, student, NC, (3, IMG, IMG), iterations=-1)
    with pytest.raises(ValueError, match="img_size must be \\(C, H, W\\)"):
        fs.DeepInvSyntheiszer(teacher, student, NC, (IMG, IMG))


def test_crop_larger_than_padded_image_is_named():
    """NAYER's ImageNet script passes img_size=(3, 244, 244) for a 224 generator; here the same
    mistake at 16: crops of 28 from 16 + 2*4 = 24."""
    teacher, student = _models()
    with pytest.raises(ValueError, match=r"img_size=\(3, 28, 28\) asks for 28x28 crops, larger than the "
                                         r"generator's 16x16 images padded by aug_padding=4 \(24x24\)"):
        fs.NAYER(teacher, student, _nl_generator(), num_classes=NC, img_size=(3, 28, 28), synthesis_batch_size=B)
    with pytest.raises(ValueError, match="28x28 crops, larger than the generator's 16x16"):
        fs.FastMetaSynthesizer(teacher, student, fastsynth.nn.Generator(nz=8, ngf=4, img_size=IMG), nz=8,
                               num_classes=NC, img_size=(3, 28, 28))
    # the op itself, where no constructor could know the image size
    with pytest.raises(ValueError, match=r"crop size 244x244 does not fit the padded image 232x232 "
                                         r"\(224x224 images, padding=4\)"):
        crop_flip(torch.rand(1, 3, 224, 224), padding=4, size=(244, 244))
    assert crop_flip(torch.rand(2, 3, 16, 16), padding=4, size=(24, 24)).shape == (2, 3, 24, 24)


def test_deepinversion_student_without_batchnorm():
    """Upstream's student BN term is a sum over the student's BN hooks: 0 without BatchNorm."""
    teacher, student = _models(student_bn=False)
    s = fs.DeepInvSyntheiszer(teacher, student, NC, (3, IMG, IMG), iterations=2, synthesis_batch_size=4,
                              adv=1.0, bn=10.0, oh=1.0, seed=0)
    vis, _ = s.synthesize()
    assert torch.isfinite(vis["synthetic"]).all()
    assert s.s_capture is None
    s.close()
