"""Muon's training step against AdamW's: `python bench/optimizer_speed.py [--key=value ...]`.

For each shape, two copies of the same model (same seed), one with the AdamW and one with the Muon
optimizer that `optimizers.configure_optimizer` builds (AdamW fused on CPU and CUDA; Muon with
train.py's default muon_lr, and `muon_split`: whole matrices, or strips one head wide as the CPU
recipes orthogonalise).
Each round times n whole training steps (`train.train_step`: forward, backward, clip, optimizer
step) of one, then n of its optimizer steps alone (on the gradients the last step left), then the
same for the other (n from `round_s`); the order flips every round (ABBA), so that other load on the
machine hits both alike. Step times are medians; the step ratio is the median over rounds of each
round's Muon median over its AdamW median, against the issue's acceptance of at most `max_ratio`.
Newton-Schulz costs the same whatever the batch, so the report also works out, from the medians, the
micro-batches per step from which Muon's step is within `max_ratio` (what gradient accumulation does
to the ratio, derived, not timed). Each round also records the share of its time in which some task
waited for a CPU (Linux PSI): a round with much of it was slowed by other work.

Under torchrun (`torchrun --standalone --nproc_per_node=2 bench/optimizer_speed.py`) every process
times the same models on the same batches, and Muon's processes share its orthogonalisation as in a
training run (muon.orthogonalize_shared); rank 0 reports. Its `optimizer_ms_median` against a
one-process run's is the time that sharing saves (or costs) per step.
"""

import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# `python bench/optimizer_speed.py` puts bench/ on the path, not the repo root with the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import devices
import parallel
import train
from bench import common
from configurator import ConfigError, run_main
from model import GPT2_OPTIONS, GPTConfig
from optimizers import configure_optimizer

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
shapes = "char_cpu,gpt2"  # comma-separated: char_cpu, char, gpt2 (see SHAPES) or LxHxCxTxBxV sizes
seed = 1337  # seeds the weights and the random batches
warmup_steps = 2  # untimed whole steps of each optimizer first, per shape {>= 0}
rounds = 4  # rounds per shape; each times both optimizers {> 0}
round_s = 2.0  # seconds of whole AdamW steps per round: sets the steps per round (at least 1) {> 0}
max_ratio = 1.15  # the acceptance: Muon's whole step at most this many times AdamW's {> 0}
muon_split = "head"  # as in train.py: orthogonalise head-wide strips or whole matrices {head|whole}
# system: device and the rest from devices.RuntimeConfig; dtype, compile declared here for defaults
dtype = "float32"  # float32 (no autocast; as the issue measured), bfloat16, float16, or auto
compile = "false"  # torch.compile the model: false (the figures), true, auto (on for CUDA)
out = "bench/results/optimizer_speed.json"  # JSON report
# ---- end of config ----

# layers x heads x width x T x batch x vocab: config/shakespeare_char_cpu.py's and
# config/shakespeare_char.py's model and batch (without dropout), and GPT-2 124M at a CPU's batch
# (RESULTS.md's train_speed shape)
SHAPES = {"char_cpu": "4x4x128x64x12x65", "char": "6x6x384x256x64x65",
          "gpt2": "12x12x768x256x4x50304"}


def parse_shapes(text):
    """[(name, (layers, heads, width, T, batch, vocab))] from the `shapes` key."""
    parsed = []
    for name in (item for item in text.split(",") if item):
        try:
            sizes = tuple(int(n) for n in SHAPES.get(name, name).split("x"))
        except ValueError:
            sizes = ()
        if len(sizes) != 6 or min(sizes) <= 0 or sizes[2] % sizes[1]:
            raise ConfigError(f"shapes must be {', '.join(SHAPES)} or LxHxCxTxBxV sizes "
                              f"(width divisible by heads), separated by commas; got {name!r}")
        parsed.append((name, sizes))
    if not parsed:
        raise ConfigError("shapes must name at least one shape")
    return parsed


class Setting(common.TrainStep):
    """One model with AdamW or Muon, with its whole-step and optimizer-step times."""

    def __init__(self, config, seed, rt, optimizer, muon_split):
        super().__init__(config, seed, rt)
        if optimizer == "muon":
            self.optimizer = configure_optimizer(self.raw_model, train.weight_decay,
                                                 train.learning_rate, (train.beta1, train.beta2),
                                                 rt.device_type, muon_lr=train.muon_lr,
                                                 muon_split=muon_split)
        self.name = optimizer
        self.step_seconds = []
        self.optimizer_seconds = []

    def optimizer_step(self):
        start = time.perf_counter()
        self.optimizer.step()
        common.sync(self.rt.device)
        return time.perf_counter() - start


def cpu_stall_us():
    """Microseconds for which some task has waited for a CPU (Linux PSI), or None: how much other
    load there was."""
    try:
        return int(Path("/proc/pressure/cpu").read_text().split()[4].partition("=")[2])
    except (OSError, IndexError, ValueError):
        return None


def time_shape(sizes, cfg, rt):
    """Both optimizers at one shape: (settings, steps per round, each round's record)."""
    layers, heads, width, block, batch, vocab = sizes
    config = GPTConfig(n_layer=layers, n_head=heads, n_embd=width, block_size=block,
                       vocab_size=vocab, bias=False, dropout=0.0, **GPT2_OPTIONS)
    settings = [Setting(config, cfg.seed, rt, name, cfg.muon_split) for name in ("adamw", "muon")]
    batches = [common.random_batch(vocab, batch, block, rt.device,
                                   torch.Generator().manual_seed(cfg.seed))]
    for setting in settings:
        for _ in range(cfg.warmup_steps):
            setting.step(batches)
    # one more AdamW step sets the round's length
    steps = max(1, round(cfg.round_s / settings[0].step(batches)))
    if dist.is_initialized():  # rank 0's count for all: as many (collective) Muon steps in each
        steps = torch.tensor(steps, device=rt.device)  # (on the device: NCCL sends no CPU tensors)
        dist.broadcast(steps, 0)
        steps = int(steps)
    rounds = []
    for round_index in range(cfg.rounds):
        start, stall = time.perf_counter(), cpu_stall_us()
        for setting in settings if round_index % 2 == 0 else settings[::-1]:
            setting.step_seconds += [setting.step(batches) for _ in range(steps)]
            setting.optimizer_seconds += [setting.optimizer_step() for _ in range(steps)]
        adamw, muon = (1000 * statistics.median(s.step_seconds[-steps:]) for s in settings)
        pressure = (None if stall is None
                    else (cpu_stall_us() - stall) / 1e6 / (time.perf_counter() - start))
        rounds.append({"adamw_ms": adamw, "muon_ms": muon, "ratio": muon / adamw,
                       "cpu_pressure": pressure})
        print(f"  round {round_index + 1}/{cfg.rounds}: adamw {adamw:.1f} ms/step, "
              f"muon {muon:.1f} ms/step, ratio {muon / adamw:.3f}"
              + ("" if pressure is None else f", CPU pressure {100 * pressure:.0f}%"), flush=True)
    return settings, steps, rounds


def micro_batches_within(adamw, muon, max_ratio):
    """Micro-batches per step from which Muon's step is within max_ratio of AdamW's, from their
    `figures`: with F the forward and backward of one (AdamW's step less its optimizer step) and O
    each optimizer step, the least n with (n F + O_muon) / (n F + O_adamw) <= max_ratio."""
    micro_batch_ms = adamw["ms_per_step_median"] - adamw["optimizer_ms_median"]
    excess = muon["optimizer_ms_median"] - max_ratio * adamw["optimizer_ms_median"]
    return max(1, math.ceil(excess / ((max_ratio - 1) * micro_batch_ms)))


def figures(setting):
    return {"ms_per_step_median": 1000 * statistics.median(setting.step_seconds),
            "optimizer_ms_median": 1000 * statistics.median(setting.optimizer_seconds),
            "ms_per_step_all": [round(1000 * s, 2) for s in setting.step_seconds],
            "optimizer_ms_all": [round(1000 * s, 3) for s in setting.optimizer_seconds]}


def benchmark(cfg):
    shape_list = parse_shapes(cfg.shapes)
    rank, local_rank, processes, local_processes = parallel.place()
    rt = devices.runtime(cfg, local_rank, local_processes)
    parallel.join(rt, rank)
    if rank:  # the other processes time alongside rank 0, which prints and writes the report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the rest of this process
    machine = common.machine_record(rt.device)
    threads = f", {torch.get_num_threads()} threads each" if rt.device_type == "cpu" else ""
    print(f"{machine['device']} ({rt.device}), torch {torch.__version__}, "
          f"dtype {common.dtype_name(rt.dtype)}, {'compiled' if rt.compile else 'eager'}, "
          f"muon_split={cfg.muon_split}, {processes} process(es){threads}", flush=True)
    results = []
    for name, sizes in shape_list:
        print(f"{name}: {'x'.join(map(str, sizes))} (layers x heads x width x T x batch x vocab)",
              flush=True)
        (adamw, muon), steps, rounds = time_shape(sizes, cfg, rt)
        result = {"shape": name, "sizes": list(sizes), "n_params": adamw.raw_model.num_params(),
                  "tokens_per_step": sizes[3] * sizes[4], "steps_per_round": steps,
                  "adamw": figures(adamw), "muon": figures(muon), "rounds": rounds}
        # each round's two figures were taken side by side: their ratio is the one least moved by
        # load that comes and goes between rounds
        result["step_ratio"] = statistics.median(r["ratio"] for r in rounds)
        result["optimizer_ratio"] = (result["muon"]["optimizer_ms_median"]
                                     / result["adamw"]["optimizer_ms_median"])
        result["meets_max_ratio"] = result["step_ratio"] <= cfg.max_ratio
        result["micro_batches_within_max_ratio"] = micro_batches_within(
            result["adamw"], result["muon"], cfg.max_ratio)
        results.append(result)
        print(f"  whole step: adamw {result['adamw']['ms_per_step_median']:.1f} ms, muon "
              f"{result['muon']['ms_per_step_median']:.1f} ms, ratio {result['step_ratio']:.3f} "
              f"({'within' if result['meets_max_ratio'] else 'over'} {cfg.max_ratio}); "
              f"optimizer step alone: adamw {result['adamw']['optimizer_ms_median']:.2f} ms, "
              f"muon {result['muon']['optimizer_ms_median']:.2f} ms "
              f"(medians of {cfg.rounds} x {steps} each); within {cfg.max_ratio} from "
              f"{result['micro_batches_within_max_ratio']} micro-batches per step", flush=True)
    if rank == 0:
        common.write_report(cfg.out, {**machine, "config": vars(cfg),
                                      "dtype": common.dtype_name(rt.dtype), "compile": rt.compile,
                                      "processes": processes, "results": results})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(benchmark, __file__, None, devices.RuntimeConfig)
