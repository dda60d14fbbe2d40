"""Sample text from a trained run: `python sample.py [--out_dir=out] [--start="Once"] [--key=value ...]`.

The tokenizer is rebuilt from the meta stored in the checkpoint, so no data folder is needed.
"""

from pathlib import Path

import torch

import data
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, saved_checkpoint
from configurator import ConfigError, run_main
from devices import DeviceConfig, runtime
from hf import WeightsError, load_adapters, load_gpt2
from lora import merge_lora

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
out_dir = "out"  # run folder to sample from (train.py's default run)
ckpt = "best"  # which checkpoint: best (lowest val loss) or last {best|last}
init_from = ""  # instead of a run: GPT-2 weights, gpt2 ... gpt2-xl or a Hugging Face folder (e.g. from export.py)
adapters = ""  # LoRA adapters to apply to the init_from weights: a folder from export.py --adapters_only
start = ""  # prompt text (in bash $'...\n' writes a newline) or FILE:path to read it from; empty starts a new document
num_samples = 3  # independent samples to print {> 0}
max_new_tokens = 500  # tokens generated per sample {> 0}
temperature = 0.8  # below 1 sharpens, above 1 flattens the distribution; 0 is greedy {>= 0}
top_k = 200  # sample only among the k most likely tokens; 0 keeps all {>= 0}
top_p = 1.0  # nucleus sampling: keep the fewest likeliest tokens holding this much probability {(0, 1]}
stop_at_eot = True  # end a sample at the first end-of-text token it generates (where its document ends)
seed = 1337  # makes the samples reproducible
# device and dtype are devices.DeviceConfig's keys (--help lists them last)
# ---- end of config ----


def prompt(tokenizer, start):
    """(prompt text, its token ids). The ids open a new document, as every document in the training data
    (and every fine-tuning example) was opened: with the end-of-text token where the tokenizer has one; an
    empty prompt without one is a newline."""
    text = start
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        if not path.is_file():
            raise ConfigError(f"prompt file {path} does not exist; give --start=FILE:path to an existing file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"prompt file {path} cannot be read as UTF-8 text ({type(e).__name__}); give "
                              "--start=FILE:path to a text file") from None
    if tokenizer.eot_id is None:
        return text, tokenizer.encode(text) if text else tokenizer.document_start()
    return text, tokenizer.document_start() + tokenizer.encode(text)


GPT2_META = {"tokenizer": "gpt2", "encoding": "r50k_base", "vocab_size": 50257, "eot_id": 50256}


def load_model(cfg):
    """(model, tokenizer meta) from GPT-2 weights (plus adapters) if init_from is set, else from a run's
    checkpoint. LoRA adapters come merged into the weights: the same tokens, faster."""
    if cfg.adapters and not cfg.init_from:
        raise ConfigError("--adapters apply to base weights: name them with --init_from (e.g. gpt2)")
    if cfg.init_from:
        folder = Path(cfg.init_from)
        meta = data.read_meta(folder) if (folder / "meta.json").is_file() else GPT2_META
        try:
            model = load_gpt2(cfg.init_from)
            return (merge_lora(load_adapters(model, cfg.adapters)) if cfg.adapters else model), meta
        except WeightsError as e:
            raise ConfigError(str(e)) from None
    state = load_checkpoint(saved_checkpoint(cfg.out_dir, cfg.ckpt))
    model = model_from_checkpoint(state)
    return (merge_lora(model) if model.config.lora_rank else model), state["meta"]


def sample(cfg):
    rt = runtime(cfg)
    model, meta = load_model(cfg)
    model = model.to(rt.device).eval()
    tokenizer = data.get_tokenizer(meta)
    text, ids = prompt(tokenizer, cfg.start)
    if not ids:
        raise ConfigError("the prompt encodes to no tokens; give a longer --start")
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    x = torch.tensor([ids], device=rt.device).repeat(cfg.num_samples, 1)
    with rt.autocast():
        out = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             top_p=cfg.top_p, vocab_limit=meta["vocab_size"], generator=generator)
    for row in out[:, len(ids):].tolist():
        if cfg.stop_at_eot and tokenizer.eot_id in row:
            row = row[:row.index(tokenizer.eot_id)]
        print(text + tokenizer.decode(row))
        print("---------------")


def main(argv=None):
    run_main(sample, __file__, argv, DeviceConfig, errors=(CheckpointError, data.DataError))


if __name__ == "__main__":
    main()
