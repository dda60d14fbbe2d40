"""Issue 28's findings, each reproduced as it was found.

1. No file under a run folder, however crafted, runs code in any script. A sharded checkpoint is the
   path that could: torch.distributed.checkpoint unpickles its .metadata with plain pickle and its
   non-tensor values with torch.load(weights_only=False). Payloads are planted in every file such a
   checkpoint holds and read through every script that loads one.
2. A dataset prepared again while a run trains on it does not reach the run.
4. A failed sharded save (a file size limit here) is one line, recorded, its partial folder gone.
5. Out of memory in a training step or an evaluation is one line naming the keys that would make it
   fit, recorded in run.json.
6. A run that fails before its first checkpoint leaves a folder a new run can start in; the key that
   made it fail (seed=-1) is refused up front.
7. A killed prepare.py's temporary folder is removed by the next one.
8. A stop signal during the default data's first-use preparation stops it in one line; one at the
   last step does not turn a finished run into a stopped one.
9. A task file's line that is not UTF-8, or holds text the tokenizer cannot encode, is named."""

import json
import os
import pathlib
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import PLAY, ROOT, tiny_args
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import data
import eval
import export
import model
import prepare
import sample
import train
from checkpoint import CheckpointError, load_checkpoint, load_sharded_state, model_from_checkpoint
from optimizers import configure_optimizer
from preparation.common import temporary_folder

pytestmark = pytest.mark.slow  # training runs


class Plant:
    """Unpickling it creates `marker`: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def run_args(data_root, out, **overrides):
    return tiny_args(data_root, out, max_iters=10, lr_decay_iters=10, eval_interval=5,
                     ckpt_interval=5, sample_interval=0, checkpoint_format="sharded", **overrides)


@pytest.fixture(scope="module")
def sharded_run(data_root, tmp_path_factory):
    """A tiny run with sharded checkpoints: last -> last.<step>/ and best -> best.<step>/."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    train.main(run_args(data_root, out))
    return out


def planted_copy(run, tmp_path, name, file, payload):
    """The run copied, `file` in checkpoint `name`'s step folder replaced by `payload`'s pickle."""
    out = shutil.copytree(run, tmp_path / "run", symlinks=True)
    (out / name).resolve().joinpath(file).write_bytes(pickle.dumps(payload))
    return out


def script_calls(out, name, task, data_root):
    """Every script reading a run's checkpoint `name`, as (main, arguments); a resume reads last."""
    calls = [(sample.main, [f"--out_dir={out}", f"--ckpt={name}", "--max_new_tokens=2",
                            "--device=cpu"]),
             (eval.main, [f"--out_dir={out}", f"--ckpt={name}", f"--task={task}", "--device=cpu"]),
             (export.main, [str(out / name), str(out.parent / "hf")])]
    if name == "last":
        calls.append((train.main, run_args(data_root, out, init_from="resume")))
    return calls


def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"ctx": "To be", "endings": [" or", " xq"], "label": 0}\n')
    return path


@pytest.mark.parametrize("file", [".metadata", "trainer_state.pt"])
@pytest.mark.parametrize("name", ["last", "best"])
def test_a_planted_pickle_runs_in_no_script(sharded_run, data_root, tmp_path, capsys, name, file):
    marker = tmp_path / "ran"
    out = planted_copy(sharded_run, tmp_path, name, file, Plant(marker))
    for main, args in script_calls(out, name, task_file(tmp_path), data_root):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert not marker.exists(), f"{main.__module__} ran the planted code"
        assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert file in err or "cannot be read" in err, err


def test_a_planted_value_in_the_shards_is_not_unpickled(sharded_run, tmp_path, data_root, capsys):
    """The optimizer's settings are pickled values in the .distcp files: one replaced by a payload
    (the metadata rewritten to match, as a forger would) is refused on resume and by
    load_sharded_state."""
    marker = tmp_path / "ran"
    out = shutil.copytree(sharded_run, tmp_path / "run", symlinks=True)
    folder = (out / "last").resolve()
    gpt = model_from_checkpoint(load_checkpoint(out / "last"))
    optimizer = configure_optimizer(gpt, 0.1, 1e-3, (0.9, 0.99), "cpu")
    load_sharded_state(folder, gpt, optimizer)
    state = {"model": get_model_state_dict(gpt),
             "optimizer": get_optimizer_state_dict(gpt, optimizer)}
    state["optimizer"]["param_groups"][0]["lr"] = Plant(marker)
    for shard in folder.glob("*.distcp"):
        shard.unlink()
    dcp.save(state, checkpoint_id=folder)
    with pytest.raises(CheckpointError, match="is not plain data"):
        load_sharded_state(folder, gpt, optimizer)
    with pytest.raises(SystemExit) as exit_info:
        train.main(run_args(data_root, out, init_from="resume"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "not plain data" in err, err
    assert not marker.exists()
    assert torch.load(folder / "trainer_state.pt", weights_only=True)["step"] == 10  # not rewritten
    assert os.path.islink(out / "last")


# ---- 2. a dataset prepared again under a running train ----

def test_a_dataset_prepared_again_does_not_reach_a_run_reading_it(tmp_path):
    """The sampler holds the shard files it opened: after prepare.py swaps in a new, smaller folder
    of that name, the same batches come back (before: new data, or an IndexError past its end)."""
    root = tmp_path / "data"
    folder = prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=root)
    windows = data.Windows(folder, "train", block_size=32, vocab_size=65)
    before = [windows.random_batch(1337, index, 8) for index in range(20)]
    source = data.read_meta(folder)["source_sha256"]
    smaller = tmp_path / "smaller.txt"
    smaller.write_text(PLAY.read_text()[:3000][::-1])
    assert prepare.prepare("shakespeare_char", inputs=[str(smaller)], data_root=root) == folder
    assert data.read_meta(folder)["source_sha256"] != source
    after = [windows.random_batch(1337, index, 8) for index in range(20)]
    assert all(torch.equal(a, b) for pair in zip(before, after) for a, b in zip(*pair))


# ---- 7. temporary folders of killed preparations ----

def test_the_next_prepare_removes_a_killed_ones_temporary_folder(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale, busy = (temporary_folder(tmp_path / "shakespeare_char", int(pid))
                       for pid in (gone.stdout.strip(), running.pid))
        elsewhere = tmp_path / f"shakespeare_char.tmp-another-machine-{gone.stdout.strip()}"
        for folder in (stale, busy, elsewhere):
            folder.mkdir()
            (folder / "train_000000.bin").write_bytes(b"partial")
        prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=tmp_path)
        assert not stale.exists() and busy.exists()  # a preparation still running keeps its folder
        assert elsewhere.exists()  # another machine's (shared data_root) is not this one's to judge
        assert f"removed {stale}: a preparation that was stopped left it" in capsys.readouterr().out
    finally:
        running.kill()


# ---- 9. the task file's line in eval.py's and task_eval's errors ----

def test_a_task_line_not_utf8_or_not_in_the_vocabulary_is_named(data_root, tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    good = '{"ctx": "To be", "endings": ["or", "xq"], "label": 0}\n'
    path.write_bytes(good.encode() * 3 + b'{"ctx": "caf\xe9", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(data.DataError, match=f"{path} line 4 is not UTF-8 text"):
        eval.load_task(str(path))
    path.write_text(good * 2 + '{"ctx": "To be", "endings": ["or", "€5"], "label": 0}\n')
    tokenizer = data.get_tokenizer(data.read_meta(data_root / "shakespeare_char"))
    with pytest.raises(data.DataError, match=f"{path} line 3: characters"):
        eval.load_task(str(path), tokenizer=tokenizer)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(data_root, out, task_eval=path))
    err = capsys.readouterr().err
    assert (exit_info.value.code == 2 and err.count("\n") == 1
            and f"{path} line 3: characters" in err)
    assert not out.exists() or not any(out.iterdir())  # nothing written


# ---- 6. a run that failed before its first checkpoint ----

def test_a_negative_seed_is_refused_before_anything_is_written(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(data_root, out, seed=-1))
    assert (exit_info.value.code == 2
            and capsys.readouterr().err == "error: seed must be >= 0, got -1\n")
    assert not out.exists()


def test_a_folder_whose_run_saved_no_checkpoint_starts_afresh(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    diverging = {"learning_rate": 1e30, "max_skipped_steps": 2, "grad_clip": 0}
    with pytest.raises(SystemExit) as exit_info:  # diverges at step 2, before any checkpoint
        train.main(tiny_args(data_root, out, **diverging))
    err = capsys.readouterr().err
    assert (exit_info.value.code == 1 and "no checkpoint was saved" in err
            and "last.pt" not in err), err
    assert not (out / "last.pt").exists() and (out / "log.jsonl").exists()
    train.main(tiny_args(data_root, out, max_iters=5, lr_decay_iters=5, sample_interval=0))
    assert "set aside in earlier-1/" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["end_reason"] == "finished"


# ---- 4. a sharded save that fails ----

def test_a_failed_sharded_save_is_one_line_recorded_and_leaves_no_partial_folder(
        data_root, tmp_path):
    out = tmp_path / "run"
    train.main(run_args(data_root, out, stop_iter=5))
    command = shlex.join([sys.executable, "train.py",
                          *run_args(data_root, out, init_from="resume")])
    # 100 KB: below a step folder's shards (~140 KB and more)
    result = subprocess.run(["bash", "-c", f"ulimit -f 100; exec {command}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert (result.stderr.startswith(f"error: cannot write {out}/")
            and "(File too large;" in result.stderr)
    assert ("run.json records why" in result.stderr
            and f"{out / 'last'} is the last good checkpoint" in result.stderr)
    assert json.loads((out / "run.json").read_text())["end_reason"].startswith(
        "write failed: cannot write")
    # no partial folder
    assert sorted(p.name for p in out.glob("*.0*")) == ["best.0000005", "last.0000005"]


# ---- 5. out of memory ----

@pytest.mark.parametrize("when", ["train", "eval"])
def test_out_of_memory_is_one_line_naming_the_keys(data_root, tmp_path, capsys, monkeypatch, when):
    """CPU's allocator raises this RuntimeError (CUDA an OutOfMemoryError): raised here at the 3rd
    training forward, or at the first evaluation's."""
    original, calls = model.GPT.forward, [0]

    def forward(self, idx, targets=None, kv_cache=None):
        if targets is not None and self.training == (when == "train"):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: "
                                   "can't allocate memory")
        return original(self, idx, targets, kv_cache)

    monkeypatch.setattr(model.GPT, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(data_root, out))
    err = capsys.readouterr().err
    assert (exit_info.value.code == 1 and err.count("\n") == 1
            and err.startswith("error: out of memory at step ")), err
    assert ("lower --batch_size and raise --gradient_accumulation_steps" in err
            and "run.json records it" in err)
    assert json.loads((out / "run.json").read_text())["end_reason"] == "out of memory"


# ---- 8. stop signals during first-use preparation, and at the last step ----

def preparing(data_root):
    """Whether a prepare.py child is writing into data_root (Linux /proc)."""
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if (b"prepare.py" in cmdline.read_bytes()
                    and str(data_root).encode() in cmdline.read_bytes()):
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_default_data_is_prepared_stops_in_one_line(tmp_path, sig):
    data_root, out = tmp_path / "data", tmp_path / "run"
    args = [f"--data_root={data_root}", f"--out_dir={out}", "--n_layer=1", "--n_head=2",
            "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=30",
            "--warmup_iters=2", "--compile=false"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not preparing(data_root):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # as Ctrl-C does: the whole group, prepare.py included
    else:
        proc.send_signal(sig)  # as a scheduler does: train.py alone
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: stopped by a signal (SIGINT or SIGTERM) "
                                                   "while preparing the default dataset"), err
    assert err.count("\n") == 1 and not (out / "run.json").exists()


def test_a_signal_at_the_last_step_leaves_the_run_finished(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original, calls = model.GPT.forward, [0]

    def forward(self, idx, targets=None, kv_cache=None):
        if targets is not None and self.training:
            calls[0] += 1
            if calls[0] == 10:  # the last step's forward
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, idx, targets, kv_cache)

    monkeypatch.setattr(model.GPT, "forward", forward)
    train.main(tiny_args(data_root, out, max_iters=10, lr_decay_iters=10, eval_interval=5,
                         ckpt_interval=5))
    assert json.loads((out / "run.json").read_text())["end_reason"] == "finished"
