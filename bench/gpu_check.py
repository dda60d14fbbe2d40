"""The first check on a GPU, one prepared command: `python bench/gpu_check.py [--key=value ...]`.

On one GPU, in about eight minutes with compilation, it runs these sections, each in a process of
its own (a crash or hang in one leaves the others' figures), in this order, the most telling first:
  matmul    the bf16 matmul rate here (8192^3, random data): the ceiling MFU is read against
  gpt2      GPT-2 124M at T=1024, bf16, compiled: ms/step, tok/s, MFU vs the device's peak, peak
            memory, compile seconds; then Muon (whole matrices, strips one head wide): step ratio
  resume    train.py (the default recipe: Muon, rotary, QK-norm; dropout on; compiled;
            deterministic) paused and resumed against an uninterrupted run: last.pt's weights and
            optimizer state bitwise; a second uninterrupted run is the noise floor
  fsdp      FSDP2 on a one-process group (DTensor parameters, bf16 mixed precision, hooks, sharded
            files; no inter-GPU traffic): losses vs the plain model; sharded save and load bitwise
  tests     the tests marked cuda (tests/test_cuda.py)
  sampling  KV-cache generation, GPT-2 124M (random weights): tok/s against recomputing the context
  muon      bf16 Newton-Schulz against float64 SVD on GPT-2's 768x3072 and 768x2304 matrices
  speedrun  config/fineweb_speedrun.py's model and step on tiny shakespeare's GPT-2 tokens: ms/step,
            MFU, and its token budget's time on 8 GPUs (projected: one GPU's step / 8)
  char      config/shakespeare_char.py to val 1.47 (nanoGPT's README: 1.4697, ~3 min on an A100)
  memory    peak memory of GPT-2 124M's training step at batch 16, 32 and 64 x 1024 tokens
Each section writes work_dir/<section>.json and .log; the report (`out`) gathers them with the
machine's record, and a summary is printed. `--device=cpu --tiny=True` (tests/test_gpu_check.py) is
the dry run: the same code on tiny shapes, so the script is known to work before GPU time is spent.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

# `python bench/gpu_check.py` puts bench/ on the path, not the repo root with the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import devices
import prepare
import train
from bench import common, optimizer_speed, sample_speed
from checkpoint import full_state, load_checkpoint, load_sharded_state, save_sharded
from configurator import ConfigError, load_config, run_main
from engine import generation_attention
from model import GPT, GPT2_OPTIONS, GPTConfig
from muon import orthogonalize
from optimizers import configure_optimizer
from parallel import shard

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
device = "cuda"  # cuda (the check), or cpu with tiny=True (the dry run)
tiny = False  # tiny shapes and a few steps everywhere: the CPU dry run
sections = "matmul,gpt2,resume,fsdp,tests,sampling,muon,speedrun,char,memory"  # sections, in order
budget_s = 480.0  # no section starts after this many seconds, and each is cut off at what is left
data_root = "data"  # holds shakespeare_char and shakespeare_gpt2, prepared from `text` if missing
text = "../shared/data/tinyshakespeare.txt"  # tiny shakespeare, to prepare both datasets from
work_dir = "bench/results/gpu_check"  # each section's JSON and log; train.py sections' run folders
out = "bench/results/gpu_check.json"  # the report
section = ""  # set by the driver: run this one section in this process
section_s = 0.0  # set by the driver: the seconds this section may take
# ---- end of config ----

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("matmul", "gpt2", "resume", "fsdp", "tests", "sampling", "muon", "speedrun", "char",
            "memory")
SECTION_S = {"matmul": 30, "gpt2": 200, "resume": 150, "fsdp": 90, "tests": 120, "sampling": 60,
             "muon": 45, "speedrun": 150, "char": 180, "memory": 120}  # each one's limit on a GPU
MIN_SECTION_S = 20  # a section with less time left than this is skipped
GPT2 = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304}
TINY_GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 512}
NANOGPT_CHAR = 1.4697  # nanoGPT README: shakespeare_char's val loss after about 3 min on one A100
CHAR_TARGET = 1.47
NODE_GPUS = 8


# ---- processes ----

def run_process(command, timeout, log_path):
    """(exit status, or None when cut off at `timeout` seconds; seconds taken). Output goes to
    log_path; the process and its children are one group, killed together at the timeout."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            status = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    return status, time.perf_counter() - start


def tail(path, chars=3000):
    with contextlib.suppress(OSError):
        return Path(path).read_text(errors="replace")[-chars:]
    return ""


def train_run(cfg, name, args, timeout, folder=None):
    """train.py in a run folder of its own (`folder`, by default `name`; emptied first unless
    resumed) with `args`, its output in runs/<name>.log: its exit status, seconds, log.jsonl records
    and run.json, whether it ended or was cut off."""
    out_dir = Path(cfg.work_dir) / "runs" / (folder or name)
    if out_dir.exists() and "--init_from=resume" not in args:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py", *args, f"--out_dir={out_dir}",
               f"--data_root={cfg.data_root}", f"--device={cfg.device}"]
    status, seconds = run_process(command, timeout, out_dir.parent / f"{name}.log")
    log = out_dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    run = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else {}
    if status:  # (None: cut off at its time limit; the section reports the figures so far)
        raise RuntimeError(f"train.py {' '.join(args)} failed with status {status}:\n"
                           + tail(out_dir.parent / f"{name}.log"))
    return {"status": status, "seconds": seconds, "records": records, "run": run,
            "out_dir": out_dir}


def deadline_left(cfg, started):
    return cfg.section_s - (time.perf_counter() - started) - 5


# ---- the sections ----

def runtime(cfg):
    """bf16, compiled on a GPU; on the dry run's CPU, what devices.runtime picks (fp32, eager)."""
    return devices.runtime(SimpleNamespace(device=cfg.device, dtype="auto", compile="auto"))


def gpt2_config(cfg, **options):
    return GPTConfig(**(TINY_GPT2 if cfg.tiny else GPT2), bias=False, dropout=0.0,
                     **{**GPT2_OPTIONS, **options})


def random_batch(config, batch_size, device, seed=1337):
    """One step's batches: a micro-batch of random tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [common.random_batch(config.vocab_size, batch_size, config.block_size, device,
                                generator)]


def peak_memory_mib(rt):
    if rt.device_type != "cuda":
        return None
    return {"allocated": torch.cuda.max_memory_allocated(rt.device) / 2**20,
            "reserved": torch.cuda.max_memory_reserved(rt.device) / 2**20}


def reset_peak(rt):
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)


def peak(rt):
    """(the device's dense peak FLOP/s for rt's dtype, or None; where it comes from)."""
    return rt.peak_flops, rt.peak_reason or "no CPU peak"


def timed_steps(setting, batches, steps):
    """(first step's seconds, compile included; median of `steps` steps after 2 more warm-ups)."""
    first = setting.step(batches)
    for _ in range(2):
        setting.step(batches)
    return first, statistics.median(setting.step(batches) for _ in range(steps))


def section_matmul(cfg, rt, started):
    """TFLOP/s of a large bf16 matrix product, the mean of 10 after 3 warm-ups: what this device
    really reaches."""
    n = 256 if cfg.tiny else 8192
    a, b = (torch.randn(n, n, device=rt.device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    common.sync(rt.device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    common.sync(rt.device)
    seconds = (time.perf_counter() - start) / 10
    measured = 2 * n**3 / seconds
    datasheet, source = peak(rt)
    return {"n": n, "tflops": measured / 1e12,
            "datasheet_tflops": datasheet / 1e12 if datasheet else None, "datasheet_source": source}


def section_gpt2(cfg, rt, started):
    """GPT-2 124M (GPT-2's architecture) at T=1024: AdamW, then Muon on the same compiled model."""
    config, batch_size = gpt2_config(cfg), 2 if cfg.tiny else 16
    batches = random_batch(config, batch_size, rt.device)
    peak_flops, peak_source = peak(rt)
    tokens = batch_size * config.block_size
    result = {"model": "GPT-2 124M" if not cfg.tiny else "tiny", "batch_size": batch_size,
              "block_size": config.block_size, "dtype": common.dtype_name(rt.dtype),
              "compile": rt.compile, "peak_flops": peak_flops, "peak_source": peak_source}
    for name, optimizer, split in (("adamw", "adamw", None), ("muon_whole", "muon", "whole"),
                                   ("muon_head", "muon", "head")):
        reset_peak(rt)
        setting = optimizer_speed.Setting(config, 1337, rt, optimizer, split)
        first, median = timed_steps(setting, batches, 3 if cfg.tiny else 10)
        flops = setting.raw_model.flops_per_token(config.block_size) * tokens / median
        result[name] = {"first_step_s": first, "ms_per_step": 1000 * median,
                        "tokens_per_sec": tokens / median, "tflops": flops / 1e12,
                        "mfu": flops / peak_flops if peak_flops else None,
                        "peak_memory_mib": peak_memory_mib(rt)}
        del setting
    for name in ("muon_whole", "muon_head"):
        result[f"{name}_over_adamw"] = result[name]["ms_per_step"] / result["adamw"]["ms_per_step"]
    return result


def compare_states(a, b):
    """(bitwise equal, largest absolute difference) over every tensor of two nested state dicts."""
    tensors_a, tensors_b = flatten(a), flatten(b)
    if tensors_a.keys() != tensors_b.keys():
        return False, None
    largest = 0.0
    for key, x in tensors_a.items():
        y = tensors_b[key]
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return False, None
            if x.numel():
                largest = max(largest, (x.double() - y.double()).abs().max().item())
        elif x != y:
            return False, None
    equal = all(torch.equal(x, tensors_b[k]) if isinstance(x, torch.Tensor) else x == tensors_b[k]
                for k, x in tensors_a.items())
    return equal, largest


def flatten(value, prefix=""):
    if isinstance(value, dict):
        return {k: v for key, item in value.items()
                for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value)
                for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix: value}


def last_state(run):
    ckpt = load_checkpoint(run["out_dir"] / "last.pt")
    return {"model": ckpt["model"], "optimizer": ckpt["optimizer"], "step": ckpt["step"]}


def section_resume(cfg, rt, started):
    """The default recipe (dropout, deterministic) paused half-way and resumed, vs uninterrupted."""
    steps = 10 if cfg.tiny else 40
    shape = ({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4}
             if cfg.tiny else
             {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 32})
    args = ["--dataset=shakespeare_char", "--deterministic=True", "--dropout=0.1",
            f"--max_iters={steps}", "--warmup_iters=5", f"--eval_interval={steps // 2}",
            f"--ckpt_interval={steps}", "--log_interval=5", "--sample_interval=0", "--eval_iters=4",
            *(f"--{k}={v}" for k, v in shape.items())]
    runs = {}
    stages = (("whole", "whole", []), ("paused", "paused", [f"--stop_iter={steps // 2}"]),
              ("resumed", "paused", ["--init_from=resume"]), ("again", "again", []))
    for name, folder, extra in stages:
        runs[name] = train_run(cfg, f"resume_{name}", args + extra, deadline_left(cfg, started),
                               f"resume_{folder}")
        if runs[name]["status"] is None:
            return {"cut_off_in": name}
    whole, resumed, again = (last_state(runs[name]) for name in ("whole", "resumed", "again"))
    resumed_equal, resumed_diff = compare_states(whole, resumed)
    noise_equal, noise_diff = compare_states(whole, again)
    losses = {name: [r["train_loss"] for r in runs[name]["records"]
                     if "train_loss" in r and "lr" in r]
              for name in runs}
    return {"steps": steps, "paused_at": steps // 2, "compile": rt.compile, **shape,
            "resumed_equals_uninterrupted": resumed_equal, "resumed_max_abs_diff": resumed_diff,
            "two_uninterrupted_equal": noise_equal, "two_uninterrupted_max_abs_diff": noise_diff,
            "final_train_loss": {name: values[-1] if values else None
                                 for name, values in losses.items()},
            "seconds": {name: run["seconds"] for name, run in runs.items()}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_fsdp(cfg, rt, started):
    """FSDP2 on a one-process group, as parallel.shard applies it, against the unsharded model; then
    a sharded save and a load into a fresh sharded model, compared bitwise and by one more step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("nccl" if rt.device_type == "cuda" else "gloo", rank=0,
                                         world_size=1)
    try:
        return fsdp_steps(cfg, rt)
    finally:
        torch.distributed.destroy_process_group()


def fsdp_steps(cfg, rt):
    shape = ({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 128}
             if cfg.tiny else
             {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "vocab_size": 512})
    config = GPTConfig(**shape, bias=False, dropout=0.0, **GPT2_OPTIONS)
    batches = random_batch(config, 4 if cfg.tiny else 16, rt.device)
    models = {}
    for name, seed in (("sharded", 1), ("reference", 1), ("loaded", 2)):
        torch.manual_seed(seed)
        gpt = GPT(config).to(rt.device)
        if name != "reference":
            shard(gpt, rt)
        optimizer = configure_optimizer(gpt, 0.1, 1e-3, (0.9, 0.95), rt.device_type)
        models[name] = (gpt, rt.compiled(gpt) if name == "reference" else gpt, optimizer,
                        rt.grad_scaler())

    def step(name):
        gpt, model, optimizer, scaler = models[name]
        return train.train_step(model, optimizer, scaler, rt.autocast(), batches, 1.0)[0]

    losses = [(step("sharded"), step("reference")) for _ in range(3)]
    link = Path(cfg.work_dir) / "runs" / "fsdp" / "last"
    link.parent.mkdir(parents=True, exist_ok=True)
    save_sharded(link, models["sharded"][0], models["sharded"][2], {"step": 3}, rank=0)
    load_sharded_state(link.resolve(), models["loaded"][0], models["loaded"][2])
    equal, diff = compare_states(full_state(models["sharded"][0], models["sharded"][2]),
                                 full_state(models["loaded"][0], models["loaded"][2]))
    after = step("sharded"), step("loaded")
    return {"note": "one process: FSDP2's code path (DTensor parameters, mixed precision, hooks, "
                    "sharded files), no communication between GPUs",
            "mixed_precision": common.dtype_name(rt.dtype),
            "compile": rt.compile, "losses_sharded_vs_plain": losses,
            "max_loss_diff": max(abs(a - b) for a, b in losses), "loaded_equals_saved": equal,
            "loaded_max_abs_diff": diff, "next_step_loss_saved_vs_loaded": after,
            "next_step_equal": after[0] == after[1]}


def section_tests(cfg, rt, started):
    log = Path(cfg.work_dir) / "tests_pytest.log"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               "tests/test_cuda.py"]
    status, seconds = run_process(command, deadline_left(cfg, started), log)
    lines = tail(log).strip().splitlines()
    return {"status": status, "seconds": seconds, "summary": lines[-1] if lines else "",
            "output_tail": tail(log, 4000)}


def section_sampling(cfg, rt, started):
    config = gpt2_config(cfg)
    torch.manual_seed(1337)
    model = GPT(config).to(rt.device).eval()
    prompt_length, count = (8, 16) if cfg.tiny else (16, 500)
    prompt = torch.randint(config.vocab_size, (1, prompt_length), device=rt.device)
    kernels = kernel_choice(model, prompt, rt)
    cases = []
    for batch_size in (1, 8):
        prompt = torch.randint(config.vocab_size, (batch_size, prompt_length), device=rt.device)
        sample_speed.timed(sample_speed.with_kv_cache, model, prompt, 4, rt.autocast(), rt.device)
        cases.append(sample_speed.run_case(model, prompt, count, rt.autocast(), rt.device))
    return {"model": "GPT-2 124M, random weights" if not cfg.tiny else "tiny",
            "dtype": common.dtype_name(rt.dtype), "attention_kernels_32_tokens_s": kernels,
            "cases": cases}


def kernel_choice(model, prompt, rt, count=32):
    """Seconds for `count` KV-cache tokens with every attention kernel torch may pick (cuDNN's
    included) and with those engine.generation_attention allows."""
    seconds = {}
    for name, kernels in (("any", contextlib.nullcontext),
                          ("generation_attention", generation_attention)):
        for _ in range(2):  # the second run is timed
            common.sync(rt.device)
            start = time.perf_counter()
            with torch.no_grad(), rt.autocast(), kernels():
                model._generate(prompt, count, 0.0, None, None, None, None)
            common.sync(rt.device)
        seconds[name] = time.perf_counter() - start
    return seconds


def section_muon(cfg, rt, started):
    """bf16 Newton-Schulz (the form muon.py picks, and the plain one) vs a float64 SVD's U V^T."""
    shapes = ((32, 128), (32, 96)) if cfg.tiny else ((768, 3072), (768, 2304))
    generator = torch.Generator().manual_seed(0)
    results = []
    for rows, cols in shapes:
        update = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(update, full_matrices=False)
        exact = u @ vh
        x = update.float().to(rt.device)
        for form, gram in (("picked", None), ("plain", False)):
            ortho = orthogonalize(x, dtype=torch.bfloat16, gram=gram)
            common.sync(rt.device)
            start = time.perf_counter()
            for _ in range(10):
                orthogonalize(x, dtype=torch.bfloat16, gram=gram)
            common.sync(rt.device)
            ms = 100 * (time.perf_counter() - start)
            singular = torch.linalg.svdvals(ortho.double().cpu())
            error = ((ortho.double().cpu() - exact).norm() / exact.norm()).item()
            results.append({"shape": [rows, cols], "form": form, "ms": ms,
                            "singular_min": singular.min().item(),
                            "singular_max": singular.max().item(), "relative_error_vs_svd": error})
    return {"dtype": "bfloat16", "steps": 5, "cases": results}


def section_speedrun(cfg, rt, started):
    """config/fineweb_speedrun.py's model and step (micro-batches all on this GPU), a few steps."""
    steps = 3 if cfg.tiny else 12
    recipe = load_config(ROOT / "train.py", ["config/fineweb_speedrun.py"], devices.RuntimeConfig,
                         GPTConfig)
    val_tokens = recipe.batch_size * recipe.block_size * 2
    args = ["config/fineweb_speedrun.py", "--dataset=shakespeare_gpt2", f"--max_iters={steps}",
            f"--lr_decay_iters={steps}", f"--eval_interval={steps}", f"--ckpt_interval={steps}",
            f"--val_tokens={val_tokens}", "--eval_iters=2", "--compile=auto", "--log_interval=4"]
    if cfg.tiny:
        args += ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--batch_size=2",
                 "--gradient_accumulation_steps=2", "--val_tokens=128", "--value_embeddings=1"]
    run = train_run(cfg, "speedrun", args, deadline_left(cfg, started))
    lines = [r for r in run["records"] if "dt_ms" in r]
    compile_s = next((r["compile_s"] for r in run["records"] if "compile_s" in r), None)
    step_ms = lines[-1]["dt_ms"] if lines else None
    tokens_per_step = recipe.batch_size * recipe.block_size * recipe.gradient_accumulation_steps
    return {"status": run["status"], "steps": steps, "tokens_per_step": tokens_per_step,
            "data": "tiny shakespeare in GPT-2 BPE (the shape and step, not FineWeb's losses)",
            "compile_s": compile_s, "ms_per_step": step_ms,
            "mfu": lines[-1].get("mfu") if lines else None,
            "tokens_per_sec": lines[-1]["tok_per_sec"] if lines else None,
            "recipe_steps": recipe.max_iters, "recipe_tokens": recipe.max_iters * tokens_per_step,
            "projected_8gpu_minutes": ((recipe.max_iters * step_ms / 1000 / NODE_GPUS / 60)
                                       if step_ms else None),
            "projection": f"PROJECTION, not measured: {recipe.max_iters} steps x this GPU's step "
                          f"/ {NODE_GPUS}, assuming perfect scaling; evaluations and gradient "
                          "all-reduce not counted",
            "seconds": run["seconds"]}


def section_char(cfg, rt, started):
    args = ["config/shakespeare_char.py", f"--target_val_loss={CHAR_TARGET}"]
    if cfg.tiny:
        args += ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                 "--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=5", "--eval_interval=10",
                 "--eval_iters=2", "--sample_interval=0", "--compile=false"]
    run = train_run(cfg, "char", args, deadline_left(cfg, started))
    evals = [r for r in run["records"] if "val_loss" in r]
    lines = [r for r in run["records"] if "dt_ms" in r]
    return {"status": run["status"], "cut_off": run["status"] is None,
            "target_val_loss": CHAR_TARGET, "reached": bool(run["run"].get("target_step")),
            "target_step": run["run"].get("target_step"),
            "target_train_seconds": run["run"].get("target_train_seconds"),
            "last_eval": evals[-1] if evals else None, "wall_seconds": run["seconds"],
            "ms_per_step": statistics.median(r["dt_ms"] for r in lines) if lines else None,
            "compile_s": next((r["compile_s"] for r in run["records"] if "compile_s" in r), None),
            "reference": f"nanoGPT's README (their figure, not measured here): val {NANOGPT_CHAR} "
                         "after about 3 minutes on one A100"}


def section_memory(cfg, rt, started):
    config = gpt2_config(cfg)
    setting = common.TrainStep(config, 1337, rt)
    results = []
    for batch_size in (1, 2) if cfg.tiny else (16, 32, 64):
        if deadline_left(cfg, started) < 15:
            break
        batches = random_batch(config, batch_size, rt.device)
        setting.step(batches)
        reset_peak(rt)
        seconds = setting.step(batches)
        results.append({"batch_size": batch_size, "ms_per_step": 1000 * seconds,
                        "peak_memory_mib": peak_memory_mib(rt)})
    total = (torch.cuda.get_device_properties(rt.device).total_memory / 2**20
             if rt.device_type == "cuda" else None)
    return {"model": "GPT-2 124M, AdamW" if not cfg.tiny else "tiny",
            "block_size": config.block_size, "dtype": common.dtype_name(rt.dtype),
            "compile": rt.compile, "device_memory_mib": total, "cases": results}


# ---- the driver ----

def summary_line(name, result):
    """One line per section for the console."""
    if result.get("error") or result.get("status") in ("failed", "cut off"):
        return f"{name}: {result.get('status')} after {result.get('seconds', 0):.0f}s"
    r = result
    lines = {
        "matmul": lambda: (f"bf16 {r['n']}^3: {r['tflops']:.0f} TFLOP/s "
                           f"(datasheet {fmt_num(r['datasheet_tflops'])})"),
        "gpt2": lambda: (f"adamw {r['adamw']['ms_per_step']:.1f} ms/step, "
                         f"{r['adamw']['tokens_per_sec']:,.0f} tok/s, "
                         f"MFU {fmt_pct(r['adamw']['mfu'])}, "
                         f"first step {r['adamw']['first_step_s']:.1f}s; "
                         f"muon whole {r['muon_whole_over_adamw']:.2f}x, "
                         f"head {r['muon_head_over_adamw']:.2f}x"),
        "resume": lambda: (f"resumed == uninterrupted: {r.get('resumed_equals_uninterrupted')} "
                           f"(max diff {r.get('resumed_max_abs_diff')}); two uninterrupted equal: "
                           f"{r.get('two_uninterrupted_equal')}"),
        "fsdp": lambda: (f"loss vs plain max diff {r['max_loss_diff']:.2e}; loaded == saved: "
                         f"{r['loaded_equals_saved']}; next step equal: {r['next_step_equal']}"),
        "tests": lambda: f"{r['summary']}",
        "sampling": lambda: ", ".join(f"batch {c['batch_size']}: "
                                      f"{c['kv_cache_tokens_per_sec']:,.0f} tok/s "
                                      f"({c['speedup']:.1f}x recompute)" for c in r["cases"]),
        "muon": lambda: ", ".join(f"{c['shape'][0]}x{c['shape'][1]} {c['form']}: "
                                  f"sv {c['singular_min']:.2f}-{c['singular_max']:.2f}, "
                                  f"{c['ms']:.2f} ms" for c in r["cases"]),
        "speedrun": lambda: (f"{r['ms_per_step']} ms/step, MFU {fmt_pct(r['mfu'])}, "
                             f"compile {r['compile_s']}s; projected "
                             f"{fmt_num(r['projected_8gpu_minutes'])} min on {NODE_GPUS} GPUs"),
        "char": lambda: (f"reached {r['target_val_loss']}: {r['reached']} "
                         f"(step {r['target_step']}, {fmt_num(r['target_train_seconds'])} s "
                         f"of steps); last val {fmt_num((r['last_eval'] or {}).get('val_loss'))}"),
        "memory": lambda: ", ".join(f"B={c['batch_size']}: "
                                    f"{fmt_num((c['peak_memory_mib'] or {}).get('allocated'))} MiB"
                                    for c in r["cases"]),
    }
    try:
        return f"{name}: {lines[name]()}"
    except (KeyError, TypeError) as e:
        return f"{name}: done, see the report ({type(e).__name__}: {e})"


def fmt_pct(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def fmt_num(value):
    return "n/a" if value is None else f"{value:.4g}"


def prepare_data(cfg):
    """shakespeare_char (characters) and shakespeare_gpt2 (GPT-2 BPE) under data_root, from `text`,
    if missing."""
    for name, tokenizer in (("shakespeare_char", None), ("shakespeare_gpt2", "gpt2")):
        if (Path(cfg.data_root) / name / "meta.json").exists():
            continue
        if not Path(cfg.text).exists():
            raise ConfigError(f"{Path(cfg.data_root) / name} is not prepared and text {cfg.text} "
                              "does not exist; pass --text=<tiny shakespeare> "
                              "or --data_root=<a folder holding both datasets>")
        dataset = "shakespeare_char" if tokenizer is None else "text"
        prepare.prepare(dataset, inputs=[cfg.text], tokenizer=tokenizer, data_root=cfg.data_root,
                        name=name)


def run_section(cfg):
    """In the section's own process: run it, write its JSON."""
    rt = runtime(cfg)
    started = time.perf_counter()
    result = globals()[f"section_{cfg.section}"](cfg, rt, started)
    path = Path(cfg.work_dir) / f"{cfg.section}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def drive(cfg):
    chosen = [name for name in cfg.sections.split(",") if name]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise ConfigError(f"sections must name some of {', '.join(SECTIONS)}, got {cfg.sections!r}")
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device must be cuda, cuda:N or cpu (the dry run), got {cfg.device!r}")
    rt = runtime(cfg)  # a machine without the device is told so before anything is prepared
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prepare_data(cfg)
    report = {**common.machine_record(rt.device), "config": vars(cfg), "runtime": rt.describe(),
              "sections": {}}
    start = time.perf_counter()
    for name in chosen:
        left = cfg.budget_s - (time.perf_counter() - start)
        limit = min(SECTION_S[name] if not cfg.tiny else 300, left)
        if limit < MIN_SECTION_S:
            report["sections"][name] = {"status": "skipped",
                                        "why": f"{left:.0f}s of the budget left"}
            continue
        (work / f"{name}.json").unlink(missing_ok=True)
        print(f"== {name} (up to {limit:.0f}s)", flush=True)
        command = [sys.executable, __file__, *sys.argv[1:], f"--section={name}",
                   f"--section_s={limit}"]
        status, seconds = run_process(command, limit + 10, work / f"{name}.log")
        result = (json.loads((work / f"{name}.json").read_text())
                  if (work / f"{name}.json").exists() else {})
        if status != 0 or not result:
            result = {**result, "status": "cut off" if status is None else "failed",
                      "error": tail(work / f"{name}.log")}
        report["sections"][name] = {**result, "seconds": seconds}
        print(summary_line(name, report["sections"][name]), flush=True)
        common.write_report(cfg.out, report)  # after each section: a later crash keeps the figures
    report["total_s"] = time.perf_counter() - start
    common.write_report(cfg.out, report)
    failed = [name for name, r in report["sections"].items() if "error" in r]
    print(f"gpu_check: {len(chosen) - len(failed)} of {len(chosen)} sections ran "
          f"in {report['total_s']:.0f}s"
          + (f"; failed or cut off: {', '.join(failed)}" if failed else ""))
    return not failed


def main(cfg):
    if cfg.section:
        run_section(cfg)
        return True
    return drive(cfg)


if __name__ == "__main__":
    sys.exit(0 if run_main(main, __file__, None) else 1)
