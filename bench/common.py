"""What the bench scripts share: running a script on its config, the check of its shape keys that
their tags cannot say, the model from its shape keys, one timed training step, device sync, the
record of the machine, peak memory and the JSON report.

The device, precision and compile choice come from devices.runtime, as in train.py and sample.py.
"""

import json
import os
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

import devices
import train
from model import GPT, GPT2_OPTIONS, GPTConfig
from optimizers import configure_optimizer

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")


def model_config(cfg, vocab):
    """A GPT-2 model (its options) of a script's shape keys (GPTConfig's defaults fill any it lacks,
    e.g. dropout) and vocab."""
    shape = {key: getattr(cfg, key) for key in MODEL_KEYS if hasattr(cfg, key)}
    return GPTConfig(vocab_size=vocab, **GPT2_OPTIONS, **shape)


def random_batch(vocab_size, batch_size, block_size, device, generator):
    """One (x, y) micro-batch of random tokens, y each position's next token, on the device."""
    tokens = torch.randint(vocab_size, (batch_size, block_size + 1), generator=generator)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def dtype_name(ptdtype):
    return str(ptdtype).removeprefix("torch.")


def sync(device):
    """Wait for the device's queued work, so that a timer read afterwards covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


class TrainStep:
    """A model with its optimizer on a devices.Runtime (device, autocast dtype, compile choice);
    `step` runs and times one train.train_step, as train.py's loop runs it."""

    def __init__(self, config, seed, rt):
        torch.manual_seed(seed)  # every model starts from the same weights
        self.rt = rt
        self.raw_model = GPT(config).to(rt.device)
        self.model = rt.compiled(self.raw_model)
        self.optimizer = configure_optimizer(self.raw_model, train.weight_decay,
                                             train.learning_rate, (train.beta1, train.beta2),
                                             rt.device_type)
        self.scaler = rt.grad_scaler()
        self.autocast = rt.autocast()

    def step(self, batches):
        """Seconds for one optimizer step at train.py's default lr and clipping (the cost is the
        same at any lr)."""
        start = time.perf_counter()
        train.train_step(self.model, self.optimizer, self.scaler, self.autocast, batches,
                         train.grad_clip)
        sync(self.rt.device)
        return time.perf_counter() - start


def cpu_model_name():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")),
                "unknown CPU")


def machine_record(device):
    """When, on what and by which command the figures were taken."""
    record = {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]), "torch": torch.__version__}
    if device.startswith("cuda"):
        return record | {"device": torch.cuda.get_device_name(device)}
    if device == "mps":
        return record | {"device": "Apple GPU (mps)"}
    return record | {"device": cpu_model_name(), "cpu_bf16": devices.cpu_has_bf16(),
                     "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def peak_memory(device):
    """(MiB, what was measured): the CUDA allocator's peak, else the whole process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def write_report(path, report):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
