-- Cluster books, version 8: usage reports as SQL aggregates.
--
-- A report reads one organization's wallets (cg_wallets_org) and, per
-- wallet, its debits in a time range. This index serves that range scan and
-- holds only what a report counts: limit counters ("limit:%" rows, shipped
-- beside every credit debit) are not usage, and a debit the treasurer
-- refused to post (post_error) is not in the ledger. So it is about half
-- the size of cg_debits_wallet_at on an organization with limits.
CREATE INDEX cg_debits_usage ON cg_debits (wallet, at)
    WHERE wallet NOT LIKE 'limit:%' AND post_error IS NULL;
