#!/usr/bin/env bash
# Samples the engine's non-idle backends (application_name outbox/%) from
# pg_stat_activity every 200 ms, appending to FILE, until killed.
#   bench/sample-backends.sh postgres://…/db FILE &
url=${1:?usage: bench/sample-backends.sh URL FILE}; out=${2:?usage: bench/sample-backends.sh URL FILE}
while true; do
  psql -XAtq "$url" -F '|' -c "select to_char(clock_timestamp(),'HH24:MI:SS.MS'), pid, application_name, state, coalesce(wait_event_type,'-')||':'||coalesce(wait_event,'-'), round(extract(epoch from clock_timestamp()-query_start)::numeric,2), pg_blocking_pids(pid)::text, left(regexp_replace(query,'\s+',' ','g'),90) from pg_stat_activity where application_name like 'outbox/%' and state <> 'idle'" >> "$out" 2>/dev/null
  sleep 0.2
done
