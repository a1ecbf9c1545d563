"""`megalora plan`: per-GPU memory and step FLOPs of a config's parallel layout, before any GPU is rented.

Everything here is arithmetic on the HF `config.json` and the `Config` tree (pure functions);
`format_plan` renders one table. The model follows megatron-core's layout as megalora builds it:

Frozen weights (`torch_dtype`; `auto` = bf16 on GPU, fp32 on CPU; block-FP8 checkpoints are
    dequantized at load, so they count in this dtype too and their on-disk size is reported apart), per GPU:
    attention q/k/v/o, GDN in/out projections, conv1d, A_log, dt_bias, dense MLP and shared expert
    are split by TP; routed experts by EP (expert TP is 1); embedding and output layer by TP over
    the vocab padded to a multiple of TP; norms, QK-norms, routers and shared-expert gates are
    replicated. A tied output layer shares the embedding.
LoRA (`lora_dtype`), rank r on every target, per GPU: a column-parallel base keeps A [r, in]
    replicated and splits B [out/TP, r]; a row-parallel base splits A [r, in/TP] and keeps B
    [out, r]; routed-expert adapters (one A, B per expert) live with their experts (÷EP).
    `per_projection=False` (megatron's fused layers, as megalora trains: one adapter on q|k|v,
    on gate|up, on GDN qkvz|ba) or `True` (one per HF projection, peft's form, for comparison).
Gradients: one per LoRA element in `lora_dtype`. AdamW: two fp32 moments, plus an fp32 master
    copy when `lora_dtype` is not fp32. No distributed-optimizer sharding is assumed.
Activations (`act` = bf16 on GPU, the weight dtype on CPU), tokens T = micro_batch_size x
    max_length per micro-batch (full-length sequences: an upper bound), Ts = T/TP with sequence
    parallelism (residual, norms, router) else T; head-split tensors are [T, width/TP]. Per layer,
    per token, what backward keeps (see `_layer_activation_bytes`): both norm inputs; attention
    q/k before QK-norm, rotated q/k, v, core output, output gate, log-sum-exp (flash attention:
    no [s, s] scores); GDN conv input/output/activation, normalised q/k, z, g, beta, core output,
    the chunk kernel's [64]-wide intra-chunk matrix; MLP fc1 output; MoE router logits and
    probabilities (fp32), per routed token (Ts x top-k, balanced over EP) fc1 and fc2 outputs;
    every LoRA adapter's input (a copy in `lora_dtype` when that differs from `act`, one shared
    tensor otherwise) and its [tokens, r] intermediate.
    Recompute: none keeps every layer; `selective` recomputes core attention, which holds no
    [s, s] scores under flash attention, so it changes nothing here; `full` keeps each chunk's
    input [Ts, H] (uniform: chunks of recompute_num_layers; block: the first recompute_num_layers
    layers) and re-creates one chunk's activations during its backward. One more layer's worth
    is added as the backward working set (activation gradients of the layer in flight).
Logits: [T, vocab_padded/TP] in `act` plus an fp32 copy for the vocab-parallel cross entropy.
Communication buffers: with TP>1 and SP, one all-gathered [T, H] input and one reduce-scatter
    staging buffer (`act`); with EP>1, the all-to-all send and receive buffers [Ts x top-k, H].
Framework overhead (GPU only; 0 in CPU mode): CUDA context and kernel images 1.0 GiB, cuBLAS
    workspaces 0.25 GiB, NCCL communicators 0.5 GiB per parallel group that is > 1 (TP, DP, EP,
    expert-DP), and allocator fragmentation 10% of activations, logits and buffers.

Step FLOPs (whole model, one optimizer step of global_batch_size x max_length tokens):
    per token = 4 * P_active                   frozen GEMMs: forward + input gradient (2 + 2),
                                               no weight gradient; P_active counts the routed
                                               experts a token visits (top-k) and the LM head
              + 3 * 2 * n_heads * d_head * s   per full-attention layer, causal (average context
                                               s/2, QK^T and PV); backward = 2x forward
              + 3 * nv * (6 dk dv + 2*64*(dk + dv)) + 3 * 2 * K * conv_dim   per GDN layer
                                               (state read/update and intra-chunk products)
              + 6 * r * (in + out)             per LoRA adapter a token passes through
                                               (forward, input gradient, weight gradient)
    per GPU = step FLOPs / world size (an even split; real imbalance is not modelled).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from megalora.config import Config, ConfigError, ModelShape, check_layout
from megalora.train.model.hf_config import FULL_ATTENTION, HFModelSpec, padded_vocab_size, parse_hf_config

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The target names of megalora.train.lora.apply, repeated so that planning never imports megatron-core.
ALL_LINEAR = ("linear_qkv", "linear_proj", "in_proj", "out_proj", "linear_fc1", "linear_fc2")
ON_REQUEST = ("router", "shared_expert_gate", "output_layer")
GDN_CHUNK = 64  # the chunked gated-delta-rule kernel's block length
CUDA_CONTEXT_GIB = 1.0
CUBLAS_WORKSPACE_GIB = 0.25
NCCL_PER_GROUP_GIB = 0.5
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class Layout:
    """Parallel degrees of one run: DP = world / TP, expert-DP = world / EP."""
    world: int
    tp: int = 1
    ep: int = 1
    sp: bool = False

    @property
    def dp(self) -> int:
        return self.world // self.tp


@dataclass(frozen=True)
class Weight:
    """A frozen tensor family: `numel` elements in the whole model, `shard` says how a GPU splits it."""
    group: str
    numel: int
    shard: str  # "tp" | "ep" | "replicated"


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter (an A, B pair per copy) on a module named as in the megatron model."""
    name: str
    kind: str
    in_dim: int
    out_dim: int
    parallel: str  # "column" | "row" | "expert" | "replicated"
    copies: int = 1  # routed experts: one adapter per expert
    visits: float = 1.0  # adapter applications per token (top-k for routed experts)
    input_group: str = ""  # adapters that read the same tensor


def model_spec(hf_config: dict) -> HFModelSpec:
    """The typed model description of a config.json dict (errors name the key)."""
    return parse_hf_config(hf_config, path="config.json")


def _attention_dims(spec: HFModelSpec) -> tuple[int, int, int]:
    """(query|gate out, key/value out, output-projection in) of one full-attention layer."""
    q = spec.num_attention_heads * spec.head_dim * (2 if spec.attention_output_gate else 1)
    kv = spec.num_key_value_heads * spec.head_dim
    return q, kv, spec.num_attention_heads * spec.head_dim


def _gdn_dims(spec: HFModelSpec) -> dict[str, int]:
    key = spec.linear_num_key_heads * spec.linear_key_head_dim
    value = spec.linear_num_value_heads * spec.linear_value_head_dim
    return {"key": key, "value": value, "qkvz": 2 * key + 2 * value, "ba": 2 * spec.linear_num_value_heads,
            "conv": 2 * key + value}


def frozen_weights(spec: HFModelSpec, *, vocab: int) -> list[Weight]:
    """Every frozen tensor family of the model with `vocab` embedding rows (padded or not)."""
    h = spec.hidden_size
    out = [Weight("embedding", vocab * h, "tp"), Weight("norms", h, "replicated")]
    if not spec.tie_word_embeddings:
        out.append(Weight("output_layer", vocab * h, "tp"))
    for layer in range(spec.num_layers):
        out.append(Weight("norms", 2 * h, "replicated"))
        if spec.layer_types[layer] == FULL_ATTENTION:
            q, kv, o_in = _attention_dims(spec)
            out += [Weight("attention", h * (q + 2 * kv) + o_in * h, "tp"),
                    Weight("norms", 2 * spec.head_dim, "replicated")]
        else:
            g = _gdn_dims(spec)
            nv = spec.linear_num_value_heads
            out += [Weight("gdn", h * (g["qkvz"] + g["ba"]) + g["value"] * h + g["conv"] * spec.linear_conv_kernel_dim
                           + 2 * nv, "tp"),
                    Weight("norms", spec.linear_value_head_dim, "replicated")]
        if spec.moe_layers[layer]:
            e, f = spec.num_experts, spec.moe_ffn_hidden_size
            out += [Weight("routers + gates", e * h, "replicated"), Weight("routed_experts", e * 3 * h * f, "ep")]
            if spec.shared_expert_ffn_hidden_size:
                out += [Weight("shared_expert", 3 * h * spec.shared_expert_ffn_hidden_size, "tp"),
                        Weight("routers + gates", h, "replicated")]  # the shared expert's sigmoid gate
        else:
            out.append(Weight("dense_mlp", 3 * h * spec.ffn_hidden_size, "tp"))
    return out


def _projection_shapes(spec: HFModelSpec) -> list[tuple[int, int, int]]:
    """(rows, columns, count) of every projection weight in HF's on-disk layout: attention
    q/k/v/o, GDN in/out projections, routed experts (per expert), shared expert, dense MLP."""
    h, out = spec.hidden_size, []
    for layer in range(spec.num_layers):
        if spec.layer_types[layer] == FULL_ATTENTION:
            q, kv, o_in = _attention_dims(spec)
            out += [(q, h, 1), (kv, h, 2), (h, o_in, 1)]
        else:
            g = _gdn_dims(spec)
            out += [(g["qkvz"], h, 1), (g["ba"], h, 1), (h, g["value"], 1)]
        mlps = [(spec.ffn_hidden_size, 1)]
        if spec.moe_layers[layer]:
            mlps = [(spec.moe_ffn_hidden_size, spec.num_experts)]
            if spec.shared_expert_ffn_hidden_size:
                mlps.append((spec.shared_expert_ffn_hidden_size, 1))
        for f, count in mlps:
            out += [(f, h, 2 * count), (h, f, count)]
    return out


def fp8_checkpoint_bytes(spec: HFModelSpec) -> int:
    """Bytes of a block-FP8 checkpoint's tensors on disk, laid out as Qwen's -FP8 releases are:
    every projection weight in float8 (1 byte) plus one float32 scale per block, everything
    else (embeddings, LM head, norms, routers, GDN conv/A_log/dt_bias) in bf16."""
    assert spec.quantization is not None
    bm, bn = spec.quantization.block
    fp8 = sum(r * c * n for r, c, n in _projection_shapes(spec))
    scales = sum(-(-r // bm) * -(-c // bn) * n for r, c, n in _projection_shapes(spec))
    return fp8 + 4 * scales + 2 * (num_params(spec) - fp8)


def num_params(spec: HFModelSpec) -> int:
    """Parameters of the HF model (unpadded vocab): what `sum(p.numel())` gives in transformers."""
    return sum(w.numel for w in frozen_weights(spec, vocab=spec.vocab_size))


def _split(numel: int, shard: str, layout: Layout, *, what: str) -> int:
    degree = {"tp": layout.tp, "ep": layout.ep, "replicated": 1}[shard]
    if numel % degree:
        raise ValueError(f"{what}: {numel} elements do not split evenly over {shard.upper()}={degree}")
    return numel // degree


def _targets(target_modules: Sequence[str]) -> set[str]:
    chosen = set(target_modules)
    unknown = chosen - set(ALL_LINEAR + ON_REQUEST + ("all-linear",))
    if unknown:
        raise ConfigError(f"`target_modules`: unknown {sorted(unknown)}; allowed: all-linear, "
                          f"{', '.join(ALL_LINEAR + ON_REQUEST)}")
    if "all-linear" in chosen:
        chosen = (chosen - {"all-linear"}) | set(ALL_LINEAR)
    return chosen


def lora_adapters(spec: HFModelSpec, *, lora: Any, padded_vocab: int, per_projection: bool = False) -> list[Adapter]:
    """Every LoRA adapter the config's targets select (`lora` is a `LoraSection`).

    Selection follows `megalora.train.lora.apply`: a target name matches a module's last name
    component, `target_regex` is searched in the full megatron module name, `exclude_modules`
    are substrings of it."""
    targets = _targets(lora.target_modules)
    try:
        regex = re.compile(lora.target_regex) if lora.target_regex else None
    except re.error as err:
        raise ConfigError(f"`target_regex`: invalid regular expression ({err})") from None
    split = per_projection
    h = spec.hidden_size
    chosen: list[Adapter] = []

    def layer_of(name: str) -> str:
        return ".".join(name.split(".")[:3])

    def add(name: str, short: str, pieces: list[tuple[str, int, int]], parallel: str, group: str, **kw: Any) -> None:
        if any(ex in name for ex in lora.exclude_modules or []):
            return
        if short in targets or (regex is not None and regex.search(name)):
            for kind, d_in, d_out in pieces:
                chosen.append(Adapter(name, kind, d_in, d_out, parallel, input_group=f"{layer_of(name)}:{group}", **kw))

    for layer in range(spec.num_layers):
        pre = f"decoder.layers.{layer}"
        if spec.layer_types[layer] == FULL_ATTENTION:
            q, kv, o_in = _attention_dims(spec)
            qkv = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv)] if split else [("linear_qkv", h, q + 2 * kv)]
            add(f"{pre}.self_attention.linear_qkv", "linear_qkv", qkv, "column", "in")
            add(f"{pre}.self_attention.linear_proj", "linear_proj", [("linear_proj", o_in, h)], "row", "out")
        else:
            g = _gdn_dims(spec)
            pieces = [("in_proj_qkvz", h, g["qkvz"]), ("in_proj_ba", h, g["ba"])] if split \
                else [("in_proj", h, g["qkvz"] + g["ba"])]
            add(f"{pre}.self_attention.in_proj", "in_proj", pieces, "column", "in")
            add(f"{pre}.self_attention.out_proj", "out_proj", [("out_proj", g["value"], h)], "row", "out")
        mlps: list[tuple[str, int, str]] = []
        if spec.moe_layers[layer]:
            e, f = spec.num_experts, spec.moe_ffn_hidden_size
            for short, d_in, d_out in (("linear_fc1", h, 2 * f), ("linear_fc2", f, h)):
                add(f"{pre}.mlp.experts.{short}", short, [(f"experts.{short}", d_in, d_out)], "expert",
                    "expert_in" if short == "linear_fc1" else "expert_mid", copies=e, visits=float(spec.moe_topk))
            add(f"{pre}.mlp.router", "router", [("router", h, e)], "replicated", "mlp_in")
            if spec.shared_expert_ffn_hidden_size:
                mlps.append((f"{pre}.mlp.shared_experts", spec.shared_expert_ffn_hidden_size, "shared_expert"))
                add(f"{pre}.mlp.shared_experts.gate", "shared_expert_gate", [("shared_expert_gate", h, 1)],
                    "replicated", "mlp_in")
        else:
            mlps.append((f"{pre}.mlp", spec.ffn_hidden_size, "mlp"))
        for base, f, label in mlps:
            fc1 = ([(f"{label}.gate_proj", h, f), (f"{label}.up_proj", h, f)] if split
                   else [(f"{label}.linear_fc1", h, 2 * f)])
            add(f"{base}.linear_fc1", "linear_fc1", fc1, "column", "mlp_in")
            add(f"{base}.linear_fc2", "linear_fc2", [(f"{label}.linear_fc2", f, h)], "row", "mid")
    add("output_layer", "output_layer", [("output_layer", h, padded_vocab)], "column", "final")
    return chosen


def lora_numel(adapters: Sequence[Adapter], *, rank: int, layout: Layout | None = None) -> int:
    """LoRA elements in the whole model (`layout` None) or on one GPU of `layout`."""
    total = 0
    for a in adapters:
        a_in, b_out, copies = a.in_dim, a.out_dim, a.copies
        if layout is not None:
            if a.parallel == "column":
                b_out = _split(b_out, "tp", layout, what=f"LoRA B of {a.name}")
            elif a.parallel == "row":
                a_in = _split(a_in, "tp", layout, what=f"LoRA A of {a.name}")
            elif a.parallel == "expert":
                copies = _split(copies, "ep", layout, what=f"experts of {a.name}")
        total += copies * rank * (a_in + b_out)
    return total


@dataclass(frozen=True)
class Precision:
    """Bytes per element of frozen weights, activations and LoRA tensors; `gpu` adds framework overhead."""
    weight: int
    act: int
    lora: int
    gpu: bool


def precision(cfg: Config, *, device: str) -> Precision:
    """Dtype sizes as configured: `torch_dtype` auto is bf16 on `gpu` and fp32 on `cpu`."""
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be gpu or cpu, got {device!r}")
    name = cfg.model.torch_dtype
    if name == "auto":
        name = "bfloat16" if device == "gpu" else "float32"
    weight = DTYPE_BYTES[name]
    return Precision(weight=weight, act=weight, lora=DTYPE_BYTES[cfg.lora.lora_dtype], gpu=device == "gpu")


def _layer_activation_bytes(spec: HFModelSpec, layer: int, adapters: Sequence[Adapter], *, layout: Layout,
                            tokens: int, prec: Precision, rank: int) -> float:
    """What backward keeps of one layer on one GPU, computed forward once (no recompute)."""
    a, f32, tp, h = prec.act, 4, layout.tp, spec.hidden_size
    ts = tokens / tp if layout.sp else tokens
    total = ts * 2 * h * a  # inputs of both norms (the residual stream)
    if spec.layer_types[layer] == FULL_ATTENTION:
        n, g, d = spec.num_attention_heads / tp, spec.num_key_value_heads / tp, spec.head_dim
        # q, k before QK-norm, rotated q, k, v, core output (+ the sigmoid gate when gated)
        width = (4 if spec.attention_output_gate else 3) * n * d + 3 * g * d
        total += tokens * (width * a + n * f32)  # + flash attention's log-sum-exp
    else:
        gd, nv = _gdn_dims(spec), spec.linear_num_value_heads / tp
        # conv input, conv output, activated q|k|v, l2-normed q, k, z, core output
        width = (3 * gd["conv"] + 2 * gd["key"] + 2 * gd["value"]) / tp
        total += tokens * (width * a + (2 * nv + GDN_CHUNK * nv) * f32)  # g, beta, intra-chunk matrix
    if spec.moe_layers[layer]:
        routed = ts * spec.moe_topk  # balanced over EP: each rank computes what it sends
        total += ts * 2 * spec.num_experts * f32  # router logits and probabilities
        total += routed * (2 * spec.moe_ffn_hidden_size + h) * a  # fc1 output (SwiGLU input), fc2 output
        if spec.shared_expert_ffn_hidden_size:
            total += tokens * 2 * spec.shared_expert_ffn_hidden_size / tp * a + ts * (h + 1) * a
    else:
        total += tokens * 2 * spec.ffn_hidden_size / tp * a
    seen: set[str] = set()
    for ad in adapters:
        if ad.parallel == "expert":
            visits, width = ts * spec.moe_topk, ad.in_dim
        elif ad.parallel == "row":
            visits, width = tokens, ad.in_dim / tp
        else:  # column and replicated adapters read the sequence-parallel shard
            visits, width = ts, ad.in_dim
        total += visits * rank * prec.lora  # x A^T, kept for B's gradient
        if prec.lora != prec.act:
            total += visits * width * prec.lora  # each adapter casts (and keeps) its own copy
        elif ad.input_group not in seen:
            seen.add(ad.input_group)
            total += visits * width * a
    return total


def activation_bytes(spec: HFModelSpec, *, adapters: Sequence[Adapter], cfg: Config, layout: Layout,
                     prec: Precision) -> dict[str, float]:
    """Peak activation bytes on one GPU for one micro-batch, under the recompute settings."""
    t = cfg.train
    tokens = t.micro_batch_size * cfg.data.max_length
    ts = tokens / layout.tp if layout.sp else tokens
    by_layer: dict[str, list[Adapter]] = {}
    for ad in adapters:
        by_layer.setdefault(".".join(ad.name.split(".")[:3]), []).append(ad)
    per_layer = [_layer_activation_bytes(spec, i, by_layer.get(f"decoder.layers.{i}", []), layout=layout,
                                         tokens=tokens, prec=prec, rank=cfg.lora.lora_rank)
                 for i in range(spec.num_layers)]
    chunk_input = ts * spec.hidden_size * prec.act
    num = len(per_layer)
    if t.recompute_granularity == "full":
        k = t.recompute_num_layers or 1
        if t.recompute_method == "block":
            k = min(k, num)
            stored = k * chunk_input + sum(per_layer[k:]) + (max(per_layer[:k]) if k else 0.0)
        else:
            chunks = [per_layer[i:i + k] for i in range(0, num, k)]
            stored = len(chunks) * chunk_input + max(sum(c) for c in chunks)
    else:
        stored = sum(per_layer)
    final = ts * spec.hidden_size * prec.act  # the final norm's input
    final += sum(ts * (cfg.lora.lora_rank + ad.in_dim) * prec.lora for ad in by_layer.get("output_layer", []))
    return {"layers": stored + final, "backward working set": max(per_layer)}


def memory_plan(cfg: Config, *, hf_config: dict, num_gpus: int, device: str = "gpu",
                per_projection: bool = False) -> dict[str, Any]:
    """Per-GPU bytes of every component (see the module docstring for what each one counts)."""
    spec = model_spec(hf_config)
    if cfg.model.num_layers is not None:
        spec = spec.truncated(cfg.model.num_layers)
    p = cfg.parallel
    shape = ModelShape(num_experts=spec.num_experts or 0, num_attention_heads=spec.num_attention_heads,
                       num_query_groups=spec.num_key_value_heads,
                       num_linear_key_heads=spec.linear_num_key_heads or 0,
                       num_linear_value_heads=spec.linear_num_value_heads or 0, source="config.json")
    degrees = check_layout(cfg, world_size=num_gpus, shape=shape)
    layout = Layout(world=num_gpus, tp=p.tensor_model_parallel_size, ep=p.expert_model_parallel_size,
                    sp=p.sequence_parallel and p.tensor_model_parallel_size > 1)
    prec = precision(cfg, device=device)
    padded = padded_vocab_size(spec.vocab_size, tp=layout.tp)
    weights: dict[str, float] = {}
    for w in frozen_weights(spec, vocab=padded):
        weights[w.group] = weights.get(w.group, 0) + _split(w.numel, w.shard, layout, what=w.group) * prec.weight
    adapters = lora_adapters(spec, lora=cfg.lora, padded_vocab=padded, per_projection=per_projection)
    lora_local = lora_numel(adapters, rank=cfg.lora.lora_rank, layout=layout)
    tokens = cfg.train.micro_batch_size * cfg.data.max_length
    ts = tokens / layout.tp if layout.sp else tokens
    acts = activation_bytes(spec, adapters=adapters, cfg=cfg, layout=layout, prec=prec)
    comm = 0.0
    if layout.sp:
        comm += 2 * tokens * spec.hidden_size * prec.act  # all-gather output + reduce-scatter staging
    if layout.ep > 1 and spec.is_moe:
        comm += 2 * ts * spec.moe_topk * spec.hidden_size * prec.act  # all-to-all send + receive
    components: dict[str, float] = {f"frozen {k}": v for k, v in weights.items()}
    components["LoRA weights"] = lora_local * prec.lora
    components["LoRA gradients"] = lora_local * prec.lora
    components["AdamW states"] = lora_local * (8 if prec.lora == 4 else 12)
    components["activations"] = acts["layers"]
    components["backward working set"] = acts["backward working set"]
    components["logits + loss"] = tokens * padded / layout.tp * (prec.act + 4)
    components["communication buffers"] = comm
    if prec.gpu:
        groups = sum(1 for d in (layout.tp, layout.dp, layout.ep, num_gpus // layout.ep) if d > 1)
        components["CUDA context + cuBLAS"] = (CUDA_CONTEXT_GIB + CUBLAS_WORKSPACE_GIB) * GIB
        components["NCCL communicators"] = groups * NCCL_PER_GROUP_GIB * GIB
        dynamic = acts["layers"] + acts["backward working set"] + components["logits + loss"] + comm
        components["allocator fragmentation"] = FRAGMENTATION * dynamic
    disk = fp8_checkpoint_bytes(spec) if spec.quantization is not None else None
    return {"spec": spec, "layout": layout, "degrees": degrees, "precision": prec, "padded_vocab": padded,
            "fp8_disk_bytes": disk,
            "adapters": adapters, "lora_params_total": lora_numel(adapters, rank=cfg.lora.lora_rank),
            "lora_params_per_gpu": lora_local, "components": components, "total": sum(components.values())}


def active_gemm_params(spec: HFModelSpec, *, vocab: int) -> int:
    """Frozen GEMM weights one token multiplies with (top-k routed experts, LM head included)."""
    h = spec.hidden_size
    total = vocab * h
    for layer in range(spec.num_layers):
        if spec.layer_types[layer] == FULL_ATTENTION:
            q, kv, o_in = _attention_dims(spec)
            total += h * (q + 2 * kv) + o_in * h
        else:
            g = _gdn_dims(spec)
            total += h * (g["qkvz"] + g["ba"]) + g["value"] * h
        if spec.moe_layers[layer]:
            total += spec.num_experts * h + spec.moe_topk * 3 * h * spec.moe_ffn_hidden_size
            if spec.shared_expert_ffn_hidden_size:
                total += 3 * h * spec.shared_expert_ffn_hidden_size + h
        else:
            total += 3 * h * spec.ffn_hidden_size
    return total


def step_flops(spec: HFModelSpec, *, adapters: Sequence[Adapter], cfg: Config, num_gpus: int,
               padded_vocab: int) -> dict[str, float]:
    """FLOPs of one optimizer step by the formula in the module docstring (whole model and per GPU)."""
    s, r = cfg.data.max_length, cfg.lora.lora_rank
    per_token = {"frozen GEMMs (fwd + input grad)": 4.0 * active_gemm_params(spec, vocab=padded_vocab),
                 "attention (fwd + bwd)": 0.0, "GDN (fwd + bwd)": 0.0}
    for layer in range(spec.num_layers):
        if spec.layer_types[layer] == FULL_ATTENTION:
            per_token["attention (fwd + bwd)"] += 3 * 2 * spec.num_attention_heads * spec.head_dim * s
        else:
            dk, dv, g = spec.linear_key_head_dim, spec.linear_value_head_dim, _gdn_dims(spec)
            fwd = spec.linear_num_value_heads * (6 * dk * dv + 2 * GDN_CHUNK * (dk + dv))
            per_token["GDN (fwd + bwd)"] += 3 * fwd + 3 * 2 * spec.linear_conv_kernel_dim * g["conv"]
    per_token["LoRA (fwd + bwd)"] = sum(6.0 * r * (a.in_dim + a.out_dim) * a.visits for a in adapters)
    tokens = cfg.train.global_batch_size * s
    total = sum(per_token.values()) * tokens
    return {"per_token": per_token, "tokens_per_step": tokens, "step": total, "per_gpu": total / num_gpus}


def format_plan(memory: dict[str, Any], *, flops: dict[str, float],
                gpu_memory_gb: Sequence[float] = (80, 141)) -> str:
    """One table: component -> GiB per GPU, the total, and fits / does not fit per GPU size.

    A GPU of N GB is taken to hold N GiB (nvidia-smi shows 79.6 GiB on an 80 GB H100 and 140.4 GiB
    on a 141 GB H200); the framework overhead rows cover what the driver keeps."""
    lay, spec, prec = memory["layout"], memory["spec"], memory["precision"]
    lines = [f"model: {spec.model_type}, {spec.num_layers} layers, hidden {spec.hidden_size}"
             + (f", {spec.num_experts} experts top-{spec.moe_topk}" if spec.is_moe else ""),
             f"layout: {lay.world} GPUs, TP={lay.tp} EP={lay.ep} DP={lay.dp} SP={'on' if lay.sp else 'off'}; "
             f"grad accumulation {memory['degrees']['grad_accum']}",
             f"dtypes (bytes): weights {prec.weight}, activations {prec.act}, LoRA {prec.lora}; "
             f"vocab padded to {memory['padded_vocab']}",
             f"LoRA parameters: {memory['lora_params_total']:,} in all, {memory['lora_params_per_gpu']:,} per GPU"]
    if memory["fp8_disk_bytes"] is not None:
        lines.append(f"checkpoint: {spec.quantization.describe()}, {memory['fp8_disk_bytes'] / GIB:.2f} GiB on disk; "
                     f"dequantized at load, the frozen rows below count {prec.weight} bytes per weight")
    lines += ["", f"{'component':<34}{'GiB per GPU':>12}"]
    for name, value in memory["components"].items():
        lines.append(f"{name:<34}{value / GIB:>12.3f}")
    total = memory["total"] / GIB
    lines += [f"{'total':<34}{total:>12.3f}", ""]
    for gb in gpu_memory_gb:
        margin = gb - total
        verdict = f"fits, {margin:.1f} GiB to spare" if margin >= 0 else f"does not fit, {-margin:.1f} GiB short"
        lines.append(f"{gb:g} GB GPU: {verdict}")
    lines += ["", f"step FLOPs ({flops['tokens_per_step']:,} tokens): {flops['step'] / 1e15:.3f} PFLOP, "
              f"{flops['per_gpu'] / 1e12:.2f} TFLOP per GPU"]
    for name, value in flops["per_token"].items():
        lines.append(f"  per token, {name}: {value / 1e9:.3f} GFLOP")
    return "\n".join(lines)


def plan_main(cfg: Config, *, num_gpus: int, hf_config: dict, gpu_memory_gb: Sequence[float] = (80, 141)) -> str:
    """`megalora plan CONFIG`: the rendered plan of `cfg` on `num_gpus` GPUs for the model in `hf_config`."""
    if num_gpus < 1:
        raise ConfigError(f"--num_gpus must be >= 1; got {num_gpus}")
    memory = memory_plan(cfg, hf_config=hf_config, num_gpus=num_gpus, device="gpu")
    flops = step_flops(memory["spec"], adapters=memory["adapters"], cfg=cfg, num_gpus=num_gpus,
                       padded_vocab=memory["padded_vocab"])
    return format_plan(memory, flops=flops, gpu_memory_gb=gpu_memory_gb)
