"""vLLM model loader ``pyloader``: ``LLM(model, load_format="pyloader")`` or ``vllm serve MODEL
--load-format pyloader``, registered by the ``vllm.general_plugins`` entry point on install.

vLLM builds the model as it always does (its layers, tensor- and pipeline-parallel shards, its
``weight_loader`` layouts); pyloader fills its parameters from the checkpoint directory with the
family's preset (the same fused layouts: ``qkv_proj``, ``gate_up_proj``, ``experts.w13_weight`` …)
at this worker's tensor-, pipeline- and expert-parallel ranks, streaming through its executor;
vLLM's ``process_weights_after_loading`` then runs as after its own loader. Options, as
``model_loader_extra_config``:

- ``dequantize`` (default False): the checkpoint's FP8 / FP4 / INT4 weights go dequantized into an
  unquantized (BF16) model (hardware or kernels without FP8 support). The model must be built
  without the quantization config: pass ``hf_overrides={"quantization_config": None}`` too
  (refused otherwise: dropping it after the engine is configured leaves kernels chosen for it).
- ``preset``: a preset name when the config's ``model_type`` does not pick one.
- ``unexpected`` / ``missing``: as for ``pyloader.load`` (default ``"error"``).
- ``backend``: ``"cuda"``, ``"triton"`` or ``"torch"`` (default: the best for the device).
- ``source``: ``"files"`` (default: pyloader's own ranged reads), ``"runai"`` (run:ai model
  streamer's ``SafetensorsStreamer``: tensors yielded from one reused buffer, each consumed before
  the next) or ``"safetensors"`` (the safetensors library's reader, tensor by tensor).
- ``shared_reads`` (default False): the engine's ranks read each checkpoint tensor once between them
  and send it, still quantized, to the ranks that need it (``pyloader.load(group=…)`` over vLLM's
  world group: its NCCL device group on GPUs, its gloo CPU group on CPU workers); ``source="files"``
  only.

Every problem (a name nothing routes, with did-you-mean hints; a parameter nothing writes; a shape
that disagrees) is raised before any weight is read, naming the tensors.
"""

import contextlib
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ..errors import PyloaderInputError
from ..format.checkpoint import read_json_object
from ..loading.loader import load
from ..parallel import Parallel
from ..routing.layout import TargetSpec
from ..routing.presets import build_preset

logger = init_logger("vllm.pyloader")  # under vLLM's logger: the lines appear in its log

OPTIONS = ("dequantize", "preset", "unexpected", "missing", "backend", "progress", "source", "shared_reads")
SOURCES = ("files", "runai", "safetensors")


@register_model_loader("pyloader")
class PyloaderModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = sorted(set(extra) - set(OPTIONS))
        if unknown:
            raise PyloaderInputError(f"load_format='pyloader': unknown model_loader_extra_config keys {unknown}; "
                                     f"known: {', '.join(OPTIONS)}")
        self.options = extra
        self.dequantize = bool(extra.get("dequantize", False))
        if extra.get("source", "files") not in SOURCES:
            raise PyloaderInputError(f"load_format='pyloader': source {extra['source']!r}; known: {', '.join(SOURCES)}")
        self.report = None

    # -- where the checkpoint is --------------------------------------------------------------
    def _folder(self, model_config: ModelConfig) -> Path:
        path = Path(model_config.model)
        if path.is_dir():
            return path
        from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

        return Path(download_weights_from_hf(model_config.model, self.load_config.download_dir,
                                             ["*.safetensors", "*.json"], model_config.revision,
                                             ignore_patterns=self.load_config.ignore_patterns))

    def download_model(self, model_config: ModelConfig) -> None:
        self._folder(model_config)

    # -- the model ------------------------------------------------------------------------------
    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        if self.dequantize and vllm_config.quant_config is not None:
            # Dropping it here is too late: the engine chose its quantization method, kernels and
            # fusions from it already, so the config must come without it.
            raise PyloaderInputError(
                "load_format='pyloader' with dequantize: vLLM built its config with the checkpoint's "
                f"{vllm_config.quant_config.get_name()} quantization; pass hf_overrides={{\"quantization_config\": "
                "None}} (vllm serve: --hf-overrides '{\"quantization_config\": null}') so the model is "
                "unquantized from the start, and pyloader dequantizes the weights into it")
        return super().load_model(vllm_config, model_config, prefix)

    # -- the weights ---------------------------------------------------------------------------
    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        folder = self._folder(model_config)
        config = checkpoint_config(model_config, folder)
        tp, pp, ep = parallel_ranks()
        preset = build_preset(config, self.options.get("preset"), Parallel(tp[0], tp[1], pp[0], pp[1], ep[0], ep[1]))
        problem = expert_sharding_problem(preset.targets, moe_shards_over_dp(), ep[1])
        if problem:
            raise PyloaderInputError(problem)
        whole = build_preset(config, self.options.get("preset"), Parallel(tp[0], tp[1], 0, 1, ep[0], ep[1])).targets \
            if pp[1] > 1 else None
        targets, aliases, foreign = engine_targets(dict(model.named_parameters()), preset.targets, whole)
        if foreign:
            logger.info("pyloader: pipeline stage %d holds %d parameters of other stages, which it never uses "
                        "(left as vLLM made them): %s", pp[0], len(foreign), ", ".join(foreign[:4]))
        if aliases:
            logger.info("pyloader: %d parameters of this vLLM build live under other names than the preset's, "
                        "e.g. %s", len(aliases), next(iter(aliases.items())))
        layers = _layer_range(model)
        if layers is not None and pp[1] > 1:
            from ..parallel import pp_layer_range

            ours = pp_layer_range(int(config["num_hidden_layers"]), *pp)
            if ours != layers:
                raise PyloaderInputError(f"vLLM gave pipeline stage {pp[0]} layers {layers[0]}..{layers[1] - 1}, "
                                         f"pyloader's partition {ours[0]}..{ours[1] - 1} (VLLM_PP_LAYER_PARTITION "
                                         "is not supported yet)")
        t0 = time.perf_counter()
        group = None
        if self.options.get("shared_reads"):
            if self.options.get("source", "files") != "files":
                raise PyloaderInputError("load_format='pyloader': shared_reads reads the checkpoint files "
                                         "(source='files')")
            from vllm.distributed import get_world_group

            # on GPUs the tensors travel between them (NCCL); CPU workers exchange host tensors (gloo)
            on_gpu = next(iter(targets.values())).device.type == "cuda"
            group = get_world_group().device_group if on_gpu else get_world_group().cpu_group
        with _source(folder, self.options.get("source", "files")) as source:
            self.report = load(targets, source, config=config, preset=self.options.get("preset"), tp=tp, pp=pp, ep=ep,
                               backend=self.options.get("backend"),
                               progress=bool(self.options.get("progress", True)),
                               unexpected=self.options.get("unexpected", "error"),
                               missing=self.options.get("missing", "error"), group=group)
        r = self.report
        logger.info("pyloader: %s; tp %d/%d pp %d/%d ep %d/%d; %d checkpoint tensors skipped%s; %.2f s",
                    r.summary(), tp[0], tp[1], pp[0], pp[1], ep[0], ep[1], len(r.skipped),
                    f", {len(r.missing)} targets left unwritten" if r.missing else "", time.perf_counter() - t0)


def engine_targets(params: Dict[str, torch.Tensor], preset_targets, whole_model=None):
    """The model's parameters keyed by the preset's names. vLLM versions move a module one level down
    (0.32: ``mlp.experts.routed_experts.w13_weight`` for the preset's ``mlp.experts.w13_weight``): a
    preset target the model lacks takes the one parameter of the same shape whose name is its name
    with one more dotted segment. Under pipeline parallelism vLLM 0.32 keeps the embedding, final
    norm and head on every stage; those that ``whole_model`` (the targets of all stages) has and
    this stage's preset does not are left out. Returns ``(targets, {preset name: model name},
    [left-out names])``; what still matches nothing is left as it is, for the load's own error."""
    targets = {n: t for n, t in params.items() if n in preset_targets}
    spare = {n: t for n, t in params.items() if n not in preset_targets}
    reduced: Dict[str, List[str]] = {}
    for n in spare:
        parts = n.split(".")
        for i in range(len(parts) - 1):
            reduced.setdefault(".".join(parts[:i] + parts[i + 1:]), []).append(n)
    aliases = {}
    for name, spec in preset_targets.items():
        alt = spec.alternative if isinstance(spec.alternative, TargetSpec) else None
        shapes = {tuple(spec.shape)} | ({tuple(alt.shape)} if alt is not None else set())
        found = [m for m in reduced.get(name, ()) if m in spare
                 and (tuple(spare[m].shape) in shapes or spec.holds_padded(spare[m].shape))]
        if name not in targets and len(found) == 1:
            targets[name] = spare.pop(found[0])
            aliases[name] = found[0]
    foreign = sorted(n for n in spare if whole_model is not None and n in whole_model)
    targets.update({n: t for n, t in spare.items() if n not in foreign})
    return targets, aliases, foreign


@contextlib.contextmanager
def _source(folder: Path, kind: str):
    if kind == "files":
        yield folder
        return
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    if not files:
        raise PyloaderInputError(f"{folder}: no .safetensors files")
    if kind == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files)
            yield s.get_tensors()
        return
    from safetensors import safe_open

    def tensors():
        for f in files:
            with safe_open(f, "pt") as h:
                for name in h.keys():
                    yield name, h.get_tensor(name)
    yield tensors()


def checkpoint_config(model_config: ModelConfig, folder: Path) -> dict:
    """The model's config as vLLM sees it (``hf_overrides`` applied), with the checkpoint's own
    ``quantization_config``: it says how the stored weights are encoded, whatever the model computes in."""
    config = model_config.hf_config.to_dict()
    path = folder / "config.json"
    if path.is_file():
        stored = read_json_object(path, "config")
        if isinstance(stored.get("quantization_config"), dict):
            config["quantization_config"] = stored["quantization_config"]
    config["torch_dtype"] = str(model_config.dtype).replace("torch.", "")
    return config


def parallel_ranks():
    """This worker's (rank, size) for tensor, pipeline and expert parallelism, from vLLM's groups."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    tp = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    g = get_pp_group()
    pp = (g.rank_in_group, g.world_size)
    ep = (0, 1)
    if get_current_vllm_config().parallel_config.enable_expert_parallel:
        from vllm.distributed.parallel_state import get_ep_group

        e = get_ep_group()
        ep = (e.rank_in_group, e.world_size)
    return tp, pp, ep


def moe_shards_over_dp() -> int:
    """The data (and context) parallel ranks vLLM folds into the experts' tensor-parallel split when
    expert parallelism is off (``FusedMoEParallelConfig.flatten_tp_across_dp_and_pcp``); 1 if none."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed.parallel_state import get_dp_group, get_pcp_group

    if get_current_vllm_config().parallel_config.enable_expert_parallel:
        return 1
    return get_dp_group().world_size * get_pcp_group().world_size


def expert_sharding_problem(preset_targets, dp_fold: int, ep_size: int) -> Optional[str]:
    """Why pyloader cannot lay out this model's experts as vLLM shards them, or None: with data
    parallelism and no expert parallelism vLLM splits each expert over data x tensor parallel ranks,
    where the presets split experts over the tensor-parallel ranks only."""
    if dp_fold <= 1 or ep_size > 1:
        return None
    experts = sorted(n for n, spec in preset_targets.items() if spec.experts is not None)
    if not experts:
        return None
    return (f"load_format='pyloader': vLLM splits the MoE experts ({experts[0]}, ...) over {dp_fold} data/context "
            "parallel ranks times the tensor-parallel ranks (data parallelism without expert parallelism); "
            "pyloader's presets split experts over the tensor-parallel ranks only. Enable expert parallelism "
            "(--enable-expert-parallel) or load this deployment with vLLM's own loader")


def _layer_range(model: nn.Module) -> Optional[tuple]:
    inner = getattr(model, "model", None)
    start, end = getattr(inner, "start_layer", None), getattr(inner, "end_layer", None)
    return (start, end) if isinstance(start, int) and isinstance(end, int) else None


def register() -> None:
    """The ``vllm.general_plugins`` entry point: importing this module registers the loader."""
