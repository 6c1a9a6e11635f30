create or replace function @EVENT_TRIGGER_FUNCTION@()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $ddl$
-- Runs at the end of every ALTER TABLE (and renames of schemas, types and
-- domains), in the DDL's own transaction: each captured table it touched
-- whose shape changed gets a new shape and a capture function writing it.
-- Security definer, as the superuser who ran schema-init: the DDL's user
-- owns the table but not Tidemark's objects. It reads only the catalog.
begin
  if tg_tag operator(pg_catalog.=) 'ALTER TABLE' then
    perform @REFRESH_CAPTURES@(array(
      with recursive touched(relid) as (
        select c.objid from pg_catalog.pg_event_trigger_ddl_commands() c
         where c.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
        union
        select i.inhrelid from pg_catalog.pg_inherits i
          join touched t on i.inhparent operator(pg_catalog.=) t.relid)
      select relid from touched));
  else
    perform @REFRESH_CAPTURES@(null);
  end if;
end
$ddl$
