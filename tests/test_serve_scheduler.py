"""Requests, sampling, block manager and scheduler, without a model (a token rule stands in for the runner)."""
import atom_lab  # noqa: F401

import pytest
import torch

from atom_lab.serve.block_manager import BlockManager, OutOfPages
from atom_lab.serve.request import SamplingParams, Sequence, Status, sample
from atom_lab.serve.scheduler import Scheduler, SchedulerConfig


def rule(tokens):  # a deterministic "model": the next token depends on the whole history
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 7 + 3) % 101


def drive(sched, seqs):
    """Run the scheduler to the end with the rule as the runner; returns {id: output} and the steps taken."""
    for s in seqs:
        sched.add(s)
    steps = []
    while not sched.is_finished:
        batch, prefill = sched.schedule()
        assert batch, "the scheduler made no progress"
        steps.append((prefill, [s.id for s in batch]))
        bm = sched.block_manager
        for s in batch:  # every token the step writes has its own slot, and no two sequences share a slot
            assert len(s.pages) * bm.page_size >= len(s)
        slots = [bm.slot(s, p) for s in batch for p in range(len(s))]
        assert len(set(slots)) == len(slots)
        sched.postprocess(batch, [rule(s.tokens) for s in batch])
    return {s.id: s.output for s in seqs}, steps


def make(lengths, new, ids=None):
    return [Sequence(list(range(1, n + 1)), SamplingParams(max_new_tokens=m), request_id=i)
            for i, (n, m) in enumerate(zip(lengths, new))]


def test_block_manager_pages_and_refcounts():
    bm = BlockManager(num_pages=4, page_size=4)
    a = Sequence([1] * 5, SamplingParams(max_new_tokens=8))
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.pages) == 2 and bm.num_free == 2
    a.num_cached = 5
    b = Sequence([1] * 5, SamplingParams())
    bm.share(a, b, 5)  # one full page shared
    assert b.pages == a.pages[:1] and bm.ref_count[a.pages[0]] == 2 and b.num_cached == 4
    bm.free(a)
    assert bm.num_free == 3 and bm.ref_count[b.pages[0]] == 1  # the shared page survives its first holder
    bm.free(b)
    assert bm.num_free == 4 and sum(bm.ref_count.values()) == 0
    big = Sequence([1] * 17, SamplingParams())
    assert not bm.can_allocate(big)
    with pytest.raises(OutOfPages):
        bm.allocate(big)


def test_block_manager_append_needs_a_page_at_the_boundary():
    bm = BlockManager(num_pages=2, page_size=4)
    s = Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=8))
    bm.allocate(s)
    s.output.append(5)  # the 5th token needs a second page
    assert bm.can_append(s)
    bm.append(s)
    assert len(s.pages) == 2 and bm.num_free == 0
    assert bm.slot(s, 4) == s.pages[1] * 4


def test_continuous_batching_matches_one_at_a_time():
    lengths, new = [3, 9, 1, 14, 6, 2], [5, 2, 7, 3, 6, 4]
    alone = {}
    for s in make(lengths, new):
        out, _ = drive(Scheduler(SchedulerConfig(), BlockManager(64, 4)), [s])
        alone |= out
    batched, steps = drive(Scheduler(SchedulerConfig(max_num_seqs=4), BlockManager(64, 4)), make(lengths, new))
    assert batched == alone
    assert all(len(ids) <= 4 for _, ids in steps)
    assert any(not p and len(ids) > 1 for p, ids in steps)  # decode steps really batched
    assert [ids for p, ids in steps if p][0] == [0, 1, 2, 3]  # FCFS admission up to max_num_seqs


def test_preemption_by_recompute_gives_the_same_tokens():
    lengths, new = [7, 5, 6, 4], [12, 12, 12, 12]
    ref, _ = drive(Scheduler(SchedulerConfig(), BlockManager(64, 4)), make(lengths, new))
    sched = Scheduler(SchedulerConfig(), BlockManager(num_pages=8, page_size=4))  # 32 slots for 4 x ~18 tokens
    seqs = make(lengths, new)
    out, steps = drive(sched, seqs)
    assert sched.num_preemptions > 0 and any(s.preemptions for s in seqs)
    assert out == ref
    assert sched.block_manager.num_free == 8


def test_token_cap_per_prefill_step():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=20), BlockManager(64, 4))
    _, steps = drive(sched, make([8, 8, 8, 8], [2, 2, 2, 2]))
    prefills = [ids for p, ids in steps if p]
    assert prefills[0] == [0, 1]  # 8 + 8 <= 20 < 24


def test_tokens_from_is_a_slice_of_tokens():
    s = Sequence([5, 6, 7], SamplingParams(max_new_tokens=4))
    s.output += [8, 9]
    assert [s.tokens_from(i) for i in range(6)] == [s.tokens[i:] for i in range(6)]
    s.num_cached = 4
    assert s.num_new == 1


def test_mixed_steps_admit_short_prompts_into_decode_steps():
    # max_num_seqs 2 over 4 requests: when one finishes, the next prompt joins the decode step if the step's new
    # tokens (1 per running sequence + the prompt) fit mixed_tokens; the tokens are those of separate steps
    lengths, new = [3, 5, 4, 12], [2, 6, 3, 2]
    ref, plain = drive(Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 4)), make(lengths, new))
    out, steps = drive(Scheduler(SchedulerConfig(max_num_seqs=2, mixed_tokens=6), BlockManager(64, 4)),
                       make(lengths, new))
    assert out == ref
    assert steps[0] == (True, [0, 1])  # nothing running yet: a plain prefill step
    assert (True, [1, 2]) in steps  # request 0 finished: 1 decode row + 4 prompt tokens <= 6, one step
    assert (True, [3]) in steps and (True, [2, 3]) not in steps  # 1 + 12 > 6: request 3 waits for its own step
    assert len(steps) < len(plain)
    with pytest.raises(ValueError, match="mixed_tokens"):
        SchedulerConfig(mixed_tokens=-1)


def test_finished_sequences_stream_out_early():
    sched = Scheduler(SchedulerConfig(), BlockManager(64, 4))
    seqs = make([3, 3], [1, 6])
    for s in seqs:
        sched.add(s)
    batch, prefill = sched.schedule()
    done = sched.postprocess(batch, [rule(s.tokens) for s in batch])
    assert prefill and [s.id for s in done] == [0] and seqs[0].status is Status.FINISHED
    assert len(sched.running) == 1


def test_eos_finishes_unless_ignored():
    s = Sequence([1], SamplingParams(max_new_tokens=5), eos_token_id=9)
    assert s.append(9) and s.finish_reason == "eos"
    s = Sequence([1], SamplingParams(max_new_tokens=5, ignore_eos=True), eos_token_id=9)
    assert not s.append(9)


def test_bad_requests_raise_clear_errors():
    with pytest.raises(ValueError, match="prompt is empty"):
        Sequence([], SamplingParams())
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_new_tokens"):
            SamplingParams(max_new_tokens=bad)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    sched = Scheduler(SchedulerConfig(), BlockManager(num_pages=2, page_size=4))
    with pytest.raises(ValueError, match="whole pool holds 8"):
        sched.add(Sequence(list(range(9)), SamplingParams(max_new_tokens=1)))
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=4), BlockManager(64, 4))
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        sched.add(Sequence(list(range(5)), SamplingParams(max_new_tokens=1)))


def test_sampling_greedy_seeded_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    greedy = [Sequence([1], SamplingParams()) for _ in range(2)]
    assert sample(logits, greedy) == [1, 0]
    hot = [Sequence([1], SamplingParams(temperature=1.0, seed=5)) for _ in range(2)]
    draws = [sample(logits, hot) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]  # same seed, same position: same draw, whatever else ran before
    # top_p = 0.5 keeps only the most likely token of row 0 (p = 0.84): sampling becomes greedy there
    nucleus = [Sequence([1], SamplingParams(temperature=1.0, top_p=0.5, seed=s)) for s in range(2)]
    assert all(sample(logits, nucleus)[0] == 1 for _ in range(20))
    counts = torch.zeros(4)
    for seed in range(400):
        counts[sample(logits[:1], [Sequence([1], SamplingParams(temperature=1.0, seed=seed))])[0]] += 1
    p = torch.softmax(logits[0], -1)
    # 400 draws: each count within 5 standard deviations sqrt(400 p (1 - p)) of 400 p
    assert ((counts - 400 * p).abs() <= 5 * (400 * p * (1 - p)).sqrt() + 1).all()
