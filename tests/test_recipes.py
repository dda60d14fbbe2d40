"""The speedrun recipes as their config files stand, scaled down to seconds on a CPU: each trains
and resumes bitwise with every option the file sets. Overridden: sizes, lengths, devices, and for
the FineWeb recipe the vocabulary, accumulation, val tokens and target for the char data, and its
AdamW lrs, set for 124M and 0.5M tokens a step, scaled down with the model."""

import runpy

import pytest
import torch
from conftest import ROOT, read_log, run_here, tiny_args

pytestmark = pytest.mark.slow  # processes of their own: the full suite's, not the quick tier's

SCALED_DOWN = {  # the recipe's own keys, but for the sizes and the schedule's length
    "config/speedrun_char_cpu.py": {},
    "config/fineweb_speedrun.py": {"vocab_size": 0, "gradient_accumulation_steps": 2,
                                   "batch_size": 4, "val_tokens": 4 * 32 * 3, "value_embeddings": 1,
                                   "target_val_loss": 0, "learning_rate": 0.01,
                                   "embedding_lr": 0.03},
}


def recipe_keys(recipe):
    return {k: v for k, v in runpy.run_path(str(ROOT / recipe)).items() if not k.startswith("_")}


@pytest.mark.parametrize("recipe", list(SCALED_DOWN))
def test_recipe_trains_and_resumes_bitwise(recipe, data_root, tmp_path):
    overrides = {"n_embd": 32, "n_head": 2, "n_layer": 2, "block_size": 32, "max_iters": 30,
                 "lr_decay_iters": 30,
                 "warmup_iters": min(5, recipe_keys(recipe).get("warmup_iters", 5)),
                 "eval_interval": 15, "ckpt_interval": 15, "sample_interval": 0, "dropout": 0.0,
                 **SCALED_DOWN[recipe]}
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    run_here("train.py", [recipe, *tiny_args(data_root, whole, recipe={}, **overrides)])
    run_here("train.py", [recipe, *tiny_args(data_root, paused, recipe={}, stop_iter=15,
                                             **overrides)])
    run_here("train.py", [recipe, *tiny_args(data_root, paused, recipe={}, init_from="resume",
                                             **overrides)])
    evals = [r for r in read_log(whole) if "val_loss" in r]
    assert ([r["step"] for r in evals] == [0, 15, 30]
            and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5)
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (whole, paused))
    assert a["step"] == b["step"] == 30
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) if torch.is_tensor(state_a[k])
                   else state_a[k] == state_b[k] for k in state_a)
    overridden = {arg[2:].partition("=")[0]
                  for arg in tiny_args(data_root, whole, recipe={}, **overrides)}
    kept = {k: v for k, v in recipe_keys(recipe).items() if k not in overridden}
    # the recipe's own options
    assert "optimizer" in kept and all(a["config"][k] == v for k, v in kept.items())
