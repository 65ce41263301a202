"""The engine on a real decoder (CPU): token-exact against transformers, with preemption, batched == one at a time
for a quantized model on the Triton kernels with an INT4 KV cache, the memory budget, bad requests."""
import atom_lab  # noqa: F401

import copy

import pytest
import torch

from atom_lab.config import AtomConfig
from atom_lab.kv_cache import KVFormat
from atom_lab.recipe import quantize_model
from atom_lab.serve.engine import Engine
from atom_lab.serve.request import SamplingParams

PROMPT_LENGTHS = (3, 9, 1, 14, 6)
NEW = 8


def prompts(n_vocab=256):
    g = torch.Generator().manual_seed(0)
    return [[256] + torch.randint(0, n_vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def tiny():
    model, tok = atom_lab.tiny_model("llama", seed=0, device="cpu")
    return model, tok


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=258, output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores)[:, 0]  # [n, V]
    top2 = scores.topk(2, -1).values
    return out.sequences[0, len(prompt):].tolist(), (top2[:, 0] - top2[:, 1]).min().item()


@pytest.mark.parametrize("graph_prefill,max_seqs", [(False, 64), (True, 64), (True, 2)],
                         ids=["eager-prefill", "graph-prefill", "graph-prefill-mixed"])
@pytest.mark.parametrize("num_pages", [64, 6], ids=["roomy", "preempting"])
def test_float_greedy_equals_transformers_generate(tiny, num_pages, graph_prefill, max_seqs):
    # graph_prefill: the prefill steps (38 prompt tokens at most) run as one decode row per prompt token, each
    # attending over the rows written before it: causal attention, so the same tokens as generate. With 2 sequences
    # at a time the later prompts join decode steps (mixed steps: decode rows and prompt rows in one step).
    model, _ = tiny
    ps = prompts()
    eng = Engine(model, KVFormat(bits=16, dtype=torch.float32), num_pages=num_pages, page_size=4,
                 kernels="reference", graph_prefill=graph_prefill, max_num_seqs=max_seqs)
    mixed, run = [], eng.runner.run
    eng.runner.run = lambda batch, pre: (mixed.append(len({s.num_new == 1 for s in batch}) == 2),
                                         run(batch, pre))[1]
    # different lengths, so that sequences finish at different steps and the waiting ones can join a decode step
    outs = eng.generate(ps, [SamplingParams(max_new_tokens=NEW - i) for i in range(len(ps))])
    assert (eng.runner.graph_prefill_steps > 0) == graph_prefill
    assert any(mixed) >= (max_seqs == 2) and any(mixed) <= graph_prefill  # preempted ones rejoin mixed too
    if num_pages == 6:  # 24 slots for 5 requests of up to 22 tokens: some must be preempted and recomputed
        assert eng.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        ref, margin = hf_greedy(model, p, NEW)
        # The two paths differ only in float32 reduction order (|delta logit| ~ 1e-6 here); a top-2 margin above
        # 1e-4 cannot flip, so equality is exact, not luck. The margin is checked so a changed seed fails loudly.
        assert margin > 1e-4
        assert o == ref[:len(o)]
    assert eng.block_manager.num_free == eng.block_manager.num_pages


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton KV kernels on CPU tensors under the "
                    "interpreter; on a GPU machine they compile for CUDA tensors only, and there the split count of "
                    "the decode kernel follows the batch, so rows are not bit-equal across batch sizes")
def test_quantized_batched_equals_one_at_a_time(tiny):
    # W4A4 (Atom's packed weights, simulated in float: the Triton W4A4 GEMM costs ~0.5 s a call in the CPU
    # interpreter and has its own tests) with an INT4 KV cache written and read by the Triton KV kernels.
    model, tok = tiny
    texts = ["the quick brown fox jumps over the lazy dog " * 8] * 4
    q = quantize_model(copy.deepcopy(model), AtomConfig.preset("atom", gptq=False), calibration=texts, tokenizer=tok,
                       backend="reference", n_tokens=256, seq_len=64, progress=False)
    ps = prompts()[:3]
    kv = KVFormat(bits=4, dtype=torch.float32)
    batched = Engine(q, kv, num_pages=32, page_size=16, kernels="triton").generate(
        ps, SamplingParams(max_new_tokens=4))
    alone = [Engine(q, kv, num_pages=32, page_size=16, kernels="triton").generate(
        [p], SamplingParams(max_new_tokens=4))[0] for p in ps]
    assert batched == alone
    # graph_prefill: the prompts' rows share one static step (and read their INT4 codes back); two prompts, two
    # tokens keep the interpreter's time down
    eng = Engine(q, kv, num_pages=32, page_size=16, kernels="triton", graph_prefill=True)
    batched = eng.generate(ps[1:], SamplingParams(max_new_tokens=2))
    assert eng.runner.graph_prefill_steps == 1
    alone = [Engine(q, kv, num_pages=32, page_size=16, kernels="triton", graph_prefill=True).generate(
        [p], SamplingParams(max_new_tokens=2))[0] for p in ps[1:]]
    assert batched == alone


def test_seeded_sampling_survives_batching(tiny):
    model, _ = tiny
    ps = prompts()[:3]
    params = [SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=i) for i in range(3)]
    kv = KVFormat(bits=16, dtype=torch.float32)
    batched = Engine(model, kv, num_pages=64, page_size=4, kernels="reference").generate(ps, params)
    alone = [Engine(model, kv, num_pages=64, page_size=4, kernels="reference").generate([p], [q])[0]
             for p, q in zip(ps, params)]
    assert batched == alone


def test_budget_is_held(tiny):
    model, _ = tiny
    budget = 8e6
    eng = Engine(model, KVFormat(bits=4, dtype=torch.float32), budget_bytes=budget, page_size=16,
                 max_tokens_per_step=256, max_num_seqs=8, kernels="reference")
    report = eng.runner.check_budget()
    assert report["planned"] <= budget and report["kv_pool"] > 0
    assert report["weights"] == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with pytest.raises(ValueError, match="leaves no room for the KV cache"):
        Engine(model, budget_bytes=1e6, kernels="reference")


def test_bad_requests(tiny):
    model, _ = tiny
    eng = Engine(model, KVFormat(bits=16, dtype=torch.float32), num_pages=4, page_size=4, kernels="reference")
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.add_request([1, 2], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="whole pool holds 16"):
        eng.add_request(list(range(17)), SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([999], SamplingParams())


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_fresh_prefill_attends_over_float_kv(tiny, rope):
    # The engine's prefill (PagedDecoder prefill="fresh"): a whole prompt attends over its own float K/V, so with an
    # INT4 cache its last-token logits are the float model's (up to float32 reordering of the same sums), while
    # "cache" attends over the INT4 codes just written and must differ.
    from atom_lab.kv_cache import PagePool, PageTable
    from atom_lab.paged_model import PagedDecoder

    model = tiny[0]
    prompt = torch.tensor(prompts()[3])  # 15 tokens
    with torch.no_grad():
        ref = model(prompt[None]).logits[0, -1].float()
    got = {}
    for mode in ("fresh", "cache"):
        pool = PagePool.for_model(model, KVFormat(bits=4, dtype=torch.float32, rope=rope), 4, num_pages=8,
                                  device="cpu")
        got[mode] = PagedDecoder(model, pool, kernels="reference", prefill=mode).step([PageTable(pool)], [prompt])[0]
    scale = ref.abs().max().item()
    assert (got["fresh"] - ref).abs().max().item() <= 1e-4 * scale
    assert (got["cache"] - ref).abs().max().item() > 1e-3 * scale



def test_static_decoder_refuses_window_formats(tiny):
    # the static decode step reads no float window: a windowed pool must not reach it (it would drop the window)
    from atom_lab.kv_cache import PagePool
    from atom_lab.paged_model import PagedDecoder
    from atom_lab.serve.decode_graph import StaticDecoder

    model, _ = tiny
    pool = PagePool.for_model(model, KVFormat(bits=4, dtype=torch.float32, window=4), 4, num_pages=4, device="cpu",
                              max_seqs=2)
    with pytest.raises(ValueError, match="float window"):
        StaticDecoder(PagedDecoder(model, pool, kernels="reference"), 2, 4, pool.allocate(1)[0])
