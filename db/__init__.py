"""The scoring database: models, engine and sessions, repository functions, migrations, analyst views.

Modules: ``engine`` (engines, sessions, transactions), ``models`` (tables), ``views`` (the analyst views
as read-only tables), ``records`` (what the worker hands in), ``repository`` (reads and writes; never
commits), ``migrate`` (Alembic upgrade under a lock), ``errors`` (typed errors).
"""
