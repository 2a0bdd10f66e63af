-- Cluster books, version 3: the treasury.
--
-- One replica at a time is the treasurer: the only one whose ledger makes
-- records (admin changes, posted debits, grants and write-offs), which it
-- appends to cg_log; every other replica replays them. The treasury is a
-- lease on this one row: the holder renews it, another replica takes it
-- once it has lapsed, and each taking starts a new epoch. Appends
-- (cg_append_books, version 4) name their epoch and are refused once it is
-- over, so a treasurer that lost the treasury (a pause, a partition) can
-- never fork the log. Taking and
-- appending share cg_log's advisory lock, so a new treasurer that has read
-- the log to its end has read every record the old epoch will ever add.
CREATE TABLE cg_treasurer (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    epoch       bigint NOT NULL,
    replica     text NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- Renews p_replica's treasury of epoch p_epoch, or (p_epoch NULL) takes the
-- treasury if it is vacant or has lapsed. Returns the epoch p_replica holds
-- afterwards, or NULL. A lapsed treasury that nobody took is still its
-- holder's to renew: while its epoch stands, no one else appended.
CREATE FUNCTION cg_claim_treasury(p_replica text, p_epoch bigint, p_ttl_ms bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch bigint;
    v_until timestamptz := clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0);
BEGIN
    PERFORM pg_advisory_xact_lock(109295633723239); -- cg_log's lock
    IF p_epoch IS NOT NULL THEN
        UPDATE cg_treasurer t SET expires_at = v_until
            WHERE t.epoch = p_epoch AND t.replica = p_replica
            RETURNING t.epoch INTO v_epoch;
        RETURN v_epoch;
    END IF;
    INSERT INTO cg_treasurer AS t (epoch, replica, expires_at) VALUES (1, p_replica, v_until)
        ON CONFLICT (only_row) DO UPDATE SET epoch = t.epoch + 1, replica = p_replica, expires_at = v_until
        WHERE t.expires_at <= clock_timestamp()
        RETURNING t.epoch INTO v_epoch;
    RETURN v_epoch;
END $$;

-- Steps down: the treasury lapses at once, so another replica takes it at
-- its next try instead of waiting out the lease.
CREATE FUNCTION cg_release_treasury(p_replica text, p_epoch bigint)
RETURNS void
LANGUAGE sql AS $$
    UPDATE cg_treasurer SET expires_at = clock_timestamp() WHERE epoch = p_epoch AND replica = p_replica;
$$;
