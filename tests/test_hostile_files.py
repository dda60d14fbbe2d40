"""Issue 28, finding 1: no file under a run folder, however crafted, runs code in any script. A sharded
checkpoint is the path that could: torch.distributed.checkpoint unpickles its .metadata with plain pickle and
its non-tensor values with torch.load(weights_only=False). Payloads are planted in every file such a
checkpoint holds and read through every script that loads one."""

import os
import pathlib
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import tiny_args
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import eval
import export
import sample
import train
from checkpoint import CheckpointError, load_checkpoint, load_sharded_state, model_from_checkpoint
from optimizers import configure_optimizer

pytestmark = pytest.mark.slow  # training runs


class Plant:
    """Unpickling it creates `marker`: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def run_args(data_root, out, **overrides):
    return tiny_args(data_root, out, max_iters=10, lr_decay_iters=10, eval_interval=5, ckpt_interval=5,
                     sample_interval=0, checkpoint_format="sharded", **overrides)


@pytest.fixture(scope="module")
def sharded_run(data_root, tmp_path_factory):
    """A tiny run with sharded checkpoints: last -> last.<step>/ and best -> best.<step>/."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    train.main(run_args(data_root, out))
    return out


def planted_copy(run, tmp_path, name, file, payload):
    """A copy of the run with `payload`'s pickle in place of `file` in checkpoint `name`'s step folder."""
    out = shutil.copytree(run, tmp_path / "run", symlinks=True)
    (out / name).resolve().joinpath(file).write_bytes(pickle.dumps(payload))
    return out


def script_calls(out, name, task, data_root):
    """Every script that reads a run's checkpoint `name`, as (main, its arguments); a resume reads last."""
    calls = [(sample.main, [f"--out_dir={out}", f"--ckpt={name}", "--max_new_tokens=2", "--device=cpu"]),
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
    """The optimizer's settings are pickled values in the .distcp files: one replaced by a payload (the
    metadata rewritten to match, as a forger would) is refused on resume, and by load_sharded_state."""
    marker = tmp_path / "ran"
    out = shutil.copytree(sharded_run, tmp_path / "run", symlinks=True)
    folder = (out / "last").resolve()
    gpt = model_from_checkpoint(load_checkpoint(out / "last"))
    optimizer = configure_optimizer(gpt, 0.1, 1e-3, (0.9, 0.99), "cpu")
    load_sharded_state(folder, gpt, optimizer)
    state = {"model": get_model_state_dict(gpt), "optimizer": get_optimizer_state_dict(gpt, optimizer)}
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
    assert torch.load(folder / "trainer_state.pt", weights_only=True)["step"] == 10  # nothing rewritten
    assert os.path.islink(out / "last")
