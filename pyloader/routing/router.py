"""Name router: every checkpoint name → a target (parameter or buffer), a shard id and an expert
id, or a skip with a reason, or "unexpected" — decided before any byte is read.

Rules are data (:class:`Rules`): vLLM-style ``stacked_params_mapping`` tuples
``(param, shard_name, shard_id)`` and ``expert_params_mapping`` tuples
``(param, weight_name, expert_id, shard_id)`` exactly as engines write them, renames, skips, tied
embeddings and layer ownership.

Routing is O(1) per name: the name's integer components are lifted out (``model.layers.{0}.mlp.
experts.{1}.gate_proj.weight`` with ``(3, 17)``), the template is resolved against the rules once
and cached, and every later name with that template is a dict lookup plus a format. The mapping
tables are themselves reduced to templates when the router is built (the 3 x 256 expert tuples of
DeepSeek-V3 become three template rules), so no table is scanned per name.
"""

import difflib
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..errors import PyloaderInputError
from ..format.scales import SCALE_SUFFIXES


def templatize(name: str) -> Tuple[str, Tuple[int, ...]]:
    """``model.layers.3.mlp.experts.17.w1.weight`` → (``model.layers.{}.mlp.experts.{}.w1.weight``, (3, 17))."""
    if "{" in name or "}" in name:
        name = name.replace("{", "{{").replace("}", "}}")
    parts = name.split(".")
    ints = []
    for i, part in enumerate(parts):
        if part.isdigit() and part.isascii():
            ints.append(int(part))
            parts[i] = "{}"
    return ".".join(parts), tuple(ints)


@dataclass(slots=True)
class Route:
    """Where one checkpoint tensor goes.

    ``kind``: ``"weight"`` (values of a target), ``"scale"`` (the block scales that dequantize the
    weight routed to the same target/shard/expert), ``"skip"`` (with ``reason``) or ``"unexpected"``.
    """

    name: str
    kind: str
    target: Optional[str] = None
    shard_id: Optional[Union[str, int]] = None
    expert_id: Optional[int] = None
    layer: Optional[int] = None
    reason: Optional[str] = None


@dataclass
class Rules:
    """Routing rules as data. Every field is optional.

    - ``stacked_params_mapping``: ``(param, shard_name, shard_id)``; a name containing
      ``shard_name`` routes to the name with it replaced by ``param`` (vLLM's loop, as data).
    - ``expert_params_mapping``: ``(param, weight_name, expert_id, shard_id)``; e.g.
      ``("experts.w13_", "experts.3.gate_proj.", 3, "w1")``.
    - ``renames``: ``(kind, pattern, replacement)`` with kind ``prefix``, ``substring`` or ``regex``,
      applied in order before mapping.
    - ``skips``: ``(kind, pattern, reason)`` with kind ``prefix``, ``suffix``, ``substring`` or
      ``regex``: names that are read by nobody (checked before renames).
    - ``tie_word_embeddings``: ``lm_head.weight`` (``tied_source``/``tied_target``) is skipped
      when present; the target is filled from the embedding by the executor.
    - ``layer_pattern``: regex whose group 1 is the layer index of a name.
    - ``num_layers``: names of layers ``>= num_layers`` (MTP / next-n draft layers) are skipped.
    - ``benign``: ``(kind, pattern, reason)`` names skipped when they have no target (input or
      activation scales of an unquantized activation, rotary ``inv_freq``); with a target they route.
    - ``unstack``: ``(regex, replacement)`` for checkpoint tensors holding every expert ``[E, ...]``;
      the replacement names expert ``{}``. Where that per-expert name routes to a float target not
      itself stacked, the tensor is read as E per-expert tensors (its slices; a packed one with its
      scales), so tensor-parallel slices and expert ownership apply as to experts stored one by one.
    """

    stacked_params_mapping: Sequence[Tuple[str, str, Union[str, int]]] = ()
    expert_params_mapping: Sequence[Tuple[str, str, int, Union[str, int]]] = ()
    renames: Sequence[Tuple[str, str, str]] = ()
    skips: Sequence[Tuple[str, str, str]] = ()
    benign: Sequence[Tuple[str, str, str]] = (
        ("suffix", ".input_scale", "activation input scale; activations are not quantized here"),
        ("suffix", ".activation_scale", "activation scale; activations are not quantized here"),
        ("suffix", ".k_scale", "KV-cache scale; the KV cache is not quantized here"),
        ("suffix", ".v_scale", "KV-cache scale; the KV cache is not quantized here"),
        ("suffix", "rotary_emb.inv_freq", "rotary inv_freq is recomputed, never loaded"),
    )
    tie_word_embeddings: bool = False
    tied_source: str = "model.embed_tokens.weight"
    tied_target: str = "lm_head.weight"
    layer_pattern: str = r"(?:^|\.)layers\.(\d+)\."
    num_layers: Optional[int] = None
    owned_layers: Optional[Iterable[int]] = None  # pipeline ownership (None: all)
    unstack: Sequence[Tuple[str, str]] = ()


def _matcher(kind: str, pattern: str) -> str:
    """One rule as a regex fragment."""
    if kind == "prefix":
        return "^" + re.escape(pattern)
    if kind == "suffix":
        return re.escape(pattern) + "$"
    if kind == "substring":
        return re.escape(pattern)
    if kind == "regex":
        return pattern
    raise PyloaderInputError(f"unknown rule kind {kind!r}: expected prefix, suffix, substring or regex")


class _RuleSet:
    """Several (kind, pattern, reason) rules as one compiled alternation: one search per name."""

    def __init__(self, rules: Sequence[Tuple[str, str, str]]):
        self.reasons = [r for _, _, r in rules]
        parts = [f"(?P<r{i}>{_matcher(k, p)})" for i, (k, p, _) in enumerate(rules)]
        try:
            self.regex = re.compile("|".join(parts)) if parts else None
        except re.error as e:
            raise PyloaderInputError(f"invalid skip rule pattern: {e}") from None

    def reason(self, name: str) -> Optional[str]:
        if self.regex is None:
            return None
        m = self.regex.search(name)
        if not m:
            return None
        return self.reasons[int(m.lastgroup[1:])]


class Router:
    """Routes checkpoint names to targets.

    ``targets``: the names of the parameters and buffers that exist (on this rank, before
    parallel slicing). Build once; call :meth:`route` per name (or :meth:`route_all`).
    """

    def __init__(self, rules: Rules, targets: Iterable[str]):
        self.rules = rules
        self.targets = set(targets)
        self._target_templates = {templatize(t)[0] for t in self.targets}
        self._skips = _RuleSet(rules.skips)
        self._benign = _RuleSet(rules.benign)
        self._renames = []
        for kind, pattern, repl in rules.renames:
            if kind == "regex":
                self._renames.append((re.compile(pattern), repl))
            elif kind == "prefix":
                self._renames.append((re.compile("^" + re.escape(pattern)), repl.replace("\\", "\\\\")))
            elif kind == "substring":
                self._renames.append((re.compile(re.escape(pattern)), repl.replace("\\", "\\\\")))
            else:
                raise PyloaderInputError(f"unknown rename kind {kind!r}: expected prefix, substring or regex")
        self._layer_re = re.compile(rules.layer_pattern)
        self._owned = None if rules.owned_layers is None else set(rules.owned_layers)
        self._stacked = self._template_stacked(rules.stacked_params_mapping)
        self._experts = self._template_experts(rules.expert_params_mapping)
        self._cache: Dict[str, Tuple] = {}  # template -> (layer slot, resolution)
        self._num_layers = rules.num_layers
        self._tied_target = rules.tied_target if rules.tie_word_embeddings else None

    # -- rules in template space ------------------------------------------------------------
    @staticmethod
    def _template_stacked(mapping):
        out = []
        for param, shard_name, shard_id in mapping:
            out.append((templatize(shard_name)[0] if re.search(r"\d", shard_name) else shard_name, param, shard_id))
        return out

    @staticmethod
    def _template_experts(mapping):
        """``("experts.w13_", "experts.3.gate_proj.", 3, "w1")`` → rule ``experts.#.gate_proj.`` whose
        ``#`` is the expert id. Tuples whose number is not the expert id are kept literally."""
        rules: Dict[Tuple[str, str, Union[str, int]], None] = {}
        literal = []
        for param, weight_name, expert_id, shard_id in mapping:
            numbers = re.findall(r"(?<![\w])\d+(?![\w])", weight_name)
            if numbers == [str(expert_id)]:
                pattern = re.escape(weight_name).replace(re.escape(str(expert_id)), r"\{\}", 1)
                rules[(pattern, param, shard_id)] = None
            else:
                literal.append((weight_name, param, expert_id, shard_id))
        compiled = [(re.compile(p), param, sid) for (p, param, sid) in rules]
        return compiled, literal

    # -- routing ----------------------------------------------------------------------------
    def _layer_slot(self, tmpl: str, count: int) -> Optional[int]:
        """Which integer of names with this template is the layer: the layer pattern is run once on
        a probe name whose integers are distinct sentinels."""
        probe = tmpl.format(*(1_000_003 + k for k in range(count)))
        m = self._layer_re.search(probe)
        if not m:
            return None
        v = int(m.group(1)) - 1_000_003
        return v if 0 <= v < count else None

    def _resolve_template(self, tmpl: str):
        """Returns (kind, target template, shard id, expert slot index or None, scale flag)."""
        is_scale = False
        base = tmpl
        for suffix in SCALE_SUFFIXES:
            if tmpl.endswith("." + suffix):
                base, is_scale = tmpl[: -len(suffix)] + "weight", True
                break
        for shard_name, param, shard_id in self._stacked:
            if shard_name in base:
                cand = base.replace(shard_name, param)
                if cand in self._target_templates:
                    return ("scale" if is_scale else "weight", cand, shard_id, None)
        compiled, literal = self._experts
        for regex, param, shard_id in compiled:
            m = regex.search(base)
            if m:
                slot = base[: m.start() + base[m.start(): m.end()].find("{}")].count("{}")  # which integer is the expert
                cand = base[: m.start()] + param + base[m.end():]
                if cand in self._target_templates:
                    return ("scale" if is_scale else "weight", cand, shard_id, slot)
        if base in self._target_templates:
            return ("scale" if is_scale else "weight", base, None, None)
        if is_scale and tmpl in self._target_templates:
            return ("weight", tmpl, None, None)  # an FP8 target's own scale parameter
        return ("unexpected", None, None, None)

    def route(self, name: str) -> Route:
        renamed = name
        for regex, repl in self._renames:
            renamed = regex.sub(repl, renamed)
        if self._skips.regex is not None:  # skip rules see the checkpoint name and the renamed one
            reason = self._skips.reason(name) or (self._skips.reason(renamed) if renamed != name else None)
        else:
            reason = None
        tmpl, ints = templatize(renamed)
        # one lookup a name: the template's layer slot and its resolution (a template fixes how
        # many integers its names hold)
        known = self._cache.get(tmpl)
        if known is None:
            known = self._cache[tmpl] = (self._layer_slot(tmpl, len(ints)), self._resolve_template(tmpl))
        lslot, (kind, target_tmpl, shard_id, slot) = known
        layer = ints[lslot] if lslot is not None else None
        if reason:
            return Route(name, "skip", layer=layer, reason=reason)
        if layer is not None:
            if self._num_layers is not None and layer >= self._num_layers:
                return Route(name, "skip", layer=layer,
                             reason=f"layer {layer} >= num_hidden_layers {self._num_layers}: MTP/next-n draft layer")
            if self._owned is not None and layer not in self._owned:
                return Route(name, "skip", layer=layer, reason="layer owned by another pipeline stage")
        if self._tied_target is not None and name == self._tied_target:
            r = self.rules
            return Route(name, "skip", reason=f"tie_word_embeddings: {r.tied_target} is {r.tied_source}")
        if kind == "unexpected":
            benign = self._benign.reason(name)
            if benign:
                return Route(name, "skip", layer=layer, reason=benign)
            return Route(name, "unexpected", layer=layer)
        expert = None
        if slot is None:
            target = target_tmpl.format(*ints)
        else:
            target = target_tmpl.format(*(ints[:slot] + ints[slot + 1:]))  # the expert's number is not in the target
            expert = ints[slot]
        if target not in self.targets:  # the template exists, this instance does not (a dense MLP in a MoE layer)
            return Route(name, "unexpected", layer=layer)
        return Route(name, kind, target, shard_id, expert, layer)

    def route_all(self, names: Iterable[str]) -> List[Route]:
        return [self.route(n) for n in names]

    def suggestions(self, name: str, n: int = 3) -> List[str]:
        """Did-you-mean hints: nearest target templates (few hundred), formatted with the name's numbers."""
        tmpl, ints = templatize(name)
        hits = difflib.get_close_matches(tmpl, list(self._target_templates), n=n, cutoff=0.6)
        out = []
        for h in hits:
            try:
                out.append(h.format(*ints))
            except (IndexError, KeyError):
                out.append(h)
        return out


@dataclass
class RoutingSummary:
    routes: List[Route]
    routed: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    unexpected: List[str] = field(default_factory=list)

    @classmethod
    def of(cls, routes: List[Route]) -> "RoutingSummary":
        s = cls(routes)
        for r in routes:
            if r.kind in ("weight", "scale"):
                s.routed += 1
            elif r.kind == "skip":
                s.skipped[r.reason] = s.skipped.get(r.reason, 0) + 1
            else:
                s.unexpected.append(r.name)
        return s


def unexpected_error(router: Router, names: Sequence[str], limit: int = 20) -> PyloaderInputError:
    """One error listing every unexpected name (up to ``limit`` shown) with did-you-mean hints."""
    lines = []
    for n in names[:limit]:
        hint = router.suggestions(n)
        lines.append(f"  {n}" + (f"   (did you mean {', '.join(hint)}?)" if hint else ""))
    more = f"\n  … and {len(names) - limit} more" if len(names) > limit else ""
    return PyloaderInputError(
        f"{len(names)} checkpoint tensor(s) have no target (policy 'error'; use unexpected='warn' or "
        f"'ignore', or add a skip rule):\n" + "\n".join(lines) + more
    )
