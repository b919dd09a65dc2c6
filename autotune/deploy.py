"""The vLLM command line that deploys a layout: what `recommend` prints and what the vLLM backend runs."""

from __future__ import annotations

import shlex

from autotune.spec.hardware import Cluster
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.models import ModelSpec


def engine_args(layout: Layout, knobs: EngineKnobs) -> list[str]:
    """vLLM engine flags for the layout and (resolved) knobs, vLLM defaults left out."""
    args = ["--tensor-parallel-size", str(layout.tp)]
    if layout.pp > 1:
        args += ["--pipeline-parallel-size", str(layout.pp)]
    if layout.dp > 1:
        args += ["--data-parallel-size", str(layout.dp)]
    if layout.ep > 1:
        args.append("--enable-expert-parallel")
    if knobs.max_num_seqs:
        args += ["--max-num-seqs", str(knobs.max_num_seqs)]
    if knobs.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(knobs.max_num_batched_tokens)]
    if knobs.max_model_len:
        args += ["--max-model-len", str(knobs.max_model_len)]
    args += ["--gpu-memory-utilization", f"{knobs.gpu_memory_utilization:g}"]
    if knobs.block_size != 16:
        args += ["--block-size", str(knobs.block_size)]
    if knobs.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", knobs.kv_cache_dtype]
    if not knobs.enable_chunked_prefill:
        args.append("--no-enable-chunked-prefill")
    if knobs.num_gpu_blocks_override:
        args += ["--num-gpu-blocks-override", str(knobs.num_gpu_blocks_override)]
    if knobs.async_scheduling is not None:
        args.append("--async-scheduling" if knobs.async_scheduling else "--no-async-scheduling")
    if knobs.api_server_count:
        args += ["--api-server-count", str(knobs.api_server_count)]
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
