-- Cluster books, version 24: the log's and the debits' duplicate checks
-- look each record up by its key.
--
-- An append (cg_append, both cg_append_books) and a shipment
-- (cg_ship_debits) skip what a retried batch already recorded with
-- `NOT EXISTS (SELECT 1 FROM cg_log e WHERE e.replica = p_replica AND
-- e.origin = ...)`, and cg_append returns each origin's place with a
-- lateral join on the same key. PL/pgSQL may plan such a statement once
-- for every value of p_replica and keep that plan, and on a log that grew
-- faster than its statistics the planner took the replica's rows for a
-- handful: it read every log row the treasurer had appended, four times
-- per append, into a hash or a sort (61,202 rows for a 2,000-record append
-- in a one-minute load run), until the statistics next changed. Version 11
-- meant the lateral join to be a lookup per origin, but a lateral subquery
-- that simple is pulled up into a plain join. Each check is now a lookup
-- per record in the key, and the LIMIT keeps the planner from turning it
-- back into a join over the whole table (as in version 12). And these
-- functions are planned afresh at each call (plan_cache_mode), so a plan
-- sees the tables' size now, not their size when it was first made: kept,
-- a plan made for a log of ten rows could scan the log once per record.
-- A shipment or append of hundreds of records pays nothing measurable for
-- it. The functions are otherwise as versions 9, 11 and 13 left them.

CREATE OR REPLACE FUNCTION cg_append(p_replica text, p_origins bigint[], p_bodies bytea[])
RETURNS TABLE (origin bigint, gseq bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_next bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239); -- "cg_log" in ASCII
    SELECT COALESCE(max(l.gseq), 0) + 1 INTO v_next FROM cg_log l;
    INSERT INTO cg_log AS l (gseq, replica, origin, body)
        SELECT v_next + row_number() OVER (ORDER BY t.ord) - 1, p_replica, t.origin, t.body
        FROM (SELECT DISTINCT ON (u.origin) u.* -- an origin twice in one batch is one record
              FROM unnest(p_origins, p_bodies) WITH ORDINALITY AS u(origin, body, ord)
              ORDER BY u.origin, u.ord) t
        LEFT JOIN LATERAL (SELECT true AS logged FROM cg_log e
                           WHERE e.replica = p_replica AND e.origin = t.origin LIMIT 1) e ON true
        WHERE e.logged IS NULL
        ORDER BY t.ord;
    RETURN QUERY
        SELECT e.origin, e.gseq
        FROM (SELECT DISTINCT u.origin FROM unnest(p_origins) AS u(origin)) o
        CROSS JOIN LATERAL (SELECT l.origin, l.gseq FROM cg_log l
                            WHERE l.replica = p_replica AND l.origin = o.origin LIMIT 1) e
        ORDER BY e.gseq;
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
    SELECT COALESCE(array_agg(u.o), '{}') INTO v_new FROM unnest(p_origins) AS u(o)
        LEFT JOIN LATERAL (SELECT true AS logged FROM cg_log e
                           WHERE e.replica = p_replica AND e.origin = u.o LIMIT 1) e ON true
        WHERE e.logged IS NULL;
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

-- cg_append_books, moving cg_lots too: each record's lot moves (a created
-- lot with its expiry and remainder, or a signed amount taken from one).
-- The 8-argument version does the rest (fencing, the log, balances).
CREATE OR REPLACE FUNCTION cg_append_books(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
                                p_wallets text[], p_orgs bigint[], p_deltas numeric[], p_posts text[],
                                p_lot_origins bigint[], p_lot_wallets text[], p_lot_ids bigint[],
                                p_lot_expires timestamptz[], p_lot_deltas numeric[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_new bigint[];
BEGIN
    -- The append's own lock (taken again inside, which a holder may), so
    -- what is new here is what it appends.
    PERFORM pg_advisory_xact_lock(109295633723239);
    SELECT COALESCE(array_agg(u.o), '{}') INTO v_new FROM unnest(p_origins) AS u(o)
        LEFT JOIN LATERAL (SELECT true AS logged FROM cg_log e
                           WHERE e.replica = p_replica AND e.origin = u.o LIMIT 1) e ON true
        WHERE e.logged IS NULL;
    PERFORM cg_append_books(p_epoch, p_replica, p_origins, p_bodies, p_wallets, p_orgs, p_deltas, p_posts);
    -- Created lots first (their expiry is known only there), then the
    -- amounts taken from them; a lot with nothing left is gone.
    INSERT INTO cg_lots AS l (wallet, lot, expires_at, remaining)
        SELECT t.wallet, t.lot, t.expires, sum(t.delta)
        FROM unnest(p_lot_origins, p_lot_wallets, p_lot_ids, p_lot_expires, p_lot_deltas)
             AS t(origin, wallet, lot, expires, delta)
        WHERE t.expires IS NOT NULL AND t.origin = ANY (v_new)
        GROUP BY t.wallet, t.lot, t.expires
        ON CONFLICT (wallet, lot) DO UPDATE SET remaining = l.remaining + EXCLUDED.remaining;
    UPDATE cg_lots l SET remaining = l.remaining + s.delta
        FROM (SELECT t.wallet, t.lot, sum(t.delta) AS delta
              FROM unnest(p_lot_origins, p_lot_wallets, p_lot_ids, p_lot_expires, p_lot_deltas)
                   AS t(origin, wallet, lot, expires, delta)
              WHERE t.expires IS NULL AND t.origin = ANY (v_new) GROUP BY t.wallet, t.lot) s
        WHERE l.wallet = s.wallet AND l.lot = s.lot;
    DELETE FROM cg_lots l WHERE l.remaining <= 0 AND l.wallet = ANY (p_lot_wallets);
    RETURN cardinality(v_new);
END $$;

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
        LEFT JOIN LATERAL (SELECT true AS shipped FROM cg_debits d
                           WHERE d.replica = p_replica AND d.entry = t.entry LIMIT 1) d ON true
        WHERE d.shipped IS NULL
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

ALTER FUNCTION cg_append(text, bigint[], bytea[]) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION cg_append_books(bigint, text, bigint[], bytea[], text[], bigint[], numeric[], text[])
    SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION cg_append_books(bigint, text, bigint[], bytea[], text[], bigint[], numeric[], text[],
                               bigint[], text[], bigint[], timestamptz[], numeric[])
    SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION cg_ship_debits(text, bigint[], text[], bigint[], numeric[], timestamptz[], jsonb[])
    SET plan_cache_mode = force_custom_plan;
