"""The config's checks: how keys go together (check_config, before anything is read or written;
each key's own range is its tag's, which load_config checks), and on resume what the checkpoint
fixes and what may change: each key in the resume class its tag declares, every change said."""

import importlib
from pathlib import Path

import torch

from configurator import ConfigError
from data import DataError, data_differences, describe_data
from hf import HUB_REPOS
from model import GPT2_OPTIONS, check_options


def check_model_options(cfg):
    """GPTConfig's own checks of the config's model keys (model.check_options), as a ConfigError:
    what their tags cannot say, such as heads that split n_embd evenly."""
    try:
        check_options(vars(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_config(cfg, world_size):
    """ConfigError for the first key at odds with another; nothing is read or written yet."""
    check_schedule(cfg)
    if cfg.val_tokens % (cfg.batch_size * cfg.block_size):
        raise ConfigError(f"val_tokens {cfg.val_tokens} must be 0 or a multiple of batch_size x "
                          f"block_size ({cfg.batch_size * cfg.block_size}), so that every val "
                          "batch is whole")
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be "
                          f"divisible by the {world_size} processes")
    if world_size > 1 and cfg.device.startswith("cuda:"):
        raise ConfigError(f"device {cfg.device} would put every process on one GPU; under torchrun "
                          "use --device=cuda (each process takes cuda:LOCAL_RANK) and "
                          "CUDA_VISIBLE_DEVICES to pick GPUs")
    if cfg.init_from not in ("scratch", "resume", *HUB_REPOS) and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from {cfg.init_from} is neither scratch, resume, one of "
                          f"{', '.join(HUB_REPOS)} nor an existing run folder, checkpoint or "
                          "folder in the Hugging Face layout (config.json plus model.safetensors)")
    if cfg.task_eval and cfg.parallel == "fsdp" and world_size > 1:
        raise ConfigError("task_eval scores with whole weights in every process, which FSDP does "
                          "not keep; use --parallel=ddp, or score checkpoints afterwards with "
                          "eval.py")
    check_model_options(cfg)
    if not set(cfg.lora_targets.split(",")) <= {"attn", "mlp"}:
        raise ConfigError(f"lora_targets must be attn, mlp or attn,mlp, got {cfg.lora_targets!r}")
    if cfg.wandb_log:  # checked by every process, so that all of them stop
        try:
            importlib.import_module("wandb")
        except ImportError:
            raise ConfigError("wandb_log=True needs the wandb package: pip install wandb") from None


def check_precision(cfg, rt, world_size):
    """ConfigError for the runtime's precision where the run's parallelism cannot train in it."""
    if rt.dtype == torch.float16 and cfg.parallel == "fsdp" and world_size > 1:
        raise ConfigError("--parallel=fsdp in float16 would give each process a gradient scaler "
                          "that sees only its own shard's overflows, so their loss scales drift "
                          "apart and the gradients go wrong; use --dtype=bfloat16 or float32, or "
                          "--parallel=ddp")


def check_schedule(cfg):
    """A schedule whose phases come in order: warmup, decay to a floor below the peak, end."""
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"min_lr must be between 0 and learning_rate {cfg.learning_rate} (the "
                          f"floor the decay ends at), got {cfg.min_lr}")
    if cfg.warmup_iters > cfg.max_iters:
        raise ConfigError(f"warmup_iters {cfg.warmup_iters} is more than max_iters "
                          f"{cfg.max_iters}: the run would end still warming up; lower "
                          "--warmup_iters")
    if cfg.lr_decay_iters and cfg.lr_decay_iters < cfg.warmup_iters:
        raise ConfigError(f"lr_decay_iters {cfg.lr_decay_iters} ends the decay before warmup_iters "
                          f"{cfg.warmup_iters} ends the warmup; raise it (or set 0: decay until "
                          "max_iters)")


# ---- resume: what the checkpoint fixes and what may change ----
# On resume each config key is compared with the checkpoint's config, and every change is said at
# start and kept in run.json's changed_on_resume. What a change may do is the key's resume class,
# declared in its tag (configurator.RESUME_CLASSES): a key with none is fixed, a change refused.
# Fixed are the model's shape and options, the LoRA keys and the optimizer (the saved weights and
# optimizer state are of their shape), and any new key until its line declares a class: the safe
# default.
# what describe_changes says beside a change of each class
NOTES = {"optimizer": " (set in the optimizer)", "val batches": " (new val batches)"}
# what a checkpoint older than these keys ran with: its model had GPT-2's options, its val the
# random windows, its Muon whole matrices
BEFORE_THE_KEY = {**GPT2_OPTIONS, "val_tokens": 0, "muon_split": "whole"}


def resume_changes(cfg, ckpt, declared):
    """{key: [checkpoint's value, config's value]} for each key this resume changes; ConfigError for
    a change the checkpoint cannot follow, by its key's resume class (`declared`: configurator.Key).
    A key the checkpoint's config lacks (older than the key) is compared with BEFORE_THE_KEY's value
    where it has one, else not at all; Muon's settings are not compared for an AdamW run."""
    saved = {**BEFORE_THE_KEY, **ckpt["config"]}
    unused = ("muon_lr", "muon_split") if cfg.optimizer != "muon" else ()  # Muon's, unused by AdamW
    classes = {key: declared[key].resume if key in declared else "fixed" for key in vars(cfg)}
    changed = {key: [saved[key], value] for key, value in vars(cfg).items() if key in saved
               and key not in unused and classes[key] != "control" and saved[key] != value}
    fixed = [key for key in changed if classes[key] == "fixed"]
    if fixed:
        raise ConfigError(f"{ckpt['path']} was trained with "
                          f"{', '.join(f'{k}={changed[k][0]}' for k in fixed)}, which a resume "
                          "cannot change (the config asks for "
                          f"{', '.join(f'{k}={changed[k][1]}' for k in fixed)}); resume with the "
                          "run's own values (run.json's config), or start a new run in another "
                          "--out_dir")
    batches = [key for key in changed if classes[key] == "val batches"]
    if batches and not cfg.allow_new_eval_batches:
        raise ConfigError(f"{', '.join(f'{k} {changed[k][0]} -> {changed[k][1]}' for k in batches)}"
                          " would change the fixed val batches, so best.pt's selection would "
                          "compare val losses measured on different batches; resume with "
                          f"{', '.join(f'--{k}={changed[k][0]}' for k in batches)}, or pass "
                          "--allow_new_eval_batches=True to accept that")
    return changed


def describe_changes(changed, declared):
    """The console line of what a resume changed."""
    print("changed on resume: " + ", ".join(
        f"{key} {old} -> {new}{NOTES.get(declared[key].resume, '')}"
        for key, (old, new) in changed.items()))


def describe_resume(last, done, step, end_step, max_iters):
    """The console line of a resume at `step` from `last` that will not train: why (`done`, a stop
    rule's reason; or end_step already reached)."""
    if done:
        print(f"{last} is done: it {done}; to train on, resume with that rule off (set it to 0)")
    elif step >= end_step:
        limit = "--max_iters" if end_step == max_iters else "--stop_iter (or set it to 0)"
        print(f"{last} is already at step {step}; raise {limit} to train further")


def check_same_data(ckpt, meta, data_dir):
    """A resume reads its checkpoint's training data: not another dataset nor preparation."""
    differ = data_differences(ckpt["meta"], meta)
    if differ:
        raise DataError(f"{ckpt['path']} was trained on {describe_data(ckpt['meta'])}, but "
                        f"{data_dir} holds {describe_data(meta)}: they differ in "
                        f"{', '.join(differ)}; resume on the data the run was trained on "
                        "(--data_root, --dataset), or start a new run in another --out_dir")
