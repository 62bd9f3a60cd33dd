"""DeepSeek V2/V3 and Kimi-K2 (MLA, dense then routed experts), and the DSA variants (DeepSeek-V3.2,
GLM-5) with the sparse-attention indexer."""


import torch



def deepseek(b, c, par, layers, dsa: bool):
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qlr, kvlr = c.get("q_lora_rank"), c["kv_lora_rank"]
    nope, rope, vhd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    qk = nope + rope
    E = c.get("n_routed_experts")
    first_dense = c.get("first_k_dense_replace") or 0
    freq = c.get("moe_layer_freq") or 1
    f32 = torch.float32
    for i in range(*layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        if qlr:
            b.stacked_column(f"{a}.fused_qkv_a_proj.weight", [(0, (qlr, hidden), (0, qlr)),
                                                               (1, (kvlr + rope, hidden), (0, kvlr + rope))], i)
            b.replicated(f"{a}.q_a_layernorm.weight", (qlr,), i)
            b.column(f"{a}.q_b_proj.weight", (heads * qk, qlr), i, unit=qk)
        else:
            b.replicated(f"{a}.kv_a_proj_with_mqa.weight", (kvlr + rope, hidden), i)
            b.column(f"{a}.q_proj.weight", (heads * qk, hidden), i, unit=qk)
        b.replicated(f"{a}.kv_a_layernorm.weight", (kvlr,), i)
        b.column(f"{a}.kv_b_proj.weight", (heads * (nope + vhd), kvlr), i, unit=nope + vhd)
        b.row(f"{a}.o_proj.weight", (hidden, heads * vhd), i, unit=vhd)
        if dsa:
            ihd, ih = c["index_head_dim"], c["index_n_heads"]
            b.replicated(f"{a}.indexer.wq_b.weight", (ih * ihd, qlr), i)
            b.stacked_column(f"{a}.indexer.wk_weights_proj.weight", [(0, (ihd, hidden), (0, ihd)),
                                                                      (1, (ih, hidden), (0, ih))], i)
            b.replicated(f"{a}.indexer.k_norm.weight", (ihd,), i)
            b.replicated(f"{a}.indexer.k_norm.bias", (ihd,), i)
        b.replicated(f"{p}.input_layernorm.weight", (hidden,), i)
        b.replicated(f"{p}.post_attention_layernorm.weight", (hidden,), i)
        if E and i >= first_dense and i % freq == 0:
            b.replicated(f"{p}.mlp.gate.weight", (E, hidden), i)
            if c.get("topk_method") == "noaux_tc" or c.get("model_type") in ("deepseek_v3", "glm_moe_dsa",
                                                                               "deepseek_v32", "kimi_k2"):
                b.replicated(f"{p}.mlp.gate.e_score_correction_bias", (E,), i, dtype=f32)
            b.experts(f"{p}.mlp.experts", i, E, hidden, c["moe_intermediate_size"])
            if c.get("n_shared_experts"):
                b.mlp(f"{p}.mlp.shared_experts", i, hidden, c["moe_intermediate_size"] * c["n_shared_experts"])
        else:
            b.mlp(f"{p}.mlp", i, hidden, c["intermediate_size"])
