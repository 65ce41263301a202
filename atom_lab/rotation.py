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
# Structured (Kronecker) rotations: what the fast online kernel applies
# ---------------------------------------------------------------------------------------------------------------
KRON_BLOCK = 128  # the fast Walsh-Hadamard transform of the kernel works on blocks of 128 channels


def kron_order(n: int) -> int | None:
    """m such that n = m x 128 with a Hadamard matrix of order m buildable here (1536 -> 12, 4096 -> 32), or None
    (e.g. 11008 = 86 x 128: no Hadamard matrix of order 86 exists, 86 is not a multiple of 4)."""
    if not isinstance(n, int) or n < KRON_BLOCK or n % KRON_BLOCK:
        return None
    m = n // KRON_BLOCK
    return m if hadamard_order_ok(m) else None


@functools.lru_cache(maxsize=1)
def _block_hadamard() -> torch.Tensor:
    return hadamard(KRON_BLOCK) / KRON_BLOCK ** 0.5  # float64 [128, 128], entries +-2^-3.5


class KronRotation(torch.nn.Module):
    """An orthogonal R = diag(signs) @ kron(A, H_128 / sqrt(128)) of order K = m x 128, applied without forming it.

    With x [..., K] read as m blocks of 128 channels (x[..., i * 128 + j] = X[i, j]), x @ R = A.T @ ((X * S) @
    H_128) / sqrt(128): a 128-point Walsh-Hadamard transform of every block (7 butterfly stages, K log 128 adds)
    and a small m x m product across blocks, instead of K^2 multiply-adds. H_128 is Sylvester's (H[j, l] =
    (-1)^popcount(j & l)); A is any orthogonal m x m matrix (hadamard(m) / sqrt(m) for QuaRot's randomised
    Hadamard, or a random orthogonal one where no Hadamard of order m exists).

    Buffers (non-persistent: saved by atom_lab.serialize, not by state_dict): signs float32 [K] of +-1, kron
    float32 [m, m] = A. One instance is shared by every block's down_proj.
    """

    def __init__(self, signs: torch.Tensor, kron: torch.Tensor):
        super().__init__()
        if signs.dim() != 1 or kron.dim() != 2 or kron.shape[0] != kron.shape[1]:
            raise ValueError(f"KronRotation needs signs [K] and a square kron [m, m], got {tuple(signs.shape)} and "
                             f"{tuple(kron.shape)}.")
        if signs.shape[0] != kron.shape[0] * KRON_BLOCK:
            raise ValueError(f"signs has {signs.shape[0]} entries but kron [{kron.shape[0]}, {kron.shape[0]}] "
                             f"rotates {kron.shape[0]} x {KRON_BLOCK} = {kron.shape[0] * KRON_BLOCK} channels.")
        self.register_buffer("signs", signs.float().contiguous(), persistent=False)
        self.register_buffer("kron", kron.float().contiguous(), persistent=False)

    @property
    def order(self) -> int:
        return self.signs.shape[0]

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The matrix R: [K, K] in dtype (computed in float64)."""
        h = _block_hadamard().to(self.kron.device)
        return (self.signs.double()[:, None] * torch.kron(self.kron.double(), h)).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R for x [..., K], in x's dtype (float32 / float64), by the structured product."""
        K, m = self.order, self.kron.shape[0]
        if x.shape[-1] != K:
            raise ValueError(f"KronRotation of order {K} cannot rotate an input with {x.shape[-1]} channels.")
        h = _block_hadamard().to(x.device, x.dtype)
        z = (x * self.signs.to(x.dtype)).reshape(*x.shape[:-1], m, KRON_BLOCK) @ h
        return torch.einsum("ik,...ic->...kc", self.kron.to(x.dtype), z).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"order={self.order} = {self.kron.shape[0]} x {KRON_BLOCK}"


def kron_rotation(n: int, kind: str = "hadamard", seed: int = 0) -> KronRotation:
    """A seeded structured rotation of order n = m x 128 (KronRotation): signs = random_signs(n, seed) and
    A = hadamard(m) / sqrt(m) (kind="hadamard") or random_orthogonal(m, seed) (kind="random", any m).
    Raises a ValueError naming n when n is not a multiple of 128, or (hadamard) has no Hadamard factor."""
    if kind not in ROTATIONS:
        raise ValueError(f"kind={kind!r} is not a rotation; use one of {ROTATIONS}.")
    if not isinstance(n, int) or isinstance(n, bool) or n < KRON_BLOCK or n % KRON_BLOCK:
        raise ValueError(f"n={n!r} must be a positive multiple of {KRON_BLOCK} for a structured rotation "
                         f"(m x {KRON_BLOCK}); use rotation_matrix(n) (dense) for other sizes.")
    m = n // KRON_BLOCK
    if kind == "hadamard":
        if not hadamard_order_ok(m):
            raise ValueError(f"n={n} = {m} x {KRON_BLOCK} but no Hadamard matrix of order {m} can be built here; "
                             f"use kind='random' (a random orthogonal {m} x {m} factor) or the dense "
                             f"rotation_matrix({n}).")
        a = hadamard(m) / m ** 0.5
    else:
        a = random_orthogonal(m, seed)
    return KronRotation(random_signs(n, seed), a)


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
    float64 model). Q is the module's `atom_online_rotation`: a dense [K, K] non-persistent buffer or a
    KronRotation submodule (applied without forming Q); either moves with the model, neither is in its state_dict
    (atom_lab.serialize stores them). The Triton backend's FusedMLP bypasses the hook and fuses the rotation into
    silu_mul_rotate_quantize (dense) / silu_mul_hadamard_quantize (structured) instead."""

    def __call__(self, module, args):
        q = module.atom_online_rotation
        x = args[0]
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp16 / bf16 inputs: rotate in float32
        y = q.apply(x.to(dt)) if isinstance(q, KronRotation) else x.to(dt) @ q.to(dt)
        return (y.to(x.dtype),) + tuple(args[1:])


def add_online_rotation(module: torch.nn.Module, q: torch.Tensor | KronRotation) -> None:
    """Rotate `module`'s input by q at run time (OnlineRotation), e.g. a down_proj whose weight was already
    multiplied by q offline. q: a dense float [K, K] (kept as the non-persistent buffer `atom_online_rotation`) or
    a KronRotation (kept as the submodule `atom_online_rotation`, shared, not copied)."""
    if getattr(module, "atom_online_rotation", None) is not None:
        raise ValueError("module already has an online rotation; rotating its input twice would be wrong.")
    if isinstance(q, KronRotation):
        module.atom_online_rotation = q
    else:
        weight = getattr(module, "weight", None)
        dt = torch.float64 if weight is not None and weight.dtype == torch.float64 else torch.float32
        module.register_buffer("atom_online_rotation", q.to(dt).contiguous(), persistent=False)
    module.atom_online_rotation_hook = module.register_forward_pre_hook(OnlineRotation())


def online_rotation(module: torch.nn.Module) -> torch.Tensor | KronRotation | None:
    """The online rotation of a module's input (float32 [K, K] or a KronRotation) or None."""
    return getattr(module, "atom_online_rotation", None)


def dense_rotation(q: torch.Tensor | KronRotation, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The matrix [K, K] of an online rotation, whichever form it is kept in."""
    return q.dense(dtype) if isinstance(q, KronRotation) else q.to(dtype)


def _down_rotation(down: torch.nn.Module, kind: str, seed: int) -> torch.Tensor | KronRotation:
    """The online rotation of the down_proj inputs: a structured KronRotation (m x 128, the fast kernel) for
    kind="hadamard" where a Hadamard factor of order m exists (SmolLM2's 1536 = 12 x 128), else the dense matrix
    (Llama-2-7B's 11008 = 2 x 5504 Paley). ONE copy in the run-time dtype, shared by every block (a copy per layer
    would be 32 x 485 MB for a dense 11008)."""
    n = down.in_features
    if kind == "hadamard" and kron_order(n) is not None:
        return kron_rotation(n, kind, seed).to(down.weight.device)
    dt = torch.float64 if down.weight.dtype == torch.float64 else torch.float32
    return rotation_matrix(n, kind, seed).to(down.weight.device, dt).contiguous()


@torch.no_grad()
def rotate_model(model, kind: str = "hadamard", seed: int = 0, online_down: bool = True):
    """Rotate a llama / mistral / qwen2 decoder's residual stream by one orthogonal matrix, IN PLACE; returns it.

    Every RMSNorm (the two per block and the final one) is folded into its readers; a tied lm_head is untied
    (config.tie_word_embeddings = False); then embedding, readers, writers and lm_head are rotated as in the module
    docstring (in float64, rounded once to the model's dtype). With online_down, every down_proj input is also
    rotated (its own matrix of order intermediate_size, seed + 1, structured where possible: _down_rotation) by
    an OnlineRotation. model.atom_rotation records
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
                q_online = _down_rotation(down, kind, seed + 1)
                qd = dense_rotation(q_online).to(down.weight.device)
            _set_weight(down, down.weight.double() @ qd)
            add_online_rotation(down, q_online)
    model.atom_rotation = {"kind": kind, "seed": seed, "hidden": H, "online_down": online_down,
                           "down_order": blocks[0].mlp.down_proj.in_features if online_down else None,
                           "down_structured": isinstance(q_online, KronRotation) if online_down else None}
    return model
