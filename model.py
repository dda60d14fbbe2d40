"""A GPT language model: the GPT-2 architecture and options, a KV-cache generator, FLOP counting.

Reading order: GPTConfig (the architecture options) and its readers, the blocks (attention, MLP),
GPT, then generation. Around it: engine.py (the KV cache, attention kernels and token choice that
generation uses), lora.py (adapters), optimizers.py (which optimizer trains what), hf.py (Hugging
Face, PEFT files). The model knows nothing of training (train.py).
"""

import math
from dataclasses import dataclass, fields
from typing import Annotated, Literal, TypeVar, get_args, get_origin, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

from engine import KVCache, generation_attention, sample_next
from lora import LoRALinear

Value = TypeVar("Value")
Option = Annotated[Value, "architecture option"]  # marks GPTConfig's architecture options


@dataclass
class GPTConfig:
    """The model's shape and options as `name: type = default  # meaning` lines that configurator.py
    reads, so each can be a train.py key (this meaning where train.py has none). Option[...] fields
    are the architecture options (a string option's Literal lists its values; GPT2_OPTIONS holds
    GPT-2's). A new option is a field here plus the code using it."""

    # the string options' types, named so that each field, default and meaning fit on one line
    Positions = Option[Literal["learned", "rope"]]
    Norms = Option[Literal["layernorm", "rmsnorm"]]
    MLPs = Option[Literal["gelu", "relu2", "swiglu"]]

    block_size: int = 1024  # longest context the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout on attention, residual branches and embeddings
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # architecture options (bench/RESULTS.md has each option's measured effect)
    # (the default run's: with Muon, rope, relu2 and qk_norm hit the old val loss in under half the
    # time; rmsnorm + swiglu match layernorm + relu2 and export to Qwen3's layout, bench/RESULTS.md)
    pos_embedding: Positions = "rope"  # learned (position table, GPT-2) or rope (rotary embeddings)
    norm: Norms = "rmsnorm"  # layernorm (GPT-2) or rmsnorm
    mlp: MLPs = "swiglu"  # gelu (GPT-2), relu2 (squared ReLU) or swiglu (gated, same param count)
    qk_norm: Option[bool] = True  # RMS-normalise each head's queries and keys before attention
    tie_embeddings: Option[bool] = True  # the LM head shares the token embedding's matrix (GPT-2)
    zero_init_proj: Option[bool] = False  # blocks' output projections start at 0: each the identity
    logit_softcap: Option[float] = 0.0  # > 0: logits = cap * tanh(logits / cap); 0 is off
    value_embeddings: Option[int] = 0  # token tables; i: attn values of layers i and n_layer-1-i
    unet_skips: Option[bool] = False  # U-net: first-half outputs added back before mirror blocks
    # fine-tuning
    lora_rank: int = 0  # > 0: targeted projections get trained low-rank adapters; all else frozen
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "attn,mlp"  # which blocks' projections get adapters: attn, mlp or both

    def __post_init__(self):
        check_options(vars(self))


def architecture_options():
    """{option: default} for each architecture option (field typed Option[...]), in field order."""
    hints = get_type_hints(GPTConfig, include_extras=True)
    return {f.name: f.default for f in fields(GPTConfig)
            if getattr(hints[f.name], "__metadata__", ()) == Option.__metadata__}


# GPT-2's options: all the GPT-2 layout holds, and what a checkpoint older than an option ran with
GPT2_OPTIONS = {**architecture_options(), "pos_embedding": "learned", "norm": "layernorm",
                "mlp": "gelu", "qk_norm": False}


def option_choices():
    """{field: allowed values} for each GPTConfig field typed Literal[...], in field order."""
    return {name: get_args(hint) for name, hint in get_type_hints(GPTConfig).items()
            if get_origin(hint) is Literal}


def check_options(values):
    """ValueError for the first field in `values` (name -> value) its Literal or range refuses,
    or for heads that do not split n_embd evenly."""
    for option, allowed in option_choices().items():
        if option in values and values[option] not in allowed:
            raise ValueError(f"{option} must be one of {', '.join(allowed)}, "
                             f"got {values[option]!r}")
    width, heads = values.get("n_embd", 0), values.get("n_head")
    if heads and width % heads:
        raise ValueError(f"n_embd {width} must be divisible by n_head {heads}")
    if values.get("logit_softcap", 0.0) < 0:
        raise ValueError(f"logit_softcap must be 0 (off) or more, got {values['logit_softcap']}")
    tables, limit = values.get("value_embeddings", 0), values.get("n_layer", 0) // 2
    if not 0 <= tables <= limit:
        raise ValueError(f"value_embeddings must be between 0 and n_layer // 2 = {limit} (each "
                         f"table feeds one of the first and one of the last layers), got {tables}")


def projection(config, part, in_features, out_features):
    """A block's Linear, with LoRA adapters if lora_rank > 0 and lora_targets names this part."""
    if config.lora_rank > 0 and part in config.lora_targets.split(","):
        return LoRALinear(in_features, out_features, config.bias, config.lora_rank,
                          config.lora_alpha, config.lora_dropout)
    return nn.Linear(in_features, out_features, bias=config.bias)


def norm(config):
    """The normalisation before each block's attention and MLP and before the head."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def value_table(config, layer):
    """The value table mixed into `layer`'s attention values, or None: table i feeds layer i and its
    mirror n_layer - 1 - i, as in modded-nanogpt (tokens straight to the first and last layers)."""
    if layer < config.value_embeddings:
        return layer
    if layer >= config.n_layer - config.value_embeddings:
        return config.n_layer - 1 - layer
    return None


ROPE_THETA = 10000.0  # RoFormer's base of the rotary frequencies (hf.py writes it to config.json)


def rotary_tables(config):
    """cos and sin of each position's angles, (block_size, head_dim / 2), at base ROPE_THETA."""
    head_dim = config.n_embd // config.n_head
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inverse_frequency = 1.0 / ROPE_THETA ** exponents
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inverse_frequency)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotates (B, heads, T, head_dim) queries or keys: each half-pair by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = projection(config, "attn", config.n_embd, 3 * config.n_embd)
        self.c_proj = projection(config, "attn", config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        head_dim = config.n_embd // config.n_head
        self.q_norm = nn.RMSNorm(head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if config.qk_norm else nn.Identity()
        if value_table(config, layer) is not None:
            # v = lambda_a v + lambda_b ve, half each as in modded-nanogpt: the mix starts as the
            # two parts' average, no larger than either, and both get gradients from the first step
            self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x, kv_cache=None, rotary=None, value_embedding=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        if value_embedding is not None:  # (B, T, C): the tokens' rows of this layer's value table
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * value_embedding.to(v.dtype)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if isinstance(self.q_norm, nn.RMSNorm):
            # fp32 like its weight: autocast's bf16 input and an fp32 weight miss the fused kernel
            q, k = self.q_norm(q.float()).type_as(v), self.k_norm(k.float()).type_as(v)
        if rotary is not None:  # (cos, sin) of these T positions
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        start = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # every position's so far (engine.KVCache)
        # causal: query i sees keys up to start + i. SDPA's is_causal aligns query 0 with key 0,
        # right without cached keys; after them, T > 1 new tokens need the mask written out
        mask = (torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
                if start and T > 1 else None)
        is_causal = T > 1 and not start
        dropout_p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # torch's CPU attention is 2-3x slower in bf16 than fp32 at the lengths CPUs train (T=64
            # forward+backward, bench/attention_speed.py): under CPU autocast it runs in fp32
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask,
                                                   dropout_p=dropout_p,
                                                   is_causal=is_causal).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=dropout_p,
                                               is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def mlp_width(config):
    """MLP hidden width: 4 x n_embd; SwiGLU's (two input matrices) 2/3 of that: same params."""
    return 8 * round(config.n_embd / 3) if config.mlp == "swiglu" else 4 * config.n_embd


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        hidden = mlp_width(config)
        self.c_fc = projection(config, "mlp", config.n_embd,
                               2 * hidden if config.mlp == "swiglu" else hidden)
        self.c_proj = projection(config, "mlp", hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rotary=None, value_embedding=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rotary, value_embedding)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        learned_positions = config.pos_embedding == "learned"
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)}
               if learned_positions else {}),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            "ln_f": norm(config),
            **({"ve": nn.ModuleList(nn.Embedding(config.vocab_size, config.n_embd)
                                    for _ in range(config.value_embeddings))}
               if config.value_embeddings else {}),
        })
        if config.unet_skips:
            # skip_weights[i] scales block i's output where its mirror takes it back. 1, as in
            # modded-nanogpt, opens every skip, so the first half gets the second half's gradients
            # from the first step; each weight is learned, down to 0 where a skip does not help.
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        if not learned_positions:  # rotary tables: not in the state dict, recomputed from config
            cos, sin = rotary_tables(config)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one matrix embeds and un-embeds
        self.apply(self._init_weights)
        # GPT-2 scales each residual branch's output projection so the stream's variance does not
        # grow with depth (two branches per layer); zero_init_proj starts them at zero: every block
        # is then the identity, and the first steps train the embeddings and head on a clean stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init_proj:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.lora_rank > 0:  # only the adapters train
            for name, p in self.named_parameters():
                p.requires_grad_("lora_" in name)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, kv_cache=None):
        """(logits, None) without targets: at every position, or with a KV cache at the last only.
        (None, mean cross-entropy over targets != -100) with them, no logits: a caller holding
        a micro-batch's (1.6 GB in bf16 at B=16, T=1024) would keep them past the next forward."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.logits(x if kv_cache is None else x[:, [-1]]), None
        logits = self.logits(x)
        return None, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                     ignore_index=-100)

    def logits(self, x):
        """The LM head on final hidden states; logit_softcap tanh-squashes them into (-cap, cap)."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def hidden_states(self, idx, kv_cache=None):
        """The final normalised residual stream, (B, T, n_embd): what the LM head reads."""
        T = idx.size(1)
        start = kv_cache.pos if kv_cache is not None else 0
        block_size = self.config.block_size
        assert start + T <= block_size, f"sequence of {start + T} exceeds block_size {block_size}"
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.pos_embedding == "learned":
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(positions)
        else:
            rotary = self.rotary_cos[start:start + T], self.rotary_sin[start:start + T]
        x = self.blocks(self.transformer.drop(x), idx, kv_cache, rotary)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def blocks(self, x, idx, kv_cache, rotary):
        """The residual stream through the blocks, plus value embeddings and U-net skips if on."""
        cfg = self.config
        values = [table(idx) for table in self.transformer.ve] if cfg.value_embeddings else []
        half = cfg.n_layer // 2 if cfg.unet_skips else 0
        kept = []  # first half's outputs, taken back last first (an odd middle block takes none)
        for layer, block in enumerate(self.transformer.h):
            if layer >= cfg.n_layer - half:
                x = x + self.skip_weights[len(kept) - 1] * kept.pop()
            table = value_table(cfg, layer)
            x = block(x, kv_cache, rotary, None if table is None else values[table])
            if layer < half:
                kept.append(x)
        return x

    # ---- counting ----

    def num_params(self, embeddings=True, trainable_only=False):
        """Unique parameters (a tied head counted once); embeddings=False drops the token, position
        and value tables; trainable_only counts those with gradients (with LoRA, the adapters)."""
        if trainable_only:
            return sum(p.numel() for p in self.parameters() if p.requires_grad)
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.transformer.wte.weight.numel() + self.lookup_tables_size()
        return n

    def lookup_tables_size(self):
        """Elements of the position and value tables: read by index only, never in a matmul."""
        return sum(p.numel() for name, p in self.transformer.named_parameters()
                   if name.startswith(("wpe.", "ve.")))

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·H·Q·T. N: the
        weights in matmuls, all parameters but lookup tables (positions, value embeddings, tokens
        unless the head shares them); the second term: attention's score and value matmuls."""
        cfg = self.config
        T = seq_len or cfg.block_size
        lookups = self.lookup_tables_size() + (0 if cfg.tie_embeddings
                                               else self.transformer.wte.weight.numel())
        n_matmul = self.num_params() - lookups
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    # ---- generation ----

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 vocab_limit=None, generator=None):
        """Continue each row of `idx` by `max_new_tokens` tokens, with a KV cache: one prefill, then
        only the newest token each step. Positions are absolute: once the sequence outgrows
        block_size the cached keys would sit at wrong positions, so every step re-prefills the last
        block_size tokens (slower, same tokens). temperature=0 is greedy; `vocab_limit` keeps padded
        entries unsampled; `generator` draws without the global RNG. In eval mode, then restored."""
        was_training = self.training
        self.eval()
        try:
            with generation_attention():
                return self._generate(idx, max_new_tokens, temperature, top_k, top_p, vocab_limit,
                                      generator)
        finally:
            self.train(was_training)

    def new_cache(self, batch_size, device):
        """An empty KV cache in the dtype of attention's keys and values: autocast's where on."""
        device_type = torch.device(device).type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.lm_head.weight.dtype
        return KVCache(self.config, batch_size, device, dtype)

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, vocab_limit, generator):
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if cache is None or cache.pos >= block_size:
                cache = self.new_cache(idx.size(0), idx.device)
                logits, _ = self(idx[:, -block_size:], kv_cache=cache)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            next_id = sample_next(logits[:, -1, :vocab_limit].float(), temperature, top_k, top_p,
                                  generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

