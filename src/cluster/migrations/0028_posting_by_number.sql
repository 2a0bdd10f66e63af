-- Cluster books, version 28: the treasurer posts shipped debits in the
-- order of their numbers, from a mark, not from a queue.
--
-- Since version 13 every shipped debit also wrote a row in cg_unposted
-- (its key, its request id, its shipping time, three indexes), which the
-- append that posted it deleted by request id: on a scratch database about
-- a fifth of a debit's statement time (bench/README.md). Now a shipment numbers the
-- debits the treasurer must post (cg_debits.post_seq, version 26) under
-- an advisory lock held until it commits, so shipments commit in the
-- order of their numbers and a reader that sees number n has seen every
-- number below it (as cg_log's appends do). The treasurer reads the
-- debits above cg_posting's mark in that order, and each append moves the
-- mark to the highest number its records post, in the transaction that
-- logs them, so a debit is still posted exactly once however often the
-- treasury changes hands. A debit the treasurer refuses keeps its
-- post_error, as before, and is passed over.
--
-- Shipments from different replicas now take turns at the numbering (they
-- already took turns on a wallet they share). Replicas of an older
-- version go on shipping through the new cg_ship_debits. An older
-- treasurer can no longer read a queue, so it posts nothing more (its
-- reads fail and are retried) while admin changes and time rules go on;
-- posting resumes once a replica of this version holds the treasury. An
-- append of debits it read before the upgrade is refused as a deposed
-- treasurer's is (below): logged without moving the mark, they would be
-- posted again by the next treasurer.

CREATE TABLE cg_posting (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- Every numbered debit up to here is posted or refused.
    posted_through bigint NOT NULL
);
INSERT INTO cg_posting (posted_through) VALUES (0);

-- What the queue held, numbered in the order the treasurer read it. The
-- lock keeps an older replica's shipment from queueing a debit after the
-- queue is read and before it is gone. A debit of nothing is not posted.
LOCK TABLE cg_unposted IN ACCESS EXCLUSIVE MODE;
UPDATE cg_debits d SET post_seq = q.n
    FROM (SELECT u.replica, u.entry, row_number() OVER (ORDER BY u.shipped_at, u.replica, u.entry) AS n
          FROM cg_unposted u JOIN cg_debits x ON x.replica = u.replica AND x.entry = u.entry
          WHERE x.amount > 0) q
    WHERE d.replica = q.replica AND d.entry = q.entry;
DROP TABLE cg_unposted;

CREATE OR REPLACE FUNCTION cg_ship_debits(p_replica text, p_entries bigint[], p_wallets text[], p_leases bigint[],
                               p_amounts numeric[], p_ats timestamptz[], p_bodies jsonb[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_new bigint;
    v_last bigint;
BEGIN
    PERFORM 1 FROM cg_wallets w WHERE w.wallet = ANY (p_wallets) ORDER BY w.wallet FOR UPDATE;
    PERFORM 1 FROM cg_leases l WHERE l.id = ANY (p_leases) ORDER BY l.id FOR UPDATE;
    -- Kept until commit: the next shipment numbers on from what this one
    -- committed. Taken after the rows, so a shipment holding it never
    -- waits for a row: one stuck behind a wallet's row (a stalled session
    -- holds it until its lock_timeout) holds up the shipments on that
    -- wallet only, not every replica's.
    PERFORM pg_advisory_xact_lock(27979682300261236); -- "cg_post" in ASCII
    SELECT COALESCE(max(d.post_seq), 0) INTO v_last FROM cg_debits d;
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
        -- wallet; anything else ships as uncovered. A limit's debits count
        -- against the limit only (the treasurer posts the credit debit
        -- beside it), and a debit of nothing moves no books: neither is
        -- numbered for posting.
        SELECT i.*, LEAST(i.amount, GREATEST(COALESCE(r.room, 0)
                   - (sum(i.amount) OVER (PARTITION BY i.lease ORDER BY i.entry) - i.amount), 0)) AS covered,
               i.wallet NOT LIKE 'limit:%' AND i.amount > 0 AS to_post
        FROM input i LEFT JOIN room r ON r.id = i.lease AND r.wallet = i.wallet
    ), ins AS (
        INSERT INTO cg_debits (replica, entry, wallet, lease, amount, uncovered, at, body, post_seq)
        SELECT p_replica, entry, wallet, lease, amount, amount - covered, at, body,
               CASE WHEN to_post THEN v_last + count(*) FILTER (WHERE to_post) OVER (ORDER BY entry) END
        FROM priced
        ON CONFLICT (replica, entry) DO NOTHING
        RETURNING entry, lease, wallet, amount, amount - uncovered AS covered
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

-- The appends take the numbers of the debits their records post in
-- p_posts, where they took request ids to find queue rows. The parameter
-- keeps its type (text), so the functions keep their signatures (and the
-- two cg_append_books their version-25 bodies, which pass it on): an older
-- treasurer's call still finds them (under another signature its untyped
-- call would find no function, or two), and one that names request ids is
-- refused with the code of an epoch that is over, so it stops appending
-- as a deposed treasurer does.

-- Appends the records of p_new (the caller found them unlogged under the
-- log's lock) and moves the shared books with them. Internal to the two
-- cg_append_books: a p_new that misses a record skips it.
CREATE OR REPLACE FUNCTION cg_append_unlogged(p_epoch bigint, p_replica text, p_origins bigint[],
                                              p_bodies bytea[], p_wallets text[], p_orgs bigint[],
                                              p_deltas numeric[], p_posts text[], p_new bigint[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_next bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239); -- "cg_log" in ASCII; the caller's, taken again
    IF NOT EXISTS (SELECT 1 FROM cg_treasurer t WHERE t.epoch = p_epoch AND t.replica = p_replica) THEN
        RAISE EXCEPTION 'treasury epoch % of % is over', p_epoch, p_replica USING ERRCODE = 'CG001';
    END IF;
    -- A request id's text is 36 characters, a number's at most 20 (a
    -- length, not a pattern: a regular expression per record cost the
    -- harness's appends a millisecond each).
    IF EXISTS (SELECT 1 FROM unnest(p_posts) AS t(post) WHERE length(t.post) > 20) THEN
        RAISE EXCEPTION 'treasury epoch % of % is over: it posts by request id, the books by number since version 28',
            p_epoch, p_replica USING ERRCODE = 'CG001';
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
    -- The mark moves to the highest debit the new records post. The
    -- treasurer posts in the order of the numbers and appends in the order
    -- it posts, so every numbered debit below it is posted (here or in an
    -- earlier append) or refused.
    UPDATE cg_posting p SET posted_through = s.top
        FROM (SELECT max(t.post::bigint) AS top FROM unnest(p_origins, p_posts) AS t(origin, post)
              WHERE t.origin = ANY (p_new)) s
        WHERE s.top > p.posted_through;
    RETURN cardinality(p_new);
END $$;

-- Planned at each call, as versions 24 and 25 have them (CREATE OR
-- REPLACE drops the setting). The two cg_append_books are version 25's,
-- unchanged: they pass p_posts through to cg_append_unlogged.
ALTER FUNCTION cg_ship_debits(text, bigint[], text[], bigint[], numeric[], timestamptz[], jsonb[])
    SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION cg_append_unlogged(bigint, text, bigint[], bytea[], text[], bigint[], numeric[], text[], bigint[])
    SET plan_cache_mode = force_custom_plan;
