-- Cluster books, version 20: a debit may name a lease (or a wallet) the
-- books do not have.
--
-- After a failover to an asynchronous standby the books can lack a lease
-- a replica drew just before it, or the wallet row made with it (its first
-- funding, a limit's row). Its debits then broke a foreign key, the
-- whole shipment failed every time, and the replica could neither ship nor
-- start again (a start ships what its outbox kept). Such a debit now ships
-- as uncovered, the recorded overrun it is: cg_ship_debits already counts a
-- lease it cannot find as no room, and moves no balance of a wallet it
-- cannot find (the audit lists the debit; the wallet's books were lost).
ALTER TABLE cg_debits DROP CONSTRAINT IF EXISTS cg_debits_lease_fkey;
ALTER TABLE cg_debits DROP CONSTRAINT IF EXISTS cg_debits_wallet_fkey;
