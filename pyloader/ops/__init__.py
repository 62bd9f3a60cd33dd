"""Public kernels. Every op writes into a caller-owned destination when one is given.

    >>> w, s = pyloader.ops.quantize_blockwise(torch.randn(576, 7168, device="cuda"))
    >>> out = pyloader.ops.dequant_blockwise(w, s)              # [576, 7168] bfloat16
    >>> fused = torch.empty(3 * 576, 7168, dtype=torch.bfloat16, device="cuda")
    >>> pyloader.ops.dequant_blockwise(w, s, out=fused[576:1152])  # straight into rows of a fused parameter

Many tensors in one launch (``assembly``): ``stack_shards`` (q/k/v → qkv, gate/up → gate_up),
``assemble_experts`` (experts → ``[E_local, …]``), ``assemble_layer`` (several of those in one
launch), with ``Shard`` for FP8 + scale and tensor-parallel ranges (``tp_range``),
``ep_expert_map`` for expert-parallel ownership, and the low-level ``multi_tensor_transform``
over ``TransformJob`` lists (``jobs``). ``reference`` holds the pure-torch version of each.
The other quantized formats, one tensor at a time (``formats``): ``dequant_fp4`` (E2M1 with
per-group scales), ``dequant_mxfp4`` (gpt-oss), ``dequant_nvfp4``, ``dequant_int4``.
"""

from ..parallel import ep_expert_map, tp_range
from .assembly import (Shard, assemble_experts, assemble_layer, multi_tensor_transform, stack_shards,
                       unstack_experts)
from .dequant import dequant_blockwise
from .formats import dequant_fp4, dequant_int4, dequant_mxfp4, dequant_nvfp4, dequant_packed
from .jobs import TransformJob
from .quantize import quantize_blockwise

__all__ = ["dequant_blockwise", "dequant_fp4", "dequant_mxfp4", "dequant_nvfp4", "dequant_int4", "dequant_packed",
           "quantize_blockwise", "Shard", "stack_shards", "assemble_experts", "assemble_layer",
           "unstack_experts", "multi_tensor_transform", "TransformJob", "tp_range", "ep_expert_map"]
