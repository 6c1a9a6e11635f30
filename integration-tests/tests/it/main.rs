//! End-to-end tests on a real Postgres and a real Kafka broker, taken from
//! `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` (`eval "$(dev/services up)"`).
//! Every test has its own database, topics, consumer group and output file,
//! so they run in parallel.

mod acl;
mod archive;
mod bad_config;
mod bad_input;
mod capture;
mod changelog;
mod check;
mod cli;
mod codec;
mod connect;
mod connect_worker;
mod docs;
mod envelope;
mod fault;
mod logical_ddl;
mod new_partitions;
mod ordering;
mod replay;
mod replay_follow_backlog;
mod replay_new_partitions;
mod replay_pipeline;
mod replay_segments;
mod restart;
mod secrets;
mod seed;
mod session;
mod signal;
mod sink;
mod source_trust;
mod support;
