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
    return;
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
