"""Gateway claims stored in batches (meterhub.cluster.claims) against a real database (SQLite;
PostgreSQL with METERHUB_TEST_DB=postgresql): a storm of CONNECTs is a few transactions, and every
claim still gets its own generation, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from conftest import TEST_DB, drop_postgres, fresh_postgres_url
from meterhub.cluster.claims import ClaimBatcher
from meterhub.storage import schema
from meterhub.storage.database import create_db_engine, migrate


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = fresh_postgres_url() if TEST_DB == "postgresql" else f"sqlite:///{tmp_path / 'claims.db'}"
    eng = create_db_engine(url)
    migrate(eng)
    yield eng
    eng.dispose()
    if TEST_DB == "postgresql":
        drop_postgres(url)


def test_a_storm_of_claims_is_a_few_transactions_each_claim_with_its_own_generation(engine: Engine) -> None:
    async def main() -> list[tuple[str | None, int]]:
        claims = ClaimBatcher(engine, "node-a")
        gateways = [f"gw-{i:03d}" for i in range(200)] + ["gw-007"]  # gw-007 connects twice
        results = await asyncio.wait_for(asyncio.gather(*(claims.claim(gw) for gw in gateways)), 30)
        assert claims.batches <= 2, claims.batches  # the first claim alone, then all the others
        again = await claims.claim("gw-001")  # later, from another node's point of view: a takeover
        return [*results, again]

    results = asyncio.run(main())
    assert results[:200] == [(None, 1)] * 200  # first claims: nobody held them before
    assert results[200] == ("node-a", 2)  # gw-007's second CONNECT: after its first, in arrival order
    assert results[201] == ("node-a", 2)
    with engine.connect() as conn:
        rows = dict(
            (r[0], r[1])
            for r in conn.execute(select(schema.gateways.c.gateway_id, schema.gateways.c.session_gen))
        )
    assert len(rows) == 200
    assert (rows["gw-007"], rows["gw-001"], rows["gw-000"]) == (2, 2, 1)
