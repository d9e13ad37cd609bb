"""``text2sql export``: a checkpoint -> a standalone HuggingFace model folder.

The folder loads anywhere with ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)``; nothing in it points at this machine:

- default (merged): the LoRA adapter is merged into the base weights (``merge_and_unload``)
  and the full model is saved as safetensors. This is the exact model the checkpoint is: the
  embedded SmolLM2 base, for one, is the Q4_1 GGUF *dequantized*, whose weights differ from the
  Hub's bf16 ``HuggingFaceTB/SmolLM2-135M-Instruct``;
- ``--adapter``: the adapter alone, its ``base_model_name_or_path`` a Hub id (the model's own
  id, ``--base-id``, or for the embedded model ``HuggingFaceTB/SmolLM2-135M-Instruct`` -- with
  a note that the Hub's weights are the unquantized original, so outputs can differ). A local
  folder or a cache path is never written as the base.

Always included: the tokenizer, a chat template that renders the training prompt exactly
(system prompt by default, the user turn ``Schema:\\n<DDL>\\n\\nQuestion: <question>``),
``generation_config.json`` (greedy, stops at the end-of-turn token), ``text2sql_model.json``
(prompt format, schema style: ``text2sql ask --model <folder>`` reads it) and a README model card.

The folder is written into ``<out>.tmp-*`` and renamed into place when complete. ``--push-to-hub
<user/name>`` uploads it afterwards (``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dataset_utils.errors import UserError
from dataset_utils.formatting import (
    CHATML_END,
    CHATML_START,
    SYSTEM_PROMPT,
    messages_for,
    render_prompt,
)
from dataset_utils.records import Example
from dataset_utils.settings import cache_dir, hub_offline
from evaluation.answer import EXPORT_SPEC, export_spec, from_checkpoint
from evaluation.generation import stop_token_ids

# Hub ids of the embedded models (their original, unquantized weights).
EMBEDDED_HUB_IDS = {"embedded:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def chatml_template(system_prompt: str = SYSTEM_PROMPT) -> str:
    """ChatML with this project's system prompt as the default system turn."""
    sp = json.dumps(system_prompt)  # a valid Jinja string literal
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        f"{{{{ '{CHATML_START}system\\n' + {sp} + '{CHATML_END}\\n' }}}}"
        "{% endif %}"
        f"{{{{ '{CHATML_START}' + message['role'] + '\\n' + message['content'] + "
        f"'{CHATML_END}' + '\\n' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{CHATML_START}assistant\\n' }}}}{{% endif %}}"
    )


def check_push_args(repo_id: str | None) -> None:
    """Refuse a ``--push-to-hub`` that cannot work, before anything is exported."""
    if repo_id is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--push-to-hub {repo_id!r} is not a valid Hub repo id: {e}") from None
    if "/" not in repo_id:
        raise UserError(f"--push-to-hub {repo_id!r}: expected <user or org>/<name>")
    if hub_offline():
        raise UserError("--push-to-hub needs the Hub, but HF_HUB_OFFLINE=1 is set")
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("--push-to-hub needs a Hub token: set HF_TOKEN or run `hf auth login`")


def portable_name(model_name: str) -> str:
    """The base model's name for the record: a Hub id, never a path of this machine."""
    if model_name in EMBEDDED_HUB_IDS:
        return f"{EMBEDDED_HUB_IDS[model_name]} (Q4_1 GGUF, dequantized)"
    local = Path(model_name).expanduser()
    if local.exists() or model_name.startswith(("/", ".", "~")) or model_name.count("/") != 1:
        return f"a local model folder named {local.name}"
    return model_name


def base_hub_id(model_name: str, override: str | None) -> tuple[str, str | None]:
    """(Hub id to write as the adapter's base, a note for the user or None)."""
    if override:
        return override, None
    if model_name in EMBEDDED_HUB_IDS:
        hub_id = EMBEDDED_HUB_IDS[model_name]
        return hub_id, (
            f"the adapter was trained on {model_name} (the Q4_1 GGUF, dequantized); its base "
            f"is written as {hub_id}, the unquantized original, so outputs can differ "
            "slightly from the checkpoint's. The default (merged) export is exact"
        )
    local = Path(model_name).expanduser()
    if local.exists() or model_name.startswith(("/", ".", "~")) or model_name.count("/") != 1:
        raise UserError(
            f"--adapter: the base model {model_name} is a local folder, which does not resolve "
            "on another machine; use the default merged export, or --base-id <hub id> naming "
            "the same weights on the Hub"
        )
    return model_name, None


def export_checkpoint(
    loaded: Any,
    out: Path,
    *,
    adapter_only: bool = False,
    base_id: str | None = None,
    source: str = "",
) -> tuple[Path, list[str]]:
    """Write the standalone folder for ``loaded`` (a LoadedCheckpoint); returns (out, notes)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder")
    if adapter_only and not loaded.is_adapter:
        raise UserError(f"--adapter: {loaded.path} is a full fine-tune, it has no adapter")
    notes: list[str] = []
    answerer = from_checkpoint(loaded)
    hp = loaded.hp
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = loaded.tokenizer
        if loaded.plan.chat_format == "chatml":
            tokenizer.chat_template = chatml_template()
        _check_template(tokenizer, loaded.plan, notes)
        if adapter_only:
            hub_id, note = base_hub_id(hp.model.name_or_path, base_id)
            if note:
                notes.append(note)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(loaded.path / name, tmp / name)
            cfg = json.loads((tmp / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = hub_id
            cfg.pop("revision", None)
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
            model = loaded.model
            base_ref = hub_id
        else:
            model = loaded.model.merge_and_unload() if loaded.is_adapter else loaded.model
            # Where the base was loaded from on this machine says nothing elsewhere.
            model.config._name_or_path = ""
            model.save_pretrained(tmp, safe_serialization=True)
            base_ref = portable_name(hp.model.name_or_path)
        tokenizer.save_pretrained(tmp)
        gen = _generation_config(model, tokenizer, loaded.plan, answerer.max_new_tokens)
        gen.save_pretrained(tmp)
        spec = export_spec(
            answerer,
            kind="adapter" if adapter_only else "merged",
            base_model=base_ref,
            method=hp.method,
            source=source or f"checkpoint {loaded.path.name}",
            stop_tokens=[
                tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, loaded.plan)
            ],
        )
        (tmp / EXPORT_SPEC).write_text(json.dumps(spec, indent=2))
        (tmp / "README.md").write_text(_model_card(spec, loaded, notes))
        _check_portable(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, notes


def _check_template(tokenizer: Any, plan: Any, notes: list[str]) -> None:
    """The saved chat template must render the training prompt exactly (or say it does not)."""
    probe = Example(
        question="How many singers?", context="CREATE TABLE singer (id INT)", sql="x", source="x"
    )
    if plan.chat_format == "plain" or not getattr(tokenizer, "chat_template", None):
        notes.append(
            "this model uses the plain prompt format (no chat template): build prompts as "
            "text2sql_model.json's format_plan describes (README)"
        )
        return
    rendered = tokenizer.apply_chat_template(
        messages_for(probe, with_answer=False), tokenize=False, add_generation_prompt=True
    )
    if rendered != render_prompt(probe, tokenizer, plan):
        raise UserError(
            "the tokenizer's chat template does not render the prompt the model was trained "
            "on; cannot export a faithful chat template"
        )


def _generation_config(model: Any, tokenizer: Any, plan: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, plan)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=getattr(model.config, "bos_token_id", None),
    )


def _check_portable(folder: Path) -> None:
    """No file may name a path of this machine (cache, checkout, temp)."""
    markers = {str(Path.home()), str(Path(tempfile.gettempdir()).resolve())}

    markers.add(str(cache_dir()))
    for f in folder.iterdir():
        if f.suffix in {".json", ".md", ".jinja", ".txt"} and f.is_file():
            text = f.read_text(encoding="utf-8", errors="replace")
            for m in markers:
                if m and m in text and f.name != "README.md":
                    raise UserError(f"export: {f.name} names a local path ({m}); not portable")


def _model_card(spec: dict[str, Any], loaded: Any, notes: list[str]) -> str:
    hp = loaded.hp
    merged = spec["kind"] == "merged"
    lines = [
        "---",
        "library_name: " + ("transformers" if merged else "peft"),
        "tags: [text-to-sql, text2sql-finetune]",
        *([] if merged else [f"base_model: {spec['base_model']}"]),
        "---",
        "",
        "# Text-to-SQL model (text2sql-finetune export)",
        "",
        f"Fine-tuned from `{hp.model.name_or_path}` ({hp.method}"
        + (", adapter merged into the base" if merged else f", adapter on `{spec['base_model']}`")
        + ") with the text2sql-finetune toolkit.",
        "",
        "Prompt: the chat template's default system prompt, then one user turn",
        "`Schema:\\n<CREATE TABLE statements>\\n\\nQuestion: <question>`; the answer is one SQLite",
        f"query. Schemas were rendered in the `{spec['schema_style']}` style during training.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("<this folder or repo>")',
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
        'schema = "CREATE TABLE singer (singer_id INT, name TEXT)"',
        'question = "How many singers are there?"',
        'msgs = [{"role": "user", "content": f"Schema:\\n{schema}\\n\\nQuestion: {question}"}]',
        "ids = tok.apply_chat_template(",
        "    msgs, add_generation_prompt=True, return_tensors='pt', return_dict=True",
        ")",
        "out = model.generate(**ids)  # greedy; stops at the end-of-turn token (generation_config)",
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        'Or `text2sql ask --model <this folder> --db my.sqlite "question"`.',
        "",
        *[f"Note: {n}." for n in notes],
    ]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as e:  # noqa: BLE001 - network / auth / permission: one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"push to the Hub ({repo_id}) failed: {type(e).__name__}: {first}. The export "
            f"in {folder} is complete; push it again with `hf upload {repo_id} {folder}`"
        ) from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
