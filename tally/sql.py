"""The SQL store's schema, for apps that manage their database with migrations (Alembic: add
``tally.sql.metadata`` to ``target_metadata``).  Needs the ``sql`` extra (SQLAlchemy 2)."""

from .stores.sql import counters_table, metadata, values_table

__all__ = ["counters_table", "metadata", "values_table"]
