-- Cluster books, version 19: the expiry sweep closes only leases still
-- past their deadline once it holds their locks.
--
-- The sweep picked expired leases, then waited for the locks of their
-- wallets (a shipment may hold one). A replica back from a cut could renew
-- such a lease in that wait; the sweep then closed it anyway and returned
-- its credit to the wallet, while the replica, told the lease was open,
-- spent it again until its next round: that credit was spent twice. The
-- update now checks the deadline again, after the locks, where it sees the
-- renewal (each statement of a READ COMMITTED function reads afresh).
CREATE OR REPLACE FUNCTION cg_close_leases(p_replica text, p_leases bigint[], p_grace_ms bigint)
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
          AND (p_leases IS NOT NULL OR l.expires_at < now() - make_interval(secs => p_grace_ms / 1000.0))
        RETURNING l.wallet, l.granted - l.spent AS unspent
    LOOP
        UPDATE cg_wallets SET leased = leased - c.unspent WHERE wallet = c.wallet;
        v_returned := v_returned + c.unspent;
    END LOOP;
    RETURN v_returned;
END $$;
