"""Where a run starts from, for train.py's set_up: the data it reads (the embedded default prepared
on first use), the architecture and first weights (the config's, GPT-2's or a resumed checkpoint's),
the fixed evaluation batches, and the optimizer and loss-scaler state a resume restores."""

from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from checkpoint import (
    lineage,
    load_checkpoint,
    load_optimizer_state,
    load_sharded_state,
    model_from_checkpoint,
    parent_checkpoint,
    saved_config,
)
from configurator import ConfigError
from data import (
    DataError,
    Examples,
    Windows,
    describe_tokenizer,
    has_split,
    prepare_default,
    read_meta,
    tokenizer_identity,
)
from devices import is_out_of_memory
from hf import WeightsError, load_hf, weights_meta
from lora import merge_lora
from model import GPTConfig, architecture_options


def load_data(cfg, local_rank, world_size):
    """The dataset's folder and meta, preparing the embedded default on first use (by one process
    per machine while the others wait; if it fails every process stops with its error)."""
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


def architecture(cfg, meta, weights_from, ckpt, declared):
    """(GPTConfig, first weights (a state dict) or None, parent). A resume keeps the checkpoint's
    architecture (resume_changes has refused a config asking for another) and parent; from scratch
    the config's keys decide; from another run's checkpoint (parent_checkpoint) or GPT-2 weights,
    theirs do, the position table cropped to block_size, and a shape key or option set to another
    value (than its default, `declared`) is refused. Dropout and the LoRA keys always come from the
    config."""
    tuning = {"dropout": cfg.dropout, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "lora_targets": cfg.lora_targets}
    if ckpt is not None:
        return replace(saved_config(ckpt["model_config"]), **tuning), None, ckpt.get("parent")
    if weights_from == "scratch":
        vocab = cfg.vocab_size or meta["vocab_size"]
        if vocab < meta["vocab_size"]:
            raise ConfigError(f"vocab_size {vocab} is smaller than the dataset's "
                              f"{meta['vocab_size']}; use 0 or more")
        options = {option: getattr(cfg, option) for option in architecture_options()}
        return GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, bias=cfg.bias, **options,
                         **tuning), None, None
    pretrained, parent = first_weights(cfg, meta, weights_from)
    check_architecture_kept(cfg, pretrained.config, declared, weights_from)
    if cfg.block_size > pretrained.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the "
                          f"{pretrained.config.block_size} positions of {weights_from}; "
                          f"use --block_size={pretrained.config.block_size} or less")
    state = pretrained.state_dict()
    if "transformer.wpe.weight" in state:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.block_size]
    return replace(pretrained.config, block_size=cfg.block_size, **tuning), state, parent


def first_weights(cfg, meta, weights_from):
    """(the model a new run starts from, its lineage or None): another run's checkpoint, its LoRA
    adapters merged into the weights (the new run gets its own), on data of the same tokenizer; or a
    Hugging Face model's weights, on data of the tokenizer hf.weights_meta names."""
    path = parent_checkpoint(weights_from)
    if path is not None:
        parent = load_checkpoint(path)
        check_same_tokenizer(parent["meta"], meta, path, cfg.dataset)
        return merge_lora(model_from_checkpoint(parent)), lineage(path, parent)
    try:
        check_same_tokenizer(weights_meta(weights_from), meta, weights_from, cfg.dataset)
        return load_hf(weights_from, dropout=cfg.dropout), None
    except WeightsError as e:
        raise ConfigError(str(e)) from None


def check_same_tokenizer(parent_meta, meta, path, dataset):
    if tokenizer_identity(parent_meta) != tokenizer_identity(meta):
        raise DataError(f"{path} was trained on {describe_tokenizer(parent_meta)}, but {dataset} "
                        f"holds {describe_tokenizer(meta)}, whose ids mean other tokens; "
                        f"prepare the data with that tokenizer (prepare.py --tokenizer "
                        f"{parent_meta['tokenizer']}), "
                        "or start from scratch")


def check_architecture_kept(cfg, config, declared, source):
    """ConfigError where the config sets a shape key or architecture option (to another value than
    its default) that the weights from `source` have otherwise."""
    keys = ("n_layer", "n_head", "n_embd", "bias", "vocab_size", *architecture_options())
    asked = [key for key in keys if getattr(cfg, key) != declared[key].default
             and getattr(cfg, key) != getattr(config, key)]
    if asked:
        kept = ", ".join(f"{k}={getattr(config, k)}" for k in asked)
        wanted = ", ".join(f"{k}={getattr(cfg, k)}" for k in asked)
        raise ConfigError(f"{source} fixes the architecture ({kept}), but the config asks for "
                          f"{wanted}; leave {', '.join(asked)} unset to take the weights' own, or "
                          "start from scratch")


def load_batches(cfg, data_dir, meta, model_config, device, rank=0, world_size=1):
    """(train data, val data, the fixed evaluation batches of train and val, the test split's or
    {}); of the fixed batches, this process's share is on the device."""
    block_size, vocab, sft = (model_config.block_size, model_config.vocab_size,
                              meta.get("format") == "sft")
    if sft and cfg.val_tokens:
        raise ConfigError("val_tokens measures a token stream, but this dataset holds SFT "
                          "examples; leave it 0")

    def split(name, packed=False):
        if sft:
            return Examples(data_dir, name, block_size, vocab, packed)
        return Windows(data_dir, name, block_size, vocab)

    train_data, val_data = split("train", cfg.pack_examples), split("val")
    try:
        eval_batches = {"train": train_data.fixed_batches(cfg.eval_iters, cfg.batch_size),
                        "val": (val_data.leading_batches(cfg.val_tokens, cfg.batch_size)
                                if cfg.val_tokens
                                else val_data.fixed_batches(cfg.eval_iters, cfg.batch_size))}
        test_batches = ({"test": split("test").fixed_batches(cfg.eval_iters, cfg.batch_size)}
                        if has_split(data_dir, "test") else {})
        if isinstance(val_data, Windows):
            val_data.close()  # its batches are drawn: only train's shards are read from now on
        eval_batches, test_batches = (own_share_on_device(held, device, rank, world_size)
                                      for held in (eval_batches, test_batches))
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise ConfigError(f"the fixed evaluation batches ({cfg.eval_iters} x {cfg.batch_size} "
                          f"rows of {block_size} tokens per split, or val_tokens {cfg.val_tokens}) "
                          "do not fit in memory; lower --batch_size, --eval_iters or "
                          "--val_tokens") from None
    return train_data, val_data, eval_batches, test_batches


def own_share_on_device(batches, device, rank, world_size):
    """{split: fixed batches} with this process's share (the ones estimate_loss reads here: every
    world_size-th from rank) moved to the device once, so that each evaluation reads them there,
    with no copies from pageable memory."""
    return {split: [(x.to(device), y.to(device)) if i % world_size == rank else (x, y)
                    for i, (x, y) in enumerate(held)]
            for split, held in batches.items()}


def restore_optimizer(ckpt, gpt, optimizer, scaler):
    """Load a resumed run's optimizer state (moments, step counts) and loss scale. Loading also sets
    the saved settings, so the config's are put back: a changed learning rate, weight decay or beta
    takes effect (checks.OPTIMIZER_SETTINGS)."""
    configured = [{k: v for k, v in group.items() if k != "params"}
                  for group in optimizer.param_groups]
    if ckpt.get("sharded"):  # read as the model now is: sharded or whole, any number of processes
        load_sharded_state(ckpt["sharded"], gpt, optimizer)
    else:
        load_optimizer_state(gpt, optimizer, ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
