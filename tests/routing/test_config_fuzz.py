"""Fuzzed config.json and model.safetensors.index.json: every malformed one is pyloader's input
error naming what is wrong, never another exception, and never a hang."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyloader.errors import PyloaderInputError
from pyloader.format.checkpoint import open_checkpoint
from pyloader.parallel import Parallel
from pyloader.routing.presets import build_preset

from checkpoint_lists import DUMPS, config_of_folder

CONFIGS = sorted(set(DUMPS.values()) | {"nvidia-nemotron-3-super-120b-a12b-fp8", "glm-5.1-fp8"})
_junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2 ** 40, 10 ** 30]),
                  st.floats(allow_nan=True), st.text(max_size=3), st.lists(st.integers(0, 3), max_size=2),
                  st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CONFIGS), st.data())
def test_fuzzed_configs_give_a_preset_or_an_input_error(folder, data):
    config = json.loads(json.dumps(config_of_folder(folder)))
    keys = sorted(k for k in config if not isinstance(config[k], dict))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = data.draw(_junk)
    parallel = data.draw(st.sampled_from([Parallel(), Parallel(tp_rank=1, tp_size=2), Parallel(pp_rank=1, pp_size=2)]))
    try:
        preset = build_preset(config, parallel=parallel)
    except PyloaderInputError:
        return
    for spec in preset.targets.values():  # accepted: every target has a real shape
        assert all(isinstance(d, int) and 0 <= d < 2 ** 63 for d in spec.shape), spec
        assert math.prod(spec.shape) < 2 ** 63


_names = st.text(min_size=0, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(_names, st.one_of(_names, _junk, st.just("../x.safetensors"),
                                                   st.just("/etc/passwd")), max_size=4), _junk,
                 st.lists(_junk, max_size=2)),
       st.one_of(st.none(), _junk, st.dictionaries(_names, _junk, max_size=2)))
def test_fuzzed_indexes_are_read_or_refused_naming_the_file(tmp_path_factory, weight_map, metadata):
    d = tmp_path_factory.mktemp("idx")
    obj = {"weight_map": weight_map}
    if metadata is not None:
        obj["metadata"] = metadata
    (d / "model.safetensors.index.json").write_text(json.dumps(obj))
    try:
        ck = open_checkpoint(d, require_files=False)
    except PyloaderInputError as e:
        assert "model.safetensors.index.json" in str(e) or str(d) in str(e)
        return
    for info in ck.tensors.values():  # accepted: names and files inside the directory
        assert info.file.resolve().is_relative_to(d.resolve())


@pytest.mark.parametrize("text", ["{", "[]", "null", '{"model_type": "llama"}', '{"a": 1, "a": 2}', "\\u0000"])
def test_a_bad_config_file_is_an_input_error(tmp_path, text):
    p = tmp_path / "config.json"
    p.write_text(text)
    with pytest.raises(PyloaderInputError):
        build_preset(p)
