"""The memory model: bytes of weights, KV cache per token and activations for each serving format, hence how many
requests fit in a GPU memory budget.

A format is (weights, activations, KV bits), e.g. W4A4-KV4 = Atom. Weight bytes count what the kernels store:
    fp16 / bf16   2 bytes per weight
    w8a8          8-bit weights + one fp32 scale per output channel (torch._scaled_mm rowwise: serve/lowbit.py)
    w4a16         INT4 + bf16 scale and bf16 zero per group of 128 (torch._weight_int4pack_mm: serve/lowbit.py)
    w4a4          Atom's packed format (kernels/formats.py): INT4 groups + `keeper` INT8 columns, fp16 scales
Embeddings, the LM head and the norms stay fp16 in every format (as in Atom, QServe). KV bytes per token use the
paged cache's byte format (kernels/kv_cache.py): per token, layer, K or V and KV head, 2 D bytes (fp16) or the codes
plus one fp16 (scale, zero) pair per group of G channels: D + 4 D / G (INT8), D / 2 + 4 D / G (INT4).
Activations: the largest prefill step (max_tokens_per_step tokens) at its peak (the MLP's gate/up outputs plus the
hidden states) and the fp32 logits of a decode batch.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    """The numbers that size a Llama-architecture decoder."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config, name: str = "") -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(name or getattr(config, "_name_or_path", "") or config.model_type, config.hidden_size,
                   config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))

    def linears(self) -> list[tuple[int, int]]:
        """(out_features N, in_features K) of one block's linear layers."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    def linear_params(self) -> int:
        return self.layers * sum(n * k for n, k in self.linears())

    def other_params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied_embeddings else 2) + self.hidden * (2 * self.layers + 1)


LLAMA_7B = ModelShape("llama-7b", 4096, 11008, 32, 32, 32, 128, 32000)   # Llama-1/2-7B share these shapes
LLAMA_2_13B = ModelShape("llama-2-13b", 5120, 13824, 40, 40, 40, 128, 32000)
LLAMA_2_70B = ModelShape("llama-2-70b", 8192, 28672, 80, 64, 8, 128, 32000)
SHAPES = {s.name: s for s in (LLAMA_7B, LLAMA_2_13B, LLAMA_2_70B)}


@dataclass(frozen=True)
class Format:
    """weights in ("fp16", "w8a8", "w4a16", "w4a4"), kv_bits in (16, 8, 4)."""
    weights: str
    kv_bits: int = 16
    group_size: int = 128   # weights (w4a16, w4a4) and activations (w4a4)
    keeper: int = 128       # Atom's INT8 outlier channels (w4a4)
    kv_group: int | None = None  # channels per KV (scale, zero); None = head_dim (Atom)

    def __post_init__(self):
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights={self.weights!r} is unknown; use one of {', '.join(WEIGHT_FORMATS)}.")
        if self.kv_bits not in (16, 8, 4):
            raise ValueError(f"kv_bits={self.kv_bits!r} must be 16, 8 or 4.")

    @property
    def name(self) -> str:
        return f"{self.weights.upper()}-KV{self.kv_bits}"

    @classmethod
    def parse(cls, name: str) -> Format:
        """'fp16', 'w8a8-kv8', 'w4a4-kv4', ... (KV16 when no -kv part is given)."""
        w, _, kv = name.lower().partition("-kv")
        return cls(w, int(kv) if kv else 16)


WEIGHT_FORMATS = ("fp16", "bf16", "w8a8", "w4a16", "w4a4")
# The formats of Atom's fixed-memory figure (W8A8 = SmoothQuant with its INT8 KV cache; the batch sizes imply it).
ATOM_FORMATS = {"FP16": Format("fp16", 16), "W4A16": Format("w4a16", 16), "W8A8": Format("w8a8", 8),
                "W4A4": Format("w4a4", 4)}


def linear_weight_bytes(n: int, k: int, fmt: Format) -> int:
    """Bytes stored for one [N, K] linear weight in fmt."""
    if fmt.weights in ("fp16", "bf16"):
        return 2 * n * k
    if fmt.weights == "w8a8":
        return n * k + 4 * n
    if fmt.weights == "w4a16":
        groups = -(-k // fmt.group_size)
        return n * (k // 2) + n * groups * 4  # codes, bf16 scale and zero per group
    normal = k - fmt.keeper
    return n * (normal // 2 + 2 * (normal // fmt.group_size) + fmt.keeper + 2)


def weight_bytes(shape: ModelShape, fmt: Format) -> int:
    blocks = shape.layers * sum(linear_weight_bytes(n, k, fmt) for n, k in shape.linears())
    return blocks + 2 * shape.other_params()


def kv_head_bytes(bits: int, head_dim: int, group: int | None = None) -> int:
    """Bytes of one token's K (or V) for one KV head in the paged cache."""
    g = group or head_dim
    if bits == 16:
        return 2 * head_dim
    return (head_dim if bits == 8 else head_dim // 2) + 4 * (head_dim // g)


def kv_bytes_per_token(shape: ModelShape, fmt: Format) -> int:
    """Bytes of K and V of one token over all layers."""
    return 2 * shape.layers * shape.kv_heads * kv_head_bytes(fmt.kv_bits, shape.head_dim, fmt.kv_group)


def activation_bytes(shape: ModelShape, tokens_per_step: int, max_batch: int, act_itemsize: int = 2) -> int:
    """Peak activation memory of a step: tokens_per_step rows of (residual, normed input, q/k/v, gate, up) plus
    the fp32 logits of max_batch rows (only the last position of each sequence is projected to the vocabulary)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = (2 * shape.hidden + q + 2 * kv + 2 * shape.intermediate) * act_itemsize
    return tokens_per_step * per_token + max_batch * shape.vocab * 4


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    weights: int
    activations: int
    kv_per_token: int
    kv_pool: int
    tokens: int           # KV slots that fit in the pool
    tokens_per_request: int
    max_batch: int        # requests of tokens_per_request that fit at once
    atom_batch: int       # the largest power of two <= max_batch (how Atom picked its batch sizes)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def plan(shape: ModelShape, fmt: Format, budget_bytes: float, tokens_per_request: int = 2048,
         tokens_per_step: int = 2048, max_batch_rows: int = 256) -> MemoryPlan:
    """Split a memory budget into weights + activation reserve + KV pool; how many requests fit.

    Raises ValueError (naming the numbers) when the weights and activations alone exceed the budget.
    """
    w = weight_bytes(shape, fmt)
    act = activation_bytes(shape, tokens_per_step, max_batch_rows)
    pool = int(budget_bytes) - w - act
    if pool <= 0:
        raise ValueError(f"{shape.name} in {fmt.name}: weights {w / GIB:.2f} GiB + activations {act / GIB:.2f} GiB "
                         f"exceed the budget of {budget_bytes / GIB:.2f} GiB; raise the budget or use fewer bits.")
    per = kv_bytes_per_token(shape, fmt)
    tokens = pool // per
    batch = tokens // tokens_per_request
    return MemoryPlan(int(budget_bytes), w, act, per, tokens * per, tokens, tokens_per_request, batch,
                      1 << (batch.bit_length() - 1) if batch else 0)
