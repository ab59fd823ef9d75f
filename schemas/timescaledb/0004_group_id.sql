-- Kohaku PostgreSQL / TimescaleDB schema, version 4: the stats webhook's group_id (Sora 2025.2 and
-- later).
--
-- A connection attribute like bundle_id, so it lives on sora_connection only: reports sent by the
-- older stats exporter, and every connection stored before this version, keep NULL. Adding a
-- nullable column without a default rewrites nothing, whatever the table's size.
ALTER TABLE sora_connection ADD COLUMN group_id text;
