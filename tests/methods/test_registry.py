import pytest
import torch

from methods import POLICIES, make_policy, options_for
from methods.budgeted import BudgetedPolicy
from pkv_core.errors import UserInputError

COMPRESSING = [name for name, cls in POLICIES.items() if name != "full"]
PER_LAYER = [name for name in COMPRESSING  # select() layer by layer, after the layer's full attention
             if issubclass(POLICIES[name], BudgetedPolicy)]


def test_registry_has_every_method():
    assert set(POLICIES) >= {"full", "streamingllm", "h2o", "snapkv", "pyramidkv"}


@pytest.mark.parametrize("name", list(POLICIES))
def test_defaults_are_valid_and_describable(name):
    policy = make_policy(name)
    assert policy.name == name
    assert name in policy.describe()


def test_options_a_policy_lacks_are_refused_and_shared_settings_are_applied_explicitly():
    with pytest.raises(UserInputError, match="policy 'full' has no option --beta, --kv-budget"):
        make_policy("full", kv_budget=64, beta=3)
    with pytest.raises(UserInputError, match=r"policy 'snapkv' has no option --beta \(its options: --kv-budget"):
        make_policy("snapkv", kv_budget=64, beta=3)
    assert make_policy("snapkv", kv_budget=64, beta=None).kv_budget == 64  # None: the default
    shared = {"kv_budget": 64, "beta": 3}
    assert make_policy("full", **options_for("full", shared)).hyperparameters() == {}
    assert make_policy("snapkv", **options_for("snapkv", shared)).kv_budget == 64


@pytest.mark.parametrize(
    "name,kwargs,fragment",
    [
        ("pyramidkv", dict(kv_budget=8, window=8), "must exceed --window"),
        ("snapkv", dict(kv_budget=4, window=8), "must exceed --window"),
        ("snapkv", dict(window=0), "--window must be a positive integer"),
        ("h2o", dict(kv_budget=-5), "--kv-budget must be a positive integer"),
        ("pyramidkv", dict(kernel=4), "--kernel must be a positive odd number"),
        ("pyramidkv", dict(kernel=0), "--kernel must be a positive odd number"),
        ("snapkv", dict(pooling="median"), "unknown pooling"),
        ("pyramidkv", dict(granularity="token"), "unknown granularity"),
        ("pyramidkv", dict(beta=0), "--beta must be a positive integer"),
        ("pyramidkv", dict(schedule="cubic"), "unknown schedule"),
        ("streamingllm", dict(kv_budget=16, window=8, sinks=9), "--sinks"),
        ("kvzip", dict(kv_budget=16, sinks=17), "--sinks"),
        ("kvzip", dict(score_chunk=0), "--score-chunk must be a positive integer"),
        ("kvzip", dict(postfix=-1), "--postfix"),
        ("kvzip", dict(kv_budget=0), "--kv-budget must be a positive integer"),
        ("pyramidinfer", dict(recent_ratio=1.0), "--recent-ratio"),
        ("pyramidinfer", dict(decay=0.0), "--decay"),
        ("pyramidinfer", dict(decay_schedule="linear"), "unknown decay schedule"),
        ("pyramidinfer", dict(min_context=0), "--min-context must be a positive integer"),
        ("pyramidinfer", dict(decay=1), "--decay must be float"),
        ("nope", {}, "unknown policy 'nope'"),
    ],
)
def test_invalid_hyperparameters_are_refused(name, kwargs, fragment):
    with pytest.raises(UserInputError, match=fragment):
        make_policy(name, **kwargs)


@pytest.mark.parametrize("name,granularity", [  # query-head for the methods that have the option
    (n, g) for n in PER_LAYER for g in ("kv-head", "query-head") if g == "kv-head" or "granularity" in
    options_for(n, {"granularity": g})])
def test_select_contract(name, granularity):
    torch.manual_seed(0)
    b, h, hkv, q, d = 2, 4, 2, 40, 8
    policy = make_policy(name, **options_for(name, {"kv_budget": 16, "window": 4, "granularity": granularity}))
    lengths = torch.tensor([40, 35])  # right padding: row 1 has 5 padding slots at the end
    keys, values = torch.randn(b, hkv, q, d), torch.randn(b, hkv, q, d)
    idx, k, v = policy.select(torch.randn(b, q, h, d), keys, values, lengths, 12)
    hc = h if policy.cache_heads_are_query_heads else hkv
    exact = name != "chunkkv"  # ChunkKV keeps whole chunks (the window's included): at most 12 + 4 tokens
    assert idx.shape[:2] == (b, hc) and (idx.shape[2] == 16 if exact else idx.shape[2] <= 16)
    assert k.shape == (*idx.shape, d) and v.shape == k.shape
    for row, n in enumerate(lengths.tolist()):
        for head in idx[row]:
            valid = head[head >= 0]
            assert bool((head[len(valid):] == -1).all()), "compact: the kept tokens first, -1 after"
            assert torch.all(valid[1:] > valid[:-1]), "sorted ascending and distinct"
            assert torch.equal(valid[-4:], torch.arange(n - 4, n)), "the window, last"
            assert len(valid) == 16 if exact else len(valid) <= 16
            assert bool((valid < n).all()), "padding is never selected"
    src = keys.repeat_interleave(h // hkv if hc == h else 1, dim=1)
    gathered = torch.gather(src, 2, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d))
    assert torch.equal(k, torch.where(idx.unsqueeze(-1) >= 0, gathered, torch.zeros(())))


@pytest.mark.parametrize("name", [n for n in COMPRESSING if "kv_budget" in make_policy(n).hyperparameters()])
def test_budgets_per_policy(name):
    policy = make_policy(name, **options_for(name, {"kv_budget": 32, "window": 4}))
    assert policy.layer_selected(4, 31) is None
    sel = policy.layer_selected(4, 200)
    assert len(sel) == 4
    if name == "pyramidkv":
        assert sel[0] > sel[-1]
    else:  # KVzip's is the mean per layer (no window): its heads and layers share C * L * Hkv pairs unevenly
        assert sel == [32 - policy.window] * 4


def test_pyramidinfer_budgets_follow_the_prompt_length():
    """The recent window (1 + int(0.2 q)) always, the context shrinking per layer down to `min_context` (a cut
    below it keeps the layer's context whole), layer 0 caching the whole prompt. The default schedule is the
    official configs' (prefill_decay_strategy "cosine", prefill_decay_ratio 0.9): layer l keeps
    0.1 * (cos(pi l / L) + 1) / 2 + 0.9 of its context; `geometric` keeps `decay` at every layer."""
    policy = make_policy("pyramidinfer")
    assert policy.decay_schedule == "cosine" and policy.decay == 0.9
    assert policy.layer_selected(4, 60) is None  # context 48 <= min_context 64: nothing to cut
    counts = policy.layer_selected(4, 1000)  # R = 200, context 799; keeps 1.0, 0.9854, 0.95 at layers 0-2
    assert counts == [1000, 1000, 201 + 787, 201 + 747]
    geometric = make_policy("pyramidinfer", decay_schedule="geometric")
    assert geometric.layer_selected(4, 1000) == [1000, 201 + 719, 201 + 647, 201 + 582]
    deep = geometric.layer_selected(48, 1000)
    last = deep[-1] - 201  # once a cut would cross min_context, the context stays as it is
    assert last > 64 and int(last * 0.9) <= 64 and deep[-3:] == [deep[-1]] * 3
    cosine = make_policy("pyramidinfer", decay=0.5).layer_selected(4, 1000)
    assert cosine[1] == 1000 and cosine[2] < cosine[1]  # the paper code's ramp keeps everything at layer 0


def test_full_keeps_everything():
    assert make_policy("full").layer_selected(32, 100000) is None
