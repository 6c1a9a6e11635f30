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
  select pg_catalog.string_agg(bad.what, '; ') into v_bad from (
    select pg_catalog.format('the schema is owned by %I, who is not a superuser', r.rolname) as what
      from pg_catalog.pg_namespace n
      join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) n.nspowner
     where n.nspname operator(pg_catalog.=) '@SCHEMA@' and not r.rolsuper
    union all
    select pg_catalog.format('%s may create objects in it',
             case when a.grantee operator(pg_catalog.=) 0 then 'public' else pg_catalog.quote_ident(r.rolname) end)
      from pg_catalog.pg_namespace n
     cross join pg_catalog.aclexplode(n.nspacl) a
      left join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) a.grantee
     where n.nspname operator(pg_catalog.=) '@SCHEMA@' and a.privilege_type operator(pg_catalog.=) 'CREATE'
       and not coalesce(r.rolsuper, false)
    union all
    select pg_catalog.format('%s is owned by %I', c.oid::pg_catalog.regclass, r.rolname)
      from pg_catalog.pg_class c
      join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) c.relowner
     where c.relnamespace operator(pg_catalog.=) (select oid from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) '@SCHEMA@')
       and not r.rolsuper
    union all
    select pg_catalog.format('%s is owned by %I', p.oid::pg_catalog.regprocedure, r.rolname)
      from pg_catalog.pg_proc p
      join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) p.proowner
     where p.pronamespace operator(pg_catalog.=) (select oid from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) '@SCHEMA@')
       and not r.rolsuper and r.rolname operator(pg_catalog.<>) '@CAPTURE_ROLE@'
    union all
    select pg_catalog.format('type %s is owned by %I', t.oid::pg_catalog.regtype, r.rolname)
      from pg_catalog.pg_type t
      join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) t.typowner
     where t.typnamespace operator(pg_catalog.=) (select oid from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) '@SCHEMA@')
       and not r.rolsuper
    union all
    select pg_catalog.format('operator %s is owned by %I', o.oid::pg_catalog.regoperator, r.rolname)
      from pg_catalog.pg_operator o
      join pg_catalog.pg_roles r on r.oid operator(pg_catalog.=) o.oprowner
     where o.oprnamespace operator(pg_catalog.=) (select oid from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) '@SCHEMA@')
       and not r.rolsuper
  ) bad;
  if v_bad is not null then
    raise exception using
      message = pg_catalog.format('schema @SCHEMA@ is not safe to install changelog capture in: %s', v_bad),
      hint = 'superusers'' sessions would trust what those roles control: check the objects, then make a superuser own them (alter schema @SCHEMA@ owner to postgres; alter table/function ... owner to postgres) and revoke CREATE on the schema from others';
  end if;
end
$tidemark$
