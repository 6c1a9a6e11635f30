do $tidemark$
-- Changelog capture installs an event trigger, which only a superuser may
-- create, and objects that superusers' sessions trust: refuse to build on a
-- schema @SCHEMA@ that anyone else could have filled.
declare
  v_bad pg_catalog.text;
begin
  if not (select r.rolsuper from pg_catalog.pg_roles r where r.rolname operator(pg_catalog.=) current_user) then
    raise exception using
      message = pg_catalog.format('changelog capture needs schema-init to run as a superuser, and %I is not one', current_user),
      hint = 'run schema-init with a superuser''s DATABASE_URL (like postgres): it installs the event trigger @EVENT_TRIGGER@, which only superusers may create, that keeps each table''s capture in step with ALTER TABLE; or use --capture logical';
  end if;
@UNSAFE_OBJECTS@
  if v_bad is not null then
    raise exception using
      message = pg_catalog.format('schema @SCHEMA@ is not safe to install changelog capture in: %s', v_bad),
      hint = 'superusers'' sessions would trust what those roles control: check the objects, then make a superuser own them (alter schema @SCHEMA@ owner to postgres; alter table/function ... owner to postgres) and revoke CREATE on the schema from others';
  end if;
end
$tidemark$
