"""Evaluation: generate SQL with a model, then judge it by executing it safely.

Modules:

- `evaluation.sandbox`: the only place SQL is executed (read-only, authorizer, time and row
  limits). Model-generated SQL is untrusted input.
- `evaluation.execution`: result comparison (multiset or ordered, normalized values, column
  permutations tolerated).
- `evaluation.synth_db`: test-suite style synthetic SQLite databases for schema-only datasets.
- `evaluation.db_variants`: test-suite variants of a real (Spider) database, aimed at the gold.
- `evaluation.sql_metrics`: SQL normalization, exact match, validity, corpus BLEU.
- `evaluation.postprocess`: pull the SQL out of a model's raw text.
- `evaluation.judge`: judge one prediction (`judge_example`) or a whole run (`score`); its
  calibration against systematically wrong SQL is tooling outside the package
  (``benchmarks/perturb.py``, run by ``benchmarks/judge_calibration.py``).
- `evaluation.report`: JSON / Markdown / PNG reports and MLflow logging.
- `evaluation.generation`: batched generation, greedy or beam search (needs torch/transformers);
  `evaluation.schema_constraint` and `evaluation.execution_guided`: the decoding options.

Nothing here runs at import time; importing the package is cheap.
"""
