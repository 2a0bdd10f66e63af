-- Cluster books, version 10: renewing the treasury no longer waits for the
-- log. Only a taking needs cg_log's advisory lock (a new treasurer must
-- have read every record the old epoch will add); a renewal extends its
-- own epoch's row, which the row lock orders against a taking. Before, a
-- renewal queued behind appends and, on a busy database, could come after
-- its term had lapsed. The term is counted from when the row is written.
CREATE OR REPLACE FUNCTION cg_claim_treasury(p_replica text, p_epoch bigint, p_ttl_ms bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch bigint;
BEGIN
    IF p_epoch IS NOT NULL THEN
        UPDATE cg_treasurer t SET expires_at = clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0)
            WHERE t.epoch = p_epoch AND t.replica = p_replica
            RETURNING t.epoch INTO v_epoch;
        RETURN v_epoch;
    END IF;
    PERFORM pg_advisory_xact_lock(109295633723239); -- cg_log's lock
    INSERT INTO cg_treasurer AS t (epoch, replica, expires_at)
        VALUES (1, p_replica, clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0))
        ON CONFLICT (only_row) DO UPDATE
        SET epoch = t.epoch + 1, replica = p_replica,
            expires_at = clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0)
        WHERE t.expires_at <= clock_timestamp()
        RETURNING t.epoch INTO v_epoch;
    RETURN v_epoch;
END $$;
