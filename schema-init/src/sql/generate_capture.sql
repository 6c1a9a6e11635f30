create or replace function @GENERATE_CAPTURE@(
  p_relid pg_catalog.oid, p_function pg_catalog.text, p_level pg_catalog.text, p_update_before pg_catalog.text)
returns pg_catalog.int4
language plpgsql
set search_path = pg_catalog, pg_temp
as $generate$
-- Records the table's shape in @SHAPES@ (once per distinct shape) and
-- (re)creates its capture function @SCHEMA@.<p_function> for that shape,
-- owned by @CAPTURE_ROLE@. Reads only the catalog; runs no code of the
-- table's types. Returns the shape id, or null when the table has no
-- primary key (its capture function then refuses writes, naming the fix).
declare
  v_table pg_catalog.text;
  v_columns pg_catalog.jsonb;
  v_key pg_catalog.text[];
  v_key_catalog_eq pg_catalog.bool[];
  v_shape pg_catalog.int4;
  v_latest record;
  v_function pg_catalog.text := pg_catalog.format('%I.%I', '@SCHEMA@', p_function);
  v_comment pg_catalog.text;
  v_body pg_catalog.text;
  v_key_exact pg_catalog.bool[];
  v_row_unchanged pg_catalog.text;
  v_statement_changed pg_catalog.text;
  v_join pg_catalog.text;
  v_first pg_catalog.text;
  v_relkind pg_catalog.char;
  v_new pg_catalog.text := 'new';
  v_old pg_catalog.text := 'old';
  v_other pg_catalog.oid;
  v_moved pg_catalog.text;
begin
  if p_level operator(pg_catalog.<>) all (array['row', 'statement'])
     or p_update_before operator(pg_catalog.<>) all (array['full', 'null']) then
    raise exception 'tidemark: capture level % or update-before % unknown', p_level, p_update_before;
  end if;
  select pg_catalog.format('%I.%I', n.nspname, c.relname), c.relkind into v_table, v_relkind
    from pg_catalog.pg_class c
    join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
   where c.oid operator(pg_catalog.=) p_relid;
  if v_table is null then
    raise exception 'tidemark: no table with oid %', p_relid;
  end if;
  select coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
           'name', a.attname::pg_catalog.text,
           'attnum', a.attnum,
           'type_oid', a.atttypid::pg_catalog.int8,
           'typmod', a.atttypmod,
           'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
           'not_null', a.attnotnull) order by a.attnum), '[]'::pg_catalog.jsonb)
    into v_columns
    from pg_catalog.pg_attribute a
   where a.attrelid operator(pg_catalog.=) p_relid
     and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped;
  -- A row trigger of a partitioned table runs (as a clone) on each
  -- partition, where old and new are the partition's rows, whose columns may
  -- lie in another order (a table attached as a partition): its images are
  -- built column by column, in the shape's order.
  if v_relkind operator(pg_catalog.=) 'p' then
    select pg_catalog.format('row(%s)', coalesce(pg_catalog.string_agg(
             pg_catalog.format('new.%I', a.attname), ', ' order by a.attnum), '')),
           pg_catalog.format('row(%s)', coalesce(pg_catalog.string_agg(
             pg_catalog.format('old.%I', a.attname), ', ' order by a.attnum), ''))
      into v_new, v_old
      from pg_catalog.pg_attribute a
     where a.attrelid operator(pg_catalog.=) p_relid
       and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped;
  end if;
  -- The key's columns in index order, and whether each one's equality (of
  -- its index's operator class) is pg_catalog's, which no user can create.
  -- A key column is exact when equal values always have the same text
  -- (integers, uuid, boolean), so its text cannot change unless its value
  -- does.
  select pg_catalog.array_agg(a.attname::pg_catalog.text order by k.ord),
         pg_catalog.array_agg(op.oprnamespace operator(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace
                              and op.oprname operator(pg_catalog.=) '=' order by k.ord),
         pg_catalog.array_agg(a.atttypid operator(pg_catalog.=) any (array[
                                'pg_catalog.int2'::pg_catalog.regtype, 'pg_catalog.int4'::pg_catalog.regtype,
                                'pg_catalog.int8'::pg_catalog.regtype, 'pg_catalog.oid'::pg_catalog.regtype,
                                'pg_catalog.uuid'::pg_catalog.regtype, 'pg_catalog.bool'::pg_catalog.regtype]::pg_catalog.oid[])
                              order by k.ord)
    into v_key, v_key_catalog_eq, v_key_exact
    from pg_catalog.pg_index i
   cross join rows from (pg_catalog.unnest(i.indkey::pg_catalog.int2[]), pg_catalog.unnest(i.indclass::pg_catalog.oid[]))
              with ordinality as k(attnum, opclass, ord)
    join pg_catalog.pg_attribute a on a.attrelid operator(pg_catalog.=) i.indrelid
                                  and a.attnum operator(pg_catalog.=) k.attnum
    join pg_catalog.pg_opclass oc on oc.oid operator(pg_catalog.=) k.opclass
    left join pg_catalog.pg_amop am on am.amopfamily operator(pg_catalog.=) oc.opcfamily
                                   and am.amopstrategy operator(pg_catalog.=) 3
                                   and am.amoplefttype operator(pg_catalog.=) oc.opcintype
                                   and am.amoprighttype operator(pg_catalog.=) oc.opcintype
    left join pg_catalog.pg_operator op on op.oid operator(pg_catalog.=) am.amopopr
   where i.indrelid operator(pg_catalog.=) p_relid and i.indisprimary;

  if v_key is null then
    v_comment := pg_catalog.format(
      'Tidemark change-log capture (truncate too) of %s: %s triggers, update before %s, no primary key',
      v_table, p_level, p_update_before);
    v_body := pg_catalog.format($b$begin
  raise exception using
    message = pg_catalog.format('table %%s is captured by Tidemark and has no primary key, so its changes cannot be keyed', %1$L),
    hint = 'add a primary key (alter table ... add primary key), in the same transaction as dropping the old one; or drop the table''s tidemark_capture triggers';
end$b$, v_table);
  else
    select id, table_name, columns, key into v_latest
      from @SHAPES@
     where relid operator(pg_catalog.=) p_relid
     order by id desc limit 1;
    if v_latest.id is not null
       and v_latest.table_name operator(pg_catalog.=) v_table
       and v_latest.columns operator(pg_catalog.=) v_columns
       and v_latest.key operator(pg_catalog.=) pg_catalog.to_jsonb(v_key) then
      v_shape := v_latest.id;
    else
      insert into @SHAPES@ (relid, table_name, columns, key)
      values (p_relid, v_table, v_columns, pg_catalog.to_jsonb(v_key))
      returning id into v_shape;
    end if;
    v_comment := pg_catalog.format(
      'Tidemark change-log capture (truncate too) of %s: %s triggers, update before %s, shape %s',
      v_table, p_level, p_update_before, v_shape);
    -- Whether the key kept its text, from the output functions of its
    -- columns only: in a row trigger (old, new), and the opposite in a
    -- statement trigger (o, n; exact columns are equal there already).
    select pg_catalog.string_agg(case when x
             then pg_catalog.format('old.%1$I operator(pg_catalog.=) new.%1$I', c)
             else pg_catalog.format('pg_catalog.textin(pg_catalog.record_out(row(old.%1$I))) operator(pg_catalog.=) pg_catalog.textin(pg_catalog.record_out(row(new.%1$I)))', c)
           end, ' and ' order by ord),
           pg_catalog.string_agg(pg_catalog.format(
             'pg_catalog.textin(pg_catalog.record_out(row(o.%1$I))) operator(pg_catalog.<>) pg_catalog.textin(pg_catalog.record_out(row(n.%1$I)))', c),
             ' or ' order by ord) filter (where not x)
      into v_row_unchanged, v_statement_changed
      from rows from (pg_catalog.unnest(v_key), pg_catalog.unnest(v_key_exact)) with ordinality as u(c, x, ord);
    v_first := v_key[1];
    if p_level operator(pg_catalog.=) 'row' then
      v_body := pg_catalog.format($b$begin
  if tg_op operator(pg_catalog.=) 'TRUNCATE' then
    -- Its statement-level truncate trigger: no row image.
    insert into @CHANGE_LOG@ (table_name, shape, op) values (%1$L, %2$s, 't');
  elsif tg_op operator(pg_catalog.=) 'INSERT' then
    insert into @CHANGE_LOG@ (table_name, shape, op, after)
    values (%1$L, %2$s, 'c', pg_catalog.textin(pg_catalog.record_out(%4$s)));
  elsif tg_op operator(pg_catalog.=) 'UPDATE' then
%3$s
  else
    insert into @CHANGE_LOG@ (table_name, shape, op, before)
    values (%1$L, %2$s, 'd', pg_catalog.textin(pg_catalog.record_out(%5$s)));
  end if;
  return null;
end$b$, v_table, v_shape,
        case p_update_before
        when 'full' then pg_catalog.format($u$    insert into @CHANGE_LOG@ (table_name, shape, op, before, after)
    values (%1$L, %2$s, 'u', pg_catalog.textin(pg_catalog.record_out(%4$s)), pg_catalog.textin(pg_catalog.record_out(%3$s)));$u$,
          v_table, v_shape, v_new, v_old)
        else pg_catalog.format($u$    if %3$s then
      insert into @CHANGE_LOG@ (table_name, shape, op, after)
      values (%1$L, %2$s, 'u', pg_catalog.textin(pg_catalog.record_out(%4$s)));
    else
      -- The key's text changed: a delete of the old key, then a create.
      insert into @CHANGE_LOG@ (table_name, shape, op, before, after)
      values (%1$L, %2$s, 'd', pg_catalog.textin(pg_catalog.record_out(%5$s)), null),
             (%1$L, %2$s, 'c', null, pg_catalog.textin(pg_catalog.record_out(%4$s)));
    end if;$u$,
          v_table, v_shape, v_row_unchanged, v_new, v_old)
        end, v_new, v_old);
    else
      -- Old and new rows paired by key: by the key's own equality where
      -- that is pg_catalog's, else by the key's text.
      select pg_catalog.string_agg(
               case when e
                 then pg_catalog.format('o.%1$I operator(pg_catalog.=) n.%1$I', c)
                 else pg_catalog.format(
                   'pg_catalog.textin(pg_catalog.record_out(row(o.%1$I))) operator(pg_catalog.=) pg_catalog.textin(pg_catalog.record_out(row(n.%1$I)))', c)
               end, ' and ' order by ord)
        into v_join
        from rows from (pg_catalog.unnest(v_key), pg_catalog.unnest(v_key_catalog_eq)) with ordinality as u(c, e, ord);
      v_body := pg_catalog.format($b$begin
  if tg_op operator(pg_catalog.=) 'TRUNCATE' then
    insert into @CHANGE_LOG@ (table_name, shape, op) values (%1$L, %2$s, 't');
  elsif tg_op operator(pg_catalog.=) 'INSERT' then
    insert into @CHANGE_LOG@ (table_name, shape, op, after)
    select %1$L, %2$s, 'c', pg_catalog.textin(pg_catalog.record_out(n.*)) from @NEW_TABLE@ n;
  elsif tg_op operator(pg_catalog.=) 'DELETE' then
    insert into @CHANGE_LOG@ (table_name, shape, op, before)
    select %1$L, %2$s, 'd', pg_catalog.textin(pg_catalog.record_out(o.*)) from @OLD_TABLE@ o;
  else
    -- A row whose key changed is logged as a delete and a create.
    insert into @CHANGE_LOG@ (table_name, shape, op, before, after)
    select %1$L, %2$s,
           case when pg_catalog.num_nonnulls(n.%3$I) operator(pg_catalog.=) 0 then 'd'
                when pg_catalog.num_nonnulls(o.%3$I) operator(pg_catalog.=) 0 then 'c'
                else 'u' end,
           case when pg_catalog.num_nonnulls(o.%3$I) operator(pg_catalog.<>) 0%5$s
                then pg_catalog.textin(pg_catalog.record_out(o.*)) end,
           case when pg_catalog.num_nonnulls(n.%3$I) operator(pg_catalog.<>) 0
                then pg_catalog.textin(pg_catalog.record_out(n.*)) end
      from @OLD_TABLE@ o full join @NEW_TABLE@ n on %4$s;
  end if;
  return null;
end$b$, v_table, v_shape, v_first, v_join,
        case p_update_before
        when 'full' then ''
        -- The old row too when the key's text changed (numeric 1.0 to
        -- 1.00, citext case): pg-source then sends a delete of the old
        -- key and a create, so no stale key remains.
        else pg_catalog.format(
          E'\n                 and (pg_catalog.num_nonnulls(n.%1$I) operator(pg_catalog.=) 0%2$s)',
          v_first, ' or ' operator(pg_catalog.||) v_statement_changed)
        end);
    end if;
  end if;
  -- A function of this name whose triggers are on another table (one that
  -- was renamed away from this table's name, or dropped from under it) goes
  -- on capturing that table under a name of its own: two tables never
  -- share a capture function, which would log one's changes as the other's.
  if not exists (select 1 from pg_catalog.pg_trigger t
                  where t.tgfoid operator(pg_catalog.=) pg_catalog.to_regprocedure(v_function operator(pg_catalog.||) '()')
                    and t.tgrelid operator(pg_catalog.=) p_relid) then
    select t.tgrelid into v_other from pg_catalog.pg_trigger t
     where t.tgfoid operator(pg_catalog.=) pg_catalog.to_regprocedure(v_function operator(pg_catalog.||) '()')
     order by t.tgrelid limit 1;
    if v_other is not null then
      v_moved := 'capture_relid_' operator(pg_catalog.||) v_other::pg_catalog.int8::pg_catalog.text;
      while pg_catalog.to_regprocedure(pg_catalog.format('%I.%I()', '@SCHEMA@', v_moved)) is not null loop
        v_moved := v_moved operator(pg_catalog.||) '_';
      end loop;
      execute pg_catalog.format('alter function %s() rename to %I', v_function, v_moved);
    end if;
  end if;
  if pg_catalog.obj_description(pg_catalog.to_regprocedure(v_function operator(pg_catalog.||) '()'), 'pg_proc')
     is not distinct from v_comment then
    -- Already generated for this shape and these settings.
    return v_shape;
  end if;
  -- The body goes in as a string literal, never between dollar quotes: a
  -- table or column name may hold any dollar-quote tag.
  execute pg_catalog.format($f$create or replace function %s() returns trigger
language plpgsql security definer
@FUNCTION_SETTINGS@
as %L$f$, v_function,
    E'\n#variable_conflict use_column\n' operator(pg_catalog.||) v_body operator(pg_catalog.||) E'\n');
  execute pg_catalog.format('alter function %s() owner to %I', v_function, '@CAPTURE_ROLE@');
  execute pg_catalog.format('revoke all on function %s() from public', v_function);
  execute pg_catalog.format('comment on function %s() is %L', v_function, v_comment);
  return v_shape;
end
$generate$
