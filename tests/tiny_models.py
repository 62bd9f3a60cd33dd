"""Tiny configs of each preset family: small enough for CPU tests, shaped like the real ones."""

TINY = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 384,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300},
    "qwen2": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 200, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 77},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 96,
                  "num_experts": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                  "num_hidden_layers": 2, "vocab_size": 300},
    "mixtral": {"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 160, "num_local_experts": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 50},
    "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 256, "intermediate_size": 320, "moe_intermediate_size": 96,
                    "n_routed_experts": 4, "n_shared_experts": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                    "q_lora_rank": 160, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                    "v_head_dim": 32, "first_k_dense_replace": 1, "num_hidden_layers": 2, "vocab_size": 100,
                    "topk_method": "noaux_tc"},
}
for c in TINY.values():
    c.setdefault("tie_word_embeddings", False)
    c.setdefault("torch_dtype", "bfloat16")
