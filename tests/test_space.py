import pytest

from autotune.errors import UserError
from autotune.search.space import load_space
from autotune.spec.layout import Layout

GOOD = """\
name: t
cluster: {gpu: H200, nodes: 1, gpus_per_node: 8}
model: Llama-3.1-8B
workload: {preset: natural-reasoning, num_requests: 100}
dimensions:
  layout: {tp: [1, 2]}
  max_num_seqs: [64, 128]
objectives:
  - {metric: output_tok_s_per_gpu}
  - {metric: tpot_p99_s}
constraints: {tpot_p99_ms: 80}
budget: {trials: 5, parallel: 2}
"""


def write(tmp_path, text):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    return f


@pytest.mark.parametrize("name", ["dense", "moe", "scheduler"])
def test_presets_load(name):
    space = load_space(f"search_spaces/{name}.yaml")
    assert space.layouts and space.size() >= len(space.layouts)


def test_a_space_is_typed_and_filtered(tmp_path):
    s = load_space(write(tmp_path, GOOD))
    assert set(s.layouts) == {Layout(dp=8), Layout(dp=4, tp=2), Layout(dp=2, tp=2, pp=2), Layout(tp=2, pp=4),
                              Layout(dp=4, pp=2), Layout(dp=2, pp=4), Layout(pp=8)}
    assert s.knob_grid["max_num_seqs"] == (64, 128)
    assert s.constraints == {"tpot_p99_s": 0.08}
    assert [o.direction for o in s.objectives] == ["maximize", "minimize"]
    assert s.size() == len(s.layouts) * 2


@pytest.mark.parametrize("text,where", [
    (GOOD.replace("{metric: tpot_p99_s}", "{metric: tpot_p95_s}"), r":10: objectives\.1\.metric: unknown objective"),
    (GOOD.replace("max_num_seqs: [64, 128]", "max_num_seqs: [64, many]"), r":7: dimensions\.max_num_seqs\.1"),
    (GOOD.replace("budget: {trials: 5", "budget: {trails: 5"), r":12: budget\.trails: Extra inputs"),
    (GOOD.replace("model: Llama-3.1-8B", "model: Llama-9B"), r":3: model: unknown model"),
    (GOOD.replace("layout: {tp: [1, 2]}", "layout: {tp: [3]}"), r":6: dimensions\.layout: no valid layout"),
    (GOOD.replace("tpot_p99_ms: 80", "tpot_p98_ms: 80"), r":11: constraints: unknown constraint"),
    (GOOD + "extra: [1, 2\n", r":14: invalid YAML"),
])
def test_errors_name_file_line_and_key(tmp_path, text, where):
    with pytest.raises(UserError, match=where):
        load_space(write(tmp_path, text))


def test_a_model_that_fits_nowhere(tmp_path):
    text = (GOOD.replace("Llama-3.1-8B", "Llama-3.1-405B").replace("layout: {tp: [1, 2]}", "layout: {tp: [1]}")
            .replace("gpu: H200", "gpu: H100-SXM"))
    with pytest.raises(UserError, match="no layout of the space fits in memory"):
        load_space(write(tmp_path, text))
