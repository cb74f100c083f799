"""scripts/gpu_check.sh in its dry mode: the control flow of the one-call GPU validation without a GPU.

Steps that need a GPU report "skipped: no GPU", the steps that do not (environment, the extra
checks' harness on the CPU) run, every step is deadline-gated, and summary.txt is always written.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
GPU_STEPS = ["build", "conftest", "needs_cuda", "bench", "memcheck", "racecheck", "nsys"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def run_dry(tmp_path, budget, extra_s, args=("--dry",), **extra_env):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_CHECK_DRY")}
    # the interpreter running the tests (the script would otherwise take the first python3 on PATH,
    # which in a separate venv, as in the newest-torch CI leg, is another torch than this build's)
    env.setdefault("PYTHON", sys.executable)
    env.update(OUT=str(out), GPU_CHECK_BUDGET=str(budget), GPU_CHECK_EXTRA_DRY_S=str(extra_s), **extra_env)
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=budget + 120)
    summary = (out / "summary.txt").read_text()
    return proc, summary, out


def step_line(summary, name):
    lines = [ln for ln in summary.splitlines() if re.search(rf"\] (PASS|FAIL|SKIP) {name}\b", ln)]
    assert len(lines) == 1, (name, summary)
    return lines[0]


def test_dry_run_writes_the_summary_and_skips_gpu_steps(tmp_path):
    proc, summary, out = run_dry(tmp_path, budget=300, extra_s=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dry=1" in summary.splitlines()[0]
    assert "PASS env" in step_line(summary, "env")
    for name in GPU_STEPS:
        assert step_line(summary, name).endswith(f"SKIP {name}: no GPU"), name
    assert "SKIP triton_aot: dry mode" in step_line(summary, "triton_aot")
    # the CPU part of the extra checks ran (reference backend) and wrote its rows
    assert "PASS extra" in step_line(summary, "extra")
    rows = (out / "extra.jsonl").read_text()
    assert '"check": "env"' in rows and '"done": true' in rows and '"ok": false' not in rows
    assert re.search(r"extra checks: [1-9]\d* ok, 0 not ok", summary), summary
    assert "RESULT PASS" in summary and (out / "env.txt").exists()


def test_steps_are_deadline_gated(tmp_path):
    # a budget smaller than the extra step's minimum: it is skipped for time, the summary is still
    # written, nothing failed (the dry mode chosen by the environment variable this time)
    proc, summary, out = run_dry(tmp_path, budget=1, extra_s=45, args=(), GPU_CHECK_DRY="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"SKIP extra: time budget \(-?\d+s left, needs 30s\)", step_line(summary, "extra")), summary
    assert not (out / "extra.jsonl").exists()
    assert "RESULT PASS" in summary


def test_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OUT=str(tmp_path)))
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
