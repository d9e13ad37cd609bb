"""Schema-constrained decoding: the model can only write identifiers of the prompt's schema.

A small incremental SQL lexer follows the text generated so far; before each token is chosen,
candidate tokens are checked in order of score and a token is allowed only if appending its
text keeps every identifier valid:

- a word in a table position (after ``FROM``, ``JOIN``, or ``,`` inside a ``FROM`` clause)
  must be a table of the schema;
- a word followed by ``.`` (a qualifier) must be a table, an alias the query defines, or an
  alias it has not defined yet -- Spider-style ``T1``, ``T2``... or one or two characters
  (``s``, ``sc``) -- and then the query may not end until it does
  (``SELECT T1.name FROM singer AS T1``, ``SELECT s.name FROM singer s``), and may only bind
  it to a table that has every column already used on it (``SELECT T1.year FROM singer AS
  T1`` is refused when ``year`` is not a column of ``singer``);
- a word after a qualifier must be a column (of that table, when the qualifier resolves);
- a word after ``AS``, or right after a table name in a ``FROM`` clause, defines an alias
  (free, unless it is a keyword: ``FROM singer WHERE``);
- any other word must be an SQL keyword / function / type name, a column, or a defined alias;
- scopes (each SELECT, subqueries included): the first table of a SELECT's ``FROM`` must
  have every unqualified column the SELECT wrote before it, when some table of the schema does
  (``SELECT name FROM`` goes on with a table that has ``name``); once the FROM has named a
  table, an unqualified column must belong to a table it binds (or, in a correlated
  subquery, to one of the enclosing SELECTs'), and a table used as a qualifier must be one of
  them. A FROM that reads a subquery leaves its columns unchecked.
- identifiers in backticks or brackets are checked like words (content = a schema name);
  a double-quoted token is an identifier in a table position (checked) and otherwise free:
  SQLite reads ``"x"`` as a column when one exists and as a string literal when not, so it
  can never name a missing column; single-quoted strings and numbers are free;
- a word still being written must be a prefix of something allowed there;
- the stop token is allowed only where the query can end (no open quote, no undefined alias);
  after a top-level ``;`` or a blank line (where `evaluation.postprocess.extract_sql` ends
  the statement anyway) only the stop token is allowed;
- special tokens other than the stop tokens, and outside quotes bytes of an incomplete UTF-8
  character, control characters and parameter markers (``$ @ ? :``: nothing binds them) are
  refused; as in SQLite, any non-ASCII character is part of a word.

Exactness: for greedy decoding the chosen token is the best-scoring *allowed* token (tokens are
checked in descending score order until one passes, the whole vocabulary if need be); for beam
search each row keeps its best ``need`` allowed tokens, enough for the beam step to choose
exactly as it would with every disallowed token at -inf. Case-insensitive, like SQLite.

The first-table rule is the one heuristic: a query that reads an unqualified column of a table
it joins later (``SELECT year FROM singer JOIN concert ...``, 58 of Spider train's 6,904 gold
queries, none of dev's) is refused, and decoding writes the join the other way round or
qualifies the column. On the model it turns most ``no such column`` answers into queries that
run (benchmarks/README.md, main job levers). Waiting for the end of the FROM clause instead
(refusing ``WHERE`` until a join binds the column) was tried and is worse: the model, held
at a table it cannot leave, writes an alias or a run of ``OR``s instead of the join.

What it does not do: check SQL syntax (a grammar-constrained decoder such as PICARD would), or
check types. Words that are keywords are always allowed, so a keyword can stand where a column
should. Identifiers with characters outside letters, digits and ``_`` must be quoted.

Usage (the generation engines do this; see `evaluation.generation`)::

    c = SchemaConstraint(tokenizer, stop_ids)
    state = c.initial_state(example.context, example.db_path)
    scores = c.mask(scores, [state] * rows, need=1)      # disallowed tokens -> -inf
    state = c.advance(state, chosen_token_id)

The schema is the one the prompt shows (`schema_names`): the ``CREATE TABLE`` statements of
the context, in any rendering the project produces or a user context carries
(`dataset_utils.schema.parse_tables`), with the columns read from the SQLite file when the row
has one (``db_path``). A row whose prompt shows no table the parser can read is decoded
unconstrained (generation logs how many): forbidding every name would only force garbage.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from dataset_utils.schema import parse_tables, read_tables

# SQLite's keywords (sqlite.org/lang_keywords.html), its built-in scalar, aggregate, date and
# window functions, and common type names (CAST targets).
_KEYWORD_TEXT = """
    abort action add after all alter always analyze and as asc attach autoincrement before
    begin between by cascade case cast check collate column commit conflict constraint create
    cross current current_date current_time current_timestamp database default deferrable
    deferred delete desc detach distinct do drop each else end escape except exclude exclusive
    exists explain fail filter first following for foreign from full generated glob group
    groups having if ignore immediate in index indexed initially inner insert instead intersect
    into is isnull join key last left like limit match materialized natural no not nothing
    notnull null nulls of offset on or order others outer over partition plan pragma preceding
    primary query raise range recursive references regexp reindex release rename replace
    restrict returning right rollback row rows savepoint select set table temp temporary then
    ties to transaction trigger unbounded union unique update using vacuum values view virtual
    when where window with without true false
    abs avg changes char coalesce concat concat_ws count date datetime glob group_concat hex
    ifnull iif instr julianday last_insert_rowid length likelihood likely lower ltrim max min
    nullif octet_length quote random randomblob round rtrim sign soundex sqlite_version
    strftime string_agg substr substring sum time timediff total total_changes trim typeof
    unhex unicode unixepoch unlikely upper zeroblob median
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value
    nth_value
    integer int real text numeric float double varchar char boolean decimal bigint smallint
    blob number string
"""
KEYWORDS = frozenset(_KEYWORD_TEXT.split())
_CLAUSES = {
    "select": "select",
    "from": "from",
    "join": "from",
    "where": "where",
    "group": "group",
    "order": "order",
    "having": "having",
    "limit": "limit",
    "on": "on",
    "union": "",
    "intersect": "",
    "except": "",
}
# Aliases a query may use before it defines them (``SELECT T1.x FROM t AS T1``): Spider's
# T1, T2... and any one- or two-character name. Also matches every prefix of one.
_LATE_ALIAS = re.compile(r"t\d*|[a-z_][a-z0-9_]?")

# Lexer modes.
NORMAL, WORD, NUMBER, SQUOTE, DQUOTE, IDENT, DONE = range(7)


class State(NamedTuple):
    """Where the lexer is after the text generated so far (immutable, hashable)."""

    mode: int = NORMAL
    buf: str = ""  # the open word / quoted content, lower-case
    close: str = ""  # the closing quote of an IDENT (`` ` ``, ``]`` or ``"``)
    prev: str = ""  # last completed word (lower-case) or punctuation character
    prev2: str = ""
    after_table: bool = False  # the last word was a table in a table position
    last_table: str = ""
    clauses: tuple[str, ...] = ("",)  # current clause per parenthesis depth
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, table or "")
    # (alias, column or "") for qualifiers used before their alias is defined
    pending: frozenset[tuple[str, str]] = frozenset()
    blank: int = 0  # consecutive newlines seen (a blank line ends the statement)
    scopes: tuple[Scope, ...] = ()  # per parenthesis depth, as `clauses`; () = (Scope(),)


class Scope(NamedTuple):
    """What one SELECT (or a parenthesised expression inside it) has named so far.

    A parenthesised expression starts as a copy of its SELECT's scope (``sub=False``) and hands
    what it adds back at ``)``; a ``(`` whose first word is ``SELECT`` starts a new one.
    """

    loose: frozenset[str] = frozenset()  # unqualified columns written before FROM
    tables: frozenset[str] = frozenset()  # tables its FROM clause has bound
    has_from: bool = False
    wild: bool = False  # its FROM reads a subquery: its columns are not known here
    sub: bool = True  # a SELECT's own scope (False: an expression's copy of its SELECT's)
    fresh: bool = False  # just opened by "(", no word yet


_TOP = (Scope(),)


@dataclass(frozen=True)
class SchemaNames:
    """Lower-case table and column names of one schema, with prefix sets for open words."""

    tables: frozenset[str]
    columns: frozenset[str]
    table_columns: dict[str, frozenset[str]]
    table_prefixes: frozenset[str]
    column_prefixes: frozenset[str]
    general_prefixes: frozenset[str]  # keywords + columns + tables (tables: as qualifiers)

    def __hash__(self) -> int:
        return id(self)


def _prefixes(words: Iterable[str]) -> frozenset[str]:
    return frozenset(w[:i] for w in words for i in range(1, len(w) + 1))


_KEYWORD_PREFIXES = _prefixes(KEYWORDS)


@lru_cache(maxsize=4096)
def schema_names(context: str, db_path: str | None = None) -> SchemaNames:
    """Tables and columns of the schema the prompt shows.

    The tables are those ``context`` declares (`dataset_utils.schema.parse_tables`: every
    prompt rendering -- ``ddl`` / ``compact`` / ``columns``, sample values, pruned tables --
    and user contexts). With ``db_path`` (Spider rows), the columns of those tables come from
    the SQLite file itself (`dataset_utils.schema.read_tables`), and when the text names none
    of its tables (a context in some other format), every table of the file counts.
    """
    tables = list(parse_tables(context)) if context.strip() else []
    if db_path:
        try:
            in_file = {t.name.lower(): t for t in read_tables(db_path)}
        except (sqlite3.Error, OSError):
            in_file = {}
        shown = [in_file.get(t.name.lower(), t) for t in tables]
        tables = shown if any(t.name.lower() in in_file for t in tables) else list(in_file.values())
    table_columns: dict[str, frozenset[str]] = {}
    for t in tables:
        cols = frozenset(c.lower() for c, _ in t.columns)
        table_columns[t.name.lower()] = table_columns.get(t.name.lower(), frozenset()) | cols
    columns = frozenset(c for cols in table_columns.values() for c in cols)
    names = frozenset(table_columns)
    return SchemaNames(
        tables=names,
        columns=columns,
        table_columns=table_columns,
        table_prefixes=_prefixes(names),
        column_prefixes=_prefixes(columns),
        general_prefixes=_KEYWORD_PREFIXES | _prefixes(columns) | _prefixes(names),
    )


def _is_word_char(ch: str) -> bool:
    # As SQLite's tokenizer: every non-ASCII character is an identifier character (so `£`
    # or a no-break space is a column name to SQLite, and is checked like one).
    return ch.isalnum() or ch == "_" or ch > "\x7f"


class Lexer:
    """The incremental lexer for one schema: `feed` text into a `State`, or get None."""

    def __init__(self, names: SchemaNames, *, first_table: bool = True) -> None:
        self.n = names
        self.first_table = first_table
        self._bound_of: dict[tuple[Scope, ...], tuple[frozenset[str], frozenset[str]] | None] = {}

    # -- scopes ---------------------------------------------------------------------------

    @staticmethod
    def _scopes(s: State) -> tuple[Scope, ...]:
        return s.scopes or _TOP

    def _bound(self, s: State) -> tuple[frozenset[str], frozenset[str]] | None:
        """(tables bound in this SELECT and the ones around it, their columns), or None where
        unqualified names are open: before this SELECT's FROM, or when a FROM reads a
        subquery. Cached per scope stack (checked for every character of a word)."""
        key = self._scopes(s)
        if key not in self._bound_of:
            if not key[-1].has_from or any(sc.wild for sc in key):
                self._bound_of[key] = None
            else:
                tables = frozenset(t for sc in key for t in sc.tables)
                cols = frozenset(c for t in tables for c in self.n.table_columns.get(t, ()))
                self._bound_of[key] = (tables, cols)
        return self._bound_of[key]

    def _first_tables(self, s: State) -> frozenset[str] | None:
        """The tables the first one of a FROM clause may be (None: any): those with every
        unqualified column the SELECT wrote before its FROM, when some table has them all."""
        sc = self._scopes(s)[-1]
        if not self.first_table or not sc.loose or sc.has_from:
            return None
        fit = frozenset(t for t, cols in self.n.table_columns.items() if sc.loose <= cols)
        return fit or None

    # -- positions ------------------------------------------------------------------------

    def _table_position(self, s: State) -> bool:
        return s.prev in ("from", "join") or (s.prev == "," and s.clauses[-1] == "from")

    def _alias_position(self, s: State) -> bool:
        return s.prev == "as" or s.after_table

    def _is_alias(self, s: State, w: str) -> bool:
        return any(a == w for a, _ in s.aliases)

    def _qualifier_ok(self, s: State, w: str) -> bool:
        return w in self.n.tables or self._is_alias(s, w) or _LATE_ALIAS.fullmatch(w) is not None

    def _columns_after_dot(self, s: State) -> frozenset[str] | None:
        """Columns allowed after ``qualifier.`` (None: any column of the schema).

        A table: its columns. An alias: the columns of every table it was bound to in this
        scope (self-joins rebind nothing, but ``... INTERSECT SELECT ... FROM b AS T1`` does).
        An alias bound to a subquery, or not bound yet: any column.
        """
        q = s.prev2
        if q in self.n.tables:
            return self.n.table_columns[q]
        tables = [t for a, t in s.aliases if a == q]
        if not tables or "" in tables:
            return None
        return frozenset(c for t in tables for c in self.n.table_columns.get(t, ()))

    # -- open words -----------------------------------------------------------------------

    def _prefix_ok(self, s: State, w: str) -> bool:
        if self._alias_position(s):
            return True
        if self._table_position(s):
            first = self._first_tables(s) if s.prev == "from" else None
            if first is not None:
                return any(t.startswith(w) for t in first)
            return w in self.n.table_prefixes
        if s.prev == ".":
            cols = self._columns_after_dot(s)
            return any(c.startswith(w) for c in cols) if cols else w in self.n.column_prefixes
        if _LATE_ALIAS.fullmatch(w) is not None or any(a.startswith(w) for a, _ in s.aliases):
            return True
        bound = self._bound(s)
        if bound is None:
            return w in self.n.general_prefixes
        return w in _KEYWORD_PREFIXES or any(n.startswith(w) for n in (*bound[1], *bound[0]))

    def _quoted_prefix_ok(self, s: State, w: str) -> bool:
        return any(name.startswith(w) for name in self._quoted_names(s))

    def _quoted_names(self, s: State) -> Iterable[str]:
        if self._table_position(s):
            first = self._first_tables(s) if s.prev == "from" else None
            return self.n.tables if first is None else first
        if s.prev == ".":
            return self._columns_after_dot(s) or self.n.columns
        bound = self._bound(s)
        tables, cols = (self.n.tables, self.n.columns) if bound is None else bound
        return [*cols, *tables, *(a for a, _ in s.aliases)]

    # -- completed words ------------------------------------------------------------------

    def _complete(self, s: State, w: str, terminator: str) -> State | None:
        """``w`` (lower-case) just ended, followed by ``terminator`` ("" at the end)."""
        after_table = False
        last_table = s.last_table
        aliases, pending = s.aliases, s.pending
        scopes = self._scopes(s)
        sc = scopes[-1]
        if sc.fresh:
            # "(" then SELECT: a subquery, a scope of its own; anything else: an expression.
            sc = Scope() if w == "select" else sc._replace(fresh=False)
        if self._alias_position(s) and w not in KEYWORDS:
            if terminator == ".":
                return None
            table = s.last_table if (s.after_table or s.prev2 == s.last_table) else ""
            used = {c for a, c in pending if a == w and c}
            if table and not used <= self.n.table_columns.get(table, frozenset()):
                return None  # a column already used on this alias is not in this table
            aliases = (*aliases, (w, table))
            pending = frozenset(p for p in pending if p[0] != w)
        elif terminator == "." and s.prev != "." and not self._table_position(s):
            if not self._qualifier_ok(s, w):
                return None
            if w not in self.n.tables and not self._is_alias(s, w):
                pending = pending | {(w, "")}
            elif w in self.n.tables and not self._is_alias(s, w):
                bound = self._bound(s)
                if bound is not None and w not in bound[0]:
                    return None  # ``FROM singer WHERE concert.year``: concert is not in FROM
        elif self._table_position(s):
            if w not in self.n.tables:
                return None
            if s.prev == "from":
                first = self._first_tables(s)
                if first is not None and w not in first:
                    return None
            after_table, last_table = True, w
            sc = sc._replace(tables=sc.tables | {w}, has_from=True)
        elif s.prev == ".":
            cols = self._columns_after_dot(s)
            if w not in (cols if cols is not None else self.n.columns):
                return None
            if any(a == s.prev2 for a, _ in pending):
                pending = pending | {(s.prev2, w)}
        elif not (w in KEYWORDS or w in self.n.columns or self._is_alias(s, w)):
            return None
        elif w not in KEYWORDS and not self._is_alias(s, w):
            # An unqualified column: of a table the FROM binds, once it has been written.
            bound = self._bound(s)
            if bound is not None and w not in bound[1]:
                return None
            if not sc.has_from:
                sc = sc._replace(loose=sc.loose | {w})
        scopes = (*scopes[:-1], sc)
        clauses = s.clauses
        if w in _CLAUSES:
            clauses = (*clauses[:-1], _CLAUSES[w])
        if w in ("union", "intersect", "except"):
            aliases = ()  # the next SELECT binds its own aliases
            scopes = (*scopes[:-1], Scope())
        return State(
            NORMAL,
            "",
            "",
            w,
            s.prev,
            after_table,
            last_table,
            clauses,
            aliases,
            pending,
            0,
            scopes,
        )

    def _complete_quoted(self, s: State, w: str) -> State | None:
        if w not in set(self._quoted_names(s)):
            return None
        return self._complete(s._replace(mode=NORMAL, buf=""), w, "")

    # -- feeding text ---------------------------------------------------------------------

    def feed(self, s: State, text: str) -> State | None:
        """The state after appending ``text``, or None if it would break the constraint."""
        for ch in text:
            m = s.mode
            if m == DONE:
                return None
            if m == SQUOTE:
                if ch == "'":
                    s = s._replace(mode=NORMAL, prev="'", prev2=s.prev, after_table=False)
                continue
            if m == DQUOTE:
                if ch == '"':
                    s = s._replace(mode=NORMAL, prev='"', prev2=s.prev, after_table=False)
                continue
            if m == IDENT:
                if ch == s.close:
                    nxt = self._complete_quoted(s, s.buf)
                    if nxt is None:
                        return None
                    s = nxt
                    continue
                buf = s.buf + ch.lower()
                if ch == "\ufffd" or not self._quoted_prefix_ok(s, buf):
                    return None
                s = s._replace(buf=buf)
                continue
            if ch == "\ufffd" or ch == "\x7f" or (ch < " " and ch not in "\t\n\r\f\v"):
                return None  # an incomplete UTF-8 character, or a control character
            if m == WORD:
                if _is_word_char(ch):
                    buf = s.buf + ch.lower()
                    if not self._prefix_ok(s, buf):
                        return None
                    s = s._replace(buf=buf)
                    continue
                nxt = self._complete(s, s.buf, ch)
                if nxt is None:
                    return None
                s = nxt
            elif m == NUMBER:
                if _is_word_char(ch) or ch == ".":
                    continue
                s = s._replace(mode=NORMAL, buf="", prev="0", prev2=s.prev, after_table=False)
            # NORMAL: start of a token, or punctuation / space.
            if _is_word_char(ch):
                if "0" <= ch <= "9":
                    s = s._replace(mode=NUMBER, blank=0)
                    continue
                w = ch.lower()
                if not self._prefix_ok(s, w):
                    return None
                s = s._replace(mode=WORD, buf=w, blank=0)
                continue
            if ch.isspace():
                if ch == "\n":
                    if s.blank >= 1:
                        if not self.can_stop(s):
                            return None
                        s = s._replace(mode=DONE)
                    else:
                        s = s._replace(blank=1)
                continue
            s = s._replace(blank=0)
            if ch == "'":
                s = s._replace(mode=SQUOTE)
            elif ch == '"':
                if self._table_position(s) or s.prev == ".":
                    s = s._replace(mode=IDENT, buf="", close='"')
                else:
                    s = s._replace(mode=DQUOTE)
            elif ch in "`[":
                s = s._replace(mode=IDENT, buf="", close="`" if ch == "`" else "]")
            elif ch in "$@?:":
                return None  # parameter markers: the query would run without bindings
            elif ch == ";":
                if len(s.clauses) > 1 or not self.can_stop(s):
                    return None
                s = s._replace(mode=DONE)
            else:
                clauses, scopes = s.clauses, self._scopes(s)
                if ch == "(":
                    clauses = (*clauses, "")
                    scopes = (*scopes, scopes[-1]._replace(sub=False, fresh=True))
                elif ch == ")":
                    clauses = clauses[:-1] if len(clauses) > 1 else clauses
                    if len(scopes) > 1:
                        inner, outer = scopes[-1], scopes[-2]
                        if not inner.sub:  # an expression: what it named is its SELECT's
                            outer = inner._replace(sub=outer.sub, fresh=False)
                        elif clauses[-1] == "from":  # FROM (SELECT ...): columns unknown here
                            outer = outer._replace(has_from=True, wild=True)
                        scopes = (*scopes[:-2], outer)
                s = s._replace(
                    prev=ch, prev2=s.prev, after_table=False, clauses=clauses, scopes=scopes
                )
        return s

    def can_stop(self, s: State) -> bool:
        """Whether the generated text may end here."""
        if s.mode == DONE:
            return True
        if s.mode in (SQUOTE, DQUOTE, IDENT):
            return False
        if s.mode == WORD:
            done = self._complete(s, s.buf, "")
            return done is not None and not done.pending
        return not s.pending


class TokenTrie:
    """The vocabulary's token texts as a character trie: ``(children, token ids ending here)``."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.root: tuple[dict[str, Any], list[int]] = ({}, [])
        for i, text in enumerate(texts):
            if not text:
                continue
            node = self.root
            for ch in text:
                child = node[0].get(ch)
                if child is None:
                    child = node[0][ch] = ({}, [])
                node = child
            node[1].append(i)


class _Vocab:
    def __init__(self, texts: tuple[str, ...]) -> None:
        self.texts = texts
        self.trie = TokenTrie(texts)


_VOCABS: dict[tuple[str, int], _Vocab] = {}


def _vocab(tokenizer: Any) -> _Vocab:
    """Token texts and their trie, built once per tokenizer (~2 s for a 49k vocabulary)."""
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _VOCABS:
        _VOCABS[key] = _Vocab(token_texts(tokenizer))
    return _VOCABS[key]


def token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The text each token id adds when appended to others (``""`` for special tokens).

    Decoded after an anchor token, so SentencePiece's word-initial space is kept; bytes of an
    incomplete UTF-8 character come out as U+FFFD.
    """
    n = len(tokenizer)
    anchor = tokenizer.encode("a", add_special_tokens=False)[0]
    head = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode(
        [[anchor, i] for i in range(n)], clean_up_tokenization_spaces=False
    )
    special = set(tokenizer.all_special_ids)
    return tuple(
        "" if i in special or not d.startswith(head) else d[len(head) :]
        for i, d in enumerate(decoded)
    )


# A row's lexer is None when the prompt shows no schema the constraint can read: that row is
# decoded unconstrained (forbidding every name would only force garbage).
Row = tuple[Lexer | None, State]


class SchemaConstraint:
    """Masks next-token scores so generated SQL only names the prompt's schema (see above)."""

    # Tokens checked per row, best first, before enumerating every allowed token instead.
    FIRST_LOOK = 32

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int]) -> None:
        vocab = _vocab(tokenizer)
        self.texts = vocab.texts
        self.trie = vocab.trie
        self.stops = frozenset(int(t) for t in stop_ids)
        self._lexers: dict[tuple[str, str | None], Lexer | None] = {}
        self._advance: dict[tuple[int, State, int], State | None] = {}
        self._allowed_all: dict[tuple[int, State], list[int]] = {}

    def _lexer(self, context: str, db_path: str | None) -> Lexer | None:
        key = (context, db_path)
        if key not in self._lexers:
            names = schema_names(context, db_path)
            self._lexers[key] = Lexer(names) if names.tables else None
        return self._lexers[key]

    def initial_state(self, context: str, db_path: str | None = None) -> Row:
        """The start of one row: the schema of ``context`` (and ``db_path``, see
        `schema_names`); a row whose prompt shows no table is not constrained."""
        return (self._lexer(context, db_path), State())

    def advance(self, row: Row, token: int) -> Row | None:
        """The row's state after ``token``, or None when the token is not allowed."""
        lex, s = row
        if lex is None:
            return row
        if token in self.stops:
            return row if lex.can_stop(s) else None
        if token >= len(self.texts) or not self.texts[token]:
            return None
        key = (id(lex), s, token)
        if key in self._advance:
            nxt = self._advance[key]
        else:
            nxt = lex.feed(s, self.texts[token])
            if len(self._advance) > 500_000:
                self._advance.clear()
            self._advance[key] = nxt
        return None if nxt is None else (lex, nxt)

    def allowed_tokens(self, row: Row) -> list[int]:
        """Every allowed token id for ``row`` (the trie walked along the lexer, pruned where
        the lexer refuses a prefix)."""
        lex, s = row
        key = (id(lex), s)
        cached = self._allowed_all.get(key)
        if cached is not None:
            return cached
        out = [t for t in self.stops if lex.can_stop(s)]
        stack = [(self.trie.root, s)]
        memo: dict[tuple[State, str], State | None] = {}  # many nodes share a state
        while stack:
            (children, _), state = stack.pop()
            for ch, child in children.items():
                step = (state, ch)
                if step in memo:
                    nxt = memo[step]
                else:
                    nxt = memo[step] = lex.feed(state, ch)
                if nxt is None:
                    continue
                out.extend(child[1])
                if child[0]:
                    stack.append((child, nxt))
        if len(self._allowed_all) > 20_000:
            self._allowed_all.clear()
        self._allowed_all[key] = out
        return out

    def allowed(self, row: Row, scores_row: Any, need: int) -> list[int]:
        """The ``need`` best-scoring allowed tokens of one row (fewer if fewer exist)."""
        import torch

        found: list[int] = []
        k = min(self.FIRST_LOOK, scores_row.shape[-1])
        values, top = torch.topk(scores_row, k)
        for v, t in zip(values.tolist(), top.tolist(), strict=True):
            if v == float("-inf"):
                return found
            if self.advance(row, t) is not None:
                found.append(t)
                if len(found) >= need:
                    return found
        every = self.allowed_tokens(row)
        if not every:
            return []
        idx = torch.tensor(every, device=scores_row.device)
        sub = scores_row[idx]
        best = torch.topk(sub, min(need, len(every))).indices
        return [every[i] for i in best.tolist() if sub[i] != float("-inf")]

    def mask(self, scores: Any, rows: Sequence[Row], need: int) -> Any:
        """``scores`` (rows x vocab) with everything but each row's ``need`` best allowed
        tokens set to -inf. A row with no allowed token at all keeps only its stop tokens."""
        import torch

        out = torch.full_like(scores, float("-inf"))
        for r, row in enumerate(rows):
            if row[0] is None:  # no schema: not constrained
                out[r] = scores[r]
                continue
            keep = self.allowed(row, scores[r], need)
            if not keep:  # nothing fits (cannot happen while a stop is allowed): end the row
                keep = sorted(self.stops)
            idx = torch.tensor(keep, device=scores.device)
            out[r, idx] = scores[r, idx]
        return out
