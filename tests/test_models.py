import json

import pytest

from autotune.errors import UserError
from autotune.spec.models import catalog, load_model, model_from_hf_config

REQUIRED_CATALOG = ["Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.1-405B", "Llama-3.1-8B-FP8", "Llama-3.1-70B-FP8",
                    "Llama-3.1-405B-FP8", "DeepSeek-R1-Distill-Llama-8B", "DeepSeek-R1-Distill-Qwen-14B",
                    "DeepSeek-R1-Distill-Qwen-32B", "DeepSeek-R1-Distill-Llama-70B", "DeepSeek-R1", "DeepSeek-V3",
                    "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "Mixtral-8x7B", "gpt-oss-120b"]


def test_catalog_has_the_required_models():
    assert set(REQUIRED_CATALOG) <= set(catalog())


def test_kv_bytes_per_token_hand_computed():
    # GQA: 2 (K and V) x 32 layers x 8 KV heads x 128 head dim x 2 bytes.
    assert load_model("Llama-3.1-8B").kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131_072
    # MLA: (512 latent + 64 RoPE) x 61 layers x 2 bytes, whatever the number of heads.
    assert load_model("DeepSeek-V3").kv_bytes_per_token() == (512 + 64) * 61 * 2 == 70_272
    assert load_model("DeepSeek-V3").kv_bytes_per_token("fp8") == 35_136


@pytest.mark.parametrize("name,total,active", [
    ("Llama-3.1-8B", 8.03e9, 8.03e9),
    ("Llama-3.1-70B", 70.6e9, 70.6e9),
    ("Llama-3.1-405B", 405.9e9, 405.9e9),
    ("DeepSeek-R1-Distill-Qwen-32B", 32.8e9, 32.8e9),
    ("DeepSeek-R1", 671e9, 37.5e9),
    ("Qwen3-30B-A3B", 30.5e9, 3.35e9),
    ("Qwen3-235B-A22B", 235e9, 22.2e9),
    ("Mixtral-8x7B", 46.7e9, 12.9e9),
])
def test_parameter_counts_match_published_sizes(name, total, active):
    m = load_model(name)
    assert m.total_params == pytest.approx(total, rel=0.02)
    assert m.active_params == pytest.approx(active, rel=0.03)


def test_fp8_checkpoint_halves_the_linear_weights():
    bf16, fp8 = load_model("Llama-3.1-70B"), load_model("Llama-3.1-70B-FP8")
    assert bf16.weight_bytes == pytest.approx(2 * bf16.total_params)
    # Linear layers in one byte, embeddings and LM head kept in bf16.
    assert fp8.weight_bytes == pytest.approx(fp8.total_params + fp8.embedding_params, rel=1e-9)


LLAMA4_FP8 = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 1000, "num_local_experts": 4, "num_experts_per_tok": 1}


@pytest.mark.parametrize("quant, unquantized", [
    # compressed-tensors names every module it leaves alone (RedHatAI's Llama-4 FP8-dynamic: q/k/v/o of each
    # language-model layer, the routers, the vision tower)
    ({"quant_method": "compressed-tensors", "ignore": [
        *(f"language_model.model.layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qkvo"),
        "vision_model.model.layers.0.self_attn.q_proj", "language_model.lm_head"]}, 4),
    ({"quant_method": "compressed-tensors", "ignore": ["re:.*self_attn.*", "lm_head"]}, 4),
    ({"quant_method": "fp8", "ignored_layers": ["model.layers.0.self_attn", "model.layers.1.self_attn"]}, 2),
    ({"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["*.layers.3.self_attn*"]}, 1),
    # the vision tower's attention and the LM head stay out of the language model's count
    ({"quant_method": "compressed-tensors", "ignore": ["vision_model.model.layers.0.self_attn.q_proj",
                                                       "lm_head"]}, 0),
])
def test_attention_a_quantized_checkpoint_leaves_in_bf16_is_read_in_bf16(quant, unquantized):
    m = model_from_hf_config({**LLAMA4_FP8, "quantization_config": quant}, "m")
    all_fp8 = model_from_hf_config({**LLAMA4_FP8, "quantization_config": {"quant_method": "fp8"}}, "m")
    assert m.weight_dtype == "fp8" and m.unquantized_attention_layers == unquantized
    # each unquantized attention weight costs its second byte; the rest stays one byte a weight
    assert m.non_expert_layer_bytes - all_fp8.non_expert_layer_bytes == unquantized * m.attention_params_per_layer


def test_an_ignore_list_in_a_bf16_checkpoint_changes_nothing_and_a_bad_one_is_one_clear_error():
    quant = {"quant_method": "bitsandbytes-like", "modules_to_not_convert": ["self_attn"]}
    plain = model_from_hf_config({**LLAMA4_FP8, "quantization_config": quant}, "m")
    assert plain.weight_dtype == "bf16" and plain.unquantized_attention_params == 0
    for quant, message in ((dict(quant_method="compressed-tensors", ignore="lm_head"), "lists of module names"),
                           (dict(quant_method="compressed-tensors", ignore=["re:(self_attn"]), "bad regex")):
        with pytest.raises(UserError, match=message):
            model_from_hf_config({**LLAMA4_FP8, "quantization_config": quant}, "m")


def test_gpt_oss_sliding_layers_do_not_grow_the_cache():
    m = load_model("gpt-oss-120b")
    assert m.num_sliding_layers == 18 and m.sliding_window == 128
    assert m.kv_bytes_per_token() == 18 * 2 * 8 * 64 * 2
    assert m.routed_expert_bytes == pytest.approx(m.routed_expert_params * 4.25 / 8)


def test_lookup_is_forgiving_and_suggests_close_names():
    assert load_model("meta-llama/llama-3.1-8b").name == "Llama-3.1-8B"
    with pytest.raises(UserError, match="did you mean .*Llama-3.1-8B"):
        load_model("Lama-3.1-8B")


def test_reads_a_local_config_json(tmp_path):
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "vocab_size": 1000, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path))
    assert (m.num_layers, m.head_dim, m.num_kv_heads) == (2, 16, 2)
    assert m.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2


def test_config_missing_fields_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(UserError, match="missing required field.*num_hidden_layers"):
        load_model(str(tmp_path))


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_moe_keys_of_each_family():
    mixtral = model_from_hf_config({"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
                                    "vocab_size": 10, "intermediate_size": 16, "num_local_experts": 8,
                                    "num_experts_per_tok": 2}, "m")
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.moe_intermediate_size) == (8, 2, 16)


def test_a_catalog_entry_is_found_by_its_hub_id():
    for name, spec in catalog().items():
        if spec.hf_id:
            assert load_model(spec.hf_id).name == name, spec.hf_id
    assert load_model("META-LLAMA/Llama-3.1-70B-Instruct").name == "Llama-3.1-70B"


@pytest.mark.parametrize("name,total_b,hub", [
    ("QwQ-32B", 32.5, "Qwen/QwQ-32B"), ("Llama-3.3-70B", 70.6, "meta-llama/Llama-3.3-70B-Instruct"),
    ("Mistral-Small-24B", 23.6, "mistralai/Mistral-Small-24B-Instruct-2501"),
    ("Gemma-3-27B", 27.0, "google/gemma-3-27b-it"), ("gpt-oss-20b", 20.9, "openai/gpt-oss-20b"),
    ("Qwen3-Coder-30B-A3B", 30.5, "Qwen/Qwen3-Coder-30B-A3B-Instruct"), ("Kimi-K2", 1030, "moonshotai/Kimi-K2-Instruct"),
    # 109 B as published, with the vision tower (about 1 B) that the text model here leaves out
    ("Llama-4-Scout-17B-16E", 109, "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
    ("Llama-4-Scout-17B-16E-FP8", 109, "RedHatAI/Llama-4-Scout-17B-16E-Instruct-FP8-dynamic"),
])
def test_added_catalog_models_have_their_published_sizes_and_hub_ids(name, total_b, hub):
    m = load_model(name)
    assert load_model(hub) == m
    assert m.derived()["total_params"] == pytest.approx(total_b * 1e9, rel=0.03)
    if name == "Kimi-K2":
        assert m.is_mla and m.num_experts == 384 and m.num_heads == 64
    if name.startswith("Llama-4-Scout"):
        assert m.active_params == pytest.approx(17e9, rel=0.03) and m.num_shared_experts == 1
        assert m.unquantized_attention_layers == (48 if name.endswith("FP8") else 0)
    if name == "Gemma-3-27B":
        assert m.num_sliding_layers == 52 and m.sliding_window == 1024


def test_a_hub_id_outside_the_catalog_is_read_from_the_local_cache(tmp_path):
    """huggingface_hub's cache layout, built here: models--org--name/refs/main and snapshots/<commit>/config.json.
    Nothing is downloaded without --download."""
    import subprocess
    import sys
    repo = tmp_path / "hub" / "models--acme--tiny-reasoner"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "hidden_size": 256,
                                                  "num_attention_heads": 8, "intermediate_size": 512,
                                                  "vocab_size": 32000, "max_position_embeddings": 8192}))
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)
    shown = run("models", "show", "acme/tiny-reasoner", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["num_layers"] == 4
    out = run("recommend", "--model", "acme/tiny-reasoner", "--gpu", "H200", "--gpus", "1", "--requests", "20",
              "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["serve_command"][0].startswith("vllm serve acme/tiny-reasoner ")
    missing = run("models", "show", "acme/not-cached")
    assert missing.returncode == 2 and "nor in the local Hugging Face cache (--download" in missing.stderr
