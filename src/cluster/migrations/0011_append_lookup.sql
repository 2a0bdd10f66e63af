-- Cluster books, version 11: cg_append finds the numbers it returns by
-- looking up each origin in the (replica, origin) index. Written as
-- `origin = ANY (p_origins)` under one replica name, the generic plan
-- scanned the replica's whole log and compared every row with every
-- origin of the batch: an append took longer the longer the log, and the
-- treasurer's posting fell behind the traffic.
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
        WHERE NOT EXISTS (SELECT 1 FROM cg_log e WHERE e.replica = p_replica AND e.origin = t.origin)
        ORDER BY t.ord;
    RETURN QUERY
        SELECT e.origin, e.gseq
        FROM (SELECT DISTINCT u.origin FROM unnest(p_origins) AS u(origin)) o
        CROSS JOIN LATERAL (SELECT l.origin, l.gseq FROM cg_log l
                            WHERE l.replica = p_replica AND l.origin = o.origin) e
        ORDER BY e.gseq;
END $$;
