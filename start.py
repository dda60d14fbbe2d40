"""Where a run starts from, for train.py's set_up: the data it reads (the embedded default prepared on first
use), the architecture and first weights (the config's, GPT-2's, or a resumed checkpoint's), the fixed
evaluation batches, and the optimizer and loss-scaler state a resume restores."""

from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from checkpoint import load_optimizer_state, load_sharded_state, saved_config
from configurator import ConfigError
from data import DataError, Examples, Windows, has_split, is_gpt2_bpe, prepare_default, read_meta
from devices import is_out_of_memory
from hf import WeightsError, load_gpt2
from model import GPTConfig, architecture_options


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


def architecture(cfg, meta, weights_from, ckpt):
    """(GPTConfig, pretrained state dict or None). A resume keeps the checkpoint's (resume_changes has
    refused a config asking for another); from scratch the config's keys decide; with GPT-2 weights their
    config.json does, the position table cropped to block_size. Dropout and the LoRA keys always come from
    the config."""
    tuning = {"dropout": cfg.dropout, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "lora_targets": cfg.lora_targets}
    if ckpt is not None:
        return replace(saved_config(ckpt["model_config"]), **tuning), None
    if weights_from == "scratch":
        vocab = cfg.vocab_size or meta["vocab_size"]
        if vocab < meta["vocab_size"]:
            raise ConfigError(f"vocab_size {vocab} is smaller than the dataset's {meta['vocab_size']}; "
                              "use 0 or more")
        options = {option: getattr(cfg, option) for option in architecture_options()}
        return GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, bias=cfg.bias, **options, **tuning), None
    if not is_gpt2_bpe(meta):
        raise ConfigError(f"GPT-2 weights read GPT-2 BPE tokens, but {cfg.dataset} holds {meta['tokenizer']} "
                          "tokens; prepare the data with --tokenizer gpt2")
    try:
        pretrained = load_gpt2(weights_from, dropout=cfg.dropout)
    except WeightsError as e:
        raise ConfigError(str(e)) from None
    if cfg.block_size > pretrained.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the {pretrained.config.block_size} positions "
                          f"of {weights_from}; use --block_size={pretrained.config.block_size} or less")
    state = pretrained.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.block_size]
    return replace(pretrained.config, block_size=cfg.block_size, **tuning), state


def load_batches(cfg, data_dir, meta, model_config, device, rank=0, world_size=1):
    """(train data, val data, the fixed evaluation batches of train and val, the test split's or {}); of the
    fixed batches, this process's share is on the device."""
    block_size, vocab, sft = model_config.block_size, model_config.vocab_size, meta.get("format") == "sft"
    if sft and cfg.val_tokens:
        raise ConfigError("val_tokens measures a token stream, but this dataset holds SFT examples; leave it 0")

    def split(name, packed=False):
        if sft:
            return Examples(data_dir, name, block_size, vocab, packed)
        return Windows(data_dir, name, block_size, vocab)

    train_data, val_data = split("train", cfg.pack_examples), split("val")
    try:
        eval_batches = {"train": train_data.fixed_batches(cfg.eval_iters, cfg.batch_size),
                        "val": (val_data.leading_batches(cfg.val_tokens, cfg.batch_size) if cfg.val_tokens
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
        raise ConfigError(f"the fixed evaluation batches ({cfg.eval_iters} x {cfg.batch_size} rows of "
                          f"{block_size} tokens per split, or val_tokens {cfg.val_tokens}) do not fit in "
                          "memory; lower --batch_size, --eval_iters or --val_tokens") from None
    return train_data, val_data, eval_batches, test_batches


def own_share_on_device(batches, device, rank, world_size):
    """{split: fixed batches} with this process's share (the ones estimate_loss reads here: every
    world_size-th from rank) moved to the device once, so that each evaluation reads them there, with no
    copies from pageable memory."""
    return {split: [(x.to(device), y.to(device)) if i % world_size == rank else (x, y)
                    for i, (x, y) in enumerate(held)]
            for split, held in batches.items()}


def restore_optimizer(ckpt, gpt, optimizer, scaler):
    """Load a resumed run's optimizer state (moments, step counts) and loss scale. Loading also sets the saved
    settings, so the config's are put back: a changed learning rate, weight decay or beta takes effect
    (checks.OPTIMIZER_SETTINGS)."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if ckpt.get("sharded"):  # read as the model now is: sharded or whole, on any number of processes
        load_sharded_state(ckpt["sharded"], gpt, optimizer)
    else:
        load_optimizer_state(gpt, optimizer, ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
