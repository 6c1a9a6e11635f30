do $tidemark$
-- Snapshots on demand in logical capture: the signal table pg-source reads.
-- pg-source reads only a table a superuser owns in a schema a superuser
-- owns, so only a superuser's schema-init makes it; for anyone else this
-- changes nothing (schema-init says how to turn them on).
declare
  v_bad pg_catalog.text;
begin
  if not (select r.rolsuper from pg_catalog.pg_roles r where r.rolname operator(pg_catalog.=) current_user) then
    return;
  end if;
  -- Made first, then checked: a schema someone else made meanwhile is
  -- the one checked.
  create schema if not exists @SCHEMA@;
@UNSAFE_OBJECTS@
  if v_bad is not null then
    raise exception using
      message = pg_catalog.format('schema @SCHEMA@ is not safe to create the signal table @SIGNAL@ in: %s', v_bad),
      hint = 'superusers'' sessions would trust what those roles control: check the objects, then make a superuser own them (alter schema @SCHEMA@ owner to postgres; alter table/function ... owner to postgres) and revoke CREATE on the schema from others';
  end if;
  @SIGNAL_TABLE@;
  revoke all on table @SIGNAL@ from public;
end
$tidemark$