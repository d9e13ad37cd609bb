"""QLoRA on CPU with the tiny model: real bitsandbytes 4-bit layers, real peft, the real Trainer.

The model is built exactly as the entrypoint builds it (`trainer.modeling.build_model`: 4-bit
NF4 load from ``quantization_config`` + ``prepare_model_for_kbit_training`` + LoRA), with
float32 compute (bf16 matmuls are emulated, hence slow, on CPUs without AVX512-BF16).

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_qlora.py`` (``-m slow`` for the training test)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def _hparams(tmp_path: Path, model_dir: Path, *overrides: str) -> Any:
    from trainer.experiment import load_experiment

    exp = tiny.write_experiment(tmp_path / "exp.yaml", model_dir, method="qlora", lr=3e-2)
    return load_experiment(
        exp,
        ["quantization.compute_dtype=float32", "efficiency.bf16=false", *overrides],
        schema=False,
    ).hparams


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # Bitwise view: the packed 4-bit weights live in a float32 "quant storage" tensor, whose
    # bit patterns may include NaNs (NaN != NaN under torch.equal).
    return t.detach().contiguous().view(torch.uint8).clone()


def test_qlora_model_is_nf4_and_only_lora_gets_gradients(tmp_path: Path, tiny_llama: Path) -> None:
    from trainer.modeling import build_model

    hp = _hparams(tmp_path, tiny_llama)
    tok = tiny.tokenizer()
    model = build_model(hp, tok)

    linear4 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # 2 layers x (q, k, v, o, gate, up, down), each now the base layer of a LoRA wrapper.
    assert len(linear4) == 14, sorted(linear4)
    assert all(n.endswith("base_layer") for n in linear4)
    for m in linear4.values():
        assert isinstance(m.weight, bnb.nn.Params4bit)
        assert m.weight.quant_state.quant_type == "nf4"
        assert m.weight.quant_state.nested  # double quantization
        assert not m.weight.requires_grad
    # The LM head and embeddings stay unquantized (tied, as in the base model).
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    ids = torch.tensor([tok("SELECT name FROM singer WHERE age > 30")["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # lora_B starts at zero, so at step 0 only B receives a gradient signal through A x.
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.slow
def test_qlora_training_changes_only_adapters_and_loss_falls(
    tmp_path: Path, tiny_llama: Path, spider_dir: Path
) -> None:
    from trainer.modeling import build_model
    from trainer.training import RunEnv, build_trainer, build_training_args
    from trainer.training_data import build_datasets

    steps = 10
    # 24 examples -> ~19 training rows: 10 steps of 4 revisit them, so the loss must fall.
    hp = _hparams(
        tmp_path, tiny_llama, "data.number_of_samples=24", f"training_args.max_steps={steps}"
    )
    hp.training_args.update(eval_strategy="no", save_strategy="no")
    tok = tiny.tokenizer()
    data = build_datasets(hp, tok)
    env = RunEnv(output_dir=str(tmp_path / "out"), progress=False)
    args = build_training_args(hp, env)
    model = build_model(hp, tok)
    before = {n: _bytes(p) for n, p in model.named_parameters()}
    quant_before = {
        n: _bytes(m.weight.quant_state.absmax)
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    trainer = build_trainer(hp, model, tok, data, args, env)
    trainer.train()
    assert trainer.state.global_step == steps

    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    frozen = [n for n in before if "lora_" not in n]
    assert lora and frozen
    changed_lora = [n for n in lora if not torch.equal(before[n], _bytes(after[n]))]
    assert changed_lora == lora, set(lora) - set(changed_lora)
    changed_frozen = [n for n in frozen if not torch.equal(before[n], _bytes(after[n]))]
    assert changed_frozen == [], changed_frozen
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(quant_before[n], _bytes(m.weight.quant_state.absmax)), n

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps
    print(f"QLoRA losses: {[round(x, 3) for x in losses]}")
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_qlora_keeps_bf16_base_and_non_reentrant_checkpointing(
    tmp_path: Path, tiny_llama: Path
) -> None:
    """Norms, embeddings and LM head stay in the compute dtype (bf16) and checkpointing is
    non-reentrant: peft's prepare_model_for_kbit_training (used before) cast them to fp32 --
    so the residual stream and every checkpointed layer input was fp32 -- and left torch's
    reentrant checkpointing on."""
    from trainer.modeling import build_model

    hp = _hparams(
        tmp_path,
        tiny_llama,
        "quantization.compute_dtype=bfloat16",
        "efficiency.activation_checkpointing=true",
    )
    tok = tiny.tokenizer()
    model = build_model(hp, tok)
    dtypes = {
        n: p.dtype
        for n, p in model.named_parameters()
        if not isinstance(p, bnb.nn.Params4bit) and "lora_" not in n
    }
    assert dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {torch.float32}  # trainable adapters keep fp32 weights for AdamW
    layers = model.get_base_model().model.layers
    for layer in layers:
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}

    # The residual stream entering each layer is bf16, and a training step still reaches
    # every adapter.
    seen: list[torch.dtype] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kw: (
                seen.append(args[0].dtype) if args else seen.append(kw["hidden_states"].dtype)
            ),
            with_kwargs=True,
        )
        for layer in layers
    ]
    model.train()
    ids = torch.tensor([tok("SELECT name FROM singer WHERE age > 30")["input_ids"]])
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}, seen
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
