-- Alert rules, and which of them fired, shared by every replica: a rule
-- added through any replica is in force on all of them, and a threshold
-- fires once for the cluster however many replicas see it crossed.

CREATE TABLE cg_alert_rules (
    id         bigserial PRIMARY KEY,
    org        bigint NOT NULL,
    -- The rule as the gateway keeps it: wallet, condition, webhook URL and
    -- the secret that signs its deliveries.
    body       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cg_alert_rules_org ON cg_alert_rules (org, id);

-- One row per firing: the unique (rule, period) is what makes a firing
-- once per cluster. The replica whose insert took the row delivers it; the
-- row keeps the event from the start, so a delivery its replica abandoned
-- (pending and not marked for a while) is taken over by another.
-- `attempts` may restart at 1 then: webhooks are delivered at least once.
CREATE TABLE cg_alert_deliveries (
    id         bigserial PRIMARY KEY,
    rule       bigint NOT NULL REFERENCES cg_alert_rules (id),
    org        bigint NOT NULL,
    period     text NOT NULL,
    replica    text NOT NULL,
    event      jsonb,
    status     text NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts   integer NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- When the delivering replica last marked it (claim or attempt).
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (rule, period)
);
CREATE INDEX cg_alert_deliveries_org ON cg_alert_deliveries (org, id);
CREATE INDEX cg_alert_deliveries_pending ON cg_alert_deliveries (updated_at) WHERE status = 'pending';

-- Adds a rule unless the org already keeps `max_rules`; returns its id, or
-- NULL when the org is at the cap. The org's advisory lock makes the count
-- and the insert one step, so replicas adding at once cannot pass the cap.
CREATE FUNCTION cg_add_alert_rule(p_org bigint, p_body jsonb, p_max_rules integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('cg_alert_rules', p_org));
    IF (SELECT count(*) FROM cg_alert_rules WHERE org = p_org) >= p_max_rules THEN
        RETURN NULL;
    END IF;
    INSERT INTO cg_alert_rules (org, body) VALUES (p_org, p_body) RETURNING id INTO new_id;
    -- Every replica reloads its rules (and reads them on a slow timer too).
    PERFORM pg_notify('cg_alerts', '');
    RETURN new_id;
END $$;
