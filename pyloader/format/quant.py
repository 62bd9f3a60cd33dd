"""Which quantized format every weight of a checkpoint is in, and which tensors are its scales:
decided from each tensor's layout (dtype, shape against its partner tensors), cross-checked with
the config, never guessed.

    rec = recognize(ck.tensors, config, hf_quant_config)
    rec.quantized["model.layers.0.mlp.down_proj.weight_packed"]   # -> Quantized(scheme="int4", ...)

Formats (docs: formats table in the README):

- ``fp8-block`` / ``fp8-tensor`` / ``fp8-channel``: F8 ``weight`` with a scale grid of the declared
  block (``weight_block_size``, 128x128 by default; F32, BF16, F16 or F8_E8M0: DeepSeek-V4's
  ``.scale``), one value, or one a row; ``mxfp8``: F8 ``weight`` with U8/E8M0 ``[N, K/32]`` scales.
- ``fp4-e8m0``: FP4 codes (U8/I8 ``[N, K/2]``) with E8M0 ``[N, K/32]`` scales (DeepSeek-V4
  experts, compressed-tensors MXFP4); ``mxfp4``: gpt-oss ``*_blocks`` ``[E, N, G, 16]`` with
  ``*_scales`` ``[E, N, G]``, dequantized as ``[E, 32 G, N]`` (transformers' BF16 layout).
- ``nvfp4``: FP4 codes with F8_E4M3 ``[N, K/16]`` scales and a second-level F32 scale:
  ``weight_scale_2`` multiplies (ModelOpt), ``weight_global_scale`` divides (compressed-tensors).
- ``int4``: compressed-tensors pack-quantized I32 ``weight_packed`` ``[N, K/8]`` with
  ``weight_scale`` ``[N, K/group]`` and ``weight_shape`` ``[N, K]``.

A scale whose shape fits no format of its weight, a packed weight without its scales, a second
level missing, a ``weight_shape`` that disagrees, a quantized tensor in a module the config
excludes from quantization: each is a :class:`CheckpointError` naming the tensor and its file.
"""

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from ..errors import PyloaderInputError
from .checkpoint import read_json_object
from .safetensors import CheckpointError, TensorInfo
from .scales import scale_block

FP8 = ("F8_E4M3", "F8_E5M2")
E8M0_LIKE = ("F8_E8M0", "U8")
FLOAT_SCALES = ("F32", "BF16", "F16")
PACKED_FP4 = ("U8", "I8")
# Tensors that travel beside a quantized weight and mean nothing once it is dequantized.
ACTIVATION_SUFFIXES = ("input_scale", "input_global_scale")


@dataclass
class Quantized:
    """One quantized weight: its values, scales and the logical tensor they make."""

    name: str                       # the dequantized tensor's name (``weight_packed`` -> ``weight``, ``X_blocks`` -> ``X``)
    values: TensorInfo
    scheme: str
    scale: Optional[TensorInfo]
    block: Tuple[int, int]          # the scale's (rows, cols) block over the 2-D view of the values
    shape: Tuple[int, ...]          # logical shape (values, not bytes)
    packing: Optional[str] = None   # "e2m1" or "int4" for packed values
    global_scale: Optional[TensorInfo] = None
    global_mode: str = "mul"
    consumed: Tuple[str, ...] = ()  # every tensor this weight takes, values included
    transpose: bool = False         # the dequantized tensor is [..., K, N] (gpt-oss experts in transformers' layout)

    @property
    def out_shape(self) -> Tuple[int, ...]:
        """Shape of the dequantized tensor as written."""
        if self.transpose:
            return self.shape[:-2] + (self.shape[-1], self.shape[-2])
        return self.shape

    @property
    def rows(self) -> int:
        """Rows of the 2-D view the kernels see (leading dims folded in)."""
        return math.prod(self.shape[:-1]) if len(self.shape) >= 2 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1


@dataclass
class Recognition:
    quantized: Dict[str, Quantized] = field(default_factory=dict)   # by values tensor name
    consumed: Set[str] = field(default_factory=set)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for q in self.quantized.values():
            out[q.scheme] = out.get(q.scheme, 0) + 1
        return out


@dataclass
class Declared:
    """What the config says (a cross-check of the layout, and the block/group sizes layouts leave open)."""

    block: Tuple[int, int] = (128, 128)
    mx: bool = False                          # weight_block_size [1, 32] or quant_method mxfp8/mxfp4
    int_group: Optional[int] = None           # compressed-tensors int weights: group_size
    int_bits: Optional[int] = None
    expert_fp4: bool = False                  # DeepSeek-V4 expert_dtype: fp4
    excluded: List[str] = field(default_factory=list)
    methods: Tuple[str, ...] = ()
    # hf_quant_config.json's exclude_modules: what ModelOpt left alone, which may still be in the block
    # FP8 that config.json declares (DeepSeek-V4-NVFP4: FP8 attention, NVFP4 experts)
    modelopt_excluded: List[str] = field(default_factory=list)
    # ModelOpt MIXED_PRECISION's quantized_layers: module -> quant_algo (MiniMax-M3: MXFP8 and NVFP4)
    modelopt_layers: Dict[str, str] = field(default_factory=dict)

    def excludes(self, module: str, scheme: str) -> bool:
        """Whether the config says ``module`` holds no ``scheme`` weight."""
        if self.is_excluded(module, self.excluded):
            return True
        kept_fp8 = scheme == "fp8-block" and "fp8" in self.methods
        return not kept_fp8 and self.is_excluded(module, self.modelopt_excluded)

    def is_excluded(self, module: str, patterns: Optional[List[str]] = None) -> bool:
        for pat in self.excluded + self.modelopt_excluded if patterns is None else patterns:
            if pat.startswith("re:"):
                try:
                    if re.fullmatch(pat[3:], module) or re.fullmatch(pat[3:], module + "."):
                        return True
                except re.error as e:
                    raise PyloaderInputError(f"quantization exclude pattern {pat!r} is not a valid regular expression: "
                                             f"{e}") from None
            elif fnmatch.fnmatchcase(module, pat) or module == pat or module.endswith("." + pat):
                return True
        return False


def _as_dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def declared_from(config: Mapping, hf_quant_config: Optional[Mapping] = None) -> Declared:
    """Read the quantization declarations of ``config.json`` (and ``text_config``) and ModelOpt's
    ``hf_quant_config.json``."""
    d = Declared()
    configs = [_as_dict(config), _as_dict(_as_dict(config).get("text_config"))]
    methods = []
    for c in configs:
        if c.get("expert_dtype") == "fp4":
            d.expert_fp4 = True
        q = _as_dict(c.get("quantization_config"))
        if not q:
            continue
        method = q.get("quant_method")
        if isinstance(method, str):
            methods.append(method)
        wbs = q.get("weight_block_size")
        if isinstance(wbs, (list, tuple)) and len(wbs) == 2 and all(isinstance(v, int) and v > 0 for v in wbs):
            d.block = (wbs[0], wbs[1])
        if method in ("mxfp8", "mxfp4") or d.block == (1, 32):
            d.mx = True
        # a ModelOpt pass over an FP8 release (its quant_algo in the same dict) lists what it left alone
        by_modelopt = "quant_algo" in q or _as_dict(q.get("producer")).get("name") == "modelopt"
        for key in ("ignore", "modules_to_not_convert", "exclude_modules"):
            v = q.get(key)
            if isinstance(v, list):
                (d.modelopt_excluded if by_modelopt else d.excluded).extend(p for p in v if isinstance(p, str))
        _read_layers(d, q.get("quantized_layers"))
        for group in _as_dict(q.get("config_groups")).values():
            w = _as_dict(_as_dict(group).get("weights"))
            if w.get("type") == "int":
                d.int_bits = w.get("num_bits") if isinstance(w.get("num_bits"), int) else None
                gs = w.get("group_size")
                d.int_group = gs if isinstance(gs, int) and gs > 0 else None
    hq = _as_dict(_as_dict(hf_quant_config).get("quantization"))
    if hq:
        methods.append("modelopt")
        v = hq.get("exclude_modules")
        if isinstance(v, list):
            d.modelopt_excluded += [p for p in v if isinstance(p, str)]
        _read_layers(d, hq.get("quantized_layers"))
    d.methods = tuple(methods)
    return d


def _read_layers(d: Declared, layers) -> None:
    for module, spec in _as_dict(layers).items():
        algo = _as_dict(spec).get("quant_algo")
        if isinstance(module, str) and isinstance(algo, str):
            d.modelopt_layers[module] = algo.upper()


# what each per-module ModelOpt algorithm looks like once recognized from the layout
MODELOPT_ALGO_SCHEMES = {"NVFP4": ("nvfp4",), "MXFP8": ("mxfp8",), "FP8": ("fp8-tensor", "fp8-channel"),
                         "FP8_PER_CHANNEL_PER_TOKEN": ("fp8-channel",)}


def _split(name: str) -> Tuple[str, str]:
    i = name.rfind(".")
    return (name[:i], name[i + 1:]) if i >= 0 else ("", name)


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def _first(tensors: Mapping[str, TensorInfo], module: str, leaves: Iterable[str]) -> Optional[TensorInfo]:
    for leaf in leaves:
        t = tensors.get(_join(module, leaf))
        if t is not None:
            return t
    return None


def _group_cols(info: TensorInfo, want_cols: int, group: int, what: str, values: TensorInfo) -> None:
    rows = values.shape[0] if values.shape else 1
    need = (rows, -(-want_cols // group))
    if tuple(info.shape or ()) != need:
        raise CheckpointError(info.file, f"scale shape {list(info.shape or ())} does not fit {what} {values.name} "
                                         f"{list(values.shape or ())} ({want_cols} values a row in groups of {group}: "
                                         f"expected {list(need)})", info.name)


def _fp8(tensors, d: Declared, module: str, values: TensorInfo) -> Quantized:
    scale = _first(tensors, module, ("weight_scale_inv", "weight_scale", "scale", "scale_inv"))
    if scale is None:
        raise CheckpointError(values.file, f"{values.dtype} weight has no scale tensor (weight_scale_inv, weight_scale, "
                                           "scale or scale_inv beside it): a scale-less FP8 weight is never guessed",
                              values.name)
    shape = tuple(values.shape or ())
    if not shape or len(shape) > 2:
        raise CheckpointError(values.file, f"{values.dtype} tensor of shape {list(shape)}: only 1-D and 2-D FP8 "
                                           "weights are dequantized", values.name)
    if scale.dtype not in FLOAT_SCALES + E8M0_LIKE:
        raise CheckpointError(scale.file, f"scale dtype {scale.dtype} is not a scale format of {values.dtype} weights",
                              scale.name)
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    sshape = tuple(scale.shape or ())
    if scale.dtype in E8M0_LIKE and sshape == (rows, -(-cols // 32)) and (d.mx or scale.dtype == "U8"):
        block, scheme = (1, 32), "mxfp8"
    else:
        if scale.dtype == "U8":  # raw exponents only in the MX layout: anything else is ambiguous
            raise CheckpointError(scale.file, f"U8 scale of shape {list(sshape)} beside {values.dtype} weight "
                                              f"{values.name} {list(shape)}: U8 scales are E8M0 exponents of 1x32 MX "
                                              f"groups, and this is not that grid ({[rows, -(-cols // 32)]})", scale.name)
        block = scale_block(shape, sshape, d.block, f"{scale.file}, tensor {scale.name!r} (the scale of {values.name})")
        scheme = ("fp8-tensor" if math.prod(sshape) == 1 else
                  "fp8-channel" if block == (1, max(1, cols)) and rows > 1 else "fp8-block")
    extra = [t.name for t in (_first(tensors, module, (s,)) for s in ACTIVATION_SUFFIXES) if t is not None]
    return Quantized(values.name, values, scheme, scale, block, shape, consumed=(values.name, scale.name, *extra))


def _fp4(tensors, d: Declared, module: str, values: TensorInfo, out_name: str) -> Optional[Quantized]:
    scale = _first(tensors, module, ("weight_scale", "scale", "weight_scale_inv"))
    shape = tuple(values.shape or ())
    if scale is None:
        return None
    if len(shape) != 2:
        raise CheckpointError(values.file, f"packed FP4 weight of shape {list(shape)}: expected [N, K/2]", values.name)
    cols = 2 * shape[1]
    extra = [t.name for t in (_first(tensors, module, (s,)) for s in ACTIVATION_SUFFIXES) if t is not None]
    if scale.dtype == "F8_E4M3":
        _group_cols(scale, cols, 16, "NVFP4 weight", values)
        g_mul = _first(tensors, module, ("weight_scale_2",))
        g_div = _first(tensors, module, ("weight_global_scale",))
        if (g_mul is None) == (g_div is None):
            raise CheckpointError(values.file, "NVFP4 weight (E4M3 per-16 scales) needs exactly one second-level scale: "
                                               f"weight_scale_2 (ModelOpt) or weight_global_scale (compressed-tensors); "
                                               f"found {'both' if g_mul else 'neither'}", values.name)
        g = g_mul or g_div
        if g.dtype != "F32" or math.prod(g.shape or ()) != 1:
            raise CheckpointError(g.file, f"second-level scale must be one F32 value, got {g.dtype} {list(g.shape or ())}",
                                  g.name)
        return Quantized(out_name, values, "nvfp4", scale, (1, 16), (shape[0], cols), "e2m1", g,
                         "mul" if g_mul is not None else "div", (values.name, scale.name, g.name, *extra))
    if scale.dtype in E8M0_LIKE:
        _group_cols(scale, cols, 32, "FP4 weight", values)
        return Quantized(out_name, values, "fp4-e8m0", scale, (1, 32), (shape[0], cols), "e2m1",
                         consumed=(values.name, scale.name, *extra))
    raise CheckpointError(scale.file, f"scale dtype {scale.dtype} beside packed FP4 weight {values.name}: FP4 takes "
                                      "F8_E4M3 per-16 (NVFP4) or E8M0/U8 per-32 (MX) scales", scale.name)


def _int4(tensors, d: Declared, module: str, values: TensorInfo,
          read_small: Optional[Callable[[TensorInfo], List[int]]]) -> Quantized:
    shape = tuple(values.shape or ())
    if d.int_bits not in (None, 4):
        raise CheckpointError(values.file, f"int32-packed weight of a {d.int_bits}-bit scheme: only 4-bit "
                                           "pack-quantized weights are dequantized", values.name)
    scale = _first(tensors, module, ("weight_scale",))
    if scale is None:
        raise CheckpointError(values.file, "packed INT4 weight has no weight_scale beside it", values.name)
    if _first(tensors, module, ("weight_zero_point",)) is not None:
        raise CheckpointError(values.file, "asymmetric INT4 (weight_zero_point) is not supported", values.name)
    if len(shape) != 2 or scale.dtype not in FLOAT_SCALES:
        raise CheckpointError(values.file, f"packed INT4 weight {list(shape)} with {scale.dtype} scale: expected "
                                           "I32 [N, K/8] and an F32/BF16/F16 [N, K/group] scale", values.name)
    cols = 8 * shape[1]
    ws = _first(tensors, module, ("weight_shape",))
    consumed = [values.name, scale.name]
    if ws is not None:
        consumed.append(ws.name)
        if read_small is not None:
            dims = read_small(ws)
            if len(dims) != 2 or dims[0] != shape[0] or not 8 * (shape[1] - 1) < dims[1] <= 8 * shape[1]:
                raise CheckpointError(ws.file, f"weight_shape {dims} disagrees with packed weight {values.name} "
                                               f"{list(shape)} (8 values an int32 word)", ws.name)
            cols = dims[1]
    groups = (scale.shape or (0, 0))[-1]
    group = d.int_group
    if group is None:  # the layout decides: the one group size that gives this many scale columns
        fits = [g for g in (32, 64, 128, 16, 256) if -(-cols // g) == groups]
        if len(fits) != 1:
            raise CheckpointError(scale.file, f"INT4 scale {list(scale.shape or ())} of {values.name}: no config group "
                                              f"size, and {len(fits)} group sizes fit {cols} columns", scale.name)
        group = fits[0]
    _group_cols(scale, cols, group, "INT4 weight", values)
    return Quantized(_join(module, "weight"), values, "int4", scale, (1, group), (shape[0], cols), "int4",
                     consumed=tuple(consumed))


def _mxfp4_blocks(tensors, module: str, leaf: str, values: TensorInfo) -> Quantized:
    base = leaf[: -len("_blocks")]
    scales = tensors.get(_join(module, base + "_scales"))
    shape = tuple(values.shape or ())
    if scales is None:
        raise CheckpointError(values.file, f"MXFP4 blocks without {base}_scales beside them", values.name)
    if values.dtype != "U8" or len(shape) < 3 or shape[-1] != 16 or tuple(scales.shape or ()) != shape[:-1] \
            or scales.dtype not in E8M0_LIKE:
        raise CheckpointError(values.file, f"MXFP4 blocks {values.dtype} {list(shape)} with scales {scales.dtype} "
                                           f"{list(scales.shape or ())}: expected U8 [..., N, G, 16] and U8 [..., N, G]",
                              values.name)
    # transformers' dequantized GptOss experts are [E, in, out]: gate_up_proj [E, H, 2I], down_proj [E, I, H]
    return Quantized(_join(module, base), values, "mxfp4", scales, (1, 32), shape[:-2] + (shape[-2] * 32,), "e2m1",
                     consumed=(values.name, scales.name), transpose=True)


HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt's quantization description, beside config.json


def read_small_ints(info, fds: Optional[Dict[str, int]] = None) -> List[int]:
    """The values of a small integer tensor (``weight_shape``), read from its file (``fds``: open
    descriptors by path, kept for the next call: a Kimi-K2.5 checkpoint has 70K of these)."""
    import os

    if info.dtype not in ("I32", "I64") or info.nbytes > 64:
        raise CheckpointError(info.file, f"expected a small I32/I64 tensor, got {info.dtype} of {info.nbytes} bytes",
                              info.name)
    key = str(info.file)
    fd = fds.get(key) if fds is not None else None
    if fd is None:
        fd = os.open(key, os.O_RDONLY)
        if fds is not None:
            fds[key] = fd
    try:
        raw = os.pread(fd, info.nbytes, info.start)
    finally:
        if fds is None:
            os.close(fd)
    if len(raw) != info.nbytes:
        raise CheckpointError(info.file, "file ended inside tensor data (truncated?)", info.name)
    size = 4 if info.dtype == "I32" else 8
    return [int.from_bytes(raw[i:i + size], "little", signed=True) for i in range(0, len(raw), size)]


def recognize_checkpoint(ck, config: Optional[Mapping]) -> Optional[Recognition]:
    """:func:`recognize` for a checkpoint directory (its ``hf_quant_config.json`` and its
    ``weight_shape`` values read from the files); None when only an index was read (no dtypes)."""
    if not ck.headers_read:
        return None
    check_methods(config or {})
    hq = None
    folder = ck.directory if ck.directory is not None else (ck.files[0].parent if ck.files else None)
    if folder is not None and (folder / HF_QUANT_CONFIG).is_file():
        hq = read_json_object(folder / HF_QUANT_CONFIG, "hf_quant_config")
    fds: Dict[str, int] = {}
    try:
        return recognize(ck.tensors, config or {}, hq, lambda info: read_small_ints(info, fds))
    finally:
        import os

        for fd in fds.values():
            os.close(fd)


# quant_method values whose layouts recognize() reads; compressed-tensors formats likewise.
KNOWN_METHODS = ("fp8", "compressed-tensors", "modelopt", "mxfp4", "mxfp8")
KNOWN_CT_FORMATS = ("float-quantized", "naive-quantized", "pack-quantized", "nvfp4-pack-quantized",
                    "mxfp4-pack-quantized", "int-quantized")


def check_methods(config: Mapping) -> None:
    """Refuse a checkpoint whose config names a scheme whose tensors this module does not read (AWQ,
    GPTQ, bitsandbytes, sparse formats): copying those would write quantized bytes as if plain."""
    for c in (_as_dict(config), _as_dict(_as_dict(config).get("text_config"))):
        q = _as_dict(c.get("quantization_config"))
        if not q:
            continue
        method = q.get("quant_method")
        if method is not None and method not in KNOWN_METHODS:
            raise PyloaderInputError(f"quantization_config.quant_method {method!r} is not a format pyloader reads "
                             f"(it reads {', '.join(KNOWN_METHODS)})")
        formats = [q.get("format")] + [_as_dict(g).get("format") for g in _as_dict(q.get("config_groups")).values()]
        for f in formats:
            if f is not None and f not in KNOWN_CT_FORMATS:
                raise PyloaderInputError(f"compressed-tensors format {f!r} is not a format pyloader reads "
                                 f"(it reads {', '.join(KNOWN_CT_FORMATS)})")


def recognize(tensors: Mapping[str, TensorInfo], config: Optional[Mapping] = None,
              hf_quant_config: Optional[Mapping] = None,
              read_small: Optional[Callable[[TensorInfo], List[int]]] = None) -> Recognition:
    """Every quantized weight of ``tensors`` and the tensors it consumes (see the module doc).
    ``read_small(info)``: the values of a small integer tensor (``weight_shape``), when data is at hand."""
    d = declared_from(config or {}, hf_quant_config)
    rec = Recognition()
    for name, info in tensors.items():
        module, leaf = _split(name)
        q = None
        if leaf == "weight" and info.dtype in FP8:
            q = _fp8(tensors, d, module, info)
        elif leaf in ("weight", "weight_packed") and info.dtype in PACKED_FP4:
            q = _fp4(tensors, d, module, info, _join(module, "weight"))
            if q is None and (leaf == "weight_packed" or (d.expert_fp4 and ".experts." in name)):
                raise CheckpointError(info.file, f"packed {info.dtype} weight without its scales (weight_scale or "
                                                 "scale beside it)", name)
        elif leaf == "weight_packed" and info.dtype == "I32":
            q = _int4(tensors, d, module, info, read_small)
        elif leaf == "weight_packed":
            raise CheckpointError(info.file, f"weight_packed of dtype {info.dtype}: packed weights are U8/I8 (FP4) or "
                                             "I32 (INT4)", name)
        elif leaf.endswith("_blocks") and tensors.get(_join(module, leaf[: -len("_blocks")] + "_scales")) is not None:
            q = _mxfp4_blocks(tensors, module, leaf, info)
        if q is None:
            continue
        if d.excludes(module, q.scheme):
            raise CheckpointError(info.file, f"{q.scheme} weight in module {module!r}, which the config excludes from "
                                             "quantization: the config and the tensors disagree", name)
        algo = d.modelopt_layers.get(module)
        if algo in MODELOPT_ALGO_SCHEMES and q.scheme not in MODELOPT_ALGO_SCHEMES[algo]:
            raise CheckpointError(info.file, f"the config's quantized_layers says module {module!r} is {algo}, but its "
                                             f"tensors are laid out as {q.scheme}: the config and the tensors disagree",
                                  name)
        for other in q.consumed[1:]:
            if other in rec.consumed:
                raise CheckpointError(tensors[other].file, "one scale claimed by two weights", other)
        rec.quantized[name] = q
        rec.consumed.update(q.consumed)
    for module, algo in d.modelopt_layers.items():  # a module the config quantizes, stored in float
        info = tensors.get(_join(module, "weight"))
        if algo in MODELOPT_ALGO_SCHEMES and info is not None and info.name not in rec.quantized:
            raise CheckpointError(info.file, f"the config's quantized_layers says module {module!r} is {algo}, but its "
                                             f"weight is a plain {info.dtype} tensor with no scales: the config and the "
                                             "tensors disagree", info.name)
    _check_leftovers(tensors, rec)
    return rec


_SCALE_LEAVES = ("weight_scale_inv", "weight_scale", "scale_inv", "weight_scale_2", "weight_global_scale", "weight_shape")


def _check_leftovers(tensors: Mapping[str, TensorInfo], rec: Recognition) -> None:
    """Scales and aux tensors that no weight consumed: never copied as plain tensors."""
    for name, info in tensors.items():
        if name in rec.consumed:
            continue
        module, leaf = _split(name)
        if leaf in _SCALE_LEAVES:
            owner = _join(module, "weight")
            raise CheckpointError(info.file, f"a scale with no weight (no quantized {owner} it belongs to in the "
                                             "checkpoint)", name)
        if info.dtype == "F8_E8M0":
            raise CheckpointError(info.file, "an E8M0 tensor that scales no weight", name)
