-- Cluster books, version 13: the debits waiting for the treasurer are a
-- queue of their own, not a flag on cg_debits. Marking a debit posted
-- rewrote its whole row (body included) and, since the flag is in the
-- predicate of two partial indexes, every index entry of it too: each
-- debit was written twice. Now a shipped debit is written once, with a
-- small row in cg_unposted beside it, and posting deletes that row in the
-- transaction that appends its settle record to the log (as the flag was
-- set), so a debit is still posted exactly once however often the
-- treasury changes hands.
CREATE TABLE cg_unposted (
    replica    text NOT NULL,
    entry      bigint NOT NULL,
    request_id uuid,
    shipped_at timestamptz NOT NULL,
    PRIMARY KEY (replica, entry)
);
CREATE INDEX cg_unposted_order ON cg_unposted (shipped_at, replica, entry);
CREATE INDEX cg_unposted_request ON cg_unposted (request_id);

INSERT INTO cg_unposted (replica, entry, request_id, shipped_at)
    SELECT replica, entry, request_id, shipped_at FROM cg_debits WHERE NOT posted;

DROP TRIGGER cg_limit_debits_are_not_posted ON cg_debits;
DROP FUNCTION cg_limit_debit_posted();
DROP INDEX cg_debits_unposted;
DROP INDEX cg_debits_request;
ALTER TABLE cg_debits DROP COLUMN posted;

CREATE OR REPLACE FUNCTION cg_ship_debits(p_replica text, p_entries bigint[], p_wallets text[], p_leases bigint[],
                               p_amounts numeric[], p_ats timestamptz[], p_bodies jsonb[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_new bigint;
BEGIN
    PERFORM 1 FROM cg_wallets w WHERE w.wallet = ANY (p_wallets) ORDER BY w.wallet FOR UPDATE;
    PERFORM 1 FROM cg_leases l WHERE l.id = ANY (p_leases) ORDER BY l.id FOR UPDATE;
    WITH input AS (
        -- Amounts arrive at the cost scale (9 places); rounding up here only
        -- guards the column's scale, never lowering a charge.
        SELECT DISTINCT ON (t.entry) t.entry, t.wallet, t.lease,
               ceil(t.amount * 1000000000) / 1000000000 AS amount, t.at, t.body
        FROM unnest(p_entries, p_wallets, p_leases, p_amounts, p_ats, p_bodies)
             AS t(entry, wallet, lease, amount, at, body)
        WHERE NOT EXISTS (SELECT 1 FROM cg_debits d WHERE d.replica = p_replica AND d.entry = t.entry)
        ORDER BY t.entry
    ), room AS (
        SELECT l.id, l.wallet, CASE WHEN l.closed_at IS NULL THEN l.granted - l.spent ELSE 0 END AS room
        FROM cg_leases l WHERE l.id IN (SELECT lease FROM input) AND l.replica = p_replica
    ), priced AS (
        -- A debit is covered only by its own replica's lease on its own
        -- wallet; anything else ships as uncovered.
        SELECT i.*, LEAST(i.amount, GREATEST(COALESCE(r.room, 0)
                   - (sum(i.amount) OVER (PARTITION BY i.lease ORDER BY i.entry) - i.amount), 0)) AS covered
        FROM input i LEFT JOIN room r ON r.id = i.lease AND r.wallet = i.wallet
    ), ins AS (
        INSERT INTO cg_debits (replica, entry, wallet, lease, amount, uncovered, at, body)
        SELECT p_replica, entry, wallet, lease, amount, amount - covered, at, body FROM priced
        ON CONFLICT (replica, entry) DO NOTHING
        RETURNING entry, lease, wallet, amount, amount - uncovered AS covered, request_id
    ), queued AS (
        -- A limit's debits count against the limit only: the treasurer
        -- posts the credit debit beside it.
        INSERT INTO cg_unposted (replica, entry, request_id, shipped_at)
        SELECT p_replica, entry, request_id, now() FROM ins WHERE wallet NOT LIKE 'limit:%'
        RETURNING 1
    ), per_lease AS (
        UPDATE cg_leases l SET spent = l.spent + s.covered
        FROM (SELECT lease, sum(covered) AS covered FROM ins GROUP BY lease) s
        WHERE l.id = s.lease AND s.covered > 0
        RETURNING 1
    ), per_wallet AS (
        UPDATE cg_wallets w SET balance = w.balance - s.amount, leased = w.leased - s.covered
        FROM (SELECT wallet, sum(amount) AS amount, sum(covered) AS covered FROM ins GROUP BY wallet) s
        WHERE w.wallet = s.wallet
        RETURNING 1
    )
    SELECT count(*) INTO v_new FROM ins;
    RETURN v_new;
END $$;

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
    -- record), then all taken off the queue in one statement, planned for
    -- this batch (EXECUTE): a generic plan cannot see how few ids there are.
    SELECT COALESCE(array_agg(t.post::uuid), '{}') INTO v_posted
        FROM unnest(p_origins, p_posts) AS t(origin, post)
        JOIN unnest(v_new) AS n(origin) ON n.origin = t.origin
        WHERE t.post IS NOT NULL;
    IF cardinality(v_posted) > 0 THEN
        EXECUTE 'DELETE FROM cg_unposted WHERE request_id = ANY ($1)' USING v_posted;
    END IF;
    RETURN cardinality(v_new);
END $$;
