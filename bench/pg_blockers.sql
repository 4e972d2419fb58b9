-- Which transactions the waiting PostgreSQL backends wait for, every 0.2 s (docs/BENCHMARKS.md,
-- "Check-ins waiting on ingest"): psql -h 127.0.0.1 -U postgres test -At -f bench/pg_blockers.sql
-- Each line: the waiting statement, the blocker's state, wait and statement, and its transaction age (100 ms steps).
select 'W|' || regexp_replace(left(w.query, 30), '\s+', ' ', 'g') || '|BY|' || b.state || '|' || coalesce(b.wait_event_type,'CPU') || '|' || regexp_replace(left(b.query, 60), '\s+', ' ', 'g') || '|' || (extract(epoch from now() - b.xact_start)*1000)::int/100*100 from pg_stat_activity w, unnest(pg_blocking_pids(w.pid)) bp join pg_stat_activity b on b.pid = bp where w.datname = 'test' and w.wait_event_type = 'Lock'
\watch 0.2
