"""The GPU memory model (trainer/memory.py) against what can be measured on a CPU, published
figures, and every GPU experiment YAML's header.

- Parameter counts of the model configs it carries equal transformers' own models built from
  them (on the meta device: no weights) and the published sizes.
- Weights, gradients and AdamW states: the exact bytes of a real model, after a real step.
- NF4: the bytes bitsandbytes really allocates for a 4-bit model.
- Activations: the bytes autograd saves for backward (``saved_tensors_hooks``), in fp32, bf16,
  bf16 autocast over fp32 weights, and LoRA, with and without an attention mask.
- ZeRO: DeepSpeed's own estimator and the ZeRO paper's figures.
- Every GPU YAML states ``# GPU memory (trainer/memory.py): X GB per GPU`` within 10% of the
  model; benchmarks/README.md's GPU table is the model's output, verbatim.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_memory_model.py``
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trainer.memory import (
    GB,
    MODEL_CONFIGS,
    NF4_BYTES_PER_PARAM,
    ModelShape,
    TrainingPlan,
    activation_bytes,
    estimate,
    markdown_table,
    max_tokens,
    plan_for_experiment,
    yaml_memory_figure,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"


def _config(name: str) -> Any:
    from transformers import LlamaConfig, MistralConfig

    d = dict(MODEL_CONFIGS[name])
    kind = d.pop("model_type")
    return (LlamaConfig if kind == "llama" else MistralConfig)(**d)


PUBLISHED = {  # parameters, as the model cards / safetensors index give them
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "HuggingFaceTB/SmolLM2-360M-Instruct": 361_821_120,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_transformers(name: str) -> None:
    from transformers import AutoModelForCausalLM

    config = _config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    shape = ModelShape.from_config(config)
    assert shape.params == PUBLISHED[name]
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    )
    assert shape.linear_params == linear


def test_lora_parameter_counts_match_peft() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _config("mistralai/Mistral-7B-v0.1")
    config.num_hidden_layers = 2  # the count is per layer; two keep it quick
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=32, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = ModelShape.from_config(config)
    assert shape.lora_params(32) == trainable
    # The full Mistral-7B at r=32 (mistral-7b-qlora.yaml): 83.9 M adapter parameters.
    assert (
        ModelShape.from_config(MODEL_CONFIGS["mistralai/Mistral-7B-v0.1"]).lora_params(32)
        == 16 * trainable
    )


def _small_config(**kw: Any) -> Any:
    from transformers import LlamaConfig

    base = dict(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_are_what_a_real_step_allocates(dtype: torch.dtype) -> None:
    """Full fine-tune on one device with torch AdamW: weights, gradients and the two moments
    after a real optimizer step, byte for byte."""
    from transformers import AutoModelForCausalLM

    config = _small_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()

    def nbytes(ts: Any) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    weights = nbytes(model.parameters())
    grads = nbytes(p.grad for p in model.parameters())
    moments = nbytes(
        v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")
    )
    wb = torch.finfo(dtype).bits // 8
    est = estimate(TrainingPlan(model=ModelShape.from_config(config), weight_bytes=wb))
    assert (est.weights, est.gradients, est.optimizer) == (weights, grads, moments)


def test_nf4_bytes_are_what_bitsandbytes_allocates(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = _small_config(intermediate_size=1024, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant, dtype=torch.bfloat16
    )
    allocated, weights, linears = 0, 0, 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            tensors = (m.weight, qs.absmax, qs.state2.absmax, qs.state2.code)
            allocated += sum(t.untyped_storage().nbytes() for t in tensors)
            weights += qs.shape.numel()
            linears += 1
    shape = ModelShape.from_config(config)
    assert weights == shape.linear_params
    # Per linear, bitsandbytes also keeps its 256-entry fp32 code book (1 KiB): negligible at
    # 7B (224 linears), visible on this toy.
    assert allocated == pytest.approx(NF4_BYTES_PER_PARAM * weights + 1024 * linears, rel=1e-4)


def _saved_activation_bytes(model: Any, ids: torch.Tensor, mask: torch.Tensor, autocast: bool):
    """Bytes autograd saves for backward in the decoder (parameters and autocast's cached
    low-precision copies of them excluded: those are weights)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    shapes |= {s[::-1] for s in shapes}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and tuple(t.shape) not in shapes:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        base.model(input_ids=ids, attention_mask=mask)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("weights", "autocast", "lora"),
    [
        (torch.float32, False, False),
        (torch.bfloat16, False, False),
        (torch.float32, True, False),  # tinyllama-full-ddp.yaml: fp32 master + bf16 autocast
        (torch.float32, False, True),  # the CPU main job: LoRA on an fp32 base
        (torch.bfloat16, True, True),  # LoRA on a bf16 base, fp32 adapters under autocast
    ],
    ids=["fp32", "bf16", "fp32-autocast", "lora-fp32", "lora-bf16-autocast"],
)
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "mask"])
def test_activation_bytes_match_what_autograd_saves(
    weights: torch.dtype, autocast: bool, lora: bool, padded: bool
) -> None:
    from transformers import AutoModelForCausalLM

    config = _small_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=weights)
    model.train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    # 3 x 100 tokens: no activation shares a shape with a weight (256, 64, 704).
    ids = torch.randint(0, 1000, (3, 100))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -10:] = 0  # a padding mask: transformers' sdpa then repeats K/V heads
    measured = _saved_activation_bytes(model, ids, mask, autocast)
    plan = TrainingPlan(
        model=ModelShape.from_config(config),
        method="lora" if lora else "full",
        lora_r=8,
        weight_bytes=torch.finfo(weights).bits // 8,
        compute_bytes=2 if (autocast or weights == torch.bfloat16) else 4,
        expand_kv=padded,
    )
    modelled = activation_bytes(plan, ids.numel(), checkpointing=False)
    print(f"activations: measured {measured:,} B, modelled {modelled:,.0f} B")
    assert modelled == pytest.approx(measured, rel=0.10)


def test_zero_states_match_deepspeed_estimator_and_zero_paper() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = ModelShape.from_config(MODEL_CONFIGS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
    p = shape.params
    for n in (1, 2, 8):
        z2 = estimate(TrainingPlan(model=shape, world_size=n, zero_stage=2))
        # DeepSpeed counts the step's fp32 gradient partition on top: 2 + 18/N bytes/param.
        _, ds_gpu = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=n, cpu_offload=False)
        assert z2.state + z2.step_transient == pytest.approx(ds_gpu, rel=1e-6)
        off = estimate(
            TrainingPlan(model=shape, world_size=n, zero_stage=2, offload_optimizer=True)
        )
        _, ds_off = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=n, cpu_offload=True)
        assert off.state == pytest.approx(ds_off, rel=1e-6)
        assert off.host == 16 * p

    # ZeRO paper (Rajbhandari et al. 2020, Figure 1): 7.5 B parameters on 64 GPUs need 120 GB
    # without ZeRO, 16.6 GB with optimizer + gradient partitioning, 1.9 GB with parameters too.
    def model_states(plan: TrainingPlan) -> float:  # the paper counts no buffers
        est = estimate(plan)
        return est.weights + est.gradients + est.optimizer

    per_param = {
        stage: model_states(TrainingPlan(model=shape, world_size=64, zero_stage=stage)) / p
        for stage in (2, 3)
    }
    assert per_param[2] * 7.5e9 / GB == pytest.approx(16.6, abs=0.05)
    assert per_param[3] * 7.5e9 / GB == pytest.approx(1.9, abs=0.05)
    baseline = model_states(TrainingPlan(model=shape, weight_bytes=4, compute_bytes=4))
    assert baseline / p * 7.5e9 / GB == pytest.approx(120, abs=0.5)


def _gpu_experiments() -> list[Path]:
    out = []
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if (config.get("resources") or {}).get("resource_pool") == "gpu-pool":
            out.append(path)
    return out


@pytest.mark.parametrize("path", _gpu_experiments(), ids=lambda p: p.name)
def test_yaml_memory_comment_agrees_with_the_model(path: Path) -> None:
    text = path.read_text()
    figure = yaml_memory_figure(text)
    assert figure is not None, (
        f"{path.name}: no '# GPU memory (trainer/memory.py): X GB per GPU' line in its header"
    )
    plan = plan_for_experiment(yaml.safe_load(text), REPO_ROOT)
    modelled = estimate(plan).total / GB
    assert figure == pytest.approx(modelled, rel=0.10), (
        f"{path.name} says {figure} GB per GPU, the memory model {modelled:.1f} GB "
        f"(`text2sql memory {path.relative_to(REPO_ROOT)}`)"
    )


def test_benchmarks_readme_gpu_table_is_the_models_output() -> None:
    readme = (REPO_ROOT / "benchmarks" / "README.md").read_text()
    table = markdown_table(_gpu_experiments(), REPO_ROOT)
    assert table in readme, "regenerate it: text2sql memory --markdown experiments/*.yaml"


def test_token_budget_is_the_largest_that_fits() -> None:
    config = yaml.safe_load((EXPERIMENTS / "tinyllama-full-zero2.yaml").read_text())
    plan = plan_for_experiment(config, REPO_ROOT)
    from dataclasses import replace

    budget = max_tokens(plan, 24)
    assert budget % 1024 == 0 and budget > 0
    assert estimate(replace(plan, tokens=budget)).total <= 0.9 * 24 * GB
    assert estimate(replace(plan, tokens=budget + 1024)).total > 0.9 * 24 * GB
