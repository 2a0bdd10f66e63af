-- Cluster books, version 6: spending-limit headroom, leased like credit.
--
-- Each (subject, period) a limit caps is a row of cg_wallets named
-- "limit:<subject>:<period>:<period end>" whose funding is the cap. Holds
-- lease headroom from it exactly as from a wallet's credit, and each settle
-- ships a debit against it beside the credit debit, so the replicas
-- together never let a subject spend past its cap. A new period is a new
-- row; a changed cap is funding of the difference (negative when lowered).

-- Sets the cap of a limit row, creating it on first use. Returns the row's
-- funding afterwards (the cap). Serialized by the row lock.
CREATE FUNCTION cg_set_limit(p_wallet text, p_org bigint, p_cap numeric)
RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    v_org bigint;
    v_funded numeric;
    v_count bigint;
BEGIN
    INSERT INTO cg_wallets (wallet, org) VALUES (p_wallet, p_org) ON CONFLICT (wallet) DO NOTHING;
    SELECT w.org INTO v_org FROM cg_wallets w WHERE w.wallet = p_wallet FOR UPDATE;
    IF v_org <> p_org THEN
        RAISE EXCEPTION 'limit % belongs to another organization', p_wallet;
    END IF;
    SELECT COALESCE(sum(f.amount), 0), count(*) INTO v_funded, v_count
        FROM cg_funding f WHERE f.wallet = p_wallet;
    IF v_funded <> p_cap THEN
        INSERT INTO cg_funding (org, wallet, amount, idempotency_key)
            VALUES (p_org, p_wallet, p_cap - v_funded, p_wallet || ':cap:' || (v_count + 1));
        UPDATE cg_wallets SET balance = balance + (p_cap - v_funded) WHERE wallet = p_wallet;
    END IF;
    RETURN p_cap;
END $$;

-- A limit's debits count against the limit only: the treasurer posts the
-- credit debit beside it, which counts the spend in its ledger's limits.
CREATE FUNCTION cg_limit_debit_posted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.posted := true;
    RETURN NEW;
END $$;

CREATE TRIGGER cg_limit_debits_are_not_posted BEFORE INSERT ON cg_debits
    FOR EACH ROW WHEN (NEW.wallet LIKE 'limit:%') EXECUTE FUNCTION cg_limit_debit_posted();
