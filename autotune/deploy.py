"""The vLLM command line that deploys a layout: what `recommend` prints and what the vLLM backend runs."""

from __future__ import annotations

import shlex

from autotune.spec.hardware import Cluster
from autotune.spec.layout import ALWAYS, EngineKnobs, Layout, knob_fields
from autotune.spec.models import ModelSpec


def engine_args(layout: Layout, knobs: EngineKnobs) -> list[str]:
    """vLLM engine flags for the layout and (resolved) knobs; a knob at vLLM's own default is left out."""
    args = ["--tensor-parallel-size", str(layout.tp)]
    if layout.pp > 1:
        args += ["--pipeline-parallel-size", str(layout.pp)]
    if layout.dp > 1:
        args += ["--data-parallel-size", str(layout.dp)]
    if layout.ep > 1:
        args.append("--enable-expert-parallel")
    for f in knob_fields():
        value, flag = getattr(knobs, f.name), f.metadata["flag"]
        if value is None or (f.metadata["omit_at"] is not ALWAYS and value == f.metadata["omit_at"]):
            continue
        if isinstance(value, bool):
            args.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def model_target(model: ModelSpec) -> str:
    """What `vllm serve` loads: the local directory the model was read from, else its Hub id, else its name."""
    return model.source or model.hf_id or model.name


def serve_commands(model: ModelSpec, cluster: Cluster, layout: Layout, knobs: EngineKnobs) -> list[str]:
    """One complete command per node, each pasteable as is once HEAD_IP is exported (vLLM's multi-node docs): the
    head's first, then each other node's with its numbers filled in; a comment at the end of each says where it
    runs."""
    base = ["vllm", "serve", model_target(model), *engine_args(layout, knobs)]
    per_node = cluster.gpus_per_node
    if layout.world_size <= per_node:
        return [shlex.join(base)]
    nodes = -(-layout.world_size // per_node)
    if layout.gpus_per_replica > per_node:
        # A replica spans nodes: vLLM's Ray executor over a Ray cluster started on every node.
        return (["ray start --head --port 6379   # node 0 (head)"]
                + [f'ray start --address "$HEAD_IP:6379"   # node {n}' for n in range(1, nodes)]
                + [shlex.join(base + ["--distributed-executor-backend", "ray"]) + "   # node 0 (head), once all joined"])
    local = per_node // layout.gpus_per_replica
    common = ["--data-parallel-size-local", str(local), "--data-parallel-address", "$HEAD_IP",
              "--data-parallel-rpc-port", "13345"]

    def line(args: list[str], where: str) -> str:
        # $HEAD_IP stays a shell variable: quoted for the shell, expanded there.
        return shlex.join(args).replace("'$HEAD_IP'", '"$HEAD_IP"') + f"   # {where}"
    return ([line(base + common, "node 0 (head)")]
            + [line(base + common + ["--data-parallel-start-rank", str(n * local), "--headless"], f"node {n}")
               for n in range(1, nodes)])
