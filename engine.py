"""Generation: the parts both samplers share, then generation for people.

model.generate is the batched sampler the training loop uses (a fresh KV cache per call); Session
is sample.py's one sequence, fed through a KV cache kept between calls so a chat's earlier turns
are not recomputed, and Streamer prints its text as it is sampled, ending at the end-of-text token
or at a stop string. Both use KVCache, generation_attention and sample_next, kept here beside the
model as nanochat keeps its engine (model.py imports them; this file imports nothing of ours)."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class KVCache:
    """Every layer's keys and values for the positions seen so far, preallocated to `block_size`."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size,
                 config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled; all layers write [pos, pos + T) before pos advances

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def generation_attention():
    """Attention kernels for generation: all but cuDNN's, which plans per key length (one per
    generated token) and made H200 KV-cache sampling slower than recomputing (bench/RESULTS.md)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V): greedy at temperature 0, else top-k, then top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once those ranked above it hold top_p of the mass; the first always stays
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class Session:
    """A growing token sequence and the model's next-token logits after it. Tokens fed go through
    the KV cache in one forward; when they would overflow the context, it starts again from the
    sequence's last half context (forgetting earlier tokens)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.ids, self.cache, self.logits = [], None, None

    @torch.no_grad()
    def feed(self, ids):
        block_size = self.model.config.block_size
        self.ids += ids
        if self.cache is None or self.cache.pos + len(ids) > block_size:
            self.cache = self.model.new_cache(1, self.device)
            ids = self.ids[-(block_size // 2):] if len(self.ids) > block_size else self.ids
        with generation_attention():  # model.generate's kernels: no cuDNN plan per key length
            self.logits = self.model(torch.tensor([ids], device=self.device),
                                     kv_cache=self.cache)[0][0, -1]


class Streamer:
    """Decoded text of the tokens sampled so far, printed as it becomes final: a piece that may yet
    open a stop string, or bytes of a character not yet complete, wait for the next token."""

    def __init__(self, tokenizer, stops, write):
        self.tokenizer, self.stops, self.write = tokenizer, [s for s in stops if s], write
        self.ids, self.printed = [], ""

    def add(self, token):
        """Take one sampled token; True once the text holds a stop string (cut there, printed)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        found = [text.index(stop) for stop in self.stops if stop in text]
        if found:
            self.show(text[:min(found)])
            return True
        held = max((n for stop in self.stops for n in range(1, len(stop))
                    if text.endswith(stop[:n])), default=0)
        self.show(text[:len(text) - held].rstrip("\ufffd"))
        return False

    def finish(self):
        self.show(self.tokenizer.decode(self.ids))

    def show(self, text):
        if len(text) > len(self.printed) and text.startswith(self.printed):
            self.write(text[len(self.printed):])
            self.printed = text


def stream(session, streamer, sampling, max_new_tokens, eot_id=None):
    """Sample up to max_new_tokens after the session's tokens, each fed back into it and given to
    the streamer, until the end-of-text token (`eot_id`; fed, not shown) or a stop string.
    `sampling`: (temperature, top_k, top_p, vocab_limit, generator). Returns the text shown."""
    temperature, top_k, top_p, vocab_limit, generator = sampling
    for _ in range(max_new_tokens):
        logits = session.logits[:vocab_limit].float()[None]
        token = sample_next(logits, temperature, top_k, top_p, generator).item()
        session.feed([token])
        if token == eot_id:
            break
        if streamer.add(token):
            return streamer.printed
    streamer.finish()
    return streamer.printed
