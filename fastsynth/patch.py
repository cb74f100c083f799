"""``fastsynth.patch(datafree)``: the one-line switch for the upstream DFKD scripts.

The upstream harnesses (zju-vipa/Fast-Datafree, tmtuan1307/nayer, zju-vipa/CMI) all
``import datafree`` and reach everything through dotted names (``datafree.synthesis.NAYER``,
``datafree.hooks.DeepInversionHook``, ``datafree.criterions.KLDiv``,
``datafree.models.generator.Generator``, ...). One call right after the import swaps in every
fastsynth equivalent and leaves the rest of the package alone::

    import datafree
    import fastsynth
    fastsynth.patch(datafree)

What is replaced is data: ``TABLE`` maps an upstream dotted name (relative to the package) to the
fastsynth module and attribute holding its equivalent. An entry is installed only when

- the fastsynth attribute exists (synthesizers, losses and generators added to fastsynth later
  are picked up by name, nothing else to change), and the upstream attribute exists; and
- the fastsynth object accepts every call the upstream one accepts: every upstream parameter
  exists in fastsynth's signature under the same name and, when it can be passed by position,
  at the same position; a parameter upstream may omit is optional in fastsynth too; fastsynth
  requires nothing upstream does not; literal defaults (numbers, strings, tuples) are equal.
  For ``nn.Module`` classes ``forward`` is compared the same way.

Everything else is left, with the reason, in the returned ``PatchReport`` and in the one line
written to stderr (``verbose=False`` silences it).

Return values (the "flavour"). The three repositories' harnesses unpack ``synthesize()``
differently, so the installed synthesizers are small subclasses of fastsynth's (created here,
fastsynth's own classes are never modified) that return what the patched repository returns:

=============== ============================= ==================================================
flavour         class                         ``synthesize()`` returns
=============== ============================= ==================================================
fast-datafree   FastMeta/Fast/DeepInv/...     ``(vis, seconds)``
nayer           NAYER                         ``(vis, seconds, best_cost, best_oh)``
nayer           FastMetaSynthesizer           ``({"synthetic": [images]}, seconds, last_loss,
                                              last_oh)`` (Python floats, as its ``.item()``)
nayer           FastSynthesizer               ``(vis, seconds, last_loss)`` (a 0-d tensor)
nayer           DeepInvSyntheiszer            ``(vis, seconds)``
cmi             DeepInvSyntheiszer            ``vis`` (a bare dict); no student BN term, as CMI's
cmi             CMI/GenerativeSynthesizer     ``vis``; CMI's GenerativeSynthesizer.sample() the
                                              images alone
=============== ============================= ==================================================

``last_loss`` / ``last_oh`` are the total and the cross-entropy loss of the last inner step, as
NAYER's copies return them. Classes whose flavoured return fastsynth cannot produce are left.

CMI's constructor differs between the repositories: Fast-Datafree's and NAYER's take
``feature_reuse`` between ``img_size`` and ``feature_layers``, zju-vipa/CMI's does not; the cmi
flavour installs ``CMISynthesizerCMI`` (that order, ``feature_reuse`` keyword-only) under the
name ``CMISynthesizer``. The helpers beside it (``synthesis.contrastive.MLPHead``,
``MultiTransform``, ``MemoryBank``, ``hooks.InstanceMeanHook``) are replaced in every flavour.

Flavour detection (``flavour=None``), from the package's synthesis module:
``datafree.synthesis.NAYER`` exists -> ``"nayer"``; else ``FastMetaSynthesizer`` exists ->
``"fast-datafree"``; else ``DeepInvSyntheiszer`` or ``CMISynthesizer`` exists -> ``"cmi"``;
otherwise a ValueError asks for ``flavour=``.

Outputs: the patched synthesizers default to ``save_images="png"``: every synthesized image is
written as ``{save_dir}/{batch}-{index}.png`` as upstream's ImagePool writes it, from the pool's
background thread; ``save_images=False`` turns it off. Upstream forks' extra keywords
(``num_workers=``) are accepted and ignored by the fastsynth synthesizers themselves.

``fastsynth.unpatch(datafree)`` puts back exactly the objects that were there.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import types

import torch
import torch.nn as nn

FLAVOURS = ("fast-datafree", "nayer", "cmi")

# upstream dotted name (relative to the datafree package) -> (fastsynth module, attribute)
TABLE: tuple = (
    # synthesizers
    ("synthesis.FastMetaSynthesizer", "fastsynth.synthesis", "FastMetaSynthesizer"),
    ("synthesis.FastSynthesizer", "fastsynth.synthesis", "FastSynthesizer"),
    ("synthesis.DeepInvSyntheiszer", "fastsynth.synthesis", "DeepInvSyntheiszer"),
    ("synthesis.NAYER", "fastsynth.synthesis", "NAYER"),
    ("synthesis.GenerativeSynthesizer", "fastsynth.synthesis", "GenerativeSynthesizer"),
    ("synthesis.CMISynthesizer", "fastsynth.synthesis", "CMISynthesizer"),
    ("synthesis.contrastive.MLPHead", "fastsynth.synthesis", "MLPHead"),
    ("synthesis.contrastive.MultiTransform", "fastsynth.synthesis", "MultiTransform"),
    ("synthesis.contrastive.MemoryBank", "fastsynth.synthesis", "MemoryBank"),
    ("synthesis.FastMetaSynthesizerForImageNet", "fastsynth.synthesis", "FastMetaSynthesizerForImageNet"),
    # hooks
    ("hooks.DeepInversionHook", "fastsynth.hooks", "DeepInversionHook"),
    ("hooks.InstanceMeanHook", "fastsynth.synthesis", "InstanceMeanHook"),
    # criterions
    ("criterions.kldiv", "fastsynth.losses", "kldiv"),
    ("criterions.KLDiv", "fastsynth.losses", "KLDiv"),
    ("criterions.jsdiv", "fastsynth.losses", "jsdiv"),
    ("criterions.cross_entropy", "fastsynth.losses", "cross_entropy"),
    ("criterions.onehot_loss", "fastsynth.losses", "onehot_loss"),
    ("criterions.class_balance_loss", "fastsynth.losses", "class_balance_loss"),
    ("criterions.get_image_prior_losses", "fastsynth.losses", "get_image_prior_losses"),
    # generators
    ("models.generator.Generator", "fastsynth.nn", "Generator"),
    ("models.generator.DeepGenerator", "fastsynth.nn", "DeepGenerator"),
    ("models.generator.NLGenerator", "fastsynth.nn", "NLGenerator"),
    ("models.generator.NLDeepGenerator", "fastsynth.nn", "NLDeepGenerator"),
    ("models.generator.LargeGenerator", "fastsynth.nn", "LargeGenerator"),
    ("models.generator.DCGAN_Generator", "fastsynth.nn", "DCGAN_Generator"),
    # normalisation (the synthesis step calls it on every augmented batch)
    ("utils.Normalizer", "fastsynth.synthesis", "Normalizer"),
    ("utils.normalize", "fastsynth.synthesis", "normalize"),
)


# ---------------------------------------------------------------------------------------------
# return flavours: functions (synthesizer, fastsynth's result) -> the patched repo's result.
# fastsynth's own results are Fast-Datafree's (NAYER: NAYER's 4-tuple).

def _first(synth, result):
    """CMI's form: the dict alone from synthesize(), the images alone from sample()."""
    return result[0] if isinstance(result, tuple) else result


def _nayer_fast_meta(synth, result):
    vis, seconds = result
    last = torch.stack([synth._last_loss, synth._last_oh]).tolist()  # one host read, as upstream's .item()
    return {"synthetic": [vis["synthetic"]]}, seconds, last[0], last[1]


def _nayer_fast(synth, result):
    vis, seconds = result
    return vis, seconds, synth._last_loss.clone()


# flavour -> class name -> {"synthesize": adapter, "sample": adapter, "last_loss": bool (keep the
# last step's loss and one-hot loss), "student_bn": False (no student BN term), "class": the
# fastsynth.synthesis attribute to install instead (a constructor in that repository's order)}
# A name missing from a flavour's dict is installed unchanged (fastsynth's return is right);
# None marks a class whose flavoured return fastsynth does not produce (left upstream's).
RETURNS: dict = {
    "fast-datafree": {},
    "nayer": {
        "FastMetaSynthesizer": {"synthesize": _nayer_fast_meta, "last_loss": True},
        "FastSynthesizer": {"synthesize": _nayer_fast, "last_loss": True},
        # NAYER's copy returns the generator loss as a third value
        "GenerativeSynthesizer": None,
    },
    "cmi": {
        # CMI's DeepInversion has no student BN term (Fast-Datafree's adds -0.001 * student BN)
        "DeepInvSyntheiszer": {"synthesize": _first, "student_bn": False},
        # zju-vipa/CMI's constructor has no feature_reuse between img_size and feature_layers
        "CMISynthesizer": {"synthesize": _first, "class": "CMISynthesizerCMI"},
        # CMI's generative synthesizer returns a bare dict and sample() the images alone
        "GenerativeSynthesizer": {"synthesize": _first, "sample": _first},
    },
}


def detect_flavour(datafree) -> str:
    """Which repository ``datafree`` comes from (see the module docstring)."""
    syn = getattr(datafree, "synthesis", None)
    if not isinstance(syn, types.ModuleType):
        raise TypeError(f"patch: expected the upstream 'datafree' package (a module with a 'synthesis' "
                        f"submodule), got {datafree!r}")
    if hasattr(syn, "NAYER"):
        return "nayer"
    if hasattr(syn, "FastMetaSynthesizer"):
        return "fast-datafree"
    if hasattr(syn, "DeepInvSyntheiszer") or hasattr(syn, "CMISynthesizer"):
        return "cmi"
    raise ValueError(f"patch: cannot tell which repository {datafree.__name__!r} comes from (its synthesis "
                     f"module has neither NAYER, FastMetaSynthesizer, DeepInvSyntheiszer nor CMISynthesizer); "
                     f"pass flavour= one of {FLAVOURS}")


# ---------------------------------------------------------------------------------------------
# signature compatibility

_LITERALS = (bool, int, float, str, tuple)
_POS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _incompatible(up, ours) -> str | None:
    """Why a call written against ``up`` could fail or change meaning with ``ours`` (None: it
    cannot)."""
    su, so = _signature(up), _signature(ours)
    if su is None or so is None:
        return None if su is None else "signature not readable"
    pu, po = list(su.parameters.values()), list(so.parameters.values())
    ours_by_name = {p.name: p for p in po}
    ours_pos = [p.name for p in po if p.kind in _POS]
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in po)
    has_var_pos = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in po)
    for i, p in enumerate(pu):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            if not has_var_pos:
                return f"upstream takes *{p.name}"
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            if not has_var_kw:
                return f"upstream takes **{p.name}"
            continue
        q = ours_by_name.get(p.name)
        if q is None:
            if not has_var_kw:
                return f"no parameter {p.name!r}"
            continue
        if p.kind in _POS and (i >= len(ours_pos) or ours_pos[i] != p.name):
            return f"parameter {p.name!r} at another position"
        if p.default is not inspect.Parameter.empty:
            if q.default is inspect.Parameter.empty:
                return f"{p.name!r} is required here, optional upstream"
            a, b = p.default, q.default
            if isinstance(a, _LITERALS) and isinstance(b, _LITERALS):
                try:
                    same = bool(a == b)
                except Exception:  # noqa: BLE001 - an odd default is simply not comparable
                    same = True
                if not same:
                    return f"default {p.name}={b!r} here, {a!r} upstream"
    up_names = {p.name for p in pu}
    for q in po:
        if q.name not in up_names and q.default is inspect.Parameter.empty and \
                q.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            return f"requires {q.name!r}, which upstream does not take"
    return None


def _compatible_reason(up, ours) -> str | None:
    if isinstance(up, type) != isinstance(ours, type):
        return "class vs function"
    why = _incompatible(up, ours)
    if why is None and isinstance(up, type) and issubclass(up, nn.Module) and issubclass(ours, nn.Module):
        why = _incompatible(up.forward, ours.forward)
        if why is not None:
            why = "forward: " + why
    return why


# ---------------------------------------------------------------------------------------------
# flavoured synthesizer classes

def _record_last(self, loss, loss_oh):
    with torch.no_grad():
        if getattr(self, "_last_loss", None) is None:
            self._last_loss = torch.zeros((), dtype=torch.float32, device=self.device)
            self._last_oh = torch.zeros((), dtype=torch.float32, device=self.device)
        self._last_loss.copy_(loss.detach())
        self._last_oh.copy_(loss_oh.detach())


def _flavoured(cls: type, flavour: str, spec: dict | None, name: str | None = None) -> type:
    """A subclass of fastsynth's ``cls`` named ``name`` (the upstream class name; default
    ``cls.__name__``) that writes PNGs by default and returns ``flavour``'s values."""
    spec = spec or {}
    name = name or cls.__name__
    syn_adapt, sample_adapt = spec.get("synthesize"), spec.get("sample")
    ns: dict = {"__module__": __name__, "__qualname__": name, "fastsynth_flavour": flavour,
                "__doc__": f"fastsynth's {cls.__name__} as patched into a {flavour} 'datafree' package: "
                           f"PNGs into save_dir by default, {flavour}'s synthesize() return.\n\n"
                           + (cls.__doc__ or "")}

    # upstream writes PNGs where its synthesizer has a save_dir (not the generative one)
    writes_png = "save_images" in inspect.signature(cls.__init__).parameters

    def __init__(self, *args, **kwargs):
        if writes_png:
            kwargs.setdefault("save_images", "png")
        if spec.get("last_loss"):
            self._last_loss = self._last_oh = None
        cls.__init__(self, *args, **kwargs)
        if spec.get("student_bn") is False:
            self.s_capture = None
        if spec.get("last_loss"):
            _record_last(self, torch.zeros(()), torch.zeros(()))

    ns["__init__"] = __init__
    if syn_adapt is not None:
        def synthesize(self, *args, **kwargs):
            return syn_adapt(self, cls.synthesize(self, *args, **kwargs))
        ns["synthesize"] = synthesize
    if sample_adapt is not None:
        def sample(self, *args, **kwargs):
            return sample_adapt(self, cls.sample(self, *args, **kwargs))
        ns["sample"] = sample
    if spec.get("last_loss"):
        def objective(self, x, targets, adv_on, *args, **kwargs):
            # fastsynth's objective, with its cross-entropy part kept for the return value
            # (NAYER's copies return the last step's loss and one-hot loss)
            loss, _, loss_oh = cls.objective(self, x, targets, adv_on, *args, parts=True, **kwargs)
            _record_last(self, loss, loss_oh)
            return loss
        ns["objective"] = objective
    return type(name, (cls,), ns)


# ---------------------------------------------------------------------------------------------
# patch / unpatch

_STATE_ATTR = "__fastsynth_patch__"


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` did: ``replaced`` upstream dotted names, ``left`` {name: reason}."""

    package: str
    flavour: str
    replaced: list
    left: dict

    def line(self) -> str:
        rep = ", ".join(self.replaced) or "nothing"
        left = "; ".join(f"{k} ({v})" for k, v in self.left.items()) or "nothing"
        return f"fastsynth.patch({self.package}, flavour={self.flavour!r}): replaced {rep}; left {left}"


def _resolve_module(datafree, dotted: str):
    """The module ``datafree.<dotted>`` (imported if the package has not imported it yet, as the
    upstream registry.py does), None when the package has no such module, or a string saying why
    it could not be imported."""
    obj = datafree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        nxt = getattr(obj, part, None)
        if nxt is None:
            name = datafree.__name__ + "." + ".".join(parts[:i + 1])
            try:
                nxt = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:
                    return f"importing it failed: {exc}"
                return None  # this fork has no such module
            except Exception as exc:  # noqa: BLE001 - a broken upstream module is reported, not raised
                return f"importing it failed: {exc!r}"
        if not isinstance(nxt, types.ModuleType):
            return f"{'.'.join(parts[:i + 1])} is not a module"
        obj = nxt
    return obj


def patch(datafree, flavour: str | None = None, *, verbose: bool = True) -> PatchReport:
    """Swap fastsynth's equivalents into the upstream ``datafree`` package (in place).

    ``flavour``: ``"fast-datafree"``, ``"nayer"`` or ``"cmi"`` (None: detected, see the module
    docstring). Returns a ``PatchReport``; writes its one-line summary to stderr unless
    ``verbose=False``. Patching a package twice first undoes the earlier patch."""
    if not isinstance(datafree, types.ModuleType):
        raise TypeError(f"patch: datafree must be the imported upstream package (a module), got "
                        f"{type(datafree).__name__}")
    if flavour is None:
        flavour = detect_flavour(datafree)
    elif flavour not in FLAVOURS:
        raise ValueError(f"patch: flavour must be one of {FLAVOURS} or None, got {flavour!r}")
    if getattr(datafree, _STATE_ATTR, None) is not None:
        unpatch(datafree)
    saved: list = []  # (module, attribute, original)
    replaced: list = []
    left: dict = {}
    for up_name, fs_module, fs_attr in TABLE:
        mod_path, _, attr = up_name.rpartition(".")
        mod = _resolve_module(datafree, mod_path)
        if mod is None:
            continue  # the package has no such module: nothing to replace, nothing to report
        if isinstance(mod, str):
            left[up_name] = mod
            continue
        if not hasattr(mod, attr):
            continue
        original = getattr(mod, attr)
        ours = getattr(importlib.import_module(fs_module), fs_attr, None)
        if ours is None:
            left[up_name] = "no fastsynth equivalent"
            continue
        spec = RETURNS[flavour].get(fs_attr, {}) if fs_module == "fastsynth.synthesis" else {}
        if spec is None:
            left[up_name] = f"{flavour}'s return value is not produced by fastsynth"
            continue
        if spec.get("class"):
            ours = getattr(importlib.import_module(fs_module), spec["class"], None)
            if ours is None:
                left[up_name] = "no fastsynth equivalent"
                continue
        why = _compatible_reason(original, ours)
        if why is not None:
            left[up_name] = why
            continue
        if fs_module == "fastsynth.synthesis" and isinstance(ours, type) and hasattr(ours, "synthesize"):
            ours = _flavoured(ours, flavour, spec, name=attr)
        saved.append((mod, attr, original))
        setattr(mod, attr, ours)
        replaced.append(up_name)
    report = PatchReport(package=datafree.__name__, flavour=flavour, replaced=replaced, left=left)
    setattr(datafree, _STATE_ATTR, {"saved": saved, "report": report})
    if verbose:
        print(report.line(), file=sys.stderr)
    return report


def unpatch(datafree) -> None:
    """Undo ``patch(datafree)``: every replaced attribute gets its original object back (a
    package that was not patched is left as it is)."""
    state = getattr(datafree, _STATE_ATTR, None)
    if state is None:
        return
    for mod, attr, original in reversed(state["saved"]):
        setattr(mod, attr, original)
    delattr(datafree, _STATE_ATTR)


def patched(datafree) -> PatchReport | None:
    """The report of the patch currently applied to ``datafree`` (None when not patched)."""
    state = getattr(datafree, _STATE_ATTR, None)
    return None if state is None else state["report"]
