"""Decoding options (`eval.decoding`): beam search, execution guidance, schema constraint."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from tests import tiny

SINGER = "CREATE TABLE singer (singer_id INT, name TEXT, age INT, country TEXT)"
CONCERT = "CREATE TABLE concert (concert_id INT, singer_id INT, year INT, stadium TEXT)"
ODD = 'CREATE TABLE "Home Town" ("Town Name" TEXT, pop INT)'


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    from dataset_utils.formatting import plan_format
    from dataset_utils.records import Example

    path = tiny.make_tiny_model(tmp_path_factory.mktemp("d") / "tiny")
    tok = tiny.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    schema = SINGER + "\n" + CONCERT
    examples = [
        Example(q, schema, "SELECT 1", "t")
        for q in ["How many singers?", "Names of singers over 30?", "Concerts per year?"]
    ]
    examples += [Example("Which towns?", ODD, "SELECT 1", "t")]
    examples += [Example("No schema at all?", "", "SELECT 1", "t")]
    return model, tok, plan_format("chatml", tok), examples


# -- beam search ----------------------------------------------------------------------------


def test_beam_search_with_one_beam_is_greedy(setup) -> None:
    from dataset_utils.formatting import encode_prompt_parts
    from evaluation.generation import _prefix_cached_beam, _prefix_cached_greedy, stop_token_ids

    model, tok, plan, examples = setup
    prompts, prefix = encode_prompt_parts(examples, tok, plan)
    stops = stop_token_ids(tok, plan)
    common = dict(batch_size=3, max_new_tokens=12, progress=False, desc="")
    greedy = _prefix_cached_greedy(model, prompts, prefix, stops, **common)
    beams = _prefix_cached_beam(model, prompts, prefix, stops, num_beams=1, **common)
    assert [b[0] for b in beams] == greedy
    assert all(len(b) == 1 for b in beams)


def test_prefix_beam_search_equals_generate(setup) -> None:
    """Same k candidates, same order, as ``model.generate(num_beams=k, early_stopping=True)``."""
    from evaluation.generation import generate_sql

    model, tok, plan, examples = setup
    common = dict(max_new_tokens=10, progress=False, num_beams=3, batch_size=6)
    ours = generate_sql(model, tok, examples, plan, engine="prefix", **common)
    ref = generate_sql(model, tok, examples, plan, engine="hf", **common)
    assert ours.candidates == ref.candidates
    assert ours.candidates is not None and all(len(c) == 3 for c in ours.candidates)
    assert ours.sql == [c[0] for c in ours.candidates]  # no guidance: the top beam
    assert ours.chosen is None


# -- execution guidance ---------------------------------------------------------------------


@pytest.fixture
def singer_db(tmp_path: Path) -> Path:
    path = tmp_path / "singer.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(SINGER)
    conn.executemany(
        "INSERT INTO singer VALUES (?, ?, ?, ?)", [(1, "Ann", 30, "France"), (2, "Bo", 41, "US")]
    )
    conn.commit()
    conn.close()
    return path


def test_execution_guidance_takes_the_best_candidate_that_runs_and_returns_rows(
    singer_db: Path,
) -> None:
    from dataset_utils.records import Example
    from evaluation.execution_guided import choose_candidate

    ex = Example("q", SINGER, "", "t", db_path=str(singer_db))

    def pick(*candidates: str) -> int:
        return choose_candidate(ex, list(candidates), timeout_s=0.5)

    no_col = "SELECT nme FROM singer"
    empty = "SELECT name FROM singer WHERE age > 99"
    rows = "SELECT name FROM singer"
    assert pick(no_col, empty, rows) == 2  # runs and returns rows beats a higher rank
    assert pick(no_col, empty) == 1  # else the best one that runs
    assert pick(no_col, "DROP TABLE singer", "not sql") == 0  # else the top beam
    assert pick("SELECT max(age) FROM singer WHERE age > 99", rows) == 1  # NULLs only: empty
    assert pick(rows, no_col) == 0
    # A candidate that runs past the time limit is skipped.
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    assert pick(forever, rows) == 1


def test_execution_guidance_on_schema_only_and_insert_rows() -> None:
    from dataset_utils.records import Example
    from evaluation.execution_guided import choose_candidate

    # Schema only: an empty database, so "returns rows" is not asked (it would favour the
    # aggregate, whose COUNT(*) row exists on any table).
    schema_only = Example("q", "CREATE TABLE t (a INT, b TEXT)", "", "t")
    cands = ["SELECT c FROM t", "SELECT a FROM t WHERE a > 5", "SELECT count(*) FROM t"]
    assert choose_candidate(schema_only, cands, timeout_s=0.5) == 1
    # INSERT rows in the context are data: "returns rows" counts again.
    with_rows = Example("q", "CREATE TABLE t (a INT); INSERT INTO t VALUES (1);", "", "t")
    cands = ["SELECT a FROM t WHERE a > 5", "SELECT a FROM t"]
    assert choose_candidate(with_rows, cands, timeout_s=0.5) == 1
    # Nothing to run on: the top beam.
    assert choose_candidate(Example("q", "", "", "t"), ["SELECT 1", "SELECT 2"], timeout_s=1) == 0


def test_generate_sql_returns_the_guided_candidate(
    setup, singer_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed beams (the top one names a missing column): generation returns the lower-ranked
    candidate that runs, and says which one it took."""
    import evaluation.generation as generation
    from dataset_utils.records import Example

    model, tok, plan, _ = setup
    beams = ["SELECT nme FROM singer", "SELECT name FROM singer WHERE age > 99", "SELECT name"]
    beams[2] += " FROM singer"
    fixed = [[tok.encode(b, add_special_tokens=False) for b in beams]]
    monkeypatch.setattr(generation, "_prefix_cached_beam", lambda *a, **k: fixed)
    ex = [Example("Names?", SINGER, "SELECT name FROM singer", "t", db_path=str(singer_db))]
    common = dict(num_beams=3, progress=False, max_new_tokens=8)
    gen = generation.generate_sql(model, tok, ex, plan, execution_guided=True, **common)
    assert gen.sql == ["SELECT name FROM singer"] and gen.chosen == [2]
    assert gen.candidates == [beams]
    plain = generation.generate_sql(model, tok, ex, plan, **common)
    assert plain.sql == ["SELECT nme FROM singer"] and plain.chosen is None


# -- schema constraint ----------------------------------------------------------------------


def _feed(context: str, text: str):
    from evaluation.schema_constraint import Lexer, State, schema_names

    lex = Lexer(schema_names(context))
    state = lex.feed(State(), text)
    return None if state is None else (lex, state)


def _complete_query(context: str, sql: str) -> bool:
    """The constraint lets ``sql`` be generated and then end."""
    row = _feed(context, sql)
    return row is not None and row[0].can_stop(row[1])


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM singer",
        "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.singer_id = T2.singer_id",
        "select s.name from singer s where s.age > 30 order by s.age desc limit 1",
        "SELECT name FROM singer WHERE country = 'Any words, even FROM nowhere'",
        'SELECT name FROM singer WHERE country = "France"',
        "SELECT `name`, [age] FROM singer",
        "SELECT count(*) AS n FROM concert GROUP BY year ORDER BY n DESC",
        "SELECT name FROM singer WHERE singer_id IN (SELECT singer_id FROM concert)",
        "SELECT singer.name FROM singer, concert WHERE singer.singer_id = concert.singer_id",
        "SELECT T1.name FROM singer AS T1 INTERSECT SELECT T1.stadium FROM concert AS T1",
        "SELECT T2.year FROM singer AS T1 JOIN concert AS T2 ON T1.singer_id = T2.singer_id",
        "SELECT CAST(age AS REAL) / 2.5e1 FROM singer;",
        # scopes: names the FROM clause binds
        "SELECT name, year FROM singer JOIN concert ON singer.singer_id = concert.singer_id",
        "SELECT singer.name FROM concert JOIN singer ON concert.singer_id = singer.singer_id",
        "SELECT year FROM concert JOIN singer ON concert.singer_id = singer.singer_id",
        # a correlated subquery reads the outer SELECT's tables
        "SELECT name FROM singer WHERE singer_id IN (SELECT singer_id FROM concert "
        "WHERE year > age)",
        "SELECT name FROM (SELECT name, age FROM singer) WHERE age > 3",  # columns unknown
        "SELECT count(*) FROM concert WHERE (year > 2000 AND stadium = 'x')",
        "SELECT max(year) FROM concert UNION SELECT max(age) FROM singer",
        "SELECT CAST(year AS REAL) FROM concert",
    ],
)
def test_constraint_accepts_valid_sql(sql: str) -> None:
    assert _complete_query(SINGER + "\n" + CONCERT, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT nme FROM singer",  # no such column
        "SELECT name FROM singers",  # no such table
        "SELECT name FROM name",  # a column where a table must be
        "SELECT singer.year FROM singer",  # year is concert's
        "SELECT T1.year FROM singer AS T1",  # ... and T1 is singer
        "SELECT xyz.name FROM singer",  # xyz is no table, and no alias can be that long
        "SELECT `nam` FROM singer",  # quoted identifiers are checked too
        'SELECT name FROM "singers"',  # a double-quoted table is an identifier
        "SELECT £ FROM singer",  # SQLite reads £ as a column name
        # scopes: names the FROM clause does not bind
        "SELECT name FROM concert",  # name is singer's: FROM must start with a table that has it
        "SELECT count(*) FROM concert WHERE country = 'France'",  # country is not concert's
        "SELECT count(*) FROM concert WHERE singer.age > 3",  # singer is not in the FROM
        "SELECT count(*) FROM concert WHERE year IN (SELECT age FROM concert)",
        "SELECT max(year) FROM concert UNION SELECT max(year) FROM singer",
        "SELECT count(*) FROM concert GROUP BY (country)",
        # the heuristic: a column of a table joined later, unqualified
        "SELECT year FROM singer JOIN concert ON singer.singer_id = concert.singer_id",
    ],
)
def test_constraint_rejects_names_outside_the_schema(sql: str) -> None:
    assert not _complete_query(SINGER + "\n" + CONCERT, sql)


def test_constraint_cannot_end_before_a_used_alias_is_defined() -> None:
    context = SINGER + "\n" + CONCERT
    lex, state = _feed(context, "SELECT T1.name FROM singer")  # type: ignore[misc]
    assert not lex.can_stop(state)  # T1 used, never defined
    lex, state = _feed(context, "SELECT s.name FROM singer")  # type: ignore[misc]
    assert not lex.can_stop(state)
    lex, state = _feed(context, "SELECT s.name FROM singer s")  # type: ignore[misc]
    assert lex.can_stop(state)
    lex, state = _feed(context, "SELECT T1.name FROM singer AS T1")  # type: ignore[misc]
    assert lex.can_stop(state)
    lex, state = _feed(context, "SELECT name FROM singer WHERE country = 'Fr")  # type: ignore[misc]
    assert not lex.can_stop(state)  # inside a string
    assert _feed(context, "SELECT name FROM singer;\nSELECT") is None  # one statement


def test_constraint_leads_the_from_clause_to_a_table_with_the_columns_used() -> None:
    from evaluation.schema_constraint import Lexer, State, schema_names

    lex = Lexer(schema_names(SINGER + "\n" + CONCERT))
    state = lex.feed(State(), "SELECT name, age FROM ")
    assert state is not None
    assert lex.feed(state, "concert") is None and lex.feed(state, "con") is None
    assert lex.feed(state, "singer") is not None
    # no table has both: any table may come first (a join may bring the other)
    state = lex.feed(State(), "SELECT name, year FROM ")
    assert state is not None and lex.feed(state, "concert") is not None
    # off: only the names bound after FROM are checked
    free = Lexer(schema_names(SINGER + "\n" + CONCERT), first_table=False)
    assert free.feed(State(), "SELECT name FROM concert") is not None


def test_constraint_refuses_no_correct_spider_train_query_but_late_joined_columns(
    spider_full_dir: Path,
) -> None:
    """Recall on Spider train's 6,904 gold queries (compact prompts, the main job's): without
    the first-table rule every query SQLite runs is accepted; the rule refuses under 1%."""
    from dataset_utils.schema import schema_from_sqlite
    from evaluation.schema_constraint import Lexer, State, schema_names

    contexts: dict[str, str] = {}
    refused: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
    rows = [json.loads(line) for line in (spider_full_dir / "train_spider.jsonl").open()]
    for r in rows:
        db = str(spider_full_dir / "database" / r["db_id"] / f"{r['db_id']}.sqlite")
        if r["db_id"] not in contexts:
            contexts[r["db_id"]] = schema_from_sqlite(db, "compact")
        for first_table in (True, False):
            lex = Lexer(schema_names(contexts[r["db_id"]], db), first_table=first_table)
            state = lex.feed(State(), r["query"])
            if state is None or not lex.can_stop(state):
                refused[first_table].append((db, r["query"]))
    runs = []
    for db, query in refused[False]:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            try:
                conn.execute(query).fetchall()
                runs.append(query)
            except sqlite3.Error:
                pass
    assert len(rows) == 6904 and runs == [] and len(refused[False]) <= 2
    assert len(refused[True]) <= 69  # 1%; 59 measured (58 + the one SQLite cannot run)


@pytest.mark.parametrize("style", ["ddl", "compact", "columns"])
def test_constraint_accepts_every_spider_dev_gold_query(spider_dir: Path, style: str) -> None:
    """Recall: the constraint never blocks a correct Spider dev query (with its own schema,
    in each prompt style)."""
    from dataset_utils.schema import schema_from_sqlite

    rejected = []
    rows = [json.loads(line) for line in (spider_dir / "dev.jsonl").open()]
    for r in rows:
        db = spider_dir / "database" / r["db_id"] / f"{r['db_id']}.sqlite"
        if not _complete_query(schema_from_sqlite(str(db), style), r["query"]):
            rejected.append(r["query"])
    assert len(rows) > 900 and rejected == []


# Every prompt rendering of a real Spider dev schema: (schema_style, source options).
PROMPT_OPTIONS = [
    (style, opts)
    for style in ("ddl", "compact", "columns")
    for opts in (
        {},
        {"sample_values": 3},
        {"foreign_keys": "sqlite"},
        {"foreign_keys": "tables_json"},
        {"foreign_keys": "none"},
        {"max_tables": 2},
        {"max_tables": 3, "sample_values": 2, "foreign_keys": "tables_json"},
    )
]


def _shown_tables(example, style: str, opts: dict, tables_json: str) -> tuple:
    """The tables a Spider prompt shows, from the SQLite file (not from the text): kept by
    ``max_tables``, with the columns, types, keys and foreign keys that style renders."""
    from dataset_utils.schema import (
        Table,
        read_tables,
        relevant_tables,
        tables_json_foreign_keys,
    )

    tables = read_tables(example.db_path)
    if opts.get("max_tables"):
        kept = {
            t.lower()
            for t in relevant_tables(example.db_path, example.question, opts["max_tables"])
        }
        tables = tuple(t for t in tables if t.name.lower() in kept)
    present = {t.name.lower() for t in tables}
    fk_source = opts.get("foreign_keys") or ("none" if style == "columns" else "sqlite")
    json_keys = tables_json_foreign_keys(tables_json, example.db_id)
    out = []
    for t in tables:
        keys = {"sqlite": t.foreign_keys, "none": ()}.get(
            fk_source, json_keys.get(t.name.lower(), ())
        )
        out.append(
            Table(
                t.name,
                tuple((c, ctype if style == "ddl" else "") for c, ctype in t.columns),
                t.primary_key if style == "ddl" else (),
                tuple(k for k in keys if k.ref_table.lower() in present),
            )
        )
    return tuple(out)


@pytest.mark.parametrize(("style", "opts"), PROMPT_OPTIONS)
def test_schema_names_reads_every_spider_prompt_rendering(
    spider_full_dir: Path, style: str, opts: dict
) -> None:
    """Every Spider dev prompt, in every schema_style with sample values, each foreign-key
    source and pruning: the constraint sees exactly the tables the prompt shows and all their
    columns, from the text alone (the served model gets no database) and with the file."""
    from dataset_utils.schema import parse_tables, read_tables
    from dataset_utils.sources import SourceSpec, load_source
    from evaluation.schema_constraint import schema_names

    spec = SourceSpec(
        format="spider", path=str(spider_full_dir), split="dev", schema_style=style, **opts
    )
    rows = load_source(spec).examples
    assert len(rows) == 972 and len({e.db_id for e in rows}) == 19
    tables_json = str(spider_full_dir / "tables.json")
    seen = set()
    for e in rows:
        key = (e.context, e.db_path)
        if key in seen:
            continue
        seen.add(key)
        shown = _shown_tables(e, style, opts, tables_json)
        # The parser reads back exactly what was rendered (names, types, keys).
        assert parse_tables(e.context) == shown, e.context
        want_tables = frozenset(t.name.lower() for t in shown)
        want_columns = {t.name.lower(): frozenset(c.lower() for c, _ in t.columns) for t in shown}
        for names in (schema_names(e.context), schema_names(e.context, e.db_path)):
            assert names.tables == want_tables
            assert names.table_columns == want_columns
        if (
            style == "ddl"
            and not opts.get("max_tables")
            and opts.get("foreign_keys")
            in (
                None,
                "sqlite",
            )
        ):
            assert parse_tables(e.context) == read_tables(e.db_path)
    assert len({e.db_id for e in rows}) == 19 and len(seen) >= 19


def test_compact_prompt_is_read_without_the_database(spider_full_dir: Path) -> None:
    """Regression: the main job's ``schema_style: compact`` (typeless columns + FOREIGN KEY
    lines) gave the constraint no table at all, so it forbade every name and 0% of the
    constrained outputs executed. The prompt text alone must give the schema."""
    from dataset_utils.schema import schema_from_sqlite

    db = spider_full_dir / "database" / "concert_singer" / "concert_singer.sqlite"
    context = schema_from_sqlite(str(db), "compact")
    assert "FOREIGN KEY" in context
    sql = (
        "SELECT T2.name FROM singer_in_concert AS T1 JOIN singer AS T2 "
        "ON T1.singer_id = T2.singer_id JOIN concert AS T3 ON T1.concert_id = T3.concert_id "
        "WHERE T3.year = 2014"
    )
    assert _complete_query(context, sql)
    assert not _complete_query(context, sql.replace("T2.name", "T2.nme"))


@pytest.fixture(scope="module")
def smollm2():
    from trainer.config import ModelArgs
    from trainer.modeling import load_tokenizer

    return load_tokenizer(ModelArgs(name_or_path="embedded:smollm2-135m-instruct"))


def test_constraint_lets_smollm2_write_spider_gold_queries_on_compact_prompts(
    spider_full_dir: Path, smollm2
) -> None:
    """~50 Spider dev questions (spread over the databases) as the main job prompts them
    (compact schema, SQLite file known): greedy decoding whose scores put the gold SQL's next
    SmolLM2 token first keeps that token under the constraint, token by token, and may stop
    at the end -- the constraint never blocks the correct answer."""
    from dataset_utils.formatting import plan_format
    from dataset_utils.sources import SourceSpec, load_source
    from evaluation.generation import stop_token_ids
    from evaluation.schema_constraint import SchemaConstraint

    spec = SourceSpec(
        format="spider", path=str(spider_full_dir), split="dev", schema_style="compact"
    )
    rows = load_source(spec).examples
    picked = rows[:: len(rows) // 50]
    assert len(picked) >= 50 and len({e.db_id for e in picked}) >= 15
    stops = stop_token_ids(smollm2, plan_format("chatml", smollm2))
    constraint = SchemaConstraint(smollm2, stops)
    vocab = len(constraint.texts)
    for n, e in enumerate(picked):
        row = constraint.initial_state(e.context, e.db_path)
        assert row[0] is not None  # the prompt's schema was read: the row is constrained
        ids = smollm2.encode(e.sql, add_special_tokens=False)
        assert smollm2.decode(ids) == e.sql
        for t in [*ids, stops[0]]:
            if n % 5 == 0:  # through the scores mask too (a fifth of them: 49k-wide tensors)
                scores = torch.zeros(1, vocab)
                scores[0, t] = 1.0
                assert int(constraint.mask(scores, [row], 1)[0].argmax()) == t, (e.sql, t)
            nxt = constraint.advance(row, t)
            assert nxt is not None
            row = nxt
        # ... and a name outside the schema is refused at once.
        bad = constraint.initial_state(e.context, e.db_path)
        for t in smollm2.encode("SELECT no_such_column_xyz", add_special_tokens=False):
            bad = constraint.advance(bad, t)
            if bad is None:
                break
        assert bad is None


def test_generation_passes_the_database_to_the_constraint_in_every_engine(
    setup, singer_db: Path
) -> None:
    """A context the parser cannot read: with the row's SQLite file, every engine constrains
    the row to the file's schema; without it (same prompt, same batch), the row decodes
    exactly as unconstrained."""
    from dataset_utils.records import Example
    from evaluation.generation import generate_sql

    model, tok, plan, _ = setup
    prose = "Table singer has the columns singer_id, name, age and country."
    rows = [
        Example("Names?", prose, "SELECT 1", "t", db_path=str(singer_db)),
        Example("Names?", prose, "SELECT 1", "t"),
    ]
    for engine, beams in (("prefix", 1), ("prefix", 2), ("hf", 1), ("hf", 2)):
        common = dict(max_new_tokens=10, progress=False, num_beams=beams, engine=engine)
        free = generate_sql(model, tok, rows, plan, **common)
        free_out = free.candidates or [[r] for r in free.raw]
        assert _identifiers_outside(SINGER, free_out[0][0])  # unconstrained, it strays
        gen = generate_sql(model, tok, rows, plan, schema_constrained=True, **common)
        out = gen.candidates or [[r] for r in gen.raw]
        for text in out[0]:
            assert _identifiers_outside(SINGER, text) == [], (engine, beams, text)
        assert out[1] == free_out[1], (engine, beams)


def _defines_alias(tokens: list, i: int, tables: dict) -> bool:
    from sqlglot.tokens import TokenType

    prev = tokens[i - 1] if i else None
    return prev is not None and (prev.token_type == TokenType.ALIAS or prev.text.lower() in tables)


def _identifiers_outside(context: str, text: str) -> list[str]:
    """Independent check with sqlglot's SQLite tokenizer: identifier tokens (not keywords,
    strings or numbers) that are neither schema names nor aliases the text defines.

    A word at the very end is left out: generation may have been cut in the middle of it."""
    import re

    from sqlglot.dialects.sqlite import SQLite
    from sqlglot.errors import TokenError
    from sqlglot.tokens import TokenType

    from evaluation.schema_constraint import KEYWORDS
    from evaluation.synth_db import parse_schema

    tables = parse_schema(context) if context else {}
    names = {t.lower() for t in tables} | {
        c.name.lower() for t in tables.values() for c in t.columns
    }
    text = re.sub(r"[\w\x80-\U0010ffff]+$", "", text)
    # The constraint knows no comments (words after -- or /* are checked like any other):
    # keep the tokenizer from skipping them too.
    text = text.replace("-", " ").replace("/*", "/ *")
    while True:
        try:
            tokens = SQLite.Tokenizer().tokenize(text)
            break
        except TokenError:  # an unterminated string at the end: its content is a literal
            cut = max(text.rfind(q) for q in "'\"`[")
            if cut < 0:
                raise
            text = text[:cut]
    bad = []
    for i, tk in enumerate(tokens):
        if tk.token_type not in (TokenType.VAR, TokenType.IDENTIFIER):
            continue
        word = tk.text.lower()
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        defines_alias = _defines_alias(tokens, i, tables)
        late_alias = (word[:1] == "t" and word[1:].isdigit()) or len(word) <= 2
        qualifier = nxt is not None and nxt.token_type == TokenType.DOT
        double_quoted = tk.token_type == TokenType.IDENTIFIER and text[tk.start] == '"'
        table_position = prev is not None and prev.token_type in (TokenType.FROM, TokenType.JOIN)
        if double_quoted and not table_position:
            continue  # "x" outside a table position: SQLite's string-or-column
        if word in names or word in KEYWORDS or defines_alias or (late_alias and qualifier):
            continue
        if any(
            t.text.lower() == word and _defines_alias(tokens, j, tables)
            for j, t in enumerate(tokens)
        ):
            continue  # an alias defined elsewhere in the text
        bad.append(tk.text)
    return bad


def test_constrained_tiny_model_never_names_anything_outside_the_schema(setup) -> None:
    from evaluation.generation import generate_sql

    model, tok, plan, examples = setup
    examples = examples[2:]  # a two-table schema, quoted names, no schema
    assert examples[-1].context == ""
    for beams in (1, 2):
        common = dict(max_new_tokens=16, progress=False, num_beams=beams)
        free = generate_sql(model, tok, examples, plan, **common)
        free_out = free.candidates or [[r] for r in free.raw]
        pairs = zip(examples, free_out, strict=True)
        assert any(_identifiers_outside(e.context, c[0]) for e, c in pairs)
        gen = generate_sql(model, tok, examples, plan, schema_constrained=True, **common)
        outputs = gen.candidates or [[r] for r in gen.raw]
        for ex, cands in zip(examples[:-1], outputs, strict=False):
            for text in cands:
                assert _identifiers_outside(ex.context, text) == [], text
        # A prompt without a schema is not constrained (forbidding every name would only
        # force garbage): it decodes exactly as without the option.
        assert outputs[-1] == free_out[-1]


@pytest.mark.parametrize("seed", range(4))
def test_constraint_on_random_scores_stays_in_the_schema(setup, seed: int) -> None:
    """Random next-token scores (quotes banned, so no escape into string literals): every
    word the constraint lets through is a keyword, a schema name or a defined alias."""
    from evaluation.generation import stop_token_ids
    from evaluation.schema_constraint import SchemaConstraint

    _, tok, plan, _ = setup
    context = [SINGER + "\n" + CONCERT, ODD][seed % 2]
    constraint = SchemaConstraint(tok, stop_token_ids(tok, plan))
    quotes = torch.tensor([any(q in t for q in "'\"`[") for t in constraint.texts])
    gen = torch.Generator().manual_seed(seed)
    row = constraint.initial_state(context)
    text = ""
    for _ in range(60):
        scores = torch.randn(len(constraint.texts), generator=gen)
        scores[quotes] = float("-inf")
        token = int(constraint.mask(scores[None], [row], 1)[0].argmax())
        if token in constraint.stops:
            break
        nxt = constraint.advance(row, token)
        assert nxt is not None
        row = nxt
        text += constraint.texts[token]
    assert sum(c.isalpha() for c in text) > 20
    assert _identifiers_outside(context, text) == [], text


# -- recorded and served --------------------------------------------------------------------


def test_decoding_is_recorded_and_the_served_model_decodes_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spider_dir: Path
) -> None:
    """Train a tiny LoRA run with non-greedy eval.decoding, mirror it: the options are in the
    report, the run's params, the model's metadata and spec, and the pyfunc loaded back from
    MLflow returns the evaluation's own SQL on the rows it can see the same way (schema-only
    rows: a Spider row's guidance ran on its real database, which a client does not send)."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from cluster.mirror import mirror_local_trial
    from trainer.experiment import load_experiment
    from trainer.local_runner import launch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    model_dir = tiny.make_tiny_model(tmp_path / "tiny")
    exp = tiny.write_experiment(tmp_path / "exp.yaml", model_dir, steps=2)
    decoding = {"num_beams": 2, "execution_guided": True, "schema_constrained": True}
    overrides = [f"eval.decoding.{k}={str(v).lower()}" for k, v in decoding.items()]
    overrides += ["eval.compare_base=false", "eval.generation_samples=2", "eval.max_new_tokens=8"]
    result = launch(load_experiment(exp, overrides), tmp_path / "runs", progress=False)
    mirrored = mirror_local_trial(result.trial.path, progress=False)

    uuid = result.trial.checkpoints()[-1]["uuid"]
    report = json.loads((result.trial.path / f"evaluation-{uuid[:8]}" / "report.json").read_text())
    assert report["decoding"] == decoding
    client = MlflowClient(tracking_uri=mirrored.tracking_uri)
    params = client.get_run(mirrored.run_id).data.params
    assert {k: params[f"decoding.{k}"] for k in decoding} == {
        k: str(v) for k, v in decoding.items()
    }
    mlflow.set_tracking_uri(mirrored.tracking_uri)
    info = mlflow.models.get_model_info(mirrored.model_uri)
    assert info.metadata["decoding"] == decoding
    local = Path(mlflow.artifacts.download_artifacts(mirrored.model_uri))
    spec = json.loads(next(local.rglob("text2sql_model.json")).read_text())
    assert spec["decoding"] == decoding

    # The evaluation's SQL (report rows) == the served model's SQL, on schema-only rows.
    from evaluation.checkpoint_eval import test_examples
    from trainer.checkpoint import load_checkpoint

    examples = test_examples(load_checkpoint(result.trial.checkpoint_path(uuid)))
    rows = [(e, r) for e, r in zip(examples, report["examples"], strict=True) if not e.db_path]
    assert rows
    pyfunc = mlflow.pyfunc.load_model(mirrored.model_uri)
    frame = pd.DataFrame([{"question": e.question, "context": e.context} for e, _ in rows])
    served = list(pyfunc.predict(frame, params={"max_new_tokens": 8})["sql"])
    assert served == [r["fine-tuned_sql"] for _, r in rows]
