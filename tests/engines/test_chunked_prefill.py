"""Chunked prefill: the graphs (exporter/onnx/chunk.py), their runner (engines/chunked_prefill.py), the step budget
(engines/step_budget.py), the slot rows a FullKV prompt's chunks write into (engines/slots.py), and the in-flight
scheduler mixing chunks into its decode steps: a prompt prefilled in chunks keeps exactly what one prefill keeps,
answers under concurrency equal the engine alone, the oldest prompt goes first without holding the short ones
behind it, and --kv-memory (slots and staging caches) is never over-committed."""

from __future__ import annotations

import numpy as np
import pytest

from engines.chunked_prefill import ChunkedPrefill, prefill_in_chunks, prefill_whole, staging_bytes
from engines.prompts import synthetic_prompt_ids
from engines.scheduler import InflightScheduler
from engines.slots import SlotPool
from engines.step_budget import chunk_tokens, prefill_budget, whose_turn
from exporter.onnx.chunk import CHUNK, SELECT, chunk_graph_names
from exporter.onnx.mixed import MIXED
from exporter.slot_plan import plan_slots
from methods import make_policy
from pkv_core.errors import UserInputError

CHUNKING = ["full", "pyramidkv", "snapkv", "chunkkv", "streamingllm"]
CASES = [(model, name) for model in ("tiny-llama3", "tiny-mistral") for name in CHUNKING]
LENGTHS = [200, 17, 120, 299, 5, 90, 150, 33]  # whole prompts, uniform and pyramid regimes; tiny-mistral's window 48
NEW = 10


def prompts_of(engine, lengths=LENGTHS) -> list[list[int]]:
    return [synthetic_prompt_ids(engine.tokenizer, n, seed=i) for i, n in enumerate(lengths)]


# ------------------------------------------------------------------ which engines chunk


def test_chunk_graphs_only_where_the_kept_sets_stay_exact():
    assert chunk_graph_names(make_policy("pyramidkv"), "onnxruntime") == [CHUNK, MIXED, SELECT]
    assert chunk_graph_names(make_policy("full"), "onnxruntime") == [CHUNK, MIXED]  # nothing to select
    for name in ("h2o", "kvzip", "pyramidinfer"):  # every query's attention; not in slots at all
        assert chunk_graph_names(make_policy(name), "onnxruntime") == []
    assert chunk_graph_names(make_policy("pyramidkv"), "tensorrt") == []  # not served in flight


# ------------------------------------------------------------------ the step budget


def test_the_last_chunk_holds_the_window():
    assert chunk_tokens(100, 40, 8) == 40
    assert chunk_tokens(45, 40, 8) == 37  # 40 would leave 5 < w: stop w before the end
    assert chunk_tokens(8, 5, 8) == 8  # nothing to leave behind: the rest, a little over the cap
    assert chunk_tokens(30, 40, 8) == 30
    assert chunk_tokens(45, 40, 0) == 40  # FullKV: no window


def test_decode_tokens_first_and_the_oldest_prompt_gets_every_other_step_while_another_waits():
    assert prefill_budget(256, 10) == 246
    assert prefill_budget(256, 300) == 32  # prompts always progress: an eighth of the budget
    assert [whose_turn(step, 1) for step in range(4)] == [0, 0, 0, 0]  # alone: every step
    assert [whose_turn(step, 3) for step in range(4)] == [0, 1, 0, 1]  # the oldest, then the next in line


# ------------------------------------------------------------------ slot rows


def test_reserved_rows_move_with_their_chunks():
    """FullKV's chunks write into a reserved row above the active ones (from the top); a finished prompt becomes
    the next active row (copied there, or swapped with the prompt whose chunks occupy it), and a whole prefill
    about to be placed where a reserved row sits moves that row away first, its tokens intact."""
    one = plan_slots(make_policy("full"), 2, 1, 2, "fp32", 6, 2, 1 << 20)
    pool = SlotPool(plan_slots(make_policy("full"), 2, 1, 2, "fp32", 6, 2, 4 * one.slot_bytes), windowed=False)

    def fill(row, value, n):
        for keys in pool.keys:
            keys[row, :, :n] = value
        pool.lengths[:, row] = n

    def holds(row, value, n):
        return all((keys[row, :, :n] == value).all() for keys in pool.keys) and (pool.lengths[:, row] == n).all()

    a, b, c = pool.reserve(), pool.reserve(), pool.reserve()
    assert (a, b, c) == (3, 2, 1)
    fill(a, 1.0, 6), fill(b, 2.0, 3), fill(c, 3.0, 4)
    assert pool.activate(a, None) == (0, None) and pool.active == 1 and holds(0, 1.0, 6)
    assert pool.clear_next_row() == (1, 3) and holds(3, 3.0, 4)  # c leaves the next active row, to the free top
    c = 3
    assert pool.activate(b, None) == (1, None) and holds(1, 2.0, 3)
    d = pool.reserve()
    assert d == 2 and pool.reserved == {2, 3}
    fill(d, 4.0, 5)
    assert pool.activate(c, None) == (2, (2, 3))  # the next active row is d's: the two swap
    assert holds(2, 3.0, 4) and holds(3, 4.0, 5) and pool.reserved == {3} and pool.active == 3
    assert pool.release(0) == 2 and holds(0, 3.0, 4) and pool.active == 2  # decoding rows: unchanged rules


# ------------------------------------------------------------------ the engine: chunks keep what one prefill keeps


@pytest.mark.parametrize("model,name", CASES, ids=lambda v: v)
def test_chunks_keep_what_one_prefill_keeps(built_engine, model, name):
    engine, _ = built_engine(model, name)
    assert engine.chunkable
    for prompt, sizes in zip(prompts_of(engine, [200, 120, 299, 60]),
                             [[50, 50, 60, 40], [7, 100, 13], [1, 294, 4], [60]], strict=True):
        whole, chunked = prefill_whole(engine, prompt), prefill_in_chunks(engine, prompt, sizes)
        assert chunked.lengths == whole.lengths
        for layer, n in enumerate(whole.lengths):
            np.testing.assert_array_equal(chunked.kept[layer][:, :n], whole.kept[layer][:, :n])
            np.testing.assert_allclose(chunked.keys[layer][:, :n], whole.keys[layer][:, :n], atol=1e-5)
            np.testing.assert_allclose(chunked.values[layer][:, :n], whole.values[layer][:, :n], atol=1e-5)
        np.testing.assert_allclose(chunked.logits, whole.logits, atol=1e-4)
        assert chunked.logits.argmax() == whole.logits.argmax()


def test_chunks_refuse_what_does_not_add_up(built_engine):
    engine, _ = built_engine("tiny-llama3", "pyramidkv")
    run = ChunkedPrefill(engine, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="not prefilled yet"):
        run.finish()
    with pytest.raises(ValueError, match="a chunk of 6 tokens with 5 left"):
        run.advance(6)
    with pytest.raises(ValueError, match="the last chunk must hold the prompt's last 4 tokens"):
        run.advance(2)


# ------------------------------------------------------------------ the scheduler


class Watched(InflightScheduler):
    """Records, after every planning, the bytes held, the slots in use and the prompts in flight."""

    def __init__(self, *args, **kw):
        self.seen: list[dict] = []
        super().__init__(*args, **kw)

    def _plan(self):
        out = super()._plan()
        self.seen.append({"held": self._held(), "slots": self.pool.active + self._reserved(),
                          "prefilling": len(self._prefilling), "queue": len(self._waiting)})
        return out


@pytest.mark.parametrize("model,name", CASES, ids=lambda v: v)
def test_chunked_answers_equal_the_engine_alone_in_tight_memory(built_engine, model, name, monkeypatch):
    """A small budget (24 tokens: most prompts take several steps) and a memory of three slots plus one long
    prompt's staging cache: prompts wait for memory, several are in flight at once, chunks run with the decode in
    mixed steps, and every answer equals the engine's own for the prompt alone; the memory held never exceeds
    --kv-memory."""
    import engines.scheduler

    mixed, run_mixed = [], engines.scheduler.run_mixed
    monkeypatch.setattr(engines.scheduler, "run_mixed", lambda *a: (mixed.append(a[-1]), run_mixed(*a))[1])
    engine, _ = built_engine(model, name)
    prompts = prompts_of(engine)
    want = [engine.generate([p], NEW).tokens[0] for p in prompts]
    plan = plan_slots(engine.policy, engine.spec.num_layers, int(engine.manifest["cache_heads"]),
                      engine.spec.head_dim, engine.manifest["dtype"], engine.max_input_len, NEW, 1 << 30)
    memory = 3 * plan.slot_bytes + staging_bytes(engine, max(LENGTHS))
    scheduler = Watched(engine, kv_memory=memory, max_new_tokens=NEW, step_tokens=24)
    try:
        assert scheduler.chunking and scheduler.generate(prompts, NEW) == want
        assert max(s["held"] for s in scheduler.seen) <= memory
        assert max(s["slots"] for s in scheduler.seen) <= scheduler.plan.slots
        assert max(s["prefilling"] for s in scheduler.seen) >= 2  # chunks of several prompts in one step
        assert max(s["queue"] for s in scheduler.seen) >= 1 + (name == "full")  # some waited
        assert scheduler.mixing and mixed  # steps that decoded and ran a chunk in one graph
        stats = scheduler.stats()
        assert stats["slots_in_use"] == stats["kv_bytes_held"] == stats["staging_bytes"] == stats["prefilling"] == 0
        assert stats["prefill_tokens"] == sum(LENGTHS)
    finally:
        scheduler.close()


def test_the_oldest_goes_first_and_a_long_prompt_does_not_hold_the_short_ones(built_engine):
    """A long prompt at the head of the queue gets every other step: the short prompts behind it are prefilled in
    the steps between, in their order, and answer before it."""
    engine, _ = built_engine("tiny-llama3", "pyramidkv")
    prompts = prompts_of(engine, [30, 290, 20, 24])  # the first one decodes while the others are prefilled
    want = [engine.generate([p], n).tokens[0] for p, n in zip(prompts, (24, 4, 4, 4), strict=True)]
    scheduler = InflightScheduler(engine, kv_memory=1 << 30, max_new_tokens=24, step_tokens=64, start=False)
    try:
        requests = [scheduler.submit(p, n) for p, n in zip(prompts, (24, 4, 4, 4), strict=True)]
        scheduler._thread.start()
        assert all(r.wait(60) for r in requests) and [r.tokens for r in requests] == want
        _, long, first, second = (r.token_times[0] for r in requests)
        assert first < second < long
    finally:
        scheduler.close()


@pytest.mark.parametrize("why", ["step-tokens 0", "staging never fits", "h2o", "nothing decodes"])
def test_whole_prefills_where_chunks_cannot_run(built_engine, why):
    """--step-tokens 0, an engine without chunk graphs (H2O), and a prompt whose staging cache could never fit
    beside its slot are prefilled whole, one per step, with the same answers; so is a prompt when no sequence is
    decoding (no stream to keep: on a CPU every chunk costs a pass over the weights)."""
    engine, _ = built_engine("tiny-llama3", "h2o" if why == "h2o" else "pyramidkv")
    prompts = prompts_of(engine, [200] if why == "nothing decodes" else [200, 33, 150])
    want = [engine.generate([p], NEW).tokens[0] for p in prompts]
    plan = plan_slots(engine.policy, engine.spec.num_layers, int(engine.manifest["cache_heads"]),
                      engine.spec.head_dim, engine.manifest["dtype"], engine.max_input_len, NEW, 1 << 30)
    # one slot beside a 32-token staging cache: none of these prompts could ever be staged
    memory = plan.slot_bytes + staging_bytes(engine, 32) if why == "staging never fits" else 1 << 30
    scheduler = Watched(engine, kv_memory=memory, max_new_tokens=NEW, step_tokens=0 if why == "step-tokens 0" else 24)
    try:
        assert scheduler.chunking == (why in ("staging never fits", "nothing decodes"))
        assert scheduler.generate(prompts, NEW) == want
        assert max(s["prefilling"] for s in scheduler.seen) == 0
    finally:
        scheduler.close()
    with pytest.raises(UserInputError, match="--step-tokens must be at least 0"):
        InflightScheduler(engine, kv_memory=1 << 30, step_tokens=-1)


def test_ignore_eos_generates_every_token(built_engine):
    """A benchmark's requests all get their max_new_tokens: with ignore_eos an end-of-sequence token does not end
    the request (here the prompt's first answer token is made the engine's EOS)."""
    engine, _ = built_engine("tiny-llama3", "pyramidkv")
    prompt = prompts_of(engine, [40])[0]
    want = engine.generate([prompt], 5).tokens[0]
    saved, engine.eos_ids = engine.eos_ids, {want[0]}
    scheduler = InflightScheduler(engine, kv_memory=1 << 30, max_new_tokens=5)
    try:
        stops, goes_on = scheduler.submit(prompt, 5), scheduler.submit(prompt, 5, ignore_eos=True)
        assert stops.wait(30) and goes_on.wait(30)
        assert (stops.tokens, stops.finish_reason) == (want[:1], "eos")
        assert (goes_on.tokens, goes_on.finish_reason) == (want, "length")
    finally:
        engine.eos_ids = saved
        scheduler.close()


@pytest.mark.parametrize("model,name", [("tiny-llama3", "pyramidkv"), ("tiny-mistral", "full"),
                                        ("tiny-mistral", "streamingllm")], ids=lambda v: v)
def test_a_mixed_step_computes_what_the_decode_and_the_chunk_compute_apart(built_engine, model, name):
    """mixed.onnx: the decode rows' logits and caches equal decode.onnx's, the chunk's logits and kept sets equal
    chunk.onnx's (the decode rows and the chunk share the projections and the MLP, not the attention)."""
    from engines.mixed_step import run_mixed
    from engines.scheduler import DecodeBatch

    engine, _ = built_engine(model, name)
    running, long = prompts_of(engine, [150, 70, 90]), prompts_of(engine, [200])[0]
    plan = plan_slots(engine.policy, engine.spec.num_layers, int(engine.manifest["cache_heads"]),
                      engine.spec.head_dim, engine.manifest["dtype"], engine.max_input_len, NEW, 1 << 24)
    pool = SlotPool(plan, engine.windowed)
    tokens, positions = np.zeros((plan.slots, 1), np.int64), np.zeros((plan.slots, 1), np.int64)
    for row, prompt in enumerate(running):
        done = prefill_whole(engine, prompt)
        pool.place(done.keys, done.values, done.lengths, done.kept if engine.windowed else None)
        tokens[row, 0], positions[row, 0] = int(done.logits.argmax()), len(prompt)
    n, before = len(running), [k.copy() for k in pool.keys]
    apart_logits = np.zeros((plan.slots, engine.spec.vocab_size), np.float32)
    DecodeBatch(engine, pool, n, tokens, positions, apart_logits).run()
    apart_keys = [k.copy() for k in pool.keys]
    for keys, saved in zip(pool.keys, before, strict=True):  # undo the decode's token in the caches
        keys[...] = saved
    apart, mixed = ChunkedPrefill(engine, long), ChunkedPrefill(engine, long)
    apart.advance(120), mixed.advance(120)
    apart.advance(80)
    mixed_logits = np.zeros_like(apart_logits)
    run_mixed(engine, pool, n, tokens, positions, mixed_logits, mixed, 80)
    np.testing.assert_allclose(mixed_logits[:n], apart_logits[:n], atol=1e-5)
    for a, b in zip(pool.keys, apart_keys, strict=True):
        np.testing.assert_allclose(a[:n], b[:n], atol=1e-6)
    one, other = apart.finish(), mixed.finish()
    assert one.lengths == other.lengths and int(one.logits.argmax()) == int(other.logits.argmax())
    np.testing.assert_allclose(one.logits, other.logits, atol=1e-4)
    for a, b in zip(one.kept, other.kept, strict=True):
        np.testing.assert_array_equal(a, b)
