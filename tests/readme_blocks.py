"""README.md's fenced ``bash`` blocks, as tests see them, and how the slow tier runs them.

A block may carry a marker comment on the line(s) just above its fence::

    <!-- readme-test: MODE (why) -->

- no marker (``run``): run exactly as written;
- ``tiny``: run with the substitutions below -- the install steps are dropped (the test's
  environment has the project installed) and the main job gets `TINY_OVERRIDES`, since the
  README's 25-minute job is too slow for a test;
- ``archive``: run with Spider's download pointed at a local HTTP server serving a test archive
  in the official layout (``TEXT2SQL_DOWNLOAD_BASE``) and ``~/Downloads/spider_data.zip``
  replaced by that archive;
- ``static``: never run (the reason is in the marker); still parsed and checked.

In every block run, ports are replaced by free ones (a shared machine may use 5000/5001).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"<!--\s*readme-test:\s*([a-z]+)\s*(?:\((.*)\))?\s*-->")
MODES = ("run", "tiny", "archive", "static")
MAIN_JOB = "experiments/smollm2-135m-lora-cpu.yaml"
# The main job, capped: a couple of steps, a few evaluation prompts, 200 examples.
TINY_OVERRIDES = (
    "training_args.max_steps=2",
    "training_args.eval_steps=2",
    "training_args.save_steps=2",
    "training_args.warmup_steps=0",
    "eval.generation_samples=2",
    "eval.loss_samples=4",
    "eval.test_samples=4",
    "eval.max_new_tokens=48",
    "data.number_of_samples=200",
)
INSTALL_STEPS = ("python3.11 -m venv", ". .venv/bin/activate", "pip install")


@dataclass
class Block:
    index: int
    line: int  # 1-based line of the opening fence
    text: str
    mode: str
    why: str


def blocks(readme: Path) -> list[Block]:
    lines = readme.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            mode, why = "run", ""
            j = start - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            m = MARKER.search(lines[j]) if j >= 0 else None
            if m:
                mode, why = m.group(1), (m.group(2) or "").strip()
            out.append(Block(len(out), start + 1, "\n".join(body) + "\n", mode, why))
        i += 1
    return out


def logical_lines(text: str) -> list[str]:
    """The block's command lines: split at newlines outside quotes, backslash continuations
    joined, ``#`` comments dropped (a quoted string may span lines, as in a curl payload)."""
    out: list[str] = []
    cur: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        c = text[i]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if quote:
            cur.append(c)
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and nxt:
                cur.append(nxt)
                i += 1
        elif c == "\\" and nxt == "\n":
            cur.append(" ")
            i += 1
        elif c == "\\" and nxt:
            cur += [c, nxt]
            i += 1
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c == "#" and (not cur or cur[-1].isspace()):
            while i + 1 < len(text) and text[i + 1] != "\n":
                i += 1
        elif c == "\n":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return [ln for ln in out if ln.strip()]


def simple_commands(text: str) -> list[list[str]]:
    """Every simple command of a block, as argv (leading ``NAME=value`` assignments dropped;
    ``export NAME=value`` kept)."""
    commands: list[list[str]] = []
    for line in logical_lines(text):
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = ""
        current: list[str] = []
        for tok in lex:
            if tok in {"&&", "||", ";", "&", "|"}:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            commands.append(current)
    cleaned = []
    for argv in commands:
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


def tiny_command(text: str) -> str:
    """Command 1 with the install steps dropped and the main job capped (`TINY_OVERRIDES`)."""
    sets = " ".join(f"--set {o}" for o in TINY_OVERRIDES)
    out = []
    for line in text.splitlines():
        parts = [p for p in line.split(" && ") if not p.strip().startswith(INSTALL_STEPS)]
        line = " && ".join(parts)
        line = re.sub(r"(text2sql run \S+\.yaml)", rf"\1 {sets} --no-progress", line)
        out.append(line)
    return "\n".join(out) + "\n"


def with_ports(text: str, ports: dict[int, int]) -> str:
    for old, new in ports.items():
        text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
    return text
