"""Muon: an optimizer for hidden weight matrices, with AdamW for every other parameter
(optimizers.configure_optimizer)."""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adamw import adamw

A, B, C = 3.4445, -4.7750, 2.0315  # Keller Jordan's quintic Newton-Schulz coefficients


def orthogonalize(update, steps=5, dtype=torch.bfloat16, gram=None):
    """Approximately the semi-orthogonal matrix nearest to `update` (U V^T of its SVD), by a quintic
    Newton-Schulz iteration in `dtype` whose coefficients (Keller Jordan's) drive every singular
    value towards 1 in a few steps. `update` is one matrix or a stack of same-shape matrices
    (..., rows, cols): a stack is orthogonalised matrix by matrix, with one batched matmul per
    product for all of them. `gram` picks the iteration's form (newton_schulz or
    gram_newton_schulz, the same maths); None: the one use_gram_form picks."""
    x = update.to(dtype).reshape(-1, *update.shape[-2:])
    transposed = x.size(1) > x.size(2)
    if transposed:
        x = x.mT
    # every singular value of scale X <= 1: it converges
    scale = 1 / (x.norm(dim=(1, 2), keepdim=True) + 1e-7)
    if gram is None:
        gram = use_gram_form(*x.shape[1:], steps, dtype)
    if not gram or x.dtype.itemsize < 4:  # the Gram form scales its small matrices, but in 16 bits
        x, scale = x * scale, 1.0  # X X^T of X unscaled could leave fp16's range
    x = gram_newton_schulz(x, steps, scale) if gram else newton_schulz(x, steps)
    return (x.mT if transposed else x).reshape(update.shape).to(update.dtype)


def newton_schulz(x, steps):
    """X <- a X + (b G + c G^2) X with G = X X^T, on a stack of wide matrices (rows <= cols);
    baddbmm folds the sums into products (on CPU 1.3-1.8x faster than separate ops, at 128 wide)."""
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=B, alpha=C), x, beta=A)
    return x


def gram_newton_schulz(x, steps, scale):
    """newton_schulz of scale X on rows x rows matrices (gram_segment), restarted from X as
    gram_segments says. The scale goes to the small matrices, not to X (a pass and a copy fewer)."""
    for segment in gram_segments(steps, x.dtype):
        x, scale = gram_segment(x, segment, scale), 1.0
    return x


def gram_segments(steps, dtype):
    """The steps of each segment between restarts (G = X X^T afresh, which keeps G positive
    semi-definite and P small): in 16-bit floats [3, 2] for 5 steps; in fp32 and fp64 one segment.
    Against the float64 iteration, on rank-2 to rank-8 and condition-1e6 matrices 32-128 x 96-512:
    without a restart bf16 diverged (up to 2.5e7; plain: 0.21), 3 + 2 steps stayed within 0.17
    (better than 2 + 3 or 4 + 1, which cost the same); fp32 drifted by at most 2.8e-4 (3 + 2: 6e-6),
    far inside the iteration's own spread of singular values (0.7 to 1.2), and a restart's two
    products of X's size made Muon's step at the char CPU shape 16% dearer."""
    every = 3 if dtype.itemsize < 4 else max(steps, 1)
    return [min(every, steps - start) for start in range(0, steps, every)]


def gram_segment(x, steps, scale=1.0):
    """`steps` (>= 1) of newton_schulz from X_0 = scale X on rows x rows matrices only: every
    iterate is X_k = P_k X_0, P_k a polynomial in G_0 = X_0 X_0^T; with Q = a I + b G_k + c G_k^2,
    P_{k+1} = Q P_k and G_{k+1} = Q G_k Q (all commute); (scale P) X at the end."""
    gram, poly = torch.bmm(x, x.mT) * scale**2, None
    for step in range(steps):
        q = torch.baddbmm(gram, gram, gram, beta=B, alpha=C)
        q.diagonal(dim1=1, dim2=2).add_(A)
        poly = q if poly is None else torch.bmm(q, poly)
        if step < steps - 1:
            gram = torch.bmm(torch.bmm(q, gram), q)
    return torch.bmm(poly * scale, x)


def newton_schulz_flops(rows, cols, steps, gram, dtype):
    """Multiply-adds of one iteration on a rows x cols matrix (rows <= cols). Plain: X X^T, G G and
    (.) X each step. Gram, per segment (gram_segments: they depend on the dtype): X X^T and P X at
    its ends, G G each step, Q G Q on all but its last, Q P on all but its first."""
    if not gram:
        return steps * (2 * rows * rows * cols + rows**3)
    return sum(2 * rows * rows * cols + (4 * segment - 3) * rows**3
               for segment in gram_segments(steps, dtype))


def use_gram_form(rows, cols, steps, dtype):
    """The gram form where it does fewer multiply-adds: for 2+ steps where cols > 1.5 rows (e.g.
    GPT's attention and MLP input and output matrices, not square ones), any dtype or device."""
    return (newton_schulz_flops(rows, cols, steps, True, dtype)
            < newton_schulz_flops(rows, cols, steps, False, dtype))


def default_ns_dtype(device):
    """bf16 on CUDA (tensor cores); fp32 elsewhere: on this project's CPU machine (AMD EPYC, AVX2,
    no avx512_bf16) the char CPU recipe's Newton-Schulz took 34-37x as long in bf16 as in fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def in_strips(shape, block):
    """Whether Muon orthogonalises a rows x cols matrix in strips `block` wide across its longer
    side (cols on ties): where block > 0 cuts that side into two or more, LoRA factors included.
    Other matrices go whole (e.g. a SwiGLU MLP whose hidden size the head size does not divide)."""
    side = max(shape)
    return 0 < block < side and side % block == 0


def to_strips(matrix, block):
    """The pieces of a rows x cols matrix that Muon orthogonalises one by one, as a stack of views
    of it: the whole matrix (turned wide), or its strips (in_strips). One head wide, GPT's attention
    input matrix is cut into each head's query, key and value rows, its output projection into each
    head's columns, its MLP into groups of units."""
    rows, cols = matrix.shape
    if not in_strips(matrix.shape, block):
        return (matrix.mT if rows > cols else matrix).unsqueeze(0)
    if rows > cols:  # view, not reshape: the update is added through these pieces, so no copies
        return matrix.view(rows // block, block, cols)
    return matrix.view(rows, cols // block, block).permute(1, 2, 0)


def strip_scale(strips, cols):
    """Makes an orthogonalised piece's RMS 1 / sqrt(cols): Muon's sqrt(max(1, rows / cols)) for a
    whole matrix, the same update size for strips, so muon_lr carries over between the two."""
    return (max(strips.shape[1:]) / cols) ** 0.5


# On CPU, at most this many elements per batched Newton-Schulz call (16 MB in fp32): larger
# temporaries are mapped afresh at every step there (at 124M, strips one head wide in one batch of
# 85M elements took 1.19 s to orthogonalise, in batches of 12-25 MB 0.77-0.78 s). A GPU takes each
# shape's pieces in one call: a cap there only adds launches.
BATCH_ELEMENTS = 1 << 22


def batches(pieces, limit=BATCH_ELEMENTS):
    """Indices into `pieces` (stacks of matrices), grouped by matrix shape and cut into batches of
    at most `limit` elements (at least one stack each; None: no limit)."""
    by_shape = {}
    for index, piece in enumerate(pieces):
        by_shape.setdefault(piece.shape[1:], []).append(index)
    for indices in by_shape.values():
        batch, size = [], 0
        for index in indices:
            if batch and limit is not None and size + pieces[index].numel() > limit:
                yield batch
                batch, size = [], 0
            batch.append(index)
            size += pieces[index].numel()
        yield batch


def orthogonalize_shared(stack, dtype):
    """orthogonalize of a stack of matrices, the work shared by the processes of a run: each
    orthogonalises its share of the matrices and all gather the results (modded-nanogpt's scheme).
    Every process holds the same stack (DDP's all-reduced gradients, FSDP's gathered matrices), so
    all end with the same result."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return orthogonalize(stack, dtype=dtype)
    count = stack.size(0)
    share = math.ceil(count / world)
    if share * world > count:  # zero matrices make the shares equal; they orthogonalise to zero
        stack = torch.cat([stack, stack.new_zeros(share * world - count, *stack.shape[1:])])
    rank = dist.get_rank()
    mine = orthogonalize(stack[rank * share:(rank + 1) * share], dtype=dtype).contiguous()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return torch.cat(gathered)[:count]


def local(tensor):
    """This process's part of a tensor: its shard under FSDP, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(update, param):
    """The whole matrix of which `update` is param's shard (FSDP: gathered from every process)."""
    if not isinstance(param, DTensor):
        return update
    return DTensor.from_local(update, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor()


def shard_of(matrix, param):
    """param's shard of a whole matrix every process holds (a local slice: no communication)."""
    replicated = DTensor.from_local(matrix, param.device_mesh,
                                    [Replicate()] * param.device_mesh.ndim, run_check=False)
    return replicated.redistribute(param.device_mesh, param.placements).to_local()


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for groups marked `muon`: Nesterov momentum, then the update
    orthogonalised and scaled by sqrt(max(1, rows / cols)), or with `block` > 0 orthogonalised strip
    by strip (to_strips; a strip one head wide does a fraction of a whole matrix's work) and scaled
    alike (strip_scale); plain AdamW for the other groups. Weight decay is decoupled (scaled by the
    lr) in both. One optimizer, so the loop and the checkpoints treat it like AdamW.

    The state is per parameter, as in torch's optimizers (checkpoints key it by parameter name): a
    Muon matrix holds `momentum_buffer`; an AdamW tensor `step` (a Python int), `exp_avg` and
    `exp_avg_sq`. The work is batched: same-shape pieces (whole matrices or strips) are
    orthogonalised together (in batches of at most BATCH_ELEMENTS), in `ns_dtype` (None:
    default_ns_dtype of their device), and each AdamW group is one call of torch's fused (CPU, CUDA)
    or foreach AdamW. Under torchrun the processes share the orthogonalisation
    (orthogonalize_shared); under FSDP each sharded matrix is gathered whole for it and each process
    keeps its shard of the update."""

    def __init__(self, groups, lr, betas, momentum=0.95, eps=1e-8, ns_dtype=None, block=0):
        super().__init__(groups, {"lr": lr, "betas": betas, "momentum": momentum, "eps": eps,
                                  "muon": False, "weight_decay": 0.0, "block": block})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "Muon takes no closure"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(params, group)

    def _muon_step(self, params, group):
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        # elementwise work on each process's part (its FSDP shard, or the whole tensor)
        grads = [local(p.grad) for p in params]
        momenta = [local(self.state[p]["momentum_buffer"]) for p in params]
        torch._foreach_lerp_(momenta, grads, 1 - group["momentum"])
        updates = torch._foreach_lerp(grads, momenta, group["momentum"])  # Nesterov: looks ahead
        if group["weight_decay"]:
            torch._foreach_mul_([local(p) for p in params], 1 - group["lr"] * group["weight_decay"])
        # same-shape pieces, from any matrices, are orthogonalised together (on CPU in batches of
        # BATCH_ELEMENTS); batched by the whole matrices' shapes, so an FSDP shard is gathered whole
        # only when its batch comes (all at once, every process would hold every Muon matrix whole)
        block = group["block"]
        shapes = [to_strips(torch.empty(p.shape, device="meta"), block) for p in params]
        for indices in batches(shapes, BATCH_ELEMENTS if params[0].device.type == "cpu" else None):
            wholes = {i: whole(updates[i], params[i]) for i in indices}
            dtype = self.ns_dtype or default_ns_dtype(params[indices[0]].device)
            strips = [to_strips(wholes[i], block) for i in indices]
            ortho = orthogonalize_shared(torch.cat(strips), dtype)
            for i, piece in zip(indices, ortho.split([shapes[i].size(0) for i in indices])):
                p, alpha = params[i], -group["lr"] * strip_scale(piece, params[i].size(1))
                if isinstance(p, DTensor):  # orthogonalised into the gathered update, then sliced
                    to_strips(wholes[i], block).copy_(piece)
                    local(p).add_(shard_of(wholes[i], p), alpha=alpha)
                else:  # its own pieces are views of it: the update lands in place, no reassembly
                    to_strips(p, block).add_(piece, alpha=alpha)

    def _adamw_step(self, params, group):
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        # torch's AdamW matches the loop it replaced (decay by lr x weight_decay first; eps added to
        # the root of the bias-corrected second moment), in one kernel a group (tests/test_muon.py)
        device = params[0].device
        fused = device.type in ("cpu", "cuda")
        # its kernels count steps in tensors (on the device, for fused), made here from the ints
        # kept; to a GPU from pinned memory without blocking (a copy from pageable memory waits for
        # the GPU's queue to drain)
        steps = torch.tensor([float(s["step"]) for s in states])
        if fused and device.type == "cuda":
            steps = steps.pin_memory()
        steps = steps.to(device if fused else "cpu", non_blocking=True).unbind()
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], list(steps), fused=fused, foreach=not fused,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        for state in states:
            state["step"] += 1
