import re

import pytest

from autotune.errors import UserError
from autotune.sim.calibration import DEFAULT
from autotune.sim.memory import plan_memory, stage_shape
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import EngineKnobs, Layout, enumerate_layouts, structural_problem
from autotune.spec.models import load_model

H200x8 = Cluster.of(load_gpu("H200"), 8)


def test_parse_layouts():
    assert Layout.parse("dp=4,tp=2") == Layout(dp=4, tp=2)
    assert Layout.parse("tp=2, pp=4") == Layout(tp=2, pp=4)
    assert Layout.parse("dp=8,ep") == Layout(dp=8, ep=8)
    assert Layout.parse("dp=4,tp=2,ep=8").ep == 8


@pytest.mark.parametrize("text,msg", [("tp=x", "an integer in 1..65536"), ("foo=2", "expected e.g."),
                                      ("", "expected e.g."), ("dp=4,ep=3", "spans dp x tp = 4")])
def test_bad_layouts_say_what_is_wrong(text, msg):
    with pytest.raises(UserError, match=msg):
        Layout.parse(text)


@pytest.mark.parametrize("model,layout,msg", [
    ("Llama-3.1-8B", Layout(tp=3), "does not divide the 32 attention heads"),
    ("Llama-3.1-8B", Layout(pp=64), "exceeds the 32 layers"),
    ("Llama-3.1-8B", Layout(dp=8, ep=8), "mixture-of-experts"),
    ("Llama-3.1-8B", Layout(dp=16), "needs 16 GPUs"),
])
def test_structural_checks(model, layout, msg):
    assert re.search(msg, structural_problem(load_model(model), H200x8, layout) or "")


def test_tp_stays_inside_a_node_unless_asked():
    cluster = Cluster.of(load_gpu("H100"), 16)
    model = load_model("Llama-3.1-405B")
    assert "cross nodes" in structural_problem(model, cluster, Layout(tp=16))
    assert structural_problem(model, cluster, Layout(tp=16), allow_cross_node_tp=True) is None


def test_enumerate_uses_all_gpus_and_adds_ep_for_moe():
    dense = enumerate_layouts(load_model("Llama-3.1-8B"), H200x8)
    assert all(l.world_size == 8 and l.ep == 1 for l in dense)
    assert Layout(dp=8) in dense and Layout(tp=8) in dense and Layout(pp=8) in dense
    moe = enumerate_layouts(load_model("DeepSeek-R1"), H200x8)
    assert Layout(dp=8, ep=8) in moe and Layout(tp=8, ep=8) in moe


def _plan(model, layout, **knobs):
    m = load_model(model)
    return plan_memory(m, H200x8.gpu, layout, EngineKnobs(**knobs).resolved(H200x8.gpu, 33792), DEFAULT)


def test_weights_that_do_not_fit_are_refused():
    assert "does not fit" in _plan("Llama-3.1-405B", Layout(dp=2, tp=4)).problem
    assert _plan("Llama-3.1-405B", Layout(tp=8)).problem is None


def test_kv_cache_smaller_than_one_sequence_is_refused():
    plan = _plan("Llama-3.1-8B", Layout(), num_gpu_blocks_override=100)
    assert plan.kv_capacity_tokens == 99 * 16 and "less than one max_model_len" in plan.problem


def test_kv_capacity_by_hand():
    # Llama-3.1-8B on one H200 at 0.9: usable - weights - activations - overhead, in 16-token blocks of 128 KiB/token.
    plan = _plan("Llama-3.1-8B", Layout())
    free = plan.usable_bytes - plan.weight_bytes - plan.activation_bytes - plan.overhead_bytes
    assert plan.kv_capacity_tokens == (int(free // (131072 * 16)) - 1) * 16   # less vLLM's null block
    assert 800_000 < plan.kv_capacity_tokens < 950_000


def test_tp_shards_gqa_kv_but_replicates_mla_and_excess_kv_heads():
    llama = load_model("Llama-3.1-8B")
    assert stage_shape(llama, Layout(tp=2), "bf16").kv_bytes_per_token == 131072 / 2
    qwen_moe = load_model("Qwen3-30B-A3B")   # 4 KV heads: TP8 keeps one head per GPU
    assert stage_shape(qwen_moe, Layout(tp=8), "bf16").kv_bytes_per_token == qwen_moe.kv_bytes_per_token() / 4
    ds = load_model("DeepSeek-R1")
    assert stage_shape(ds, Layout(tp=8), "bf16").kv_bytes_per_token == 70272
    assert stage_shape(ds, Layout(pp=8), "bf16").kv_bytes_per_token == pytest.approx(70272 * 8 / 61, rel=0.01)


def test_expert_parallel_splits_whole_experts_over_dp_x_tp():
    ds = load_model("DeepSeek-R1")
    ep = stage_shape(ds, Layout(dp=8, ep=8), "bf16")
    assert ep.expert_bytes == pytest.approx(ds.routed_expert_bytes / 8)
    assert ep.non_expert_bytes == pytest.approx(ds.non_expert_layer_bytes + ds.embedding_bytes)


def test_without_ep_the_expert_layers_are_still_one_tp_group_over_dp_x_tp():
    ds = load_model("DeepSeek-R1")
    no_ep = stage_shape(ds, Layout(dp=8), "bf16")
    assert no_ep.expert_bytes == pytest.approx(stage_shape(ds, Layout(dp=8, ep=8), "bf16").expert_bytes)
    # Qwen3-235B-A22B DP8 on 8 H200 and DeepSeek-R1 DP16 on 16 H200 fit without EP, with room for long outputs.
    for model, layout, gpus in (("Qwen3-235B-A22B", Layout(dp=8), 8), ("DeepSeek-R1", Layout(dp=16), 16)):
        m = load_model(model)
        cluster = Cluster.of(load_gpu("H200"), gpus)
        plan = plan_memory(m, cluster.gpu, layout, EngineKnobs().resolved(cluster.gpu, 33792), DEFAULT)
        assert plan.problem is None and plan.kv_capacity_tokens > 100_000, (model, plan.problem)


def test_knobs_resolve_as_vllm_sets_its_defaults_and_refusals_are_infeasible(make_scenario):
    """vllm/engine/arg_utils.py: without chunked prefill the token budget defaults to max_model_len, the default
    max_num_seqs never exceeds the budget; SchedulerConfig refuses an explicit budget below either."""
    from autotune.sim.predict import predict

    h100 = load_gpu("H100")
    assert EngineKnobs(enable_chunked_prefill=False).resolved(h100, 33792).max_num_batched_tokens == 33792
    small = EngineKnobs(max_num_batched_tokens=512).resolved(h100, 33792)
    assert (small.max_num_seqs, small.refusal()) == (512, None)
    sc = make_scenario("Llama-3.1-8B", gpus=1, num_requests=20)
    for knobs, why in ((EngineKnobs(max_num_batched_tokens=512, max_num_seqs=1024), "below max_num_seqs 1024"),
                       (EngineKnobs(max_num_batched_tokens=4096, enable_chunked_prefill=False), "below max_model_len")):
        p = predict(sc, Layout(), knobs)
        assert not p.feasible and "vLLM refuses" in p.reason and why in p.reason, p.reason


def test_every_knob_is_declared_once_and_each_layer_derives_from_it():
    """A knob added to EngineKnobs reaches the CLI, a space's dimensions, the store, the serve command and the
    dashboard with nothing else to edit; a value away from vLLM's default shows on the command line."""
    from autotune.cli import build_parser
    from autotune.deploy import engine_args
    from autotune.search.space import DimensionsCfg
    from autotune.spec.layout import ALWAYS, knob_columns, knob_fields
    from store.schema import columns
    from tui.widgets.trials import COLUMNS

    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    flags = {s for a in predict._actions for s in a.option_strings}
    for f in knob_fields(tunable_only=True):
        meta = f.metadata
        assert meta["flag"] in flags and f.name in DimensionsCfg.model_fields and f.name in columns("trials")
        assert list(DimensionsCfg().model_dump()[f.name]) == list(meta["search"])
        value = _away_from_default(f)
        args = engine_args(Layout(), EngineKnobs(**{f.name: value}))
        flag = meta["flag"] if value is not False else meta["flag"].replace("--", "--no-", 1)
        assert flag in args, (f.name, args)
        if meta["omit_at"] is not ALWAYS:
            assert meta["flag"] not in engine_args(Layout(), EngineKnobs(**{f.name: meta["omit_at"]}))
    assert all(c in COLUMNS for c in knob_columns()) and knob_columns()


def _away_from_default(f):
    from autotune.spec.layout import knob_kind

    kind, choices = knob_kind(f), f.metadata["choices"]
    if kind is bool:
        return True if f.default is None else not f.default
    if choices:
        return next(c for c in choices if c != f.default)
    return f.default / 2 if kind is float else (f.default or 0) + 1
