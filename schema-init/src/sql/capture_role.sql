do $tidemark$
-- The capture functions run as @CAPTURE_ROLE@ (security definer): writers
-- need no grant on @SCHEMA@, and whatever the functions run can do no more
-- than append to @CHANGE_LOG@. A role of that name that can do more
-- (log in, hold other privileges or memberships) is refused, not trusted.
declare
  v_role pg_catalog.pg_roles;
  v_bad pg_catalog.text;
begin
  select * into v_role from pg_catalog.pg_roles where rolname operator(pg_catalog.=) '@CAPTURE_ROLE@';
  if not found then
    begin
      execute pg_catalog.format('create role %I nologin', '@CAPTURE_ROLE@');
      return;
    exception when duplicate_object or unique_violation then
      -- Roles are the cluster's: a schema-init on another database created
      -- it meanwhile. Checked as any role found there.
      select * into strict v_role from pg_catalog.pg_roles where rolname operator(pg_catalog.=) '@CAPTURE_ROLE@';
    end;
  end if;
  select pg_catalog.string_agg(bad.what, '; ') into v_bad from (
    select 'it may log in' as what where v_role.rolcanlogin
    union all
    select 'it is a superuser' where v_role.rolsuper
    union all
    select 'it has CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS'
     where v_role.rolcreaterole or v_role.rolcreatedb or v_role.rolreplication or v_role.rolbypassrls
    union all
    select pg_catalog.format('it is a member of %I', g.rolname)
      from pg_catalog.pg_auth_members m join pg_catalog.pg_roles g on g.oid operator(pg_catalog.=) m.roleid
     where m.member operator(pg_catalog.=) v_role.oid
    union all
    select pg_catalog.format('%I is a member of it', u.rolname)
      from pg_catalog.pg_auth_members m join pg_catalog.pg_roles u on u.oid operator(pg_catalog.=) m.member
     where m.roleid operator(pg_catalog.=) v_role.oid
    union all
    -- In this database: only its capture functions, USAGE on the schema and
    -- INSERT on the change log. In others (whose catalogs are not readable
    -- from here) only the same kinds of entry.
    select pg_catalog.format('it holds a privilege on or owns %s',
             case when d.dbid operator(pg_catalog.=) (select oid from pg_catalog.pg_database where datname operator(pg_catalog.=) pg_catalog.current_database())
                  then pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid)
                  else pg_catalog.format('an object in database %s', (select datname from pg_catalog.pg_database where oid operator(pg_catalog.=) d.dbid)) end)
      from pg_catalog.pg_shdepend d
     where d.refclassid operator(pg_catalog.=) 'pg_catalog.pg_authid'::pg_catalog.regclass
       and d.refobjid operator(pg_catalog.=) v_role.oid
       and not (
         case when d.dbid operator(pg_catalog.=) (select oid from pg_catalog.pg_database where datname operator(pg_catalog.=) pg_catalog.current_database())
         then (d.classid operator(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass and d.deptype operator(pg_catalog.=) 'o'
               and exists (select 1 from pg_catalog.pg_proc p where p.oid operator(pg_catalog.=) d.objid
                             and p.pronamespace operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
                             and p.prorettype operator(pg_catalog.=) 'pg_catalog.trigger'::pg_catalog.regtype))
           or (d.classid operator(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass and d.deptype operator(pg_catalog.=) 'a'
               and d.objid operator(pg_catalog.=) '@SCHEMA@'::pg_catalog.regnamespace
               and not exists (select 1 from pg_catalog.pg_namespace n cross join pg_catalog.aclexplode(n.nspacl) a
                                where n.oid operator(pg_catalog.=) d.objid and a.grantee operator(pg_catalog.=) v_role.oid
                                  and a.privilege_type operator(pg_catalog.<>) 'USAGE'))
           or (d.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass and d.deptype operator(pg_catalog.=) 'a'
               and d.objsubid operator(pg_catalog.=) 0
               and d.objid operator(pg_catalog.=) '@CHANGE_LOG@'::pg_catalog.regclass
               and not exists (select 1 from pg_catalog.pg_class c cross join pg_catalog.aclexplode(c.relacl) a
                                where c.oid operator(pg_catalog.=) d.objid and a.grantee operator(pg_catalog.=) v_role.oid
                                  and a.privilege_type operator(pg_catalog.<>) 'INSERT'))
           -- The TRUNCATE guard's marks (see @TRUNCATE_GUARD_FUNCTION@).
           or (d.classid operator(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass and d.deptype operator(pg_catalog.=) 'a'
               and d.objsubid operator(pg_catalog.=) 0
               and d.objid operator(pg_catalog.=) pg_catalog.to_regclass('@TRUNCATE_MARKS@')
               and not exists (select 1 from pg_catalog.pg_class c cross join pg_catalog.aclexplode(c.relacl) a
                                where c.oid operator(pg_catalog.=) d.objid and a.grantee operator(pg_catalog.=) v_role.oid
                                  and a.privilege_type operator(pg_catalog.<>) all (array['SELECT', 'INSERT', 'DELETE'])))
         else (d.classid operator(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass and d.deptype operator(pg_catalog.=) 'o')
           or (d.classid operator(pg_catalog.=) any (array['pg_catalog.pg_namespace'::pg_catalog.regclass, 'pg_catalog.pg_class'::pg_catalog.regclass])
               and d.deptype operator(pg_catalog.=) 'a' and d.objsubid operator(pg_catalog.=) 0)
         end)
  ) bad;
  if v_bad is not null then
    raise exception using
      message = pg_catalog.format('the role @CAPTURE_ROLE@ exists and may do more than append to @CHANGE_LOG@: %s', v_bad),
      hint = 'the capture functions run as this role; Tidemark creates it NOLOGIN with USAGE on schema @SCHEMA@, INSERT on @CHANGE_LOG@ and SELECT, INSERT, DELETE on @TRUNCATE_MARKS@ only: revoke the rest (or drop the role), then run schema-init again';
  end if;
end
$tidemark$
