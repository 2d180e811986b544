"""`pkv-export inspect`: the kept sets it shows are the engine's own, equal on the reference and the ONNX engine for
every method; the scores it records are what each method ranked by; the page, PNG and JSON; bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from methods import POLICIES
from pkv_cli import main
from validate.inspect_data import InspectData, Mark
from validate.inspect_page import MAX_COLUMNS, render_page
from validate.inspection import run_inspect, write_inspect_dir

MODEL = "tiny-llama3"
# Byte tokens: ~190 of them, so every method compresses with tests/matrix.py's small settings; the mark is split
# over several tokens (multi-byte characters).
PROMPT = ("Once upon a time in Zürich, a traveller wrote: the best thing to do in 東京 is to walk by the river 🚀 at "
          "dawn. Later the committee repaired the wooden bridge near the harbour, and the story ends here.")
MARK = "東京 is to walk"


def inspect_both(built_engine, name: str):
    ort, ref = built_engine(MODEL, name)
    ids = ref.tokenizer(PROMPT)["input_ids"]
    got = [run_inspect(e, ids, e.policy, MODEL, e.name, MARK) for e in (ref, ort)]
    return ort, ref, ids, got


@pytest.mark.parametrize("name", list(POLICIES))
def test_the_reference_and_the_onnx_engine_show_the_same_kept_sets(built_engine, name):
    """Every method (KVzip's global top-k, PyramidInfer's cuts, ChunkKV's chunks...): the page's kept sets are the
    engine's own kept_indices, position for position, on both engines, and its bytes are the engine's."""
    ort, ref, ids, (a, b) = inspect_both(built_engine, name)
    assert a.kept == b.kept
    held = ort.generate([ids], 1, return_indices=True)
    assert b.kept == [[[p for p in row if p >= 0] for row in k[0].tolist()] for k in held.kept_indices]
    assert b.kv_bytes_held == held.kv_bytes_after_prefill
    assert b.kv_bytes_kept == held.kv_bytes_ideal == a.kv_bytes_kept
    assert a.mark == b.mark and "".join(a.tokens[a.mark.token_start : a.mark.token_end]) == MARK
    q = len(ids)
    if POLICIES[name]().compresses:
        assert any(len(p) < q for heads in a.kept for p in heads), "the settings must make the method compress"
        assert a.kv_bytes_held < a.kv_bytes_full
    sinks, window = a.sinks, a.window
    for heads in a.kept:  # what the method keeps whatever the scores, every head keeps
        for p in heads:
            assert set(range(sinks)) | set(range(q - window, q)) <= set(p)
    assert b.scores is None  # the ONNX engine has no scores output; the reference records them on request
    assert (a.scores is not None) == (name not in ("full", "streamingllm"))


def _outranks(kept: np.ndarray, dropped: np.ndarray) -> None:
    kept, dropped = kept[np.isfinite(kept)], dropped[np.isfinite(dropped)]
    if len(kept) and len(dropped):
        assert kept.min() >= dropped.max(), (kept.min(), dropped.max())


def _per_head(d: InspectData) -> int:
    """In every (layer, head), the kept candidates outrank the dropped ones (PyramidInfer: layer l's scores are the
    ranking layer l - 1 made of its context, which decided what layer l keeps)."""
    checked = 0
    for layer, heads in enumerate(d.kept):
        for h, positions in enumerate(heads):
            if d.scores[layer] is None:
                continue
            row, keep = d.scores[layer][h], np.zeros(d.prompt_len, bool)
            keep[positions] = True
            _outranks(row[keep], row[~keep])
            checked += int(np.isfinite(row[~keep]).any())
    return checked


def _global(d: InspectData) -> int:
    """KVzip: one top-k over every layer and head."""
    rows = np.stack([s for s in d.scores])  # [L, Hc, q]
    keep = np.zeros(rows.shape, bool)
    for layer, heads in enumerate(d.kept):
        for h, positions in enumerate(heads):
            keep[layer, h, positions] = True
    _outranks(rows[keep], rows[~keep])
    return int(np.isfinite(rows[~keep]).sum())


RANKED = {"snapkv": _per_head, "pyramidkv": _per_head, "h2o": _per_head, "chunkkv": _per_head, "kvzip": _global,
          "pyramidinfer": _per_head}


@pytest.mark.parametrize("name", list(RANKED))
def test_the_recorded_scores_are_what_each_method_ranked_by(built_engine, name):
    ort, ref = built_engine(MODEL, name)
    d = run_inspect(ref, ref.tokenizer(PROMPT)["input_ids"], ref.policy, MODEL, ref.name, None)
    unranked = [0] if name == "pyramidinfer" else []  # its first layer keeps the whole prompt
    assert [layer for layer, s in enumerate(d.scores) if s is None] == unranked
    assert all(s.shape == (d.num_heads, d.prompt_len) for s in d.scores if s is not None)
    assert RANKED[name](d) > 0, "some candidate must have been dropped"


def test_page_png_and_json(built_engine, tmp_path):
    ort, ref = built_engine(MODEL, "pyramidkv")
    ids = ref.tokenizer(PROMPT)["input_ids"]
    d = run_inspect(ref, ids, ref.policy, MODEL, ref.name, MARK, max_new_tokens=3)
    write_inspect_dir(tmp_path, d)
    kept = json.loads((tmp_path / "kept.json").read_text(encoding="utf-8"))
    assert "".join(kept["tokens"]) == ref.tokenizer.decode(ids, skip_special_tokens=False)
    assert kept["prompt_tokens"] == len(ids) and len(kept["layers"]) == d.num_layers
    assert [[h["kept"] for h in layer["heads"]] for layer in kept["layers"]] == d.kept
    scores = kept["layers"][0]["heads"][0]["scores"]
    assert len(scores) == len(ids) and scores[-1] is None  # the window: never a candidate
    m = kept["mark"]
    assert PROMPT[PROMPT.index(MARK):][: len(MARK)] == m["text"] and m["token_end"] - m["token_start"] == len(
        MARK.encode())  # byte tokens: one per byte of the mark
    assert np.array(m["kept_per_layer_head"]).shape == (d.num_layers, d.num_heads)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Content-Security-Policy" in page and "http://" not in page and "https://" not in page
    assert " src=" not in page and "<link" not in page  # self-contained: nothing is fetched
    assert page.count('class="budget"') == d.num_layers and 'id="mark"' in page and MARK.split()[0] in page
    assert tokens_in(page) == len(ids)
    with Image.open(tmp_path / "kept.png") as png:
        assert png.format == "PNG" and png.width > 500


def tokens_in(page: str) -> int:
    return page.split('id="prompt">', 1)[1].count('<span class="t s')


def synthetic(q: int = 8192, layers: int = 30, heads: int = 3, mark: tuple[int, int] = (4000, 4030)) -> InspectData:
    """A page's data without a model (the page's size and binning are the page builder's alone): a 30-layer model
    keeping a random tenth of an 8k prompt per head, plus sinks and window."""
    rng = np.random.default_rng(0)
    kept = [[sorted({*range(4), *range(q - 32, q), *rng.choice(q, q // 10, replace=False).tolist()})
             for _ in range(heads)] for _ in range(layers)]
    tokens = [f" w{i % 97}" if i % 13 else "\n" for i in range(q)]
    n = mark[1] - mark[0]
    tokens[mark[0] : mark[1]] = ["東", "京", " ünï", "🚀"] * (n // 4) + ["."] * (n % 4)
    text = "".join(tokens[mark[0] : mark[1]])
    start = len("".join(tokens[: mark[0]]))
    return InspectData(model="synthetic", engine="none", policy="pyramidkv", hyperparameters={"kv_budget": 1024},
                       token_ids=list(range(q)), tokens=tokens, kept=kept, scores=None, planned=[q // 10 + 36] * layers,
                       sinks=4, window=32, kv_bytes_held=1, kv_bytes_kept=1, kv_bytes_full=10, dtype="fp16",
                       mark=Mark(text, start, start + len(text), mark[0], mark[1], 1))


def test_an_8k_prompt_is_binned_and_stays_small():
    d = synthetic()
    page = render_page(d)
    assert f'data-columns="{MAX_COLUMNS}"' in page and 'data-bin="8"' in page
    assert tokens_in(page) == d.prompt_len  # one span per token, nothing more per token
    assert len(page.encode()) < 1.5 * 2**20, len(page.encode())


# --- the command line ------------------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def one_line(r, fragment: str) -> None:
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr


REF = ["--model", MODEL, "--policy", "snapkv", "--kv-budget", "24", "--window", "4", "--max-new-tokens", "2"]


def test_cli_writes_the_page_and_replaces_only_its_own_kind(tmp_path):
    out = tmp_path / "page"
    r = invoke(*REF, "--prompt", PROMPT, "--mark", MARK, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["mark"]["tokens"] == len(MARK.encode()) and 0 < summary["kv_ratio"] < 1
    assert {p.name for p in out.iterdir()} == {"index.html", "kept.png", "kept.json"}
    one_line(invoke(*REF, "--prompt", PROMPT, "--out", out), "already exists")
    assert invoke(*REF, "--prompt", "another prompt", "--out", out, "--force").exit_code == 0
    assert json.loads((out / "kept.json").read_text())["tokens"][1:3] == ["a", "n"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line(invoke(*REF, "--prompt", PROMPT, "--out", tmp_path / "mine", "--force"), "replaces only")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_on_an_onnx_engine(built_engine, tmp_path):
    ort, _ = built_engine(MODEL, "chunkkv")
    r = invoke("--engine", ort.dir, "--prompt", PROMPT, "--mark", MARK, "--out", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["policy"] == "chunkkv"
    one_line(invoke("--engine", ort.dir, "--kv-budget", "64", "--prompt", PROMPT, "--out", tmp_path / "q"),
             "fixed when it is built")


@pytest.mark.parametrize("args,fragment", [
    ([*REF, "--prompt", ""], "empty prompt"),
    ([*REF, "--prompt", PROMPT, "--mark", "not in there"], "is not in the prompt"),
    ([*REF, "--prompt", PROMPT, "--mark", ""], "--mark must not be empty"),
    (["--prompt", PROMPT], "give --model M"),
    ([*REF, "--prompt", PROMPT, "--max-new-tokens", "0"], "--max-new-tokens"),
    ([*REF, "--prompt", PROMPT, "--prompt-file", "x.txt"], "not both"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    one_line(invoke(*args, "--out", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


def test_an_engine_without_kept_indices_is_refused(tmp_path):
    """A TensorRT-LLM checkpoint (written here on CPU): its runner returns tokens only. Refused from the manifest,
    before TensorRT-LLM would be needed."""
    engine = tmp_path / "trtllm"
    r = CliRunner().invoke(main, ["build", "--backend", "trtllm", "--model", MODEL, "--policy", "snapkv",
                                  "--kv-budget", "24", "--window", "4", "--out", str(engine)])
    assert r.exit_code == 0, r.output
    one_line(invoke("--engine", engine, "--prompt", PROMPT, "--out", tmp_path / "out"),
             "does not report the kept indices")
    assert not (tmp_path / "out").exists()


def test_no_json_number_is_out_of_range(built_engine, tmp_path):
    """Scores hold -inf (not a candidate) and +inf (ChunkKV's window chunks): kept.json writes them as null, so any
    JSON reader (a browser's included) can load it."""
    _, ref = built_engine(MODEL, "chunkkv")
    d = run_inspect(ref, ref.tokenizer(PROMPT)["input_ids"], ref.policy, MODEL, ref.name, None)
    assert any(not math.isfinite(x) for s in d.scores for x in s.ravel())
    write_inspect_dir(tmp_path, d)
    json.loads((tmp_path / "kept.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in kept.json"))
