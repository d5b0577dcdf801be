"""The test harness: what the tests build on instead of importing each other.

- `tests.harness.db`: the analysts' contract written out (the oracle a migration is checked against), records and
  the submit/score steps a client and a worker take, reading the views back, concurrency, the roles' refusals.
- `tests.harness.scenarios`: database scenarios that take a session factory and run unchanged on SQLite
  (tests/unit) and PostgreSQL (tests/integration).
- `tests.harness.services`: the machine's Redis, throwaway PostgreSQL databases, migrating with role passwords.
- `tests.harness.cli`: `allscore ARGS` in a child process, as a user runs it.
- `tests.harness.oracles`: expected values computed independently of the product (the Wilson interval).
- `tests.harness.artifacts`, `tests.harness.compose`: a tiny saved model and its manifest; `docker-compose config`.
- `tests.harness.faults`: free ports, waiting for a condition, a TCP proxy a test can cut or freeze, a Redis server
  of the test's own.
- `tests.harness.review_site`: `allscore review` served on a free port, and logging in to it.

Still beside the tests (other sessions' tests import them there): tests/fixtures.py (the session's synthetic data
and tiny model), tests/worker_process.py, tests/integration/stack.py.

The database fixtures (`db_url`, `engine`, `factory`) live in tests/conftest.py: SQLite there, PostgreSQL under
tests/integration (its conftest overrides `db_url`).
"""

import pytest

# The harness asserts on the tests' behalf: let pytest show the values when one of its asserts fails.
pytest.register_assert_rewrite(
    "tests.harness.cli",
    "tests.harness.db",
    "tests.harness.faults",
    "tests.harness.review_site",
    "tests.harness.scenarios",
    "tests.harness.services",
)
