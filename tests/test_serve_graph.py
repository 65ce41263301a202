"""Static-buffer decode steps (atom_lab/serve/decode_graph.py): the same tokens as PagedDecoder.step on the CPU,
padding rows that never touch a sequence's pages, and (GPU only) CUDA-graph replay == the eager static step."""
import atom_lab  # noqa: F401

import pytest
import torch

from atom_lab.kernels.kv_cache import read_slots
from atom_lab.kv_cache import KVFormat, PagePool, PageTable
from atom_lab.paged_model import PagedDecoder
from atom_lab.serve.decode_graph import StaticDecoder, default_buckets
from atom_lab.serve.engine import Engine
from atom_lab.serve.request import SamplingParams

PROMPT_LENGTHS = (3, 9, 1, 14, 6)


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def tiny():
    return atom_lab.tiny_model("llama", seed=0, device="cpu")[0]


def prefill_pair(model, fmt, page_size=4, num_pages=48):
    """Two pools with the same prompts prefilled: one for PagedDecoder.step, one for the static decoder."""
    out = []
    for _ in range(2):
        pool = PagePool.for_model(model, fmt, page_size, num_pages=num_pages, device="cpu")
        dec = PagedDecoder(model, pool, kernels="reference")
        tables = [PageTable(pool) for _ in PROMPT_LENGTHS]
        logits = dec.step(tables, prompts())
        scratch = pool.allocate(1)[0]
        out.append((pool, dec, tables, [int(lg.argmax()) for lg in logits], scratch))
    return out


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("buckets", [[5], [1, 2, 8]], ids=["exact", "padded"])
def test_static_decode_equals_paged_step(tiny, bits, buckets):
    fmt = KVFormat(bits=bits, dtype=torch.float32)
    (pool_a, dec_a, tab_a, tok_a, _), (pool_b, dec_b, tab_b, tok_b, scratch) = prefill_pair(tiny, fmt)
    assert tok_a == tok_b
    static = StaticDecoder(dec_b, max_batch=max(buckets), max_pages=8, scratch_page=scratch, cuda_graphs=False,
                           buckets=buckets)
    for _ in range(6):
        ref = dec_a.step(tab_a, [torch.tensor([t]) for t in tok_a])
        for t in tab_b:
            t.reserve(1)
        got = static.decode([t.pages for t in tab_b], [t.length for t in tab_b], tok_b)
        for t in tab_b:
            t.length += 1
        ref = torch.stack(ref)
        diff = (got - ref).abs().max().item()
        if buckets == [5]:
            # Same operations on the same [5, K] shapes in the same order: bit-identical on any CPU.
            assert diff == 0
        else:
            # Padded to 8 rows, a GEMM may block its reductions differently (MKL picks kernels by M), so logits may
            # differ by float32 rounding: per GEMM at most ~K u = 640 * 2^-24 = 4e-5 relative (Higham), a few GEMMs
            # deep; 1e-3 of the largest logit is far above that and far below a real difference.
            assert diff <= 1e-3 * ref.abs().max().item()
        top2 = ref.topk(2, -1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * diff  # rows whose greedy token rounding cannot flip
        tok_a, tok_b = ref.argmax(-1).tolist(), got.argmax(-1).tolist()
        assert [a for a, s in zip(tok_a, sure) if s] == [b for b, s in zip(tok_b, sure) if s]
        tok_b = tok_a  # both paths continue from the same tokens
    # the padding rows only ever wrote the scratch page: every page nobody owns is still all zeros
    owned = {p for t in tab_b for p in t.pages} | {scratch}
    for li in range(pool_b.num_layers):
        for codes in (pool_b.k_codes[li], pool_b.v_codes[li]):
            for p in set(range(pool_b.num_pages)) - owned:
                assert not codes[p].any()  # page p, every head (head-major pages)
        if buckets == [5]:  # and the sequences' rows are those PagedDecoder.step wrote
            for t_a, t_b in zip(tab_a, tab_b):
                assert torch.equal(read_slots(pool_a.k_codes[li], t_a.slots(0, t_a.length)),
                                   read_slots(pool_b.k_codes[li], t_b.slots(0, t_b.length)))
    assert static.eager_steps == 6


def test_engine_static_decode_same_tokens(tiny):
    ps = [p.tolist() for p in prompts()]
    params = SamplingParams(max_new_tokens=6)
    kv = KVFormat(bits=8, dtype=torch.float32)
    eager = Engine(tiny, kv, num_pages=40, page_size=4, kernels="reference", static_decode=False).generate(ps, params)
    eng = Engine(tiny, kv, num_pages=40, page_size=4, kernels="reference", max_num_seqs=8)
    assert eng.generate(ps, params) == eager
    assert eng.runner.static.eager_steps >= 5  # every decode step took the static path
    assert eng.block_manager.num_pages == 40  # the scratch page comes on top of num_pages


def test_static_decoder_bad_input(tiny):
    pool = PagePool.for_model(tiny, KVFormat(bits=16, dtype=torch.float32), 4, num_pages=8, device="cpu")
    dec = PagedDecoder(tiny, pool, kernels="reference")
    with pytest.raises(ValueError, match="scratch_page"):
        StaticDecoder(dec, 4, 4, scratch_page=0)
    scratch = pool.allocate(1)[0]
    s = StaticDecoder(dec, 4, 2, scratch, cuda_graphs=False)
    with pytest.raises(ValueError, match="max_pages"):
        s.decode([pool.allocate(3)], [5], [1])
    with pytest.raises(ValueError, match="one entry per sequence"):
        s.decode([[1]], [0, 1], [1])
    assert s.capture() == 0.0 and not s.graphs  # no graphs on the CPU
    assert default_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert default_buckets(5) == [1, 2, 4, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_equals_eager_static_step():
    model = atom_lab.tiny_model("llama", seed=0, device="cuda")[0].half()
    for bits in (16, 4):
        fmt = KVFormat(bits=bits, dtype=torch.float16)
        runs = []
        for graphs in (False, True):
            pool = PagePool.for_model(model, fmt, 16, num_pages=64, device="cuda")
            dec = PagedDecoder(model, pool, kernels="triton")
            tables = [PageTable(pool) for _ in PROMPT_LENGTHS]
            toks = [int(lg.argmax()) for lg in dec.step(tables, [p.cuda() for p in prompts()])]
            s = StaticDecoder(dec, 8, 4, pool.allocate(1)[0], cuda_graphs=graphs)
            if graphs:  # capturing every bucket up front writes the scratch page only
                assert s.capture() > 0 and sorted(s.graphs) == [1, 2, 4, 8]
            out = []
            for _ in range(5):
                for t in tables:
                    t.reserve(1)
                lg = s.decode([t.pages for t in tables], [t.length for t in tables], toks).clone()
                for t in tables:
                    t.length += 1
                toks = lg.argmax(-1).tolist()
                out.append(lg)
            runs.append((torch.stack(out), s))
        assert runs[1][1].replays == 5 and runs[0][1].eager_steps == 5
        # the graph replays exactly the kernels of the eager static step on the same inputs: identical bits
        assert torch.equal(runs[0][0], runs[1][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_prefill_and_mixed_steps_replay_the_eager_static_rows():
    # graph prefill on a GPU: prompt rows (and, with 2 sequences at a time, prompts joining decode steps) replayed
    # from the captured graphs give the tokens of the same static rows run eagerly (the same kernels, bit for bit)
    model = atom_lab.tiny_model("llama", seed=0, device="cuda")[0].half()
    ps = [p.tolist() for p in prompts()]
    params = [SamplingParams(max_new_tokens=6 - i % 3) for i in range(len(ps))]
    outs = {}
    for graphs in (False, True):
        eng = Engine(model, KVFormat(bits=4, dtype=torch.float16), num_pages=64, page_size=16, max_num_seqs=2,
                     kernels="triton", cuda_graphs=graphs, graph_prefill=True)
        outs[graphs] = eng.generate(ps, params)
        assert eng.runner.graph_prefill_steps > 1
        st = eng.runner.static
        assert (st.replays > 0) == graphs and (st.eager_steps > 0) != graphs
    assert outs[True] == outs[False]
