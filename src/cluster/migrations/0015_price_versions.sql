-- Each replica prices from its own price file. It reports the version it
-- runs (`label@hash`) at start and whenever that changes, so
-- `cluster status` shows replicas that price differently.
ALTER TABLE cg_replicas ADD COLUMN price_version text;
