create or replace function @TRUNCATE_GUARD_FUNCTION@()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $guard$
-- A TRUNCATE of one partition of a captured partitioned table removes rows
-- of the table without a change event of each, and a TRUNCATE event of the
-- table would empty all of it on replay: such a TRUNCATE is refused, naming
-- the fix. Postgres truncates a partitioned table by truncating each of its
-- partitions, firing their truncate triggers too: the table's own trigger
-- (@TRUNCATE_BEGIN_TRIGGER@, before any partition's, as Postgres fires the
-- triggers of the tables a TRUNCATE names before those of their partitions)
-- marks that its partitions go with it, until @TRUNCATE_END_TRIGGER@ after
-- the TRUNCATE clears the mark, so a later TRUNCATE of a partition in the
-- same transaction is refused again. The marks are in a table that only
-- this function writes (security definer, owned by @CAPTURE_ROLE@, which may
-- read, insert and delete them; writers have no privilege on it), so no
-- writer can forge one. Reads only the catalog and the marks; runs no code
-- of a user's.
declare
  v_table pg_catalog.regclass;
begin
  if tg_name operator(pg_catalog.=) '@TRUNCATE_BEGIN_TRIGGER@' then
    insert into @TRUNCATE_MARKS@ (txid, relid) values (pg_catalog.pg_current_xact_id(), tg_relid);
  elsif tg_name operator(pg_catalog.=) '@TRUNCATE_END_TRIGGER@' then
    delete from @TRUNCATE_MARKS@ m
     where m.txid operator(pg_catalog.=) pg_catalog.pg_current_xact_id()
       and m.relid operator(pg_catalog.=) tg_relid;
  else
    -- The nearest captured table this one is a partition of (none once it
    -- was detached: then it is a table of its own, truncated freely).
    select a.relid into v_table
      from pg_catalog.pg_partition_ancestors(tg_relid) with ordinality as a(relid, depth)
     where a.relid operator(pg_catalog.<>) tg_relid
       and exists (select 1 from pg_catalog.pg_trigger t
                     join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) t.tgfoid
                    where t.tgrelid operator(pg_catalog.=) a.relid
                      and t.tgname operator(pg_catalog.=) '@TRUNCATE_BEGIN_TRIGGER@'
                      and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace)
     order by a.depth
     limit 1;
    if v_table is not null and not exists (
         select 1 from @TRUNCATE_MARKS@ m
          where m.txid operator(pg_catalog.=) pg_catalog.pg_current_xact_id()
            and m.relid operator(pg_catalog.=) any (array(
                  select a.relid from pg_catalog.pg_partition_ancestors(tg_relid) a))) then
      raise exception using
        errcode = 'feature_not_supported',
        message = pg_catalog.format(
          'Tidemark captures table %s, and a TRUNCATE of its partition %s alone cannot be archived: its rows would be restored',
          v_table, tg_relid::pg_catalog.regclass),
        detail = 'A TRUNCATE event says that the whole table was emptied; a TRUNCATE of a partition removes only its rows, one by one unseen.',
        hint = pg_catalog.format(
          'delete from %s (captured row by row), or truncate %s as a whole (alone, or named before its partitions)',
          tg_relid::pg_catalog.regclass, v_table);
    end if;
  end if;
  return null;
end
$guard$
