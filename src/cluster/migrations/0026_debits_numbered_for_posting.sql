-- Cluster books, version 26: a shipped debit's place in the posting order.
--
-- Versions 26 to 28 replace the posting queue (cg_unposted, version 13)
-- with a number on the debit itself: each shipped debit the treasurer must
-- post gets the next `post_seq` as it is shipped, and the treasurer posts
-- in that order from a mark its appends move (version 28). This version
-- only adds the column, which costs no rewrite of the table; version 27
-- indexes it without stopping shipments.
ALTER TABLE cg_debits ADD COLUMN post_seq bigint;
