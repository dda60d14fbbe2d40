"""The config's checks: every key's range and how keys go together (check_config, before anything is read or
written), and on resume what the checkpoint fixes and what may change: each key in one class, every change said."""

import importlib
from pathlib import Path

import torch

from configurator import ConfigError
from data import DataError, data_differences, describe_data
from hf import HUB_REPOS
from model import architecture_options, check_options


def check_config(cfg, world_size):
    """ConfigError for the first key out of its range or at odds with another; nothing is read or written yet."""
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "max_iters", "learning_rate",
                "muon_lr", "sample_tokens", "max_skipped_steps"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    check_schedule(cfg)
    if cfg.seed < 0:  # numpy's generators take no negative seed: found now, not at the first batch
        raise ConfigError(f"seed must be 0 or more, got {cfg.seed}")
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
    if cfg.sample_temperature < 0:
        raise ConfigError(f"sample_temperature must be 0 (greedy) or more, got {cfg.sample_temperature}")
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


def check_precision(cfg, rt, world_size):
    """ConfigError for a precision the run's parallelism cannot train in, once the runtime has picked it."""
    if rt.dtype == torch.float16 and cfg.parallel == "fsdp" and world_size > 1:
        raise ConfigError("--parallel=fsdp in float16 would give each process a gradient scaler that sees only its "
                          "own shard's overflows, so their loss scales drift apart and the gradients go wrong; use "
                          "--dtype=bfloat16 or float32, or --parallel=ddp")


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
# On resume each config key is compared with the checkpoint's config, and every change is said at start and kept in
# run.json's changed_on_resume. A key in none of the classes below is fixed: a change is refused. Those are the
# model's shape and options, the LoRA keys and the optimizer (the saved weights and optimizer state are of their
# shape), and any new key until it is declared here: the safe class. No key is in two (tests/test_robustness.py).
OPTIMIZER_SETTINGS = (  # set in the resumed optimizer's param groups (its moments are kept), as a new run would
    "learning_rate", "weight_decay", "beta1", "beta2", "muon_lr", "muon_split", "embedding_lr", "head_lr")
EVAL_BATCH_KEYS = (  # they make the fixed val batches that choose best.pt: refused without allow_new_eval_batches
    "batch_size", "eval_iters", "val_tokens")
CHANGEABLE = (  # read afresh as the run goes on: the schedule, regularisation, intervals, stop rules, records,
    # devices, and where the run and its data are (the data's identity is checked against the checkpoint's meta)
    "out_dir", "data_root", "dataset", "seed", "gradient_accumulation_steps", "dropout", "min_lr", "max_iters",
    "warmup_iters", "lr_decay_iters", "lr_schedule", "cooldown_frac", "grad_clip", "eval_interval", "log_interval",
    "ckpt_interval", "sample_interval", "sample_tokens", "sample_temperature", "stop_iter", "target_val_loss",
    "early_stop_patience", "early_stop_min_delta", "task_eval", "task_eval_interval", "task_eval_examples", "parallel",
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
    fixed = [key for key in changed if key not in OPTIMIZER_SETTINGS + EVAL_BATCH_KEYS + CHANGEABLE]
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


def describe_resume(last, changed, done, step, end_step, max_iters):
    """The console lines of a resume at `step` from `last`: what it changed, and why it will not train
    (`done`, a stop rule's reason; or end_step already reached)."""
    if changed:
        notes = {**dict.fromkeys(OPTIMIZER_SETTINGS, " (set in the optimizer)"),
                 **dict.fromkeys(EVAL_BATCH_KEYS, " (new val batches)")}
        print("changed on resume: " + ", ".join(f"{key} {old} -> {new}{notes.get(key, '')}"
                                                 for key, (old, new) in changed.items()))
    if done:
        print(f"{last} is done: it {done}; to train on, resume with that rule off (set it to 0)")
    elif step >= end_step:
        limit = "--max_iters" if end_step == max_iters else "--stop_iter (or set it to 0)"
        print(f"{last} is already at step {step}; raise {limit} to train further")


def check_same_data(ckpt, meta, data_dir):
    """A resume reads the data its checkpoint was trained on: not another dataset, nor another preparation."""
    differ = data_differences(ckpt["meta"], meta)
    if differ:
        raise DataError(f"{ckpt['path']} was trained on {describe_data(ckpt['meta'])}, but {data_dir} holds "
                        f"{describe_data(meta)}: they differ in {', '.join(differ)}; resume on the data the run "
                        "was trained on (--data_root, --dataset), or start a new run in another --out_dir")
