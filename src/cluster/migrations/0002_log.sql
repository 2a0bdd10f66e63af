-- Cluster books, version 2: the global record log.
--
-- Every replica appends the commands it originates (admin writes, shipped
-- debits) and applies everyone's in `gseq` order, so all replicas hold the
-- same books. Appends take a transaction-scoped advisory lock and number
-- with max + 1, so numbers are gapless and commit in order: a reader that
-- has seen `gseq = n` has seen every number below it, and tailing by
-- number never skips a record that commits late. (A sequence would hand
-- out numbers that commit out of order.)
CREATE TABLE cg_log (
    gseq     bigint PRIMARY KEY,
    replica  text NOT NULL,
    origin   bigint NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    body     bytea NOT NULL,
    UNIQUE (replica, origin)
);

-- Appends a replica's batch, idempotently by (replica, origin): a retried
-- batch gets back the numbers it was given the first time. Returns every
-- origin with its number, in number order.
CREATE FUNCTION cg_append(p_replica text, p_origins bigint[], p_bodies bytea[])
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
        WHERE NOT EXISTS (SELECT 1 FROM cg_log e WHERE e.replica = p_replica AND e.origin = t.origin)
        ORDER BY t.ord;
    RETURN QUERY
        SELECT e.origin, e.gseq FROM cg_log e
        WHERE e.replica = p_replica AND e.origin = ANY (p_origins)
        ORDER BY e.gseq;
END $$;
