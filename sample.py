"""Sample text from a trained run:
`python sample.py [--out_dir=out] [--start="Once"] [--key=value ...]`, or talk to a fine-tuned
one: `python sample.py --out_dir=out-sft --chat` (turns read from the console, or from a file:
`python sample.py --chat < turns.txt`, one user turn per line).

The tokenizer is rebuilt from the meta stored in the checkpoint (or beside Hugging Face weights or
LoRA adapters), so no data folder is needed. Text streams to the console as it is sampled
(engine.py).
"""

import os
import sys
from pathlib import Path

import torch

import data
from checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    parent_checkpoint,
    saved_checkpoint,
)
from configurator import ConfigError, run_main
from devices import DeviceConfig, runtime
from engine import Session, Streamer, stream
from hf import WeightsError, load_adapters, load_hf, weights_meta
from lora import merge_lora

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
out_dir = "out"  # run folder to sample from (train.py's default run)
ckpt = "best"  # which checkpoint: best (lowest val loss) or last {best|last}
init_from = ""  # weights: gpt2 ... gpt2-xl, a Hugging Face folder, or a run folder or checkpoint
adapters = ""  # LoRA adapters for the init_from weights: a folder from export.py --adapters_only
start = ""  # prompt text (in bash $'...\n' writes a newline) or FILE:path; empty: a new document
num_samples = 3  # independent samples to print {> 0}
max_new_tokens = 500  # tokens generated per sample {> 0}
temperature = 0.8  # below 1 sharpens, above 1 flattens the distribution; 0 is greedy {>= 0}
top_k = 200  # sample only among the k most likely tokens; 0 keeps all {>= 0}
top_p = 1.0  # nucleus: keep the fewest likeliest tokens holding this much probability {(0, 1]}
stop_at_eot = True  # end a sample at the first end-of-text token it generates (its document's end)
stop = ""  # also end a sample where it writes this text (several: separated by |), not shown
chat = False  # talk to a model fine-tuned on prepare.py sft's template: each input line a user turn
seed = 1337  # makes the samples reproducible
# device and dtype are devices.DeviceConfig's keys (--help lists them last)
# ---- end of config ----


def prompt(tokenizer, start):
    """(prompt text, its token ids). The ids open a new document, as every document in the training
    data (and every fine-tuning example) was opened: with the end-of-text token where the tokenizer
    has one; an empty prompt without one is a newline."""
    text = start
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        if not path.is_file():
            raise ConfigError(f"prompt file {path} does not exist; give --start=FILE:path to an "
                              "existing file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"prompt file {path} cannot be read as UTF-8 text "
                              f"({type(e).__name__}); give --start=FILE:path "
                              "to a text file") from None
    if tokenizer.eot_id is None:
        return text, tokenizer.encode(text) if text else tokenizer.document_start()
    return text, tokenizer.document_start() + tokenizer.encode(text)


def load_model(cfg):
    """(model, tokenizer meta): init_from's weights (plus adapters, with their fine-tune's meta) if
    set, else out_dir's run's. LoRA adapters come merged into the weights: the same tokens,
    faster."""
    if cfg.adapters and not cfg.init_from:
        raise ConfigError("--adapters apply to base weights: name them with --init_from "
                          "(e.g. gpt2)")
    try:
        model, meta = base_model(cfg)
        if cfg.adapters:
            model = merge_lora(load_adapters(model, cfg.adapters))
            meta = adapters_meta(cfg, meta)
        return model, meta
    except WeightsError as e:
        raise ConfigError(str(e)) from None


def weights_checkpoint(cfg):
    """The checkpoint of ours the weights come from: init_from's run or checkpoint, else out_dir's
    `ckpt`; None for Hugging Face weights (init_from)."""
    if cfg.init_from:
        return parent_checkpoint(cfg.init_from, cfg.ckpt)
    return saved_checkpoint(cfg.out_dir, cfg.ckpt)


def base_model(cfg):
    """(model, meta) of weights_checkpoint, its LoRA adapters merged, or of Hugging Face weights."""
    path = weights_checkpoint(cfg)
    if path is None:
        meta = weights_meta(cfg.init_from)  # before the weights: a refusal reads none of them
        return load_hf(cfg.init_from), meta
    state = load_checkpoint(path)
    return merge_lora(model_from_checkpoint(state)), state["meta"]


def adapters_meta(cfg, base_meta):
    """The meta export.py wrote beside the adapters (their fine-tune's data, e.g. its SFT template),
    else the base's; WeightsError where its tokens are not the base's."""
    if not (Path(cfg.adapters) / "meta.json").is_file():
        return base_meta
    meta = data.read_meta(cfg.adapters)
    if data.tokenizer_identity(meta) != data.tokenizer_identity(base_meta):
        raise WeightsError(f"the adapters in {cfg.adapters} were trained on "
                           f"{data.describe_tokenizer(meta)}, but {cfg.init_from} reads "
                           f"{data.describe_tokenizer(base_meta)}; apply them to the base they "
                           "were trained on")
    return meta


def sample(cfg):
    rt = runtime(cfg)
    model, meta = load_model(cfg)
    model = model.to(rt.device).eval()
    tokenizer = data.get_tokenizer(meta)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    sampling = (cfg.temperature, cfg.top_k or None, cfg.top_p, meta["vocab_size"], generator)
    with rt.autocast():
        if cfg.chat:
            return converse(cfg, model, meta, tokenizer, rt, sampling)
        text, ids = prompt(tokenizer, cfg.start)
        if not ids:
            raise ConfigError("the prompt encodes to no tokens; give a longer --start")
        for _ in range(cfg.num_samples):
            session = Session(model, rt.device)
            session.feed(ids)
            print(text, end="", flush=True)
            stream(session, streamer(cfg, tokenizer), sampling, cfg.max_new_tokens,
                   tokenizer.eot_id if cfg.stop_at_eot else None)
            print("\n---------------")


def streamer(cfg, tokenizer):
    return Streamer(tokenizer, cfg.stop.split("|"), lambda text: print(text, end="", flush=True))


def converse(cfg, model, meta, tokenizer, rt, sampling):
    """A chat in the template of prepare.py sft (data.sft_turn): each line read is a user turn, each
    reply streamed until the model's end-of-text token, the conversation kept in one session's KV
    cache (returned)."""
    if meta.get("template") != data.SFT_TEMPLATE:
        trained_on = meta.get("dataset") or "data without a template"
        raise ConfigError(f"--chat talks in prepare.py sft's template ({data.SFT_TEMPLATE}), but "
                          f"this model was trained on {trained_on}, not on data in it; "
                          "fine-tune it on `prepare.py sft` data first (docs/sft.md)")
    session = Session(model, rt.device)
    session.feed(tokenizer.document_start())
    console = sys.stdin.isatty()
    while line := read_turn(console):
        turn, _ = data.render_sft(data.sft_turn("user", line) + data.sft_turn("assistant", None),
                                  tokenizer)
        session.feed(turn)
        stream(session, streamer(cfg, tokenizer), sampling, cfg.max_new_tokens, tokenizer.eot_id)
        if session.ids[-1] != tokenizer.eot_id:  # cut short: end the turn as the template ends it
            session.feed([tokenizer.eot_id])
        print()
    return session


def read_turn(console):
    """The next user turn: a line from the console (after a prompt) or from stdin; "" at the end."""
    try:
        line = input("> " if console else "")
    except EOFError:
        return ""
    if not console:
        print(f"> {line}")
    return line.strip() or read_turn(console)


def main(argv=None):
    try:
        session = run_main(sample, __file__, argv, DeviceConfig,
                           errors=(CheckpointError, data.DataError))
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return session
    except BrokenPipeError:  # `| head` stopped reading: end quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
