create or replace function @DROP_EVENT_TRIGGER_FUNCTION@()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $ddl$
-- Runs after every DROP, in its own transaction: a captured table that lost
-- a column to a cascade (drop type, domain, extension or schema ...
-- cascade: no ALTER TABLE says so) gets a new shape and a capture function
-- writing it, so its rows are never logged under a shape they no longer
-- have. Security definer, as on_ddl_command_end; it reads only the catalog.
begin
  perform @REFRESH_CAPTURES@(array(
    select distinct d.objid from pg_catalog.pg_event_trigger_dropped_objects() d
     where d.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       and d.objsubid operator(pg_catalog.<>) 0));
end
$ddl$
