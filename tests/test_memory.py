"""memory.py: the per-block activation count against what autograd saves; the whole estimate against
the resident peak of a fresh process's training steps on CPU at three shapes; the keys it names
where memory is short; its line in a run's opening lines."""

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, run_script, tiny_args

import memory
import parallel
import train
from devices import Runtime
from model import GPT, GPT2_OPTIONS, GPTConfig
from optimizers import configure_optimizer

MARGIN = 0.15  # the estimate within 15% of the measured peak (0.97 to 1.03 of it where it was made)
SHAPES = {  # GPTConfig's fields, and the run's (RUN_KEYS)
    # GPT-2's vocabulary and options: the float32 logits dominate
    "gpt2_vocabulary": {"block_size": 128, "vocab_size": 50304, "n_layer": 2, "n_head": 4,
                        "n_embd": 128, **GPT2_OPTIONS, "batch_size": 4,
                        "gradient_accumulation_steps": 2, "dtype": "float32", "optimizer": "adamw",
                        "checkpointing": False},
    # characters, the default options under bf16 autocast: the blocks dominate
    "characters_bf16": {"block_size": 256, "vocab_size": 65, "n_layer": 4, "n_head": 4,
                        "n_embd": 128, "batch_size": 16, "gradient_accumulation_steps": 1,
                        "dtype": "bfloat16", "optimizer": "muon", "checkpointing": False},
    # activation checkpointing, SwiGLU and dropout (attention on torch's math kernel)
    "checkpointed_swiglu_dropout": {"block_size": 128, "vocab_size": 512, "n_layer": 4,
                                    "n_head": 4, "n_embd": 192, "mlp": "swiglu", "dropout": 0.1,
                                    "batch_size": 16, "gradient_accumulation_steps": 2,
                                    "dtype": "float32", "optimizer": "muon", "checkpointing": True},
}
RUN_KEYS = ("batch_size", "gradient_accumulation_steps", "dtype", "optimizer", "checkpointing")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
CPU = Runtime("cpu", torch.float32, "as configured")


def train_steps(shape, steps=2):
    """`steps` training steps as train.py takes them, at `shape`; the estimate for it."""
    run = {key: shape[key] for key in RUN_KEYS}
    dtype = getattr(torch, run["dtype"])
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{key: value for key, value in shape.items() if key not in RUN_KEYS}))
    if run["checkpointing"]:
        parallel.checkpoint_blocks(gpt)
    optimizer = configure_optimizer(gpt, train.weight_decay, train.learning_rate,
                                    (train.beta1, train.beta2), "cpu",
                                    train.muon_lr if run["optimizer"] == "muon" else None,
                                    None, None, train.muon_split)
    rt = Runtime("cpu", dtype, "as the shape says")
    tokens = torch.randint(gpt.config.vocab_size, (steps, run["gradient_accumulation_steps"],
                                                   run["batch_size"], gpt.config.block_size + 1))
    for step in tokens:
        batches = [(rows[:, :-1], rows[:, 1:]) for rows in step]
        train.train_step(gpt, optimizer, rt.grad_scaler(), rt.autocast(), batches, train.grad_clip)
    return memory.estimate(gpt, run["batch_size"], dtype, "cpu", run["optimizer"],
                           activation_checkpointing=run["checkpointing"],
                           micro_batches=run["gradient_accumulation_steps"])


def status_kib(field):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field))
    return int(line.split()[1])


def measured_and_estimated(shape):
    """In a fresh process: (the resident peak of training steps at `shape` over the resident size
    before its model was built, the estimate), in bytes. Every allocation over 64 KiB gets pages of
    its own, returned when freed (glibc otherwise raises that threshold at the first large free, and
    the heap's fragments stay resident), so the resident size follows the live tensors; a tiny
    model's step first loads the kernels' code and starts the threads, and the peak is reset after
    it."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    train_steps(shape | {"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 64,
                         "batch_size": 1}, steps=1)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size, VmHWM
    before = status_kib("VmRSS")
    estimate = train_steps(shape)
    return (status_kib("VmHWM") - before) * 1024, estimate.total


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures through glibc and /proc")
@pytest.mark.parametrize("name", SHAPES)
def test_the_estimate_is_within_its_margin_of_the_measured_peak(name):
    child = subprocess.run(
        [sys.executable, "-c", "import json, sys, test_memory; "
         "print(json.dumps(test_memory.measured_and_estimated(json.loads(sys.argv[1]))))",
         json.dumps(SHAPES[name])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    assert child.returncode == 0, child.stderr
    measured, estimated = json.loads(child.stdout.splitlines()[-1])
    assert abs(estimated / measured - 1) <= MARGIN, f"estimated {estimated / 2**20:.1f} MiB, " \
                                                    f"measured {measured / 2**20:.1f} MiB"


def saved_by_a_block(config, batch_size, dtype):
    """Bytes of distinct tensors autograd saves in a block's forward at batch_size x block_size."""
    block, T = GPT(config).transformer.h[0], config.block_size
    rotary = (block.attn.c_attn.weight.new_ones(T, config.n_embd // config.n_head // 2),) * 2
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(batch_size, T, config.n_embd, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), torch.autocast(
            "cpu", dtype=dtype, enabled=dtype != torch.float32):
        block(x, None, rotary if config.pos_embedding == "rope" else None)
    return sum(storages.values())


@pytest.mark.parametrize("options", [{}, GPT2_OPTIONS, {"mlp": "swiglu", "qk_norm": False},
                                     {"dropout": 0.1}],
                         ids=["defaults", "gpt2", "swiglu", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_blocks_count_is_what_autograd_saves(options, dtype):
    """Per token (the difference of two batch sizes: the weights, saved too, cancel), within 10%."""
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=48, **options)
    per_token = ((saved_by_a_block(config, 4, dtype) - saved_by_a_block(config, 2, dtype))
                 / (2 * config.block_size))
    assert (memory.block_bytes_per_token(config, dtype.itemsize, "cpu")
            == pytest.approx(per_token, rel=0.1))


def run_config(**keys):
    return SimpleNamespace(**{"batch_size": 16, "gradient_accumulation_steps": 2,
                              "optimizer": "muon", "parallel": "ddp",
                              "activation_checkpointing": False, **keys})


@pytest.fixture(scope="module")
def small_gpt():
    return GPT(GPTConfig(block_size=256, vocab_size=50304, n_layer=2, n_head=4, n_embd=128))


def test_one_line_where_it_fits(monkeypatch, small_gpt):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2**30)
    [line] = memory.lines(run_config(), small_gpt, CPU, 1)
    assert line.startswith("memory: ~") and "activations" in line and "at 16 x 256" in line
    assert line.endswith("of 64 GiB available")


def test_where_memory_is_short_it_names_the_keys_that_fit(monkeypatch, small_gpt):
    cfg = run_config()
    full, checkpointed = (memory.for_run(cfg, small_gpt, CPU, 1, activation_checkpointing=on)
                          for on in (False, True))
    available = (full.total + checkpointed.total) // 2
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    said, advice = memory.lines(cfg, small_gpt, CPU, 1)
    assert said.endswith("available") and "the run goes on" in advice
    # the same 32 sequences per step in half-size micro-batches; or checkpointing at the whole batch
    assert "would fit: --batch_size=8 --gradient_accumulation_steps=4 (~" in advice
    assert "; --activation_checkpointing=True (~" in advice
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    said, advice = memory.lines(cfg, small_gpt, CPU, 1)
    assert "no key here brings it under: --batch_size=1 --gradient_accumulation_steps=32" in advice


def test_under_torchrun_fsdp_divides_the_parameters_parts_and_is_named_where_they_dominate(
        monkeypatch):
    gpt = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=4, n_head=4, n_embd=256))
    cfg = run_config(batch_size=2, gradient_accumulation_steps=4)
    ddp, fsdp = (memory.for_run(cfg, gpt, CPU, 4, parallel=kind) for kind in ("ddp", "fsdp"))
    assert fsdp.weights == ddp.weights // 4 and fsdp.optimizer == ddp.optimizer // 4
    assert fsdp.grads == ddp.grads // 8  # DDP's buckets double its gradients
    monkeypatch.setattr(memory, "available_bytes", lambda device: fsdp.total)
    said, advice = memory.lines(cfg, gpt, CPU, 4)
    assert "per process" in said and advice.endswith(
        f"these would fit: --parallel=fsdp (~{memory.amount(fsdp.total)})")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_cpu_memory_is_the_available_ram_shared_by_the_machines_processes(monkeypatch):
    alone = memory.available_bytes("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert alone > 0 and memory.available_bytes("cpu") == pytest.approx(alone / 4, rel=0.05)


@pytest.mark.slow
def test_a_run_prints_its_memory_line(data_root, tmp_path):
    args = tiny_args(data_root, tmp_path / "run", max_iters=2, warmup_iters=1, lr_decay_iters=2,
                     eval_interval=2)
    result = run_script("train.py", args)
    line = next(line for line in result.stdout.splitlines() if line.startswith("memory: "))
    assert ("estimated for the tensors (weights" in line and "at 8 x 32" in line
            and "GiB available" in line)
