-- Cluster books, version 4: the treasurer's records move the shared books.
--
-- What replicas may lease (cg_wallets.balance) follows the treasurer's
-- ledger: every credit or write-off it records (a purchase, a grant, an
-- expiry) is applied to the wallet's row, and recorded in cg_funding, in
-- the same transaction that appends the record to the log; debits are not,
-- because shipping them (cg_ship_debits) already took them off. And every
-- shipped debit is posted to the treasurer's ledger exactly once: it is
-- marked posted in the transaction that appends its settle record, so a
-- new treasurer that has read the log to its end knows which are left.

ALTER TABLE cg_debits
    ADD COLUMN request_id uuid GENERATED ALWAYS AS (
        CASE WHEN body ? 'request_id' THEN (body->>'request_id')::uuid END) STORED,
    ADD COLUMN posted boolean NOT NULL DEFAULT false,
    ADD COLUMN post_error text;
CREATE INDEX cg_debits_unposted ON cg_debits (shipped_at, replica, entry) WHERE NOT posted;
CREATE INDEX cg_debits_request ON cg_debits (request_id) WHERE NOT posted;

-- A new credit or write-off row may name a wallet no lease touched yet.
ALTER TABLE cg_funding ALTER COLUMN idempotency_key DROP NOT NULL;

-- cg_append_as_treasurer, moving the books with the records it adds: per
-- record, p_wallets/p_orgs/p_deltas give a credit or write-off (NULL when
-- the record is none) and p_posts the request a posted debit settles (NULL
-- when it is none). A retried batch adds and moves nothing twice.
CREATE FUNCTION cg_append_books(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
                                p_wallets text[], p_orgs bigint[], p_deltas numeric[], p_posts text[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_new bigint[];
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239);
    IF NOT EXISTS (SELECT 1 FROM cg_treasurer t WHERE t.epoch = p_epoch AND t.replica = p_replica) THEN
        RAISE EXCEPTION 'treasury epoch % of % is over', p_epoch, p_replica USING ERRCODE = 'CG001';
    END IF;
    SELECT COALESCE(array_agg(o), '{}') INTO v_new FROM unnest(p_origins) o
        WHERE NOT EXISTS (SELECT 1 FROM cg_log e WHERE e.replica = p_replica AND e.origin = o);
    PERFORM 1 FROM cg_append(p_replica, p_origins, p_bodies);
    -- Rows first, in name order (the lock order of every other function).
    INSERT INTO cg_wallets (wallet, org)
        SELECT DISTINCT t.wallet, t.org FROM unnest(p_origins, p_wallets, p_orgs) AS t(origin, wallet, org)
        WHERE t.wallet IS NOT NULL AND t.origin = ANY (v_new)
        ORDER BY t.wallet
        ON CONFLICT (wallet) DO NOTHING;
    PERFORM 1 FROM cg_wallets w WHERE w.wallet = ANY (p_wallets) ORDER BY w.wallet FOR UPDATE;
    UPDATE cg_wallets w SET balance = w.balance + s.delta
        FROM (SELECT t.wallet, sum(t.delta) AS delta
              FROM unnest(p_origins, p_wallets, p_deltas) AS t(origin, wallet, delta)
              WHERE t.wallet IS NOT NULL AND t.origin = ANY (v_new) GROUP BY t.wallet) s
        WHERE w.wallet = s.wallet;
    INSERT INTO cg_funding (org, wallet, amount, idempotency_key)
        SELECT t.org, t.wallet, t.delta, NULL
        FROM unnest(p_origins, p_wallets, p_orgs, p_deltas) AS t(origin, wallet, org, delta)
        WHERE t.wallet IS NOT NULL AND t.origin = ANY (v_new);
    UPDATE cg_debits d SET posted = true
        WHERE NOT d.posted AND d.request_id IN (
            SELECT t.post::uuid FROM unnest(p_origins, p_posts) AS t(origin, post)
            WHERE t.post IS NOT NULL AND t.origin = ANY (v_new));
    RETURN cardinality(v_new);
END $$;
