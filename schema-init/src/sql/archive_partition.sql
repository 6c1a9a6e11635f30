create or replace function @ARCHIVE_PARTITION_FUNCTION@(
  p_table pg_catalog.oid, p_partition pg_catalog.oid, p_op pg_catalog."char")
returns pg_catalog.int8
language plpgsql
@FUNCTION_SETTINGS@
as $archive$
-- Logs every row that p_partition holds of its own as a create (p_op 'c':
-- it was attached to the captured partitioned table p_table) or a delete
-- ('d': it was detached from it) of p_table, with p_table's current shape
-- and each image built column by column in p_table's order, as the
-- table's capture function builds them. The event trigger calls it in the
-- ATTACH's or DETACH's own transaction, which holds the partition's ACCESS
-- EXCLUSIVE lock: every write made to it before is committed and read
-- here, every later one finds it attached (captured row by row) or detached
-- (a table of its own). The rows are read with record_out, which calls only
-- the output functions of the columns' types (with the capture functions'
-- settings); no code of a user's runs. Returns how many rows it logged.
declare
  v_kind pg_catalog.char;
  v_shape pg_catalog.int4;
  v_table pg_catalog.text;
  v_image pg_catalog.text;
  v_n pg_catalog.int8;
begin
  select c.relkind into v_kind from pg_catalog.pg_class c where c.oid operator(pg_catalog.=) p_partition;
  if v_kind operator(pg_catalog.=) 'p' then
    return 0; -- a partitioned partition holds no rows of its own
  end if;
  if v_kind operator(pg_catalog.<>) 'r' then
    raise exception using
      errcode = 'feature_not_supported',
      message = pg_catalog.format(
        'Tidemark captures table %s and cannot read the rows of its partition %s (relkind %s) to archive them',
        p_table::pg_catalog.regclass, p_partition::pg_catalog.regclass, v_kind),
      hint = 'attach and detach only ordinary tables to a captured table';
  end if;
  -- A transaction snapshot older than the lock would miss rows committed
  -- while the DDL waited for it.
  if pg_catalog.current_setting('transaction_isolation') operator(pg_catalog.<>) 'read committed' then
    raise exception using
      errcode = 'feature_not_supported',
      message = pg_catalog.format(
        'Tidemark captures table %s, and %s its partition %s in a %s transaction could archive its rows incompletely',
        p_table::pg_catalog.regclass,
        case p_op when 'c' then 'attaching' else 'detaching' end,
        p_partition::pg_catalog.regclass, pg_catalog.current_setting('transaction_isolation')),
      detail = 'The rows it holds are archived as changes of the table in the same transaction; a snapshot taken before the partition was locked misses rows committed meanwhile.',
      hint = 'run the ALTER TABLE in a read committed transaction';
  end if;
  select s.id, s.table_name into v_shape, v_table
    from @SHAPES@ s
   where s.relid operator(pg_catalog.=) p_table
   order by s.id desc limit 1;
  if v_shape is null then
    raise exception using
      errcode = 'feature_not_supported',
      message = pg_catalog.format(
        'Tidemark captures table %s, which has no primary key: the rows of its partition %s cannot be archived',
        p_table::pg_catalog.regclass, p_partition::pg_catalog.regclass),
      hint = 'add a primary key to the table first';
  end if;
  select pg_catalog.format('pg_catalog.textin(pg_catalog.record_out(row(%s)))',
           pg_catalog.string_agg(pg_catalog.format('r.%I', a.attname), ', ' order by a.attnum))
    into v_image
    from pg_catalog.pg_attribute a
   where a.attrelid operator(pg_catalog.=) p_table
     and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped;
  execute pg_catalog.format(
    'insert into @CHANGE_LOG@ (table_name, shape, op, before, after) select %L, %s, %L, %s, %s from only %s r',
    v_table, v_shape, p_op,
    case when p_op operator(pg_catalog.=) 'd' then v_image else 'null' end,
    case when p_op operator(pg_catalog.=) 'c' then v_image else 'null' end,
    p_partition::pg_catalog.regclass);
  get diagnostics v_n = row_count;
  if v_n operator(pg_catalog.>) 0 then
    raise notice 'Tidemark archived the % rows of partition % as %s of table %',
      v_n, p_partition::pg_catalog.regclass,
      case p_op when 'c' then 'create' else 'delete' end, p_table::pg_catalog.regclass;
  end if;
  return v_n;
end
$archive$
