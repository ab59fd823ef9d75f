-- Kohaku SQLite schema, version 3: the stats webhook's group_id (Sora 2025.2 and later).
--
-- A connection attribute like bundle_id, so it lives on sora_connection only: reports sent by the
-- older stats exporter, and every connection stored before this version, keep NULL.
ALTER TABLE sora_connection ADD COLUMN group_id TEXT;
