//! What `--check` prints: each thing a program looked at before a run, as
//! fine, a warning (the run would go, but weaker than it could: a guarantee
//! that holds only in part, a limit close) or a failure (the run would
//! stop), each problem with the fix.
//!
//! A check reads the configuration, connects and looks, and changes
//! nothing: no slot, topic, file, checkpoint or table is created, no lock
//! taken, no offset committed.

use std::fmt::Write as _;

/// How one finding bears on a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing to do.
    Ok,
    /// The run would go, weakened.
    Warn,
    /// The run would stop.
    Fail,
}

/// One thing looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Its bearing.
    pub level: Level,
    /// What was found.
    pub what: String,
    /// What to do about it; empty when nothing.
    pub fix: String,
}

/// The findings of one `--check`, in the order they were made.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every finding.
    pub findings: Vec<Finding>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records something fine.
    pub fn ok(&mut self, what: impl Into<String>) {
        self.push(Level::Ok, what.into(), String::new());
    }

    /// Records something that would weaken a run, with its fix.
    pub fn warn(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warn, what.into(), fix.into());
    }

    /// Records something that would stop a run, with its fix.
    pub fn fail(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Fail, what.into(), fix.into());
    }

    /// Records an error a check ran into as a failure; its message (which
    /// names the fix, as every Tidemark error does) is the finding.
    pub fn error(&mut self, what: &str, e: &anyhow::Error) {
        self.push(Level::Fail, format!("{what}: {e:#}"), String::new());
    }

    fn push(&mut self, level: Level, what: String, fix: String) {
        self.findings.push(Finding { level, what, fix });
    }

    /// How many findings have `level`.
    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// The report as printed: one line per finding (`ok`, `WARN`, `FAIL`),
    /// the fix indented under it, and a last line with the verdict.
    pub fn render(&self, program: &str) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(out, "{tag} {}", f.what);
            if !f.fix.is_empty() {
                let _ = writeln!(out, "     fix: {}", f.fix);
            }
        }
        let (fails, warns) = (self.count(Level::Fail), self.count(Level::Warn));
        let verdict = if fails > 0 {
            "a run would stop"
        } else if warns > 0 {
            "a run would go, with the warnings above"
        } else {
            "ready to run"
        };
        let _ = writeln!(
            out,
            "{program} --check: {fails} failed, {warns} warnings, {} fine: {verdict}",
            self.count(Level::Ok)
        );
        out
    }

    /// Prints the report to stdout; fails (so the program exits 1) when a
    /// finding would stop a run.
    pub fn finish(self, program: &str) -> anyhow::Result<()> {
        print!("{}", self.render(program));
        let fails = self.count(Level::Fail);
        if fails > 0 {
            return Err(CheckFailed(fails).into());
        }
        Ok(())
    }
}

/// Connects to Kafka and reads the cluster's metadata (every topic), or
/// records why not. Blocks: call it off the async runtime's threads.
pub fn kafka_metadata(
    kafka: &crate::kafka::KafkaSettings,
    r: &mut Report,
) -> Option<(rdkafka::consumer::BaseConsumer, rdkafka::metadata::Metadata)> {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::BaseConsumer = match kafka.client_config(&[]).create() {
        Ok(c) => c,
        Err(e) => {
            r.fail(format!("kafka: {e}"), "check the kafka properties");
            return None;
        }
    };
    match consumer.fetch_metadata(None, std::time::Duration::from_secs(10)) {
        Ok(m) => {
            r.ok(format!(
                "kafka: connected to {} ({} broker(s))",
                kafka.bootstrap_servers,
                m.brokers().len()
            ));
            Some((consumer, m))
        }
        Err(e) => {
            r.fail(
                format!("kafka at {}: {e}", kafka.bootstrap_servers),
                "check --bootstrap-servers (TIDEMARK_BOOTSTRAP_SERVERS) and that the brokers run",
            );
            None
        }
    }
}

/// The error of a `--check` that found problems: the report said them
/// all, so the program exits 1 without logging them again.
#[derive(Debug, thiserror::Error)]
#[error("--check found {0} problem(s) that would stop a run")]
pub struct CheckFailed(pub usize);

/// Whether this process may create and write files in `dir`, as the
/// kernel decides (`access(2)` with `W_OK | X_OK`: permissions, ACLs, a
/// read-only mount), without creating anything.
pub fn dir_writable(dir: &std::path::Path) -> bool {
    use rustix::fs::{access, Access};
    access(dir, Access::WRITE_OK | Access::EXEC_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_fails_the_check_and_warnings_do_not() {
        let mut r = Report::new();
        r.ok("postgres reachable");
        r.warn("not in pg_read_all_stats", "grant pg_read_all_stats to u");
        let text = r.render("pg-source");
        assert!(
            text.contains("WARN not in pg_read_all_stats\n     fix: grant"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "0 failed, 1 warnings, 1 fine: a run would go, with the warnings above\n"
            ),
            "{text}"
        );
        assert!(r.clone().finish("pg-source").is_ok());
        r.fail(
            "wal_level is replica",
            "alter system set wal_level = logical",
        );
        assert!(r.render("pg-source").contains("a run would stop"));
        assert!(r.finish("pg-source").is_err());
    }

    #[test]
    fn a_folder_is_writable_or_not() {
        let dir = tempfile::tempdir().unwrap();
        assert!(dir_writable(dir.path()));
        assert!(!dir_writable(&dir.path().join("missing")));
    }
}
