"""The Hugging Face GPT-2 layout: hub lookup, config.json <-> GPTConfig fields, tensor names and shapes, and
a safetensors reader and writer. model.GPT.from_pretrained / save_pretrained are the way in and out.
"""

import json
import os
import pickle
import struct
from pathlib import Path

import torch

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
            "n_head": hf["n_head"], "n_embd": hf["n_embd"], "dropout": dropout, "bias": True}


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
