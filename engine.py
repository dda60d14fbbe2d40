"""Generation for people (sample.py): one sequence fed through a KV cache kept between calls, so a
chat's earlier turns are not recomputed, and text streamed to the console as it is sampled, ending
at the end-of-text token or at a stop string. model.generate is the batched sampler the training
loop uses; this is the one-at-a-time one, as nanochat keeps its engine beside the model."""

import torch

from model import generation_attention, sample_next


class Session:
    """A growing token sequence and the model's next-token logits after it. Tokens fed go through
    the KV cache one at a time (the cache takes one prefill, then single tokens); when it would
    overflow the context, it starts again from the sequence's last half context, prefilled at once
    (forgetting earlier tokens)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.ids, self.cache, self.logits = [], None, None

    @torch.no_grad()
    def feed(self, ids):
        block_size = self.model.config.block_size
        self.ids += ids
        with generation_attention():  # model.generate's kernels: no cuDNN plan per key length
            if self.cache is None or self.cache.pos + len(ids) > block_size:
                tail = self.ids[-(block_size // 2):] if len(self.ids) > block_size else self.ids
                self.cache = self.model.new_cache(1, self.device)
                self.logits = self.model(torch.tensor([tail], device=self.device),
                                         kv_cache=self.cache)[0][0, -1]
                return
            for token in ids:
                self.logits = self.model(torch.tensor([[token]], device=self.device),
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
