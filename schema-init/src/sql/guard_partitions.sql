create or replace function @GUARD_PARTITIONS_FUNCTION@(p_relid pg_catalog.oid)
returns pg_catalog.int4
language plpgsql
set search_path = pg_catalog, pg_temp
as $partitions$
-- Guards the captured table p_relid against TRUNCATEs of its partitions
-- alone (see @TRUNCATE_GUARD_FUNCTION@): when it is partitioned, its own
-- begin and end triggers, and the guard on every partition at every depth
-- (Postgres clones no statement trigger onto a partition); for a table that
-- is not partitioned, none of them. Returns how many partitions are
-- newly guarded. Every trigger is enabled always, as the capture triggers are.
declare
  v_partition pg_catalog.regclass;
  v_table pg_catalog.regclass := p_relid::pg_catalog.regclass;
  v_n pg_catalog.int4 := 0;
begin
  if (select c.relkind from pg_catalog.pg_class c where c.oid operator(pg_catalog.=) p_relid)
     operator(pg_catalog.<>) 'p' then
    execute pg_catalog.format('drop trigger if exists %I on %s', '@TRUNCATE_BEGIN_TRIGGER@', v_table);
    execute pg_catalog.format('drop trigger if exists %I on %s', '@TRUNCATE_END_TRIGGER@', v_table);
    return 0;
  end if;
  -- Only what is missing (or not enabled always) is made: the event trigger
  -- calls this for every partition created or attached, and a trigger
  -- made anew locks its table against writers.
  if (select pg_catalog.count(*) from pg_catalog.pg_trigger t
       where t.tgrelid operator(pg_catalog.=) p_relid
         and t.tgname operator(pg_catalog.=) any (array['@TRUNCATE_BEGIN_TRIGGER@', '@TRUNCATE_END_TRIGGER@'])
         and t.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure
         and t.tgenabled operator(pg_catalog.=) 'A') operator(pg_catalog.<>) 2 then
    execute pg_catalog.format(
      'create or replace trigger %I before truncate on %s for each statement execute function @TRUNCATE_GUARD_FUNCTION@()',
      '@TRUNCATE_BEGIN_TRIGGER@', v_table);
    execute pg_catalog.format(
      'create or replace trigger %I after truncate on %s for each statement execute function @TRUNCATE_GUARD_FUNCTION@()',
      '@TRUNCATE_END_TRIGGER@', v_table);
    execute pg_catalog.format('alter table %s enable always trigger %I, enable always trigger %I',
      v_table, '@TRUNCATE_BEGIN_TRIGGER@', '@TRUNCATE_END_TRIGGER@');
  end if;
  for v_partition in
    select t.relid from pg_catalog.pg_partition_tree(p_relid) t
     where t.relid operator(pg_catalog.<>) p_relid
       and not exists (select 1 from pg_catalog.pg_trigger g
                        where g.tgrelid operator(pg_catalog.=) t.relid
                          and g.tgname operator(pg_catalog.=) '@TRUNCATE_GUARD_TRIGGER@'
                          and g.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure
                          and g.tgenabled operator(pg_catalog.=) 'A')
     order by t.level, t.relid
  loop
    execute pg_catalog.format(
      'create or replace trigger %I before truncate on %s for each statement execute function @TRUNCATE_GUARD_FUNCTION@()',
      '@TRUNCATE_GUARD_TRIGGER@', v_partition);
    execute pg_catalog.format('alter table %s enable always trigger %I', v_partition, '@TRUNCATE_GUARD_TRIGGER@');
    v_n := v_n operator(pg_catalog.+) 1;
  end loop;
  return v_n;
end
$partitions$
