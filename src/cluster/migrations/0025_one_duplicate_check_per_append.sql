-- Cluster books, version 25: an append finds out once which of its
-- records the log lacks.
--
-- Under version 24 the treasurer's append (the 13-argument
-- cg_append_books) looked each record up in the log's key four times: in
-- itself, in the 8-argument cg_append_books it calls, in cg_append's
-- insert, and in cg_append's returned places, which cg_append_books throws
-- away. On a scratch database those lookups took a third of a
-- 2,000-record append's time. Now cg_unlogged reads, in one scan of the
-- key, the replica's logged origins between the batch's lowest and
-- highest (a replica numbers its records in rising order, so that range
-- holds only what an earlier try of this batch logged, usually nothing),
-- and the log's insert, the balances, the queue and the lots all take its
-- answer. The log's lock is held from that read to the insert, so no
-- other append can log one of these records in between. cg_append, the
-- log's own call, is unchanged; the 8-argument cg_append_books stays for
-- callers of older versions.

-- p_origins without those `p_replica` has logged, in their order (an
-- origin given twice is kept twice, as the lookups kept it). A record
-- without an origin is refused, as the log's NOT NULL refused it before.
CREATE OR REPLACE FUNCTION cg_unlogged(p_replica text, p_origins bigint[])
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    v_low bigint;
    v_high bigint;
    v_logged bigint[];
BEGIN
    IF array_position(p_origins, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'a record appended by % has no origin', p_replica USING ERRCODE = 'not_null_violation';
    END IF;
    p_origins := COALESCE(p_origins, '{}');
    SELECT min(u.o), max(u.o) INTO v_low, v_high FROM unnest(p_origins) AS u(o);
    SELECT COALESCE(array_agg(e.origin), '{}') INTO v_logged FROM cg_log e
        WHERE e.replica = p_replica AND e.origin BETWEEN v_low AND v_high;
    IF cardinality(v_logged) = 0 THEN
        RETURN p_origins;
    END IF;
    RETURN (SELECT COALESCE(array_agg(u.o ORDER BY u.ord), '{}')
            FROM unnest(p_origins) WITH ORDINALITY AS u(o, ord)
            WHERE u.o <> ALL (v_logged));
END $$;

-- Appends the records of p_new (the caller found them unlogged under the
-- log's lock) and moves the shared books with them: the 8-argument
-- cg_append_books of version 24, given its answer. Internal to the two
-- cg_append_books: a p_new that misses a record skips it.
CREATE OR REPLACE FUNCTION cg_append_unlogged(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
                                              p_wallets text[], p_orgs bigint[], p_deltas numeric[], p_posts text[],
                                              p_new bigint[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_next bigint;
    v_posted uuid[];
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239); -- "cg_log" in ASCII; the caller's, taken again
    IF NOT EXISTS (SELECT 1 FROM cg_treasurer t WHERE t.epoch = p_epoch AND t.replica = p_replica) THEN
        RAISE EXCEPTION 'treasury epoch % of % is over', p_epoch, p_replica USING ERRCODE = 'CG001';
    END IF;
    -- Refused, as the log's NOT NULL refused the origin or body missing
    -- from a shorter array before.
    IF cardinality(COALESCE(p_origins, '{}')) <> cardinality(COALESCE(p_bodies, '{}')) THEN
        RAISE EXCEPTION 'an append of % has % origins for % bodies', p_replica,
            cardinality(p_origins), cardinality(p_bodies) USING ERRCODE = 'not_null_violation';
    END IF;
    SELECT COALESCE(max(l.gseq), 0) + 1 INTO v_next FROM cg_log l;
    INSERT INTO cg_log (gseq, replica, origin, body)
        SELECT v_next + row_number() OVER (ORDER BY t.ord) - 1, p_replica, t.origin, t.body
        FROM (SELECT DISTINCT ON (u.origin) u.* -- an origin twice in one batch is one record
              FROM unnest(p_origins, p_bodies) WITH ORDINALITY AS u(origin, body, ord)
              WHERE u.origin = ANY (p_new)
              ORDER BY u.origin, u.ord) t
        ORDER BY t.ord;
    -- Rows first, in name order (the lock order of every other function).
    INSERT INTO cg_wallets (wallet, org)
        SELECT DISTINCT t.wallet, t.org FROM unnest(p_origins, p_wallets, p_orgs) AS t(origin, wallet, org)
        WHERE t.wallet IS NOT NULL AND t.origin = ANY (p_new)
        ORDER BY t.wallet
        ON CONFLICT (wallet) DO NOTHING;
    PERFORM 1 FROM cg_wallets w WHERE w.wallet = ANY (p_wallets) ORDER BY w.wallet FOR UPDATE;
    UPDATE cg_wallets w SET balance = w.balance + s.delta
        FROM (SELECT t.wallet, sum(t.delta) AS delta
              FROM unnest(p_origins, p_wallets, p_deltas) AS t(origin, wallet, delta)
              WHERE t.wallet IS NOT NULL AND t.origin = ANY (p_new) GROUP BY t.wallet) s
        WHERE w.wallet = s.wallet;
    INSERT INTO cg_funding (org, wallet, amount, idempotency_key)
        SELECT t.org, t.wallet, t.delta, NULL
        FROM unnest(p_origins, p_wallets, p_orgs, p_deltas) AS t(origin, wallet, org, delta)
        WHERE t.wallet IS NOT NULL AND t.origin = ANY (p_new);
    -- The new records' posted debits (a hash join, not a scan of p_new per
    -- record), then all taken off the queue in one statement, planned for
    -- this batch (EXECUTE): a generic plan cannot see how few ids there are.
    SELECT COALESCE(array_agg(t.post::uuid), '{}') INTO v_posted
        FROM unnest(p_origins, p_posts) AS t(origin, post)
        JOIN unnest(p_new) AS n(origin) ON n.origin = t.origin
        WHERE t.post IS NOT NULL;
    IF cardinality(v_posted) > 0 THEN
        EXECUTE 'DELETE FROM cg_unposted WHERE request_id = ANY ($1)' USING v_posted;
    END IF;
    RETURN cardinality(p_new);
END $$;

CREATE OR REPLACE FUNCTION cg_append_books(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
                                           p_wallets text[], p_orgs bigint[], p_deltas numeric[], p_posts text[])
RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239);
    RETURN cg_append_unlogged(p_epoch, p_replica, p_origins, p_bodies, p_wallets, p_orgs, p_deltas, p_posts,
                              cg_unlogged(p_replica, p_origins));
END $$;

-- cg_append_books, moving cg_lots too: each record's lot moves (a created
-- lot with its expiry and remainder, or a signed amount taken from one).
CREATE OR REPLACE FUNCTION cg_append_books(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
                                p_wallets text[], p_orgs bigint[], p_deltas numeric[], p_posts text[],
                                p_lot_origins bigint[], p_lot_wallets text[], p_lot_ids bigint[],
                                p_lot_expires timestamptz[], p_lot_deltas numeric[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_new bigint[];
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239);
    v_new := cg_unlogged(p_replica, p_origins);
    PERFORM cg_append_unlogged(p_epoch, p_replica, p_origins, p_bodies, p_wallets, p_orgs, p_deltas, p_posts, v_new);
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

-- Planned at each call, as version 24's are (CREATE OR REPLACE dropped
-- that setting of the two above): `= ANY (p_new)` is then a hash lookup,
-- and the range read sees the log's size now.
ALTER FUNCTION cg_unlogged(text, bigint[]) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION cg_append_unlogged(bigint, text, bigint[], bytea[], text[], bigint[], numeric[], text[], bigint[])
    SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION cg_append_books(bigint, text, bigint[], bytea[], text[], bigint[], numeric[], text[])
    SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION cg_append_books(bigint, text, bigint[], bytea[], text[], bigint[], numeric[], text[],
                               bigint[], text[], bigint[], timestamptz[], numeric[])
    SET plan_cache_mode = force_custom_plan;
