"""The benchmark harness, the CLI, the plots' data, the profiler and the GPU performance model.

Timings are never asserted: only that things run and that files and numbers are consistent.
"""
import csv
import json
import math
import os
import sys
import textwrap
import types

import pytest
import torch

from fastsynth import cli
from fastsynth.bench import perf_model as pm
from fastsynth.bench import plot as fsplot
from fastsynth.bench import runner

TINY_MODULE = textwrap.dedent('''
    import torch
    from fastsynth.bench import harness

    def run(quick=False, device="cpu"):
        n = 1 << 16
        x = torch.randn(n)
        eager = lambda: (x * 2).sum()
        fused = lambda: x.sum()
        rows = []
        for prov, fn in (("eager", eager), ("eager_compile", eager), ("fastsynth_cpu", fused)):
            t = harness.median_time(fn, warmup=1, reps=3)
            rows.append({"kernel": "tiny", "case": f"n={n}", "provider": prov, "median_ms": t * 1e3,
                         "bytes": 4 * n})
        rows[-1]["aten_ops"] = harness.count_aten_ops(fused)
        return rows

    def main(argv=None):
        return 0
''')


@pytest.fixture
def tiny_registry(tmp_path, monkeypatch):
    (tmp_path / "fs_tiny_bench.py").write_text(TINY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fs_tiny_bench", None)
    return {"tiny": "fs_tiny_bench"}


def _read(path):
    with open(path) as f:
        lines = f.read().splitlines()
    meta = [ln for ln in lines if ln.startswith("#")]
    body = [ln for ln in lines if not ln.startswith("#")]
    return meta, list(csv.DictReader(body))


def test_finalize_rows_fills_derived_columns_consistently():
    rows = [
        {"kernel": "k", "case": "a", "provider": "eager", "median_ms": 4.0, "bytes": 8e6},
        {"kernel": "k", "case": "a", "provider": "eager_compile", "median_ms": 2.0, "bytes": 8e6},
        {"kernel": "k", "case": "a", "provider": "fastsynth_cpu", "median_ms": 1.0, "bytes": 8e6,
         "speedup_vs_eager": 3.5},  # a module's own value is kept
        {"kernel": "k", "case": "b", "provider": "fastsynth_cpu", "median_ms": 1.0},  # no baseline, no bytes
    ]
    out = runner.finalize_rows(rows, bandwidth_GBps=16.0)
    assert all(list(r)[:len(runner.COLUMNS)] == runner.COLUMNS for r in out)
    fs = out[2]
    assert fs["GBps"] == pytest.approx(8e6 / 1e-3 / 1e9)
    assert fs["bw_frac"] == pytest.approx(8.0 / 16.0)
    assert fs["speedup_vs_eager"] == 3.5
    assert fs["speedup_vs_compile"] == pytest.approx(2.0)
    assert out[0]["speedup_vs_eager"] == pytest.approx(1.0)
    assert out[1]["speedup_vs_eager"] == pytest.approx(2.0)
    assert out[3]["GBps"] == "" and out[3]["bw_frac"] == "" and out[3]["speedup_vs_eager"] == ""


def test_run_suite_quick_on_tiny_registry_writes_one_csv(tiny_registry, tmp_path):
    logs = []
    res = runner.run_suite(None, quick=True, out_dir=str(tmp_path / "out"), registry=tiny_registry,
                           log=logs.append, bandwidth_bytes=4 * 2**20)
    assert any(m.startswith("[1/1] tiny") for m in logs)  # progress
    files = os.listdir(tmp_path / "out")
    assert files == [os.path.basename(res["csv"])]
    meta, rows = _read(res["csv"])
    keys = {m[1:].split(":")[0].strip() for m in meta}
    for k in ("date", "torch", "triton", "commit", "device", "cores", "read_GBps", "copy_GBps",
              "bw_ref_GBps", "build_info", "kernels", "failed"):
        assert k in keys, k
    assert list(rows[0])[:len(runner.COLUMNS)] == runner.COLUMNS
    assert "aten_ops" in rows[0]
    assert len(rows) == 3
    bw_ref = max(res["bandwidth"]["read_GBps"], res["bandwidth"]["copy_GBps"])
    for r in rows:
        assert float(r["median_ms"]) > 0
        assert float(r["GBps"]) == pytest.approx(float(r["bytes"]) / (float(r["median_ms"]) * 1e-3) / 1e9, rel=1e-6)
        assert float(r["bw_frac"]) == pytest.approx(float(r["GBps"]) / bw_ref, rel=1e-9)
        assert float(r["speedup_vs_eager"]) > 0 and float(r["speedup_vs_compile"]) > 0
    assert int(float(rows[2]["aten_ops"])) == 1
    # read back through the plotting reader
    meta2, rows2 = runner.read_csv(res["csv"])
    assert meta2["bw_ref_GBps"] == res["meta"]["bw_ref_GBps"] and len(rows2) == 3
    from fastsynth.bench import report

    md = report.markdown(res["csv"])
    assert "## tiny" in md and "| case | provider | median_ms |" in md and "Geometric mean" in md
    assert res["meta"]["command"] in md and res["meta"]["commit"] in md


def test_unknown_kernel_is_an_error(tiny_registry, tmp_path):
    with pytest.raises(runner.BenchmarkNotFound, match="unknown kernel"):
        runner.run_suite(["nope"], quick=True, out_dir=str(tmp_path), registry=tiny_registry, log=lambda m: None)
    out = tmp_path / "out"
    assert cli.main(["bench", "no_such_kernel", "--out", str(out)]) == 2
    assert runner.main(["no_such_kernel", "--out", str(out)]) == 2
    assert not out.exists()  # nothing was timed or written


def test_every_registered_benchmark_module_exists():
    for name in runner.REGISTRY:
        assert callable(runner.load_benchmark(name).run), name


def test_bench_entry_point_does_not_import_the_cli(tmp_path):
    """``python -m fastsynth.bench`` runs the benchmark runner without importing fastsynth.cli (and
    the distillation code behind it)."""
    import subprocess

    code = ("import runpy, sys\n"
            "sys.argv = ['fastsynth.bench', '--list']\n"
            "try:\n"
            "    runpy.run_module('fastsynth.bench', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "bad = sorted(m for m in sys.modules if m == 'fastsynth.cli' or m.startswith('fastsynth.distill'))\n"
            "print('IMPORTED', bad)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout
    for name in runner.REGISTRY:  # --list printed the registry
        assert name in out.stdout


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tiny_registry, tmp_path):
    (tmp_path / "fs_failing_bench.py").write_text(
        "def run(quick=False, device='cpu'):\n    raise ValueError('only runs on cpu')\n")
    registry = {"failing": "fs_failing_bench", "tiny": tiny_registry["tiny"]}
    logs = []
    res = runner.run_suite(None, quick=True, out_dir=str(tmp_path / "o"), registry=registry, log=logs.append,
                           bandwidth_bytes=2**20)
    assert list(res["failed"]) == ["failing"] and "only runs on cpu" in res["meta"]["failed"]
    assert {r["kernel"] for r in res["rows"]} == {"tiny"}
    assert any("FAILED" in m and "Traceback" in m for m in logs)


def test_broken_benchmark_module_is_not_silently_skipped(tmp_path, monkeypatch):
    (tmp_path / "fs_broken_bench.py").write_text("import fs_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        runner.load_benchmark("b", {"b": "fs_broken_bench"})


_real_median_time = runner.harness.median_time


@pytest.mark.parametrize("name", list(runner.REGISTRY))
def test_real_kernel_module_quick(name, tmp_path, monkeypatch):
    # The harness, not the timings, is under test: torch.compile becomes the identity (compiling
    # costs minutes here) and median_time times one call without warm-up.
    from fastsynth.bench import harness

    def one_shot(fn, *, warmup=0, reps=1, device=None, min_time=0.0):
        return _real_median_time(fn, warmup=0, reps=1, device=device)

    monkeypatch.setattr(torch, "compile", lambda fn=None, *a, **k: fn if fn is not None else (lambda f: f))
    monkeypatch.setattr(harness, "median_time", one_shot)
    mod = runner.load_benchmark(name)
    if hasattr(mod, "median_time"):
        monkeypatch.setattr(mod, "median_time", one_shot)
    res = runner.run_suite([name], quick=True, out_dir=str(tmp_path), log=lambda m: None, bandwidth_bytes=2**20)
    assert not res["failed"], res["failed"]
    meta, rows = _read(res["csv"])
    assert rows, f"{name}: run(quick=True) returned no rows"
    assert any(m.startswith("# commit:") for m in meta) and any(m.startswith("# bw_ref_GBps:") for m in meta)
    for r in rows:
        assert list(r)[:len(runner.COLUMNS)] == runner.COLUMNS
        assert r["kernel"] and r["case"] and r["provider"]
        assert float(r["median_ms"]) > 0
        if r["GBps"] not in ("", None):
            assert float(r["bw_frac"]) >= 0


def test_cli_bench_list_and_info(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in runner.REGISTRY:
        assert name in out
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastsynth 0.1.0" in out and "torch" in out and "extension" in out
    assert cli.main(["no-such-command"]) == 2


def test_cli_demo_forwards_args_or_says_it_is_absent(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("fastsynth.demo")

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "fastsynth.demo", fake)
    assert cli.main(["demo", "--method", "fast", "--epochs", "1"]) == 0
    assert seen["argv"] == ["--method", "fast", "--epochs", "1"]
    monkeypatch.setitem(sys.modules, "fastsynth.demo", None)  # import now fails as if absent
    assert cli.main(["demo"]) == 2
    assert "fastsynth.demo" in capsys.readouterr().err


ROWS = [
    {"kernel": "k", "case": "a", "provider": "eager", "speedup_vs_eager": 1.0, "bytes": 1e6, "GBps": 2.0},
    {"kernel": "k", "case": "a", "provider": "fastsynth_cpu", "speedup_vs_eager": 4.0, "bytes": 1e6, "GBps": 8.0},
    {"kernel": "k", "case": "b", "provider": "eager_compile", "speedup_vs_eager": 2.0, "bytes": "", "GBps": ""},
    {"kernel": "k", "case": "b", "provider": "fastsynth_cpu", "speedup_vs_eager": 5.0, "bytes": 2e6, "GBps": 6.0},
]


def test_plot_data_preparation():
    s = fsplot.speedup_series(ROWS)
    assert s["k"]["cases"] == ["a", "b"]
    assert s["k"]["providers"]["fastsynth_cpu"] == [4.0, 5.0]
    assert s["k"]["providers"]["eager_compile"] == [None, 2.0]
    assert "eager" not in s["k"]["providers"]
    pts = fsplot.roofline_points(ROWS)
    assert [(p["bytes"], p["GBps"]) for p in pts] == [(1e6, 2.0), (1e6, 8.0), (2e6, 6.0)]


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    path = runner.harness.write_csv(runner.finalize_rows(ROWS, 10.0), str(tmp_path / "r.csv"), {"bw_ref_GBps": 10})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r"fastsynth\[plot\]"):
        fsplot.plot_csv(path)
    assert cli.main(["plot", path]) == 2


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    path = runner.harness.write_csv(runner.finalize_rows(ROWS, 10.0), str(tmp_path / "r.csv"), {"bw_ref_GBps": 10})
    pngs = fsplot.plot_csv(path, str(tmp_path / "png"))
    assert len(pngs) == 2 and any("roofline" in p for p in pngs) and any("speedup_k" in p for p in pngs)
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_profile_writes_trace_and_table(tmp_path):
    from fastsynth.bench import profile

    res = profile.profile(steps=1, out_dir=str(tmp_path), batch=2, warmup=0, quiet=True, teacher="resnet18",
                          device="cpu")
    with open(res["trace"]) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    for phase in ("synthesize", "generator", "augment", "teacher", "losses", "student", "backward", "step"):
        assert phase in names, phase
    with open(res["table"]) as f:
        table = f.read()
    assert "impl=synthesizer" in table and "Self CPU" in table
    with pytest.raises(ValueError, match="--impl"):
        profile.build_runner("step", steps=1, batch=2, device="cpu", out_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# performance model
# ---------------------------------------------------------------------------------------------


def test_perf_model_shapes_come_from_the_models():
    from fastsynth.models import resnet34

    cifar = pm.bn_input_shapes(resnet34(10), 256, 32)
    assert len(cifar) == 36 and cifar[0] == (256, 64, 32, 32) and cifar[-1] == (256, 512, 4, 4)
    r50 = pm.bn_input_shapes(pm.ImageNetResNet50(), 32, 224)
    assert len(r50) == 53 and r50[0] == (32, 64, 112, 112) and r50[-1] == (32, 2048, 7, 7)


def test_perf_model_upstream_hook_matches_hand_count():
    n, c, h, w = 8, 16, 8, 8
    A = n * c * h * w * 4
    ops = pm.trace(pm.bn_loss_upstream, [(n, c, h, w)])
    names = [o.name for o in ops if o.phase == "fwd"]
    # mean, permute().contiguous() copy, var, (rv - var), norm, (rm - mean), norm, 0 + r, r_var + r_mean
    assert names == ["mean", "clone", "var", "sub", "linalg_vector_norm", "sub", "linalg_vector_norm", "add", "add"]
    fwd_bytes = sum(o.bytes for o in ops if o.phase == "fwd")
    # hand count: mean reads A, the copy reads and writes A, var reads A: 4A + O(C)
    assert 4 * A <= fwd_bytes <= 4 * A + 64 * c * 4
    total = sum(o.bytes for o in ops)
    # backward of var: mean (A), sub (2A), mul (2A), div (A written, broadcast read), grad add (3A), copy (2A)
    assert 15 * A <= total <= 15 * A + 256 * c * 4
    assert len(ops) == 27


def test_perf_model_fastsynth_bn_loss_moves_three_feature_maps():
    shapes = [(4, 8, 4, 4), (4, 16, 2, 2)]
    A = sum(math.prod(s) for s in shapes) * 4
    C = sum(s[1] for s in shapes)
    ops = pm.trace(pm.bn_loss_fastsynth, shapes)
    fwd = [o for o in ops if o.name == "fastsynth::bn_stats_fwd"]
    bwd = [o for o in ops if o.name == "fastsynth::bn_stats_bwd"]
    assert len(fwd) == 1 and len(bwd) == 1  # one launch for all layers, each direction
    assert (fwd[0].read, fwd[0].written) == (A, 2 * C * 4)
    assert (bwd[0].read, bwd[0].written) == (A + 4 * C * 4, A)


def test_perf_model_logit_reinit_and_floor():
    ops = pm.trace(pm.logit_fastsynth, 256, 1000)
    assert [o.name for o in ops] == ["fastsynth::synthesis_logit_loss_fwd", "ones_like",  # backward's seed
                                     "fastsynth::synthesis_logit_loss_bwd"]
    assert ops[0].bytes == 4 * 256 * 1000 * 4 + 256 * 8 + 3 * 4
    up = pm.trace(pm.logit_upstream, 256, 1000)
    assert len(up) > 12  # a dozen or more upstream ops
    assert sum(o.bytes for o in up) > sum(o.bytes for o in ops)
    rup, rfs = pm.trace(pm.reinit_upstream), pm.trace(pm.reinit_fastsynth)
    assert len(rup) == 80 and len(rfs) == 1
    nbytes = 40 * (1000 * 512 + 1000) * 4
    assert sum(o.written for o in rup) == nbytes == rfs[0].written
    assert rfs[0].floor_s() == pytest.approx(max(pm.LAUNCH_S, (nbytes + 8) / pm.HBM_BW))
    s = pm.summarize(rup)
    assert s.floor_s == pytest.approx(80 * pm.LAUNCH_S) and s.launches == 80


def test_perf_model_synthesis_step_small_batch():
    up_ops = pm.trace(pm.synthesis_step, "upstream", batch=2)
    fused_ops = pm.trace(pm.synthesis_step, "fused", batch=2)
    up, fused = pm.summarize(up_ops), pm.summarize(fused_ops)
    assert up.syncs == 1
    assert fused.launches < up.launches and fused.flops < up.flops  # no weight gradients
    assert fused.floor_s < up.floor_s
    text = pm.render({"One synthesis step (FastDFKD, tiny)": [("b=2", {
        "upstream": up_ops, "fastsynth (fused teacher)": fused_ops})]})
    assert "| b=2 | upstream |" in text and "Host syncs per step" in text


def test_interleaved_median_times_alternates_and_takes_each_median(monkeypatch):
    from fastsynth.bench import harness

    calls = []
    clock = iter(range(1000))  # perf_counter readings 0, 1, 2, ...: each timed call lasts 1 "s"
    monkeypatch.setattr(harness.time, "perf_counter", lambda: float(next(clock)))
    t = harness.interleaved_median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                         warmup=1, reps=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three alternating timed rounds
    assert t == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize("method", ["cmi", "fast_meta_imagenet", "deepinv", "dafl"])
def test_issue19_synthesizer_rows_quick(method):
    """Each issue-19 row (the new synthesizer against the test suite's eager reference loop) runs at
    the tiny size; the fused path shows in the op counts (a synthesizer that fell back to the
    upstream formulation would count as many ATen ops as the reference)."""
    from fastsynth.bench import synthesis

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = synthesis.run_new(quick=True, reps=1, warmup=0, methods=[method])
    finally:
        torch.set_num_threads(n)
    assert [r["provider"] for r in rows] == ["reference", "fastsynth"]
    ref, ours = rows
    assert ref["case"] == ours["case"] and method in ours["case"]
    assert ref["median_ms"] > 0 and ours["median_ms"] > 0
    assert ours["speedup_vs_eager"] == pytest.approx(ref["median_ms"] / ours["median_ms"])
    assert 0 < ours["aten_ops"] < 0.6 * ref["aten_ops"]
    assert ours["ops_frac_vs_reference"] == pytest.approx(ours["aten_ops"] / ref["aten_ops"])


def test_issue19_rows_reject_unknown_method():
    from fastsynth.bench import synthesis

    with pytest.raises(ValueError, match="methods must be among"):
        synthesis.run_new(quick=True, methods=["nayer_typo"])
