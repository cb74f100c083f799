"""``fastsynth distill``: settings resolution, teacher checkpoints, evaluation data, outputs and
resuming (tiny runs on the digits)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from fastsynth import cli, demo, distill_run as dr, run_config as rc


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--epochs", "3", "--warmup", "1", "--kd-steps", "4", "--g-steps", "2", "--batch-size", "32",
        "--synthesis-batch-size", "40", "--gwp-loops", "1"]


def parse(argv):
    return vars(rc.build_parser().parse_args(argv))


# ----------------------------------------------------------------------------- settings
def test_per_method_defaults_are_the_upstream_scripts():
    base = ["--teacher", "resnet34", "--student", "resnet18", "--teacher-ckpt", "t.pth"]
    nayer = rc.resolve(parse(["--dataset", "cifar100", *base]))
    # tmtuan1307/nayer scripts/nayer_100.sh (c100r34r18); one synthesis round per epoch
    assert (nayer["batch_size"], nayer["synthesis_batch_size"], nayer["lr"], nayer["epochs"], nayer["warmup"],
            nayer["g_steps"], nayer["lr_g"], nayer["g_loops"], nayer["gwp_loops"], nayer["ep_steps"]) == \
        (512, 400, 0.2, 120, 20, 40, 4e-3, 2, 10, 400)
    fm = rc.resolve(parse(["--method", "fast_meta", "--dataset", "cifar10", *base]))
    # zju-vipa/Fast-Datafree scripts/fast_cifar.sh (Fast-2); synthesis batch = batch size
    assert (fm["batch_size"], fm["synthesis_batch_size"], fm["epochs"], fm["g_steps"], fm["lr_z"], fm["lr_g"],
            fm["reset_l0"], fm["bn_mmt"], fm["adv"]) == (256, 256, 220, 2, 0.015, 5e-3, 1, 0.9, 1.33)
    di = rc.resolve(parse(["--method", "deepinv", "--dataset", "cifar10", *base]))
    assert (di["g_steps"], di["lr_g"], di["oh"], di["warmup"], di["epochs"]) == (1000, 0.1, 1.0, 0, 200)
    # zju-vipa/CMI scripts/dfq_cifar10.sh: one generator step per 5 student steps, KD at T=1
    dfq = rc.resolve(parse(["--method", "dfq", "--dataset", "cifar10", *base]))
    assert (dfq["kd_steps"], dfq["ep_steps"], dfq["lr_g"], dfq["adv"], dfq["oh"], dfq["balance"], dfq["T"]) == \
        (5, 400, 1e-4, 0.5, 0.5, 20.0, 1.0)
    assert rc.resolve(parse(["--method", "dfad", "--dataset", "cifar10", *base]))["kd_loss"] == "l1"
    # digits: the demo's settings and the shipped teacher
    dg = rc.resolve({})
    assert (dg["method"], dg["teacher"], dg["student"], dg["teacher_ckpt"], dg["epochs"], dg["ep_steps"]) == \
        ("nayer", "digits_cnn", "digits_cnn_small", None, 20, 25)
    assert demo.DEFAULTS["nayer"]["kd_steps"] == dg["kd_steps"] and demo.DEFAULTS["fast"]["nz"] == 64


def test_config_file_then_flags_win(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "fast_meta"\nepochs = 7\nlr-g = 0.5\nmean = [0.5]\nout = "o"\n')
    file_cfg = rc.load_config_file(str(toml))
    cfg = rc.resolve(parse(["--epochs", "9", "--config", str(toml)]), file_cfg)
    assert (cfg["method"], cfg["epochs"], cfg["lr_g"], cfg["mean"], cfg["out"]) == ("fast_meta", 9, 0.5, [0.5], "o")
    assert cfg["lr_z"] == 0.03  # the digits preset of the file's method
    yml = tmp_path / "run.yaml"
    yml.write_text("batch_size: 16\naug_flip: true\n")
    assert rc.load_config_file(str(yml)) == {"batch_size": 16, "aug_flip": True}
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    with pytest.raises(rc.ConfigError, match="unknown setting 'epochz'"):
        rc.load_config_file(str(bad))
    bad.write_text('epochs = "many"\n')
    with pytest.raises(rc.ConfigError, match="epochs: expected int"):
        rc.load_config_file(str(bad))
    # upstream spelling of the flags
    assert parse(["--batch_size", "8", "--lr_g", "0.1"]) == {"batch_size": 8, "lr_g": 0.1}


def test_yaml_written_without_pyyaml_reads_back(monkeypatch):
    yaml = pytest.importorskip("yaml")
    cfg = rc.resolve(parse(["--mean", "0.3", "--out", 'a "b"']))
    text_pyyaml = rc.to_yaml(cfg)
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)  # import yaml -> ImportError
    text = rc.to_yaml(cfg)
    assert text != text_pyyaml
    assert yaml.safe_load(text) == cfg == yaml.safe_load(text_pyyaml)


def test_yaml_config_without_pyyaml_says_so(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 2\n")
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)
    with pytest.raises(rc.ConfigError, match="reading YAML needs PyYAML .*TOML"):
        rc.load_config_file(str(path))


@pytest.mark.parametrize("argv, match", [
    (["--method", "magic"], "--method: unknown method 'magic'"),
    (["--teacher", "resnet99"], "--teacher: unknown architecture 'resnet99'"),
    (["--student", "nope"], "--student: unknown architecture 'nope'"),
    (["--dataset", "mnist"], "--dataset: expected one of"),
    (["--dataset", "cifar10", "--teacher", "resnet34", "--student", "resnet18"], "--teacher-ckpt is required"),
    (["--warmup", "50"], "--warmup: must be in"),
    (["--kd-steps", "0"], "--kd-steps: must be an integer >= 1"),
])
def test_bad_settings_name_the_flag(argv, match):
    with pytest.raises(rc.ConfigError, match=match):
        rc.resolve(parse(argv))


def test_cli_reports_errors_with_exit_code_2(capsys):
    assert cli.main(["distill", "--method", "magic"]) == 2
    assert "--method: unknown method" in capsys.readouterr().err


# ----------------------------------------------------------------------------- teacher checkpoints
def test_teacher_checkpoint_formats(tmp_path):
    t = demo.load_teacher()
    sd = t.state_dict()
    x = torch.randn(4, 1, 16, 16)
    ref = t(x)
    for name, obj in [("upstream.pth", {"state_dict": sd, "epoch": 3, "best_acc1": 0.9, "arch": "digits_cnn"}),
                      ("dp.pth", {"state_dict": {"module." + k: v for k, v in sd.items()}}),
                      ("bare.pt", dict(sd)),
                      ("no_nbt.pt", {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})]:
        torch.save(obj, tmp_path / name)
        model = rc.build_model("digits_cnn", "--teacher", 10, 1)
        dr.load_into(model, dr.read_state_dict(str(tmp_path / name)), "--teacher-ckpt", "digits_cnn", name)
        torch.testing.assert_close(model.eval()(x), ref, rtol=0, atol=0)
    small = rc.build_model("digits_cnn_small", "--teacher", 10, 1)
    with pytest.raises(ValueError, match=r"--teacher-ckpt .*does not fit the architecture digits_cnn_small: "
                                         r".*shapes differ \(first: features.0.weight"):
        dr.load_into(small, sd, "--teacher-ckpt", "digits_cnn_small", "x.pt")
    other = {"conv.weight": torch.zeros(1), **{k: v for k, v in sd.items() if not k.startswith("classifier")}}
    with pytest.raises(ValueError, match=r"2 missing keys \(first: classifier.weight, classifier.bias\), "
                                         r"1 unexpected keys \(first: conv.weight\)"):
        dr.load_into(rc.build_model("digits_cnn", "--teacher", 10, 1), other, "--teacher-ckpt", "digits_cnn", "y")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="--teacher-ckpt .*expected a state_dict"):
        dr.read_state_dict(str(tmp_path / "list.pt"))
    with pytest.raises(FileNotFoundError, match="--teacher-ckpt: no file"):
        dr.read_state_dict(str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------- evaluation data
def test_cifar_from_disk_only(tmp_path):
    cfg = rc.resolve(parse(["--dataset", "cifar10", "--teacher", "resnet8", "--student", "resnet8",
                            "--teacher-ckpt", "t", "--data-root", str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.test_batch.*--data-root.*never downloads"):
        dr.load_eval_data(cfg)
    folder = tmp_path / "torchdata" / "cifar-10-batches-py"  # upstream's layout is accepted too
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 1, 2, 3, 4, 9]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    ev = dr.load_eval_data(cfg)
    x, y = ev.loader[0]
    assert ev.shape == (3, 32, 32) and ev.classes[9] == "c9" and y.tolist() == [0, 1, 2, 3, 4, 9]
    raw = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(ev.normalizer(x[1:2], reverse=True)[0], raw)


def test_imagefolder_layout_errors_and_reads(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    cfg = rc.resolve(parse(["--dataset", f"imagefolder:{tmp_path}", "--teacher", "resnet8", "--student", "resnet8",
                            "--teacher-ckpt", "t", "--img-size", "8"]))
    with pytest.raises(FileNotFoundError, match=r"one folder per class .*found none"):
        dr.load_eval_data(cfg)
    for c in ("ant", "bee"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (12, 10), (255, 0, 0) if c == "ant" else (0, 0, 255)).save(tmp_path / "val" / c / "a.png")
    ev = dr.load_eval_data(cfg)
    assert ev.classes == ["ant", "bee"] and ev.shape == (3, 8, 8)
    x = ev.normalizer(ev.loader[0][0], reverse=True)
    assert x[0, 0].min() > 0.99 and x[1, 2].min() > 0.99 and x[0, 2].max() < 0.01


# ----------------------------------------------------------------------------- whole runs
def test_distill_digits_writes_outputs_and_rerun_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["distill", *TINY, "--out", str(out), "--quiet", "--keep-ckpts", "1"]) == 0
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert last.startswith("teacher test accuracy 98.89%, student test accuracy ")
    assert "resolved configuration" in printed and "kd_steps: 4" in printed
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,wall_s,synthesis_s,kd_loss,test_acc" and len(rows) == 4
    assert rows[1].endswith(",,") and all(r.count(",") == 4 and not r.endswith(",") for r in rows[2:])
    assert float(rows[3].split(",")[1]) > float(rows[2].split(",")[1])  # cumulative wall seconds
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 3 and saved["method"] == "nayer" and saved["out"] == str(out)
    student = rc.build_model("digits_cnn_small", "--student", 10, 1)
    student.load_state_dict(torch.load(out / "student_last.pt", weights_only=True))
    student.load_state_dict(torch.load(out / "student_best.pt", weights_only=True))
    for e in (1, 2, 3):
        assert (out / "grids" / f"epoch_{e:04d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [e for e, _, _ in dr.checkpoints(str(out))] == [3]  # --keep-ckpts 1
    assert (out / "classes.txt").read_text().splitlines()[3] == "3 three"
    # the same command in the same folder: nothing left to do, same answer
    assert cli.main(["distill", *TINY, "--out", str(out), "--quiet"]) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert again[-1] == last and any("resuming" in line and "after epoch 3/3" in line for line in again)
    # other settings in that folder are refused, naming them
    assert cli.main(["distill", *TINY, "--lr", "0.05", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.1 in the checkpoint, 0.05 now" in err and "--restart" in err
    assert cli.main(["distill", *TINY, "--resume", "--out", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "--resume: no complete checkpoint" in capsys.readouterr().err


class _StubSynth:
    """Deterministic in the global RNG (restored by a resume): the student side is all there is."""

    data_pool = None

    def synthesize(self):
        return {"synthetic": None}, 0.0

    def sample(self):
        return torch.rand(16, 1, 16, 16)


def test_resume_after_interruption_is_bit_identical_on_the_student_side(tmp_path, monkeypatch):
    monkeypatch.setattr(dr, "build_synthesizer", lambda *a, **k: _StubSynth())
    settings = dict(epochs=5, warmup=1, kd_steps=3)

    def cfg(out):
        return rc.resolve({**settings, "out": str(out)})

    full = dr.run(cfg(tmp_path / "a"), quiet=True)
    real_write = dr.write_checkpoint

    def killed_after_two(out, state, keep):
        if state["epoch"] == 3:
            # a kill during the write of the third checkpoint leaves only its temporary file
            with open(os.path.join(out, dr.CKPT_DIR, ".ckpt-00003.pt.tmp-999"), "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real_write(out, state, keep)

    monkeypatch.setattr(dr, "write_checkpoint", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        dr.run(cfg(tmp_path / "b"), quiet=True)
    assert [e for e, _, _ in dr.checkpoints(str(tmp_path / "b"))] == [2, 1]
    monkeypatch.setattr(dr, "write_checkpoint", real_write)
    resumed = dr.run(cfg(tmp_path / "b"), quiet=True)
    assert resumed["start_epoch"] == 2 and resumed["epochs_run"] == 3
    for k, v in full["student"].state_dict().items():
        assert torch.equal(v, resumed["student"].state_dict()[k]), k
    a = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[3:] for r in a] == [r.split(",")[3:] for r in b]  # kd loss and accuracy per epoch
    # a damaged newest checkpoint falls back to the one before
    newest = dr.checkpoints(str(tmp_path / "b"))[0][-1]
    with open(newest, "r+b") as f:
        f.truncate(100)
    notes = []
    state, path = dr.load_newest_checkpoint(str(tmp_path / "b"), notes.append)
    assert state["epoch"] == 4 and "skipping unreadable checkpoint" in notes[0]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from fastsynth import distill

    path = str(tmp_path / "f.bin")
    distill.atomic_write(path, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        distill.atomic_write(path, boom)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("method", sorted(rc.METHODS))
def test_every_method_runs_an_epoch_on_digits(method, tmp_path):
    cfg = rc.resolve({"method": method, "epochs": 1, "warmup": 0, "kd_steps": 2, "ep_steps": 2, "g_steps": 1,
                      "batch_size": 16, "synthesis_batch_size": 20, "gwp_loops": 1, "out": str(tmp_path)})
    res = dr.run(cfg, quiet=True)
    assert len(res["rows"]) == 1 and res["rows"][0]["kd_loss"] is not None and 0 <= res["student_acc"] <= 100
    assert (tmp_path / "grids" / "epoch_0001.png").exists()
    if method == "dfad":
        assert dr.kd_criterion(cfg)(torch.ones(2, 3), torch.zeros(2, 3), 1.0) == 1.0


def test_sigkilled_command_resumes_from_its_newest_checkpoint(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    argv = ["--epochs", "4", "--warmup", "1", "--kd-steps", "3", "--g-steps", "2", "--batch-size", "32",
            "--synthesis-batch-size", "40", "--gwp-loops", "1", "--out", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fastsynth", "distill", *argv, "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not dr.checkpoints(str(out)) or dr.checkpoints(str(out))[0][0] < 2:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = dr.checkpoints(str(out))[0][0]
    assert 2 <= done < 4
    assert cli.main(["distill", *argv]) == 0
    printed = capsys.readouterr().out
    state, _ = dr.load_newest_checkpoint(str(out))
    assert f"after epoch {done}/4" in printed
    assert state["epoch"] == 4 and len((out / "metrics.csv").read_text().splitlines()) == 5


@pytest.mark.parametrize("method", ["nayer", "fast_meta", "deepinv", "dafl"])
def test_resume_with_a_real_synthesizer_is_bit_identical(method, tmp_path, monkeypatch):
    """Interrupted during the write of the third checkpoint and resumed from the second: the
    synthesizer's state (generator, optimizers, counters, pool, RNGs) comes back with the
    student's, so the student ends bit-identical to an uninterrupted run."""
    settings = dict(method=method, epochs=4, warmup=1, kd_steps=3, ep_steps=3, g_steps=2, batch_size=16,
                    synthesis_batch_size=20, gwp_loops=1)

    def cfg(out):
        return rc.resolve({**settings, "out": str(out)})

    full = dr.run(cfg(tmp_path / "a"), quiet=True)
    real_write = dr.write_checkpoint

    def killed_at_three(out, state, keep):
        assert state["synthesizer"] is not None
        if state["epoch"] == 3:
            raise KeyboardInterrupt
        return real_write(out, state, keep)

    monkeypatch.setattr(dr, "write_checkpoint", killed_at_three)
    with pytest.raises(KeyboardInterrupt):
        dr.run(cfg(tmp_path / "b"), quiet=True)
    monkeypatch.setattr(dr, "write_checkpoint", real_write)
    notes = []
    resumed = dr.run(cfg(tmp_path / "b"), log=notes.append, progress=False)
    assert resumed["start_epoch"] == 2 and resumed["epochs_run"] == 2
    assert any("resuming" in n for n in notes) and not any("restarts" in n for n in notes)
    for k, v in full["student"].state_dict().items():
        assert torch.equal(v, resumed["student"].state_dict()[k]), k
    pa, pb = full["synthesizer"].data_pool, resumed["synthesizer"].data_pool
    assert (pa is None) == (method == "dafl")  # a generative method samples the generator, not a pool
    if pa is not None:
        assert torch.equal(pa.images(), pb.images())
    a = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[3:] for r in a] == [r.split(",")[3:] for r in b]


def test_disk_pool_run_resumes_bit_identical_to_a_device_pool_run(tmp_path, monkeypatch):
    """--pool-device disk keeps the pool in OUT/pool; where the pool lives changes nothing that
    is computed, and the run interrupted at its third checkpoint resumes from the second."""
    settings = dict(method="nayer", epochs=4, warmup=1, kd_steps=3, ep_steps=3, g_steps=2, batch_size=16,
                    synthesis_batch_size=20, gwp_loops=1)
    full = dr.run(rc.resolve({**settings, "out": str(tmp_path / "a")}), quiet=True)
    cfg = rc.resolve({**settings, "out": str(tmp_path / "b"), "pool_device": "disk"})
    real_write = dr.write_checkpoint

    def killed_at_three(out, state, keep):
        if state["epoch"] == 3:
            raise KeyboardInterrupt
        return real_write(out, state, keep)

    monkeypatch.setattr(dr, "write_checkpoint", killed_at_three)
    with pytest.raises(KeyboardInterrupt):
        dr.run(cfg, quiet=True)
    monkeypatch.setattr(dr, "write_checkpoint", real_write)
    import gc

    gc.collect()  # the interrupted run's pool holds its folder until collected (a killed process holds nothing)
    resumed = dr.run(cfg, quiet=True)
    assert resumed["start_epoch"] == 2 and (tmp_path / "b" / "pool" / "index.jsonl").is_file()
    for k, v in full["student"].state_dict().items():
        assert torch.equal(v, resumed["student"].state_dict()[k]), k
    assert torch.equal(full["synthesizer"].data_pool.images(), resumed["synthesizer"].data_pool.images())


@pytest.mark.parametrize("argv, match", [
    (["--bn-stats", "mean"], "--bn-stats: expected global or per_rank"),
    (["--pool-device", "gpu"], "--pool-device: expected auto, device, cuda, cpu or disk"),
])
def test_bad_distributed_and_pool_settings_name_the_flag(argv, match):
    with pytest.raises(rc.ConfigError, match=match):
        rc.resolve(parse(argv))
    assert {"pool_device", "pool_dir"} & set(rc.identity(rc.resolve({}))) == set()  # a resume may move the pool
