"""The file formats of Hugging Face: a GPT-2 folder (hub lookup, config.json <-> GPTConfig fields, tensor names
and shapes) and PEFT's LoRA adapters, with a safetensors reader and writer.

Reading order: the GPT-2 layout's pieces, then load_gpt2 / save_gpt2 that put them together, then
save_adapters / load_adapters (PEFT), then safetensors.
"""

import json
import os
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import torch

from lora import adapter_state, merge_lora
from model import GPT, GPT2_OPTIONS, GPTConfig

# Parameter names match GPT-2's in transformers; three things differ. Its Conv1D layers store weights as
# (in, out), nn.Linear as (out, in); it always has biases; its head is tied to wte and stored at most once.

HUB_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks older transformers saved with the weights
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
# GPT-2 options this model hard-codes, and the values it reproduces exactly (the first is also HF's default);
# gelu_new and gelu_pytorch_tanh are both GELU's tanh approximation.
SUPPORTED_HF_OPTIONS = {"model_type": ("gpt2",), "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                        "layer_norm_epsilon": (1e-5,), "tie_word_embeddings": (True,), "scale_attn_weights": (True,),
                        "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
                        "add_cross_attention": (False,)}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class WeightsError(Exception):
    """Weights that cannot be loaded exactly; the message names the problem and the fix."""


def hf_folder(name_or_dir):
    """The local folder of a model: `name_or_dir` itself, or a GPT-2 size fetched through huggingface_hub."""
    if Path(name_or_dir).is_dir():
        return Path(name_or_dir)
    if name_or_dir not in HUB_REPOS:
        raise WeightsError(f"{name_or_dir} is neither a folder nor one of {', '.join(HUB_REPOS)}; pass a folder "
                           "in the Hugging Face layout (config.json plus model.safetensors)")
    try:  # an optional dependency: only models given by name need it
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(f"loading {name_or_dir} by name needs the huggingface_hub package: pip install "
                           "huggingface_hub, or pass a local folder in the Hugging Face layout") from None
    try:
        return Path(snapshot_download(HUB_REPOS[name_or_dir], allow_patterns=["config.json", "model.safetensors"]))
    except OSError as e:  # huggingface_hub's offline, network and not-found errors are all OSErrors
        raise WeightsError(f"{name_or_dir} is not in the Hugging Face cache and could not be downloaded "
                           f"({type(e).__name__}); go online once, or pass a local folder in the Hugging Face "
                           "layout") from None


def read_hf_config(folder):
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no config.json, so it is not a Hugging Face model folder; pass one "
                           "holding config.json and model.safetensors (or pytorch_model.bin)")
    return json.loads(path.read_text())


def config_from_hf(hf, dropout):
    """The GPTConfig fields of a GPT-2 config.json, or WeightsError where this model would compute other logits."""
    for key, supported in SUPPORTED_HF_OPTIONS.items():
        if hf.get(key, supported[0]) not in supported:
            raise WeightsError(f"config.json sets {key}={hf[key]!r}, which this GPT cannot reproduce (it needs "
                               f"{' or '.join(map(repr, supported))})")
    missing = [key for key in ARCHITECTURE_KEYS if key not in hf]
    if missing:
        raise WeightsError(f"config.json lacks {', '.join(missing)}; it is not a GPT-2 config")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise WeightsError(f"config.json sets n_inner={hf['n_inner']}, but this GPT's MLP is 4 * n_embd wide "
                           f"({4 * hf['n_embd']})")
    return {"block_size": hf["n_positions"], "vocab_size": hf["vocab_size"], "n_layer": hf["n_layer"],
            "n_head": hf["n_head"], "n_embd": hf["n_embd"], "dropout": dropout, "bias": True, **GPT2_OPTIONS}


def config_to_hf(config, eot_id):
    """A config.json for transformers' GPT2LMHeadModel with this model's architecture and computation."""
    options = {key: supported[0] for key, supported in SUPPORTED_HF_OPTIONS.items()}
    return {**options, "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "bos_token_id": eot_id,
            "eos_token_id": eot_id}


def hf_layout(name, tensor):
    """A tensor in the other layout: Conv1D weights are transposed (the same move in either direction)."""
    return tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor


def read_hf_tensors(folder):
    safetensors, pickled = folder / "model.safetensors", folder / "pytorch_model.bin"
    path = safetensors if safetensors.is_file() else pickled
    if not path.is_file():
        raise WeightsError(f"{folder} has neither model.safetensors nor pytorch_model.bin; a sharded checkpoint "
                           "must be merged into one file first")
    try:
        if path == safetensors:
            return read_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, TypeError, KeyError, RuntimeError, EOFError, struct.error, pickle.UnpicklingError):
        raise WeightsError(f"{path} cannot be read: it is truncated or corrupt; download or export it again") from None


def state_from_hf(tensors, expected, folder):
    """Our state dict from a GPT-2's tensors, each checked against `expected` (our state dict) by name and shape."""
    # the head is tied to wte; checkpoints saved from GPT2Model (the hub's gpt2) lack the `transformer.` prefix
    tensors = {name if name.startswith("transformer.") else f"transformer.{name}": tensor
               for name, tensor in tensors.items() if name != "lm_head.weight" and not name.endswith(HF_MASK_BUFFERS)}
    state = {}
    for name, like in expected.items():
        if name == "lm_head.weight":
            continue
        if name not in tensors:
            raise WeightsError(f"{folder} lacks the tensor {name}; it is not a complete GPT-2 checkpoint")
        tensor, shape = tensors.pop(name), tuple(hf_layout(name, like).shape)
        if tuple(tensor.shape) != shape:
            raise WeightsError(f"{name} in {folder} has shape {tuple(tensor.shape)}, but config.json implies {shape}")
        state[name] = hf_layout(name, tensor)
    if tensors:
        raise WeightsError(f"{folder} holds tensors GPT-2 does not have ({', '.join(sorted(tensors)[:3])}); it is "
                           "another architecture")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def state_to_hf(ours, reference, vocab_size):
    """GPT-2's tensors for our state dict, fp32 on the CPU: Conv1D layout, zero biases where the model has none,
    the vocabulary cropped to `vocab_size`, the tied head left out (transformers ties it on loading).
    `reference` is the state dict of the same model with GPT-2's biases and that vocabulary: every name and
    shape GPT-2 has."""
    ours = {**ours, "transformer.wte.weight": ours["transformer.wte.weight"][:vocab_size]}
    tensors = {}
    for name, like in reference.items():
        if name != "lm_head.weight":
            tensor = ours[name].to("cpu", torch.float32) if name in ours else torch.zeros(like.shape)
            tensors[name] = hf_layout(name, tensor).contiguous()
    return tensors


# ---- a GPT-2 folder in and out ----

def load_gpt2(name_or_dir, dropout=None):
    """A GPT (with biases; dropout None means 0) holding the weights of a Hugging Face GPT-2: a folder with
    config.json and model.safetensors or pytorch_model.bin, or gpt2, gpt2-medium, gpt2-large or gpt2-xl from
    the Hugging Face cache or hub (needs `pip install huggingface_hub`). WeightsError where the weights
    cannot be loaded or this model would not compute the same logits."""
    folder = hf_folder(name_or_dir)
    model = GPT(GPTConfig(**config_from_hf(read_hf_config(folder), dropout or 0.0)))
    model.load_state_dict(state_from_hf(read_hf_tensors(folder), model.state_dict(), folder))
    return model


def save_gpt2(gpt, folder, vocab_size=None, eot_id=None):
    """Write config.json and model.safetensors (fp32) that transformers' GPT2LMHeadModel loads with the same
    logits, as does load_gpt2. GPT-2 always has biases: a model without them gets zeros. The vocabulary is
    written as is, padding included (e.g. 50304 rows for GPT-2's 50257 tokens), unless `vocab_size` crops it to
    the tokenizer's (the kept tokens' logits stay the same). `eot_id`, the tokenizer's end-of-text id, becomes
    the config's bos/eos ids (where HF's generate stops). WeightsError for a model with architecture options
    other than GPT-2's."""
    if gpt.config.lora_rank > 0:
        gpt = merge_lora(gpt)  # the layout has no place for adapters
    options = {key: getattr(gpt.config, key) for key, gpt2 in GPT2_OPTIONS.items() if getattr(gpt.config, key) != gpt2}
    if options:
        raise WeightsError(f"this model uses {options}, which the GPT-2 layout cannot hold; only models with "
                           "GPT-2's architecture options export")
    vocab_size = vocab_size or gpt.config.vocab_size
    assert vocab_size <= gpt.config.vocab_size, f"cannot crop vocab {gpt.config.vocab_size} to {vocab_size}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(replace(gpt.config, vocab_size=vocab_size), eot_id)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    with torch.device("meta"):  # a GPT-2 shaped reference: every name and shape, no memory
        reference = type(gpt)(replace(gpt.config, bias=True, vocab_size=vocab_size)).state_dict()
    write_safetensors(folder / "model.safetensors", state_to_hf(gpt.state_dict(), reference, vocab_size))


# ---- PEFT's LoRA adapters ----

PEFT_TARGETS = {"attn": ("c_attn", "c_proj"), "mlp": ("c_fc", "c_proj")}  # lora_targets -> module names


def save_adapters(gpt, folder, base_model):
    """Write `gpt`'s LoRA adapters alone in PEFT's layout (adapter_config.json, adapter_model.safetensors):
    `PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_model), folder)` applies them to
    transformers' GPT-2, `load_adapters(load_gpt2(base_model), folder)` to this one."""
    cfg = gpt.config
    modules = [f"{part}.{name}" for part, names in PEFT_TARGETS.items() if part in cfg.lora_targets.split(",")
               for name in names]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
              "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
              "target_modules": modules, "fan_in_fan_out": True, "bias": "none", "inference_mode": True}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {f"base_model.model.{name}.weight": t.detach().float().cpu().contiguous()
               for name, t in adapter_state(gpt).items()}
    write_safetensors(folder / "adapter_model.safetensors", tensors)


def load_adapters(gpt, folder):
    """A LoRA model of `gpt`'s class: `gpt`'s weights plus the adapters save_adapters wrote to `folder`."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = read_safetensors(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder} holds no readable LoRA adapters ({e}); write them with "
                           "`python export.py CKPT FOLDER --adapters_only`") from None
    parts = sorted({module.split(".")[0] for module in config["target_modules"]})
    model = type(gpt)(replace(gpt.config, lora_rank=config["r"], lora_alpha=config["lora_alpha"],
                              lora_targets=",".join(parts)))
    adapters = {name.removeprefix("base_model.model.").removesuffix(".weight"): t for name, t in tensors.items()}
    expected = adapter_state(model)
    if adapters.keys() != expected.keys() or any(adapters[k].shape != t.shape for k, t in expected.items()):
        raise WeightsError(f"the adapters in {folder} do not fit this model's layers; they were trained on "
                           "other base weights")
    model.load_state_dict({**gpt.state_dict(), **adapters})
    return model.to(gpt.lm_head.weight.device)


# ---- safetensors ----

def read_safetensors(path):
    """name -> tensor from a .safetensors file: an 8-byte little-endian header length, a JSON header (name ->
    dtype, shape, data_offsets into the data), then the tensors' little-endian bytes back to back."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(os.fstat(f.fileno()).st_size - f.tell())
        f.readinto(data)
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name} is {info['dtype']}, which this reader does not read")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        tensors[name] = torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize,
                                         offset=start).reshape(info["shape"])
    return tensors


def write_safetensors(path, tensors):
    """Write contiguous CPU tensors as a .safetensors file (the format read_safetensors describes). Wider
    dtypes go first, so after the 8-byte aligned header every tensor is aligned to its element size."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    tensors = dict(sorted(tensors.items(), key=lambda item: -item[1].element_size()))
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers checks the format tag
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype_names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        for tensor in tensors.values():
            f.write(tensor.view(torch.uint8).numpy())
