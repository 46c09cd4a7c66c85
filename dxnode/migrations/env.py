"""Alembic environment: runs dxnode's migrations against the URL set by dxnode.store.upgrade.

The chain is linear; files in versions/ are named ``mNN_<revision id>_<what>.py`` by position in
the chain, the revision ids are the released ones and never change. README.md here says how to
add the next migration (tests/test_migrations.py checks the rules).
"""

from alembic import context

from dxnode.store import Base, make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Run migrations in a transaction on a dxnode engine (WAL, busy timeout for SQLite)."""
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no sqlalchemy.url: run migrations with `dxnode db upgrade`")
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
