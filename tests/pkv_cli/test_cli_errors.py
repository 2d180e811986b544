"""Every user mistake is one line and exit code 2; --force never destroys an input or a foreign directory."""

from __future__ import annotations

import json
import shutil

import click
import pytest
from click.testing import CliRunner

from exporter.engine_dir import read_manifest
from pkv_cli import main
from pkv_cli.common import printable
from pkv_core.errors import UserInputError
from tests.faults.conftest import cli, one_line_error

TINY = ["--model", "tiny-llama3", "--policy", "snapkv", "--kv-budget", "24", "--window", "4"]


def invoke(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def assert_one_line(r, code=2, fragment=""):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.stderr and "Usage:" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args,fragment", [
    (["plan", "--bogus"], "No such option"),
    (["plan"], "--context"),
    (["plan", "--context", "many"], "not a valid integer"),
    (["build", "--dtype", "fp8", "--out", "x"], "'fp8' is not one of"),
    (["generate", "--device", "tpu", "--prompt", "x"], "--device"),
    (["validate", "--suite", "bogus", "--out", "x"], "--suite"),
    (["serve", "--http-port", "0"], "--http-port"),
    (["frobnicate"], "No such command"),
    (["compare"], "--engine"),
])
def test_click_usage_errors_are_one_line(args, fragment):
    line = assert_one_line(invoke(*args), 2, fragment)
    assert "--help" in line


def test_usage_errors_from_the_real_console_script_are_one_line():
    r = cli("plan", "--bogus")
    assert r.returncode == 2 and one_line_error(r).endswith("(see 'pkv-export plan --help')")


@pytest.mark.parametrize("args", [
    ["generate", "--prompt", b"caf\xe9 au lait"],
    ["compare", "--engine", "E", "--prompt", b"\xff\xfe"],
    ["client", "--prompt", b"\xc3("],
    ["validate", "--model", "tiny-llama3", "--suite", "niah", "--needle", b"\xff", "--question", "q", "--answer",
     "a", "--out", "OUT"],
])
def test_non_utf8_argument_is_one_line(args, tmp_path):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    r = cli(*args)
    assert r.returncode == 2 and "not valid UTF-8" in one_line_error(r)


def test_non_utf8_stdin_and_file(tmp_path):
    r = cli("generate", "--prompt-file", "-", input=b"\xff\xfe\x00bad")
    assert r.returncode == 2 and "stdin: not UTF-8 text" in one_line_error(r)
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1"))
    assert_one_line(invoke("generate", "--prompt-file", str(f)), 2, "not UTF-8 text")


def test_every_option_has_help():
    missing = [f"{name} {p.opts[0]}" for name, cmd in main.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []


def test_plan_and_build_default_to_the_same_dtype():
    def default(command, name):
        return next(p.default for p in main.commands[command].params if p.name == name)
    assert default("plan", "dtype") == default("build", "dtype") == "fp32"


def test_control_bytes_are_escaped_in_text_output():
    assert printable("a\x1b[31mb\x07\n\tc\x00") == "a\\x1b[31mb\\x07\n\tc\\x00"
    r = invoke("generate", "--prompt", "Once upon a time", "--prompt", "The capital", "--max-new-tokens", "64")
    assert r.exit_code == 0
    assert all(c in "\n\t" or c.isprintable() for c in r.stdout), repr(r.stdout)


def test_generate_says_when_nothing_was_compressed():
    r = invoke("generate", "--prompt", "The capital of France is", "--max-new-tokens", "2")
    assert r.exit_code == 0 and "nothing was compressed" in r.stderr
    r = invoke("generate", *TINY, "--prompt", "word " * 40, "--max-new-tokens", "2")
    assert r.exit_code == 0 and "nothing was compressed" not in r.stderr


BUILD_STDERR = {}  # the module engine's build: its progress lines (issue 31 case 12)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("e") / "eng"
    r = invoke("build", *TINY, "--max-input-len", "512", "--out", str(out))
    assert r.exit_code == 0, r.output
    BUILD_STDERR[out] = r.stderr
    return out


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_force_never_replaces_an_input(tmp_path, tiny_llama_dir, engine):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_llama_dir, ck)
    before = tree(ck)
    cases = [
        ["build", "--model", str(ck), "--out", str(ck), "--force"],
        ["build", "--model", str(ck), "--out", str(tmp_path), "--force"],  # the parent holds the input
        ["triton", "--engine", str(engine), "--out", str(engine), "--force"],
        ["validate", "--engine", str(engine), "--suite", "niah", "--out", str(engine), "--force"],
        ["validate", *TINY, "--suite", "longbench", "--data", str(ck), "--out", str(ck), "--force"],
    ]
    for args in cases:
        assert_one_line(invoke(*args), 2, "an input of this command")
    assert tree(ck) == before
    read_manifest(engine)


@pytest.mark.parametrize("command", ["build", "triton", "validate"])
def test_force_replaces_only_an_output_of_the_same_kind(tmp_path, engine, command):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    other_kind = tmp_path / "other"
    shutil.copytree(engine, other_kind)  # an engine is not a repository or a run
    args = {"build": ["build", *TINY],
            "triton": ["triton", "--engine", str(engine)],
            "validate": ["validate", "--engine", str(engine), "--suite", "niah", "--lengths", "100"]}[command]
    targets = [foreign] if command == "build" else [foreign, other_kind]
    for target in targets:
        assert_one_line(invoke(*args, "--out", str(target), "--force"), 2, "--force replaces only")
    assert (foreign / "thesis.tex").read_text() == "years of work"
    f = tmp_path / "a-file"
    f.write_text("keep")
    assert_one_line(invoke(*args, "--out", str(f), "--force"), 2, "not a directory")
    assert f.read_text() == "keep"


def test_force_replaces_an_output_of_the_same_kind(tmp_path, engine):
    repo = tmp_path / "repo"
    assert invoke("triton", "--engine", str(engine), "--out", str(repo)).exit_code == 0
    assert_one_line(invoke("triton", "--engine", str(engine), "--out", str(repo)), 2, "--force")
    r = invoke("triton", "--engine", str(engine), "--out", str(repo), "--force", "--link", "--model-name", "m2")
    assert r.exit_code == 0, r.output
    assert (repo / "m2" / "config.pbtxt").is_file() and not (repo / "pkv").exists()
    assert str(engine.resolve()) in (repo / "m2" / "config.pbtxt").read_text()
    assert not (repo / "m2" / "1" / "engine").exists(), "--link references the engine instead of copying it"


def test_chat_without_a_template_is_one_line(tmp_path):
    """--chat on a checkpoint whose tokenizer has no chat template says so instead of sending a bare prompt."""
    from exporter.checkpoint import shipped_checkpoint

    model = tmp_path / "no-template"
    shutil.copytree(shipped_checkpoint("tiny-retriever"), model)
    (model / "chat_template.jinja").unlink()
    assert_one_line(invoke("generate", "--model", str(model), "--chat", "--prompt", "hi"), 2,
                    "tokenizer has no chat template; run without --chat")


# Issue 31, cases 7-14: options that were silently ignored or wrong, outputs inside inputs, reports.

@pytest.mark.parametrize("args,flags", [
    (["--policy", "snapkv", "--kv-budget", "64"], "--policy, --kv-budget"),
    (["--kv-budget", "8"], "--kv-budget"),  # was checked against the default window, not the engine's
    (["--model", "tiny-mistral", "--dtype", "fp16"], "--model, --dtype"),
])
def test_engine_options_fixed_at_build_time_are_refused(engine, args, flags, tmp_path):
    """Case 7: generate --engine ran the engine's own method and budget whatever --policy / --kv-budget said
    (validate --engine too)."""
    r = invoke("generate", "--engine", str(engine), *args, "--prompt", "hi")
    assert_one_line(r, 2, f"{flags} cannot be given with --engine")
    method_options = [a for a in args if a not in ("--model", "tiny-mistral", "--dtype", "fp16")]
    if method_options:
        out = str(tmp_path / "r")
        r = invoke("validate", "--engine", str(engine), *method_options, "--suite", "niah", "--out", out)
        assert_one_line(r, 2, "cannot be given with --engine")
        assert not (tmp_path / "r").exists()


def test_reference_on_cuda_is_refused():
    """Case 8: generate --model --device cuda ran the reference on the CPU without a word."""
    assert_one_line(invoke("generate", "--device", "cuda", "--prompt", "hi"), 2,
                    "--device cuda applies to --engine")


def test_outputs_inside_an_input_are_refused(tmp_path, tiny_llama_dir, engine):
    """Case 9: triton --engine E --out E/repo copied the engine into itself (recursion, a 196 KB traceback);
    every command that writes a directory refuses an output inside one of its inputs, before writing."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_llama_dir, ck)
    before, engine_before = tree(ck), tree(engine)
    cases = [
        ["triton", "--engine", str(engine), "--out", str(engine / "repo")],
        ["validate", "--engine", str(engine), "--suite", "niah", "--out", str(engine / "runs" / "niah")],
        ["build", "--model", str(ck), "--out", str(ck / "engine")],
        ["sweep", "--model", str(ck), "--suite", "niah", "--out", str(ck / "sweep")],
    ]
    for args in cases:
        assert_one_line(invoke(*args), 2, "is inside")
    assert tree(ck) == before and tree(engine) == engine_before


@pytest.mark.parametrize("args,fragment", [
    (["--atol", "-1"], "--atol must be a finite number >= 0"),
    (["--atol", "nan"], "--atol must be a finite number >= 0"),
    (["--min-index-agreement", "1.5"], "--min-index-agreement must be in [0, 1]"),
    (["--model", "tiny-mistral"], "tiny-mistral is not the model the engine was built from: arch 'mistral'"),
])
def test_compare_refuses_bad_tolerances_and_another_model(engine, args, fragment):
    """Case 10: --atol -1 reported FAIL (exit 1), and another model "disagreed beyond tolerance" (exit 1)."""
    assert_one_line(invoke("compare", "--engine", str(engine), "--prompt-len", "50", *args), 2, fragment)


def test_plan_beyond_the_positions_warns_and_validate_checks_before_writing(engine, tmp_path):
    """Case 11: plan --context beyond the model's positions said nothing (a warning now, and `beyond_positions`
    in --json); validate --max-new-tokens 1e9 was refused only after the run started, leaving a run directory."""
    r = invoke("plan", "--context", "1000000000000")
    assert r.exit_code == 0 and "warning: --context 1000000000000 exceeds tiny-llama3's 16384 positions" in r.stderr
    r = invoke("plan", "--context", "1000000000000", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["beyond_positions"] is True
    assert json.loads(invoke("plan", "--context", "100", "--json").stdout)["beyond_positions"] is False
    out = tmp_path / "run"
    r = invoke("validate", "--engine", str(engine), "--suite", "niah", "--lengths", "300", "--depths", "50",
               "--max-new-tokens", "1000000000", "--out", str(out))
    assert_one_line(r, 2, "1000000000 new tokens need 1000000298 positions, the model has 16384")
    assert not out.exists()


def test_build_reports_progress_lines_and_disk_sizes_in_a_readable_unit(engine, tmp_path, monkeypatch):
    """Case 12: build wrote nothing to a stderr that is not a terminal (29 s of silence on a large engine); the
    disk check said "needs about 0.0 GiB, 0.0 GiB free" for small engines."""
    from exporter.onnx import export

    lines = [x for x in BUILD_STDERR[engine].splitlines() if x.startswith("writing weights")]
    assert lines and lines[-1].startswith("writing weights (embedding, layers, head): 6/6, ")
    assert "KiB written" in lines[-1]
    monkeypatch.setattr(export.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6 - 512, 512))
    with pytest.raises(UserInputError, match=r"needs about 48\.8 KiB, 512 B free"):
        export.check_disk(tmp_path, 50_000)


def test_generate_json_has_one_schema_for_model_and_engine(engine):
    """Case 13: kv_bytes_after_prefill / kv_bytes_ideal sat inside timings_s (engines only; the reference, KVzip's
    included, had none): they are top-level fields, equal for the engine and its reference."""
    prompt = ["--prompt", "word " * 40, "--max-new-tokens", "2", "--json"]
    got = json.loads(invoke("generate", "--engine", str(engine), *prompt).stdout)
    want = json.loads(invoke("generate", *TINY, *prompt).stdout)
    assert set(got) == set(want)
    assert set(got["timings_s"]) == set(want["timings_s"]) == {"prefill", "decode"}
    assert got["kv_bytes_after_prefill"] == want["kv_bytes_after_prefill"] > 0
    assert got["kv_bytes_ideal"] == want["kv_bytes_ideal"] > 0


def test_compare_prints_agreements_with_four_decimals():
    """Case 14: the unquantized model's index_agreement was printed as 0.674764631983219."""
    from engines.compare import Comparison
    from pkv_cli.engine import comparison_lines

    result = Comparison(True, None, 2.5e-6, True, 0.674764631983219, [0.67], 4, 1e-4, True)
    drift = {"token_agreement": 0.75, "max_abs_logit_diff": 0.0123456, "index_agreement": 0.674764631983219}
    lines = comparison_lines(result, drift)
    assert lines[0] == ("tokens_equal=True first_divergence=None max_abs_logit_diff=2.5e-06 index_agreement=0.6748 "
                        "-> PASS")
    assert lines[1].endswith("token_agreement=0.7500 max_abs_logit_diff=0.0123 index_agreement=0.6748")
