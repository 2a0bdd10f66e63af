-- Cluster books, version 9: leases bounded by the expiry of the credit they
-- draw on. A lease is a slice of a wallet's balance; without this, credit of
-- a lot that expired while leased could be spent until the lease ended.
--
-- cg_lots mirrors the treasurer's live lots (what its ledger has left in
-- each after the debits it posted). Shipped debits not yet posted only make
-- the true remainders smaller, so excluding a lot's remainder here never
-- lets expired credit out. The treasurer writes the whole table when it
-- takes the treasury (cg_publish_lots) and moves it with every record it
-- appends after that (cg_append_books, 13 arguments), in the same
-- transaction as the log, so it never runs ahead of or behind the log.
CREATE TABLE cg_lots (
    wallet     text NOT NULL,
    lot        bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    remaining  numeric(38,9) NOT NULL,
    PRIMARY KEY (wallet, lot)
);

-- What of a wallet's credit a lease may not take, and until when a lease
-- may run: credit of lots expired by `now() + horizon` (they expire before
-- a lease drawn now could be used), and the next expiry after that.
CREATE FUNCTION cg_lot_bound(p_wallet text, p_horizon_ms bigint,
                             OUT expiring numeric, OUT next_expiry timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(l.remaining) FILTER (WHERE l.expires_at <= v.edge), 0),
           min(l.expires_at) FILTER (WHERE l.expires_at > v.edge)
    FROM (SELECT now() + make_interval(secs => p_horizon_ms / 1000.0) AS edge) v
    LEFT JOIN cg_lots l ON l.wallet = p_wallet AND l.remaining > 0
$$;

-- cg_draw_lease, bounded: grants only credit that outlives the horizon, and
-- ends the lease no later than the next lot expiry.
CREATE FUNCTION cg_draw_lease(p_replica text, p_wallet text, p_want numeric, p_min numeric,
                              p_ttl_ms bigint, p_live_ms bigint, p_horizon_ms bigint)
RETURNS TABLE (lease bigint, granted numeric, expires_at timestamptz, db_now timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_free numeric;
    v_live bigint;
    v_grant numeric;
    v_bound record;
BEGIN
    SELECT w.balance - w.leased INTO v_free FROM cg_wallets w WHERE w.wallet = p_wallet FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_bound FROM cg_lot_bound(p_wallet, p_horizon_ms);
    v_free := v_free - v_bound.expiring;
    IF v_free < p_min OR v_free <= 0 THEN
        RETURN;
    END IF;
    INSERT INTO cg_replicas (replica) VALUES (p_replica) ON CONFLICT (replica) DO NOTHING;
    SELECT count(*) INTO v_live FROM cg_replicas r
        WHERE r.last_seen > now() - make_interval(secs => p_live_ms / 1000.0);
    v_grant := LEAST(p_want, GREATEST(p_min, trunc(v_free / GREATEST(v_live, 1), 9)), v_free);
    UPDATE cg_wallets w SET leased = w.leased + v_grant WHERE w.wallet = p_wallet;
    RETURN QUERY
        INSERT INTO cg_leases AS l (replica, wallet, granted, expires_at)
        -- LEAST skips a NULL: no lot expires, the TTL alone bounds it.
        VALUES (p_replica, p_wallet, v_grant,
                LEAST(now() + make_interval(secs => p_ttl_ms / 1000.0), v_bound.next_expiry))
        RETURNING l.id, l.granted, l.expires_at, now();
END $$;

-- Renews every open lease of a replica up to `ttl` from now, no later than
-- its wallet's next lot expiry, and only while the wallet's credit that
-- outlives the horizon still covers all its leases (after an expiry or a
-- negative adjustment the leases lapse and are drawn again from what is
-- left). Returns every open lease with its deadline, renewed or not.
CREATE FUNCTION cg_renew_leases(p_replica text, p_ttl_ms bigint, p_horizon_ms bigint,
                                OUT ids bigint[], OUT deadlines timestamptz[])
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM cg_leases l WHERE l.replica = p_replica AND l.closed_at IS NULL ORDER BY l.id FOR UPDATE;
    UPDATE cg_leases l
        SET expires_at = GREATEST(l.expires_at,
                                  LEAST(now() + make_interval(secs => p_ttl_ms / 1000.0), b.next_expiry))
        FROM (SELECT w.wallet, lb.next_expiry, w.balance - w.leased - lb.expiring >= 0 AS covered
              FROM cg_wallets w, LATERAL cg_lot_bound(w.wallet, p_horizon_ms) lb
              WHERE w.wallet IN (SELECT o.wallet FROM cg_leases o
                                 WHERE o.replica = p_replica AND o.closed_at IS NULL)) b
        WHERE l.replica = p_replica AND l.closed_at IS NULL AND l.wallet = b.wallet AND b.covered;
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'), COALESCE(array_agg(l.expires_at ORDER BY l.id), '{}')
        INTO ids, deadlines
        FROM cg_leases l WHERE l.replica = p_replica AND l.closed_at IS NULL;
END $$;

-- The treasurer's live lots, written whole when it takes the treasury
-- (fenced like an append).
CREATE FUNCTION cg_publish_lots(p_epoch bigint, p_replica text, p_wallets text[], p_lots bigint[],
                                p_expires timestamptz[], p_remaining numeric[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239);
    IF NOT EXISTS (SELECT 1 FROM cg_treasurer t WHERE t.epoch = p_epoch AND t.replica = p_replica) THEN
        RAISE EXCEPTION 'treasury epoch % of % is over', p_epoch, p_replica USING ERRCODE = 'CG001';
    END IF;
    DELETE FROM cg_lots;
    INSERT INTO cg_lots (wallet, lot, expires_at, remaining)
        SELECT * FROM unnest(p_wallets, p_lots, p_expires, p_remaining);
END $$;

-- cg_append_books, moving cg_lots too: each record's lot moves (a created
-- lot with its expiry and remainder, or a signed amount taken from one).
-- The 8-argument version does the rest (fencing, the log, balances).
CREATE FUNCTION cg_append_books(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
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
    SELECT COALESCE(array_agg(o), '{}') INTO v_new FROM unnest(p_origins) o
        WHERE NOT EXISTS (SELECT 1 FROM cg_log e WHERE e.replica = p_replica AND e.origin = o);
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
