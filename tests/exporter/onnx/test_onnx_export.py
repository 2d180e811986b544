"""Engine directories: manifest, I/O names, shared weights, atomic builds, refusal of broken engines."""

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from engines.ort_engine import OrtEngine
from exporter.checkpoint import load_model
from exporter.engine_dir import MANIFEST, read_manifest
from exporter.onnx.export import build_onnx_engine
from methods import POLICIES, make_policy, options_for
from pkv_cli import main
from pkv_core.errors import UserInputError
from tests import matrix


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("e") / "engine"
    build_onnx_engine(load_model("tiny-mistral"), make_policy("pyramidkv", kv_budget=32, window=4), out,
                      max_input_len=512)
    return out


def test_manifest(engine_dir):
    m = read_manifest(engine_dir)
    assert m["format_version"] == 3 and m["backend"] == "onnx" and m["dtype"] == "fp32"
    assert m["onnx"]["target"] == "onnxruntime" and m["onnx"]["opset"] == 21
    assert m["policy"]["name"] == "pyramidkv" and m["policy"]["kv_budget"] == 32
    assert m["model"]["name"] == "tiny-mistral" and m["model"]["sliding_window"] == 48
    assert m["max_input_len"] == 512 and m["onnx"]["ir_version"] <= 13
    assert m["budgets"]["selected_at_max_input_len"] == [55, 37, 19, 1]
    # over every prompt length: layers 2 and 3 keep 28 (C - w) of a prompt in the uniform regime, 32 <= q < 56
    assert m["budgets"]["largest_selected"] == [55, 37, 28, 28]
    assert {"onnx", "onnxruntime", "torch"} <= set(m["tools"])
    paths = {f["path"] for f in m["files"]}
    assert {"prefill.onnx", "decode.onnx", "weights.bin"} <= paths and all(len(f["sha256"]) == 64 for f in m["files"])


def test_io_names_and_symbolic_lengths(engine_dir):
    prefill = onnx.load(str(engine_dir / "prefill.onnx"), load_external_data=False)
    decode = onnx.load(str(engine_dir / "decode.onnx"), load_external_data=False)
    assert [i.name for i in prefill.graph.input] == ["input_ids", "attention_mask", "position_ids", "reserve_tokens"]
    outs = [o.name for o in prefill.graph.output]
    assert outs[0] == "logits"
    decode_inputs = [x.name for x in decode.graph.input]
    assert decode_inputs[:2] == ["input_ids", "position_ids"]
    for i in range(4):
        assert {f"present.{i}.key", f"present.{i}.value", f"kept_indices.{i}", f"kv_lengths.{i}"} <= set(outs)
        assert {f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"past_lengths.{i}",
                f"cache_positions.{i}"} <= set(decode_inputs)  # tiny-mistral: the window needs the positions
        assert {f"present.{i}.key", f"present.{i}.value"} <= {o.name for o in decode.graph.output}
    lengths = {o.name: o.type.tensor_type.shape.dim[2].dim_param for o in prefill.graph.output
               if o.name.endswith(".key")}
    assert lengths == {f"present.{i}.key": f"present_len_{i}" for i in range(4)}
    past = {x.name: x.type.tensor_type.shape.dim[2].dim_param for x in decode.graph.input if x.name.endswith(".key")}
    assert past == {f"past_key_values.{i}.key": f"capacity_{i}" for i in range(4)}


def test_selection_node_is_a_model_local_function(engine_dir):
    prefill = onnx.load(str(engine_dir / "prefill.onnx"), load_external_data=False)
    assert [(f.domain, f.name) for f in prefill.functions] == [("pkv", "PyramidKVSelect")]
    selects = [n for node in prefill.graph.node if node.op_type == "If"
               for branch in node.attribute for n in branch.g.node if n.op_type == "PyramidKVSelect"]
    assert len(selects) == 4 and all(n.domain == "pkv" for n in selects)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in selects[0].attribute}
    assert attrs == {"window": 4, "kernel": 7, "pooling": b"max", "granularity": b"kv-head", "observe": b"window"}
    topks = [n for n in prefill.functions[0].node if n.op_type == "TopK"]
    assert topks and all(onnx.helper.get_attribute_value(a) == 1 for n in topks for a in n.attribute
                         if a.name == "sorted")


def test_no_quadratic_tensor_in_the_long_context_path(engine_dir):
    """Every tensor onnx shape inference can size in the prefill is at most linear in the prompt length: no
    node's output has two prompt-length dimensions (the old [B, H, q, q] scores)."""
    prefill = onnx.load(str(engine_dir / "prefill.onnx"), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(prefill)
    for value in inferred.graph.value_info:
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
        assert dims.count("prompt_len") < 2, value.name


def test_weights_are_shared_not_duplicated(engine_dir):
    weights = (engine_dir / "weights.bin").stat().st_size
    for name in ("prefill.onnx", "decode.onnx"):
        model = onnx.load(str(engine_dir / name), load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {
            "weights.bin"}
        assert (engine_dir / name).stat().st_size < weights / 4


@pytest.mark.parametrize("damage,fragment", [
    ("no-manifest", "not a finished pkv-export engine"),
    ("truncated-weights", "truncated or modified"),
    ("missing-graph", "decode.onnx is missing"),
    ("bad-version", "format version 99"),
    ("corrupt-manifest", "corrupt manifest"),
])
def test_broken_engine_directories_are_refused(engine_dir, tmp_path, damage, fragment):
    d = tmp_path / "broken"
    shutil.copytree(engine_dir, d)
    if damage == "no-manifest":
        (d / MANIFEST).unlink()
    elif damage == "truncated-weights":
        data = (d / "weights.bin").read_bytes()
        (d / "weights.bin").write_bytes(data[:1000])
    elif damage == "missing-graph":
        (d / "decode.onnx").unlink()
    elif damage == "bad-version":
        m = json.loads((d / MANIFEST).read_text())
        m["format_version"] = 99
        (d / MANIFEST).write_text(json.dumps(m))
    else:
        (d / MANIFEST).write_text("{")
    with pytest.raises(UserInputError, match=fragment):
        OrtEngine(d)
    r = CliRunner().invoke(main, ["generate", "--engine", str(d), "--prompt", "hi"])
    assert r.exit_code == 2 and fragment in r.stderr and "Traceback" not in r.stderr


def test_modified_file_fails_hash_check(engine_dir, tmp_path):
    d = tmp_path / "modified"
    shutil.copytree(engine_dir, d)
    data = bytearray((d / "weights.bin").read_bytes())
    data[-1] ^= 0xFF
    (d / "weights.bin").write_bytes(bytes(data))
    read_manifest(d, verify_hashes=False)  # same size: only the hash can tell
    with pytest.raises(UserInputError, match="sha256"):
        read_manifest(d)


def test_no_overwrite_without_force_and_atomic_failure(tmp_path):
    loaded = load_model("tiny-llama3")
    policy = make_policy("snapkv", kv_budget=32, window=4)
    out = tmp_path / "eng"
    build_onnx_engine(loaded, policy, out)
    with pytest.raises(UserInputError, match="already exists"):
        build_onnx_engine(loaded, policy, out)

    class Exploding:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def get(self, name):
            self.calls += 1
            if self.calls > 5:
                raise RuntimeError("disk on fire")
            return self.inner.get(name)

    before = read_manifest(out)
    loaded.weights = Exploding(loaded.weights)
    with pytest.raises(RuntimeError):
        build_onnx_engine(loaded, policy, out, force=True)
    assert read_manifest(out) == before, "a failed --force build leaves the old engine intact"
    assert [p.name for p in tmp_path.iterdir()] == ["eng"], "no partial directory left behind"


def test_force_replaces(tmp_path):
    out = tmp_path / "eng"
    build_onnx_engine(load_model("tiny-llama3"), make_policy("snapkv", kv_budget=32, window=4), out)
    build_onnx_engine(load_model("tiny-llama3"), make_policy("h2o", kv_budget=32, window=4), out, force=True)
    assert read_manifest(out)["policy"]["name"] == "h2o"


def test_disk_space_is_checked_first(tmp_path, monkeypatch):
    import exporter.onnx.export as ox

    monkeypatch.setattr(ox.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(UserInputError, match="not enough disk space"):
        build_onnx_engine(load_model("tiny-llama3"), make_policy("snapkv"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", list(POLICIES))
def test_cli_build_generate_compare(tmp_path, name):
    out = tmp_path / name
    r = CliRunner().invoke(main, ["build", "--model", "tiny-mistral", "--policy", name,
                                  *matrix.flags(name, **options_for(name, {"kv_budget": 24})), "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["compare", "--engine", str(out), "--prompt-len", "120", "--batch", "2",
                                  "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["tokens_equal"] and d["passed"] and d["max_abs_logit_diff"] <= 1e-4
    assert d["index_agreement"] == 1.0 and d["prompt_lengths"] == [120, 113]


@pytest.mark.parametrize("args", [["--target", "tensorrt"], ["--backend", "trtllm"], ["--backend", "tensorrt"]])
@pytest.mark.parametrize("policy", ["kvzip", "pyramidinfer"])
def test_cli_onnxruntime_only_policy_on_a_tensorrt_backend_is_one_line_exit_2(tmp_path, args, policy):
    r = CliRunner().invoke(main, ["build", "--policy", policy, *args, "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--backend onnx --target onnxruntime only" in r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "e").exists()


def test_cli_compare_fails_with_exit_1_on_disagreement(tmp_path):
    out = tmp_path / "e"
    CliRunner().invoke(main, ["build", "--policy", "snapkv", "--kv-budget", "24", "--window", "4", "--out", str(out)])
    r = CliRunner().invoke(main, ["compare", "--engine", str(out), "--prompt-len", "100", "--atol", "1e-12"])
    assert r.exit_code == 1 and "FAIL" in r.stdout


def test_cli_build_real_preset_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["build", "--model", "llama3-70b", "--out", str(tmp_path / "e")])
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert "\n" not in line and "meta-llama/Meta-Llama-3-70B-Instruct" in line and str(tmp_path / "cache") in line
    assert "--random-weights" in line and "--model DIR" in line


def test_cli_random_weights_num_layers(tmp_path):
    r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--random-weights", "--num-layers", "2",
                                  "--out", str(tmp_path / "e"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["num_layers"] == 2


@pytest.mark.parametrize("length", ["0", "-3", "999999"])
def test_cli_build_refuses_a_bad_max_input_len(tmp_path, length):
    r = CliRunner().invoke(main, ["build", "--max-input-len", length, "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--max-input-len must be in [1," in r.stderr
    assert not (tmp_path / "e").exists()
