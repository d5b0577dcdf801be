"""The test harness: what the tests build on instead of importing each other.

- `tests.harness.db`: the analysts' contract written out (the oracle a migration is checked against), records and
  the submit/score steps a client and a worker take, reading the views back, concurrency, the roles' refusals.
- `tests.harness.scenarios`: database scenarios that take a session factory and run unchanged on SQLite
  (tests/unit) and PostgreSQL (tests/integration).

The database fixtures (`db_url`, `engine`, `factory`) live in tests/conftest.py: SQLite there, PostgreSQL under
tests/integration (its conftest overrides `db_url`).
"""

import pytest

# The harness asserts on the tests' behalf: let pytest show the values when one of its asserts fails.
pytest.register_assert_rewrite("tests.harness.db", "tests.harness.scenarios")
