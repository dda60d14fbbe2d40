"""Which optimizer trains which parameters, at which learning rate: the decay rule, the groups by
role, and AdamW or Muon (muon.py) over them. Kept beside the optimizers, not in the model: the model
never knows how it is trained."""

import inspect

import torch
from torch import nn

from muon import Muon


def optimizer_groups(model, weight_decay):
    """The decay rule, as [decay, no decay] groups of the trainable tensors: every tensor of 2 or
    more dimensions decays (the Linear weight matrices and the token, position and value embedding
    tables); biases, norm weights and the learned scalars of the options (1-D) never decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_groups(model, weight_decay, learning_rate, muon_lr=None, embedding_lr=None, head_lr=None):
    """optimizer_groups' decay group split by role, in this order, each empty one dropped: the
    blocks' weight matrices (only with muon_lr: Muon's, marked `muon`), the embedding tables
    (embedding_lr), the untied head (head_lr), the other matrices, then the no-decay group. Each
    carries `lr_scale`, its peak lr over learning_rate (1 where none is given): the loop sets every
    group's lr as schedule x lr_scale."""
    if head_lr and model.config.tie_embeddings:
        raise ValueError("head_lr needs tie_embeddings=False: a tied head is the token embedding, "
                         "which trains at embedding_lr")
    decay, no_decay = optimizer_groups(model, weight_decay)
    block_matrices = {p for name, p in model.named_parameters() if p.dim() == 2 and ".h." in name}
    embeddings = {m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    roles = [  # (settings, members); an lr of None or 0 is learning_rate's
        ({"muon": True, "lr_scale": (muon_lr or learning_rate) / learning_rate},
         block_matrices if muon_lr else ()),
        ({"lr_scale": (embedding_lr or learning_rate) / learning_rate}, embeddings),
        ({"lr_scale": (head_lr or learning_rate) / learning_rate},
         () if model.config.tie_embeddings else {model.lm_head.weight}),
    ]
    groups, rest = [], decay["params"]
    for settings, members in roles:
        groups.append({"params": [p for p in rest if p in members], "weight_decay": weight_decay,
                       **settings})
        rest = [p for p in rest if p not in members]
    groups += [{"params": rest, "weight_decay": weight_decay, "lr_scale": 1.0},
               {**no_decay, "lr_scale": 1.0}]
    return [group for group in groups if group["params"]]


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, muon_lr=None,
                        embedding_lr=None, head_lr=None, muon_split="whole"):
    """AdamW over lr_groups; with muon_lr, Muon (AdamW for every group but the blocks' matrices),
    which orthogonalises whole matrices (Muon as published, the default here) or, with
    muon_split="head" (train.py's default), strips one head wide."""
    groups = lr_groups(model, weight_decay, learning_rate, muon_lr, embedding_lr, head_lr)
    if muon_lr:
        block = model.config.n_embd // model.config.n_head if muon_split == "head" else 0
        optimizer = Muon(groups, lr=learning_rate, betas=betas, block=block)
    else:
        # the fused kernel (CUDA; CPU since torch 2.4): all tensors in one pass, not a dozen ops
        fused = (device_type in ("cuda", "cpu")
                 and "fused" in inspect.signature(torch.optim.AdamW).parameters)
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                      **({"fused": True} if fused else {}))
    set_lr(optimizer, learning_rate)  # each group at its peak until the loop sets the schedule's
    return optimizer


def set_lr(optimizer, lr):
    """Set the schedule's lr for the next step: each group's is lr x its lr_scale (lr_groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
