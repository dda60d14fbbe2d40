"""LoRA (Hu et al., 2021): low-rank adapters on a GPT's projections, kept out of the model file as
litgpt keeps them. model.py builds a LoRALinear where its config asks for adapters (lora_rank,
lora_targets); what a LoRA fine-tune does with them, its adapters alone and their merge into the
weights, is here; their files in PEFT's layout are hf.py's."""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """A frozen Linear plus a trained low-rank update (LoRA): y = x W^T + b + (alpha / r) x A^T B^T.

    B starts at zero, so training starts from the base model's function. Being an nn.Linear with two
    extra parameters, it keeps the base's state-dict names (`weight`, `bias`) and adds `lora_A`,
    `lora_B`.
    """

    def __init__(self, in_features, out_features, bias, rank, alpha, dropout):
        super().__init__(in_features, out_features, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return super().forward(x) + self.scale * update

    def merged_weight(self):
        return self.weight + self.scale * self.lora_B @ self.lora_A


def adapter_state(model):
    """Only the LoRA adapters' tensors: all a LoRA fine-tune adds to its base weights."""
    return {name: t for name, t in model.state_dict().items() if ".lora_" in name}


def merge_lora(model):
    """A plain model of the same class (no adapters) whose weights hold the adapters' updates: the
    same function, no extra cost per token, and the layout every other tool reads. A model without
    adapters is returned as it is."""
    if not model.config.lora_rank:
        return model
    merged = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            merged[f"{name}.weight"] = module.merged_weight().detach()
    plain = type(model)(replace(model.config, lora_rank=0)).to(model.lm_head.weight.device)
    plain.load_state_dict(merged)
    return plain
