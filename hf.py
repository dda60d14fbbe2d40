"""The file formats of Hugging Face: a model folder in one of three transformers layouts (hub
lookup, config.json <-> GPTConfig fields, tensor names and shapes) and PEFT's LoRA adapters, with a
safetensors reader and writer.

Layouts: GPT-2's (GPT2LMHeadModel) for GPT-2's options; Llama's (LlamaForCausalLM) for rope,
RMSNorm and SwiGLU; Qwen3's (Qwen3ForCausalLM) adds QK-norm. LAYOUTS says which options each holds.

Reading order: reading a folder, the GPT-2 layout's pieces, the Llama and Qwen3 layouts' pieces, the
table of layouts, then load_hf / save_hf that put them together (and save_tokenizer_config for a
trained tokenizer), then save_adapters / load_adapters (PEFT), then safetensors.
"""

import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import data
from lora import adapter_state, merge_lora
from model import GPT, GPT2_OPTIONS, ROPE_THETA, GPTConfig, mlp_width

HUB_REPOS = {name: f"openai-community/{name}"
             for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "U8": torch.uint8, "BOOL": torch.bool}
VOCABULARY_ROWS = ("transformer.wte.weight", "lm_head.weight")  # the tensors --crop_vocab crops
TIED_HEAD = "lm_head.weight"  # with tie_embeddings, wte's matrix: every layout stores it as wte
GPT2_META = {"tokenizer": "gpt2", "encoding": "r50k_base", "vocab_size": 50257, "eot_id": 50256}


class WeightsError(Exception):
    """Weights that cannot be loaded exactly; the message names the problem and the fix."""


# ---- reading a folder ----

def hf_folder(name_or_dir):
    """A model's local folder: `name_or_dir` itself, or a GPT-2 size fetched by huggingface_hub."""
    if Path(name_or_dir).is_dir():
        return Path(name_or_dir)
    if name_or_dir not in HUB_REPOS:
        raise WeightsError(f"{name_or_dir} is neither a folder nor one of {', '.join(HUB_REPOS)}; "
                           "pass a folder in the Hugging Face layout (config.json plus "
                           "model.safetensors)")
    try:  # an optional dependency: only models given by name need it
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(f"loading {name_or_dir} by name needs the huggingface_hub package: pip "
                           "install huggingface_hub, or pass a local folder in the Hugging Face "
                           "layout") from None
    try:
        return Path(snapshot_download(HUB_REPOS[name_or_dir],
                                      allow_patterns=["config.json", "model.safetensors"]))
    except OSError as e:  # huggingface_hub's offline, network and not-found errors are OSErrors
        raise WeightsError(f"{name_or_dir} is not in the Hugging Face cache and could not be "
                           f"downloaded ({type(e).__name__}); go online once, or pass a local "
                           "folder in the Hugging Face layout") from None


def weights_meta(name_or_dir):
    """The tokenizer meta of Hugging Face weights: the meta.json export.py writes beside them, else
    GPT-2 BPE for the hub's GPT-2s and a GPT-2-layout folder whose vocabulary holds it; WeightsError
    for any other folder without one, whose tokenizer is not ours to guess."""
    folder = Path(name_or_dir)
    if not folder.is_dir():  # a hub GPT-2 by name (hf_folder refuses any other name)
        return GPT2_META
    if (folder / "meta.json").is_file():
        return data.read_meta(folder)
    hf = read_hf_config(folder)
    if layout_of_hf(hf).model_type != "gpt2" or hf.get("vocab_size", 0) < GPT2_META["vocab_size"]:
        raise WeightsError(f"{folder} has no meta.json naming its tokenizer, and only GPT-2 "
                           "weights (the GPT-2 layout, vocab_size >= 50257) are taken to read "
                           "GPT-2 BPE without one; export.py writes meta.json beside the weights "
                           "(its fields: docs/data.md)")
    return GPT2_META


def read_hf_config(folder):
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no config.json, so it is not a Hugging Face model "
                           "folder; pass one holding config.json and model.safetensors (or "
                           "pytorch_model.bin)")
    return json.loads(path.read_text())


def read_hf_tensors(folder):
    safetensors, pickled = folder / "model.safetensors", folder / "pytorch_model.bin"
    path = safetensors if safetensors.is_file() else pickled
    if not path.is_file():
        raise WeightsError(f"{folder} has neither model.safetensors nor pytorch_model.bin; "
                           "a sharded checkpoint must be merged into one file first")
    try:
        if path == safetensors:
            return read_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, TypeError, KeyError, RuntimeError, EOFError, struct.error,
            pickle.UnpicklingError):
        raise WeightsError(f"{path} cannot be read: it is truncated or corrupt; download or export "
                           "it again") from None


def check_hf_settings(hf, needed):
    """WeightsError for the first config.json key whose value (or, absent, transformers' default) is
    not one this GPT computes with: `needed` maps each key to those values, its default first."""
    for key, values in needed.items():
        if hf.get(key, values[0]) not in values:
            raise WeightsError(f"config.json's {key} is {hf[key]!r}, which this GPT cannot "
                               f"reproduce (it needs {' or '.join(map(repr, values))})")


def check_shape_keys(hf, keys, layout):
    missing = [key for key in keys if key not in hf]
    if missing:
        raise WeightsError(f"config.json lacks {', '.join(missing)};"
                           f" it is not a {layout.name} config")


def take_tensor(tensors, name, shape, folder, layout):
    """tensors.pop(name), WeightsError where it is missing or has another shape than `shape`."""
    if name not in tensors:
        raise WeightsError(f"{folder} lacks the tensor {name}; it is not a complete {layout.name}"
                           " checkpoint")
    if tuple(tensors[name].shape) != tuple(shape):
        raise WeightsError(f"{name} in {folder} has shape {tuple(tensors[name].shape)}, but "
                           f"config.json implies {tuple(shape)}")
    return tensors.pop(name)


def check_all_taken(tensors, folder, layout):
    if tensors:
        raise WeightsError(f"{folder} holds tensors {layout.name} does not have "
                           f"({', '.join(sorted(tensors)[:3])}); it is another architecture")


# ---- the GPT-2 layout (GPT2LMHeadModel) ----
# Parameter names match GPT-2's in transformers; three things differ. Its Conv1D layers store
# weights as (in, out), nn.Linear as (out, in); it always has biases; its head is tied to wte and
# stored at most once.

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks old transformers saved too
GPT2_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
# GPT-2 settings this model hard-codes, and the values it reproduces exactly (the first is also
# HF's default); gelu_new and gelu_pytorch_tanh are both GELU's tanh approximation.
GPT2_SETTINGS = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                 "layer_norm_epsilon": (1e-5,), "tie_word_embeddings": (True,),
                 "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                 "reorder_and_upcast_attn": (False,), "add_cross_attention": (False,)}


def gpt2_config_from_hf(layout, hf, dropout):
    """A GPT-2 config.json's GPTConfig; WeightsError where this model would compute other logits."""
    check_hf_settings(hf, GPT2_SETTINGS)
    check_shape_keys(hf, GPT2_SHAPE_KEYS, layout)
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise WeightsError(f"config.json sets n_inner={hf['n_inner']}, but this GPT's MLP is 4 * "
                           f"n_embd wide ({4 * hf['n_embd']})")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     dropout=dropout, bias=True, **GPT2_OPTIONS)


def gpt2_config_to_hf(config, eot_id):
    """transformers' GPT2LMHeadModel config.json with this model's architecture and computation."""
    settings = {key: values[0] for key, values in GPT2_SETTINGS.items()}
    return {**settings, "vocab_size": config.vocab_size, "n_positions": config.block_size,
            "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": None, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "bos_token_id": eot_id,
            "eos_token_id": eot_id}


def conv1d_layout(name, tensor):
    """A tensor in the other layout: Conv1D weights are transposed (the same move either way)."""
    return tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor


def gpt2_state_from_hf(layout, tensors, expected, folder):
    """Our `expected` tensors (name -> one like it) from a GPT-2's, each checked by name and
    shape."""
    # GPT2Model checkpoints (the hub's gpt2) lack the `transformer.` prefix
    tensors = {name if name.startswith("transformer.") else f"transformer.{name}": tensor
               for name, tensor in tensors.items() if not name.endswith(HF_MASK_BUFFERS)}
    state = {name: conv1d_layout(name, take_tensor(tensors, name, conv1d_layout(name, like).shape,
                                                   folder, layout))
             for name, like in expected.items()}
    check_all_taken(tensors, folder, layout)
    return state


def gpt2_state_to_hf(state, config):
    """GPT-2's tensors for our state dict (its tied head left out): Conv1D layout, zero biases where
    the model has none."""
    with torch.device("meta"):  # a GPT-2 shaped reference: every name and shape, no memory
        reference = GPT(replace(config, bias=True)).state_dict()
    return {name: conv1d_layout(name, state[name] if name in state else torch.zeros(like.shape))
            for name, like in reference.items() if name != TIED_HEAD}


def gpt2_linear_names(module):
    """Our Linears keep GPT-2's names."""
    return [module]


# ---- the Llama and Qwen3 layouts (LlamaForCausalLM, Qwen3ForCausalLM) ----
# Their blocks compute what ours do with rope, rmsnorm and swiglu: rotate_half turns the same pairs
# of halves as model.rotate, with the same frequencies (so q and k need no permutation),
# Qwen3RMSNorm normalises each head's queries and keys before the rotation as our qk_norm does, and
# the scale is 1/sqrt(head_dim). Our fused projections are theirs stacked by rows: c_attn is q, k,
# v; SwiGLU's c_fc is gate, then up (MLP.forward).

ROTARY_BLOCK_NAMES = {"ln_1": ("input_layernorm",), "ln_2": ("post_attention_layernorm",),
                      "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      "attn.c_proj": ("self_attn.o_proj",), "attn.q_norm": ("self_attn.q_norm",),
                      "attn.k_norm": ("self_attn.k_norm",),
                      "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
                      "mlp.c_proj": ("mlp.down_proj",)}
ROTARY_OUTER_NAMES = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm",
                      "lm_head": "lm_head"}
ROTARY_SHAPE_KEYS = ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size")
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm's default eps for fp32 inputs
ROPE = {"rope_type": "default", "rope_theta": ROPE_THETA}  # model.rotary_tables' frequencies
# what LlamaConfig and Qwen3Config assume for a key config.json lacks (None: from the shape keys)
ROTARY_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False,
                   "mlp_bias": False, "use_sliding_window": False}
ROTARY_COMPUTING_KEYS = ("intermediate_size", "num_key_value_heads", "head_dim", "hidden_act",
                         "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias",
                         "use_sliding_window")


def rotary_config_to_hf(config, eot_id):
    """config.json entries Llama and Qwen3 share, for this model's architecture and computation."""
    return {"vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
            "hidden_size": config.n_embd, "intermediate_size": mlp_width(config),
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_head, "head_dim": config.n_embd // config.n_head,
            "hidden_act": "silu", "rms_norm_eps": RMS_NORM_EPS, "rope_parameters": ROPE,
            "attention_bias": config.bias, "tie_word_embeddings": config.tie_embeddings,
            "attention_dropout": config.dropout, "bos_token_id": eot_id, "eos_token_id": eot_id}


def llama_config_to_hf(config, eot_id):
    return {**rotary_config_to_hf(config, eot_id), "mlp_bias": config.bias}


def qwen3_config_to_hf(config, eot_id):
    return {**rotary_config_to_hf(config, eot_id), "use_sliding_window": False}


def rope_parameters(hf):
    """config.json's rotary settings as transformers 5 writes them, from its rope_parameters or
    transformers 4's rope_theta and rope_scaling."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", ROPE["rope_theta"]))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def rotary_config_from_hf(layout, hf, dropout):
    """The GPTConfig of a Llama or Qwen3 config.json, or WeightsError where this model would compute
    other logits: its computing keys must be those config_to_hf writes for the GPTConfig its shape
    keys describe."""
    check_shape_keys(hf, ROTARY_SHAPE_KEYS, layout)
    free = {"bias": hf.get("attention_bias", False),
            "tie_embeddings": hf.get("tie_word_embeddings", False)}
    config = GPTConfig(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                       n_embd=hf["hidden_size"], dropout=dropout,
                       **{**free, **layout.fixed_options()})
    needed = layout.config_to_hf(config, None)
    given = {**ROTARY_DEFAULTS, **{key: value for key, value in hf.items() if value is not None},
             "rope_parameters": rope_parameters(hf)}
    check_hf_settings(given, {key: (needed[key],)
                              for key in ROTARY_COMPUTING_KEYS if key in needed})
    return config


def rotary_names(name):
    """The Llama-layout names of the tensors our tensor `name` stacks by rows."""
    module, kind = name.rsplit(".", 1)
    if not module.startswith("transformer.h."):
        return [f"{ROTARY_OUTER_NAMES[module]}.{kind}"]
    layer, part = module.removeprefix("transformer.h.").split(".", 1)
    return [f"model.layers.{layer}.{theirs}.{kind}" for theirs in ROTARY_BLOCK_NAMES[part]]


def rotary_linear_names(module):
    """The Llama-layout names of the Linears our Linear `module` stacks by rows."""
    return [name.removesuffix(".weight") for name in rotary_names(f"{module}.weight")]


def rotary_state_from_hf(layout, tensors, expected, folder):
    """Our `expected` tensors (name -> one like it) from a Llama or Qwen3's, each checked by name
    and shape."""
    state = {}
    for name, like in expected.items():
        names = rotary_names(name)
        state[name] = torch.cat([take_tensor(tensors, theirs, part.shape, folder, layout)
                                 for theirs, part in zip(names, like.chunk(len(names)))])
    check_all_taken(tensors, folder, layout)
    return state


def rotary_state_to_hf(state, config):
    """Llama's or Qwen3's tensors for our state dict (its tied head left out)."""
    tensors = {}
    for name, tensor in state.items():
        names = rotary_names(name)
        tensors.update(zip(names, tensor.chunk(len(names))))
    return tensors


# ---- the layouts ----

@dataclass(frozen=True)
class Layout:
    """A transformers architecture that holds some of our option sets with no custom code."""
    name: str  # in messages
    model_type: str  # config.json's, which picks the layout on loading
    architecture: str  # the class transformers loads it as
    holds: dict  # GPTConfig field -> values it holds (not zero_init_proj: only an initialisation)
    config_to_hf: Callable  # (GPTConfig, eot_id) -> config.json minus architectures and model_type
    config_from_hf: Callable  # (layout, config.json, dropout) -> GPTConfig
    state_to_hf: Callable  # (our state dict, GPTConfig) -> its tensors
    state_from_hf: Callable  # (layout, its tensors, our names -> a tensor like it, folder) -> ours
    linear_names: Callable  # our Linear's name -> the names of its Linears, stacked by rows in ours
    conv1d: bool  # its projections store weights as (in, out), GPT-2's Conv1D (PEFT fan_in_fan_out)

    def fixed_options(self):
        """The GPTConfig fields this layout holds one value of, with that value: what a model loaded
        from it has."""
        return {key: values[0] for key, values in self.holds.items() if len(values) == 1}

    def misfits(self, config):
        """The GPTConfig fields whose value in `config` this layout does not hold."""
        return [key for key, values in self.holds.items() if getattr(config, key) not in values]

    def why_not(self, config):
        misfits = self.misfits(config)
        found = ", ".join(f"{key}={getattr(config, key)}" for key in misfits)
        needed = ", ".join(f"{key}={'/'.join(map(str, self.holds[key]))}" for key in misfits)
        return f"the {self.name} layout cannot hold {found} ({self.architecture} needs {needed})"


def holding(**changes):
    """A layout's `holds`: GPT-2's options (any bias: one without gets zeros), with `changes`."""
    gpt2 = {option: (value,) for option, value in GPT2_OPTIONS.items()
            if option != "zero_init_proj"}
    return {**gpt2, "bias": (True, False), **changes}


ROTARY_OPTIONS = {"pos_embedding": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",),
                  "tie_embeddings": (True, False)}
LAYOUTS = (  # at most one holds a model's options
    Layout("GPT-2", "gpt2", "GPT2LMHeadModel", holding(), gpt2_config_to_hf, gpt2_config_from_hf,
           gpt2_state_to_hf, gpt2_state_from_hf, gpt2_linear_names, conv1d=True),
    Layout("Llama", "llama", "LlamaForCausalLM", holding(**ROTARY_OPTIONS), llama_config_to_hf,
           rotary_config_from_hf, rotary_state_to_hf, rotary_state_from_hf, rotary_linear_names,
           conv1d=False),
    # Qwen3MLP has no biases, so a model with biases has no place there
    Layout("Qwen3", "qwen3", "Qwen3ForCausalLM",
           holding(**ROTARY_OPTIONS, qk_norm=(True,), bias=(False,)), qwen3_config_to_hf,
           rotary_config_from_hf, rotary_state_to_hf, rotary_state_from_hf, rotary_linear_names,
           conv1d=False),
)


def layout_for(config):
    """The layout that holds `config`'s options, or WeightsError naming those that the nearest
    layouts (the fewest options off) cannot hold."""
    counts = [len(layout.misfits(config)) for layout in LAYOUTS]
    fewest = min(counts)
    nearest = [layout for layout, count in zip(LAYOUTS, counts) if count == fewest]
    if fewest:
        raise WeightsError(f"no Hugging Face layout holds this model's options; nearest: "
                           f"{', and '.join(layout.why_not(config) for layout in nearest)}; "
                           "docs/gpt2.md lists the options each layout holds")
    return nearest[0]


def layout_of_hf(hf):
    """The layout config.json's model_type names (GPT-2's if none, as in the oldest configs)."""
    layouts = {layout.model_type: layout for layout in LAYOUTS}
    model_type = hf.get("model_type", "gpt2")
    if model_type not in layouts:
        raise WeightsError(f"config.json's model_type is {model_type!r}, but this GPT reads only "
                           f"{', '.join(layouts)}")
    return layouts[model_type]


# ---- a Hugging Face folder in and out ----

def load_hf(name_or_dir, dropout=None):
    """A GPT (dropout None means 0) holding the weights of a Hugging Face model in the GPT-2, Llama
    or Qwen3 layout: a folder with config.json and model.safetensors or pytorch_model.bin, or gpt2,
    gpt2-medium, gpt2-large or gpt2-xl from the Hugging Face cache or hub (needs `pip install
    huggingface_hub`). A GPT-2 gets biases. WeightsError where the weights cannot be loaded or this
    model would not compute the same logits."""
    folder = hf_folder(name_or_dir)
    hf = read_hf_config(folder)
    layout = layout_of_hf(hf)
    try:
        model = GPT(layout.config_from_hf(layout, hf, dropout or 0.0))
    except ValueError as e:  # GPTConfig's own checks, e.g. heads that do not split n_embd
        raise WeightsError(f"{folder}/config.json describes no model this GPT can be: "
                           f"{e}") from None
    tensors, expected = read_hf_tensors(folder), model.state_dict()
    if model.config.tie_embeddings:  # wte's matrix is the one read; transformers may store it twice
        tensors.pop(TIED_HEAD, None)
        del expected[TIED_HEAD]
    state = layout.state_from_hf(layout, tensors, expected, folder)
    model.load_state_dict({TIED_HEAD: state["transformer.wte.weight"], **state})  # untied: its own
    return model


def save_hf(gpt, folder, vocab_size=None, eot_id=None):
    """Write config.json and model.safetensors (fp32) in the layout that holds the model's options
    (layout_for), which transformers loads with the same logits, as does load_hf. A GPT-2 without
    biases gets zeros. The vocabulary is written as is, padding included (e.g. 50304 rows for
    GPT-2's 50257 tokens), unless `vocab_size` crops it to the tokenizer's (the kept tokens' logits
    stay the same). `eot_id`, the tokenizer's end-of-text id, becomes the config's bos/eos ids
    (where HF's generate stops). WeightsError, before anything is written, for options no layout
    holds."""
    gpt = merge_lora(gpt)  # the layouts have no place for adapters
    layout = layout_for(gpt.config)
    vocab_size = vocab_size or gpt.config.vocab_size
    assert vocab_size <= gpt.config.vocab_size, (
        f"cannot crop vocab {gpt.config.vocab_size} to {vocab_size}")
    config = replace(gpt.config, vocab_size=vocab_size)
    state = {name: (t[:vocab_size] if name in VOCABULARY_ROWS else t).to("cpu", torch.float32)
             for name, t in gpt.state_dict().items()}
    if config.tie_embeddings:  # stored once, as wte: transformers ties the head on loading
        del state[TIED_HEAD]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = {"architectures": [layout.architecture], "model_type": layout.model_type,
                 **layout.config_to_hf(config, eot_id)}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tensors = {name: t.contiguous() for name, t in layout.state_to_hf(state, config).items()}
    write_safetensors(folder / "model.safetensors", tensors)


def save_tokenizer_config(folder, eos_token):
    """tokenizer_config.json, which AutoTokenizer reads beside a tokenizer.json: the class that runs
    that file (any transformers version) and the token that ends a text."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token}
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- PEFT's LoRA adapters ----

PEFT_TARGETS = {"attn": ("c_attn", "c_proj"), "mlp": ("c_fc", "c_proj")}  # lora_targets -> ours
ADAPTED_LINEAR = re.compile(r"\.\d+\.(.+)\.lora_[AB]\.weight$")  # PEFT tensor -> Linear past layer


def peft_targets(layout, part):
    """PEFT's target_modules for one of lora_targets' parts, in `layout` (their names past the
    layer: attn.c_attn, or self_attn.q_proj and its siblings)."""
    return [name.split(".", 3)[3] for ours in PEFT_TARGETS[part]
            for name in layout.linear_names(f"transformer.h.0.{part}.{ours}")]


def peft_parts(kind, tensor, count):
    """Our adapter tensor as PEFT's adapters on the `count` Linears it stacks hold it: the same
    lora_A on each, lora_B split by rows (the same update)."""
    return [tensor] * count if kind == "lora_A" else list(tensor.chunk(count))


def peft_name(linear, kind):
    return f"base_model.model.{linear}.{kind}.weight"


def save_adapters(gpt, folder, base_model):
    """Write `gpt`'s LoRA adapters alone in PEFT's layout (adapter_config.json,
    adapter_model.safetensors), named for the Hugging Face layout of its options (layout_for, as
    save_hf writes `base_model`): PeftModel.from_pretrained applies them to that transformers model
    (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM), load_adapters(load_hf(base_model),
    folder) to this one. An adapter on a fused projection (c_attn: q, k, v) becomes one on each of
    its Linears: A repeated, B split by rows, the same update."""
    cfg, layout = gpt.config, layout_for(gpt.config)
    modules = [target for part in PEFT_TARGETS if part in cfg.lora_targets.split(",")
               for target in peft_targets(layout, part)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(base_model), "r": cfg.lora_rank,
              "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
              "target_modules": modules, "fan_in_fan_out": layout.conv1d, "bias": "none",
              "inference_mode": True}
    tensors = {}
    for name, tensor in adapter_state(gpt).items():  # <Linear>.lora_A (r, in) or .lora_B (out, r)
        module, kind = name.rsplit(".", 1)
        theirs = layout.linear_names(module)
        for their, part in zip(theirs, peft_parts(kind, tensor, len(theirs))):
            tensors[peft_name(their, kind)] = part.float().cpu().contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(folder / "adapter_model.safetensors", tensors)


def load_adapters(gpt, folder):
    """A LoRA model of `gpt`'s class: its weights and the adapters save_adapters put in `folder`."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = read_safetensors(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder} holds no readable LoRA adapters ({e}); write them with "
                           "`python export.py CKPT FOLDER --adapters_only`") from None
    layout = layout_for(gpt.config)
    if not layout.conv1d and any(".transformer.h." in name for name in tensors):
        raise WeightsError(f"the adapters in {folder} name GPT-2's modules, but this base is a "
                           f"{layout.architecture}: they were trained on another base, or written "
                           "by an export.py older than 2026-12-05 (export them again with "
                           "--adapters_only)")
    adapted = {found[1] for name in tensors if (found := ADAPTED_LINEAR.search(name))}
    parts = [part for part in PEFT_TARGETS if adapted & set(peft_targets(layout, part))]
    model = type(gpt)(replace(gpt.config, lora_rank=config["r"], lora_alpha=config["lora_alpha"],
                              lora_targets=",".join(parts)))
    left = dict(tensors)  # each taken once; any left over fits no adapter of ours
    adapters = {name: stacked_adapter(layout, name, like, left, folder)
                for name, like in adapter_state(model).items()}
    if left:
        raise adapters_misfit(folder)
    model.load_state_dict({**gpt.state_dict(), **adapters})
    return model.to(gpt.lm_head.weight.device)


def stacked_adapter(layout, name, like, tensors, folder):
    """Our adapter tensor `name` (shaped `like`), taken out of PEFT's `tensors` for the Linears it
    stacks: their shared A, or their Bs stacked by rows (save_adapters' split undone)."""
    module, kind = name.rsplit(".", 1)
    names = layout.linear_names(module)
    shapes = [part.shape for part in peft_parts(kind, like, len(names))]
    theirs = [tensors.pop(peft_name(their, kind), None) for their in names]
    found = [t for t in theirs if t is not None]
    if found and (len(found) < len(names) or kind == "lora_A"
                  and not all(torch.equal(t, found[0]) for t in found)):
        raise WeightsError(f"the adapters in {folder} do not adapt {', '.join(names)} as one (some "
                           "lack an adapter, or each has an A matrix of its own), as our one "
                           f"adapter on {module} does; merge them into the base weights with PEFT "
                           "(merge_and_unload) and load those")
    if len(found) < len(names) or any(t.shape != shape for t, shape in zip(found, shapes)):
        raise adapters_misfit(folder)
    return found[0] if kind == "lora_A" else torch.cat(found)


def adapters_misfit(folder):
    return WeightsError(f"the adapters in {folder} do not fit this model's layers; they were "
                        "trained on other base weights")


# ---- safetensors ----

def read_safetensors(path):
    """name -> tensor from a .safetensors file: an 8-byte little-endian header length, a JSON header
    (name -> dtype, shape, data_offsets into the data), then the tensors' little-endian bytes back
    to back."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(os.fstat(f.fileno()).st_size - f.tell())
        f.readinto(data)
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name} is {info['dtype']}, which this reader"
                               " does not read")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        tensors[name] = torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize,
                                         offset=start).reshape(info["shape"])
    return tensors


def write_safetensors(path, tensors):
    """Write contiguous CPU tensors as a .safetensors file (the format read_safetensors describes).
    Wider dtypes go first, so after the 8-byte aligned header every tensor is aligned to its element
    size."""
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
