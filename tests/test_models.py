"""The model registry's tiny configs: shapes a benchmark can ask for."""

from conftest import CACHE_DIR

from hsd_exp.models import load_model


def test_tiny_llama_takes_kv_heads_and_mlp_width():
    # SmolLM2-135M's layer shape (hidden 576, 9 heads / 3 KV heads, MLP 1536), two layers of it
    lm = load_model("llama-smollm2-shape", "llama", source="tiny", num_layers=2, device="cpu", dtype="float32",
                    tiny={"layers": 2, "hidden": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536},
                    cache_dir=CACHE_DIR)
    config = lm.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    defaults = load_model("tiny-llama", "llama", source="tiny", num_layers=2, device="cpu", dtype="float32",
                          tiny={"layers": 2, "hidden": 64, "heads": 4}, cache_dir=CACHE_DIR).model.config
    assert (defaults.num_key_value_heads, defaults.intermediate_size) == (2, 192)
