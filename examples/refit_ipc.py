"""A trainer process and a rollout process exchanging BF16 buckets once shared (CUDA IPC on a GPU,
shared memory on a CPU), the rollout model in block FP8, three RL steps.

    python examples/refit_ipc.py [--device cuda|cpu]

The trainer's tensors carry Hugging Face names (a tiny Qwen3-MoE here); the rollout model holds
vLLM-layout parameters (fused qkv_proj, gate_up_proj, expert stacks) with FP8 weights and float32
block scales. Each step the rollout checks what it got against a dequantization of its own.
"""

import argparse

import torch
import torch.multiprocessing as mp

from pyloader.ops import dequant_blockwise
from pyloader.refit import BucketLayout, Refitter, Sender, open_shared, share
from pyloader.routing.presets import build_preset
from pyloader.synthetic import allocate_targets, trainer_tensors, with_fp8_weights

CONFIG = {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 128,
          "num_experts": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
          "num_hidden_layers": 2, "vocab_size": 512, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def trainer_state(step: int, device) -> dict:
    return trainer_tensors(CONFIG, device, seed=step)


def rollout_model(device) -> dict:
    return with_fp8_weights(allocate_targets(build_preset(CONFIG).targets, device))


def rollout(layout_json, handles, device, steps, go, done):
    model = rollout_model(device)
    refitter = Refitter(model, BucketLayout.from_json(layout_json), open_shared(handles), config=CONFIG)
    pointers = {n: t.data_ptr() for n, t in model.items()}
    for _ in range(steps):
        step = go.get()
        report = refitter.step(version=step)
        w, s = model["model.layers.1.self_attn.o_proj.weight"], model["model.layers.1.self_attn.o_proj.weight_scale_inv"]
        want = trainer_state(step, device)["model.layers.1.self_attn.o_proj.weight"].float()
        err = (dequant_blockwise(w, s, out_dtype=torch.float32) - want).abs().max().item()
        print(f"rollout: version {report.version}: {report.bytes / 1e6:.1f} MB in {report.seconds * 1e3:.1f} ms, "
              f"{len(report.written)} parameters, buckets checked {report.verified}; o_proj FP8 error {err:.2e}")
        assert {n: t.data_ptr() for n, t in model.items()} == pointers and err <= 2 ** -4 * want.abs().max().item()
        done.put(step)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    layout = BucketLayout.of(trainer_state(0, args.device), per_layer=True)
    sender = Sender(layout, args.device, shared=args.device == "cpu")
    ctx = mp.get_context("spawn")
    go, done = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=rollout, args=(layout.to_json(), share(sender.buckets), args.device, args.steps, go, done))
    p.start()
    for step in range(1, args.steps + 1):
        sender.pack(trainer_state(step, args.device), version=step)
        if args.device != "cpu":
            torch.cuda.synchronize()  # the bytes are in the buckets before the rollout reads them
        go.put(step)
        done.get(timeout=300)  # the buckets are not refilled while the rollout reads them
    p.join()
    raise SystemExit(p.exitcode)


if __name__ == "__main__":
    main()
