-- When publish first set out to create the row's Notion page. Notion has no
-- idempotency key: a row with this set and no page id may have a page
-- already (the create's answer was lost), so publish looks the page up by
-- its `Halakha ID` before creating one; a row without it creates at once,
-- one request instead of two against Notion's 3 requests/s.
ALTER TABLE halakhot ADD COLUMN IF NOT EXISTS notion_create_started_at timestamptz;
