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
    assert s.scenario.cluster.p2p
    # A node whose GPUs lack peer access says so in its cluster; the simulator prices its collectives by it.
    no_p2p = load_space(write(tmp_path, GOOD.replace("gpus_per_node: 8}", "gpus_per_node: 8, p2p: false}")))
    assert not no_p2p.scenario.cluster.p2p


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


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")   # TPE's group=True, as the tuner
def test_the_sampler_learns_a_repeated_point_as_what_it_measured(tmp_path):
    """Four points in the space, twelve asks: every repeat is told the values measured for its point (never
    PRUNED, which TPE would read as a bad result), and a point that failed teaches nothing (FAIL)."""
    from optuna.trial import TrialState

    from autotune.search.tuner import Tuner, point_key
    from autotune.spec.trial import TrialResult

    f = tmp_path / "s.yaml"
    f.write_text("name: tiny\ncluster: {gpu: H200, nodes: 1, gpus_per_node: 2}\nmodel: Llama-3.1-8B\n"
                 "dimensions: {layout: {dp: [1, 2], tp: [1], pp: [1], gpus_per_trial: [1, 2]}, max_num_seqs: [64, 128]}\n"
                 "objectives: [{metric: output_tok_s}]\nconstraints: {tpot_p99_ms: 50}\nbudget: {trials: 12}\n")
    space = load_space(f)
    tuner = Tuner(space, tmp_path / "optuna.journal")
    measured = {}
    for n in range(12):
        asked = tuner.ask(n)
        if asked is None:
            break
        trial, spec = asked
        if spec.knobs.max_num_seqs == 128 and spec.layout.dp == 2:
            tuner.tell(trial, TrialResult(n, False, "OOM"))
            continue
        metrics = {"output_tok_s": 1000.0 * spec.layout.dp + spec.knobs.max_num_seqs, "tpot_p99_s": 0.04}
        tuner.tell(trial, TrialResult(n, True, "", metrics))
        measured[point_key(trial.params)] = metrics["output_tok_s"]
    trials = tuner.study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.PRUNED]
    repeats = [t for t in trials if t.user_attrs.get("repeat")]
    assert repeats and all(t.state == TrialState.COMPLETE and t.values[0] == measured[point_key(t.params)]
                           for t in repeats)
    failed_point = [t for t in trials if t.params.get("max_num_seqs") == 128 and t.params.get("layout", "").startswith("dp=2")]
    assert failed_point and all(t.state == TrialState.FAIL for t in failed_point)
    # A resumed tuner knows what each point measured.
    again = Tuner(space, tmp_path / "optuna.journal", resume=True)
    assert {k: v[0][0] for k, v in again.outcomes.items()} == measured
