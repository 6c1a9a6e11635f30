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
  v_named pg_catalog.bool;
  v_relid pg_catalog.oid;
  v_enable pg_catalog.oid[] := '{}';
begin
  if (select c.relkind from pg_catalog.pg_class c where c.oid operator(pg_catalog.=) p_relid)
     operator(pg_catalog.<>) 'p' then
    execute pg_catalog.format('drop trigger if exists %I on %s', '@TRUNCATE_BEGIN_TRIGGER@', v_table);
    execute pg_catalog.format('drop trigger if exists %I on %s', '@TRUNCATE_END_TRIGGER@', v_table);
    return 0;
  end if;
  -- Only what is missing (or not enabled always) is made: the event trigger
  -- calls this for every partition created or attached, and a trigger
  -- made anew locks its table against writers. Every trigger is created
  -- before any is enabled (an ALTER TABLE, which fires the event trigger):
  -- the event trigger takes a partition without a guard for one just
  -- attached, whose rows it archives. A partition's guard names the table
  -- it guards (its argument), so that once detached it is found, and its
  -- rows archived as deletes of that table.
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
    v_enable := array[p_relid];
  end if;
  for v_partition, v_named in
    select t.relid,
           exists (select 1 from pg_catalog.pg_trigger g
                    where g.tgrelid operator(pg_catalog.=) t.relid
                      and g.tgname operator(pg_catalog.=) '@TRUNCATE_GUARD_TRIGGER@'
                      and g.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure
                      and g.tgnargs operator(pg_catalog.=) 1
                      and g.tgargs operator(pg_catalog.=) pg_catalog.byteacat(
                            pg_catalog.convert_to(p_relid::pg_catalog.int8::pg_catalog.text, 'UTF8'), pg_catalog.decode('00', 'hex')))
      from pg_catalog.pg_partition_tree(p_relid) t
     where t.relid operator(pg_catalog.<>) p_relid
       and not exists (select 1 from pg_catalog.pg_trigger g
                        where g.tgrelid operator(pg_catalog.=) t.relid
                          and g.tgname operator(pg_catalog.=) '@TRUNCATE_GUARD_TRIGGER@'
                          and g.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure
                          and g.tgnargs operator(pg_catalog.=) 1
                          and g.tgargs operator(pg_catalog.=) pg_catalog.byteacat(
                                pg_catalog.convert_to(p_relid::pg_catalog.int8::pg_catalog.text, 'UTF8'), pg_catalog.decode('00', 'hex'))
                          and g.tgenabled operator(pg_catalog.=) 'A')
     order by t.level, t.relid
  loop
    if not v_named then
      execute pg_catalog.format(
        'create or replace trigger %I before truncate on %s for each statement execute function @TRUNCATE_GUARD_FUNCTION@(%L)',
        '@TRUNCATE_GUARD_TRIGGER@', v_partition, p_relid::pg_catalog.int8::pg_catalog.text);
    end if;
    v_enable := v_enable operator(pg_catalog.||) v_partition::pg_catalog.oid;
    v_n := v_n operator(pg_catalog.+) 1;
  end loop;
  foreach v_relid in array v_enable loop
    if v_relid operator(pg_catalog.=) p_relid then
      execute pg_catalog.format('alter table %s enable always trigger %I, enable always trigger %I',
        v_table, '@TRUNCATE_BEGIN_TRIGGER@', '@TRUNCATE_END_TRIGGER@');
    else
      execute pg_catalog.format('alter table %s enable always trigger %I',
        v_relid::pg_catalog.regclass, '@TRUNCATE_GUARD_TRIGGER@');
    end if;
  end loop;
  return v_n;
end
$partitions$
