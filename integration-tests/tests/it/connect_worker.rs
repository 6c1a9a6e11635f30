//! A real Kafka Connect worker for the tests: Kafka Connect's own
//! `ConnectStandalone` (connect-runtime, connect-json and connect-file from
//! Maven Central, at the broker's version), with `JsonConverter`
//! (`schemas.enable=true`) for keys and values, run as a child JVM.
//!
//! Two sinks read the same topics in one worker:
//! - Connect's `FileStreamSinkConnector`, which writes each record's
//!   `value().toString()`: a `Struct{...}` dump that quotes no string, omits
//!   null fields and prints `bytes` as `[B@<hash>`. Such a dump cannot be
//!   parsed back unambiguously (the string `a, b=c}` reads as several
//!   fields), so [`struct_dump`] renders what it must print for a known
//!   value, with each field's place in the line, and a line is compared with
//!   that whole (only the hash of a `bytes` value is not compared).
//! - a sink of the tests' own (`connect-fixture/`, compiled here with the
//!   JDK's `javac` against connect-api), which writes each record as the
//!   worker's converter read it back as JSON with Connect's own
//!   `JsonConverter.fromConnectData`: every Connect value exactly (doubles
//!   with all their digits, bytes as base64, strings quoted), with its topic,
//!   partition and offset. The value FileStreamSink saw is what this sink saw.
//!
//! The jars come from `dev/services connect-jars` (Maven, cached under
//! `TIDEMARK_CACHE_DIR`; Maven's own `~/.m2` too); the fixture's classes are
//! kept beside them, one folder per version of its sources. The JVM halts when
//! its standard input closes, so a worker never outlives its test, even one
//! killed by SIGKILL.

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What a worker needs on disk: the jars, the fixture's classes, the logging
/// configuration.
pub struct ConnectKit {
    /// Kafka Connect's jars and their dependencies.
    pub libs: PathBuf,
    /// The compiled fixture (`connect-fixture/src`) and its service file.
    pub classes: PathBuf,
}

/// The fixture's folder in the repository.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("connect-fixture")
}

/// Fetches the jars and compiles the fixture, once per test process.
pub async fn connect_kit() -> &'static ConnectKit {
    static KIT: tokio::sync::OnceCell<ConnectKit> = tokio::sync::OnceCell::const_new();
    KIT.get_or_init(|| async {
        tokio::task::spawn_blocking(prepare_kit)
            .await
            .expect("preparing the Connect worker does not panic")
    })
    .await
}

fn prepare_kit() -> ConnectKit {
    let services = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dev/services");
    let out = Command::new("bash")
        .arg(&services)
        .arg("connect-jars")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", services.display()));
    assert!(
        out.status.success(),
        "`dev/services connect-jars` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let libs = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(
        libs.join(format!("connect-file-{}.jar", kafka_version()))
            .is_file(),
        "no connect-file jar in {}",
        libs.display()
    );
    let classes = compile_fixture(&libs);
    ConnectKit { libs, classes }
}

/// Kafka's version, as dev/services fetches it.
fn kafka_version() -> String {
    let services =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../dev/services"))
            .unwrap();
    services
        .lines()
        .find_map(|l| l.strip_prefix("KAFKA_VERSION="))
        .expect("dev/services sets KAFKA_VERSION")
        .trim()
        .to_owned()
}

/// Compiles the fixture into a folder beside the jars named after a hash of
/// its sources, unless that folder is there already. Parallel test processes
/// each compile into a folder of their own and the first rename wins.
fn compile_fixture(libs: &Path) -> PathBuf {
    let src = fixture_dir().join("src");
    let mut sources = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "java") {
                sources.push(path);
            }
        }
    }
    sources.sort();
    let services = fixture_dir().join("META-INF/services");
    let mut hasher = DefaultHasher::new();
    libs.hash(&mut hasher);
    for path in sources.iter().chain(std::iter::once(
        &services.join("org.apache.kafka.connect.sink.SinkConnector"),
    )) {
        path.strip_prefix(fixture_dir()).unwrap().hash(&mut hasher);
        std::fs::read(path).unwrap().hash(&mut hasher);
    }
    let home = libs.parent().expect("the jars' folder has a parent");
    let target = home.join(format!("fixture-{:016x}", hasher.finish()));
    if target.join(".complete").is_file() {
        return target;
    }
    let tmp = home.join(format!("fixture.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("META-INF/services")).unwrap();
    let out = Command::new("javac")
        .args(["-nowarn", "-encoding", "UTF-8", "--release", "17", "-d"])
        .arg(&tmp)
        .arg("-cp")
        .arg(libs.join("*"))
        .args(&sources)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run javac ({e}): the Connect test needs a JDK (`dev/services install-deps` installs one)")
        });
    assert!(
        out.status.success(),
        "javac failed on {}:\n{}{}",
        src.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for entry in std::fs::read_dir(&services).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(
            &path,
            tmp.join("META-INF/services")
                .join(path.file_name().unwrap()),
        )
        .unwrap();
    }
    File::create(tmp.join(".complete")).unwrap();
    if std::fs::rename(&tmp, &target).is_err() {
        // Another process got there first with the same sources.
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(
            target.join(".complete").is_file(),
            "cannot move the compiled fixture to {}",
            target.display()
        );
    }
    target
}

/// Writes `props` as a Java properties file.
fn write_properties(path: &Path, props: &[(String, String)]) {
    let mut text = String::new();
    for (k, v) in props {
        // Backslash is the one escape character in a value.
        text.push_str(&format!("{k}={}\n", v.replace('\\', "\\\\")));
    }
    std::fs::write(path, text).unwrap();
}

/// A running `ConnectStandalone`: one JVM, stopped when dropped.
pub struct Worker {
    child: Child,
    /// Its standard input: closing it halts the JVM.
    stdin: Option<ChildStdin>,
    /// Its standard output and error.
    pub log: PathBuf,
}

impl Worker {
    /// Starts a worker with files in `dir`: `worker` its worker properties
    /// (added to those every test needs), `connectors` each connector's.
    /// The heap is bounded (`-Xmx256m`).
    pub async fn start(
        dir: &Path,
        bootstrap: &str,
        worker: &[(&str, &str)],
        connectors: &[Vec<(String, String)>],
    ) -> Worker {
        let kit = connect_kit().await;
        let offsets = dir.join("connect.offsets");
        let mut props: Vec<(String, String)> = [
            ("bootstrap.servers", bootstrap),
            (
                "key.converter",
                "org.apache.kafka.connect.json.JsonConverter",
            ),
            (
                "value.converter",
                "org.apache.kafka.connect.json.JsonConverter",
            ),
            ("key.converter.schemas.enable", "true"),
            ("value.converter.schemas.enable", "true"),
            (
                "offset.storage.file.filename",
                &offsets.display().to_string(),
            ),
            ("offset.flush.interval.ms", "500"),
            // A port of its own: tests run side by side.
            ("listeners", "http://127.0.0.1:0"),
            // Plugins are on the class path, each with its service file:
            // no scan of every jar at start.
            ("plugin.discovery", "service_load"),
            // Tidemark writes in transactions: a reader sees committed
            // records only.
            ("consumer.isolation.level", "read_committed"),
            ("consumer.auto.offset.reset", "earliest"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        props.extend(
            worker
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let worker_file = dir.join("worker.properties");
        write_properties(&worker_file, &props);
        let mut args = vec![worker_file];
        for (n, c) in connectors.iter().enumerate() {
            let file = dir.join(format!("connector-{n}.properties"));
            write_properties(&file, c);
            args.push(file);
        }
        let log = dir.join("connect-worker.log");
        let out = File::create(&log).unwrap();
        let classpath = format!("{}:{}", kit.classes.display(), kit.libs.join("*").display());
        let mut child = Command::new("java")
            .args([
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                fixture_dir().join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(classpath)
            .arg("dev.tidemark.it.Worker")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start java ({e}): `dev/services install-deps` installs a JDK")
            });
        let stdin = child.stdin.take();
        Worker { child, stdin, log }
    }

    /// Fails the test, with the end of the worker's log, if the JVM stopped.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "the Connect worker exited ({status}):\n{}",
                self.log_tail(40)
            );
        }
    }

    /// The last `n` lines of the worker's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops the JVM: closes its input (it halts), waits up to 10 s, then
    /// kills it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Also while a failed test unwinds.
        self.halt();
    }
}

/// One line of the fixture's file: a record as Connect's converter read it,
/// written back as JSON by Connect.
pub struct ExactRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// `{"schema":..,"payload":..}`, or `null`.
    pub key: Value,
    pub value: Value,
    /// Why a key or value does not fit its own Connect schema.
    pub invalid: Option<String>,
}

/// The complete lines of the fixture's file.
pub fn read_exact_records(path: &Path) -> Vec<ExactRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("the fixture wrote a line that is not JSON ({e}): {l}"));
            ExactRecord {
                topic: v["topic"].as_str().unwrap().to_owned(),
                partition: v["partition"].as_i64().unwrap() as i32,
                offset: v["offset"].as_i64().unwrap(),
                key: v["key"].clone(),
                value: v["value"].clone(),
                invalid: v.get("invalid").and_then(Value::as_str).map(str::to_owned),
            }
        })
        .collect()
}

/// FileStreamSink's file: one `toString()` per record, each followed by a
/// line end; a string value's own line ends are printed as they are, so a
/// record may take several lines.
pub fn read_dump_file(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// What `Struct.toString()` prints for a Connect value, and where each leaf
/// field's text is in it.
pub struct Dump {
    /// The text, with [`BYTES`] where a `bytes` value's `[B@<hash>` goes.
    pub text: String,
    /// Each field's path (`after.v`) and its byte range in `text`.
    pub fields: Vec<(String, std::ops::Range<usize>)>,
}

/// Stands for the `[B@<hash>` a `byte[]` prints as: its identity hash, not
/// its content.
pub const BYTES: &str = "[B@\u{0}";

/// The dump of `payload` under `schema` (both as `JsonConverter` writes
/// them). Java prints numbers as `Long.toString`, `Double.toString`, ...;
/// `JsonConverter.fromConnectData` writes them the same way (Jackson prints
/// a double with `Double.toString`), so a number's JSON text is its dump
/// (with Java's exponent), and a non-finite float (written as the string
/// `"NaN"`) prints bare. Fails on
/// what Tidemark never sends and Connect would print differently (maps,
/// Connect's own logical types).
pub fn struct_dump(schema: &Value, payload: &Value) -> Result<Dump, String> {
    let mut dump = Dump {
        text: String::new(),
        fields: Vec::new(),
    };
    render(schema, payload, "", &mut dump)?;
    Ok(dump)
}

fn render(schema: &Value, value: &Value, path: &str, out: &mut Dump) -> Result<(), String> {
    let ty = schema["type"].as_str().unwrap_or("(none)");
    if let Some(name) = schema["name"].as_str() {
        if name.starts_with("org.apache.kafka.connect.data.") {
            return Err(format!(
                "{path}: Connect's logical type {name} prints as a Java object"
            ));
        }
    }
    let start = out.text.len();
    match (ty, value) {
        (_, Value::Null) => out.text.push_str("null"),
        ("struct", Value::Object(fields)) => {
            out.text.push_str("Struct{");
            let mut first = true;
            for field in schema["fields"].as_array().into_iter().flatten() {
                let name = field["field"].as_str().unwrap_or_default();
                let v = fields.get(name).unwrap_or(&Value::Null);
                if v.is_null() {
                    continue;
                }
                if !first {
                    out.text.push(',');
                }
                first = false;
                out.text.push_str(name);
                out.text.push('=');
                let sub = if path.is_empty() {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                };
                render(field, v, &sub, out)?;
            }
            out.text.push('}');
            return Ok(());
        }
        ("array", Value::Array(items)) => {
            out.text.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.text.push_str(", ");
                }
                render(&schema["items"], item, &format!("{path}[{i}]"), out)?;
            }
            out.text.push(']');
        }
        ("string", Value::String(s)) => out.text.push_str(s),
        ("boolean", Value::Bool(b)) => out.text.push_str(if *b { "true" } else { "false" }),
        ("int8" | "int16" | "int32" | "int64", Value::Number(n)) => {
            out.text.push_str(&n.to_string())
        }
        // serde_json keeps a number's digits but writes its exponent as
        // `e+38`; Java's `Double.toString` writes `E38`.
        ("float" | "double", Value::Number(n)) => out
            .text
            .push_str(&n.to_string().replace("e+", "E").replace("e-", "E-")),
        ("float" | "double", Value::String(s))
            if matches!(s.as_str(), "NaN" | "Infinity" | "-Infinity") =>
        {
            out.text.push_str(s)
        }
        ("bytes", Value::String(_)) => out.text.push_str(BYTES),
        _ => return Err(format!("{path}: {value} under a {ty} schema")),
    }
    if !path.is_empty() {
        out.fields.push((path.to_owned(), start..out.text.len()));
    }
    Ok(())
}

impl Dump {
    /// Compares the dump with the start of `text` (FileStreamSink's file
    /// from some point on): `Ok(n)` if `text` starts with it, `n` being the
    /// bytes it takes there, else `Err(i)`, `i` being the first byte of the
    /// dump that differs. A `[B@` followed by hex digits in `text` stands for
    /// any `bytes` value.
    pub fn match_start(&self, text: &str) -> Result<usize, usize> {
        let (want, got) = (self.text.as_bytes(), text.as_bytes());
        let (mut i, mut j) = (0, 0);
        let bytes = BYTES.as_bytes();
        while i < want.len() {
            if want[i..].starts_with(bytes) {
                if !got[j..].starts_with(b"[B@") {
                    return Err(i);
                }
                let hex = got[j + 3..]
                    .iter()
                    .take_while(|c| c.is_ascii_hexdigit())
                    .count();
                if hex == 0 {
                    return Err(i);
                }
                i += bytes.len();
                j += 3 + hex;
            } else if got.get(j) == Some(&want[i]) {
                i += 1;
                j += 1;
            } else {
                return Err(i);
            }
        }
        Ok(j)
    }

    /// The field whose text holds byte `at` of the dump.
    pub fn field_at(&self, at: usize) -> &str {
        self.fields
            .iter()
            .filter(|(_, r)| r.start <= at && at <= r.end)
            .min_by_key(|(_, r)| r.end - r.start)
            .map_or("(outside every field)", |(p, _)| p.as_str())
    }
}
