import json

import pytest
from click.testing import CliRunner

from exporter.specs import PRESETS
from pkv_cli import main


def invoke(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_plan_llama3_70b_json():
    r = invoke("plan", "--model", "llama3-70b", "--policy", "pyramidkv", "--kv-budget", "128", "--window", "8",
               "--context", "8000", "--dtype", "fp16", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model"] == "llama3-70b" and d["policy"] == "pyramidkv" and d["num_layers"] == 80
    assert d["window"] == 8 and d["context"] == 8000 and len(d["layers"]) == 80
    assert d["layers"][0] == {"layer": 0, "selected": 234, "cached": 242}
    assert d["layers"][79] == {"layer": 79, "selected": 76, "cached": 84}
    per_token = 2 * 8 * 128 * 2  # K and V, 8 KV heads, head_dim 128, fp16
    assert d["kv_bytes_full"] == 80 * 8000 * per_token
    assert d["kv_bytes_compressed"] == sum(row["cached"] for row in d["layers"]) * per_token
    assert d["ratio"] == pytest.approx(d["kv_bytes_compressed"] / d["kv_bytes_full"])


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("policy", ["full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv", "kvzip",
                                    "pyramidinfer"])
def test_plan_every_preset_and_policy(preset, policy):
    r = invoke("plan", "--model", preset, "--policy", policy, "--context", "4096", "--batch", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["layers"]) == PRESETS[preset].num_layers
    assert (d["ratio"] == 1.0) == (policy == "full")


def test_plan_table_and_short_context():
    r = invoke("plan", "--model", "llama3-8b", "--context", "100")
    assert r.exit_code == 0 and "no-compression" in r.stdout and "ratio 1.0000" in r.stdout


def test_plan_query_head_counts_query_heads():
    a = json.loads(invoke("plan", "--context", "8000", "--json").stdout)
    b = json.loads(invoke("plan", "--context", "8000", "--granularity", "query-head", "--json").stdout)
    assert b["kv_bytes_compressed"] == a["kv_bytes_compressed"] * 2  # tiny-llama3: 4 query heads, 2 KV heads


def test_generate_text_and_json():
    r = invoke("generate", "--prompt", "Hello there, how are you?", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    j = invoke("generate", "--prompt", "Hello there, how are you?", "--max-new-tokens", "5", "--json")
    d = json.loads(j.stdout)
    assert d["policy"] == "pyramidkv" and len(d["tokens"][0]) <= 5
    assert r.stdout.rstrip("\n") == d["text"][0]


def test_generate_prompt_file_and_stdin(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("From a file")
    a = invoke("generate", "--prompt-file", str(f), "--max-new-tokens", "3", "--json")
    b = invoke("generate", "--prompt-file", "-", "--max-new-tokens", "3", "--json", input="From a file")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["plan", "--context", "100", "--kv-budget", "8", "--window", "8"], "must exceed --window"),
        (["plan", "--context", "100", "--kernel", "6"], "odd"),
        (["plan", "--context", "0"], "must be positive"),
        (["plan", "--model", "gpt-5", "--context", "10"], "no such directory and not a preset"),
        (["generate"], "give a prompt"),
        (["generate", "--prompt", ""], "empty prompt"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "at least 1"),
        (["generate", "--prompt-file", "/nonexistent/file"], "cannot read"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_click_usage_errors_exit_2():
    assert invoke("plan").exit_code == 2  # missing --context
    assert invoke("plan", "--context", "10", "--policy", "magic").exit_code == 2


def test_help_for_every_command():
    for cmd in main.commands:
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.stdout


def test_presets_listing():
    d = json.loads(invoke("presets", "--json").stdout)
    assert {p["name"] for p in d} == set(PRESETS)


def test_cuda_device_without_gpu_is_one_clear_line(tmp_path):
    out = tmp_path / "e"
    assert invoke("build", "--kv-budget", "24", "--window", "4", "--out", str(out)).exit_code == 0
    r = invoke("generate", "--engine", str(out), "--device", "cuda", "--prompt", "hi")
    assert r.exit_code == 2 and "onnxruntime-gpu" in r.stderr and "Traceback" not in r.stderr


def test_generate_answers_questions_from_one_context(tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("The quick brown fox jumps over the lazy dog while the cat naps in the sun. " * 3)
    common = ("generate", "--kv-budget", "24", "--window", "4", "--max-new-tokens", "6")
    r = invoke(*common, "--context", str(context), "--question", " Where?", "--question", " Who jumps?", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [a["question"] for a in d["answers"]] == [" Where?", " Who jumps?"]
    assert d["context_tokens"] > 24 and all(len(a["tokens"]) == 6 for a in d["answers"])
    # each answer equals a run with that question alone: the context is not changed by earlier questions
    alone = json.loads(invoke(*common, "--context", str(context), "--question", " Who jumps?", "--json").stdout)
    assert alone["answers"][0]["tokens"] == d["answers"][1]["tokens"]
    text = invoke(*common, "--context", str(context), "--question", " Where?")
    assert text.exit_code == 0 and text.stdout.startswith("Q:  Where?\nA: ")


@pytest.mark.parametrize("args,fragment", [
    (["--question", "q"], "go together"),
    (["--context", "-"], "go together"),
    (["--context", "-", "--question", "q", "--prompt", "p"], "not both"),
    (["--context", "-", "--question", ""], "empty question"),
])
def test_generate_context_usage_errors(args, fragment):
    r = invoke("generate", *args, input="some context")
    assert r.exit_code == 2 and fragment in r.stderr and "Traceback" not in r.output
