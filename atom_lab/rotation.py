"""Rotations (QuaRot-style): spread outlier channels over all channels with an orthogonal matrix, offline.

For an orthogonal Q (Q @ Q.T = I) a linear layer computes the same output from a rotated input if its weight is
rotated too: x @ W.T = (x @ Q) @ (W @ Q).T. A Llama-architecture decoder allows this for its whole residual stream
(QuaRot, Ashkboos et al. 2024): once every RMSNorm's weight is folded into the linears that read it, RMSNorm(x @ Q)
= RMSNorm(x) @ Q (an orthogonal matrix keeps the norm of every row), so

    embedding E -> E @ Q                 (the residual stream now holds x @ Q)
    q/k/v, gate/up, lm_head W -> W @ Q   (they read the rotated, normed stream)
    o_proj, down_proj W -> Q.T @ W       (they write into it), bias b -> b @ Q

and the float model's logits are unchanged up to float rounding. A tied lm_head must be untied: it needs the final
norm's weight folded in, the embedding does not. The input of down_proj, SiLU(gate) * up, is not linear in the
residual stream and cannot be rotated by a weight fold: it is rotated at run time (an "online" rotation, a
forward pre-hook here; the Triton backend fuses it into the SiLU * up + quantize kernel) and down_proj's weight
absorbs the inverse offline: W -> W @ Qd.

The matrices: a Hadamard matrix H (entries +-1, H @ H.T = n I) scaled by 1/sqrt(n) where one of order n can be
built (Sylvester 2^k, Paley I for a prime p = 3 mod 4 (order p + 1), Paley II for a prime p = 1 mod 4 (order
2(p + 1)), and Kronecker products of those: 576 = 12 x 48, 1536 = 12 x 128), with its columns' signs flipped by a
seeded random sign vector (QuaRot's "randomised Hadamard"); or a seeded random orthogonal matrix (QR of a Gaussian).
"""
from __future__ import annotations

import functools

import torch

from atom_lab.stats import decoder_layers

ROTATIONS = ("hadamard", "random")
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------------------------------------------
# Hadamard matrices
# ---------------------------------------------------------------------------------------------------------------
def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) for the quadratic character chi of GF(p), p prime: int64 [p, p]."""
    squares = torch.zeros(p, dtype=torch.int64)
    squares[(torch.arange(1, p) ** 2) % p] = 1
    chi = 2 * squares - 1
    chi[0] = 0
    i = torch.arange(p)
    return chi[(i[None, :] - i[:, None]) % p]


def _paley1(p: int) -> torch.Tensor:
    # order p + 1, p = 3 mod 4: H = I + S with S = [[0, 1], [-1, Q]] skew-symmetric
    n = p + 1
    S = torch.zeros(n, n, dtype=torch.int64)
    S[0, 1:], S[1:, 0] = 1, -1
    S[1:, 1:] = _jacobsthal(p)
    return S + torch.eye(n, dtype=torch.int64)


def _paley2(p: int) -> torch.Tensor:
    # order 2(p + 1), p = 1 mod 4: C = [[0, 1], [1, Q]] symmetric; each 0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]]
    n = p + 1
    C = torch.zeros(n, n, dtype=torch.int64)
    C[0, 1:], C[1:, 0] = 1, 1
    C[1:, 1:] = _jacobsthal(p)
    zero = torch.tensor([[1, -1], [-1, -1]])
    one = torch.tensor([[1, 1], [1, -1]])
    return torch.where((C == 0)[:, :, None, None], zero, C[:, :, None, None] * one).permute(0, 2, 1, 3).reshape(
        2 * n, 2 * n)


@functools.lru_cache(maxsize=None)
def _construction(n: int) -> tuple | None:
    """How to build a Hadamard matrix of order n: ("sylvester", n) | ("paley1", p) | ("paley2", p) |
    ("kron", a, b), or None when none of these constructions reaches n."""
    if n == 1 or (n & (n - 1)) == 0:
        return ("sylvester", n)
    if n % 4:
        return None  # a Hadamard matrix of order n > 2 needs 4 | n
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return ("paley1", n - 1)
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return ("paley2", n // 2 - 1)
    for a in range(2, int(n ** 0.5) + 1):
        if n % a == 0 and _construction(a) is not None and _construction(n // a) is not None:
            return ("kron", a, n // a)
    return None


def hadamard_order_ok(n: int) -> bool:
    """True when hadamard(n) can build a matrix of order n."""
    return isinstance(n, int) and n >= 1 and _construction(n) is not None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n: float64 [n, n] of +-1 with H @ H.T = n * I.

    Raises a ValueError naming n when no construction here reaches it (e.g. n = 172: Williamson's construction,
    not implemented; or any n not 1, 2 or a multiple of 4); use rotation="random" then.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int (the number of channels to rotate).")
    how = _construction(n)
    if how is None:
        raise ValueError(f"no Hadamard matrix of order n={n} can be built here (Sylvester 2^k, Paley I/II for a "
                         f"prime, Kronecker products of those); use rotation='random' (a seeded random orthogonal "
                         f"matrix) for this size.")
    if how[0] == "sylvester":
        H = torch.ones(1, 1, dtype=torch.int64)
        while H.shape[0] < n:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    elif how[0] == "paley1":
        H = _paley1(how[1])
    elif how[0] == "paley2":
        H = _paley2(how[1])
    else:
        H = torch.kron(hadamard(how[1]).long(), hadamard(how[2]).long())
    return H.double()


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A seeded random vector of +-1: float64 [n] (the same for the same seed on every machine)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal matrix (Haar-distributed: QR of a Gaussian with R's diagonal made positive):
    float64 [n, n]."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """An orthogonal matrix Q of order n: float64 [n, n], Q @ Q.T = I.

    kind="hadamard": diag(random_signs(n, seed)) @ hadamard(n) / sqrt(n) (raises for orders without a
    construction); kind="random": random_orthogonal(n, seed).
    """
    if kind not in ROTATIONS:
        raise ValueError(f"kind={kind!r} is not a rotation; use one of {ROTATIONS}.")
    if kind == "random":
        return random_orthogonal(n, seed)
    return random_signs(n, seed)[:, None] * hadamard(n) / n ** 0.5


# ---------------------------------------------------------------------------------------------------------------
# Folding and rotating a model
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _set_weight(linear: torch.nn.Module, w64: torch.Tensor) -> None:
    linear.weight.data = w64.to(linear.weight.dtype).contiguous()


@torch.no_grad()
def fold_rmsnorm(norm: torch.nn.Module, linears: list[torch.nn.Module]) -> None:
    """Fold an RMSNorm's weight w [H] into the linears reading its output (W -> W * w, column j scaled by w[j])
    and set w to ones: the outputs are unchanged, and the norm becomes rotation-equivariant."""
    w = norm.weight.double()
    for lin in linears:
        _set_weight(lin, lin.weight.double() * w[None, :])
    norm.weight.data.fill_(1.0)


class OnlineRotation:
    """A forward pre-hook rotating a module's input at run time: x [..., K] -> x @ Q, in float32 (float64 for a
    float64 model). Q [K, K] is kept on the module as the non-persistent buffer `atom_online_rotation`: it moves
    with the model and is not saved in its state_dict. The Triton backend fuses it into silu_mul_hadamard_quantize instead."""

    def __call__(self, module, args):
        q = module.atom_online_rotation
        x = args[0]
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp16 / bf16 inputs: rotate in float32
        return ((x.to(dt) @ q.to(dt)).to(x.dtype),) + tuple(args[1:])


def add_online_rotation(module: torch.nn.Module, q: torch.Tensor) -> None:
    """Rotate `module`'s input by q (float [K, K]) at run time (OnlineRotation), e.g. a down_proj whose weight was
    already multiplied by q offline."""
    weight = getattr(module, "weight", None)
    dt = torch.float64 if weight is not None and weight.dtype == torch.float64 else torch.float32
    module.register_buffer("atom_online_rotation", q.to(dt).contiguous(), persistent=False)
    module.atom_online_rotation_hook = module.register_forward_pre_hook(OnlineRotation())


def online_rotation(module: torch.nn.Module) -> torch.Tensor | None:
    """The online rotation of a module's input (float32 [K, K]) or None."""
    return getattr(module, "atom_online_rotation", None)


@torch.no_grad()
def rotate_model(model, kind: str = "hadamard", seed: int = 0, online_down: bool = True):
    """Rotate a llama / mistral / qwen2 decoder's residual stream by one orthogonal matrix, IN PLACE; returns it.

    Every RMSNorm (the two per block and the final one) is folded into its readers; a tied lm_head is untied
    (config.tie_word_embeddings = False); then embedding, readers, writers and lm_head are rotated as in the module
    docstring (in float64, rounded once to the model's dtype). With online_down, every down_proj input is also
    rotated (its own matrix of order intermediate_size, seed + 1) by an OnlineRotation. model.atom_rotation records
    what was done. The float outputs are unchanged up to float rounding.
    """
    if kind not in ROTATIONS:
        raise ValueError(f"kind={kind!r} is not a rotation; use one of {ROTATIONS}.")
    if getattr(model, "atom_rotation", None) is not None:
        raise ValueError("model is already rotated (model.atom_rotation is set); reload the float model first.")
    blocks = decoder_layers(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    final_norm = getattr(getattr(model, "model", None), "norm", None)
    if final_norm is None or head is None:
        raise NotImplementedError("rotate_model knows llama / mistral / qwen2 decoders (model.model.norm, lm_head).")
    H = emb.weight.shape[1]
    for i, b in enumerate(blocks):
        for n in READERS + WRITERS:
            if not isinstance(b.get_submodule(n), torch.nn.Linear):
                raise ValueError(f"block {i}: {n} is not an nn.Linear (is the model already quantized?); rotate the "
                                 "float model before quantize_model.")
        for n in READERS:
            if getattr(b.get_submodule(n), "bias", None) is not None and n.startswith("mlp"):
                raise NotImplementedError(f"block {i}: {n} has a bias; gated MLPs with biases are not supported.")
    Q = rotation_matrix(H, kind, seed)
    if head.weight is emb.weight:  # tied: the head gets the final norm folded in, the embedding must not
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    fold_rmsnorm(final_norm, [head])
    _set_weight(head, head.weight.double() @ Q)
    _set_weight(emb, emb.weight.double() @ Q)
    qd = None
    for b in blocks:
        fold_rmsnorm(b.input_layernorm, [b.get_submodule(n) for n in READERS[:3]])
        fold_rmsnorm(b.post_attention_layernorm, [b.get_submodule(n) for n in READERS[3:]])
        for n in READERS:
            lin = b.get_submodule(n)
            _set_weight(lin, lin.weight.double() @ Q)
        for n in WRITERS:
            lin = b.get_submodule(n)
            _set_weight(lin, Q.T @ lin.weight.double())
            if lin.bias is not None:
                lin.bias.data = (lin.bias.double() @ Q).to(lin.bias.dtype)
        if online_down:
            down = b.mlp.down_proj
            if qd is None:
                qd = rotation_matrix(down.in_features, kind, seed + 1)
                # One copy in the run-time dtype, shared by every block's buffer (add_online_rotation keeps a tensor
                # already of its dtype): a copy per layer would be 32 x 485 MB for Llama-2-7B's 11008.
                dt = torch.float64 if down.weight.dtype == torch.float64 else torch.float32
                q_online = qd.to(down.weight.device, dt).contiguous()
            _set_weight(down, down.weight.double() @ qd)
            add_online_rotation(down, q_online)
    model.atom_rotation = {"kind": kind, "seed": seed, "hidden": H, "online_down": online_down,
                           "down_order": blocks[0].mlp.down_proj.in_features if online_down else None}
    return model
