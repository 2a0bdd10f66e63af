-- Cluster books, version 22: funding and open leases found by wallet.
--
-- cg_set_limit sums a limit period's funding each time it sets a cap (a
-- replica's first hold in a new period, a changed cap), and `ledger verify`
-- sums every wallet's funding and open leases. Without these indexes each
-- such sum read every funding row and every lease ever recorded: a row per
-- cap change per key, user and app per period, and a lease per draw, so a
-- new day's first holds and the audit grew slower with the books' age.
--
-- Built CONCURRENTLY, statement by statement outside a transaction (see
-- migrate.rs): replicas of the older version go on drawing, renewing and
-- shipping while the indexes build. The migrator drops an index an
-- interrupted build left invalid and keeps one it finished.
CREATE INDEX CONCURRENTLY IF NOT EXISTS cg_funding_wallet ON cg_funding (wallet);
CREATE INDEX CONCURRENTLY IF NOT EXISTS cg_leases_wallet_open ON cg_leases (wallet) WHERE closed_at IS NULL;
