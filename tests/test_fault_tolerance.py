import json
import random
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from conftest import ROOT, read_log, run_here, run_script, tiny_args

import model
import train

pytestmark = pytest.mark.slow  # processes of their own: the full suite's, not the quick tier's


def losses_by_step(out_dir):
    """(kind, step) -> losses; a step replayed after a crash counts once, its last line winning."""
    table = {}
    for r in read_log(out_dir):
        if "train_loss" in r:
            table[("val" if "val_loss" in r else "train", r["step"])] = (
                r["train_loss"], r.get("val_loss"))
    return table


def assert_same_weights(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(data_root, tmp_path):
    args = {"max_iters": 120, "lr_decay_iters": 120, "ckpt_interval": 3, "eval_interval": 40,
            "log_interval": 2}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_here("train.py", tiny_args(data_root, whole, **args))
    rng = random.Random(0)
    for _ in range(4):
        resume = (killed / "last.pt").exists()
        if not resume:  # killed before its first save: start over in a clean folder, as a user must
            shutil.rmtree(killed, ignore_errors=True)
        lines_before = len(read_log(killed)) if resume else 0
        cmd = [sys.executable, "train.py",
               *tiny_args(data_root, killed, init_from="resume" if resume else "scratch", **args)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (killed / "log.jsonl").exists() or len(read_log(killed)) <= lines_before + 1:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in training: saves come every 3 steps
        proc.kill()
        proc.wait()
        for ckpt in killed.glob("*.pt"):
            torch.load(ckpt, weights_only=True)  # every checkpoint left behind is whole
    run_here("train.py", tiny_args(data_root, killed, init_from="resume", **args))
    assert_same_weights(whole / "last.pt", killed / "last.pt")
    assert losses_by_step(whole) == losses_by_step(killed)


def test_sigterm_leaves_last_pt_and_run_record(data_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py",
                             *tiny_args(data_root, out, max_iters=100000, lr_decay_iters=100000)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or len(read_log(out)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last_logged = max(r["step"] for r in read_log(out) if "train_loss" in r)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == last_logged
    record = json.loads((out / "run.json").read_text())
    assert (record["end_reason"] == "stopped by SIGTERM" and record["step"] == last_logged
            and record["ended"])


def test_a_run_in_this_process_gives_the_signal_handlers_back(data_root, tmp_path):
    """train.main catches SIGINT/SIGTERM while it trains: its caller's Ctrl-C works again after."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train.main(tiny_args(data_root, tmp_path / "run", max_iters=2, lr_decay_iters=2, warmup_iters=1,
                         eval_interval=2))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def train_in_process(args, loss_factors):
    """train.main in this process, with the loss of some training steps (1-based) times a factor."""
    original = model.GPT.forward
    calls = [0]

    def forward(self, idx, targets=None, kv_cache=None):
        logits, loss = original(self, idx, targets, kv_cache)
        if targets is not None and self.training:
            calls[0] += 1
            loss = loss * loss_factors.get(calls[0], 1.0)
        return logits, loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model.GPT, "forward", forward)
        train.main(args)


def test_injected_nan_is_skipped_and_reported(data_root, tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny_args(data_root, out, max_iters=12, lr_decay_iters=12, dropout=0.0),
                     {7: float("nan")})
    skips = [r for r in read_log(out) if "skipped" in r]
    assert [r["step"] for r in skips] == [7]
    assert ("transformer.wte.weight" in skips[0]["nonfinite_grads"]
            and len(skips[0]["recent_grad_norms"]) == 6)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 12 and all(t.isfinite().all() for t in ckpt["model"].values())
    assert json.loads((out / "run.json").read_text())["end_reason"] == "finished"


def test_the_skip_count_resumes_and_a_run_that_made_no_update_is_not_finished(data_root, tmp_path,
                                                                              capsys):
    """Issue 28, finding 3: the divergence guard's count of consecutive skips is saved and resumed
    (before, a resume started it at 0, so a run could skip every remaining step and end "finished",
    exit 0), and a run whose every step was skipped ends diverged, even under max_skipped_steps."""
    out = tmp_path / "run"
    common = {"max_iters": 12, "lr_decay_iters": 12, "ckpt_interval": 5, "eval_interval": 5,
              "dropout": 0.0}
    nan = float("nan")
    train_in_process(tiny_args(data_root, out, stop_iter=10, max_skipped_steps=4, **common),
                     {9: nan, 10: nan})
    assert torch.load(out / "last.pt", weights_only=True)["skipped_in_a_row"] == 2
    saved = (out / "last.pt").read_bytes()
    every_step = dict.fromkeys(range(1, 100), nan)
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(tiny_args(data_root, out, init_from="resume", max_skipped_steps=4,
                                   **common), every_step)
    assert (exit_info.value.code == 1
            and "4 consecutive steps up to step 12" in capsys.readouterr().err)
    (out / "last.pt").write_bytes(saved)
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(tiny_args(data_root, out, init_from="resume", max_skipped_steps=10,
                                   **common), every_step)
    err = capsys.readouterr().err
    assert (exit_info.value.code == 1
            and "all 2 steps of this run, up to step 12, had a non-finite" in err), err
    assert json.loads((out / "run.json").read_text())["end_reason"] == "diverged"


def test_persistent_nan_stops_with_last_good_checkpoint(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(data_root, out, max_iters=40, lr_decay_iters=40, ckpt_interval=5,
                     max_skipped_steps=4)
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(args, dict.fromkeys(range(8, 100), float("nan")))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "training diverged: 4 consecutive steps up to step 11" in err and "last.pt" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["step"] == 10
            and all(t.isfinite().all() for t in ckpt["model"].values()))  # skips change no weight
    assert json.loads((out / "run.json").read_text())["end_reason"] == "diverged"


def test_loss_spike_is_a_warning(data_root, tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny_args(data_root, out, max_iters=12, lr_decay_iters=12), {10: 3.0})
    warnings = [r for r in read_log(out) if r.get("warning") == "loss spike"]
    assert [r["step"] for r in warnings] == [10]


def one_line_error(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def copy_dataset(data_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root / "shakespeare_char", root / "shakespeare_char")
    return root


def test_bad_data_is_one_clear_line(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    err = one_line_error(tiny_args(data_root, out, dataset="nope"), capsys)
    assert "python prepare.py text --input" in err and "--name nope" in err

    root = copy_dataset(data_root, tmp_path)
    shard = root / "shakespeare_char" / "val_000000.bin"
    shard.write_bytes(b"\0\0\0\0" + shard.read_bytes()[4:])
    assert "val_000000.bin has magic 0" in one_line_error(tiny_args(root, out), capsys)

    shutil.rmtree(root)
    root = copy_dataset(data_root, tmp_path)
    meta_path = root / "shakespeare_char" / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"vocab_size": 65', '"vocab_size": 20'))
    assert "is >= the model's vocab_size 20" in one_line_error(tiny_args(root, out), capsys)

    err = one_line_error(tiny_args(data_root, out, block_size=200_000), capsys)
    assert "too few for block_size 200000" in err
    assert not out.exists()  # nothing was written for a run that could not start


def test_corrupt_checkpoint_is_one_clear_line(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"not a checkpoint at all")
    assert "truncated or corrupt" in one_line_error(tiny_args(data_root, out, init_from="resume"),
                                                    capsys)
    assert (out / "last.pt").read_bytes() == b"not a checkpoint at all"


def test_finished_run_folder_has_record_and_plot(data_root, tmp_path):
    out = tmp_path / "run"
    run_here("train.py", tiny_args(data_root, out, keep_last_k=2, ckpt_interval=10))
    record = json.loads((out / "run.json").read_text())
    assert (record["end_reason"] == "finished" and record["step"] == 40
            and record["tokens_seen"] == 40 * 8 * 32)
    assert (record["selected_checkpoint"] == "best.pt"
            and "lowest val loss" in record["selection_rule"])
    assert record["best_val_loss"] == min(r["val_loss"] for r in read_log(out) if "val_loss" in r)
    assert (record["data"]["source_sha256"] and record["config"]["n_layer"] == 2
            and record["world_size"] == 1)
    assert record["code"]["commit"] is None or len(record["code"]["commit"]) == 40
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000030.pt", "ckpt_0000040.pt"]
    compare = tmp_path / "compare.png"
    run_script("plot.py", [str(out / "log.jsonl"), str(out / "log.jsonl"), "-o", str(compare)])
    assert compare.exists()


def test_without_matplotlib_the_run_goes_on_and_says_how(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    train.main(tiny_args(data_root, out, max_iters=5, lr_decay_iters=5, eval_interval=2))
    assert capsys.readouterr().out.count("pip install matplotlib") == 1
    assert not (out / "loss.png").exists() and (out / "last.pt").exists()


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what the trainer sends, with no login or network."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        logged = self.logged
        return types.SimpleNamespace(log=lambda data, step: logged.append((step, data)), summary={},
                                     finish=lambda exit_code: None)


def test_wandb_gets_the_metrics_and_a_resume_continues_its_run(data_root, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    args = tiny_args(data_root, out, wandb_log=True, wandb_project="test")
    train.main([*args, "--stop_iter=10"])
    train.main([*args, "--init_from=resume"])
    assert len(fake.inits) == 2 and fake.inits[0]["id"] == fake.inits[1]["id"]
    assert all(init["resume"] == "allow" and init["project"] == "test" for init in fake.inits)
    train_losses = {step: data["train_loss"] for step, data in fake.logged if "lr" in data}
    assert train_losses == {r["step"]: r["train_loss"] for r in read_log(out) if "lr" in r}
