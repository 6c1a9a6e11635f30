create or replace function @DROP_START_EVENT_TRIGGER_FUNCTION@()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $ddl$
-- Runs before every DROP that can drop a table: notes, for
-- @DROP_EVENT_TRIGGER_FUNCTION@ (which runs once the objects are gone, when
-- a dropped partition's catalog entry and rows can no longer be read),
-- every partition of a captured partitioned table, the table, the
-- partition's parent and the file its rows are stored in (which stays until
-- the DROP commits). Reads only the catalog. The notes are a setting local
-- to the transaction, written anew by every such DROP, so no earlier
-- statement's value is ever read.
begin
  perform pg_catalog.set_config('@DROPPING_SETTING@', coalesce((
    select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
             'relid', g.tgrelid::pg_catalog.int8,
             'name', g.tgrelid::pg_catalog.regclass::pg_catalog.text,
             'kind', c.relkind,
             'table', pg_catalog.convert_from(pg_catalog.substring(g.tgargs, 1, pg_catalog.length(g.tgargs) operator(pg_catalog.-) 1), 'UTF8'),
             'parent', (select i.inhparent::pg_catalog.regclass::pg_catalog.text from pg_catalog.pg_inherits i
                         where i.inhrelid operator(pg_catalog.=) g.tgrelid limit 1),
             'file', pg_catalog.pg_relation_filepath(g.tgrelid)))
      from pg_catalog.pg_trigger g
      join pg_catalog.pg_class c on c.oid operator(pg_catalog.=) g.tgrelid
     where g.tgname operator(pg_catalog.=) '@TRUNCATE_GUARD_TRIGGER@'
       and g.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure
       and g.tgnargs operator(pg_catalog.=) 1)::pg_catalog.text, '[]'), true);
end
$ddl$
