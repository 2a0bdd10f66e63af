-- Cluster books, version 18: a limit row's cap moves forward only.
--
-- Each replica sets a limit row's cap from its own view of the books, and a
-- view can lag the log: a replica that had not yet read a lowered cap could
-- set the row back to the old one, and if no replica's cap then differed
-- from what it last set, the row kept the stale cap until the period ended.
-- Now every cap carries a version: the sequence number of the record (a
-- key, user or application version) it came from, which the treasurer
-- numbers in order and every replica reads the same. A row takes a cap only
-- from a version at least as new as the one that set it.
CREATE TABLE cg_limit_versions (
    wallet  text PRIMARY KEY REFERENCES cg_wallets,
    version bigint NOT NULL
);

-- Sets the cap of a limit row from the record numbered p_version, creating
-- the row on first use. Returns whether the row carries p_cap afterwards:
-- false when a newer record already set it (the caller's view lags; the
-- row keeps the newer cap).
CREATE FUNCTION cg_set_limit(p_wallet text, p_org bigint, p_cap numeric, p_version bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_org bigint;
    v_version bigint;
    v_funded numeric;
    v_count bigint;
BEGIN
    INSERT INTO cg_wallets (wallet, org) VALUES (p_wallet, p_org) ON CONFLICT (wallet) DO NOTHING;
    SELECT w.org INTO v_org FROM cg_wallets w WHERE w.wallet = p_wallet FOR UPDATE;
    IF v_org <> p_org THEN
        RAISE EXCEPTION 'limit % belongs to another organization', p_wallet;
    END IF;
    SELECT v.version INTO v_version FROM cg_limit_versions v WHERE v.wallet = p_wallet;
    IF v_version > p_version THEN
        RETURN false;
    END IF;
    SELECT COALESCE(sum(f.amount), 0), count(*) INTO v_funded, v_count
        FROM cg_funding f WHERE f.wallet = p_wallet;
    IF v_funded <> p_cap THEN
        INSERT INTO cg_funding (org, wallet, amount, idempotency_key)
            VALUES (p_org, p_wallet, p_cap - v_funded, p_wallet || ':cap:' || (v_count + 1));
        UPDATE cg_wallets SET balance = balance + (p_cap - v_funded) WHERE wallet = p_wallet;
    END IF;
    INSERT INTO cg_limit_versions (wallet, version) VALUES (p_wallet, p_version)
        ON CONFLICT (wallet) DO UPDATE SET version = EXCLUDED.version;
    RETURN true;
END $$;

-- The unversioned form, for a replica of an older version still running
-- during an upgrade: it may create a row, but never moves a cap, since it
-- cannot tell whether its view is the newer one (a versioned call sets
-- the row right on its next hold).
CREATE OR REPLACE FUNCTION cg_set_limit(p_wallet text, p_org bigint, p_cap numeric)
RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    v_set boolean;
BEGIN
    IF EXISTS (SELECT 1 FROM cg_wallets w WHERE w.wallet = p_wallet) THEN
        RETURN p_cap;
    END IF;
    v_set := cg_set_limit(p_wallet, p_org, p_cap, 0);
    RETURN p_cap;
END $$;
