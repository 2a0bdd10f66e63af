-- Cluster books, version 21: the forms of two functions that version 9
-- replaced refuse to run.
--
-- Version 9 bounded leases by the expiry of the credit they draw on, with
-- new forms of cg_draw_lease (a horizon) and cg_append_books (the lots),
-- and left the old forms in place. A replica of an older binary still
-- running during an upgrade would draw leases with no expiry bound through
-- the old cg_draw_lease, and an older treasurer would append the books
-- through the old cg_append_books without keeping cg_lots, on which the
-- newer replicas' bounds rest. Both old forms now raise: such a replica
-- answers 503 until it runs the new binary, as one that cannot reach the
-- books does.
CREATE OR REPLACE FUNCTION cg_draw_lease(p_replica text, p_wallet text, p_want numeric, p_min numeric,
                                         p_ttl_ms bigint, p_live_ms bigint)
RETURNS TABLE (lease bigint, granted numeric, expires_at timestamptz, db_now timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'replica % runs a binary older than the books (schema 9 and later): upgrade it', p_replica;
END $$;

CREATE OR REPLACE FUNCTION cg_append_books(p_epoch bigint, p_replica text, p_origins bigint[], p_bodies bytea[],
                                           p_wallets text[], p_orgs bigint[], p_deltas numeric[], p_posts text[])
RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'treasurer % runs a binary older than the books (schema 9 and later): upgrade it', p_replica;
END $$;
