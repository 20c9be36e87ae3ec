"""Unsupported configs and corrupt files: one line naming the file and field/tensor, exit 2, no model."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirlhf.cli import main as cli
from minirlhf.interop import load_pretrained

from .conftest import build_hf_model

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    build_hf_model("mistral", d)
    return d


NULL = object()  # a config value written as JSON null (None removes the key)


def _copy(good, tmp_path, **config_changes):
    d = tmp_path / "m"
    shutil.copytree(good, d)
    if config_changes:
        c = json.loads((d / "config.json").read_text())
        for k, v in config_changes.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = None if v is NULL else v
        (d / "config.json").write_text(json.dumps(c))
    return d


def _refused(path, capsys, *expect, max_seq_len=None):
    """The CLI exits 2 with one line containing each expected string; the library raises ValueError."""
    args = ["generate", "--init-from", str(path), "--prompt", "hi"]
    if max_seq_len:
        args += ["--max-seq-len", str(max_seq_len)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for s in expect:
        assert s in err, (s, err)
    with pytest.raises(ValueError):
        load_pretrained(path, max_seq_len)


@pytest.mark.parametrize("changes,field", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "rope_parameters.rope_type='yarn'"),
    (dict(rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling.rope_type='dynamic'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "low_freq_factor"),
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(architectures=["MistralForSequenceClassification"]), "architectures"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(head_dim=15), "head_dim=15"),
    (dict(sliding_window=16), "sliding_window=16"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(hidden_size=None), "hidden_size: missing"),
])
def test_unsupported_configs_are_one_line(good, tmp_path, capsys, changes, field):
    _refused(_copy(good, tmp_path, **changes), capsys, "config.json", field, max_seq_len=32)


NAN = float("nan")


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size=NULL), "config.json: hidden_size: missing"),
    (dict(hidden_size="64"), "config.json: hidden_size: expected an integer, got '64'"),
    (dict(num_attention_heads=0), "config.json: num_attention_heads: 0 must be >= 1"),
    (dict(num_attention_heads=6, head_dim=None), "config.json: num_attention_heads: 6 must divide hidden_size=64"),
    (dict(num_key_value_heads=3), "config.json: num_key_value_heads: 3 must divide num_attention_heads=4"),
    (dict(num_hidden_layers=0), "config.json: num_hidden_layers: 0 must be >= 1"),
    (dict(intermediate_size=-1), "config.json: intermediate_size: -1 must be >= 1"),
    (dict(vocab_size=1.5), "config.json: vocab_size: expected an integer, got 1.5"),
    (dict(max_position_embeddings="long"), "config.json: max_position_embeddings: expected an integer"),
    (dict(rms_norm_eps="abc"), "config.json: rms_norm_eps: expected a number, got 'abc'"),
    (dict(rms_norm_eps=0), "config.json: rms_norm_eps: 0 must be a finite number > 0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1}),
     "config.json: rope_parameters.rope_theta: -1 must be a finite number > 0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": NAN}),
     "config.json: rope_parameters.rope_theta: nan must be a finite number > 0"),
    (dict(rope_parameters=None, rope_theta=-1.0), "config.json: rope_theta: -1.0 must be a finite number > 0"),
    (dict(rope_parameters=[1, 2]), "config.json: rope_parameters: expected an object"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                           "high_freq_factor": 1.0, "original_max_position_embeddings": 16}),
     "config.json: rope_parameters.high_freq_factor: 1.0 must be > low_freq_factor=4.0"),
    (dict(tie_word_embeddings="yes"), "config.json: tie_word_embeddings: expected true or false, got 'yes'"),
    (dict(hidden_act=7), "config.json: hidden_act: expected a string, got 7"),
    (dict(head_dim=-2), "config.json: head_dim: -2 must be >= 0"),
    (dict(sliding_window="wide"), "config.json: sliding_window: expected an integer"),
    (dict(architectures="MistralForCausalLM"), "config.json: architectures: expected a list"),
])
def test_every_config_field_is_checked_at_import(good, tmp_path, capsys, changes, message):
    """Wrong types and out-of-range values are one line naming config.json and the HF field,
    never a TypeError / ZeroDivisionError traceback or a model that fails later."""
    _refused(_copy(good, tmp_path, **changes), capsys, message, max_seq_len=32)


INTEGER_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"]


@pytest.mark.parametrize("field", INTEGER_FIELDS)
def test_integer_fields_must_be_json_integers(good, tmp_path, capsys, field):
    """num_attention_heads: 9.0 was read as 9; data files refuse 1.0 where an integer is expected,
    and so does config.json, for every integer field (the value is the good config's own)."""
    value = json.loads((good / "config.json").read_text()).get(field) or 16
    _refused(_copy(good, tmp_path, **{field: float(value)}), capsys,
             f"config.json: {field}: expected an integer, got {float(value)}", max_seq_len=32)


def test_integer_fields_inside_rope_parameters_and_of_qwen2(tmp_path, capsys):
    build_hf_model("llama3-untied", tmp_path / "l3")
    c = json.loads((tmp_path / "l3" / "config.json").read_text())
    c["rope_parameters"]["original_max_position_embeddings"] = 16.0
    (tmp_path / "l3" / "config.json").write_text(json.dumps(c))
    capsys.readouterr()
    _refused(tmp_path / "l3", capsys,
             "config.json: rope_parameters.original_max_position_embeddings: expected an integer, got 16.0")
    build_hf_model("qwen2-bias", tmp_path / "q")
    c = json.loads((tmp_path / "q" / "config.json").read_text())
    c.pop("layer_types", None)  # then transformers (and we) read max_window_layers
    c.update(use_sliding_window=True, sliding_window=64, max_window_layers=1.0)
    (tmp_path / "q" / "config.json").write_text(json.dumps(c))
    capsys.readouterr()
    _refused(tmp_path / "q", capsys, "config.json: max_window_layers: expected an integer, got 1.0")


@pytest.mark.parametrize("quant", [
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    {"quant_method": "gptq", "bits": 4, "group_size": 128},
    {"quant_method": "fp8", "weight_block_size": [128, 128]},
    {"load_in_8bit": True},
])
def test_quantized_hf_weights_are_refused(good, tmp_path, capsys, quant):
    """quantization_config was ignored without a word: quantized HF checkpoints store packed
    integers and scales (extra tensors, other shapes) that the importer does not dequantize."""
    method = quant.get("quant_method")
    _refused(_copy(good, tmp_path, quantization_config=quant), capsys,
             f"config.json: quantization_config: quantized weights{f' ({method})' if method else ''} are not "
             "supported", "GGUF")


@pytest.mark.parametrize("changes,message", [
    (dict(bos_token_id=99999999), "config.json: bos_token_id: 99999999 is outside the vocabulary (vocab_size "),
    (dict(eos_token_id=-1), "config.json: eos_token_id: -1 is outside the vocabulary"),
    (dict(pad_token_id=128), "config.json: pad_token_id: 128 is outside the vocabulary (vocab_size 128)"),
    (dict(eos_token_id=[2, 99999999]), "config.json: eos_token_id[1]: 99999999 is outside the vocabulary"),
    (dict(bos_token_id=1.0), "config.json: bos_token_id: expected a token id (an integer), got 1.0"),
    (dict(pad_token_id="0"), "config.json: pad_token_id: expected a token id (an integer), got '0'"),
    (dict(bos_token_id=[1, 2]), "config.json: bos_token_id: expected a token id (an integer), got [1, 2]"),
])
def test_token_ids_outside_the_vocabulary_are_refused(good, tmp_path, capsys, changes, message):
    d = _copy(good, tmp_path, vocab_size=128, **changes)
    _refused(d, capsys, message, max_seq_len=32)


def test_token_ids_that_are_fine(good, tmp_path):
    """null or absent ids, and a list of end-of-turn ids (Llama 3.1), import."""
    load_pretrained(_copy(good, tmp_path / "a", bos_token_id=NULL, pad_token_id=None), 32)
    load_pretrained(_copy(good, tmp_path / "b", eos_token_id=[1, 2]), 32)


def _with_template(good, tmp_path, text=None, raw=None, config_template=NULL):
    """A copy whose chat_template.jinja holds text (or raw bytes); with config_template, no
    .jinja file and tokenizer_config.json's chat_template is that value instead."""
    d = _copy(good, tmp_path)
    if config_template is not NULL:
        (d / "chat_template.jinja").unlink(missing_ok=True)
        c = json.loads((d / "tokenizer_config.json").read_text())
        c["chat_template"] = config_template
        (d / "tokenizer_config.json").write_text(json.dumps(c))
    elif raw is not None:
        (d / "chat_template.jinja").write_bytes(raw)
    else:
        (d / "chat_template.jinja").write_text(text)
    return d


RENDER_FAILURES = [
    ("{{ raise_exception('nope') }}", "the template refuses this conversation: nope"),
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "rendering failed: TypeError: "),
    ("{{ no_such_function() }}", "rendering failed: 'no_such_function' is undefined"),
    ("{{ messages.__class__.__mro__ }}", "rendering failed: "),  # the sandbox refuses it
]


@pytest.mark.parametrize("template, message", RENDER_FAILURES)
def test_a_template_that_fails_when_rendered_names_its_file(good, tmp_path, capsys, template, message):
    """raise_exception('nope') printed `error: chat template: nope`, naming no file (a syntax
    error named it); a template that fails any other way when rendered was a traceback or the same."""
    d = _with_template(good, tmp_path / "a", template)
    _refused(d, capsys, f"{d / 'chat_template.jinja'}: {message}")
    d = _with_template(good, tmp_path / "b", config_template=template)
    _refused(d, capsys, f"{d / 'tokenizer_config.json'}: chat_template: {message}")


def test_a_template_that_refuses_in_gguf_metadata_names_it(tmp_path, capsys):
    from .test_gguf import write_gguf

    hf_model, hf_tok = build_hf_model("llama-tied", tmp_path / "hf")
    hf_tok.chat_template = "{{ raise_exception('nope') }}"
    write_gguf(tmp_path / "m.gguf", hf_model, hf_tok, "llama", "smollm")
    capsys.readouterr()
    _refused(tmp_path / "m.gguf", capsys,
             f"{tmp_path / 'm.gguf'}: metadata tokenizer.chat_template: the template refuses this conversation: nope")


@pytest.mark.parametrize("blank", ["", " \n\t\n"])
def test_an_empty_template_is_refused_wherever_it_comes_from(good, tmp_path, capsys, blank):
    """An empty chat_template.jinja fell back to our plain 'User: ...' framing without a word (a
    missing one is said in a note): an empty template is refused, from a file, tokenizer_config.json
    or GGUF metadata."""
    d = _with_template(good, tmp_path / "a", blank)
    _refused(d, capsys, f"{d / 'chat_template.jinja'}: empty chat template")
    d = _with_template(good, tmp_path / "b", config_template=blank)
    _refused(d, capsys, f"{d / 'tokenizer_config.json'}: chat_template: empty chat template")
    d = _with_template(good, tmp_path / "c", config_template=[{"name": "default", "template": blank}])
    _refused(d, capsys, f"{d / 'tokenizer_config.json'}: chat_template 'default': empty chat template")
    if blank:  # (the gguf writer leaves an empty string out: absent, then)
        _tiny_gguf(tmp_path / "e.gguf", extra={"tokenizer.ggml.pre": "gpt-2", "tokenizer.chat_template": blank})
        _refused(tmp_path / "e.gguf", capsys, "e.gguf: metadata tokenizer.chat_template: empty chat template")


def test_a_missing_template_is_a_note_and_a_malformed_one_is_refused(good, tmp_path, capsys):
    d = _with_template(good, tmp_path / "a", config_template=None)
    capsys.readouterr()
    load_pretrained(d, 32)
    assert capsys.readouterr().err.startswith(f"[import] note: {d}: no chat template")
    d = _with_template(good, tmp_path / "b", raw=b"{{ 'caf\xe9' }}")
    _refused(d, capsys, f"{d / 'chat_template.jinja'}: not UTF-8 text")
    d = _with_template(good, tmp_path / "c", config_template=[{"name": "tool_use", "template": "{{ 'x' }}"}])
    _refused(d, capsys, f"{d / 'tokenizer_config.json'}: chat_template 'default': missing (named templates: "
             "'tool_use')")
    d = _with_template(good, tmp_path / "d", config_template=7)
    _refused(d, capsys, f"{d / 'tokenizer_config.json'}: chat_template: expected a string or a list of named "
             "templates, got int")


def test_malformed_files_are_named(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "a")
    (d / "config.json").write_text("[1, 2]")
    _refused(d, capsys, "config.json: expected a JSON object")
    d = _copy(good, tmp_path / "b")
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    _refused(d, capsys, "model.safetensors.index.json: expected a JSON object")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": 3}}))
    _refused(d, capsys, "model.safetensors.index.json: weight_map.x: expected a shard file name")
    d = _copy(good, tmp_path / "c")
    (d / "tokenizer_config.json").unlink()
    _refused(d, capsys, "tokenizer_config.json: missing")
    d = _copy(good, tmp_path / "d")
    c = json.loads((d / "tokenizer_config.json").read_text())
    del c["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(c))
    _refused(d, capsys, "tokenizer_config.json: eos_token: missing")
    d = _copy(good, tmp_path / "e")
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }\n{% endfor %}")
    _refused(d, capsys, "chat_template.jinja: line 1")


def test_non_finite_weights_are_refused_at_import(good, tmp_path, capsys):
    d = _copy(good, tmp_path)
    st = d / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(st).items()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, st)
    _refused(d, capsys, "model.safetensors: tensor model.layers.1.mlp.up_proj.weight holds NaN or infinite values")


def test_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    """Token ids past the embedding would be an IndexError in generate or SFT: refused at import."""
    _, tok = build_hf_model("llama-tied", tmp_path, vocab_size=256)
    assert len(tok) > 256
    capsys.readouterr()
    _refused(tmp_path, capsys, "tokenizer.json: the tokenizer has", f"{len(tok)} token ids",
             "vocabulary of 256", "config.json: vocab_size")


def test_max_seq_len_beyond_the_model(good, tmp_path, capsys):
    _refused(good, capsys, "max_position_embeddings=128", max_seq_len=256)


def test_corrupt_safetensors_missing_tensor_wrong_shape(good, tmp_path, capsys):
    d = _copy(good, tmp_path)
    st = d / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(st).items()}  # (not mapped: the file is overwritten below)
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    _refused(d, capsys, "model.safetensors", "corrupt safetensors")
    st.write_bytes(data[:5])
    _refused(d, capsys, "model.safetensors", "corrupt safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, st)
    _refused(d, capsys, "tensor model.layers.1.mlp.up_proj.weight is missing")
    save_file({**tensors, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, st)
    _refused(d, capsys, "model.layers.0.self_attn.k_proj.weight has shape (64, 64), expected (32, 64)")
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, st)
    _refused(d, capsys, "o_proj.bias is not part of")


def test_missing_files(good, tmp_path, capsys):
    d = _copy(good, tmp_path)
    (d / "config.json").write_text("{\"model_type\": \"llama\",")
    _refused(d, capsys, "config.json: line 1: Expecting property name enclosed in double quotes at column 24")
    (d / "config.json").write_text("{\"model_type\": \"lla")
    _refused(d, capsys, "config.json: line 1: Unterminated string starting at column 16\n")
    d = _copy(good, tmp_path / "b")
    (d / "model.safetensors").unlink()
    _refused(d, capsys, "no model.safetensors")
    d = _copy(good, tmp_path / "c")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    _refused(d, capsys, "shard model-00001-of-00002.safetensors is missing")
    _refused(tmp_path / "nowhere", capsys, "nowhere")


def _tiny_gguf(path, arch="llama", tokenizer_model="gpt2", extra=None, heads=2, eos=1, ints=None, floats=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(8)
    w.add_head_count(heads)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(eos)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for k, v in (ints or {}).items():
        w.add_uint32(k, v)
    for k, v in (floats or {}).items():
        w.add_float32(k, v)
    w.add_tensor("token_embd.weight", torch.zeros(3, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_refusals(tmp_path, capsys):
    _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    _refused(tmp_path / "gpt2.gguf", capsys, "general.architecture='gpt2'")
    _tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    _refused(tmp_path / "spm.gguf", capsys, "tokenizer.ggml.model='llama'")
    _tiny_gguf(tmp_path / "yarn.gguf", extra={"llama.rope.scaling.type": "yarn"})
    _refused(tmp_path / "yarn.gguf", capsys, "llama.rope.scaling.type='yarn'")
    _tiny_gguf(tmp_path / "pre.gguf", extra={"tokenizer.ggml.pre": "deepseek-llm"})
    _refused(tmp_path / "pre.gguf", capsys, "tokenizer.ggml.pre='deepseek-llm'")
    _tiny_gguf(tmp_path / "nopre.gguf")  # llama.cpp's 'default' pre-tokenizer: not a known tokenizer.json
    _refused(tmp_path / "nopre.gguf", capsys, "tokenizer.ggml.pre='default'")
    _tiny_gguf(tmp_path / "ok.gguf", extra={"tokenizer.ggml.pre": "gpt-2"})
    _refused(tmp_path / "ok.gguf", capsys, "tensor blk.0.attn_norm.weight is missing (and 9 more)")
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 40])
    _refused(tmp_path / "cut.gguf", capsys, "cut.gguf", "corrupt")


def test_gguf_metadata_is_checked(tmp_path, capsys):
    ok = {"tokenizer.ggml.pre": "gpt-2"}
    _tiny_gguf(tmp_path / "h0.gguf", extra=ok, heads=0)
    _refused(tmp_path / "h0.gguf", capsys, "h0.gguf: metadata llama.attention.head_count: 0 must be >= 1")
    _tiny_gguf(tmp_path / "eos.gguf", extra=ok, eos=7)
    _refused(tmp_path / "eos.gguf", capsys, "eos.gguf: metadata tokenizer.ggml.eos_token_id: 7 is out of range "
             "(the vocabulary has 3 tokens)")
    _tiny_gguf(tmp_path / "tpl.gguf", extra={**ok, "tokenizer.chat_template": "{% if %}"})
    _refused(tmp_path / "tpl.gguf", capsys, "tpl.gguf: metadata tokenizer.chat_template: line 1")
    _tiny_gguf(tmp_path / "kv.gguf", extra=ok, floats={"llama.attention.head_count_kv": 2.0})
    _refused(tmp_path / "kv.gguf", capsys, "kv.gguf: metadata llama.attention.head_count_kv: expected an integer, "
             "got 2.0")
    _tiny_gguf(tmp_path / "voc.gguf", extra=ok, ints={"llama.vocab_size": 2})
    _refused(tmp_path / "voc.gguf", capsys, "the tokenizer has 3 token ids, more than the model's vocabulary of 2",
             "metadata llama.vocab_size")
