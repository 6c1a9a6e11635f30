-- Included in a plpgsql block that declares v_bad: what in schema @SCHEMA@
-- a role other than a superuser (or the capture role's functions) controls.
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
