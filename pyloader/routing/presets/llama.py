"""Llama-style families: dense (llama, mistral, qwen2, qwen3), Qwen MoE and Mixtral."""



from .builder import llama_attention


def dense_or_moe(b, c, par, layers, kind):
    hidden = c["hidden_size"]
    for i in range(*layers):
        p = f"model.layers.{i}"
        qk_norm = c.get("model_type") in ("qwen3", "qwen3_moe")
        bias = bool(c.get("attention_bias")) or c.get("model_type") in ("qwen2", "qwen2_moe")
        llama_attention(b, p, i, c, hidden, bias, qk_norm)
        moe_layer = kind != "dense" and i not in set(c.get("mlp_only_layers") or []) and \
            (i + 1) % (c.get("decoder_sparse_step") or 1) == 0
        if kind == "mixtral":
            E = c["num_local_experts"]
            b.replicated(f"{p}.block_sparse_moe.gate.weight", (E, hidden), i)
            b.experts(f"{p}.block_sparse_moe.experts", i, E, hidden, c["intermediate_size"])
        elif moe_layer:
            E = c["num_experts"]
            b.replicated(f"{p}.mlp.gate.weight", (E, hidden), i)
            b.experts(f"{p}.mlp.experts", i, E, hidden, c["moe_intermediate_size"])
            if c.get("shared_expert_intermediate_size"):
                b.mlp(f"{p}.mlp.shared_expert", i, hidden, c["shared_expert_intermediate_size"])
                b.replicated(f"{p}.mlp.shared_expert_gate.weight", (1, hidden), i)
        else:
            b.mlp(f"{p}.mlp", i, hidden, c["intermediate_size"])
