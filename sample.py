"""Sample text from a trained run: `python sample.py [--out_dir=out] [--start="Once"] [--key=value ...]`.

The tokenizer is rebuilt from the meta stored in the checkpoint, so no data folder is needed.
"""

import sys
from pathlib import Path

import torch

import prepare
from configurator import ConfigError, load_config
from devices import pick_device, pick_dtype
from model import GPT, GPTConfig, WeightsError
from train import CheckpointError, load_checkpoint

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
out_dir = "out"  # run folder to sample from (train.py's default run)
ckpt = "best"  # which checkpoint: best (lowest val loss) or last
init_from = ""  # instead of a run: GPT-2 weights, gpt2 ... gpt2-xl or a Hugging Face folder (e.g. from export.py)
start = ""  # prompt text, or FILE:path to read it from a file; empty starts a new document
num_samples = 3  # independent samples to print
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # below 1 sharpens, above 1 flattens the distribution; 0 is greedy
top_k = 200  # sample only among the k most likely tokens; 0 keeps all
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens holding this much probability
seed = 1337  # makes the samples reproducible
device = "auto"  # auto (cuda, else mps, else cpu), or cpu, cuda, cuda:N, mps
dtype = "auto"  # auto (bf16 where supported, else fp16 on CUDA, else fp32), float32, bfloat16, float16
# ---- end of config ----


def prompt_ids(tokenizer, text):
    """Token ids of the prompt; an empty prompt is the end-of-text token (start a new document), or a newline."""
    if text.startswith("FILE:"):
        path = Path(text[len("FILE:"):])
        if not path.is_file():
            raise ConfigError(f"prompt file {path} does not exist; give --start=FILE:path to an existing file")
        text = path.read_text()
    return tokenizer.encode(text) if text else tokenizer.document_start()


GPT2_META = {"tokenizer": "gpt2", "encoding": "r50k_base", "vocab_size": 50257, "eot_id": 50256}


def load_model(cfg, device):
    """(model in eval mode, tokenizer meta) from GPT-2 weights if init_from is set, else from a run's checkpoint."""
    if cfg.init_from:
        folder = Path(cfg.init_from)
        meta = prepare.read_meta(folder) if (folder / "meta.json").is_file() else GPT2_META
        try:
            return GPT.from_pretrained(cfg.init_from).to(device).eval(), meta
        except WeightsError as e:
            raise ConfigError(str(e)) from None
    if cfg.ckpt not in ("best", "last"):
        raise ConfigError(f"ckpt must be best or last, got {cfg.ckpt!r}")
    state = load_checkpoint(Path(cfg.out_dir) / f"{cfg.ckpt}.pt", map_location=device)
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state["meta"]


def sample(cfg):
    device = pick_device(cfg.device, 0)
    device_type = device.split(":")[0]
    ptdtype, _ = pick_dtype(cfg.dtype, device_type)
    model, meta = load_model(cfg, device)
    tokenizer = prepare.get_tokenizer(meta)
    ids = prompt_ids(tokenizer, cfg.start)
    if not ids:
        raise ConfigError("the prompt encodes to no tokens; give a longer --start")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.tensor([ids], device=device).repeat(cfg.num_samples, 1)
    with torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32):
        out = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             top_p=cfg.top_p, vocab_limit=meta["vocab_size"], generator=generator)
    for row in out.tolist():
        print(tokenizer.decode(row[len(ids):]) if not cfg.start else tokenizer.decode(row))
        print("---------------")


def main(argv=None):
    try:
        sample(load_config(__file__, sys.argv[1:] if argv is None else argv))
    except (ConfigError, CheckpointError, prepare.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
