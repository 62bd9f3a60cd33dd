"""Tiny configs the engine-side unit tests route (the model files come from models.py)."""

QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 128,
             "num_experts": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
             "num_hidden_layers": 4, "vocab_size": 512, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
