"""Pull the SQL query out of a model's raw generated text.

Models wrap their answer in many ways: Markdown code fences (```` ```sql ... ``` ````), a
leading ``SQL:`` / ``Answer:`` label, a sentence of chatter ("Here is the query:"), several
statements, or an explanation after the query. `extract_sql` keeps exactly one statement:

1. If the text has a code fence, take the first fenced block (an unclosed fence runs to the
   end of the text -- generation often stops before the closing fence).
2. Drop leading labels such as ``SQL:``, ``Answer:``, ``Query:``, ``Response:`` (repeatedly).
3. If the text still does not start with a query keyword, start at the first ``SELECT`` /
   ``WITH`` keyword that begins a line or follows a colon (so the SQL after "Here is the
   query:" is found, but not a "select" inside prose); otherwise keep the text as is.
4. Keep the first statement only: cut at the first ``;`` that ends a complete statement
   according to SQLite's tokenizer (a ``;`` inside a string literal does not count), else at
   the first blank line (prose after the query).
5. Trim whitespace and the trailing ``;``.

Usage::

    from evaluation.postprocess import extract_sql
    extract_sql("```sql\\nSELECT name FROM singer;\\n```")  # 'SELECT name FROM singer'
"""

from __future__ import annotations

import re
import sqlite3

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*)?(?:sql(?:ite)?(?:\s+query)?|answer|query|response|output|"
    r"solution|assistant)(?:\*\*)?\s*:(?:\*\*)?\s*",
    re.IGNORECASE,
)
_QUERY_START = re.compile(r"^\s*\(*\s*(?:SELECT|WITH|VALUES)\b", re.IGNORECASE)
# A query keyword at the start of a line, or right after a colon ("Here is the query: SELECT").
_EMBEDDED_START = re.compile(r"(?:^|\n|:)[ \t>*`]*((?:SELECT|WITH)\b)", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _first_statement(text: str) -> str:
    pos = text.find(";")
    while pos >= 0:
        if sqlite3.complete_statement(text[: pos + 1]):
            return text[:pos]
        pos = text.find(";", pos + 1)
    blank = _BLANK_LINE.search(text)
    return text[: blank.start()] if blank else text


def extract_sql(generated_text: str) -> str:
    """The first SQL statement in ``generated_text`` (see the module docstring); may be ""."""
    text = (generated_text or "").replace("\r\n", "\n")
    fence = _FENCE.search(text)
    if fence:
        text = fence.group(2)
    previous = None
    while previous != text:
        previous = text
        text = _LABEL.sub("", text, count=1)
    if not _QUERY_START.match(text):
        m = _EMBEDDED_START.search(text)
        if m:
            text = text[m.start(1) :]
    text = _first_statement(text.strip())
    return text.strip().rstrip(";").strip()
