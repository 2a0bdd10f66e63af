-- Cluster books, version 27: the debits to post, found by their number.
--
-- Only debits the treasurer must post are numbered (not limit counters,
-- not debits of nothing), so the index holds one entry per posted debit,
-- each above the last: an insert at the right edge of the tree.
--
-- Built CONCURRENTLY, on its own outside a transaction (see migrate.rs):
-- replicas of the older version go on shipping meanwhile. No semicolon in
-- these comments: such a migration is split into statements at each one.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS cg_debits_post_seq ON cg_debits (post_seq) WHERE post_seq IS NOT NULL;
