-- A page is now always looked up by its `Halakha ID` before it is created,
-- so the marker of a started create call is no longer written or read.
ALTER TABLE halakhot DROP COLUMN IF EXISTS notion_attempted_at;
