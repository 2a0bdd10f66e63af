-- Cluster books, version 17: a renewal names the leases it renews.
--
-- A draw that committed but whose reply was lost (a connection cut after
-- the commit, or a draw retried after such a cut) leaves a lease its
-- replica never learnt of. cg_renew_leases renewed every open lease of the
-- replica, so that lease, and the credit in it, stayed open until the
-- replica restarted. Now a replica names the leases it knows: only those
-- are renewed, an unknown one lapses at the deadline its draw gave it, and
-- the expiry sweep returns its credit. A lease whose draw reply is still on
-- its way when a renewal goes out keeps that deadline until the next round.
CREATE FUNCTION cg_renew_leases(p_replica text, p_ttl_ms bigint, p_horizon_ms bigint, p_known bigint[],
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
                                 WHERE o.replica = p_replica AND o.closed_at IS NULL
                                   AND o.id = ANY (p_known))) b
        WHERE l.replica = p_replica AND l.closed_at IS NULL AND l.id = ANY (p_known)
          AND l.wallet = b.wallet AND b.covered;
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'), COALESCE(array_agg(l.expires_at ORDER BY l.id), '{}')
        INTO ids, deadlines
        FROM cg_leases l WHERE l.replica = p_replica AND l.closed_at IS NULL;
END $$;
