create or replace function @REFRESH_CAPTURES@(p_relids pg_catalog.oid[])
returns pg_catalog.int4
language plpgsql
set search_path = pg_catalog, pg_temp
as $refresh$
-- Brings the capture function of every captured table in p_relids (every
-- captured table when null) up to date with the table's shape, keeping its
-- trigger level and its update-before setting (from the function's comment;
-- a 0.1 function, which has none, by its body).
declare
  v record;
  v_n pg_catalog.int4 := 0;
begin
  for v in
    select t.tgrelid as relid, p.proname::pg_catalog.text as function,
           pg_catalog.bool_or(t.tgname operator(pg_catalog.=) '@ROW_TRIGGER@') as row_level,
           pg_catalog.obj_description(p.oid, 'pg_proc') as comment, p.prosrc
      from pg_catalog.pg_trigger t
      join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) t.tgfoid
     where t.tgname operator(pg_catalog.=) any (array['@ROW_TRIGGER@', '@INSERT_TRIGGER@', '@UPDATE_TRIGGER@', '@DELETE_TRIGGER@'])
       and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
       -- Not the clones of a partitioned table's row trigger on its
       -- partitions: they run the partitioned table's function, which is
       -- generated for that table alone.
       and t.tgparentid operator(pg_catalog.=) 0
       and (p_relids is null or t.tgrelid operator(pg_catalog.=) any (p_relids))
     group by t.tgrelid, p.oid, p.proname, p.prosrc
     order by t.tgrelid
  loop
    perform @GENERATE_CAPTURE@(v.relid, v.function,
      case when v.row_level then 'row' else 'statement' end,
      -- The comment ends with what generate_capture wrote after the table's
      -- name, which may hold any text (so may a body's column names: only a
      -- 0.1 function, which has no comment, is told by its body).
      case when case when v.comment is not null
                     then v.comment operator(pg_catalog.~) ': (row|statement) triggers, update before null, (shape [0-9]+|no primary key)$'
                     else v.prosrc operator(pg_catalog.~~) '%''u'', pg_catalog.to_jsonb(new));%'
                       or v.prosrc operator(pg_catalog.~~) '%case when n is null or not (%' end
           then 'null' else 'full' end);
    v_n := v_n operator(pg_catalog.+) 1;
  end loop;
  return v_n;
end
$refresh$
