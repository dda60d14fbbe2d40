"""The data pipeline's speed: `python bench/data_speed.py [--key=value ...]`.

1. The loader's share of a training step: train.py's loop alternates `Windows.random_batch` (plus
   the copy to the device) with `train.train_step`; both are timed here on a prepared dataset, for a
   configurable model (train.py's default small one).
2. prepare.py's throughput in MB of source text per second, per tokenizer: the command a user runs,
   `python prepare.py ...` into a temporary folder, timed as a whole. The figure therefore includes
   the interpreter's start-up and prepare.py's imports (torch among them, through data.py), which
   dominate on a small source; `prepare_startup_s` reports that start-up alone
   (`python prepare.py --help`).
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python bench/data_speed.py` puts bench/ on the path, not the repo root with the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checks
import data
import devices
from bench import common
from configurator import ConfigError, run_main
from start import load_data

PREPARE = Path(__file__).resolve().parents[1] / "prepare.py"

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
# 1. loader against step: dataset and train.py's default model size (GPT-2's architecture, AdamW)
data_root = "data"  # folder that holds the prepared datasets
dataset = "python_stdlib"  # data_root/<dataset> by prepare.py (the default is made on first use)
seed = 1337  # seeds the weights and the batch draws
batch_size = 16  # sequences per micro-batch {> 0}
block_size = 128  # context length in tokens {> 0}
n_layer = 4  # transformer blocks {> 0}
n_head = 4  # attention heads per block {> 0}
n_embd = 128  # width of the residual stream {> 0}
vocab_size = 0  # model vocabulary; 0 takes the dataset's {>= 0}
bias = False  # biases in Linear layers and LayerNorms
dropout = 0.0  # dropout on attention, residual branches and embeddings {[0, 1)}
# device, dtype and compile are devices.RuntimeConfig's keys (--help lists them last)
warmup_steps = 3  # untimed batches and steps first {>= 0}
steps = 30  # timed batches and steps {> 0}
# 2. tokenizing
tokenize_input = ""  # file or folder to tokenize; empty: python_stdlib (Python's standard library)
tokenizers = "byte,gpt2"  # tokenizers to time (gpt2 needs TIKTOKEN_CACHE_DIR offline)
tokenize_repeats = 5  # prepare runs per tokenizer; the median counts {> 0}
out = "bench/results/data_speed.json"  # JSON report
# ---- end of config ----


# ---- 1. the loader's share of a step ----

def loader_share(cfg, rt):
    """Median ms of a micro-batch and of a train step, as train.py's loop runs them in turn."""
    device = rt.device
    data_dir, meta = load_data(cfg, local_rank=0, world_size=1)
    vocab = cfg.vocab_size or meta["vocab_size"]
    if vocab < meta["vocab_size"]:
        raise ConfigError(f"vocab_size {vocab} is smaller than the dataset's {meta['vocab_size']}; "
                          "use 0 or more")
    windows = data.Windows(data_dir, "train", cfg.block_size, vocab)
    setting = common.TrainStep(common.model_config(cfg, vocab), cfg.seed, rt)
    batch_seconds, step_seconds = [], []
    for index in range(cfg.warmup_steps + cfg.steps):
        start = time.perf_counter()
        x, y = windows.random_batch(cfg.seed, index, cfg.batch_size)
        if device.startswith("cuda"):  # as train.py's loop: pinned, so the copy can overlap compute
            x, y = x.pin_memory(), y.pin_memory()
        batch = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))]
        common.sync(device)
        batch_s = time.perf_counter() - start
        step_s = setting.step(batch)
        if index >= cfg.warmup_steps:
            batch_seconds.append(batch_s)
            step_seconds.append(step_s)
    batch_ms, step_ms = (1000 * statistics.median(batch_seconds),
                         1000 * statistics.median(step_seconds))
    return {"dataset": cfg.dataset, "tokenizer": meta["tokenizer"], "train_tokens": windows.tokens,
            "dtype": common.dtype_name(rt.dtype), "dtype_reason": rt.dtype_reason,
            "compile": rt.compile, "batch_ms": batch_ms, "step_ms": step_ms,
            "loader_share_pct": 100 * batch_ms / (batch_ms + step_ms),
            "note": "medians over the timed steps; the step is train.train_step and the batch is "
                    "Windows.random_batch plus the copy to the device (pinned on CUDA). On CUDA "
                    "the loop can draw a batch while the GPU finishes the optimizer update queued "
                    "after train_step's one sync, so there the share is an upper bound"}


# ---- 2. tokenizing ----

def run_prepare(args):
    """Seconds of one `python prepare.py ARGS` run, its output discarded; DataError with
    prepare.py's own message if it fails."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(PREPARE), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise data.DataError(result.stderr.strip().removeprefix("error: ")
                             or f"prepare.py failed with exit status {result.returncode}")
    return seconds


def tokenize_speed(cfg, tokenizer, data_root):
    """prepare.py's throughput for a tokenizer, from the median of its runs (each timed whole)."""
    source = ["text", f"--input={cfg.tokenize_input}"] if cfg.tokenize_input else ["python_stdlib"]
    args = [*source, "--tokenizer", tokenizer, "--data_root", str(data_root), "--name", tokenizer]
    seconds = [run_prepare(args) for _ in range(cfg.tokenize_repeats)]
    meta = data.read_meta(Path(data_root) / tokenizer)
    median = statistics.median(seconds)
    tokens = sum(meta["tokens"].values())
    return {"source": cfg.tokenize_input or "python_stdlib", "source_bytes": meta["source_bytes"],
            "tokens": tokens, "bytes_per_token": meta["source_bytes"] / tokens,
            "seconds_median": median, "seconds_all": seconds,
            "mb_per_sec": meta["source_bytes"] / 1e6 / median, "tokens_per_sec": tokens / median}


def benchmark(cfg):
    checks.check_model_options(cfg)
    names = [name for name in cfg.tokenizers.split(",") if name]
    rt = devices.runtime(cfg)
    machine = common.machine_record(rt.device)
    loader = loader_share(cfg, rt)
    print(f"loader: {loader['dataset']} ({loader['tokenizer']} tokens), "
          f"batch {cfg.batch_size} x {cfg.block_size}, model {cfg.n_layer} layers x {cfg.n_embd}, "
          f"{loader['dtype']}, compile {'on' if loader['compile'] else 'off'}, on {rt.device}")
    print(f"  batch {loader['batch_ms']:.2f} ms, step {loader['step_ms']:.1f} ms (medians): "
          f"the loader is {loader['loader_share_pct']:.2f}% of the step time")
    startup_s = statistics.median([run_prepare(["--help"]) for _ in range(cfg.tokenize_repeats)])
    with tempfile.TemporaryDirectory() as data_root:
        tokenizing = {name: tokenize_speed(cfg, name, data_root) for name in names}
    print(f"prepare.py, whole commands: start-up alone (--help) {startup_s:.2f} s, "
          "included in each figure below")
    for name, result in tokenizing.items():
        print(f"prepare.py, {name}: {result['source_bytes'] / 1e6:.1f} MB "
              f"in {result['seconds_median']:.2f} s = "
              f"{result['mb_per_sec']:.1f} MB/s, {result['tokens_per_sec'] / 1e6:.2f}M tokens/s, "
              f"{result['bytes_per_token']:.2f} bytes/token")
    common.write_report(cfg.out, {**machine, "config": vars(cfg), "loader": loader,
                                  "prepare_startup_s": startup_s, "tokenize": tokenizing})


if __name__ == "__main__":
    run_main(benchmark, __file__, None, devices.RuntimeConfig, errors=(data.DataError,))
