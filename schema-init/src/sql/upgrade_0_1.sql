do $tidemark$
-- A change log made by Tidemark 0.1 holds row images as jsonb and no shape.
-- An empty one is converted in place (its seq goes on), and every captured
-- table's capture function is generated anew; one that still holds changes
-- is left alone, since converting them would lose or mistype them.
declare
  v_rows pg_catalog.int8;
begin
  if (select a.atttypid from pg_catalog.pg_attribute a
       where a.attrelid operator(pg_catalog.=) '@CHANGE_LOG@'::pg_catalog.regclass
         and a.attname operator(pg_catalog.=) 'before' and not a.attisdropped)
     operator(pg_catalog.<>) 'pg_catalog.jsonb'::pg_catalog.regtype then
    return;
  end if;
  -- Writers' 0.1 triggers wait here until the conversion commits.
  lock table @CHANGE_LOG@ in exclusive mode;
  select pg_catalog.count(*) into v_rows from (select 1 from @CHANGE_LOG@ limit 100000000) l;
  if v_rows operator(pg_catalog.>) 0 then
    raise exception using
      message = pg_catalog.format('@CHANGE_LOG@ was made by Tidemark 0.1 and still holds %s changes that pg-source has not sent or not yet pruned; upgrading now would lose them', v_rows),
      hint = 'keep pg-source 0.1 running and pause writes to the captured tables until select count(*) from @CHANGE_LOG@ is 0, stop pg-source, run this schema-init, then start pg-source 0.2 with the same connector name and resume writes';
  end if;
  alter table @CHANGE_LOG@
    alter column before type pg_catalog.text using null,
    alter column after type pg_catalog.text using null,
    add column shape pg_catalog.int4 not null;
  perform @REFRESH_CAPTURES@(null);
end
$tidemark$
