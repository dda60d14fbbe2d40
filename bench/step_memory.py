"""Peak memory of a step of several micro-batches: `python bench/step_memory.py [--key=value ...]`.

Compares the ways `ways` names: the model's loss path (`model(x, y)` hands back no logits,
loss_only) with the way the forward used to work (logits_held), returning each micro-batch's
full-vocabulary logits with its loss, bound to a variable until the next micro-batch's forward has
returned, so two micro-batches' logits were alive at once; and the loss path with activation
checkpointing (checkpointed: parallel.checkpoint_blocks, train.py's
--activation_checkpointing=True), each block's activations recomputed in the backward. Each way runs
in a fresh process of its own (a process's peak resident size never goes down), measures its memory
before the first step and its peak over `steps` steps (the CUDA allocator's on a GPU, the process's
peak RSS on a CPU, with glibc's default of giving each large block its own pages and returning them
when freed, so that RSS follows the live tensors rather than the heap's fragmentation), and reports
the difference: what the steps added on top of weights and data; and each step's seconds.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for the project's modules

import checks
import devices
import parallel
from bench import common
from configurator import ConfigError, run_main

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
# model: GPT-2's vocabulary, whose logits dominate a small model's activations
n_layer = 2  # transformer blocks {> 0}
n_head = 4  # attention heads per block {> 0}
n_embd = 256  # width of the residual stream {> 0}
block_size = 256  # context length T of every sequence {> 0}
vocab_size = 50304  # model vocabulary (GPT-2's 50257 padded to a multiple of 64) {> 0}
bias = False  # biases in Linear layers and LayerNorms
# batches of random tokens
batch_size = 8  # sequences per micro-batch {> 0}
gradient_accumulation_steps = 4  # micro-batches per optimizer step {> 0}
steps = 2  # optimizer steps measured {> 0}
seed = 1337  # seeds the weights and the random batches
# system: device, dtype and compile are devices.RuntimeConfig's keys (--help lists them last)
ways = "loss_only,logits_held"  # ways to compare: loss_only, logits_held, checkpointed
way = ""  # internal: the way one child process measures; empty runs each of `ways`
out = "bench/results/step_memory.json"  # JSON report
# ---- end of config ----

WAYS = ("loss_only", "logits_held", "checkpointed")
SAVINGS = {  # report key: (the way holding more, the way holding less), where both are measured
    "saved_mib": ("logits_held", "loss_only"),
    "checkpointing_saved_mib": ("loss_only", "checkpointed"),
}


def forward_returning_logits(model, x, y):
    """The old forward's contract: (logits, loss)."""
    logits = model(x)[0]
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1),
                                   ignore_index=-100)


def resident_mib(device):
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device) / 2**20
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def measure(cfg, rt):
    """This process's memory before the steps, its peak over them and each step's seconds, stepping
    the given way."""
    check = common.TrainStep(common.model_config(cfg, cfg.vocab_size), cfg.seed, rt)
    if cfg.way == "checkpointed":  # (before the first forward, where torch.compile traces it)
        parallel.checkpoint_blocks(check.raw_model)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = [[(x.to(rt.device), x.roll(-1, 1).to(rt.device))
                for x in torch.randint(cfg.vocab_size, (cfg.gradient_accumulation_steps,
                                                        cfg.batch_size, cfg.block_size),
                                       generator=generator)]
               for _ in range(cfg.steps)]
    before = resident_mib(rt.device)
    seconds = []
    for step_batches in batches:
        start = time.perf_counter()
        check.optimizer.zero_grad(set_to_none=True)
        for x, y in step_batches:
            with check.autocast:
                if cfg.way == "logits_held":
                    logits, loss = forward_returning_logits(check.model, x, y)  # noqa: F841 -- held
                else:
                    _, loss = check.model(x, y)
            (loss / len(step_batches)).backward()
        check.optimizer.step()
        common.sync(rt.device)
        seconds.append(time.perf_counter() - start)
    peak, measured = common.peak_memory(rt.device)
    return {"way": cfg.way, "before_mib": before, "peak_mib": peak, "step_mib": peak - before,
            "measured": measured, "step_s": seconds}


def compare(cfg):
    """Each way in a child process of its own; the report and the savings."""
    args = [a for a in sys.argv[1:] if not a.startswith(("--way=", "--out="))]
    results = {}
    for way in cfg.ways.split(","):
        child = subprocess.run([sys.executable, __file__, *args, f"--way={way}"],
                               capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(child.stderr.strip().splitlines()[-1])
        results[way] = json.loads(child.stdout.strip().splitlines()[-1])
    logits_mib = cfg.batch_size * cfg.block_size * cfg.vocab_size * 4 / 2**20
    report = {**common.machine_record(devices.runtime(cfg).device),
              "shape": {k: getattr(cfg, k) for k in common.MODEL_KEYS if hasattr(cfg, k)} | {
                  "vocab_size": cfg.vocab_size, "batch_size": cfg.batch_size,
                  "gradient_accumulation_steps": cfg.gradient_accumulation_steps},
              "one_micro_batch_logits_fp32_mib": logits_mib, **results,
              **{key: results[more]["step_mib"] - results[less]["step_mib"]
                 for key, (more, less) in SAVINGS.items() if more in results and less in results}}
    for way, result in results.items():
        print(f"{way:12s}: {result['step_mib']:8.1f} MiB over the weights ({result['measured']}), "
              f"{statistics.median(result['step_s']):.2f} s/step (median)")
    for key, (more, less) in SAVINGS.items():
        if key in report:
            print(f"{less} saved {report[key]:.1f} MiB against {more}")
    print(f"one micro-batch's fp32 logits are {logits_mib:.1f} MiB")
    common.write_report(cfg.out, report)
    return report


def benchmark(cfg):
    checks.check_model_options(cfg)
    if cfg.way not in ("", *WAYS):
        raise ConfigError(f"way must be empty, {' or '.join(WAYS)}, got {cfg.way!r}")
    ways = cfg.ways.split(",")
    if not set(ways) <= set(WAYS) or len(set(ways)) < len(ways):
        raise ConfigError(f"ways must name each of {', '.join(WAYS)} at most once, "
                          f"got {cfg.ways!r}")
    if not cfg.way:
        return compare(cfg)
    print(json.dumps(measure(cfg, devices.runtime(cfg, keep_freed=False))))


if __name__ == "__main__":
    run_main(benchmark, __file__, None, devices.RuntimeConfig)
