"""A new run starts from another run's weights (issue 25): `--init_from=<run folder or checkpoint>`
trains on other data of the same tokenizer with a fresh optimizer and schedule, LoRA and SFT work
from it, run.json names the parent; a checkpoint of another tokenizer, a key that would change the
architecture, a foreign or missing file: one line, exit 2, nothing written."""

import hashlib
import io
import json
import math

import pytest
import torch
from conftest import PLAY, ROOT, read_log, run_here, tiny_args

import prepare

pytestmark = pytest.mark.slow  # training runs

RECORDS = [{"prompt": f"Q: name {i}?\n", "completion": f"A: it is {i}"} for i in range(12)]


def byte_args(data_root, dataset, out_dir, **overrides):
    short = {"dataset": dataset, "max_iters": 20, "lr_decay_iters": 20, "eval_interval": 10,
             "ckpt_interval": 10, "sample_interval": 0}
    return tiny_args(data_root, out_dir, **{**short, **overrides})


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A run pretrained on the play's bytes, and a second dataset of other text (this repository's
    configurator.py) with the same byte tokenizer."""
    root = tmp_path_factory.mktemp("lineage")
    data = root / "data"
    prepare.prepare("text", inputs=[str(PLAY)], tokenizer="byte", name="play_bytes", data_root=data)
    prepare.prepare("text", inputs=[str(ROOT / "configurator.py")], tokenizer="byte",
                    name="code_bytes", data_root=data, val_fraction=0.2)
    run_here("train.py", byte_args(data, "play_bytes", root / "parent", learning_rate=1e-2))
    return root


def test_a_run_continues_from_another_runs_weights_on_other_data(parent, tmp_path):
    data, child = parent / "data", tmp_path / "child"
    run_here("train.py", byte_args(data, "code_bytes", child, init_from=parent / "parent"))
    first = next(r for r in read_log(child) if "val_loss" in r)
    assert (first["step"] == 0
            and first["val_loss"] < math.log(257) - 1)  # the parent's weights, not random ones
    record = json.loads((child / "run.json").read_text())
    best = parent / "parent" / "best.pt"
    assert record["parent"] == {"run": str(best.parent.resolve()),
                                "checkpoint": str(best.resolve()),
                                "step": torch.load(best, weights_only=True)["step"],
                                "sha256": hashlib.sha256(best.read_bytes()).hexdigest()}
    optimizer = torch.load(child / "last.pt", weights_only=True)["optimizer"]
    # a fresh optimizer
    assert {float(state["step"]) for state in optimizer["state"].values()} == {20.0}
    run_here("train.py", byte_args(data, "code_bytes", child, init_from="resume", max_iters=30,
                                     lr_decay_iters=30))
    # a resume keeps it
    assert json.loads((child / "run.json").read_text())["parent"] == record["parent"]


def test_lora_fine_tuning_starts_from_a_run_checkpoint_file(parent, tmp_path, monkeypatch):
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    prepare.prepare("sft", inputs=[str(source)], tokenizer="byte", name="qa",
                    data_root=parent / "data", block_size=32, val_fraction=0.25)
    out, base = tmp_path / "sft", parent / "parent" / "last.pt"
    run_here("train.py", byte_args(parent / "data", "qa", out, init_from=base, lora_rank=4,
                                   learning_rate=1e-2))
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert evals[-1] < evals[0]
    assert json.loads((out / "run.json").read_text())["parent"]["checkpoint"].endswith("last.pt")
    # its adapters alone (export.py takes the run folder: its best) apply to that checkpoint, and
    # chat in the fine-tune's template as the run does; PEFT needs the base exported first
    report = run_here("export.py", [out, tmp_path / "adapters", "--adapters_only"]).stdout
    assert f"after `python export.py {base} {parent / 'parent' / 'last-hf'}`" in report
    chats, adapters = [], tmp_path / "adapters"
    for args in ([f"--out_dir={out}"], [f"--init_from={base}", f"--adapters={adapters}"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("name 3?\n"))
        chats.append(run_here("sample.py", [*args, "--chat", "--temperature=0",
                                            "--max_new_tokens=8", "--device=cpu"]).stdout)
    assert chats[0] == chats[1] and chats[0]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dataset": "shakespeare_char"},
     "was trained on byte tokens (vocab 257), but shakespeare_char holds char"),
    ({"n_layer": 3}, "fixes the architecture (n_layer=2), but the config asks for n_layer=3"),
    ({"init_from": "{tmp}/missing"}, "is neither scratch, resume"),
    ({"init_from": "{tmp}/nanogpt.pt"}, "is not a checkpoint of this trainer (nanoGPT's layout"),
])
def test_a_bad_parent_is_one_line_and_writes_nothing(parent, tmp_path, overrides, message):
    torch.save({"model": {}, "model_args": {}}, tmp_path / "nanogpt.pt")
    prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=parent / "data")
    overrides = {key: str(value).format(tmp=tmp_path) for key, value in overrides.items()}
    overrides = {"dataset": "code_bytes", "init_from": parent / "parent", **overrides}
    args = byte_args(parent / "data", overrides.pop("dataset"), tmp_path / "run", **overrides)
    result = run_here("train.py", args, check=False)
    assert (result.returncode == 2 and result.stderr.startswith("error: ")
            and result.stderr.count("\n") == 1)
    assert message in result.stderr
    assert not (tmp_path / "run").exists()
