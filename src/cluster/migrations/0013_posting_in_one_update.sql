-- Cluster books, version 13: the treasurer marks the debits an append
-- posted in one UPDATE, not one per debit. In the cluster bench the loop
-- of version 12 ran 182,170 statements in 30 s of load (39 µs each), the
-- largest share of the database's CPU per request after shipping itself.
-- The UPDATE is planned for each batch (EXECUTE), through the partial
-- index cg_debits_request, as version 12's lookups were.
CREATE OR REPLACE FUNCTION cg_append_books(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
                                           p_wallets text[], p_orgs bigint[], p_deltas numeric[], p_posts text[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_new bigint[];
    v_posted uuid[];
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
    -- The new records' posted debits (a hash join, not a scan of v_new per
    -- record), then all marked in one statement, planned for this batch
    -- (EXECUTE): a generic plan cannot see how few ids there are.
    SELECT COALESCE(array_agg(t.post::uuid), '{}') INTO v_posted
        FROM unnest(p_origins, p_posts) AS t(origin, post)
        JOIN unnest(v_new) AS n(origin) ON n.origin = t.origin
        WHERE t.post IS NOT NULL;
    IF cardinality(v_posted) > 0 THEN
        EXECUTE 'UPDATE cg_debits SET posted = true WHERE NOT posted AND request_id = ANY ($1)' USING v_posted;
    END IF;
    RETURN cardinality(v_new);
END $$;
