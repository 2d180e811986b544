"""In-flight batching over fixed-size slots (engines/scheduler.py, engines/slots.py): answers equal the engine's
own output for each prompt alone whatever else is in flight, slots are reused and never over-committed, cancelled
requests free their slot, and what cannot fit is refused with its reason."""

from __future__ import annotations

import time

import pytest

from engines.ort_engine import OrtEngine
from engines.prompts import synthetic_prompt_ids
from engines.scheduler import InflightScheduler, RequestRefused
from exporter.checkpoint import load_model
from exporter.onnx.export import build_onnx_engine
from exporter.slot_plan import SlotsUnsupported, kept_prompt, largest_kept, plan_slots
from methods import make_policy
from pkv_core.errors import UserInputError

MAX_LEN = 300
LENGTHS = [200, 17, 31, 64, 120, 299, 5, 90, 150, 33]  # every regime: whole prompt, uniform, pyramid


@pytest.fixture(scope="module", params=[("tiny-llama3", "pyramidkv"), ("tiny-mistral", "pyramidkv"),
                                        ("tiny-llama3", "full"), ("tiny-llama3", "chunkkv")],
                ids=lambda p: "-".join(p))
def engine(request, tmp_path_factory):
    model, name = request.param
    kw = {} if name == "full" else {"kv_budget": 32, "window": 4}
    out = tmp_path_factory.mktemp("sched") / f"{model}-{name}"
    build_onnx_engine(load_model(model), make_policy(name, **kw), out, max_input_len=MAX_LEN)
    return OrtEngine(out)


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt's greedy tokens from the engine alone (batch 1): what the scheduler must reproduce."""
    prompts = [synthetic_prompt_ids(engine.tokenizer, n, seed=i) for i, n in enumerate(LENGTHS)]
    return prompts, [engine.generate([p], 20).tokens[0] for p in prompts]


def test_answers_equal_the_engine_alone_while_others_run(engine, alone):
    prompts, want = alone
    scheduler = InflightScheduler(engine, kv_memory=1 << 30, max_new_tokens=24)
    try:
        assert scheduler.generate(prompts, 20) == want
        assert scheduler.stats()["slots_in_use"] == 0 and scheduler.stats()["kv_bytes_held"] == 0
    finally:
        scheduler.close()


def test_more_requests_than_slots_wait_and_reuse_slots(engine, alone):
    prompts, want = alone
    plan = plan_slots(engine.policy, engine.spec.num_layers, int(engine.manifest["cache_heads"]),
                      engine.spec.head_dim, engine.manifest["dtype"], MAX_LEN, 24, 1 << 30)
    # whole prefills: every slot can be in use at once (a chunked prompt's staging cache takes slots' room:
    # tests/engines/test_chunked_prefill.py)
    scheduler = InflightScheduler(engine, kv_memory=3 * plan.slot_bytes + 1, max_new_tokens=24, start=False,
                                  step_tokens=0)
    assert scheduler.plan.slots == 3
    peak = []
    original = scheduler._step

    def watched_step():
        peak.append(scheduler.stats()["slots_in_use"])
        original()

    scheduler._step = watched_step
    scheduler._thread.start()
    try:
        assert scheduler.generate(prompts, 20) == want
        assert max(peak) == 3, "never more sequences than slots"
        stats = scheduler.stats()
        assert stats["slots_in_use"] == 0 and stats["queue_length"] == 0 and stats["kv_bytes_held"] == 0
    finally:
        scheduler.close()


def test_streaming_cancellation_frees_the_slot(engine, alone):
    """A client that goes away after three streamed tokens (its callback cancels) leaves at the next step; the
    request beside it is unaffected; a request cancelled while queued never takes a slot."""
    prompts, want = alone
    scheduler = InflightScheduler(engine, kv_memory=1 << 30, max_new_tokens=24, start=False)
    got = []

    def on_token(token):
        got.append(token)
        if len(got) == 3:
            victim.cancel()

    try:
        victim = scheduler.submit(prompts[0], 20, on_token=on_token)
        other = scheduler.submit(prompts[1], 20)
        queued = scheduler.submit(prompts[2], 20)
        queued.cancel()
        scheduler._thread.start()
        assert victim.wait(30) and other.wait(30) and queued.wait(30)
        assert victim.finish_reason == "cancelled" and got == want[0][:3] and victim.tokens == got
        assert other.tokens == want[1] and other.finish_reason in ("eos", "length")
        assert queued.finish_reason == "cancelled" and queued.tokens == []
        deadline = time.time() + 10
        while scheduler.stats()["slots_in_use"] and time.time() < deadline:
            time.sleep(0.01)
        assert scheduler.stats()["slots_in_use"] == 0
    finally:
        scheduler.close()


def test_requests_that_can_never_fit_are_refused(engine):
    scheduler = InflightScheduler(engine, kv_memory=1 << 30, max_new_tokens=24)
    try:
        with pytest.raises(RequestRefused, match="at most 300"):
            scheduler.submit([1] * (MAX_LEN + 1), 4)
        with pytest.raises(RequestRefused, match=r"max_new_tokens must be in \[1, 24\]"):
            scheduler.submit([1, 2, 3], 25)
        with pytest.raises(RequestRefused, match="empty prompt"):
            scheduler.submit([], 4)
    finally:
        scheduler.close()
    with pytest.raises(RequestRefused, match="shut down"):
        scheduler.submit([1, 2, 3], 4)
    with pytest.raises(UserInputError, match="holds no slot"):
        InflightScheduler(engine, kv_memory=1000, max_new_tokens=24)


@pytest.mark.parametrize("name", ["kvzip", "pyramidinfer"])
def test_policies_with_data_dependent_lengths_are_refused(name):
    with pytest.raises(SlotsUnsupported, match="cannot run " + name):
        plan_slots(make_policy(name), 4, 2, 16, "fp32", 512, 16, 1 << 30)


def test_slot_capacity_covers_every_prompt_length():
    """PyramidKV keeps more of a prompt just above its budget in deep layers than of a long one: the capacity is
    the maximum over every length, not the value at max_input_len."""
    policy = make_policy("pyramidkv", kv_budget=32, window=4)
    best = largest_kept(policy, 8, 600)
    assert best == [max(kept_prompt(policy, 8, q)[layer] for q in range(1, 601)) for layer in range(8)]
    assert best[-1] > kept_prompt(policy, 8, 600)[-1]
    assert largest_kept(make_policy("full"), 8, 600) == [600] * 8


def test_a_failing_step_ends_its_requests_and_the_scheduler_keeps_serving(engine, alone):
    prompts, want = alone
    scheduler = InflightScheduler(engine, kv_memory=1 << 30, max_new_tokens=24, start=False)
    original, calls = scheduler._step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        original()

    scheduler._step = failing_once
    scheduler._thread.start()
    try:
        first = scheduler.submit(prompts[0], 20)
        assert first.wait(30) and first.finish_reason == "error" and "injected" in first.error
        assert scheduler.stats()["slots_in_use"] == 0
        assert scheduler.generate([prompts[1]], 20) == [want[1]]
    finally:
        scheduler.close()
