-- Cluster books, version 1: wallets' credit, leases, funding and shipped debits.
-- Amounts are numeric(38,9): the ledger's cost scale is 9 decimal places.
-- Lock order, in every function: wallets (by name), then leases (by id),
-- then replicas; so concurrent draws, shipments, renewals and closes queue
-- behind each other instead of deadlocking.

-- A replica reports its outbox at every renewal, for `cluster status`.
CREATE TABLE cg_replicas (
    replica           text PRIMARY KEY,
    started_at        timestamptz NOT NULL DEFAULT now(),
    last_seen         timestamptz NOT NULL DEFAULT now(),
    outbox_len        bigint NOT NULL DEFAULT 0,
    oldest_unshipped  timestamptz
);

-- One row per wallet ("pool:org_1", "lite:user_4"). `leased` is the sum of
-- the unspent part of every open lease; new leases come only out of
-- balance - leased, so replicas together cannot spend more than the balance.
CREATE TABLE cg_wallets (
    wallet   text PRIMARY KEY,
    org      bigint NOT NULL,
    balance  numeric(38,9) NOT NULL DEFAULT 0,
    leased   numeric(38,9) NOT NULL DEFAULT 0 CHECK (leased >= 0)
);
CREATE INDEX cg_wallets_org ON cg_wallets (org);

-- Credit added to a wallet (purchases, grants, adjustments), idempotent per
-- org and key.
CREATE TABLE cg_funding (
    id               bigserial PRIMARY KEY,
    org              bigint NOT NULL,
    wallet           text NOT NULL REFERENCES cg_wallets,
    amount           numeric(38,9) NOT NULL,
    idempotency_key  text NOT NULL,
    at               timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org, idempotency_key)
);

-- A slice of a wallet's credit that one replica may spend until expires_at.
-- `spent` counts the shipped debits it covered (never above granted).
CREATE TABLE cg_leases (
    id          bigserial PRIMARY KEY,
    replica     text NOT NULL REFERENCES cg_replicas,
    wallet      text NOT NULL REFERENCES cg_wallets,
    granted     numeric(38,9) NOT NULL CHECK (granted > 0),
    spent       numeric(38,9) NOT NULL DEFAULT 0 CHECK (spent >= 0 AND spent <= granted),
    drawn_at    timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    closed_at   timestamptz
);
CREATE INDEX cg_leases_open ON cg_leases (expires_at) WHERE closed_at IS NULL;
CREATE INDEX cg_leases_replica ON cg_leases (replica) WHERE closed_at IS NULL;

-- Debits shipped from replicas' outboxes, unique by (replica, entry): a
-- retried or repeated shipment never debits twice. `uncovered` is the part
-- no open lease covered (an upstream overrun, or a debit shipped after its
-- lease was closed): a recorded overrun.
CREATE TABLE cg_debits (
    replica    text NOT NULL,
    entry      bigint NOT NULL,
    wallet     text NOT NULL REFERENCES cg_wallets,
    lease      bigint NOT NULL REFERENCES cg_leases,
    amount     numeric(38,9) NOT NULL CHECK (amount >= 0),
    uncovered  numeric(38,9) NOT NULL DEFAULT 0,
    at         timestamptz NOT NULL,
    shipped_at timestamptz NOT NULL DEFAULT now(),
    body       jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (replica, entry)
);
CREATE INDEX cg_debits_wallet_at ON cg_debits (wallet, at);

-- Draws a lease of up to `want` (at least `min`) from a wallet, capped by an
-- even share of what is left among live replicas, so the last cents are
-- shared rather than taken by whoever asks first. Returns no row when the
-- wallet cannot cover `min`. One statement per draw.
CREATE FUNCTION cg_draw_lease(p_replica text, p_wallet text, p_want numeric, p_min numeric,
                              p_ttl_ms bigint, p_live_ms bigint)
RETURNS TABLE (lease bigint, granted numeric, expires_at timestamptz, db_now timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_free numeric;
    v_live bigint;
    v_grant numeric;
BEGIN
    SELECT w.balance - w.leased INTO v_free FROM cg_wallets w WHERE w.wallet = p_wallet FOR UPDATE;
    IF NOT FOUND OR v_free < p_min OR v_free <= 0 THEN
        RETURN;
    END IF;
    -- Registers the replica without locking its row once it exists.
    INSERT INTO cg_replicas (replica) VALUES (p_replica) ON CONFLICT (replica) DO NOTHING;
    SELECT count(*) INTO v_live FROM cg_replicas r
        WHERE r.last_seen > now() - make_interval(secs => p_live_ms / 1000.0);
    v_grant := LEAST(p_want, GREATEST(p_min, trunc(v_free / GREATEST(v_live, 1), 9)), v_free);
    UPDATE cg_wallets w SET leased = w.leased + v_grant WHERE w.wallet = p_wallet;
    RETURN QUERY
        INSERT INTO cg_leases AS l (replica, wallet, granted, expires_at)
        VALUES (p_replica, p_wallet, v_grant, now() + make_interval(secs => p_ttl_ms / 1000.0))
        RETURNING l.id, l.granted, l.expires_at, now();
END $$;

-- Ships a batch of debits: inserts the new ones, charges each to its lease
-- while the lease is open and has room (in entry order), the rest as
-- uncovered, and moves the wallets' balances. Set-based, so a batch of
-- thousands holds the wallet rows for milliseconds. Returns how many were
-- new. One statement a batch.
CREATE FUNCTION cg_ship_debits(p_replica text, p_entries bigint[], p_wallets text[], p_leases bigint[],
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
        RETURNING lease, wallet, amount, amount - uncovered AS covered
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

-- Closes leases and returns their unspent part to their wallets: the given
-- lease ids of one replica (a clean give-back, after its debits shipped), or
-- with p_leases NULL every open lease expired more than p_grace_ms ago.
CREATE FUNCTION cg_close_leases(p_replica text, p_leases bigint[], p_grace_ms bigint)
RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    v_returned numeric := 0;
    v_ids bigint[];
    v_wallets text[];
    c record;
BEGIN
    SELECT COALESCE(array_agg(l.id), '{}'), COALESCE(array_agg(DISTINCT l.wallet), '{}')
        INTO v_ids, v_wallets
        FROM cg_leases l
        WHERE l.closed_at IS NULL
          AND ((p_leases IS NOT NULL AND l.replica = p_replica AND l.id = ANY (p_leases))
            OR (p_leases IS NULL AND l.expires_at < now() - make_interval(secs => p_grace_ms / 1000.0)));
    PERFORM 1 FROM cg_wallets w WHERE w.wallet = ANY (v_wallets) ORDER BY w.wallet FOR UPDATE;
    PERFORM 1 FROM cg_leases l WHERE l.id = ANY (v_ids) ORDER BY l.id FOR UPDATE;
    FOR c IN
        UPDATE cg_leases l SET closed_at = now()
        WHERE l.id = ANY (v_ids) AND l.closed_at IS NULL
        RETURNING l.wallet, l.granted - l.spent AS unspent
    LOOP
        UPDATE cg_wallets SET leased = leased - c.unspent WHERE wallet = c.wallet;
        v_returned := v_returned + c.unspent;
    END LOOP;
    RETURN v_returned;
END $$;
