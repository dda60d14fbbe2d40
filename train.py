"""Train a GPT: `python train.py [config/x.py ...] [--key=value ...]`, or under torchrun for several processes.

Read top to bottom: the config (every key with its default and meaning; the device keys come from
devices.RuntimeConfig, the architecture options from model.GPTConfig), the schedule (`lr_at`), the checks
(the keys' ranges; on resume, what the checkpoint fixes and what may change), `set_up` (data, model,
optimizer), `TrainingState` (what a checkpoint saves besides weights and optimizer), `train_step` (one
optimizer step, the heart of it), `DivergenceGuard`, the loop's pieces (evaluation, samples, checkpoints, the
loader thread's batches, progress lines, stop signals), `train_loop`, then `train` (processes) and `main` (exit
codes: 2 for refused input, 1 for a diverged run or a failed write). checkpoint.py writes the checkpoints,
runlog.py the run's records.
"""

import contextlib
import importlib
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import runlog
from checkpoint import (
    BackgroundSaver,
    CheckpointError,
    checkpoint_path,
    checkpoint_to_resume,
    full_state,
    full_weights,
    gather_rng_states,
    keep_step_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_sharded_state,
    load_weights,
    model_from_checkpoint,
    restore_rng,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from configurator import ConfigError, load_config
from data import (
    DataError,
    Examples,
    Tokenizer,
    Windows,
    data_differences,
    describe_data,
    get_tokenizer,
    has_split,
    is_gpt2_bpe,
    leaked_documents,
    prepare_default,
    read_meta,
)
from devices import RuntimeConfig, process_group_backend, runtime
from eval import evaluate_task, load_task
from hf import HUB_REPOS, WeightsError, load_gpt2
from model import GPT, GPTConfig, architecture_options, check_options
from optimizers import configure_optimizer

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
out_dir = "out"  # run folder: last.pt, best.pt, log.jsonl
init_from = "scratch"  # scratch, resume (continue out_dir/last.pt), or GPT-2 weights: gpt2 ... gpt2-xl, a HF folder
data_root = "data"  # folder that holds the prepared datasets
dataset = "python_stdlib"  # data_root/<dataset>, written by prepare.py (the default is prepared on first use)
seed = 1337  # seeds weights, dropout and the order of training batches
# batches
batch_size = 16  # sequences per micro-batch, per process
block_size = 128  # context length in tokens
gradient_accumulation_steps = 1  # micro-batches per optimizer step over all processes (divided by world size)
# model (the architecture options are model.GPTConfig's, listed last in --help with GPT-2's values as defaults;
# these three are set here: with Muon they reach the default run's val loss in under half the time, RESULTS.md)
pos_embedding = "rope"  # learned (a position table, GPT-2) or rope (rotary embeddings)
mlp = "relu2"  # MLP activation: gelu (GPT-2), relu2 (squared ReLU) or swiglu (gated, same parameter count)
qk_norm = True  # RMS-normalise each head's queries and keys before attention
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # width of the residual stream
dropout = 0.0  # dropout on attention, residual branches and embeddings
bias = False  # biases in Linear layers and LayerNorms
vocab_size = 0  # model vocabulary; 0 takes the dataset's, a larger value pads it (e.g. 50304 for GPT-2 BPE)
# optimizer: Muon and AdamW, with warmup and decay
learning_rate = 3e-3  # peak learning rate, reached after warmup
min_lr = 1e-4  # floor the decay ends at
max_iters = 1100  # optimizer steps in the run
warmup_iters = 50  # steps of linear warmup from 0
lr_decay_iters = 0  # step where the decay reaches min_lr; 0 means max_iters
lr_schedule = "cosine"  # after warmup: cosine (decays all the way) or wsd (constant, then a linear cooldown)
cooldown_frac = 0.4  # wsd: share of the steps between warmup and lr_decay_iters that the linear cooldown takes
embedding_lr = 0.0  # peak lr of the token, position and value embeddings; 0 means learning_rate
head_lr = 0.0  # peak lr of an untied LM head (tie_embeddings=False); 0 means learning_rate
weight_decay = 0.1  # applied to 2-D weights and embeddings only
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
optimizer = "muon"  # muon: Muon for the blocks' weight matrices, AdamW for embeddings, head and 1-D weights; or adamw
muon_lr = 0.02  # with optimizer=muon: the peak learning rate of the Muon matrices (same warmup and decay)
muon_split = "head"  # with optimizer=muon: orthogonalise strips one head wide (less work on a CPU), or whole matrices
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables clipping (the norm is still logged)
# evaluation, logging, checkpoints
eval_interval = 250  # steps between evaluations on the fixed held-out batches (best.pt, weights only, follows val)
eval_iters = 20  # batches per split in each evaluation
val_tokens = 0  # > 0: val is the val split's first val_tokens tokens in contiguous windows (the speedrun measure)
allow_new_eval_batches = False  # resume with other batch_size, eval_iters or val_tokens (so other val batches)
log_interval = 10  # steps between train lines in the console and log.jsonl
ckpt_interval = 250  # steps between saves of last.pt (it is also saved when the run ends or stops)
sample_interval = 500  # steps between text samples written to the log; 0 turns them off
sample_tokens = 200  # length of each sample in tokens
stop_iter = 0  # stop after this step (saving last.pt) without changing the schedule; 0 runs to max_iters
target_val_loss = 0.0  # stop at the first evaluation whose val loss is at or below this (time to target); 0 is off
early_stop_patience = 0  # stop after this many evaluations without a new best val loss (by min_delta); 0 is off
early_stop_min_delta = 0.0  # how much lower than the best so far a val loss must be to count as improving
task_eval = ""  # multiple-choice task scored while training: hellaswag or a JSON Lines file (see eval.py); empty: off
task_eval_interval = 0  # steps between task evaluations; 0 means eval_interval
task_eval_examples = 200  # the task's first N examples are scored each time; 0 scores all
# system (the device keys device, dtype and compile are devices.RuntimeConfig's: listed last in --help)
parallel = "ddp"  # under torchrun: ddp (a replica per process) or fsdp (FSDP2 shards parameters, grads, optimizer)
# safety and records
checkpoint_format = "full"  # full: files rank 0 writes (last.pt, best.pt); sharded: folders (last, best) of all shards
keep_last_k = 0  # also keep the k newest periodic checkpoints (ckpt_<step>.pt; sharded: last.<step>); 0 keeps the last
max_skipped_steps = 25  # stop the run after this many consecutive updates skipped for non-finite values
loss_spike_factor = 1.5  # warn when a step's loss exceeds this multiple of its running average
# fine-tuning (SFT data comes from `prepare.py sft`; its prompt tokens are never trained)
lora_rank = 0  # > 0 trains low-rank adapters (LoRA) of this rank and freezes every other weight
lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "attn,mlp"  # projections that get adapters: attn (c_attn, c_proj), mlp (c_fc, c_proj), or both
pack_examples = False  # SFT: rows of whole examples back to back (attention crosses them), not one padded per row
wandb_log = False  # also send the logged metrics to Weights & Biases (needs `pip install wandb`)
wandb_project = "gpt"  # wandb project name
wandb_run_name = ""  # wandb run name; empty lets wandb choose
# ---- end of config ----


# ---- schedule ----

def lr_at(it, learning_rate, warmup_iters, decay_iters, min_lr, schedule="cosine", cooldown_frac=0.4):
    """Learning rate for the update that follows `it` completed updates: linear warmup, then to min_lr at
    decay_iters either by a cosine or (wsd, warmup-stable-decay) by holding the peak and falling linearly over the
    last cooldown_frac of the steps after warmup."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)
    if schedule == "wsd":
        return min_lr + min(1.0, (1.0 - progress) / cooldown_frac) * (learning_rate - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def schedule_lr(cfg, it):
    """lr_at with the config's schedule keys."""
    return lr_at(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr,
                 cfg.lr_schedule, cfg.cooldown_frac)


# ---- checks, the architecture, the data ----

def check_config(cfg, world_size):
    """ConfigError for the first key out of its range or at odds with another; nothing is read or written yet."""
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "max_iters", "learning_rate",
                "muon_lr", "sample_tokens", "max_skipped_steps"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    check_schedule(cfg)
    if cfg.val_tokens < 0 or cfg.val_tokens % (cfg.batch_size * cfg.block_size):
        raise ConfigError(f"val_tokens {cfg.val_tokens} must be 0 or a multiple of batch_size x block_size "
                          f"({cfg.batch_size * cfg.block_size}), so that every val batch is whole")
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
    if cfg.muon_split not in ("whole", "head"):
        raise ConfigError(f"muon_split must be whole or head, got {cfg.muon_split!r}")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel must be ddp or fsdp, got {cfg.parallel!r}")
    for key in ("target_val_loss", "early_stop_patience", "early_stop_min_delta", "task_eval_interval",
                "task_eval_examples", "stop_iter", "keep_last_k", "sample_interval"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be 0 (off) or more, got {getattr(cfg, key)}")
    if cfg.loss_spike_factor <= 1:
        raise ConfigError(f"loss_spike_factor must be above 1 (a loss that many times its running average is a "
                          f"spike), got {cfg.loss_spike_factor}")
    if cfg.init_from not in ("scratch", "resume", *HUB_REPOS) and not Path(cfg.init_from).is_dir():
        raise ConfigError(f"init_from {cfg.init_from} is neither scratch, resume, one of {', '.join(HUB_REPOS)} nor "
                          "an existing folder; pass a folder in the Hugging Face layout (config.json plus "
                          "model.safetensors)")
    if cfg.task_eval and cfg.parallel == "fsdp" and world_size > 1:
        raise ConfigError("task_eval scores with whole weights in every process, which FSDP does not keep; use "
                          "--parallel=ddp, or score checkpoints afterwards with eval.py")
    if cfg.checkpoint_format not in ("full", "sharded"):
        raise ConfigError(f"checkpoint_format must be full or sharded, got {cfg.checkpoint_format!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    try:
        check_options(vars(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
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


def check_schedule(cfg):
    """The optimizer's keys in range, and a schedule whose phases come in order: warmup, decay, end."""
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.lr_schedule not in ("cosine", "wsd"):
        raise ConfigError(f"lr_schedule must be cosine or wsd, got {cfg.lr_schedule!r}")
    if not 0.0 < cfg.cooldown_frac <= 1.0:
        raise ConfigError(f"cooldown_frac must be in (0, 1] (the share of the decay span that wsd's cooldown takes), "
                          f"got {cfg.cooldown_frac}")
    for key in ("weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters", "embedding_lr", "head_lr"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.min_lr <= cfg.learning_rate:
        raise ConfigError(f"min_lr must be between 0 and learning_rate {cfg.learning_rate} (the floor the decay "
                          f"ends at), got {cfg.min_lr}")
    if cfg.warmup_iters > cfg.max_iters:
        raise ConfigError(f"warmup_iters {cfg.warmup_iters} is more than max_iters {cfg.max_iters}: the run would end "
                          "still warming up; lower --warmup_iters")
    if cfg.lr_decay_iters and cfg.lr_decay_iters < cfg.warmup_iters:
        raise ConfigError(f"lr_decay_iters {cfg.lr_decay_iters} ends the decay before warmup_iters {cfg.warmup_iters} "
                          "ends the warmup; raise it (or set 0: decay until max_iters)")


# ---- resume: what the checkpoint fixes and what may change ----
# On resume each config key is compared with the checkpoint's config; every key is in exactly one class
# (tests/test_robustness.py checks it), and every change is said at start and kept in run.json's changed_on_resume.
FIXED_ON_RESUME = (  # refused: the saved weights and optimizer state are of this shape, vocabulary and optimizer
    "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", *architecture_options(), "lora_rank",
    "lora_alpha", "lora_targets", "optimizer")
OPTIMIZER_SETTINGS = (  # set in the resumed optimizer's param groups (its moments are kept), as a new run would
    "learning_rate", "weight_decay", "beta1", "beta2", "muon_lr", "muon_split", "embedding_lr", "head_lr")
EVAL_BATCH_KEYS = (  # they make the fixed val batches that choose best.pt: refused without allow_new_eval_batches
    "batch_size", "eval_iters", "val_tokens")
CHANGEABLE = (  # read afresh as the run goes on: the schedule, regularisation, intervals, stop rules, records,
    # devices, and where the run and its data are (the data's identity is checked against the checkpoint's meta)
    "out_dir", "data_root", "dataset", "seed", "gradient_accumulation_steps", "dropout", "min_lr", "max_iters",
    "warmup_iters", "lr_decay_iters", "lr_schedule", "cooldown_frac", "grad_clip", "eval_interval", "log_interval",
    "ckpt_interval", "sample_interval", "sample_tokens", "stop_iter", "target_val_loss", "early_stop_patience",
    "early_stop_min_delta", "task_eval", "task_eval_interval", "task_eval_examples", "parallel",
    "checkpoint_format", "keep_last_k", "max_skipped_steps", "loss_spike_factor", "lora_dropout", "pack_examples",
    "wandb_log", "wandb_project", "wandb_run_name", "device", "dtype", "compile", "deterministic",
    "peak_tflops")
RESUME_CONTROLS = ("init_from", "allow_new_eval_batches")  # how this start goes, not what the run is: not compared
# what a checkpoint older than these keys ran with: its model had GPT-2's options, its val the random windows,
# its Muon whole matrices
BEFORE_THE_KEY = {**architecture_options(), "val_tokens": 0, "muon_split": "whole"}


def resume_changes(cfg, ckpt):
    """{key: [checkpoint's value, config's value]} for each key this resume changes; ConfigError for a change
    the checkpoint cannot follow. A key the checkpoint's config lacks (older than the key) is compared with
    BEFORE_THE_KEY's value where it has one, and otherwise not at all; Muon's settings are not compared for an
    AdamW run."""
    saved = {**BEFORE_THE_KEY, **ckpt["config"]}
    unused = ("muon_lr", "muon_split") if cfg.optimizer != "muon" else ()  # settings of an optimizer not in use
    changed = {key: [saved[key], value] for key, value in vars(cfg).items()
               if key in saved and key not in RESUME_CONTROLS + unused and saved[key] != value}
    fixed = [key for key in changed if key in FIXED_ON_RESUME]
    if fixed:
        raise ConfigError(f"{ckpt['path']} was trained with {', '.join(f'{k}={changed[k][0]}' for k in fixed)}, which "
                          f"a resume cannot change (the config asks for "
                          f"{', '.join(f'{k}={changed[k][1]}' for k in fixed)}); resume with the run's own values "
                          "(run.json's config), or start a new run in another --out_dir")
    batches = [key for key in changed if key in EVAL_BATCH_KEYS]
    if batches and not cfg.allow_new_eval_batches:
        raise ConfigError(f"{', '.join(f'{k} {changed[k][0]} -> {changed[k][1]}' for k in batches)} would change the "
                          "fixed val batches, so best.pt's selection would compare val losses measured on different "
                          f"batches; resume with {', '.join(f'--{k}={changed[k][0]}' for k in batches)}, or pass "
                          "--allow_new_eval_batches=True to accept that")
    return changed


def check_same_data(ckpt, meta, data_dir):
    """A resume reads the data its checkpoint was trained on: not another dataset, nor another preparation."""
    differ = data_differences(ckpt["meta"], meta)
    if differ:
        raise DataError(f"{ckpt['path']} was trained on {describe_data(ckpt['meta'])}, but {data_dir} holds "
                        f"{describe_data(meta)}: they differ in {', '.join(differ)}; resume on the data the run "
                        "was trained on (--data_root, --dataset), or start a new run in another --out_dir")


def architecture(cfg, meta, weights_from, ckpt):
    """(GPTConfig, pretrained state dict or None). A resume keeps the checkpoint's (resume_changes has refused a
    config asking for another); from scratch the config's keys decide; with GPT-2 weights their config.json
    does, the position table cropped to block_size. Dropout and the LoRA keys always come from the config."""
    tuning = {"dropout": cfg.dropout, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "lora_targets": cfg.lora_targets}
    if ckpt is not None:
        return replace(GPTConfig(**ckpt["model_config"]), **tuning), None
    if weights_from == "scratch":
        vocab = cfg.vocab_size or meta["vocab_size"]
        if vocab < meta["vocab_size"]:
            raise ConfigError(f"vocab_size {vocab} is smaller than the dataset's {meta['vocab_size']}; use 0 or more")
        options = {option: getattr(cfg, option) for option in architecture_options()}
        return GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, bias=cfg.bias, **options, **tuning), None
    if not is_gpt2_bpe(meta):
        raise ConfigError(f"GPT-2 weights read GPT-2 BPE tokens, but {cfg.dataset} holds {meta['tokenizer']} tokens; "
                          "prepare the data with --tokenizer gpt2")
    try:
        pretrained = load_gpt2(weights_from, dropout=cfg.dropout)
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


# ---- setup: the model, its optimizer and the data ----

@dataclass
class Setup:
    """What the loop trains with, built once by set_up."""

    gpt: GPT  # the model whose weights train and are saved (FSDP-sharded under parallel=fsdp)
    model: torch.nn.Module  # what runs it: gpt compiled, DDP-wrapped, or gpt itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; disabled for other dtypes
    train_data: Windows | Examples
    val_data: Windows | Examples
    eval_batches: dict  # split -> the fixed (x, y) batches of every evaluation
    test_batches: dict  # {"test": batches} when the dataset has a test split, scored once at the end; else {}
    task_examples: list  # task_eval's examples (eval.load_task), or [] without task_eval
    meta: dict  # the dataset's meta.json
    tokenizer: Tokenizer | None  # the data's, for samples and task_eval; None when the run uses neither
    weights_from: str  # scratch or the GPT-2 source the run's weights started from (a resume keeps it)
    tokens_per_step: int  # over all micro-batches and processes
    best_saver: BackgroundSaver  # writes best.pt off the training thread


def set_up(cfg, ckpt, rt, rank, local_rank, world_size):
    """The data; the model (given its pretrained or resumed weights), sharded, compiled or DDP-wrapped as
    configured; its optimizer and loss scaler (with their resumed state)."""
    data_dir, meta = load_data(cfg, local_rank, world_size)
    if ckpt is not None:
        check_same_data(ckpt, meta, data_dir)
    weights_from = ckpt["weights_from"] if ckpt else cfg.init_from
    model_config, pretrained_state = architecture(cfg, meta, weights_from, ckpt)
    try:
        train_data, val_data, eval_batches, test_batches = load_batches(cfg, data_dir, meta, model_config)
        # on the device once, so that each evaluation reads them there, with no copies from pageable memory
        eval_batches, test_batches = ({split: [(x.to(rt.device), y.to(rt.device)) for x, y in batches]
                                       for split, batches in held.items()} for held in (eval_batches, test_batches))
    except (MemoryError, torch.OutOfMemoryError):
        raise ConfigError(f"the fixed evaluation batches ({cfg.eval_iters} x {cfg.batch_size} rows of "
                          f"{model_config.block_size} tokens per split, or val_tokens {cfg.val_tokens}) do not fit in "
                          "memory; lower --batch_size, --eval_iters or --val_tokens") from None
    task_examples = load_task(cfg.task_eval, cfg.task_eval_examples) if cfg.task_eval else []
    # a tokenizer that cannot load (an unknown one, GPT-2's offline without a cache) fails now, not at a sample
    tokenizer = get_tokenizer(meta) if cfg.sample_interval or cfg.task_eval else None

    torch.manual_seed(cfg.seed)  # the same initial weights in every process (FSDP shards them as they are)
    gpt = GPT(model_config).to(rt.device)
    if pretrained_state is not None:  # LoRA adapters, not in the pretrained weights, keep their initial values
        gpt.load_state_dict({**gpt.state_dict(), **pretrained_state})
    if ckpt is not None and not ckpt.get("sharded"):
        load_weights(gpt, ckpt["model"], ckpt["path"])
    sharded = world_size > 1 and cfg.parallel == "fsdp"
    if sharded:
        shard(gpt, rt)
    try:
        optimizer = configure_optimizer(gpt, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                        rt.device_type, cfg.muon_lr if cfg.optimizer == "muon" else None,
                                        cfg.embedding_lr or None, cfg.head_lr or None, cfg.muon_split)
    except ValueError as e:  # a head_lr for a tied head
        raise ConfigError(str(e)) from None
    scaler = rt.grad_scaler()
    if ckpt is not None:
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if ckpt.get("sharded"):  # read as the model now is: sharded or whole, on any number of processes
            load_sharded_state(ckpt["sharded"], gpt, optimizer)
        else:
            load_optimizer_state(gpt, optimizer, ckpt["optimizer"])
        # loading also set the saved settings: the state (moments, step counts) resumes, but the settings are
        # the config's, so that a changed learning rate, weight decay or beta takes effect (OPTIMIZER_SETTINGS)
        for group, settings in zip(optimizer.param_groups, configured):
            group.update(settings)
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
    model = gpt if sharded else rt.compiled(gpt)  # FSDP's blocks are compiled one by one, in shard()
    if world_size > 1 and not sharded:
        # the rotary tables are buffers that never change: not re-sent at every forward
        model = DDP(model, device_ids=[rt.device] if rt.device_type == "cuda" else None, broadcast_buffers=False)
    tokens_per_step = cfg.batch_size * model_config.block_size * cfg.gradient_accumulation_steps
    return Setup(gpt, model, optimizer, scaler, train_data, val_data, eval_batches, test_batches, task_examples,
                 meta, tokenizer, weights_from, tokens_per_step, BackgroundSaver())


def load_batches(cfg, data_dir, meta, model_config):
    """(train data, val data, the fixed evaluation batches of train and val, the test split's or {})."""
    block_size, vocab = model_config.block_size, model_config.vocab_size
    if meta.get("format") == "sft":
        if cfg.val_tokens:
            raise ConfigError("val_tokens measures a token stream, but this dataset holds SFT examples; leave it 0")
        train_data = Examples(data_dir, "train", block_size, vocab, cfg.pack_examples)
        val_data = Examples(data_dir, "val", block_size, vocab)
    else:
        train_data = Windows(data_dir, "train", block_size, vocab)
        val_data = Windows(data_dir, "val", block_size, vocab)
    eval_batches = {"train": train_data.fixed_batches(cfg.eval_iters, cfg.batch_size),
                    "val": (val_data.leading_batches(cfg.val_tokens, cfg.batch_size) if cfg.val_tokens
                            else val_data.fixed_batches(cfg.eval_iters, cfg.batch_size))}
    test_batches = {}
    if has_split(data_dir, "test"):
        test_data = (Examples if meta.get("format") == "sft" else Windows)(data_dir, "test", block_size, vocab)
        test_batches = {"test": test_data.fixed_batches(cfg.eval_iters, cfg.batch_size)}
    return train_data, val_data, eval_batches, test_batches


def shard(gpt, rt):
    """FSDP2: each block's parameters, gradients and optimizer state split across the processes. Under bf16
    the gathered parameters are bf16 (half the bytes to send) while gradients are reduced in fp32. Each
    block is compiled before it is wrapped, so FSDP's hooks fall between compiled regions, not inside one."""
    bf16 = rt.dtype == torch.bfloat16
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in gpt.transformer.h:
        if rt.compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(gpt, mp_policy=policy)


# ---- the training state: what a checkpoint saves besides the weights ----

@dataclass
class TrainingState:
    """Where training stands. A checkpoint saves it with every process's RNG (each draws its own dropout
    masks), and a resume restores both, so that the run goes on as if never stopped."""

    step: int = 0  # optimizer updates done
    data_position: int = 0  # micro-batches drawn over all processes: the sampler's whole state
    best_val_loss: float = float("inf")
    best_step: int | None = None  # the step best.pt holds
    wandb_id: str = field(default_factory=runlog.new_wandb_id)  # a resumed run continues its wandb run
    train_seconds: float = 0.0  # time spent in optimizer steps (evaluations, samples and saves excluded)
    stale_evals: int = 0  # evaluations since the val loss last improved by early_stop_min_delta

    @classmethod
    def start(cls, cfg, ckpt, rank, world_size):
        """A new run's state, or the one `ckpt` saved; this process's RNG seeded, or restored as saved."""
        torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks
        if ckpt is None:
            return cls()
        set_rng_state(restore_rng(ckpt["rng"], rank, world_size))
        return cls(ckpt["step"], ckpt["data_position"], ckpt["best_val_loss"], ckpt["best_step"], ckpt["wandb_id"],
                   ckpt.get("train_seconds", 0.0), ckpt.get("stale_evals", 0))  # (absent in older checkpoints)

    def to_checkpoint(self, world_size):
        """The checkpoint's entries for this state (a collective: every process's RNG is gathered)."""
        return {"step": self.step, "data_position": self.data_position, "best_val_loss": self.best_val_loss,
                "best_step": self.best_step, "rng": gather_rng_states(world_size), "wandb_id": self.wandb_id,
                "train_seconds": self.train_seconds, "stale_evals": self.stale_evals}


# ---- one optimizer step ----

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
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_clip:  # (with no clipping the norm is still logged, and no gradient is rescaled by 1.0)
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
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
    reduce-scatter): only the last of a step's micro-batches needs to, the others just accumulate. FSDP also
    keeps the parameters gathered after those backwards, so the next micro-batch's forward need not regather."""
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)
    return contextlib.nullcontext()


# ---- the divergence guard ----

class Diverged(Exception):
    """Too many consecutive updates skipped for non-finite values."""


@dataclass
class DivergenceGuard:
    """Watches each step's outcome. A skipped update (train_step skips non-finite ones) is logged with clues
    to its cause, and max_skipped_steps of them in a row end the run; an applied update whose loss is over
    loss_spike_factor times the running average is a warning."""

    skipped: int = 0  # consecutive skipped updates
    recent_norms: list = field(default_factory=list)  # gradient norms of the last 100 applied updates
    loss_ema: float | None = None  # running average of the applied updates' losses

    def check(self, cfg, setup, log, step, lr, loss, grad_norm, applied):
        """Raises Diverged (the run record closed) at max_skipped_steps consecutive skips."""
        if not applied:
            self.skipped += 1
            scaler = setup.scaler
            # under fp16 the first steps' overflows are routine: the scaler halves its scale after each
            scale = f", fp16 loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else ""
            log.log({"step": step, "skipped": "non-finite loss or gradient norm", "loss": loss,
                     "grad_norm": grad_norm, "lr": lr, "recent_grad_norms": self.recent_norms[-10:],
                     "nonfinite_grads": nonfinite_gradients(setup.gpt)[:20], "consecutive_skips": self.skipped,
                     "loss_scale": scaler.get_scale() if scaler.is_enabled() else None},
                    f"step {step}: skipped the update: loss {loss}, grad norm {grad_norm} "
                    f"({self.skipped} in a row, limit {cfg.max_skipped_steps}{scale})")
            if self.skipped >= cfg.max_skipped_steps:
                log.finish(step, step * setup.tokens_per_step, "diverged")
                last = checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
                raise Diverged(f"training diverged: {self.skipped} consecutive steps up to step {step} had a "
                               f"non-finite loss or gradient; the last good checkpoint is {last}; lower the "
                               "learning rate or check the data, then resume")
        else:
            self.skipped = 0
            self.recent_norms = [*self.recent_norms[-99:], grad_norm]
            if self.loss_ema is not None and loss > cfg.loss_spike_factor * self.loss_ema:
                log.log({"step": step, "warning": "loss spike", "loss": loss, "running_average": self.loss_ema},
                        f"step {step}: warning: loss {loss:.4f} is over {cfg.loss_spike_factor}x its "
                        f"running average {self.loss_ema:.4f}")
            self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss


def nonfinite_gradients(model):
    """Names of parameters whose gradient (this process's shard of it, under FSDP) holds inf or nan."""
    grads = {name: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    return [name for name, grad in grads.items() if not grad.isfinite().all()]


# ---- the loop's pieces: evaluation, samples, checkpoints, batches, progress, signals ----

@torch.no_grad()
def estimate_loss(model, batches, device, autocast, rank=0, world_size=1):
    """{split: (mean loss, its standard error)} over fixed batches per split, in eval mode (no dropout); the
    standard error is the batch losses' standard deviation over sqrt(batches): the noise in comparing two
    evaluations. Processes share the batches; each runs the same number of forward passes (FSDP gathers
    parameters in every one), the surplus ones counting zero."""
    model.eval()
    losses = {}
    for split, split_batches in batches.items():
        total = torch.zeros(3, device=device)  # sum of losses, of their squares, count
        for i in range(rank, math.ceil(len(split_batches) / world_size) * world_size, world_size):
            x, y = split_batches[min(i, len(split_batches) - 1)]
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            weight = float(i < len(split_batches))
            total += torch.stack([loss.float(), loss.float() ** 2, torch.tensor(1.0, device=device)]) * weight
        if world_size > 1:
            dist.all_reduce(total)
        loss_sum, square_sum, n = total.tolist()
        mean = loss_sum / n
        variance = max(square_sum / n - mean ** 2, 0.0) * n / (n - 1) if n > 1 else 0.0
        losses[split] = mean, math.sqrt(variance / n)
    model.train()
    return losses


def evaluate(cfg, setup, state, log, rt, rank, world_size):
    """Log the losses on the fixed batches; a new best val loss saves best.pt (the weights alone). Counts the
    evaluations without an improvement of early_stop_min_delta, and records reaching target_val_loss."""
    losses = estimate_loss(setup.model, setup.eval_batches, rt.device, rt.autocast(), rank, world_size)
    (train_loss, _), (val, val_se) = losses["train"], losses["val"]
    tokens = state.step * setup.tokens_per_step
    log.log({"step": state.step, "tokens": tokens, "train_seconds": state.train_seconds, "train_loss": train_loss,
             "val_loss": val, "val_loss_se": val_se, "val_ppl": math.exp(min(val, 50.0))},
            f"step {state.step}: eval train {train_loss:.4f}, val {val:.4f} ± {val_se:.4f}")
    if state.step > 0:  # the untrained model is neither a candidate nor a reference
        improved = val < state.best_val_loss - cfg.early_stop_min_delta
        state.stale_evals = 0 if improved else state.stale_evals + 1
    if val < state.best_val_loss and state.step > 0:
        if cfg.target_val_loss and val <= cfg.target_val_loss < state.best_val_loss:
            log.log({"step": state.step, "tokens": tokens, "train_seconds": state.train_seconds,
                     "target_val_loss": cfg.target_val_loss, "reached_target": True},
                    f"step {state.step}: val {val:.4f} reached target_val_loss {cfg.target_val_loss} after "
                    f"{tokens:,} tokens and {state.train_seconds:.1f} s of training steps")
            log.update(target_val_loss=cfg.target_val_loss, target_step=state.step, target_tokens=tokens,
                       target_train_seconds=state.train_seconds)
        state.best_val_loss, state.best_step = val, state.step
        write_checkpoint("best", cfg, setup, state, log, rank, world_size)
    log.evaluated(state.step, tokens, val, state.best_val_loss, state.best_step)
    log.update(final_val_loss_se=val_se, train_seconds=state.train_seconds)


def stop_reason(cfg, state):
    """Why the run should stop now by its rules (target_val_loss, early_stop_patience), or None."""
    if cfg.target_val_loss and state.best_val_loss <= cfg.target_val_loss:
        val, step = state.best_val_loss, state.best_step
        return f"reached target_val_loss {cfg.target_val_loss} (val {val:.4f} at step {step})"
    if cfg.early_stop_patience and state.stale_evals >= cfg.early_stop_patience:
        return (f"early stop: {state.stale_evals} evaluations without improving val loss by more than "
                f"{cfg.early_stop_min_delta}; best at step {state.best_step}")
    return None


def evaluate_on_task(cfg, setup, log, rt, step, rank, world_size):
    """Score the multiple-choice task (eval.py's rule) with the current weights and log its accuracy."""
    result = evaluate_task(setup.gpt, setup.tokenizer, setup.task_examples, rt.device, rt.autocast(),
                           rank, world_size)
    log.log({"step": step, "tokens": step * setup.tokens_per_step, "task_acc": result["acc"],
             "task_acc_norm": result["acc_norm"], "task_n": result["n"]},
            f"step {step}: task {cfg.task_eval}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} "
            f"(n {result['n']})")
    best = max(result["acc_norm"], log.record.get("best_task_acc_norm") or 0.0)
    log.update(task=cfg.task_eval, task_acc=result["acc"], task_acc_norm=result["acc_norm"], best_task_acc_norm=best)


def evaluate_on_test(cfg, setup, log, rt, step, rank, world_size):
    """The test split's loss, once, at the end, with the selected checkpoint's weights (best.pt's, else the
    last's): no decision of the run ever reads it."""
    setup.best_saver.wait()
    best = checkpoint_path(cfg.out_dir, "best", cfg.checkpoint_format)
    model = model_from_checkpoint(load_checkpoint(best)).to(rt.device) if best.exists() else setup.model
    test_loss, test_se = estimate_loss(model, setup.test_batches, rt.device, rt.autocast(), rank, world_size)["test"]
    used = best.name if best.exists() else "the final weights"
    log.log({"step": step, "test_loss": test_loss, "test_loss_se": test_se, "test_checkpoint": used},
            f"test loss {test_loss:.4f} ± {test_se:.4f} ({used}, scored once)")
    log.update(test_loss=test_loss, test_loss_se=test_se, test_checkpoint=used)


def write_sample(cfg, setup, log, rt, step):
    """Log a sample of text. Every process runs it: under FSDP each forward gathers parameters from all."""
    tokenizer = setup.tokenizer
    start = tokenizer.document_start()
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    # eager: compiled blocks (FSDP compiles each) would recompile for every cache position and layer
    with rt.autocast(), torch.compiler.set_stance("force_eager"):
        ids = setup.gpt.generate(torch.tensor([start], device=rt.device), cfg.sample_tokens, temperature=0.8,
                                 top_k=200, vocab_limit=setup.meta["vocab_size"], generator=generator)
    text = tokenizer.decode(ids[0, len(start):].tolist())
    log.log({"step": step, "sample": text}, f"step {step}: sample\n{text}\n")


def write_checkpoint(name, cfg, setup, state, log, rank, world_size):
    """Save `last` (all a resume needs) or `best` (the weights alone; as one file, written off the training
    thread) in checkpoint_format. Every process takes part. The training thread's time is logged as ckpt_s."""
    start = time.perf_counter()
    path, last = checkpoint_path(cfg.out_dir, name, cfg.checkpoint_format), name == "last"
    described = {"weights_from": setup.weights_from, "config": vars(cfg), "model_config": asdict(setup.gpt.config),
                 "meta": setup.meta, **(state.to_checkpoint(world_size) if last else
                                        {"step": state.step, "best_val_loss": state.best_val_loss})}
    if last:
        described["scaler"] = setup.scaler.state_dict() if setup.scaler.is_enabled() else None
    if cfg.checkpoint_format == "sharded":
        save_sharded(path, setup.gpt, setup.optimizer if last else None, described, rank, 1 + cfg.keep_last_k)
    elif last:
        model_state, optimizer_state = full_state(setup.gpt, setup.optimizer)
        if world_size > 1:
            dist.barrier()  # every process has finished the step before its state is written
        if rank == 0:
            save_checkpoint(path, {"model": model_state, "optimizer": optimizer_state, **described})
            if cfg.keep_last_k:
                keep_step_checkpoint(path, state.step, cfg.keep_last_k)
    else:
        weights = full_weights(setup.gpt)  # copied below: the weights train on while the thread writes them
        if rank == 0:
            setup.best_saver.save(path, {"model": {k: t.clone() for k, t in weights.items()}, **described})
    log.log({"step": state.step, "checkpoint": path.name, "ckpt_s": time.perf_counter() - start})


def step_batches(cfg, train_data, first, count, device_type):
    """Training micro-batches first .. first + count - 1: one step's, on the loader thread while the step
    before computes."""
    batches = [train_data.random_batch(cfg.seed, first + micro, cfg.batch_size) for micro in range(count)]
    if device_type == "cuda":  # page-locked host memory lets the copies overlap with compute
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    return batches


def log_progress(cfg, setup, log, state, end_step, lr, loss, grad_norm, dt, wall_dt, peak):
    """A train line: loss, lr, gradient norm, speed and time left. Two throughputs: tok_per_sec over the
    optimizer steps alone (dt a step, and MFU from it, given the processes' peak FLOP/s), wall_tok_per_sec
    over the wall time since the last line (wall_dt a step), evaluations, samples and checkpoints included."""
    step = state.step
    record = {"step": step, "tokens": step * setup.tokens_per_step, "train_loss": loss, "lr": lr,
              "grad_norm": grad_norm, "dt_ms": 1000 * dt, "tok_per_sec": setup.tokens_per_step / dt,
              "wall_tok_per_sec": setup.tokens_per_step / wall_dt, "train_seconds": state.train_seconds}
    if peak:
        record["mfu"] = setup.gpt.flops_per_token(setup.gpt.config.block_size) * record["tok_per_sec"] / peak
    eta = time.strftime("%H:%M:%S", time.gmtime(wall_dt * (end_step - step)))
    log.log(record, f"step {step}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {1000 * dt:.1f} ms | "
                    f"{record['tok_per_sec']:,.0f} tok/s ({record['wall_tok_per_sec']:,.0f} wall) | ETA {eta}")


def catch_stop_signals():
    """The names of the SIGINT/SIGTERM signals received from now on, which no longer end the process: the
    loop stops at its next log line, saving last.pt."""
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
    return received


def stop_requested(stop_signal, device, world_size):
    """Whether any process got SIGINT/SIGTERM; agreed by all so that every process stops at the same step."""
    flag = torch.tensor(float(bool(stop_signal)), device=device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ---- the loop ----

def begin(cfg, setup, state, log, rt, rank, world_size, changed, end_step):
    """Before the first step: a new run (changed is None) evaluates the untrained model, a resumed one notes
    where it resumes and what it changed. Returns the reason a resumed run is already done by its stop rules, or
    None."""
    if changed is not None:
        last = checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
        log.log({"step": state.step, "event": "resumed", "changed": changed},
                f"resumed from {last} at step {state.step}")
        if rank == 0 and changed:
            notes = {**dict.fromkeys(OPTIMIZER_SETTINGS, " (set in the optimizer)"),
                     **dict.fromkeys(EVAL_BATCH_KEYS, " (new val batches)")}
            print("changed on resume: " + ", ".join(f"{key} {old} -> {new}{notes.get(key, '')}"
                                                     for key, (old, new) in changed.items()))
        done = stop_reason(cfg, state)
        if rank == 0 and done:
            print(f"{last} is done: it {done}; to train on, resume with that rule off (set it to 0)")
        elif rank == 0 and state.step >= end_step:
            limit = "--max_iters" if end_step == cfg.max_iters else "--stop_iter (or set it to 0)"
            print(f"{last} is already at step {state.step}; raise {limit} to train further")
        return done
    if rank == 0:
        vocab = setup.gpt.config.vocab_size
        print(f"expected loss at init: ln({vocab}) = {math.log(vocab):.4f}")
    evaluate(cfg, setup, state, log, rt, rank, world_size)
    if cfg.task_eval:
        evaluate_on_task(cfg, setup, log, rt, state.step, rank, world_size)
    return None


def after_step(cfg, setup, state, log, rt, rank, world_size, end_step):
    """The evaluations, sample and save due after this step. Returns the stop rules' reason if one now holds
    (last.pt is then saved at this step), or None."""
    final = state.step == cfg.max_iters  # the schedule's end, not stop_iter: a paused run evaluates as the whole
    if state.step % cfg.eval_interval == 0 or final:
        evaluate(cfg, setup, state, log, rt, rank, world_size)
    if cfg.task_eval and (state.step % (cfg.task_eval_interval or cfg.eval_interval) == 0 or final):
        evaluate_on_task(cfg, setup, log, rt, state.step, rank, world_size)
    if cfg.sample_interval and (state.step % cfg.sample_interval == 0 or final):
        write_sample(cfg, setup, log, rt, state.step)
    reason = stop_reason(cfg, state)
    if reason or state.step % cfg.ckpt_interval == 0 or state.step == end_step:
        write_checkpoint("last", cfg, setup, state, log, rank, world_size)
    if reason and rank == 0:
        print(f"step {state.step}: stopping: {reason}")
    return reason


def train_loop(cfg, setup, state, log, rt, rank, world_size, changed):
    """Optimizer steps from state.step to max_iters (or stop_iter), each followed by after_step's work; a stop
    signal ends it at the next progress line, a stop rule (target, patience) at the evaluation that meets it.
    `changed`: the keys a resume changed (resume_changes), None for a new run."""
    end_step = min(cfg.stop_iter or cfg.max_iters, cfg.max_iters)
    stop_signals = catch_stop_signals()
    done = begin(cfg, setup, state, log, rt, rank, world_size, changed, end_step)
    if done:
        end_step = state.step
    accum = cfg.gradient_accumulation_steps // world_size  # of each step's micro-batches, rank r draws the r-th share
    loader = ThreadPoolExecutor(max_workers=1)
    upcoming = loader.submit(step_batches, cfg, setup.train_data, state.data_position + rank * accum, accum,
                             rt.device_type)
    guard, step_times, compiling = DivergenceGuard(), [], rt.compile
    peak = rt.peak_flops and rt.peak_flops * world_size  # all processes' FLOP/s, for MFU; None where unknown
    end_reason = done or ("finished" if end_step == cfg.max_iters else f"paused at stop_iter {end_step}")
    window = time.perf_counter(), state.step  # the wall clock and step at the last progress line
    while state.step < end_step:
        t0 = time.perf_counter()
        lr = schedule_lr(cfg, state.step)
        batches = upcoming.result()
        state.data_position += cfg.gradient_accumulation_steps
        upcoming = loader.submit(step_batches, cfg, setup.train_data, state.data_position + rank * accum, accum,
                                 rt.device_type)
        batches = [(x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)) for x, y in batches]
        loss, grad_norm, applied = train_step(setup.model, setup.optimizer, setup.scaler, rt.autocast(), batches,
                                              lr, cfg.grad_clip)
        state.step += 1
        elapsed = time.perf_counter() - t0
        state.train_seconds += elapsed
        if compiling:  # the first step traces and compiles the model: reported apart from the step times
            compiling = False
            log.log({"step": state.step, "compile_s": elapsed},
                    f"step {state.step}: {elapsed:.1f}s, compiling the model")
        else:
            step_times.append(elapsed)
        guard.check(cfg, setup, log, state.step, lr, loss, grad_norm, applied)

        if state.step % cfg.log_interval == 0 or state.step == end_step:
            dt = sum(step_times) / len(step_times) if step_times else elapsed
            wall_dt = (time.perf_counter() - window[0]) / (state.step - window[1])
            step_times.clear()
            window = time.perf_counter(), state.step
            log_progress(cfg, setup, log, state, end_step, lr, loss, grad_norm, dt, wall_dt, peak)
            if stop_requested(stop_signals, rt.device, world_size):
                signal_name = stop_signals[0] if stop_signals else "a signal to another process"
                if rank == 0:
                    print(f"stopping at step {state.step} on {signal_name}; saving the last checkpoint")
                write_checkpoint("last", cfg, setup, state, log, rank, world_size)
                end_reason = f"stopped by {signal_name}"
                break
        reason = after_step(cfg, setup, state, log, rt, rank, world_size, end_step)
        if reason:
            end_reason = reason
            break
    loader.shutdown(cancel_futures=True)
    setup.best_saver.wait()
    if setup.test_batches and not done and (end_reason == "finished" or stop_reason(cfg, state)):
        evaluate_on_test(cfg, setup, log, rt, state.step, rank, world_size)
    log.finish(state.step, state.step * setup.tokens_per_step, end_reason)


# ---- processes ----

def train(cfg):
    """Train as the config says: alone, or as one of torchrun's processes (torchrun sets RANK and the rest)."""
    distributed = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    check_config(cfg, world_size)
    rt = runtime(cfg, local_rank, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if rt.device_type == "cuda":  # also for --device=cuda:N alone: its RNG state is the one saved and restored
        torch.cuda.set_device(rt.device)
    if distributed:
        backend, note = process_group_backend(rt.device_type)
        if note and rank == 0:
            print(f"note: {note}")
        dist.init_process_group(backend=backend)
    lock = None
    try:
        if rank == 0:  # one run per folder, taken before anything reads or writes it
            lock = runlog.RunFolderLock(cfg.out_dir)
        ckpt = checkpoint_to_resume(Path(cfg.out_dir), cfg.init_from == "resume")
        if ckpt is None and rank == 0:
            runlog.check_fresh_folder(cfg.out_dir)
        changed = resume_changes(cfg, ckpt) if ckpt else None
        setup = set_up(cfg, ckpt, rt, rank, local_rank, world_size)
        state = TrainingState.start(cfg, ckpt, rank, world_size)
        log = runlog.RunLog(cfg.out_dir, rank == 0)  # the first write of the run: everything is checked by now
        try:
            log.start(cfg, setup.meta, rt.device, rt.dtype, world_size, ckpt["step"] if ckpt else None,
                      state.wandb_id, changed)
            if rank == 0:
                runlog.describe(cfg, setup, rt, world_size)
                if leaked := leaked_documents(setup.meta):
                    print(f"warning: {leaked:,} val/test {setup.meta['leakage']['unit']}s of {cfg.dataset} also "
                          "occur verbatim in train (meta.json's leakage audit); held-out losses will flatter the model")
            train_loop(cfg, setup, state, log, rt, rank, world_size, changed)
        except runlog.WriteError as e:
            raise runlog.WriteError(end_on_write_failure(e, cfg, setup, state, log)) from None
    finally:
        if lock is not None:
            lock.release()
        if distributed:
            dist.destroy_process_group()


def end_on_write_failure(error, cfg, setup, state, log):
    """The line a failed write (a full disk, a read-only folder, a file size limit) ends the run with, once
    best.pt's writer has finished (removing its temporary file if it failed too) and run.json says why, if it
    can still be written."""
    with contextlib.suppress(runlog.WriteError):
        setup.best_saver.wait()
    try:
        log.finish(state.step, state.step * setup.tokens_per_step, f"write failed: {error}")
        recorded = "run.json records why"
    except runlog.WriteError:
        recorded = "run.json could not be written either, so it still says running"
    last = checkpoint_path(cfg.out_dir, "last", cfg.checkpoint_format)
    kept = (f"{last} is the last good checkpoint; make room and resume with --init_from=resume" if last.exists() else
            "no checkpoint was saved; make room, remove log.jsonl and run.json and start again")
    return f"{error}; the run stopped at step {state.step}, {recorded}; {kept}"


def main(argv=None):
    # over a file size limit (ulimit -f) a write then fails with EFBIG, which the run reports, instead of the
    # signal killing the process mid-write
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        train(load_config(__file__, sys.argv[1:] if argv is None else argv, RuntimeConfig, GPTConfig))
    except (ConfigError, DataError, CheckpointError, runlog.RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Diverged, runlog.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
