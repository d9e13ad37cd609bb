"""The normalized text-to-SQL record every source is mapped to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One text-to-SQL example, whatever dataset it came from.

    Attributes:
        question: the natural-language question.
        context: the schema the SQL runs against, as SQL DDL (``CREATE TABLE ...;``). For gretel
            it also carries ``INSERT`` rows. For Spider it is read from the SQLite file.
        sql: the gold SQL query.
        source: short name of the source dataset (``spider``, ``sql-create-context``, ...).
        db_id: database identifier (Spider-style data), else None.
        db_path: path to a SQLite database the gold SQL runs on (Spider-style), else None.
        difficulty: ``easy`` / ``medium`` / ``hard`` by the Determined recipe's word count, or
            None when the length is outside every bucket.
        complexity: the dataset's own complexity label (gretel ``sql_complexity``), else None.
        hardness: Spider's hardness level of the gold SQL (``easy`` / ``medium`` / ``hard`` /
            ``extra``, `dataset_utils.hardness`); set on validation and test rows, None where
            the SQL does not parse.
        instruction: the instruction text for datasets that carry one (Clinton), else "".
        extra: any other original columns worth keeping (``domain``, ``sql_task_type``...).
    """

    question: str
    context: str
    sql: str
    source: str
    db_id: str | None = None
    db_path: str | None = None
    difficulty: str | None = None
    complexity: str | None = None
    hardness: str | None = None
    instruction: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        return cls(**data)
