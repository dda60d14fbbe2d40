"""eval.py: multiple-choice scoring checked against transformers' GPT-2, the same numbers from a
run's checkpoint, a Hugging Face folder and two torchrun processes, the HellaSwag download (with its
network faked), truncation to the model's context, and one-line errors for bad task files."""

import contextlib
import hashlib
import json
import random
import subprocess
import sys
import urllib.error
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import data
import eval
from checkpoint import save_checkpoint
from hf import GPT2_META, save_hf
from model import GPT, GPT2_OPTIONS, GPTConfig

BLOCK_SIZE = 32  # short, so that the long contexts below run past it
WORDS = ("the man woman dog ball water house runs jumps slowly quickly red green table chair "
         "kitchen garden picks up puts down then and with a of to in on is are cat sun rain car "
         "road book reads writes").split()


def synthetic_task(path, count=37, seed=0):
    """`count` examples with 2-5 short endings; every fifth context is long enough to be cut."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            ctx = (" ".join(rng.choices(WORDS, k=40 if i % 5 == 0 else rng.randint(3, 12)))
                   .capitalize() + ".")
            endings = [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + "."
                       for _ in range(rng.randint(2, 5))]
            f.write(json.dumps({"ctx": ctx, "endings": endings,
                                "label": rng.randrange(len(endings))}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random small GPT-2 with GPT-2's vocabulary twice: a Hugging Face folder and a run folder
    holding it as best.pt (the keys checkpoint.model_from_checkpoint and sample.load_model read),
    and a task file."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT2_OPTIONS, block_size=BLOCK_SIZE, vocab_size=50257, n_layer=2,
                          n_head=2, n_embd=32, bias=True))
    with torch.no_grad():  # all random, as in tests/test_interop.py: endings' losses spread apart
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    save_hf(model, root / "hf")
    (root / "run").mkdir()
    save_checkpoint(root / "run" / "best.pt", {
        "model": model.state_dict(), "model_config": asdict(model.config), "meta": GPT2_META})
    return {"hf": root / "hf", "run": root / "run", "task": synthetic_task(root / "task.jsonl")}


def run_eval(args, capsys, tmp_path, name="scores.json"):
    eval.main([*args, f"--out={tmp_path / name}", "--device=cpu", "--dtype=float32"])
    return json.loads((tmp_path / name).read_text()), capsys.readouterr().out


def reference(hf, tokenizer, example):
    """Per ending, with transformers and without padding: the summed loss of the ending's tokens and
    their count, the row (context, then " " + ending) cut to its last BLOCK_SIZE tokens."""
    context = tokenizer.encode(example["ctx"])
    losses, counts = [], []
    for ending in example["endings"]:
        ending_ids = tokenizer.encode(" " + ending)
        row = torch.tensor([(context + ending_ids)[-BLOCK_SIZE:]])
        n = min(len(ending_ids), row.size(1) - 1)
        logits = hf(row).logits[0, -n - 1:-1]
        losses.append(F.cross_entropy(logits, row[0, -n:], reduction="sum").item())
        counts.append(n)
    return losses, counts


@torch.no_grad()
def test_losses_and_predictions_match_transformers(tiny, capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    scores, out = run_eval([f"--init_from={tiny['hf']}", f"--task={tiny['task']}"],
                           capsys, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny["hf"]).eval()
    tokenizer = data.get_tokenizer(GPT2_META)
    examples = eval.load_task(tiny["task"])
    assert scores["n"] == len(examples) == 37
    correct = correct_norm = cut = truncated = 0
    for example, ours in zip(examples, scores["examples"]):
        losses, counts = reference(hf, tokenizer, example)
        assert ours["losses"] == pytest.approx(losses, abs=1e-4, rel=0) and ours["tokens"] == counts
        pred = min(range(len(losses)), key=losses.__getitem__)
        pred_norm = min(range(len(losses)), key=lambda i: losses[i] / counts[i])
        assert ((ours["label"], ours["pred"], ours["pred_norm"])
                == (example["label"], pred, pred_norm))
        correct, correct_norm = (correct + (pred == example["label"]),
                                 correct_norm + (pred_norm == example["label"]))
        context = len(tokenizer.encode(example["ctx"]))
        cuts = [max(0, context + len(tokenizer.encode(" " + e)) - BLOCK_SIZE)
                for e in example["endings"]]
        cut, truncated = cut + sum(cuts), truncated + (sum(cuts) > 0)
    assert scores["acc"] == correct / 37 and scores["acc_norm"] == correct_norm / 37
    # the losses decide, not a tie or a constant
    assert len({ours["pred"] for ours in scores["examples"]}) > 1
    assert scores["truncated"] == truncated == 8 and scores["cut_tokens"] == cut > 0
    assert f"acc {correct / 37:.4f}, acc_norm {correct_norm / 37:.4f}, n 37 (" in out
    assert ("note: 8 example(s) ran past the model's context of 32 tokens and kept their last "
            f"tokens: {cut}") in out


@pytest.mark.slow
def test_checkpoint_folder_and_torchrun_agree(tiny, capsys, tmp_path):
    """A run's checkpoint, the Hugging Face folder and two processes (which split the 37 examples
    19/18) give the same scores and per-example results, in task order."""
    task = f"--task={tiny['task']}"
    from_run, _ = run_eval([f"--out_dir={tiny['run']}", task], capsys, tmp_path, "run.json")
    from_folder, _ = run_eval([f"--init_from={tiny['hf']}", task], capsys, tmp_path, "folder.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "eval.py", f"--out_dir={tiny['run']}", task, f"--out={tmp_path / 'ddp.json'}",
               "--device=cpu", "--dtype=float32"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("acc_norm") == 1  # rank 0 alone reports
    from_ddp = json.loads((tmp_path / "ddp.json").read_text())
    for other in (from_folder, from_ddp):
        assert ((other["acc"], other["acc_norm"], other["n"])
                == (from_run["acc"], from_run["acc_norm"], 37))
        for a, b in zip(from_run["examples"], other["examples"], strict=True):
            assert ((a["label"], a["pred"], a["pred_norm"], a["tokens"])
                    == (b["label"], b["pred"], b["pred_norm"], b["tokens"]))
            assert a["losses"] == pytest.approx(b["losses"], abs=1e-5, rel=0)


def test_truncation_keeps_the_last_tokens_and_counts_the_cut():
    """Byte tokens (one per character) and a context of 8: a row of 11 bytes loses its first 3, and
    an ending longer than the context is scored on the 7 tokens its last 8 predict."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=257, n_layer=1, n_head=1, n_embd=16)).eval()
    examples = [{"ctx": "abcdefgh", "endings": ["xy", "z"], "label": 0},  # rows of 8+3, 8+2 bytes
                {"ctx": "ab", "endings": ["c", "d"], "label": 1},
                {"ctx": "a", "endings": ["0123456789", "0"], "label": 1}]  # " 0123456789": 11 bytes
    result = eval.evaluate_task(model, data.ByteTokenizer(), examples, "cpu",
                                contextlib.nullcontext())
    assert (result["truncated"], result["cut_tokens"]) == (2, 3 + 2 + 4)
    assert [r["tokens"] for r in result["examples"]] == [[3, 2], [2, 2], [7, 2]]
    assert [r["cut"] for r in result["examples"]] == [5, 0, 4]
    row = torch.tensor([list(b"abcdefgh xy")[-8:]])
    logits, _ = model(row)
    expected = F.cross_entropy(logits[0, 4:7, :257], row[0, 5:], reduction="sum").item()
    assert result["examples"][0]["losses"][0] == pytest.approx(expected, abs=1e-5)


def test_evaluate_task_returns_the_model_to_its_mode():
    """As the training loop will call it: on a model in training mode, which it must restore."""
    model = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=1, n_embd=16)).train()
    examples = [{"ctx": "hello", "endings": ["world", "there", "you"], "label": 0}] * 3
    result = eval.evaluate_task(model, data.ByteTokenizer(), examples, "cpu",
                                contextlib.nullcontext())
    assert model.training and result["n"] == 3 and 0 <= result["acc"] <= 1


def fake_fetch(content):
    def fetch(url):
        assert url == eval.HELLASWAG_URL
        if isinstance(content, Exception):
            raise content
        return content
    return fetch


def test_hellaswag_is_downloaded_once_and_checked(tiny, monkeypatch, capsys, tmp_path):
    content = tiny["task"].read_bytes()
    monkeypatch.setattr(eval, "HELLASWAG_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(eval, "fetch", fake_fetch(content))
    assert (eval.load_task("hellaswag", max_examples=5, cache_dir=str(tmp_path))
            == eval.load_task(tiny["task"])[:5])
    assert (tmp_path / "hellaswag_val.jsonl").read_bytes() == content
    monkeypatch.setattr(eval, "fetch", fake_fetch(urllib.error.URLError("offline")))
    assert len(eval.load_task("hellaswag", cache_dir=str(tmp_path))) == 37  # from cache: no fetch
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no cache_dir: the default cache
    with pytest.raises(data.DataError, match="could not download"):
        eval.load_task("hellaswag")
    assert (f"to {tmp_path / 'xdg' / 'gpt-trainer' / 'hellaswag_val.jsonl'}\n"
            in capsys.readouterr().out)


def expect_error(args, capsys, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        eval.main([*args, "--device=cpu"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    for fragment in fragments:
        assert fragment in captured.err
    return captured


def test_hellaswag_checksum_mismatch_and_offline_are_one_line(monkeypatch, capsys, tmp_path):
    args = ["--task=hellaswag", f"--cache_dir={tmp_path}"]
    monkeypatch.setattr(eval, "fetch", fake_fetch(b'{"ctx": "tampered"}\n'))
    expect_error(args, capsys, "hellaswag_val.jsonl has sha256", eval.HELLASWAG_SHA256,
                 "give the task as its path")
    assert list(tmp_path.iterdir()) == []  # nothing cached, no temporary file left
    monkeypatch.setattr(eval, "fetch",
                        fake_fetch(urllib.error.URLError("[Errno -3] name resolution failed")))
    expect_error(args, capsys, "could not download HellaSwag",
                 "give the task as the path of a copy")


@pytest.mark.parametrize(("lines", "message"), [
    (['{"ctx": "a", "endings": ["b", "c"], "label": 0}',
      '{"ctx": "a", "endings": ["b", "c"], "label": 0'], "line 2 is not JSON"),
    (['{"ctx": "a", "endings": ["b"], "label": 0}'],
     "line 1 has no endings (a list of two or more strings)"),
    (['{"ctx": "a", "endings": ["b", "c"], "label": 2}'],
     "line 1 has label 2, not the index of one of its 2"),
    (['{"ctx": "a", "endings": ["b", "c"], "label": "1"}'], "line 1 has label '1'"),
    (['', '{"endings": ["b", "c"], "label": 0}'], "line 2 has no ctx"),
    (['["a", ["b", "c"], 0]'], "line 1 has no ctx"),
    ([], "holds no examples"),
])
def test_bad_task_files_are_one_line_errors(lines, message, capsys, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    expect_error([f"--task={path}"], capsys, str(path), message)


def test_missing_task_file_and_bad_max_examples(capsys, tmp_path):
    expect_error([f"--task={tmp_path / 'absent.jsonl'}"], capsys,
                 f"task file {tmp_path / 'absent.jsonl'} does not")
    expect_error(["--max_examples=-1"], capsys, "max_examples must be >= 0")
