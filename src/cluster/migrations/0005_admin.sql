-- Cluster books, version 5: where each replica's admin API listens, so a
-- follower can forward an admin write to the treasurer, the only replica
-- whose ledger can make it.
ALTER TABLE cg_replicas ADD COLUMN admin_url text;
