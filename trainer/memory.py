"""GPU memory model: what one training process holds, per GPU, for every experiment YAML.

One function, `estimate`, turns a `TrainingPlan` (model shape, method, precision, ZeRO stage,
batch tokens, checkpointing) into a `MemoryEstimate` of bytes by kind: weights, gradients,
optimizer states, communication/cast buffers, activations and logits, plus what DeepSpeed
offloads to host RAM. `plan_for_experiment` builds the plan from an experiment YAML (its
hyperparameters, slots and DeepSpeed config), so the figure in every GPU YAML's header, the GPU
table in benchmarks/README.md (`markdown_table`) and the token budgets all come from here, and
tests/test_memory_model.py fails when a YAML's comment drifts from it by more than 10%.

Run it: ``text2sql memory experiments/<x>.yaml [--gpu-gb 80]`` (breakdown, the GPU it needs and
the largest token budget per micro-batch that fits).

What is counted (B = bytes, P = parameters, N = data-parallel ranks, h/I/L = hidden size,
MLP width, layers; kv = key/value width = kv heads x head dim):

- **Full fine-tune, DDP / one GPU** (torch AdamW): weights, gradients and both Adam moments in
  the module's dtype (fp32 master weights: 4 + 4 + 8 = 16 B/P); DDP adds its gradient buckets
  (a second copy of the gradients: ``gradient_as_bucket_view`` is off in the HF Trainer); bf16
  autocast over fp32 weights caches a bf16 copy of every weight for the forward (2 B/P).
- **DeepSpeed ZeRO (bf16)**: 16-bit weights 2 B/P (stage 3: / N), a 16-bit gradient
  partition 2/N B/P, fp32 master weights + Adam moments 12/N B/P (stage 2 + CPU offload:
  on the host instead, with the fp32 gradient partition: 16 B/P per node);
  the reduce buckets (``reduce_bucket_size`` elements, twice with ``overlap_comm``); stage 3
  also the gathered parameters (at most ``stage3_max_live_parameters``). The fp32 gradient
  partition (4/N B/P) exists only during the optimizer step, when activations are freed, so
  the peak is the larger of the two moments. DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs``) count it on top: 2 + 18/N.
- **LoRA**: the frozen base in its dtype (2 B/P bf16) + adapters in fp32 (weight 4, grad 4,
  AdamW 8 = 16 B per adapter parameter; 8-bit AdamW 2 B instead of 8).
- **QLoRA (NF4, double quantization)**: decoder linears 4 bit + one 8-bit absmax per 64
  weights + one fp32 constant per 256 blocks (0.516 B/P); embeddings, LM head and norms stay in
  the compute dtype (bf16: the trainer keeps them there, trainer/modeling.py).
- **Activations** per token per layer kept for backward (`activation_bytes`; checked against
  what autograd saves, on CPU): RMSNorm's fp32 copy of its input (and its output when the norm
  trains), SDPA's q, k, v, output and log-sum-exp, o_proj's input, the MLP's gate, up,
  SiLU(gate) and product; under autocast over fp32 weights a bf16 copy of each linear's input;
  K/V repeated to every query head when SDPA gets a padding mask (segment attention, for
  prefix sharing and packing, and FlashAttention keep them grouped);
  for LoRA the adapters' inputs and rank-r outputs instead of the frozen linears' inputs, and
  dropout masks. With activation checkpointing: each layer's input (h in the residual dtype)
  and one layer recomputed. Layers below the lowest adapter (``lora.last_layers``) keep
  nothing. Attention scores are never materialised (SDPA's fused kernels).
- **Logits**: the trainer projects only completion positions onto the vocabulary
  (``logits_to_keep``); per such position 10 B x vocab in bf16 (the fp32 log-softmax that
  cross-entropy keeps, its gradient, the logits' gradient). ``COMPLETION_FRACTION`` of the
  batch's tokens is assumed to be completion, an upper bound for these data sets. Liger's
  fused linear cross-entropy keeps none of it.

Not counted: the CUDA context and cuBLAS workspaces (~0.5-1 GB outside PyTorch's allocator,
`nvidia-smi` shows them), allocator fragmentation, and evaluation-time generation (its KV cache
is small next to training: ``generation_kv_bytes``). `gpu_needed` keeps 10% headroom for them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from dataset_utils.errors import UserError
from trainer.config import parse_hyperparameters

GB = 1e9
# Share of a micro-batch's tokens that are completions (the SQL): the positions projected onto
# the vocabulary. Measured on the tokenized data (chatml): sql-create-context rows are ~24%
# SQL, Spider rows ~12%; half is a safe upper bound.
COMPLETION_FRACTION = 0.5
# NF4 with double quantization: 4 bits + 8-bit absmax per 64-weight block + fp32 per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
GPU_SIZES_GB = (16, 24, 40, 48, 80, 141)
HEADROOM = 0.9  # usable share of a GPU's memory (CUDA context, fragmentation)

# The real configs (config.json on the Hub) of the models the experiments name, so estimates
# and benchmarks/gpu_check.py need no Hub access. Keys are the names used in the YAMLs.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    },
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    },
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    },
    "HuggingFaceTB/SmolLM2-360M-Instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    },
}
MODEL_CONFIGS["embedded:smollm2-135m-instruct"] = MODEL_CONFIGS[
    "HuggingFaceTB/SmolLM2-135M-Instruct"
]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama/Mistral-style decoder that memory depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or a config.json-style dict."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = int(get("num_attention_heads"))
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * (self.hidden_size // self.num_heads)

    def layer_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer."""
        h, kv, i = self.hidden_size, self.kv_width, self.intermediate_size
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.layer_linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding + LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.layer_linear_params

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, r: int, targets: Any = "all-linear", layers: int | None = None) -> int:
        shapes = self.layer_linear_shapes()
        names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
        per_layer = sum(r * (shapes[n][0] + shapes[n][1]) for n in names)
        return per_layer * (self.num_layers if layers is None else layers)

    def generation_kv_bytes(self, rows: int, tokens: int, dtype_bytes: int = 2) -> int:
        """KV cache of ``rows`` sequences of ``tokens`` (validation generation)."""
        return 2 * self.num_layers * self.kv_width * dtype_bytes * rows * tokens


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the memory of one training process depends on."""

    model: ModelShape
    method: str = "full"  # full | lora | qlora
    weight_bytes: int = 2  # the module's dtype as loaded: 4 (fp32) or 2 (bf16)
    compute_bytes: int = 2  # matmul/activation dtype: 2 under bf16 autocast, else weight_bytes
    world_size: int = 1
    zero_stage: int = 0  # 0: no DeepSpeed (one GPU or DDP)
    offload_optimizer: bool = False
    optimizer_bytes: int = 8  # per trainable parameter: AdamW fp32 moments 8, 8-bit AdamW 2
    lora_r: int = 16
    lora_targets: Any = "all-linear"
    lora_layers: int | None = None  # lora.last_layers
    lora_dropout: float = 0.0
    tokens: int = 4096  # tokens per micro-batch per GPU (padding included)
    completion_fraction: float = COMPLETION_FRACTION
    checkpointing: str = "true"  # true | false | auto
    checkpointing_min_tokens: int = 1536
    expand_kv: bool = False  # sdpa with a 4-D mask repeats grouped K/V heads
    fused_lm_loss: bool = False  # Liger's fused linear cross-entropy: no logits kept
    reduce_bucket: int = 0  # elements (ZeRO)
    overlap_comm: bool = False
    max_live_params: int = 0  # elements gathered at once (ZeRO-3)


@dataclass
class MemoryEstimate:
    """Bytes per GPU by kind; ``host`` is pinned CPU RAM per node (offloaded state)."""

    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    logits: float
    step_transient: float = 0.0  # only during the optimizer step (activations freed by then)
    host: float = 0.0
    trainable: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def state(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def total(self) -> float:
        return max(self.state + self.activations + self.logits, self.state + self.step_transient)

    def summary(self) -> str:
        parts = [
            f"weights {self.weights / GB:.2f}",
            f"grads {self.gradients / GB:.2f}",
            f"optimizer {self.optimizer / GB:.2f}",
            f"buffers {self.buffers / GB:.2f}",
            f"activations {self.activations / GB:.2f}",
            f"logits {self.logits / GB:.2f}",
        ]
        out = f"{self.total / GB:.1f} GB per GPU ({', '.join(parts)} GB)"
        if self.host:
            out += f"; {self.host / GB:.1f} GB pinned host RAM per node"
        return out


def activation_bytes(plan: TrainingPlan, tokens: int, checkpointing: bool) -> float:
    """Bytes of activations kept for backward for a micro-batch of ``tokens`` tokens.

    Per layer and token, from what autograd saves (checked against ``saved_tensors_hooks`` on
    CPU in tests/test_memory_model.py): RMSNorm keeps an fp32 copy of its input (and its
    output when its weight trains); SDPA keeps q, k, v, its output and the log-sum-exp; o_proj
    its input; the MLP gate, up, SiLU(gate) and their product. Frozen linears keep nothing;
    each LoRA adapter keeps its (cast) input and its rank-r output.
    """
    m = plan.model
    h, kv, inter, r = m.hidden_size, m.kv_width, m.intermediate_size, plan.lora_r
    act = plan.compute_bytes
    resid = plan.weight_bytes if plan.method != "qlora" else plan.compute_bytes
    attn = act * (2 * h + 2 * kv) + 4 * m.num_heads
    if plan.expand_kv:  # SDPA with a mask gets K/V repeated to every query head
        attn += act * 2 * (h - kv)
    layers = m.num_layers
    if plan.method == "full":
        norm = (4 + resid) * h
        per_layer = 2 * norm + attn + act * (h + 4 * inter)
        if resid != act:  # autocast: q, k, v, gate and up each keep a bf16 copy of their input
            per_layer += act * 5 * h
    else:
        norm = 4 * h
        per_layer = 2 * norm + attn + act * 3 * inter + act * 7 * r
        # The adapters' inputs: peft casts each one to the adapters' fp32 (and autocast back
        # to bf16), so q, k, v (and gate, up) keep separate copies unless nothing is cast.
        shared = plan.weight_bytes == 4 and act == 4 and plan.lora_dropout == 0
        per_layer += act * ((3 * h + inter) if shared else (6 * h + inter))
        if plan.lora_dropout > 0:  # dropout's masks: bool on CUDA (CPU keeps fp32 ones)
            per_layer += 1 * (6 * h + inter)
        if plan.lora_layers is not None:
            layers = plan.lora_layers  # below the lowest adapter nothing needs a gradient
    if checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; one layer is recomputed.
        return tokens * (layers * resid * h + per_layer + norm)
    return tokens * (layers * per_layer + norm)


def logits_bytes(plan: TrainingPlan, tokens: int) -> float:
    """The loss's peak at the completion positions: cross-entropy keeps the fp32 log-softmax
    (4 B x vocab); backward adds its gradient (4 B) and the logits' own (compute dtype)."""
    if plan.fused_lm_loss:
        return 0.0
    per = 4 + 4 + plan.compute_bytes
    return tokens * plan.completion_fraction * plan.model.vocab_size * per


def _checkpointing_on(plan: TrainingPlan, tokens: int) -> bool:
    if plan.checkpointing == "auto":
        return tokens > plan.checkpointing_min_tokens
    return plan.checkpointing == "true"


def estimate(plan: TrainingPlan) -> MemoryEstimate:
    """Per-GPU bytes for ``plan`` (see the module docstring for what each term is)."""
    m, n = plan.model, max(1, plan.world_size)
    notes: list[str] = []
    host = 0.0
    step = 0.0
    buffers = 0.0
    if plan.method == "full":
        p = m.params
        trainable = p
        if plan.zero_stage == 0:
            weights = plan.weight_bytes * p
            grads = plan.weight_bytes * p
            # torch AdamW keeps its moments in the parameters' dtype.
            optim = (plan.optimizer_bytes if plan.weight_bytes == 4 else plan.weight_bytes * 2) * p
            if n > 1:
                buffers += plan.weight_bytes * p
                notes.append("DDP gradient buckets: a second copy of the gradients")
            if plan.compute_bytes < plan.weight_bytes:
                buffers += plan.compute_bytes * p
                notes.append("autocast keeps a bf16 copy of every weight during forward")
        elif plan.zero_stage in (2, 3):
            weights = 2 * p / (n if plan.zero_stage == 3 else 1)
            grads = 2 * p / n
            optim = 12 * p / n
            if plan.offload_optimizer:
                host = 16 * p  # the node's ranks: fp32 master + moments + fp32 gradients
                optim = 0.0
                grads = 0.0  # reduced straight into the pinned host partition
                notes.append("fp32 master weights, gradients and AdamW moments on the host")
            else:
                step = 4 * p / n  # the fp32 gradient partition, during the optimizer step
            buffers += plan.reduce_bucket * 2 * (2 if plan.overlap_comm else 1)
            if plan.zero_stage == 3:
                buffers += 2 * min(plan.max_live_params or p, p)
                notes.append("ZeRO-3 gathered parameters: min(stage3_max_live_parameters, P)")
        else:
            raise ValueError(f"ZeRO stage {plan.zero_stage} is not modelled (0, 2 or 3)")
    elif plan.method in ("lora", "qlora"):
        if plan.zero_stage:
            raise ValueError("(Q)LoRA under DeepSpeed is not modelled")
        a = m.lora_params(plan.lora_r, plan.lora_targets, plan.lora_layers)
        trainable = a
        if plan.method == "qlora":
            weights = NF4_BYTES_PER_PARAM * m.linear_params + plan.compute_bytes * (
                m.embedding_params + m.norm_params
            )
        else:
            weights = plan.weight_bytes * m.params
        weights += 4 * a  # adapters in fp32
        grads = 4 * a
        optim = plan.optimizer_bytes * a
        if n > 1:
            buffers += 4 * a
    else:
        raise ValueError(f"unknown method {plan.method!r}")
    tokens = plan.tokens
    acts = activation_bytes(plan, tokens, _checkpointing_on(plan, tokens))
    if plan.checkpointing == "auto" and tokens > plan.checkpointing_min_tokens:
        # The longest batch that runs without checkpointing may need more.
        acts = max(acts, activation_bytes(plan, plan.checkpointing_min_tokens, False))
    return MemoryEstimate(
        weights=weights,
        gradients=grads,
        optimizer=optim,
        buffers=buffers,
        activations=acts,
        logits=logits_bytes(plan, tokens),
        step_transient=step,
        host=host,
        trainable=trainable,
        notes=notes,
    )


def gpu_needed(total_bytes: float, sizes: tuple[int, ...] = GPU_SIZES_GB) -> int | None:
    """The smallest common GPU size (GB) that holds ``total_bytes`` with 10% headroom."""
    for size in sizes:
        if total_bytes <= HEADROOM * size * GB:
            return size
    return None


def max_tokens(plan: TrainingPlan, gpu_gb: float, multiple: int = 1024) -> int:
    """The largest tokens-per-micro-batch (a multiple of ``multiple``) that fits ``gpu_gb``."""
    budget = HEADROOM * gpu_gb * GB
    lo, hi = 0, 1 << 22
    while lo < hi:  # the total is monotone in tokens
        mid = (lo + hi + 1) // 2
        if estimate(replace(plan, tokens=mid * multiple)).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple


# --------------------------------------------------------------------------------------------
# From an experiment YAML.


def _largest(value: Any) -> Any:
    """Resolve Determined search spaces to their largest value (the worst case for memory)."""
    if isinstance(value, dict):
        t = value.get("type")
        if t == "const":
            return value.get("val")
        if t == "categorical":
            vals = value.get("vals") or []
            nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
            return max(nums) if nums and len(nums) == len(vals) else vals[0]
        if t in ("int", "double"):
            return value["maxval"]
        if t == "log":
            return float(value.get("base", 10)) ** float(value["maxval"])
        return {k: _largest(v) for k, v in value.items()}
    return value


def _deepspeed_config(ds: Any, context_dir: Path) -> dict[str, Any]:
    if ds is None:
        return {}
    if isinstance(ds, dict):
        return ds
    p = Path(ds)
    return json.loads((p if p.is_absolute() else context_dir / p).read_text())


def plan_for_experiment(config: dict[str, Any], context_dir: Path) -> TrainingPlan:
    """The plan of an experiment YAML's largest trial (search spaces at their maximum)."""
    hp = parse_hyperparameters(_largest(config.get("hyperparameters") or {}), base_dir=context_dir)
    name = hp.model.name_or_path
    if name not in MODEL_CONFIGS:
        raise UserError(f"no memory model for {name!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    shape = ModelShape.from_config(MODEL_CONFIGS[name])
    ta = hp.training_args
    world = int((config.get("resources") or {}).get("slots_per_trial", 1))
    ds = _deepspeed_config(ta.get("deepspeed"), context_dir)
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if ds else 0
    bf16 = hp.efficiency.bf16 == "true" or bool(ta.get("bf16"))
    if hp.method == "qlora":
        assert hp.quantization is not None
        compute = 2 if hp.quantization.compute_dtype in ("bfloat16", "float16") else 4
        weight = compute
    else:
        # model.dtype auto: the checkpoint's dtype on a GPU (bf16 for every model above).
        weight = 4 if hp.model.dtype == "float32" else 2
        if stage:
            weight = 2 if bf16 else 4  # DeepSpeed casts the module to its bf16/fp16 setting
        compute = 2 if bf16 else weight
    optim = str(ta.get("optim", "adamw_torch"))
    bucket = zero.get("reduce_bucket_size", 0)
    if bucket == "auto":  # what transformers fills in
        bucket = shape.hidden_size * shape.hidden_size
    live = zero.get("stage3_max_live_parameters", 0)
    max_tokens_per_batch = getattr(hp.efficiency, "max_tokens_per_batch", None)
    rows = int(ta.get("per_device_train_batch_size", 8))
    tokens = max_tokens_per_batch or rows * hp.data.max_length
    lora = hp.lora
    eff = hp.efficiency
    return TrainingPlan(
        model=shape,
        method=hp.method,
        weight_bytes=weight,
        compute_bytes=compute,
        world_size=world,
        zero_stage=stage,
        offload_optimizer=bool((zero.get("offload_optimizer") or {}).get("device") == "cpu"),
        optimizer_bytes=2 if "8bit" in optim else 8,
        lora_r=lora.r if lora else 0,
        lora_targets=lora.target_modules if lora else "all-linear",
        lora_layers=lora.last_layers if lora else None,
        lora_dropout=lora.dropout if lora else 0.0,
        tokens=int(tokens),
        checkpointing=hp.efficiency.activation_checkpointing,
        checkpointing_min_tokens=hp.efficiency.checkpointing_min_tokens,
        # A padding mask makes transformers' sdpa repeat K/V heads to every query head;
        # FlashAttention and segment attention (prefix sharing, packing) keep them grouped.
        expand_kv=not (eff.prefix_sharing or eff.packing or eff.flash_attention),
        fused_lm_loss=hp.efficiency.liger_kernel,
        reduce_bucket=int(bucket or 0),
        overlap_comm=bool(zero.get("overlap_comm", False)),
        max_live_params=int(live if isinstance(live, (int, float)) else 0),
    )


def yaml_memory_figure(text: str) -> float | None:
    """The figure in a YAML header line ``# GPU memory (trainer/memory.py): X GB per GPU``."""
    m = re.search(r"^# GPU memory \(trainer/memory\.py\): ~?([\d.]+) GB per GPU", text, re.M)
    return float(m.group(1)) if m else None


def experiment_row(path: Path, context_dir: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    plan = plan_for_experiment(config, context_dir)
    est = estimate(plan)
    return {"path": path, "config": config, "plan": plan, "estimate": est}


def markdown_table(paths: list[Path], context_dir: Path) -> str:
    """The GPU table of benchmarks/README.md, generated (tests/test_memory_model.py)."""
    lines = [
        "| experiment YAML | model (params) | method | tokens / micro-batch | memory per GPU "
        "(weights + grads + optimizer + buffers + activations + logits) | GPU it needs |",
        "|---|---|---|---:|---|---|",
    ]
    for path in paths:
        row = experiment_row(path, context_dir)
        plan: TrainingPlan = row["plan"]
        est: MemoryEstimate = row["estimate"]
        model = row["config"]["hyperparameters"]["model"]["name_or_path"]
        how = plan.method
        if plan.method != "full":
            how += f" r{plan.lora_r}"
        if plan.zero_stage:
            how += f", ZeRO-{plan.zero_stage}" + (
                " + CPU offload" if plan.offload_optimizer else ""
            )
        elif plan.world_size > 1:
            how += ", DDP"
        how += f", {plan.world_size} GPU" + ("s" if plan.world_size > 1 else "")
        parts = " + ".join(
            f"{v / GB:.2f}"
            for v in (
                est.weights,
                est.gradients,
                est.optimizer,
                est.buffers,
                est.activations,
                est.logits,
            )
        )
        host = f"; host {est.host / GB:.1f} GB" if est.host else ""
        need = gpu_needed(est.total)
        lines.append(
            f"| `{path.name}` | {model.split('/')[-1]} ({plan.model.params / 1e9:.2f} B) | {how} "
            f"| {plan.tokens:,} | **{est.total / GB:.1f} GB** = {parts}{host} "
            f"| {f'{need} GB' if need else '> 141 GB'} |"
        )
    return "\n".join(lines)
