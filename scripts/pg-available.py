"""Exit 0 if the test PostgreSQL server (METERHUB_TEST_PG) accepts connections, else 1."""

import os
import sys

from sqlalchemy import create_engine, text

url = os.environ.get("METERHUB_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432") + "/postgres"
try:
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    with engine.connect() as conn:
        conn.execute(text("select 1"))
except Exception as exc:
    print(f"PostgreSQL at {url}: {exc.__class__.__name__}", file=sys.stderr)
    sys.exit(1)
