"""Writes an HF config.json of Mixtral-8x7B's shapes with LAYERS layers (random-init benchmarks).

Usage: python3 bench/mixtral_config.py OUT.json LAYERS
"""
import json
import sys

out, layers = sys.argv[1], int(sys.argv[2])
json.dump({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": layers, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
           "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02}, open(out, "w"))
