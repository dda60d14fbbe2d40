"""Supervised fine-tuning in train.py: rows of examples whose prompt tokens have target -100 (they
cost nothing, carry no gradient); the example config trains with falling completion-only loss."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, read_log, run_here

import data
import prepare
from hf import save_hf
from model import GPT, GPT2_OPTIONS, GPTConfig
from train import Examples

RECORDS = [
    {"prompt": "Q: 2+2?\n", "completion": "4"},
    {"prompt": "Say hi\n", "completion": "hi there"},
    {"messages": [{"role": "user", "content": "Reverse: ab"},
                  {"role": "assistant", "content": "ba"}]},
    {"prompt": "Capital of France?\n", "completion": "Paris"},
    {"prompt": "Spell cat\n", "completion": "c-a-t"},
]


@pytest.fixture
def sft_dir(tmp_path):
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 4))
    return prepare.prepare("sft", inputs=[str(source)], tokenizer="byte",
                           data_root=tmp_path / "data", block_size=64)


def test_rows_mask_prompts_and_padding(sft_dir):
    examples = Examples(sft_dir, "train", block_size=64, vocab_size=257)
    ids, trained, offsets = data.load_sft(sft_dir, "train")
    x, y = examples.rows([0, 1], packed=False)
    for row, example in enumerate([0, 1]):
        tokens = np.asarray(ids[offsets[example]:offsets[example + 1]], dtype=np.int64)
        mask = np.asarray(trained[offsets[example]:offsets[example + 1]], dtype=bool)
        n = len(tokens) - 1
        assert x[row, :n].tolist() == tokens[:-1].tolist()
        assert y[row, :n].tolist() == np.where(mask[1:], tokens[1:], -100).tolist()
        assert (y[row, n:] == -100).all()  # padding is never a target
        assert 0 < (y[row] != -100).sum() < n  # some prompt, some completion
    packed_x, packed_y = examples.rows([0], packed=True)
    assert (packed_y != -100).sum() > (y[0] != -100).sum()  # the row runs on into the next examples
    assert (packed_x[0, :offsets[1] - offsets[0] - 1].tolist()
            == x[0, :offsets[1] - offsets[0] - 1].tolist())


def test_prompt_tokens_carry_exactly_zero_gradient(sft_dir):
    examples = Examples(sft_dir, "train", block_size=64, vocab_size=257)
    x, y = examples.random_batch(seed=0, index=0, batch_size=4)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    loss = model(x, y)[1]
    logits = model(x)[0]
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    masked = y == -100
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(logits.grad[masked]) == 0
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()
    # the same gradients as a loss that never sees the prompt positions at all
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(x)
    completion_only = F.cross_entropy(logits[~masked], y[~masked])
    completion_only.backward()
    assert abs(loss.item() - completion_only.item()) < 1e-6
    assert all(torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-8)
               for n, p in model.named_parameters())


@pytest.mark.slow
def test_an_example_longer_than_the_context_is_one_clear_line(sft_dir, tmp_path):
    result = run_here("train.py", [f"--data_root={sft_dir.parent}", "--dataset=sft",
                                   f"--out_dir={tmp_path / 'o'}", "--block_size=8", "--device=cpu"],
                      check=False)
    assert result.returncode == 2 and "more than block_size + 1" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.slow
def test_example_config_trains_with_falling_completion_loss(tmp_path):
    """config/sft_example.py as documented, on random GPT-2-layout weights (no download) shrunk
    for CPU."""
    data_root = tmp_path / "data"
    run_here("prepare.py", ["sft", "--input", str(ROOT / "config" / "sft_example.jsonl"),
                            "--block_size", "128", "--data_root", str(data_root)])
    torch.manual_seed(0)
    hf = tmp_path / "tiny-gpt2"
    save_hf(GPT(GPTConfig(**GPT2_OPTIONS, block_size=128, vocab_size=50257, n_layer=2, n_head=2,
                          n_embd=64)), hf)
    out = tmp_path / "out"
    run_here("train.py", ["config/sft_example.py", f"--init_from={hf}", f"--data_root={data_root}",
                          f"--out_dir={out}", "--learning_rate=3e-3", "--min_lr=3e-4",
                          "--max_iters=30", "--lr_decay_iters=30", "--warmup_iters=5",
                          "--eval_interval=15", "--eval_iters=4", "--batch_size=4",
                          "--device=cpu", "--dtype=float32", "--compile=false"])
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(evals) == 3 and evals[2] < evals[1] < evals[0] and evals[2] < 0.8 * evals[0]
