create or replace function @EVENT_TRIGGER_FUNCTION@()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $ddl$
-- Runs at the end of every ALTER TABLE (and renames of schemas, types and
-- domains, and CREATE TABLE), in the DDL's own transaction: each captured
-- table it touched whose shape changed gets a new shape and a capture
-- function writing it. Then it refuses (aborting the DDL) to leave a
-- captured table whose triggers writes can bypass: one with statement-level
-- triggers that became a partition or an inheritance child (writes through
-- its parent fire only the parent's statement triggers), or one that got
-- an inheritance child (whose rows its triggers never see). A capture
-- trigger enabled the default way (enable trigger all) is enabled always
-- again, so that it also fires for logical replication's apply, which runs
-- as a replica session; one disabled is warned of.
-- Security definer, as the superuser who ran schema-init: the DDL's user
-- owns the table but not Tidemark's objects. It reads only the catalog.
declare
  v_relids pg_catalog.oid[];
  v_bad pg_catalog.text;
  v_fix record;
  v_root pg_catalog.oid;
  v_member pg_catalog.oid;
begin
  if tg_tag operator(pg_catalog.=) 'CREATE TABLE' then
    v_relids := array(
      select c.objid from pg_catalog.pg_event_trigger_ddl_commands() c
       where c.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass);
  elsif tg_tag operator(pg_catalog.=) 'ALTER TABLE' then
    v_relids := array(
      with recursive touched(relid) as (
        select c.objid from pg_catalog.pg_event_trigger_ddl_commands() c
         where c.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
        union
        select i.inhrelid from pg_catalog.pg_inherits i
          join touched t on i.inhparent operator(pg_catalog.=) t.relid)
      select relid from touched);
    perform @REFRESH_CAPTURES@(v_relids);
  else
    perform @REFRESH_CAPTURES@(null);
    -- A rename of a schema, type or domain locks no captured table, so
    -- writers of the old shape may still be writing: its shapes keep no
    -- snapshot, and pg-source ends no batch there.
    update @SHAPES@ set snapshot = null
     where txid operator(pg_catalog.=) pg_catalog.pg_current_xact_id();
    return;
  end if;
  -- A partition attached to a captured partitioned table (at any depth)
  -- brings rows that no write of the table made, and one detached takes
  -- rows away unwritten: the rows it holds are archived as creates (or
  -- deletes) of the table, in the DDL's transaction, which holds the
  -- partition's ACCESS EXCLUSIVE lock (also the last transaction of a
  -- DETACH ... CONCURRENTLY, and DETACH ... FINALIZE). One attached has no
  -- guard yet; one detached keeps the guard that names the table (whose
  -- tree no longer holds it), which is dropped once its rows are archived.
  if tg_tag operator(pg_catalog.=) 'ALTER TABLE' then
    for v_root in
      select distinct a.relid
        from pg_catalog.unnest(v_relids) r(relid)
       cross join pg_catalog.pg_partition_ancestors(r.relid) a
       where exists (select 1 from pg_catalog.pg_trigger t
                      where t.tgrelid operator(pg_catalog.=) a.relid
                        and t.tgname operator(pg_catalog.=) '@TRUNCATE_BEGIN_TRIGGER@'
                        and t.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure)
    loop
      for v_member in
        select g.tgrelid from pg_catalog.pg_trigger g
         where g.tgname operator(pg_catalog.=) '@TRUNCATE_GUARD_TRIGGER@'
           and g.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure
           and g.tgnargs operator(pg_catalog.=) 1
           and g.tgargs operator(pg_catalog.=) pg_catalog.byteacat(
                 pg_catalog.convert_to(v_root::pg_catalog.int8::pg_catalog.text, 'UTF8'), pg_catalog.decode('00', 'hex'))
           and g.tgrelid operator(pg_catalog.<>) all (array(select t.relid from pg_catalog.pg_partition_tree(v_root) t))
         order by g.tgrelid
      loop
        perform @ARCHIVE_PARTITION_FUNCTION@(v_root, v_member, 'd');
        execute pg_catalog.format('drop trigger %I on %s', '@TRUNCATE_GUARD_TRIGGER@', v_member::pg_catalog.regclass);
      end loop;
      for v_member in
        select t.relid from pg_catalog.pg_partition_tree(v_root) t
         where t.relid operator(pg_catalog.<>) v_root
           and not exists (select 1 from pg_catalog.pg_trigger g
                            where g.tgrelid operator(pg_catalog.=) t.relid
                              and g.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure)
         order by t.level, t.relid
      loop
        perform @ARCHIVE_PARTITION_FUNCTION@(v_root, v_member, 'c');
      end loop;
    end loop;
  end if;
  -- A partition created or attached under a captured partitioned table (at
  -- any depth) refuses a TRUNCATE of its own, as its siblings do.
  for v_fix in
    select distinct a.relid
      from pg_catalog.unnest(v_relids) r(relid)
     cross join pg_catalog.pg_partition_ancestors(r.relid) a
      join pg_catalog.pg_class c on c.oid operator(pg_catalog.=) a.relid
      join pg_catalog.pg_trigger t on t.tgrelid operator(pg_catalog.=) a.relid
      join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) t.tgfoid
     where c.relkind operator(pg_catalog.=) 'p'
       and t.tgname operator(pg_catalog.=) '@TRUNCATE_TRIGGER@'
       and t.tgparentid operator(pg_catalog.=) 0
       and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
  loop
    perform @GUARD_PARTITIONS_FUNCTION@(v_fix.relid);
  end loop;
  -- A capture trigger enabled the default way again (enable trigger all)
  -- is made to fire for replica sessions again too.
  for v_fix in
    select t.tgrelid::pg_catalog.regclass::pg_catalog.text as relation, t.tgname::pg_catalog.text as name
      from pg_catalog.pg_trigger t
      join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) t.tgfoid
     where t.tgname operator(pg_catalog.=) any (array['@ROW_TRIGGER@', '@INSERT_TRIGGER@', '@UPDATE_TRIGGER@', '@DELETE_TRIGGER@', '@TRUNCATE_TRIGGER@', '@TRUNCATE_BEGIN_TRIGGER@', '@TRUNCATE_END_TRIGGER@', '@TRUNCATE_GUARD_TRIGGER@'])
       and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
       and t.tgenabled operator(pg_catalog.=) 'O'
       and t.tgrelid operator(pg_catalog.=) any (v_relids)
  loop
    execute pg_catalog.format('alter table %s enable always trigger %I', v_fix.relation, v_fix.name);
  end loop;
  select pg_catalog.string_agg(bad.what, '; ') into v_bad from (
    select pg_catalog.format(
             'table %s is captured with statement-level triggers and is a partition or an inheritance child of %s: writes made through %s would not fire them',
             i.inhrelid::pg_catalog.regclass, i.inhparent::pg_catalog.regclass, i.inhparent::pg_catalog.regclass) as what
      from pg_catalog.pg_trigger t
      join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) t.tgfoid
      join pg_catalog.pg_inherits i on i.inhrelid operator(pg_catalog.=) t.tgrelid
     where t.tgname operator(pg_catalog.=) '@INSERT_TRIGGER@'
       and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
       and (t.tgrelid operator(pg_catalog.=) any (v_relids) or i.inhparent operator(pg_catalog.=) any (v_relids))
    union all
    select pg_catalog.format(
             'table %s is captured and has the inheritance child %s, whose rows its triggers would not see',
             i.inhparent::pg_catalog.regclass, i.inhrelid::pg_catalog.regclass)
      from pg_catalog.pg_trigger t
      join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) t.tgfoid
      join pg_catalog.pg_inherits i on i.inhparent operator(pg_catalog.=) t.tgrelid
      join pg_catalog.pg_class c on c.oid operator(pg_catalog.=) t.tgrelid
     where t.tgname operator(pg_catalog.=) any (array['@ROW_TRIGGER@', '@INSERT_TRIGGER@'])
       and t.tgparentid operator(pg_catalog.=) 0
       and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
       and c.relkind operator(pg_catalog.<>) 'p'
       and (t.tgrelid operator(pg_catalog.=) any (v_relids) or i.inhrelid operator(pg_catalog.=) any (v_relids))
  ) bad;
  if v_bad is not null then
    raise exception using
      message = pg_catalog.format('Tidemark would miss changes: %s', v_bad),
      hint = 'capture partitions and inheritance children with row-level triggers (schema-init --capture-trigger row), and only partitioned tables, not inheritance parents; or drop the table''s tidemark_capture triggers to stop capturing it';
  end if;
  -- A disabled capture trigger is the owner's choice (a bulk load that the
  -- initial snapshot reads, say), so it is not refused; but said.
  select pg_catalog.string_agg(disabled.what, '; ') into v_bad from (
    select pg_catalog.format('trigger %I on table %s is %s', t.tgname, t.tgrelid::pg_catalog.regclass,
             case t.tgenabled
               when 'D' then 'disabled'
               else 'enabled for replica sessions only'
             end) as what
      from pg_catalog.pg_trigger t
      join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) t.tgfoid
     where t.tgname operator(pg_catalog.=) any (array['@ROW_TRIGGER@', '@INSERT_TRIGGER@', '@UPDATE_TRIGGER@', '@DELETE_TRIGGER@', '@TRUNCATE_TRIGGER@', '@TRUNCATE_BEGIN_TRIGGER@', '@TRUNCATE_END_TRIGGER@', '@TRUNCATE_GUARD_TRIGGER@'])
       and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
       and t.tgenabled operator(pg_catalog.<>) 'A'
       and t.tgrelid operator(pg_catalog.=) any (v_relids)
  ) disabled;
  if v_bad is not null then
    raise warning using
      message = pg_catalog.format('Tidemark misses the changes written while %s', v_bad),
      hint = 'alter table ... enable always trigger ... as soon as the changes should be captured again (disable your own triggers by name, or with disable trigger user only when no change may be archived)';
  end if;
end
$ddl$
