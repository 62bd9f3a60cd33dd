"""Triton kernels of pyloader (installed as pyloader.triton_kernels).

Each has a public wrapper here and a torch reference in pyloader.ops.reference.
"""

from .quantize import multi_tensor_quantize_triton
from .transform import dequant_blockwise_triton, fp8_upcast_mode, multi_tensor_transform_triton

__all__ = ["dequant_blockwise_triton", "multi_tensor_quantize_triton", "multi_tensor_transform_triton", "fp8_upcast_mode"]
