"""Activation checkpointing (--activation_checkpointing=True, parallel.checkpoint_blocks): each
block's activations recomputed in the backward give the losses and gradients of keeping them, in one
process (eager and compiled), through train.py and under DDP and FSDP; the parameters keep their
names and generation runs each block once."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, read_log, run_here, tiny_args

import parallel
from devices import Runtime
from model import GPT, GPT2_OPTIONS, GPTConfig

SHAPE = {"block_size": 16, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
CONFIGS = {  # GPT-2's options with dropout; the defaults (rope, relu2, qk_norm); options that give
    # blocks more inputs; LoRA, where the blocks' input needs no gradient (the frozen embedding's)
    "gpt2_dropout": GPTConfig(**SHAPE, **GPT2_OPTIONS, dropout=0.1),
    "defaults": GPTConfig(**SHAPE),
    "value_embeddings_unet_dropout": GPTConfig(**SHAPE, value_embeddings=1, unet_skips=True,
                                               dropout=0.1),
    "lora_dropout": GPTConfig(**SHAPE, lora_rank=2, lora_dropout=0.1),
}
CPU = Runtime("cpu", torch.float32, "as configured")  # compile off


def distributed(config, checkpointed):
    """(the GPT, parallel.distribute's module of it in one process), from fixed initial weights."""
    torch.manual_seed(0)
    gpt = GPT(config)
    return gpt, parallel.distribute(
        gpt, CPU, SimpleNamespace(activation_checkpointing=checkpointed, parallel="ddp"), 1)


def loss_and_gradients(gpt, model):
    """One forward and backward on a fixed batch and dropout masks: (loss, {name: gradient})."""
    x = torch.randint(gpt.config.vocab_size, (3, gpt.config.block_size),
                      generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    _, loss = model(x, x.roll(-1, 1))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in gpt.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", CONFIGS)
def test_same_loss_gradients_and_names_as_keeping_the_activations(name):
    plain, checkpointed = distributed(CONFIGS[name], False), distributed(CONFIGS[name], True)
    assert ([n for n, _ in checkpointed[0].named_parameters()]
            == [n for n, _ in plain[0].named_parameters()])
    assert list(checkpointed[0].state_dict()) == list(plain[0].state_dict())
    expected, got = loss_and_gradients(*plain), loss_and_gradients(*checkpointed)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_compiled_whole_graph_keeps_the_checkpoints_and_the_gradients():
    """Dynamo traces each checkpointed block as one region (no graph break); aot_eager runs
    AOTAutograd's forward/backward split without Inductor's code generation (rt.compile's Inductor:
    about 25 s a model on two CPU cores, so checked by hand: the same loss, gradients within 3e-7
    relative)."""
    graphs = []

    def recording_aot_eager(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    config = CONFIGS["gpt2_dropout"]
    gpt, model = distributed(config, False)
    expected = loss_and_gradients(gpt, model)
    gpt, model = distributed(config, True)
    got = loss_and_gradients(gpt, torch.compile(model, backend=recording_aot_eager, fullgraph=True))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert graphs[0].count("higher_order.tag_activation_checkpoint") == config.n_layer


def test_the_backward_reruns_each_block_and_generation_runs_it_once():
    gpt, model = distributed(CONFIGS["defaults"], True)
    calls = []
    for block in gpt.transformer.h:
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    loss_and_gradients(gpt, model)
    assert len(calls) == 2 * gpt.config.n_layer  # the forward, then the backward's rerun
    calls.clear()
    prompt = torch.zeros((1, 1), dtype=torch.long)
    tokens = gpt.generate(prompt, 3, temperature=0)
    assert len(calls) == 3 * gpt.config.n_layer  # a pass per token, no rerun, KV cache written once
    plain, _ = distributed(CONFIGS["defaults"], False)
    assert torch.equal(tokens, plain.generate(prompt, 3, temperature=0))


RUN = {"gradient_accumulation_steps": 2, "max_iters": 6, "lr_decay_iters": 6, "warmup_iters": 2,
       "log_interval": 1, "eval_interval": 3, "ckpt_interval": 3, "sample_interval": 3,
       "dropout": 0.1}


def logged(out_dir):
    """Every train and val loss and sample the run logged, by (step, kind)."""
    kinds = ("train_loss", "val_loss", "sample")
    return {(r["step"], kind): r[kind] for r in read_log(out_dir) for kind in kinds if kind in r}


def assert_same_run(plain, checkpointed):
    """The same losses, samples and final weights, bit for bit: the rerun is the forward's own ops
    on the same inputs and dropout masks, so the gradients have the same bits (looser bounds would
    hide a mask drawn anew)."""
    assert logged(checkpointed) == logged(plain)
    weights = torch.load(plain / "last.pt", weights_only=True)["model"]
    theirs = torch.load(checkpointed / "last.pt", weights_only=True)["model"]
    assert theirs.keys() == weights.keys() and all(torch.equal(theirs[k], weights[k])
                                                   for k in weights)


@pytest.mark.slow
def test_train_py_run_equals_the_run_keeping_the_activations(data_root, tmp_path):
    """train.py's defaults (Muon, rope, relu2, qk_norm) with dropout, its samples generated by the
    training model."""
    for run, checkpointed in (("plain", False), ("checkpointed", True)):
        run_here("train.py", tiny_args(data_root, tmp_path / run, recipe={},
                                       activation_checkpointing=checkpointed, **RUN))
    assert_same_run(tmp_path / "plain", tmp_path / "checkpointed")


@pytest.mark.slow
# DDP too, checked by hand: one torchrun pair keeps it short
@pytest.mark.parametrize("parallel_mode", ["fsdp"])
def test_two_gloo_processes_equal_the_run_keeping_the_activations(data_root, tmp_path,
                                                                   parallel_mode):
    for run, checkpointed in (("plain", False), ("checkpointed", True)):
        args = tiny_args(data_root, tmp_path / run, parallel=parallel_mode,
                         activation_checkpointing=checkpointed, **RUN)
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "train.py", *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "plain", tmp_path / "checkpointed")
