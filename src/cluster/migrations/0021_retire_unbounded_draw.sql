-- Cluster books, version 21: the form of cg_draw_lease that version 9
-- replaced refuses to run.
--
-- Version 9 bounded leases by the expiry of the credit they draw on, with a
-- new form of cg_draw_lease (a horizon), and left the old form in place. A
-- replica of an older binary still running during an upgrade would draw
-- leases with no expiry bound through it. It now raises: such a replica
-- answers 503 until it runs the new binary, as one that cannot reach the
-- books does. (The old form of cg_append_books stays: the new form calls it
-- for the log and the balances, and adds the lots.)
CREATE OR REPLACE FUNCTION cg_draw_lease(p_replica text, p_wallet text, p_want numeric, p_min numeric,
                                         p_ttl_ms bigint, p_live_ms bigint)
RETURNS TABLE (lease bigint, granted numeric, expires_at timestamptz, db_now timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'replica % runs a binary older than the books (schema 9 and later): upgrade it', p_replica;
END $$;
