-- Cluster books, version 16: the recent 402s an org's summary shows,
-- counted by every replica. Each replica adds what it refused, per wallet,
-- reason and minute, about once a second; the summary on any replica sums
-- them. Rows older than the kept window are deleted by the replicas as
-- they add theirs.
CREATE TABLE cg_refusals (
    wallet  text NOT NULL,
    reason  text NOT NULL,
    minute  timestamptz NOT NULL,
    count   bigint NOT NULL,
    last_at timestamptz NOT NULL,
    PRIMARY KEY (wallet, reason, minute)
);
CREATE INDEX cg_refusals_minute ON cg_refusals (minute);
