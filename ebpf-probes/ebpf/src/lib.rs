//! Empty on purpose: the programs live in the `plugvisor-probes` binary
//! target. This library target lets `supervisor` name the crate as a
//! build-dependency, so cargo rebuilds the daemon when the probes change.
#![no_std]
