"""Train a GPT: `python train.py [config/x.py ...] [--key=value ...]`, or under torchrun for several processes.

Read top to bottom: the config (every key with its default and meaning), the learning-rate schedule, the
batch samplers (windows of a token stream; fine-tuning examples), evaluation, the checks and the model's
architecture, then the loop: `train_step` (one optimizer step: zero the gradients, forward and backward
over the micro-batches, clip, set the lr and step the optimizer), `train` (processes) and `run_training`
(setup, then the loop with its logging, evaluation, samples and checkpoints, which checkpoint.py writes).
"""

import contextlib
import importlib
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import runlog
from checkpoint import (
    CheckpointError,
    check_architecture,
    full_state,
    gather_rng_states,
    keep_step_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    restore_rng,
    save_checkpoint,
    set_rng_state,
)
from configurator import ConfigError, load_config
from data import DataError, Examples, Windows, get_tokenizer, is_gpt2_bpe, read_meta
from devices import peak_flops, pick_device, pick_dtype, tune_for
from model import ARCHITECTURE_OPTIONS, GPT, GPTConfig, WeightsError

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
out_dir = "out"  # run folder: last.pt, best.pt, log.jsonl
init_from = "scratch"  # scratch (new model), resume (continue out_dir/last.pt), or GPT-2 weights: gpt2 ... gpt2-xl or a Hugging Face folder
data_root = "data"  # folder that holds the prepared datasets
dataset = "python_stdlib"  # data_root/<dataset>, written by prepare.py (the default is prepared on first use)
seed = 1337  # seeds weights, dropout and the order of training batches
# batches
batch_size = 16  # sequences per micro-batch, per process
block_size = 128  # context length in tokens
gradient_accumulation_steps = 1  # micro-batches per optimizer step over all processes (divided by world size)
# model
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # width of the residual stream
dropout = 0.0  # dropout on attention, residual branches and embeddings
bias = False  # biases in Linear layers and LayerNorms
pos_embedding = "learned"  # learned (a position table, GPT-2) or rope (rotary embeddings)
norm = "layernorm"  # layernorm (GPT-2) or rmsnorm
mlp = "gelu"  # MLP activation: gelu (GPT-2), relu2 (squared ReLU) or swiglu (gated, same parameter count)
qk_norm = False  # RMS-normalise each head's queries and keys before attention
tie_embeddings = True  # the LM head shares the token embedding's matrix (GPT-2)
vocab_size = 0  # model vocabulary; 0 takes the dataset's, a larger value pads it (e.g. 50304 for GPT-2 BPE)
# optimizer: AdamW with warmup and cosine decay
learning_rate = 1e-3  # peak learning rate, reached after warmup
min_lr = 1e-4  # floor the cosine decays to
max_iters = 1500  # optimizer steps in the run
warmup_iters = 100  # steps of linear warmup from 0
lr_decay_iters = 0  # step where the cosine reaches min_lr; 0 means max_iters
weight_decay = 0.1  # applied to 2-D weights and embeddings only
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
optimizer = "adamw"  # adamw, or muon: Muon for the blocks' weight matrices, AdamW for embeddings, head and 1-D weights
muon_lr = 0.02  # with optimizer=muon: the peak learning rate of the Muon matrices (same warmup and decay)
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables clipping (the norm is still logged)
# evaluation, logging, checkpoints
eval_interval = 250  # steps between evaluations on the fixed held-out batches (best.pt follows the val loss)
eval_iters = 20  # batches per split in each evaluation
log_interval = 10  # steps between train lines in the console and log.jsonl
ckpt_interval = 250  # steps between saves of last.pt (it is also saved when the run ends or stops)
sample_interval = 500  # steps between text samples written to the log; 0 turns them off
sample_tokens = 200  # length of each sample in tokens
stop_iter = 0  # stop after this step (saving last.pt) without changing the schedule; 0 runs to max_iters
# system
device = "auto"  # auto (cuda, else mps, else cpu), or cpu, cuda, cuda:N, mps
dtype = "auto"  # auto (bf16 where supported, else fp16 on CUDA, else fp32), float32, bfloat16, float16
compile = "auto"  # torch.compile the model: auto (on for CUDA), true, false
parallel = "ddp"  # under torchrun: ddp (a replica per process) or fsdp (FSDP2: parameters, gradients, optimizer state sharded)
# safety and records
keep_last_k = 0  # also keep the k newest periodic checkpoints as ckpt_<step>.pt; 0 keeps only last.pt
max_skipped_steps = 25  # stop the run after this many consecutive updates skipped for non-finite values
loss_spike_factor = 1.5  # warn when a step's loss exceeds this multiple of its running average
# fine-tuning (SFT data comes from `prepare.py sft`; its prompt tokens are never trained)
lora_rank = 0  # > 0 trains low-rank adapters (LoRA) of this rank and freezes every other weight
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "attn,mlp"  # projections that get adapters: attn (c_attn, c_proj), mlp (c_fc, c_proj), or both
pack_examples = False  # SFT data: rows of whole examples back to back (attention crosses them) instead of one padded example per row
wandb_log = False  # also send the logged metrics to Weights & Biases (needs `pip install wandb`)
wandb_project = "gpt"  # wandb project name
wandb_run_name = ""  # wandb run name; empty lets wandb choose
# ---- end of config ----


# ---- schedule ----

def lr_at(it, learning_rate, warmup_iters, decay_iters, min_lr):
    """Learning rate for the update that follows `it` completed updates: linear warmup, cosine to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


# ---- batches ----

# ---- evaluation ----

@torch.no_grad()
def estimate_loss(model, batches, device, autocast, rank=0, world_size=1):
    """Mean loss over fixed batches per split, in eval mode (no dropout). Processes share the batches;
    each runs the same number of forward passes (FSDP gathers parameters in every one), the surplus
    ones counting zero."""
    model.eval()
    losses = {}
    for split, split_batches in batches.items():
        total = torch.zeros(2, device=device)
        for i in range(rank, math.ceil(len(split_batches) / world_size) * world_size, world_size):
            x, y = split_batches[min(i, len(split_batches) - 1)]
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            weight = float(i < len(split_batches))
            total += torch.stack([loss.float() * weight, torch.tensor(weight, device=device)])
        if world_size > 1:
            dist.all_reduce(total)
        losses[split] = (total[0] / total[1]).item()
    model.train()
    return losses


def check_config(cfg, world_size):
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "max_iters"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd {cfg.n_embd} must be divisible by n_head {cfg.n_head}")
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be divisible by "
                          f"the {world_size} processes")
    if world_size > 1 and cfg.device.startswith("cuda:"):
        raise ConfigError(f"device {cfg.device} would put every process on one GPU; under torchrun use "
                          "--device=cuda (each process takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to pick GPUs")
    if cfg.optimizer not in ("adamw", "muon"):
        raise ConfigError(f"optimizer must be adamw or muon, got {cfg.optimizer!r}")
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp" and world_size > 1:
        raise ConfigError("Muon orthogonalises whole matrices, which FSDP splits across processes; use "
                          "--parallel=ddp with --optimizer=muon")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.compile not in ("auto", "true", "false"):
        raise ConfigError(f"compile must be auto, true or false, got {cfg.compile!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    for option, allowed in ARCHITECTURE_OPTIONS.items():
        if getattr(cfg, option) not in allowed:
            raise ConfigError(f"{option} must be one of {', '.join(allowed)}, got {getattr(cfg, option)!r}")
    if cfg.lora_rank < 0 or cfg.lora_alpha <= 0 or not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"LoRA needs lora_rank >= 0, lora_alpha > 0 and lora_dropout in [0, 1), got "
                          f"{cfg.lora_rank}, {cfg.lora_alpha}, {cfg.lora_dropout}")
    if not set(cfg.lora_targets.split(",")) <= {"attn", "mlp"}:
        raise ConfigError(f"lora_targets must be attn, mlp or attn,mlp, got {cfg.lora_targets!r}")
    if cfg.wandb_log:  # checked by every process, so that all of them stop
        try:
            importlib.import_module("wandb")
        except ImportError:
            raise ConfigError("wandb_log=True needs the wandb package: pip install wandb") from None


def architecture(cfg, meta, weights_from, ckpt):
    """(GPTConfig, pretrained state dict or None). From scratch the config's keys decide; with GPT-2 weights
    their config.json does, the position table cropped to block_size; a resume keeps the checkpoint's.
    Dropout and the LoRA keys always come from the config."""
    tuning = {"dropout": cfg.dropout, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "lora_targets": cfg.lora_targets}
    if weights_from == "scratch":
        vocab = cfg.vocab_size or meta["vocab_size"]
        if vocab < meta["vocab_size"]:
            raise ConfigError(f"vocab_size {vocab} is smaller than the dataset's {meta['vocab_size']}; use 0 or more")
        return GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, bias=cfg.bias, pos_embedding=cfg.pos_embedding, norm=cfg.norm,
                         mlp=cfg.mlp, qk_norm=cfg.qk_norm, tie_embeddings=cfg.tie_embeddings, **tuning), None
    if not is_gpt2_bpe(meta):
        raise ConfigError(f"GPT-2 weights read GPT-2 BPE tokens, but {cfg.dataset} holds {meta['tokenizer']} tokens; "
                          "prepare the data with --tokenizer gpt2")
    if ckpt is not None:
        return replace(GPTConfig(**ckpt["model_config"]), **tuning), None
    try:
        pretrained = GPT.from_pretrained(weights_from, dropout=cfg.dropout)
    except WeightsError as e:
        raise ConfigError(str(e)) from None
    if cfg.block_size > pretrained.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the {pretrained.config.block_size} positions of "
                          f"{weights_from}; use --block_size={pretrained.config.block_size} or less")
    state = pretrained.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.block_size]
    return replace(pretrained.config, block_size=cfg.block_size, **tuning), state


def load_data(cfg, local_rank, world_size):
    """The dataset's folder and meta, preparing the embedded default on first use (by one process per
    machine while the others wait; if it fails every process stops with its error)."""
    data_dir = Path(cfg.data_root) / cfg.dataset
    if cfg.dataset == "python_stdlib" and not (data_dir / "meta.json").exists():
        error = prepare_default(data_dir) if local_rank == 0 else None
        errors = [error]
        if world_size > 1:
            errors = [None] * world_size
            dist.all_gather_object(errors, error)
        if any(errors):
            raise DataError(next(e for e in errors if e))
    return data_dir, read_meta(data_dir)


def prepare_default(data_dir):
    """Run `python prepare.py` (the default dataset) as its own command, as a user would; its error or None."""
    print(f"preparing the default dataset in {data_dir} (Python's standard library, byte tokens)")
    command = [sys.executable, str(Path(__file__).with_name("prepare.py")), "--data_root", str(data_dir.parent)]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode == 0:
        return None
    return result.stderr.strip().removeprefix("error: ") or f"prepare.py failed with exit status {result.returncode}"


# ---- the loop ----

def train_step(model, optimizer, scaler, autocast, batches, lr, grad_clip):
    """One optimizer step over a list of (x, y) micro-batches, in five moves: zero the gradients, forward
    and backward each micro-batch (its loss scaled by their count), clip, step the optimizer at this lr.

    Returns (mean loss, gradient norm before clipping, whether the update was applied). A non-finite loss
    or gradient skips the update, so a divergence never reaches the weights; reading the two values for
    that check is the step's one host-device sync. Gradients stay in place until the next call.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for micro, (x, y) in enumerate(batches):
        with gradient_sync(model, enabled=micro == len(batches) - 1):
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / len(batches)).backward()
        loss_sum += loss.detach()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loss_sum)  # every process then takes the same skip decision
        loss_sum /= dist.get_world_size()  # (a sum: gloo has no average)
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    loss_value, norm = torch.stack([loss_sum / len(batches), grad_norm.float()]).tolist()
    applied = math.isfinite(loss_value) and math.isfinite(norm)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if applied:
        scaler.step(optimizer)
    scaler.update()
    return loss_value, norm, applied


def gradient_sync(model, enabled):
    """Whether this micro-batch's backward exchanges gradients between processes (DDP all-reduce, FSDP
    reduce-scatter): only the last of a step's micro-batches needs to, the others just accumulate."""
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def nonfinite_gradients(model):
    """Names of parameters whose gradient (this process's shard of it, under FSDP) holds inf or nan."""
    grads = {name: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    return [name for name, grad in grads.items() if not grad.isfinite().all()]


class Diverged(Exception):
    """Too many consecutive updates skipped for non-finite values."""


def train(cfg):
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    check_config(cfg, world_size)
    device = pick_device(cfg.device, local_rank)
    device_type = device.split(":")[0]
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        run_training(cfg, rank, local_rank, world_size, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def run_training(cfg, rank, local_rank, world_size, device):
    master = rank == 0
    device_type = device.split(":")[0]
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "last.pt"
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
    elif ckpt_path.exists():
        raise ConfigError(f"{out_dir} already holds a run (last.pt); continue it with --init_from=resume "
                          "or choose another --out_dir")
    data_dir, meta = load_data(cfg, local_rank, world_size)
    weights_from = ckpt["weights_from"] if ckpt else cfg.init_from  # scratch or a GPT-2 source, kept by resumes
    model_config, pretrained_state = architecture(cfg, meta, weights_from, ckpt)
    vocab = model_config.vocab_size
    if meta.get("format") == "sft":
        train_data = Examples(data_dir, "train", model_config.block_size, vocab, cfg.pack_examples)
        val_data = Examples(data_dir, "val", model_config.block_size, vocab)
    else:
        train_data = Windows(data_dir, "train", model_config.block_size, vocab)
        val_data = Windows(data_dir, "val", model_config.block_size, vocab)
    eval_batches = {"train": train_data.fixed_batches(cfg.eval_iters, cfg.batch_size),
                    "val": val_data.fixed_batches(cfg.eval_iters, cfg.batch_size)}

    ptdtype, dtype_reason = pick_dtype(cfg.dtype, device_type)
    tune_for(device, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    autocast = torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process (FSDP shards them as they are)
    raw_model = GPT(model_config).to(device)
    if pretrained_state is not None:  # LoRA adapters, not in the pretrained weights, keep their initial values
        raw_model.load_state_dict({**raw_model.state_dict(), **pretrained_state})
    torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks
    step, best_val, best_step, wandb_id = 0, float("inf"), None, runlog.new_wandb_id()
    if ckpt is not None:
        check_architecture(ckpt, model_config, ckpt_path)
        raw_model.load_state_dict(ckpt["model"])
        step, best_val, best_step = ckpt["step"], ckpt["best_val_loss"], ckpt["best_step"]
        wandb_id = ckpt["wandb_id"]
        set_rng_state(restore_rng(ckpt["rng"], rank, world_size))
    sharded = world_size > 1 and cfg.parallel == "fsdp"
    if sharded:  # FSDP2: each block's parameters, gradients and optimizer state split across the processes
        for block in raw_model.transformer.h:
            fully_shard(block)
        fully_shard(raw_model)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                              device_type, cfg.muon_lr if cfg.optimizer == "muon" else None)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    if ckpt is not None:
        load_optimizer_state(raw_model, optimizer, ckpt["optimizer"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and device_type == "cuda")
    model = torch.compile(raw_model) if use_compile else raw_model
    if world_size > 1 and not sharded:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    accum = cfg.gradient_accumulation_steps // world_size
    data_index = (ckpt["data_position"] if ckpt else 0) + rank * accum  # the sampler's whole state
    T = model_config.block_size
    tokens_per_step = cfg.batch_size * T * cfg.gradient_accumulation_steps
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    end_step = min(cfg.stop_iter or cfg.max_iters, cfg.max_iters)
    peak = peak_flops(torch.cuda.get_device_name(device), ptdtype) if device_type == "cuda" else None
    run = runlog.RunLog(out_dir, master)
    run.start(cfg, meta, device, ptdtype, world_size, ckpt["step"] if ckpt else None, wandb_id)
    if master:
        n_params = raw_model.num_params()
        print(f"model: {n_params / 1e6:.2f}M parameters ({raw_model.num_params(False) / 1e6:.2f}M without "
              f"embeddings), {model_config.n_layer} layers, {model_config.n_head} heads, {model_config.n_embd} wide, "
              f"vocab {vocab}, context {T}")
        if model_config.lora_rank:
            trainable = raw_model.num_params(trainable_only=True)
            print(f"LoRA: rank {model_config.lora_rank} adapters on {model_config.lora_targets}; {trainable:,} "
                  f"trainable of {n_params:,} parameters ({100 * trainable / n_params:.2f}%)")
        print(f"data: {cfg.dataset} ({meta['tokenizer']} tokens): {train_data.summary} train, "
              f"{val_data.summary} val")
        rows = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.max_iters
        print(f"batch: {cfg.batch_size} x {T} tokens x {accum} micro-steps x {world_size} "
              f"process(es) = {tokens_per_step:,} tokens/step; {cfg.max_iters} steps = "
              f"{tokens_per_step * cfg.max_iters / 1e6:.1f}M tokens ({rows / train_data.rows_per_epoch:.1f} epochs)")
        print(f"compute: 6ND = {6 * n_params * tokens_per_step * cfg.max_iters:.2e} FLOPs; "
              f"{raw_model.flops_per_token(T) / 1e6:.1f} MFLOPs per token with attention")
        print(f"device: {device}, {str(ptdtype).removeprefix('torch.')} ({dtype_reason}), "
              f"compile {'on' if use_compile else 'off'}"
              + (f", {torch.get_num_threads()} threads" if device_type == "cpu" else ""))

    def evaluate():
        nonlocal best_val, best_step
        losses = estimate_loss(model, eval_batches, device, autocast, rank, world_size)
        run.log({"step": step, "tokens": step * tokens_per_step, "train_loss": losses["train"],
                 "val_loss": losses["val"], "val_ppl": math.exp(min(losses["val"], 50.0))},
                f"step {step}: eval train {losses['train']:.4f}, val {losses['val']:.4f}")
        if losses["val"] < best_val and step > 0:  # the untrained model is not a candidate
            best_val, best_step = losses["val"], step
            checkpoint(out_dir / "best.pt")
        run.evaluated(step, step * tokens_per_step, losses["val"], best_val, best_step)

    def checkpoint(path):
        model_state, optimizer_state = full_state(raw_model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state,
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                 "data_position": data_index - rank * accum, "best_val_loss": best_val,
                 "best_step": best_step, "rng": gather_rng_states(world_size), "wandb_id": wandb_id,
                 "weights_from": weights_from, "config": vars(cfg),
                 "model_config": asdict(model_config), "meta": meta}
        if world_size > 1:
            dist.barrier()  # every process has finished the step before its state is written
        if master:
            save_checkpoint(path, state)
            if path == ckpt_path and cfg.keep_last_k:
                keep_step_checkpoint(ckpt_path, step, cfg.keep_last_k)

    def write_sample():  # on every process: under FSDP each forward gathers parameters from all of them
        tokenizer = get_tokenizer(meta)
        start = tokenizer.document_start()
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast:
            ids = raw_model.generate(torch.tensor([start], device=device), cfg.sample_tokens, temperature=0.8,
                                     top_k=200, vocab_limit=meta["vocab_size"], generator=generator)
        text = tokenizer.decode(ids[0, len(start):].tolist())
        run.log({"step": step, "sample": text}, f"step {step}: sample\n{text}\n")

    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))

    if ckpt is None:
        if master:
            print(f"expected loss at init: ln({vocab}) = {math.log(vocab):.4f}")
        evaluate()
    else:
        run.log({"step": step, "event": "resumed"}, f"resumed from {ckpt_path} at step {step}")
        if step >= end_step and master:
            limit = "--max_iters" if end_step == cfg.max_iters else "--stop_iter (or set it to 0)"
            print(f"{ckpt_path} is already at step {step}; raise {limit} to train further")
    def step_batches(index):  # on the loader thread, while the step before computes
        batches = [train_data.random_batch(cfg.seed, index + micro, cfg.batch_size) for micro in range(accum)]
        if device_type == "cuda":  # page-locked host memory lets the copies overlap with compute
            batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
        return batches

    loader = ThreadPoolExecutor(max_workers=1)
    upcoming = loader.submit(step_batches, data_index)
    interval_time, interval_steps, skipped, recent_norms, loss_ema = 0.0, 0, 0, [], None
    compiling = use_compile
    end_reason = "finished" if end_step == cfg.max_iters else f"paused at stop_iter {end_step}"
    while step < end_step:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.learning_rate, cfg.warmup_iters, decay_iters, cfg.min_lr)
        batches = upcoming.result()
        data_index += cfg.gradient_accumulation_steps
        upcoming = loader.submit(step_batches, data_index)
        batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]
        train_loss, norm, applied = train_step(model, optimizer, scaler, autocast, batches, lr, cfg.grad_clip)
        step += 1
        elapsed = time.perf_counter() - t0
        if compiling:  # the first step traces and compiles the model: reported apart from the step times
            compiling = False
            run.log({"step": step, "compile_s": elapsed}, f"step {step}: {elapsed:.1f}s, compiling the model")
        else:
            interval_time += elapsed
            interval_steps += 1

        if not applied:
            skipped += 1
            # under fp16 the first steps' overflows are routine: the scaler halves its scale after each
            scale = f", fp16 loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else ""
            run.log({"step": step, "skipped": "non-finite loss or gradient norm", "loss": train_loss,
                     "grad_norm": norm, "lr": lr, "recent_grad_norms": recent_norms[-10:],
                     "nonfinite_grads": nonfinite_gradients(raw_model)[:20], "consecutive_skips": skipped,
                     "loss_scale": scaler.get_scale() if scaler.is_enabled() else None},
                    f"step {step}: skipped the update: loss {train_loss}, grad norm {norm} "
                    f"({skipped} in a row, limit {cfg.max_skipped_steps}{scale})")
            if skipped >= cfg.max_skipped_steps:
                run.finish(step, step * tokens_per_step, "diverged")
                raise Diverged(f"training diverged: {skipped} consecutive steps up to step {step} had a non-finite "
                               f"loss or gradient; the last good checkpoint is {ckpt_path}; lower the "
                               "learning rate or check the data, then resume")
        else:
            skipped = 0
            recent_norms = [*recent_norms[-99:], norm]
            if loss_ema is not None and train_loss > cfg.loss_spike_factor * loss_ema:
                run.log({"step": step, "warning": "loss spike", "loss": train_loss, "running_average": loss_ema},
                        f"step {step}: warning: loss {train_loss:.4f} is over {cfg.loss_spike_factor}x its "
                        f"running average {loss_ema:.4f}")
            loss_ema = train_loss if loss_ema is None else 0.95 * loss_ema + 0.05 * train_loss

        if step % cfg.log_interval == 0 or step == end_step:
            dt = interval_time / interval_steps if interval_steps else elapsed
            interval_time, interval_steps = 0.0, 0
            record = {"step": step, "tokens": step * tokens_per_step, "train_loss": train_loss, "lr": lr,
                      "grad_norm": norm, "dt_ms": 1000 * dt, "tok_per_sec": tokens_per_step / dt}
            if peak:
                record["mfu"] = raw_model.flops_per_token(T) * record["tok_per_sec"] / (peak * world_size)
            eta = time.strftime("%H:%M:%S", time.gmtime(dt * (end_step - step)))
            run.log(record, f"step {step}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | "
                            f"{1000 * dt:.1f} ms | {record['tok_per_sec']:,.0f} tok/s | ETA {eta}")
            if stop_requested(stop_signal, device, world_size):
                if master:
                    print(f"stopping at step {step} on {stop_signal[0]}; saving {ckpt_path}")
                checkpoint(ckpt_path)
                end_reason = f"stopped by {stop_signal[0] if stop_signal else 'a signal to another process'}"
                break
        # the schedule's end, not stop_iter, decides the final eval and sample, so a paused run matches
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            evaluate()
        if cfg.sample_interval and (step % cfg.sample_interval == 0 or step == cfg.max_iters):
            write_sample()
        if step % cfg.ckpt_interval == 0 or step == end_step:
            checkpoint(ckpt_path)
    loader.shutdown(cancel_futures=True)
    run.finish(step, step * tokens_per_step, end_reason)


def stop_requested(stop_signal, device, world_size):
    """Whether any process got SIGINT/SIGTERM; agreed by all so that every process stops at the same step."""
    flag = torch.tensor(float(bool(stop_signal)), device=device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def main(argv=None):
    try:
        train(load_config(__file__, sys.argv[1:] if argv is None else argv))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
