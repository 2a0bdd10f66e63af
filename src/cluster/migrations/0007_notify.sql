-- Wake-ups instead of polling: a commit that appends to the log notifies
-- `cg_log` (followers read it), one that ships debits notifies `cg_debits`
-- (the treasurer posts them). NOTIFY is delivered at commit and folded when
-- repeated in one transaction; a notification is only a hint, so every
-- listener also reads on a slow timer.

CREATE FUNCTION cg_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END $$;

CREATE TRIGGER cg_log_appended AFTER INSERT ON cg_log
    FOR EACH STATEMENT EXECUTE FUNCTION cg_notify('cg_log');

CREATE TRIGGER cg_debits_shipped AFTER INSERT ON cg_debits
    FOR EACH STATEMENT EXECUTE FUNCTION cg_notify('cg_debits');

-- A treasurer that steps down shortens its term: followers are told at
-- once, so one takes over without waiting for its next try. (Renewals
-- lengthen the term and wake nobody.)
CREATE FUNCTION cg_notify_treasury() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cg_treasury', '');
    RETURN NULL;
END $$;

CREATE TRIGGER cg_treasury_released AFTER UPDATE ON cg_treasurer
    FOR EACH ROW WHEN (NEW.expires_at < OLD.expires_at) EXECUTE FUNCTION cg_notify_treasury();
