"""A step's loss is the mean over every trained target of all its micro-batches and processes
(issue 25): fine-tuning rows with very different numbers of trained targets give the gradients of
one large batch however they are split; pretraining (every target trained) is bitwise unchanged."""

import contextlib
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import train
from model import GPT, GPTConfig

CONFIG = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32)


def rows(trained, seed=0):
    """(x, y) of one row per entry of `trained`: the row's last `trained` targets count, the rest
    are -100 (as a fine-tuning example's prompt and padding)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(CONFIG.vocab_size, (len(trained), CONFIG.block_size), generator=generator)
    y = torch.randint(CONFIG.vocab_size, (len(trained), CONFIG.block_size), generator=generator)
    for row, n in enumerate(trained):
        y[row, :CONFIG.block_size - n] = -100
    return x, y


def step_gradients(batches, model=None):
    """The gradients train_step leaves, from a fixed initial model (no clipping, no update)."""
    torch.manual_seed(0)
    model = model or GPT(CONFIG)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _, applied = train.train_step(model, optimizer, scaler, contextlib.nullcontext(), batches,
                                        grad_clip=0.0)
    assert applied
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


TRAINED = [1, 16, 2, 12]  # trained targets per row: a short answer beside long ones


def test_one_batch_of_four_equals_four_micro_batches_of_one():
    x, y = rows(TRAINED)
    loss, whole = step_gradients([(x, y)])
    split_loss, split = step_gradients([(x[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert split_loss == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(split[k], whole[k], atol=1e-7, rtol=1e-5) for k in whole)
    # the mean of micro-batch means (the old weighting) is another loss: the test tells them apart
    with torch.no_grad():
        means = [GPT(CONFIG)(x[i:i + 1], y[i:i + 1])[1] for i in range(4)]
    assert abs(sum(means) / 4 - loss) > 1e-3


def test_a_micro_batch_with_no_trained_target_adds_nothing():
    x, y = rows(TRAINED)
    empty_x, empty_y = rows([0, 0], seed=1)
    loss, alone = step_gradients([(x, y)])
    padded_loss, padded = step_gradients([(empty_x, empty_y), (x, y)])
    assert padded_loss == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(padded[k], alone[k], atol=1e-7, rtol=1e-5) for k in alone)


def test_pretraining_gradients_are_bitwise_those_of_the_mean_of_micro_batch_means():
    """With every target trained, each micro-batch's share is 1 / their count: the gradients are
    bit for bit those of `loss / count` per micro-batch (the weighting before, as the reference)."""
    batches = [rows([16, 16], seed=s) for s in range(3)]
    _, ours = step_gradients(batches)
    torch.manual_seed(0)
    model = GPT(CONFIG)
    for x, y in batches:
        (model(x, y)[1] / len(batches)).backward()
    assert all(torch.equal(ours[name], p.grad) for name, p in model.named_parameters())


TWO_PROCESSES = """
import contextlib, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[2] + "/tests")
import train
from test_token_weighting import CONFIG, TRAINED, rows
from model import GPT
dist.init_process_group("gloo")
rank = dist.get_rank()
x, y = rows(TRAINED)
torch.manual_seed(0)
gpt = GPT(CONFIG)
model = DistributedDataParallel(gpt)
# process 0: rows of 1 and 16 trained targets, process 1: of 2 and 12
half = slice(2 * rank, 2 * rank + 2)
optimizer = torch.optim.SGD(gpt.parameters(), lr=0.0)
scaler = torch.amp.GradScaler("cpu", enabled=False)
loss, _, _ = train.train_step(model, optimizer, scaler, contextlib.nullcontext(),
                              [(x[half], y[half])], 0.0)
if rank == 0:
    torch.save({"loss": loss, "grads": {n: p.grad for n, p in gpt.named_parameters()}}, sys.argv[1])
# as train.py: a DDP reducer holding the group's last reference can abort the exit (pytorch#56297)
del model
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    script, out = tmp_path / "two.py", tmp_path / "grads.pt"
    script.write_text(TWO_PROCESSES)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), str(out), str(ROOT)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    x, y = rows(TRAINED)
    loss, whole = step_gradients([(x, y)])
    ddp = torch.load(out, weights_only=True)
    assert ddp["loss"] == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(ddp["grads"][k], whole[k], atol=1e-7, rtol=1e-5) for k in whole)
