"""Human-readable rendering (rich) of models, predictions and recommendations; --json bypasses all of it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from autotune.deploy import serve_commands
from autotune.sim.predict import Prediction
from autotune.sim.recommend import Recommendation
from autotune.spec.models import ModelSpec, human_bytes, human_count


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:,.1f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def models_table(models: list[ModelSpec]) -> Table:
    t = Table(title="Model catalog")
    for col in ("model", "params", "active", "weights", "KV/token", "attention", "layers", "Hugging Face id"):
        t.add_column(col, justify="left" if col in ("model", "attention", "Hugging Face id") else "right")
    for m in models:
        d = m.derived()
        t.add_row(m.name, human_count(d["total_params"]), human_count(d["active_params"]), human_bytes(d["weight_bytes"]),
                  f"{d['kv_bytes_per_token']:,.0f} B", d["attention"] + (" MoE" if d["moe"] else ""), str(m.num_layers),
                  m.hf_id)
    return t


def model_detail(m: ModelSpec) -> Table:
    t = Table(title=m.name, show_header=False)
    t.add_column("field")
    t.add_column("value", justify="right")
    mla = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    moe = ("num_experts", "experts_per_token", "num_shared_experts", "first_dense_layers", "moe_intermediate_size",
           "expert_dtype")
    # Show the fields that mean something for this architecture: MLA caches a latent, not KV heads of head_dim.
    hidden = {"derived", *(("num_kv_heads", "head_dim") if m.is_mla else mla), *(() if m.is_moe else moe)}
    if not m.sliding_window:
        hidden |= {"sliding_window", "num_sliding_layers"}
    for k, v in m.to_dict().items():
        if k not in hidden and not (k == "expert_dtype" and v is None):
            t.add_row(k, str(v))
    if m.is_mla:
        t.add_row("[b]attention", f"MLA latent {m.kv_lora_rank} + rope {m.qk_rope_head_dim} per token, all TP ranks")
    d = m.derived()
    t.add_row("[b]total parameters", f"{d['total_params']:,} ({human_count(d['total_params'])})")
    t.add_row("[b]active parameters", f"{d['active_params']:,} ({human_count(d['active_params'])})")
    t.add_row("[b]weight bytes", f"{d['weight_bytes']:,.0f} ({human_bytes(d['weight_bytes'])})")
    t.add_row("[b]KV bytes per token", f"{d['kv_bytes_per_token']:,.0f}")
    return t


def _usd(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def _compact(v: float) -> str:
    return f"{v / 1e3:,.1f}k" if v >= 1e3 else f"{v:,.0f}"


def _range(p: Prediction, key: str, value: float) -> str:
    """The prediction's interval for `key`, moved to `value` when the row shows another figure of the same kind."""
    iv = (p.get("intervals") or {}).get(key)
    if not iv or not p.get(key):
        return "-"
    scale = value / p.get(key)
    return f"{_compact(iv[0] * scale)}-{_compact(iv[1] * scale)}"


def uncertainty_caption(preds: list[Prediction]) -> str | None:
    """What the ranges are, and which rows extrapolate beyond the validated runs."""
    if not any(p.get("intervals") for p in preds):
        return None
    cover = next((p.get("interval_coverage") for p in preds if p.get("interval_coverage")), {})
    text = (f"range: the measured value, from the model's residuals on the validation set (held-out coverage "
            f"{cover.get('throughput', 0):.0%} for throughput)")
    far = sorted({why for p in preds for why in (p.get("extrapolation") or [])})
    return text + (f"; * extrapolation ({'; '.join(far)}): wider range" if far else "")


def predictions_table(preds: list[Prediction], title: str, goodput=None, usd_per_gpu_hour: float | None = None
                      ) -> Table:
    """One row per prediction; `goodput` (prediction -> Goodput or None) adds the goodput columns, and then the
    throughput and cost columns are those of the steady state at the goodput rate."""
    t = Table(title=title)
    cols = ["layout", "seqs", "tok/s", "90% range", "/GPU", "$/Mtok", *(("goodput req/s", "/GPU req/s") if goodput else ()),
            "TTFT avg s", "TTFT99 s", "TPOT avg ms", "TPOT99 ms", "E2E avg s", "E2E99 s", "preempt", "KV peak",
            "bound by"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("layout", "bound by") else "right")
    for p in preds:
        if not p.feasible:
            t.add_row(p.layout.label(), str(p.knobs.max_num_seqs), *["-"] * (len(cols) - 3),
                      f"[red]infeasible: {p.reason}")
            continue
        g = p.get
        bound = g("bottleneck")
        if g("overloaded"):
            bound = f"[red]overloaded: sustains {g('sustainable_rate'):.2f} of {g('offered_rate'):g} req/s[/red]; {bound}"
        tok_s, usd, extra = g("output_tok_s"), g("usd_per_mtok"), ()
        gp = goodput(p) if goodput else None
        if gp and gp.rate:
            # In steady state at the goodput rate the layout makes rate x mean output tokens/s.
            tok_s = gp.tok_s
            usd = gp.usd_per_mtok(p.layout.world_size, usd_per_gpu_hour)
            extra = (f"{gp.rate:.3g}", f"{gp.per_gpu(p.layout.world_size):.3g}")
        elif goodput:
            extra = ("-", "-")
        mark = "" if g("near_validated", True) else "*"
        t.add_row(p.layout.label() + mark, str(p.knobs.max_num_seqs), f"{tok_s:,.0f}", _range(p, "output_tok_s", tok_s),
                  f"{tok_s / p.layout.world_size:,.0f}", _usd(usd), *extra, _s(g("ttft_mean_s")),
                  _s(g("ttft_p99_s")), _ms(g("tpot_mean_s")), _ms(g("tpot_p99_s")), _s(g("e2e_mean_s")),
                  _s(g("e2e_p99_s")), f"{g('preemptions'):,}", f"{g('kv_peak_frac'):.0%}", bound)
    return t


def sizing_table(answers, title: str) -> Table:
    t = Table(title=title, caption="cheapest per million output tokens first; $/h and $/Mtok at the listed price "
                                   "per GPU-hour (--prices)")
    for col in ("GPU", "GPUs", "layout", "seqs", "$/h", "$/Mtok", "TTFT99 s", "TPOT99 ms", "preempt", "KV peak"):
        t.add_column(col, justify="left" if col in ("GPU", "layout") else "right")
    for a in answers:
        p = a.prediction
        if p is None:
            t.add_row(a.gpu, "-", "[red]none fits the rate", *["-"] * 7)
            continue
        t.add_row(a.gpu, str(a.gpus), p.layout.label(), str(p.knobs.max_num_seqs), _usd(a.usd_per_hour),
                  _usd(a.usd_per_mtok), _s(p.get("ttft_p99_s")), _ms(p.get("tpot_p99_s")), f"{p.get('preemptions'):,}",
                  f"{p.get('kv_peak_frac'):.0%}")
    return t


def load_caption(workload) -> str | None:
    """What TTFT means under this load, beside the tables."""
    if workload.mode == "batch":
        return "batch sent at t=0: TTFT is mostly queueing for a free slot"
    return None


def print_recommendation(console: Console, rec: Recommendation, top: int) -> None:
    sc = rec.scenario
    rows = rec.distinct_layouts()[:top]
    table = predictions_table(rows, f"{sc.model.name} on {sc.cluster.describe()}, {sc.workload.name} "
                                    f"({sc.workload.num_requests:,} requests), {rec.slo.describe()}: best "
                                    f"{len(rows)} layout{'' if len(rows) == 1 else 's'} by {rec.goal} of {len(rec.evaluated)} simulated "
                                    "configurations", rec.goodput_of if rec.goal == "goodput" else None,
                              sc.cluster.usd_per_gpu_hour)
    load = (f"each at its goodput rate ({'constant' if sc.workload.mode == 'constant' else 'Poisson'} arrivals)"
            if rec.goal == "goodput" else load_caption(sc.workload))
    table.caption = "; ".join(c for c in (load, "one row per layout, at its best max_num_seqs",
                                          f"$/Mtok at ${sc.cluster.usd_per_gpu_hour:g} per GPU-hour"
                                          if sc.cluster.usd_per_gpu_hour else None, uncertainty_caption(rows)) if c)
    console.print(table)
    front = Table(title=f"Pareto front: output tok/s per GPU against {rec.latency_metric}")
    for col in ("layout", "seqs", "per GPU", rec.latency_metric):
        front.add_column(col, justify="left" if col == "layout" else "right")
    for p in rec.pareto:
        front.add_row(p.layout.label(), str(p.knobs.max_num_seqs), f"{p.get('output_tok_s_per_gpu'):,.0f}",
                      f"{p.get(rec.latency_metric):,.3f} s")
    console.print(front)
    console.print("[b]Why[/b]")
    for line in rec.explanation:
        console.print(f"  - {line}", highlight=False)
    if rec.winner:
        console.print("[b]Deploy the winner[/b]")
        for cmd in serve_commands(sc.model, sc.cluster, rec.winner.layout, rec.winner.knobs):
            console.print(f"  {cmd}", highlight=False, soft_wrap=True)
