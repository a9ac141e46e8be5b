//! The fleet: plugin releases published once to a TUF repository (root →
//! targets → snapshot → timestamp, trusted through an offline root key)
//! reach every node they are meant for, through any HTTP server, CDN or
//! caching mirror, and nodes that are often offline serve from their local
//! cache and store meanwhile.
//!
//! * [`release`] — what a release is in the repository (the custom
//!   metadata of its targets) and which one a node takes;
//! * [`repo`] — `plugvisor repo`: the operator's side, which creates and
//!   signs the repository offline (`tough::editor`);
//! * [`sync`] — `[sync]`: the node's side, which follows the repository
//!   (the `tough` client), downloads what is meant for it and commits it
//!   into `plugins_dir` as an operator would.
pub mod release;
pub mod repo;
pub mod sync;
