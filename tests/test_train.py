import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import read_log, run_here, tiny_args

import configurator
import data
import devices
import train


def schedule(**keys):
    """Schedule keys: peak 1.0 after 10 warmup steps, floor 0.1, decay to max_iters 200 if unset."""
    return SimpleNamespace(**{"learning_rate": 1.0, "warmup_iters": 10, "min_lr": 0.1,
                              "max_iters": 200, "lr_decay_iters": 0, "lr_schedule": "cosine",
                              "cooldown_frac": 0.4, **keys})


def test_lr_schedule_values():
    def lr(it):
        return train.lr_at(it, schedule(lr_decay_iters=110))

    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == pytest.approx(1.0)  # warmup ends at full lr
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway through the cosine: midway between lr and min_lr
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(i) >= lr(i + 1) for i in range(10, 200))


def test_wsd_schedule_holds_the_peak_then_cools_down_linearly():
    def lr(it):
        return train.lr_at(it, schedule(lr_decay_iters=110, lr_schedule="wsd", cooldown_frac=0.4))

    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)  # as the cosine's warmup
    # stable: the first 60% of the 100 decay steps
    assert all(lr(i) == pytest.approx(1.0) for i in range(10, 71))
    assert lr(90) == pytest.approx(0.55)  # halfway through the 40-step cooldown
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(i) >= lr(i + 1) for i in range(10, 200))


def test_leading_batches_tile_the_first_tokens(data_root):
    windows = data.Windows(data_root / "shakespeare_char", "val", 16, 65)
    batches = windows.leading_batches(3 * 4 * 16, 4)
    assert len(batches) == 3 and all(x.shape == (4, 16) for x, _ in batches)
    tokens = data.load_shard(data.shard_paths(data_root / "shakespeare_char", "val")[0])
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(x, torch.from_numpy(tokens[:192].astype("int64")))  # back to back, in order
    assert torch.equal(y, torch.from_numpy(tokens[1:193].astype("int64")))  # targets: next tokens
    with pytest.raises(data.DataError, match="lower --val_tokens"):
        windows.leading_batches(len(tokens) // 64 * 64 + 64, 4)


@pytest.mark.slow
def test_val_tokens_sets_the_val_batches(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    run_here("train.py", tiny_args(data_root, out, max_iters=10, lr_decay_iters=10,
                                   eval_interval=10, val_tokens=8 * 32 * 3, sample_interval=0))
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    with pytest.raises(SystemExit):
        train.main(tiny_args(data_root, tmp_path / "bad", val_tokens=100))
    assert ("val_tokens 100 must be 0 or a multiple of batch_size x block_size (256)"
            in capsys.readouterr().err)


def test_batches_are_deterministic_and_eval_batches_fixed(data_root):
    windows = data.Windows(data_root / "shakespeare_char", "val", 32, 65)
    x1, y1 = windows.random_batch(seed=1, index=7, batch_size=4)
    x2, _ = windows.random_batch(seed=1, index=7, batch_size=4)
    x3, _ = windows.random_batch(seed=1, index=8, batch_size=4)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    first, again = windows.fixed_batches(3, 4), windows.fixed_batches(3, 4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert len({tuple(x[0].tolist()) for x, _ in first}) == 3


@pytest.mark.slow
def test_help_lists_every_key_with_default_and_meaning():
    out = run_here("train.py", ["--help"]).stdout
    for key in ("batch_size", "learning_rate", "stop_iter", "dtype"):
        assert f"--{key}=" in out
    assert "--learning_rate=3e-3" in out and "peak learning rate" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--no_such_key=1"], "unknown key --no_such_key"),
    (["--batch_size=twelve"], "--batch_size=twelve is not a valid int"),
    (["--batch_size=0"], "batch_size must be > 0, got 0"),
    (["config/missing.py"], "config file config/missing.py cannot be read"),
    (["--gradient_accumulation_steps=-1"], "gradient_accumulation_steps must be > 0"),
    (["--device=cuda:7"], "device cuda:7 does not exist"),
    (["--sample_temperature=-1"], "sample_temperature must be >= 0, got -1.0"),
])
@pytest.mark.slow
def test_config_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_config_file_errors(tmp_path, capsys):
    raising, unknown = tmp_path / "raising.py", tmp_path / "unknown.py"
    raising.write_text("batch_size = 1 / 0\n")
    unknown.write_text("batch_sise = 4\n")
    for path, message in ((raising, "ZeroDivisionError"), (unknown, "unknown key 'batch_sise'")):
        with pytest.raises(SystemExit):
            train.main([str(path)])
        assert message in capsys.readouterr().err


def test_a_keys_tag_declares_its_allowed_values_and_resume_class(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("rate = 0.5  # share {(0, 1]; changeable}\nmode = \"a\"  # a mode {a|b}\n"
                      "steps = 3  # count {>= 1}\nname = \"x\"  # untagged\n")
    keys = configurator.all_keys(script)
    assert [(k.allowed, k.resume) for k in keys.values()] == [
        ("(0, 1]", "changeable"), ("a|b", "fixed"), (">= 1", "fixed"), ("", "fixed")]
    assert vars(configurator.load_config(script, ["--rate=1", "--mode=b", "--steps=1"])) == {
        "rate": 1.0, "mode": "b", "steps": 1, "name": "x"}
    for arg, message in (("--rate=0", "rate must be in (0, 1], got 0.0"),
                         ("--mode=c", "mode must be a or b, got 'c'"),
                         ("--steps=0", "steps must be >= 1, got 0")):
        with pytest.raises(configurator.ConfigError, match=re.escape(message)):
            configurator.load_config(script, [arg])
    script.write_text("rate = 0.5  # share {changable}\n")
    with pytest.raises(ValueError, match="rate's tag part 'changable' is neither"):
        configurator.all_keys(script)


def test_help_tells_resume_classes_only_where_the_scripts_own_keys_name_them(tmp_path):
    """A script that resumes nothing but takes devices.DeviceConfig's keys (sample.py, eval.py,
    the benchmarks) shows their allowed values, not train.py's resume classes."""
    script = tmp_path / "script.py"
    script.write_text("steps = 3  # count {>= 1}\n")
    text = configurator.usage(script, configurator.all_keys(script, devices.DeviceConfig))
    assert "resume" not in text and "changeable" not in text
    assert "{auto|float32|bfloat16|float16}" in text and "count {>= 1}" in text
    script.write_text("rate = 0.5  # share {(0, 1]; changeable}\n")
    text = configurator.usage(script, configurator.all_keys(script, devices.DeviceConfig))
    assert "on resume a key of each class" in text
    assert "{auto|float32|bfloat16|float16; changeable}" in text


@pytest.mark.slow
def test_training_loss_falls_and_logs(data_root, tmp_path):
    out = tmp_path / "run"
    result = run_here("train.py", tiny_args(data_root, out, max_iters=60, lr_decay_iters=60))
    assert "expected loss at init: ln(65) = 4.1744" in result.stdout
    log = read_log(out)
    evals = [r for r in log if "val_loss" in r]
    assert evals[0]["step"] == 0 and abs(evals[0]["val_loss"] - math.log(65)) < 0.1
    assert evals[-1]["step"] == 60 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    steps = [r for r in log if "lr" in r]
    assert [r["step"] for r in steps] == list(range(5, 61, 5))
    assert set(steps[0]) == {"step", "tokens", "train_loss", "lr", "grad_norm", "dt_ms",
                             "tok_per_sec", "wall_tok_per_sec", "train_seconds", "peak_rss_mib"}
    assert steps[-1]["tokens"] == 60 * 8 * 32
    assert any("sample" in r and r["sample"] for r in log)
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 60


@pytest.mark.slow
def test_resume_is_bitwise_exact_with_dropout(data_root, tmp_path):
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    run_here("train.py", tiny_args(data_root, whole))
    run_here("train.py", tiny_args(data_root, paused, stop_iter=15))
    assert torch.load(paused / "last.pt", weights_only=True)["step"] == 15
    run_here("train.py", tiny_args(data_root, paused, init_from="resume"))
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(paused / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)

    def losses(out_dir):
        return {(r["step"], "val_loss" in r): (r["train_loss"], r.get("val_loss"))
                for r in read_log(out_dir) if "train_loss" in r}

    assert losses(whole) == losses(paused)
    record_a, record_b = (json.loads((d / "run.json").read_text()) for d in (whole, paused))
    for key in ("best_val_loss", "best_step", "final_val_loss", "tokens_seen",
                "selected_checkpoint"):
        assert record_a[key] == record_b[key], key
    assert record_b["resumed_from_step"] == 15


@pytest.mark.slow
def test_fresh_run_refuses_to_overwrite_a_run(data_root, tmp_path):
    out = tmp_path / "run"
    run_here("train.py", tiny_args(data_root, out, max_iters=5, lr_decay_iters=5))
    before = (out / "last.pt").read_bytes()
    result = run_here("train.py", tiny_args(data_root, out, max_iters=5), check=False)
    assert (result.returncode == 2 and "already holds a run" in result.stderr
            and "Traceback" not in result.stderr)
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize(("damage", "message"), [
    ("missing", "no checkpoint at"),
    ("truncate", "truncated or corrupt"),
    ("architecture", "was trained with n_layer=2, which a resume cannot change "
                     "(the config asks for n_layer=3)"),
])
@pytest.mark.slow
def test_bad_resume_is_one_clear_line(data_root, tmp_path, damage, message):
    out = tmp_path / "run"
    if damage != "missing":
        run_here("train.py", tiny_args(data_root, out, max_iters=5, lr_decay_iters=5))
    if damage == "truncate":
        saved = (out / "last.pt").read_bytes()
        (out / "last.pt").write_bytes(saved[: len(saved) // 2])
    n_layer = 3 if damage == "architecture" else 2
    result = run_here("train.py", tiny_args(data_root, out, init_from="resume", n_layer=n_layer),
                      check=False)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_sample_prints_text_from_a_run(data_root, tmp_path):
    out = tmp_path / "run"
    run_here("train.py", tiny_args(data_root, out, max_iters=10, lr_decay_iters=10))
    result = run_here("sample.py", [f"--out_dir={out}", "--num_samples=2", "--max_new_tokens=30",
                                      "--start=ROMEO:", "--device=cpu"])
    samples = result.stdout.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("ROMEO:") for s in samples[:2])
    again = run_here("sample.py", [f"--out_dir={out}", "--num_samples=2", "--max_new_tokens=30",
                                     "--start=ROMEO:", "--device=cpu"])
    assert again.stdout == result.stdout  # seeded


@pytest.mark.parametrize(("option", "message"), [
    ("--top_p=0", "top_p must be in (0, 1], got 0.0"),
    ("--temperature=-1", "temperature must be >= 0"),
    ("--num_samples=0", "num_samples must be > 0"),
    ("--device=cuda:x", "unknown device 'cuda:x'"),
])
@pytest.mark.slow
def test_sample_rejects_bad_settings_in_one_line(tmp_path, option, message):
    result = run_here("sample.py", [f"--out_dir={tmp_path}", option], check=False)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_dtype_choice_follows_the_device(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.pick_dtype("auto", "cpu")[0] == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.pick_dtype("auto", "cpu")[0] == torch.float32
    assert devices.pick_dtype("auto", "mps")[0] == torch.float32
    assert devices.pick_dtype("float32", "cuda") == (torch.float32, "as configured")
    with pytest.raises(devices.ConfigError, match="unknown dtype"):
        devices.pick_dtype("fp8", "cpu")


@pytest.mark.parametrize("gpu, expected", [
    ("native bf16", torch.bfloat16), ("emulated bf16", torch.float16), ("no bf16", torch.float16)])
def test_cuda_dtype_choice_counts_only_native_bf16(gpu, expected, monkeypatch):
    """An A100/H100 trains in bf16; a V100 or T4, where torch can only emulate bf16, trains in fp16
    with a scaler."""
    def is_bf16_supported(including_emulation=True):
        return gpu == "native bf16" or (gpu == "emulated bf16" and including_emulation)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    dtype, reason = devices.pick_dtype("auto", "cuda")
    assert dtype == expected
    assert ("gradient scaler" in reason) == (expected == torch.float16)


def test_cpu_threads_one_per_physical_core(tmp_path, monkeypatch):
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3", "4"]):  # 3 cores, two with SMT
        (tmp_path / f"cpu{cpu}/topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}/topology/thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert devices.physical_cores(tmp_path) == 3
    monkeypatch.setattr(devices, "physical_cores", lambda: 6)
    monkeypatch.setattr(devices, "keep_freed_memory", lambda: True)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        devices.tune_for("cpu", processes=2)
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's (or torchrun's) setting wins
        devices.tune_for("cpu")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cpu_autocast_training_runs_and_loss_falls(data_root, tmp_path, dtype):
    """The CUDA mixed-precision paths on CPU: bf16 autocast, and fp16 with a gradient scaler."""
    out = tmp_path / "run"
    result = run_here("train.py", tiny_args(data_root, out, dtype=dtype, max_iters=30,
                                            lr_decay_iters=30, eval_interval=30, dropout=0.0))
    assert f"{dtype} (as configured)" in result.stdout
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3
    scaler = torch.load(out / "last.pt", weights_only=True)["scaler"]
    assert (scaler is not None) == (dtype == "float16")


def test_resuming_a_paused_run_at_its_pause_point_names_the_limit_to_raise(data_root, tmp_path,
                                                                           capsys):
    args = tiny_args(data_root, tmp_path / "run", stop_iter=5)
    train.main(args)
    train.main([*args, "--init_from=resume"])
    assert "is already at step 5; raise --stop_iter (or set it to 0)" in capsys.readouterr().out
