"""LoRA on the top layers only (``lora.last_layers``) and checkpointing without input grads.

`trainer.modeling.apply_adapter` enables non-reentrant activation checkpointing *after* the
adapter and removes transformers' "embedding outputs require grad" hook: parameter gradients
must be exactly those of a run without checkpointing, and with ``last_layers`` the layers
below the adapted ones must run forward only (no autograd graph, so no backward through them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dataset_utils.errors import UserError
from tests import tiny
from trainer.config import LoraArgs
from trainer.modeling import apply_adapter, peft_config


def _tiny(tmp_path: Path, layers: int = 4) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
    )
    return AutoModelForCausalLM.from_config(config).float()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 24), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _lora_grads(model: Any) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**_batch(), use_cache=False).loss.backward()
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def _adapted(last_layers: int | None, checkpointing: bool, tmp_path: Path) -> Any:
    lora = LoraArgs(r=4, alpha=8, dropout=0.0, last_layers=last_layers)
    model = _tiny(tmp_path)
    torch.manual_seed(2)  # same LoRA init in every variant
    cfg = peft_config("lora", lora, model)
    model = apply_adapter(model, cfg, activation_checkpointing=checkpointing)
    # Non-zero B so every adapter gets a gradient through the layers above it.
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.parametrize("last_layers", [None, 2])
def test_checkpointing_without_input_grads_gives_the_same_gradients(
    tmp_path: Path, last_layers: int | None
) -> None:
    plain = _lora_grads(_adapted(last_layers, False, tmp_path))
    ckpt = _lora_grads(_adapted(last_layers, True, tmp_path))
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_last_layers_adapts_only_the_top_layers_and_skips_backward_below(
    tmp_path: Path,
) -> None:
    model = _adapted(2, True, tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in trainable}
    assert layers == {2, 3}, trainable
    assert all("lora_" in n for n in trainable)

    needs_grad: dict[int, bool] = {}
    base = model.get_base_model()
    for i, layer in enumerate(base.model.layers):

        def hook(_m: Any, _inp: Any, out: Any, i: int = i) -> None:
            out = out[0] if isinstance(out, tuple) else out
            needs_grad[i] = bool(out.requires_grad)

        layer.register_forward_hook(hook)
    grads = _lora_grads(model)
    # Layers 0 and 1 build no autograd graph: backward stops at layer 2.
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}
    assert set(grads) == set(trainable)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_last_layers_is_validated(tmp_path: Path) -> None:
    for bad in (0, -1, 2.5, True, "top"):
        with pytest.raises(UserError, match="last_layers"):
            LoraArgs(last_layers=bad)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="has 4 layers"):
        peft_config("lora", LoraArgs(last_layers=5), _tiny(tmp_path))


def test_last_layers_reaches_the_model_from_the_experiment_yaml(tmp_path: Path) -> None:
    from trainer.experiment import load_experiment
    from trainer.modeling import build_model

    model_dir = tiny.make_tiny_model(tmp_path / "tiny-llama")
    exp = tiny.write_experiment(tmp_path / "exp.yaml", model_dir)
    hp = load_experiment(exp, ["lora.last_layers=1"], schema=False).hparams
    assert hp.lora.last_layers == 1
    model = build_model(hp, tiny.tokenizer())
    trainable = {
        n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == {"1"}  # the tiny model has 2 layers: only the top one is adapted
