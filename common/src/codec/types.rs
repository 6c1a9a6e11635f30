//! Postgres types as the codec sees them: an OID resolved once into a
//! [`PgType`], and a column's [`ColumnType`] (type and typmod).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// A Postgres object id (`pg_type.oid`).
pub type Oid = u32;

/// The first OID a user object gets (`FirstNormalObjectId`): every type below
/// it was created by initdb, every type at or above it by a user or an
/// extension.
pub const FIRST_NORMAL_OID: Oid = 16384;

/// What a type is, as far as its mapping goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    /// `boolean`
    Bool,
    /// `smallint`
    Int2,
    /// `integer`
    Int4,
    /// `bigint`
    Int8,
    /// `oid`
    Oid,
    /// `real`
    Float4,
    /// `double precision`
    Float8,
    /// `numeric`
    Numeric,
    /// `text`, `character varying`, `character`, `name`, `"char"`
    Text,
    /// `bytea`
    Bytea,
    /// `timestamp without time zone`
    Timestamp,
    /// `timestamp with time zone`
    Timestamptz,
    /// `date`
    Date,
    /// `time without time zone`
    Time,
    /// `time with time zone`
    Timetz,
    /// `interval`
    Interval,
    /// `uuid`
    Uuid,
    /// `json`
    Json,
    /// `jsonb`
    Jsonb,
    /// `inet` (its text cast, which 0.1 used, always shows the netmask)
    Inet,
    /// `int2vector` and `oidvector`: space-separated lists of `elem`.
    Vector {
        /// The element type: `int2` or `oid`.
        elem: Oid,
    },
    /// A user enum.
    Enum,
    /// A domain: mapped as its base type (the end of the domain chain).
    Domain {
        /// The base type, itself never a domain.
        base: Arc<PgType>,
    },
    /// A composite (row) type.
    Composite,
    /// A range type.
    Range {
        /// `pg_range.rngsubtype`.
        subtype: Oid,
    },
    /// A true array type.
    Array {
        /// The element type.
        elem: Arc<PgType>,
        /// The element type's `typdelim`: what separates elements in the
        /// array's text (`;` for `box`, `,` for everything else built in).
        delimiter: u8,
    },
    /// Anything else (multiranges, geometric and network types, `money`,
    /// `xml`, extension types, unknown types): carried as its exact text.
    Other,
}

/// One Postgres type, resolved once per OID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgType {
    /// `pg_type.oid`
    pub oid: Oid,
    /// The schema the type lives in (`pg_catalog` for built-in types).
    pub schema: String,
    /// `pg_type.typname` (`int4`, `_int4`, `mood`), which Debezium's
    /// `__debezium.source.column.type` parameter carries upper-cased.
    pub name: String,
    /// `pg_catalog.format_type(oid, -1)` under Tidemark's `search_path`:
    /// schema-qualified outside `pg_catalog` (`public.mood`, `integer[]`).
    pub sql_name: String,
    /// How it maps.
    pub kind: TypeKind,
}

impl PgType {
    /// The type a domain rests on (itself when not a domain).
    pub fn base(&self) -> &PgType {
        match &self.kind {
            TypeKind::Domain { base } => base,
            _ => self,
        }
    }

    /// Whether the type is one of the built-in types of the static table.
    pub fn is_builtin(&self) -> bool {
        self.oid < FIRST_NORMAL_OID && builtin(self.oid).is_some()
    }
}

/// A column's type: its [`PgType`] and `atttypmod` (-1 when none), which
/// says `varchar(10)` from `varchar`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    /// The type.
    pub ty: Arc<PgType>,
    /// `pg_attribute.atttypmod` (or pgoutput's), -1 when the column has none.
    pub typmod: i32,
    /// `pg_catalog.format_type(oid, typmod)`, schema-qualified outside
    /// `pg_catalog`: what playback recreates the column with.
    sql_type: String,
}

impl ColumnType {
    /// A column of `ty` with `typmod` whose `format_type` text is known.
    /// Use [`ColumnType::builtin`] or
    /// [`TypeCache::column_type`](super::TypeCache::column_type), which
    /// compute it.
    pub fn new(ty: Arc<PgType>, typmod: i32, sql_type: String) -> Self {
        Self {
            ty,
            typmod,
            sql_type,
        }
    }

    /// A column of a built-in type; `None` when `oid` is not built in (then
    /// ask a [`TypeCache`](super::TypeCache)).
    pub fn builtin(oid: Oid, typmod: i32) -> Option<Self> {
        let ty = builtin(oid)?;
        let sql_type = format_builtin(&ty, typmod);
        Some(Self::new(ty, typmod, sql_type))
    }

    /// The exact SQL type, as `pg_catalog.format_type(oid, typmod)` prints
    /// it in a Tidemark session (`character varying(256)`, `numeric(10,2)`,
    /// `public.mood`, `integer[]`).
    pub fn sql_type(&self) -> &str {
        &self.sql_type
    }
}

/// One row of the built-in table: oid, typname, `format_type(oid, null)`,
/// array type oid, delimiter, kind.
struct Builtin {
    oid: Oid,
    name: &'static str,
    sql: &'static str,
    array: Oid,
    delim: u8,
    kind: TypeKind,
}

const fn b(oid: Oid, name: &'static str, sql: &'static str, array: Oid, kind: TypeKind) -> Builtin {
    Builtin {
        oid,
        name,
        sql,
        array,
        delim: b',',
        kind,
    }
}

/// Every built-in type a column can have, from `pg_type` of Postgres 15.
fn builtin_rows() -> Vec<Builtin> {
    use TypeKind::*;
    let range = |subtype| Range { subtype };
    vec![
        b(16, "bool", "boolean", 1000, Bool),
        b(17, "bytea", "bytea", 1001, Bytea),
        b(18, "char", "\"char\"", 1002, Text),
        b(19, "name", "name", 1003, Text),
        b(20, "int8", "bigint", 1016, Int8),
        b(21, "int2", "smallint", 1005, Int2),
        b(22, "int2vector", "int2vector", 1006, Vector { elem: 21 }),
        b(23, "int4", "integer", 1007, Int4),
        b(24, "regproc", "regproc", 1008, Other),
        b(25, "text", "text", 1009, Text),
        b(26, "oid", "oid", 1028, Oid),
        b(27, "tid", "tid", 1010, Other),
        b(28, "xid", "xid", 1011, Other),
        b(29, "cid", "cid", 1012, Other),
        b(30, "oidvector", "oidvector", 1013, Vector { elem: 26 }),
        b(114, "json", "json", 199, Json),
        b(142, "xml", "xml", 143, Other),
        b(600, "point", "point", 1017, Other),
        b(601, "lseg", "lseg", 1018, Other),
        b(602, "path", "path", 1019, Other),
        Builtin {
            delim: b';',
            ..b(603, "box", "box", 1020, Other)
        },
        b(604, "polygon", "polygon", 1027, Other),
        b(628, "line", "line", 629, Other),
        b(650, "cidr", "cidr", 651, Other),
        b(700, "float4", "real", 1021, Float4),
        b(701, "float8", "double precision", 1022, Float8),
        b(718, "circle", "circle", 719, Other),
        b(774, "macaddr8", "macaddr8", 775, Other),
        b(790, "money", "money", 791, Other),
        b(829, "macaddr", "macaddr", 1040, Other),
        b(869, "inet", "inet", 1041, Inet),
        b(1033, "aclitem", "aclitem", 1034, Other),
        b(1042, "bpchar", "character", 1014, Text),
        b(1043, "varchar", "character varying", 1015, Text),
        b(1082, "date", "date", 1182, Date),
        b(1083, "time", "time without time zone", 1183, Time),
        b(
            1114,
            "timestamp",
            "timestamp without time zone",
            1115,
            Timestamp,
        ),
        b(
            1184,
            "timestamptz",
            "timestamp with time zone",
            1185,
            Timestamptz,
        ),
        b(1186, "interval", "interval", 1187, Interval),
        b(1266, "timetz", "time with time zone", 1270, Timetz),
        b(1560, "bit", "bit", 1561, Other),
        b(1562, "varbit", "bit varying", 1563, Other),
        b(1700, "numeric", "numeric", 1231, Numeric),
        b(1790, "refcursor", "refcursor", 2201, Text),
        b(2202, "regprocedure", "regprocedure", 2207, Other),
        b(2203, "regoper", "regoper", 2208, Other),
        b(2204, "regoperator", "regoperator", 2209, Other),
        b(2205, "regclass", "regclass", 2210, Other),
        b(2206, "regtype", "regtype", 2211, Other),
        b(2950, "uuid", "uuid", 2951, Uuid),
        b(2970, "txid_snapshot", "txid_snapshot", 2949, Other),
        b(3220, "pg_lsn", "pg_lsn", 3221, Other),
        b(3614, "tsvector", "tsvector", 3643, Other),
        b(3615, "tsquery", "tsquery", 3645, Other),
        b(3642, "gtsvector", "gtsvector", 3644, Other),
        b(3734, "regconfig", "regconfig", 3735, Other),
        b(3769, "regdictionary", "regdictionary", 3770, Other),
        b(3802, "jsonb", "jsonb", 3807, Jsonb),
        b(3904, "int4range", "int4range", 3905, range(23)),
        b(3906, "numrange", "numrange", 3907, range(1700)),
        b(3908, "tsrange", "tsrange", 3909, range(1114)),
        b(3910, "tstzrange", "tstzrange", 3911, range(1184)),
        b(3912, "daterange", "daterange", 3913, range(1082)),
        b(3926, "int8range", "int8range", 3927, range(20)),
        b(4072, "jsonpath", "jsonpath", 4073, Other),
        b(4089, "regnamespace", "regnamespace", 4090, Other),
        b(4096, "regrole", "regrole", 4097, Other),
        b(4191, "regcollation", "regcollation", 4192, Other),
        b(4451, "int4multirange", "int4multirange", 6150, Other),
        b(4532, "nummultirange", "nummultirange", 6151, Other),
        b(4533, "tsmultirange", "tsmultirange", 6152, Other),
        b(4534, "tstzmultirange", "tstzmultirange", 6153, Other),
        b(4535, "datemultirange", "datemultirange", 6155, Other),
        b(4536, "int8multirange", "int8multirange", 6157, Other),
        b(5038, "pg_snapshot", "pg_snapshot", 5039, Other),
        b(5069, "xid8", "xid8", 271, Other),
    ]
}

fn builtins() -> &'static HashMap<Oid, Arc<PgType>> {
    static TABLE: OnceLock<HashMap<Oid, Arc<PgType>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = HashMap::new();
        for row in builtin_rows() {
            let elem = Arc::new(PgType {
                oid: row.oid,
                schema: "pg_catalog".to_owned(),
                name: row.name.to_owned(),
                sql_name: format_name(row.oid, row.sql),
                kind: row.kind,
            });
            let array = Arc::new(PgType {
                oid: row.array,
                schema: "pg_catalog".to_owned(),
                name: format!("_{}", row.name),
                sql_name: format!("{}[]", format_name(row.oid, row.sql)),
                kind: TypeKind::Array {
                    elem: elem.clone(),
                    delimiter: row.delim,
                },
            });
            table.insert(row.array, array);
            table.insert(row.oid, elem);
        }
        table
    })
}

/// `format_type(oid, -1)` of a built-in: `bpchar` and `"bit"` differ from
/// their names without a typmod argument, since `character` and `bit` alone
/// mean length 1.
fn format_name(oid: Oid, sql: &str) -> String {
    match oid {
        1042 => "bpchar".to_owned(),
        1560 => "\"bit\"".to_owned(),
        _ => sql.to_owned(),
    }
}

/// Every type of the static table (the built-in types and their arrays).
pub fn builtin_types() -> impl Iterator<Item = Arc<PgType>> {
    builtins().values().cloned()
}

/// The built-in type `oid`, if it is one of the static table.
pub fn builtin(oid: Oid) -> Option<Arc<PgType>> {
    builtins().get(&oid).cloned()
}

/// `pg_catalog.format_type(oid, typmod)` of a built-in type, computed as
/// Postgres does (`format_type.c` and the types' `typmodout` functions).
pub(crate) fn format_builtin(ty: &PgType, typmod: i32) -> String {
    if let TypeKind::Array { elem, .. } = &ty.kind {
        return format!("{}[]", format_builtin(elem, typmod));
    }
    if typmod < 0 {
        return ty.sql_name.clone();
    }
    const VARHDRSZ: i32 = 4;
    match ty.oid {
        1042 => format!("character({})", typmod - VARHDRSZ),
        1043 => format!("character varying({})", typmod - VARHDRSZ),
        1560 => format!("bit({typmod})"),
        1562 => format!("bit varying({typmod})"),
        1700 => {
            let (precision, scale) = numeric_typmod(typmod);
            format!("numeric({precision},{scale})")
        }
        1083 => format!("time({typmod}) without time zone"),
        1266 => format!("time({typmod}) with time zone"),
        1114 => format!("timestamp({typmod}) without time zone"),
        1184 => format!("timestamp({typmod}) with time zone"),
        1186 => format!("interval{}", interval_typmod(typmod)),
        _ => format!("{}({typmod})", ty.sql_name),
    }
}

/// Precision and scale of a `numeric` typmod (the scale may be negative
/// since Postgres 15).
pub(crate) fn numeric_typmod(typmod: i32) -> (i32, i32) {
    let t = typmod - 4;
    ((t >> 16) & 0xffff, ((t & 0x7ff) ^ 1024) - 1024)
}

/// What `intervaltypmodout` prints: the fields (` year to month`) and the
/// precision (`(3)`).
fn interval_typmod(typmod: i32) -> String {
    const MONTH: i32 = 1 << 1;
    const YEAR: i32 = 1 << 2;
    const DAY: i32 = 1 << 3;
    const HOUR: i32 = 1 << 10;
    const MINUTE: i32 = 1 << 11;
    const SECOND: i32 = 1 << 12;
    const FULL_RANGE: i32 = 0x7fff;
    const FULL_PRECISION: i32 = 0xffff;
    let fields = (typmod >> 16) & 0x7fff;
    let precision = typmod & 0xffff;
    let fields = match fields {
        f if f == YEAR => " year",
        f if f == MONTH => " month",
        f if f == DAY => " day",
        f if f == HOUR => " hour",
        f if f == MINUTE => " minute",
        f if f == SECOND => " second",
        f if f == YEAR | MONTH => " year to month",
        f if f == DAY | HOUR => " day to hour",
        f if f == DAY | HOUR | MINUTE => " day to minute",
        f if f == DAY | HOUR | MINUTE | SECOND => " day to second",
        f if f == HOUR | MINUTE => " hour to minute",
        f if f == HOUR | MINUTE | SECOND => " hour to second",
        f if f == MINUTE | SECOND => " minute to second",
        FULL_RANGE => "",
        _ => "",
    };
    if precision == FULL_PRECISION {
        fields.to_owned()
    } else {
        format!("{fields}({precision})")
    }
}

/// Debezium's `__debezium.source.column.length` and `...scale` of a
/// column, from its typmod: the length of character and bit strings, the
/// precision and scale of `numeric`, the fractional-second precision (as
/// scale) of times, timestamps and intervals. `None` where the type has no
/// typmod or the column none.
pub(crate) fn length_and_scale(ty: &PgType, typmod: i32) -> (Option<i32>, Option<i32>) {
    let ty = match &ty.base().kind {
        TypeKind::Array { elem, .. } => elem.base(),
        _ => ty.base(),
    };
    if typmod < 0 {
        return (None, None);
    }
    match ty.oid {
        1042 | 1043 => (Some(typmod - 4), None),
        1560 | 1562 => (Some(typmod), None),
        1700 => {
            let (p, s) = numeric_typmod(typmod);
            (Some(p), Some(s))
        }
        1083 | 1266 | 1114 | 1184 => (None, Some(typmod)),
        1186 if typmod & 0xffff != 0xffff => (None, Some(typmod & 0xffff)),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(oid: Oid, typmod: i32) -> String {
        ColumnType::builtin(oid, typmod)
            .unwrap()
            .sql_type()
            .to_owned()
    }

    #[test]
    fn builtin_names_are_format_types() {
        assert_eq!(sql(23, -1), "integer");
        assert_eq!(sql(1007, -1), "integer[]");
        assert_eq!(sql(1043, 260), "character varying(256)");
        assert_eq!(sql(1015, 14), "character varying(10)[]");
        assert_eq!(sql(1042, -1), "bpchar");
        assert_eq!(sql(1042, 5), "character(1)");
        assert_eq!(sql(1560, -1), "\"bit\"");
        assert_eq!(sql(1560, 3), "bit(3)");
        assert_eq!(sql(1700, (10 << 16 | 2) + 4), "numeric(10,2)");
        assert_eq!(sql(1700, -1), "numeric");
        assert_eq!(sql(1114, 3), "timestamp(3) without time zone");
        assert_eq!(sql(1186, -1), "interval");
        assert_eq!(sql(18, -1), "\"char\"");
        assert_eq!(sql(1002, -1), "\"char\"[]");
        assert_eq!(sql(22, -1), "int2vector");
    }

    #[test]
    fn arrays_know_their_element_and_delimiter() {
        let boxes = builtin(1020).unwrap();
        match &boxes.kind {
            TypeKind::Array { elem, delimiter } => {
                assert_eq!(elem.oid, 603);
                assert_eq!(*delimiter, b';');
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(boxes.name, "_box");
        assert!(boxes.is_builtin());
    }

    #[test]
    fn lengths_and_scales_come_from_the_typmod() {
        let t = |oid| builtin(oid).unwrap();
        assert_eq!(length_and_scale(&t(1043), 260), (Some(256), None));
        assert_eq!(length_and_scale(&t(1015), 14), (Some(10), None));
        assert_eq!(
            length_and_scale(&t(1700), (10 << 16 | 2) + 4),
            (Some(10), Some(2))
        );
        assert_eq!(length_and_scale(&t(1700), -1), (None, None));
        assert_eq!(length_and_scale(&t(1114), 3), (None, Some(3)));
        assert_eq!(length_and_scale(&t(23), -1), (None, None));
    }
}
