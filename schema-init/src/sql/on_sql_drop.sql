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
-- have. Then it refuses (aborting the DROP) to drop a partition of a
-- captured partitioned table that may hold rows, while the table stays:
-- they would leave the table unseen, and a restore would hold them. A
-- partition whose file is empty (never written, or vacuumed empty) goes;
-- so does one detached first, whose rows the DETACH archives as deletes.
-- It also refuses to drop the TRUNCATE guard of a partition that is still
-- one (the guard is how a later DETACH finds it). Security definer, as
-- on_ddl_command_end; it reads only the catalog and the files' sizes.
declare
  v_bad record;
  v_notes pg_catalog.jsonb := nullif(
    pg_catalog.current_setting('@DROPPING_SETTING@', true), '')::pg_catalog.jsonb;
begin
  perform @REFRESH_CAPTURES@(array(
    select distinct d.objid from pg_catalog.pg_event_trigger_dropped_objects() d
     where d.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       and d.objsubid operator(pg_catalog.<>) 0));
  perform pg_catalog.set_config('@DROPPING_SETTING@', '', true);
  for v_bad in
    select n.value->>'name' as name, n.value->>'parent' as parent,
           (n.value->>'table')::pg_catalog.oid::pg_catalog.regclass::pg_catalog.text as "table",
           n.value->>'kind' as kind,
           (pg_catalog.pg_stat_file(n.value->>'file', true)).size as size
      from pg_catalog.jsonb_array_elements(coalesce(v_notes, '[]')) n
     where (n.value->>'relid')::pg_catalog.oid operator(pg_catalog.=) any (array(
             select d.objid from pg_catalog.pg_event_trigger_dropped_objects() d
              where d.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                and d.objsubid operator(pg_catalog.=) 0))
       and exists (select 1 from pg_catalog.pg_trigger t
                    where t.tgrelid operator(pg_catalog.=) (n.value->>'table')::pg_catalog.oid
                      and t.tgname operator(pg_catalog.=) '@TRUNCATE_BEGIN_TRIGGER@'
                      and t.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure)
       and n.value->>'kind' operator(pg_catalog.<>) 'p'
     order by 1
  loop
    if v_bad.kind operator(pg_catalog.<>) 'r' or v_bad.size is distinct from 0 then
      raise exception using
        errcode = 'feature_not_supported',
        message = pg_catalog.format(
          'Tidemark captures table %s, and dropping its partition %s, which may hold rows, would remove them from the table unseen',
          v_bad."table", v_bad.name),
        detail = 'No change event would say that the rows left the table, so a restore would still hold them.',
        hint = pg_catalog.format(
          'alter table %s detach partition %s first (Tidemark archives the rows it holds as deletes), then drop it; or delete from %s and vacuum it',
          v_bad.parent, v_bad.name, v_bad.name);
    end if;
  end loop;
  -- A DROP run without the notes (a command that the start trigger does not
  -- know of) cannot be checked: refused if it drops a guarded partition and
  -- not its table.
  if v_notes is null then
    select pg_catalog.string_agg(d.object_identity, ', ') as what into v_bad
      from pg_catalog.pg_event_trigger_dropped_objects() d
     where d.object_type operator(pg_catalog.=) 'trigger'
       and d.address_names[3] operator(pg_catalog.=) '@TRUNCATE_GUARD_TRIGGER@'
       and pg_catalog.to_regclass(pg_catalog.format('%I.%I', d.address_names[1], d.address_names[2])) is null
       and not exists (select 1 from pg_catalog.pg_event_trigger_dropped_objects() e
                        where e.object_type operator(pg_catalog.=) 'trigger'
                          and e.address_names[3] operator(pg_catalog.=) '@TRUNCATE_BEGIN_TRIGGER@');
    if v_bad.what is not null then
      raise exception using
        errcode = 'feature_not_supported',
        message = pg_catalog.format('Tidemark cannot tell whether the partitions this %s drops (guarded by %s) hold rows of a captured table', tg_tag, v_bad.what),
        hint = 'detach them first (Tidemark archives the rows they hold as deletes), then drop them';
    end if;
  end if;
  select pg_catalog.string_agg(pg_catalog.format('%s of table %s', d.object_identity, a.relid::pg_catalog.regclass), ', ') as what
    into v_bad
    from pg_catalog.pg_event_trigger_dropped_objects() d
   cross join pg_catalog.pg_partition_ancestors(
           pg_catalog.to_regclass(pg_catalog.format('%I.%I', d.address_names[1], d.address_names[2]))) a
   where d.object_type operator(pg_catalog.=) 'trigger'
     and d.address_names[3] operator(pg_catalog.=) '@TRUNCATE_GUARD_TRIGGER@'
     and exists (select 1 from pg_catalog.pg_trigger t
                  where t.tgrelid operator(pg_catalog.=) a.relid
                    and t.tgname operator(pg_catalog.=) '@TRUNCATE_BEGIN_TRIGGER@'
                    and t.tgfoid operator(pg_catalog.=) '@TRUNCATE_GUARD_FUNCTION@()'::pg_catalog.regprocedure);
  if v_bad.what is not null then
    raise exception using
      errcode = 'feature_not_supported',
      message = pg_catalog.format('Tidemark guards the partitions of a captured table: trigger %s stays while it is a partition', v_bad.what),
      hint = 'detach the partition first (Tidemark archives the rows it holds as deletes), or stop capturing the table';
  end if;
end
$ddl$
